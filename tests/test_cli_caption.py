"""`histosynth caption` prints captions and levels, and reports bad input in one line."""

from __future__ import annotations

import numpy as np
from PIL import Image

from histosynth.captions import GENERATING_CAPTION
from histosynth.cli import main


def write_mask(path, array):
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def test_caption_of_a_mask_png(tmp_path, capsys):
    mask = np.zeros((10, 10), np.uint8)
    mask.flat[:30] = 3
    mask.flat[30:80] = 4
    assert main(["caption", str(write_mask(tmp_path / "m.png", mask))]) == 0
    assert capsys.readouterr().out.strip() == GENERATING_CAPTION


def test_parse_prints_levels(capsys):
    assert main(["caption", "--parse", GENERATING_CAPTION]) == 0
    out = capsys.readouterr().out
    assert "Glomeruli" in out and "high" in out and "Tubuli" in out and "medium" in out


def test_errors_are_one_line_without_traceback(tmp_path, capsys):
    assert main(["caption", str(tmp_path / "missing.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.png" in err and "Traceback" not in err
    assert err.count("\n") == 1

    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(rgb)
    assert main(["caption", str(rgb)]) == 2
    assert "single-channel" in capsys.readouterr().err

    assert main(["caption", "--parse", "The prevalence of Podocytes is medium."]) == 2
    assert "'Podocytes'" in capsys.readouterr().err


def test_exactly_one_input_is_required(capsys):
    assert main(["caption"]) == 2
    assert "exactly one" in capsys.readouterr().err


def test_usage_mistakes_print_the_usage_line_not_a_traceback(capsys):
    assert main(["caption", "--no-such-option"]) == 2
    err = capsys.readouterr().err
    assert "No such option: --no-such-option" in err and "Traceback" not in err
    assert err.lstrip().startswith("Usage: histosynth caption")


def test_help_exits_zero(capsys):
    assert main(["caption", "--help"]) == 0
    assert "--parse" in capsys.readouterr().out
