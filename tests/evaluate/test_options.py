"""The evaluation commands refuse impossible numbers in one line, before reading a model or an image."""

from __future__ import annotations

import pytest

from histosynth.errors import ConfigError
from histosynth.evaluate.images import choose
from histosynth.evaluate.realism import evaluate_realism

# Command lines as typed, split at spaces: each command with every path it needs, in a folder {tmp} that holds none.
REALISM = "evaluate realism --real {tmp}/real --synthetic {tmp}/synthetic --out {tmp}/report"
MASKS = "evaluate masks --segmenter {tmp}/seg --out {tmp}/report --model {tmp}/model --masks-from {tmp}/dataset"
CAPTIONS = "evaluate captions --segmenter {tmp}/seg --out {tmp}/report --images {tmp}/images"
SELECT = "select-pairs {tmp}/job --segmenter {tmp}/seg --out {tmp}/out"


@pytest.mark.parametrize("command, extra, message", [
    (REALISM, "--n -1", "--n must be at least 1, got -1"),
    (REALISM, "--n 0", "--n must be at least 1, got 0"),
    (REALISM, "--folds 0", "--folds must be at least 2, got 0"),
    (REALISM, "--bootstrap -1", "--bootstrap must be at least 1, got -1"),
    (REALISM, "--seed -1", "--seed must be at least 0, got -1"),
    (REALISM, "--seed 4294967296", "--seed must be at most 4294967295, got 4294967296"),
    (MASKS, "--guidance nan", "--guidance must be a finite number, got nan"),
    (MASKS, "--mask-guidance inf", "--mask-guidance must be a finite number, got inf"),
    (MASKS, "--guidance -1", "--guidance must be at least 0, got -1.0"),
    (MASKS, "--min-share nan", "--min-share must be a finite number, got nan"),
    (MASKS, "--min-share 2", "--min-share must be at most 1, got 2.0"),
    (MASKS, "--steps 0", "--steps must be at least 1, got 0"),
    (MASKS, "--n -3", "--n must be at least 1, got -3"),
    (MASKS, "--seed -1", "--seed must be at least 0, got -1"),
    (MASKS, "--batch-size 0", "--batch-size must be at least 1, got 0"),
    (CAPTIONS, "--n 0", "--n must be at least 1, got 0"),
    (CAPTIONS, "--seed -5", "--seed must be at least 0, got -5"),
    (CAPTIONS, "--batch-size -1", "--batch-size must be at least 1, got -1"),
    (SELECT, "--batch-size 0", "--batch-size must be at least 1, got 0"),
])
def test_impossible_numbers_are_refused_before_anything_is_written(tmp_path, refused, command, extra, message):
    assert refused([word.format(tmp=tmp_path) for word in f"{command} {extra}".split()]) == f"error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_the_library_functions_check_too():
    with pytest.raises(ConfigError, match="--n must be at least 1, got 0"):
        choose([1, 2, 3], 0, 0, "three")
    with pytest.raises(ConfigError, match="--seed must be at least 0, got -1"):
        choose([1, 2, 3], 2, -1, "three")
    with pytest.raises(ConfigError, match="--folds must be at least 2, got 1"):
        evaluate_realism([], [], folds=1)


@pytest.mark.parametrize("seeds, message", [
    ("0,-5", "each of --seeds must be at least 0, got -5"),
    ("0,0", "--seeds '0,0' repeats a seed; a repeated seed repeats its runs exactly"),
    ("99999999999999999999", "--seeds 99999999999999999999 asks for more than 1000 runs per split"),
])
def test_mix_seeds(tmp_path, refused, seeds, message):
    assert refused(["experiment", "mix", "--real", str(tmp_path / "real"), "--synthetic", str(tmp_path / "synthetic"),
                    "--out", str(tmp_path / "out"), "--seeds", seeds, "--no-progress"]).startswith(f"error: {message}")
