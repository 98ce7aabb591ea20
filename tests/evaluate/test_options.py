"""The evaluation commands refuse impossible numbers in one line, before reading a model or an image."""

from __future__ import annotations

import pytest

from histosynth.cli import main
from histosynth.errors import ConfigError
from histosynth.evaluate.images import choose
from histosynth.evaluate.realism import evaluate_realism


@pytest.mark.parametrize("extra, message", [
    (["--n", "-1"], "--n must be at least 1, got -1"),
    (["--n", "0"], "--n must be at least 1, got 0"),
    (["--folds", "0"], "--folds must be at least 2, got 0"),
    (["--bootstrap", "-1"], "--bootstrap must be at least 1, got -1"),
    (["--seed", "-1"], "--seed must be at least 0, got -1"),
    (["--seed", str(2**32)], "--seed must be at most 4294967295, got 4294967296"),
])
def test_realism_options(tmp_path, capsys, extra, message):
    args = ["evaluate", "realism", "--real", str(tmp_path / "real"), "--synthetic", str(tmp_path / "synthetic"),
            "--out", str(tmp_path / "report"), *extra]
    assert main(args) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra, message", [
    (["--guidance", "nan"], "--guidance must be a finite number, got nan"),
    (["--mask-guidance", "inf"], "--mask-guidance must be a finite number, got inf"),
    (["--guidance", "-1"], "--guidance must be at least 0, got -1.0"),
    (["--min-share", "nan"], "--min-share must be a finite number, got nan"),
    (["--min-share", "2"], "--min-share must be at most 1, got 2.0"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--n", "-3"], "--n must be at least 1, got -3"),
    (["--seed", "-1"], "--seed must be at least 0, got -1"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
])
def test_label_fidelity_options(tmp_path, capsys, extra, message):
    args = ["evaluate", "masks", "--segmenter", str(tmp_path / "seg"), "--out", str(tmp_path / "report"),
            "--model", str(tmp_path / "model"), "--masks-from", str(tmp_path / "dataset"), *extra]
    assert main(args) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra, message", [
    (["--n", "0"], "--n must be at least 1, got 0"),
    (["--seed", "-5"], "--seed must be at least 0, got -5"),
    (["--batch-size", "-1"], "--batch-size must be at least 1, got -1"),
])
def test_caption_accuracy_options(tmp_path, capsys, extra, message):
    args = ["evaluate", "captions", "--segmenter", str(tmp_path / "seg"), "--out", str(tmp_path / "report"),
            "--images", str(tmp_path / "images"), *extra]
    assert main(args) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_select_pairs_batch_size(tmp_path, capsys):
    assert main(["select-pairs", str(tmp_path / "job"), "--segmenter", str(tmp_path / "seg"), "--out",
                 str(tmp_path / "out"), "--batch-size", "0"]) == 2
    assert capsys.readouterr().err == "error: --batch-size must be at least 1, got 0\n"


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
def test_mix_seeds(tmp_path, capsys, seeds, message):
    assert main(["experiment", "mix", "--real", str(tmp_path / "real"), "--synthetic", str(tmp_path / "synthetic"),
                 "--out", str(tmp_path / "out"), "--seeds", seeds, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
