"""Atomic writes: a temporary beside the file, and what a killed write left is recognised exactly."""

from __future__ import annotations

import pytest

from histosynth.io import (
    atomic_path,
    partial_target,
    remove_partial_files,
    write_bytes_atomic,
    write_json_atomic,
)


@pytest.mark.parametrize("name, target", [
    (".last.ckpt.k3j9x_2a.part.ckpt", "last.ckpt"),
    (".model.k3j9x_2a.part", "model"),
    (".a_000001.png.abcdefgh.part.png", "a_000001.png"),
    (".x.json.abcdefgh.part.png", None),   # the suffix is not the target's
    ("last.ckpt", None),
    (".last.ckpt.short.part.ckpt", None),
    ("..abcdefgh.part", None),
    (".s.tif.pyramid-abcdefgh", None),
    ("notes.part", None),
])
def test_partial_target_names_what_a_temporary_was_for(name, target):
    assert partial_target(name) == target


def test_the_temporaries_of_atomic_path_are_recognised(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "record.json") as tmp:
        assert partial_target(tmp.name) == "record.json"
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_bytes_written_atomically_make_their_folders_and_leave_nothing_when_the_write_fails(tmp_path):
    import os
    import stat

    target = tmp_path / "images" / "s1" / "p.png"
    write_bytes_atomic(target, b"png bytes")
    assert target.read_bytes() == b"png bytes" and os.listdir(target.parent) == ["p.png"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # as a plain open() makes it
    write_bytes_atomic(target, b"again", durable=True)
    assert target.read_bytes() == b"again"
    with pytest.raises(TypeError):
        write_bytes_atomic(target, "not bytes")  # fails inside the write: the old file stays, no temporary
    assert target.read_bytes() == b"again" and os.listdir(target.parent) == ["p.png"]


def test_removing_partial_files_takes_only_those_of_the_one_output(tmp_path):
    write_json_atomic(tmp_path / "run.json", {})
    leftovers = [tmp_path / ".run.json.abcdefgh.part.json", tmp_path / ".run.json.k3j9x_2a.part"]
    leftovers[0].write_text("half")
    leftovers[1].mkdir()
    (leftovers[1] / "weights.safetensors").write_bytes(b"half")
    kept = [tmp_path / ".other.json.abcdefgh.part.json", tmp_path / "run.json.bak", tmp_path / ".run.json.part",
            tmp_path / ".run.json.abcdefgh.part.txt"]
    for path in kept:
        path.write_text("mine")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data").write_text("mine")
    link = tmp_path / ".run.json.linkedxx.part"
    link.symlink_to(outside, target_is_directory=True)
    assert sorted(remove_partial_files(tmp_path / "run.json")) == sorted([*leftovers, link])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run.json", "outside", *[p.name for p in kept]])
    assert (outside / "data").read_text() == "mine"
    assert remove_partial_files(tmp_path / "missing" / "x.json") == []


@pytest.mark.parametrize("shape", [(37, 53, 3), (37, 53), (1, 1, 3), (1, 1)])
def test_fast_png_is_lossless_for_pillow_and_libpng(shape):
    import io

    import imagecodecs
    import numpy as np
    from PIL import Image

    from histosynth.io import fast_png

    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data = fast_png(pixels)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == ("RGB" if len(shape) == 3 else "L")
        np.testing.assert_array_equal(np.array(image), pixels)
    np.testing.assert_array_equal(imagecodecs.png_decode(data), pixels)


def test_fast_png_takes_strided_views_and_refuses_what_png_cannot_hold():
    import io

    import numpy as np
    from PIL import Image

    from histosynth.io import fast_png

    rgba = np.random.default_rng(1).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    for view in (rgba[..., :3], rgba[::2, ::3, 1]):  # RGB of an RGBA region; every other row, third column
        np.testing.assert_array_equal(np.array(Image.open(io.BytesIO(fast_png(view)))), view)
    for bad in (rgba, rgba[..., :3].astype(np.float32)):
        with pytest.raises(ValueError, match=r"fast_png takes uint8 \(H, W\) or \(H, W, 3\) arrays"):
            fast_png(bad)
