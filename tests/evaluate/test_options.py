"""The evaluation commands refuse impossible numbers in one line, before reading a model or an image (their command
lines with the other commands' in tests/test_cli_options.py)."""

from __future__ import annotations

import pytest

from histosynth.errors import ConfigError
from histosynth.evaluate.images import choose
from histosynth.evaluate.realism import evaluate_realism


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
