"""Building a survey folder: picking, re-encoding without metadata, opaque ids, seeded order."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histosynth.data.dataset import Patch, PatchDatasetWriter
from histosynth.errors import ConfigError, DataError, JobError
from histosynth.survey.build import (
    IMAGES_DIR,
    KEY_FILE,
    SURVEY_FILE,
    build_survey,
    list_images,
    open_survey,
    read_answer_key,
    reencode,
)


def test_build_picks_the_asked_numbers_and_keeps_the_truth_apart(make_survey, image_folders):
    root = make_survey(n_real=4, n_synthetic=2)
    survey = open_survey(root)
    truth = read_answer_key(root)
    assert len(survey.questions) == 6 and [q.number for q in survey.questions] == [1, 2, 3, 4, 5, 6]
    assert sorted(truth) == ["real"] * 4 + ["synthetic"] * 2
    public = (root / SURVEY_FILE).read_text()
    assert "truth" not in public and "real_0" not in public and "synthetic_0" not in public
    key = json.loads((root / KEY_FILE).read_text())["questions"]
    real_dir, synthetic_dir = image_folders
    for row in key:
        source_dir = real_dir if row["truth"] == "real" else synthetic_dir
        assert row["source"].startswith(str(source_dir.resolve()))
    names = sorted(p.name for p in (root / IMAGES_DIR).iterdir())
    assert names == sorted(f"{q.image_id}.png" for q in survey.questions)


def test_a_seed_repeats_the_selection_and_order_but_never_the_ids(make_survey):
    first, again, other = make_survey(seed=11, name="a"), make_survey(seed=11, name="b"), make_survey(seed=12, name="c")
    key_first, key_again = (json.loads((root / KEY_FILE).read_text()) for root in (first, again))
    assert key_first["seed"] == key_again["seed"] == 11

    def picked(key):
        return [(row["number"], row["truth"], row["source"]) for row in key["questions"]]

    assert picked(key_first) == picked(key_again), "the same seed picks the same images in the same order"
    ids = [[q.image_id for q in open_survey(root).questions] for root in (first, again, other)]
    assert not set(ids[0]) & set(ids[1]) and not set(ids[0]) & set(ids[2]), \
        "ids come from the secure random source: replaying the seed must not give them back"
    for q_first, q_again in zip(*(open_survey(root).questions for root in (first, again)), strict=True):
        assert np.array_equal(pixels(open_survey(first).image_path(q_first).read_bytes()),
                              pixels(open_survey(again).image_path(q_again).read_bytes()))
    orders = {tuple(read_answer_key(make_survey(n_real=4, n_synthetic=4, seed=s, name=f"s{s}"))) for s in range(6)}
    assert len(orders) > 1, "the order of real and synthetic questions must depend on the seed"


def test_without_a_seed_each_build_draws_its_own_and_records_it(make_survey):
    seeds = [json.loads((make_survey(seed=None, name=name) / KEY_FILE).read_text())["seed"] for name in "ab"]
    assert seeds[0] != seeds[1] and all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds)


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def test_ids_are_opaque_random_hex(make_survey):
    survey = open_survey(make_survey(n_real=5, n_synthetic=5))
    ids = [q.image_id for q in survey.questions]
    assert len(set(ids)) == 10
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_every_image_is_reencoded_alike_without_metadata(make_survey, png_chunks):
    root = make_survey(n_real=3, n_synthetic=3, size=64)
    survey = open_survey(root)
    headers, layouts = set(), set()
    for q in survey.questions:
        data = survey.image_path(q).read_bytes()
        chunks = png_chunks(data)
        kinds = [kind for kind, _ in chunks]
        layouts.add(tuple(kinds))
        headers.add(chunks[0][1])
        assert b"Exif" not in data and b"parameters" not in data and b"scanner" not in data
        with Image.open(io.BytesIO(data)) as img:
            assert (img.format, img.mode, img.size, img.info) == ("PNG", "RGB", (64, 64), {})
    # width 64, height 64, bit depth 8, colour type 2 (RGB), no interlace — the same for all
    assert headers == {bytes.fromhex("00000040" "00000040" "08" "02" "00" "00" "00")}
    # the only chunk beside the image's own is the random padding that gives every file one length
    assert layouts == {("IHDR", "IDAT", "paDd", "IEND")}


@pytest.mark.parametrize("image_format", ["png", "jpeg"])
def test_file_sizes_do_not_tell_real_from_synthetic(telltale_folders, tmp_path, image_format):
    root = tmp_path / "survey"
    build_survey(*telltale_folders, root, n_real=4, n_synthetic=4, size=64, image_format=image_format,
                 progress=False)
    survey = open_survey(root)
    truth = read_answer_key(root)
    key = {row["number"]: row["source"] for row in json.loads((root / KEY_FILE).read_text())["questions"]}
    plain = {t: [] for t in ("real", "synthetic")}
    sizes = set()
    for q, t in zip(survey.questions, truth, strict=True):
        data = survey.image_path(q).read_bytes()
        sizes.add(len(data))
        unpadded, _ = reencode(Path(key[q.number]), 64, image_format)
        plain[t].append(len(unpadded))
        if image_format == "png":  # the padding chunk sits before IEND, the image's own chunks untouched
            assert data[:len(unpadded) - 12] == unpadded[:-12] and data[-12:] == unpadded[-12:]
        else:  # after the end-of-image marker
            assert data.startswith(unpadded)
        assert np.array_equal(pixels(data), pixels(unpadded)), "the padded file shows exactly the same pixels"
    # unpadded, every real file is larger than every synthetic one: the size alone would give the key
    assert min(plain["real"]) > max(plain["synthetic"])
    assert sizes == {max(plain["real"]) + (12 if image_format == "png" else 0)}


def test_jpeg_surveys_use_one_quality_and_no_metadata_segments(make_survey):
    root = make_survey(image_format="jpeg", jpeg_quality=85)
    survey = open_survey(root)
    assert survey.media_type == "image/jpeg"
    layouts = set()
    for q in survey.questions:
        data = survey.image_path(q).read_bytes()
        markers = _jpeg_markers(data)
        assert not {0xE1, 0xE2, 0xED, 0xFE} & set(markers), "EXIF, ICC, IPTC or comment segment present"
        with Image.open(io.BytesIO(data)) as img:
            layouts.add((img.size, img.mode, tuple(markers), str(img.quantization)))
    assert len(layouts) == 1, "every JPEG must come from the same encoder settings"


def _jpeg_markers(data: bytes) -> list[int]:
    """Marker codes of a JPEG's header segments, up to the start of scan."""
    assert data[:2] == b"\xff\xd8"
    markers, pos = [], 2
    while data[pos + 1] != 0xDA:
        markers.append(data[pos + 1])
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return markers


def test_reencode_crops_centre_square_and_flattens_transparency_on_white(tmp_path):
    array = np.zeros((40, 80, 4), np.uint8)
    array[:, 20:60] = (200, 30, 90, 255)  # the centre square is opaque colour, the sides transparent
    Image.fromarray(array, "RGBA").save(tmp_path / "a.png")
    data, original = reencode(tmp_path / "a.png", 40, "png")
    assert original == {"source_format": "PNG", "source_width": 80, "source_height": 40}
    pixels = np.asarray(Image.open(io.BytesIO(data)))
    assert pixels.shape == (40, 40, 3) and (pixels == (200, 30, 90)).all()
    Image.fromarray(np.zeros((8, 8, 4), np.uint8), "RGBA").save(tmp_path / "clear.png")
    clear = np.asarray(Image.open(io.BytesIO(reencode(tmp_path / "clear.png", 8, "png")[0])))
    assert (clear == 255).all()


def test_build_warns_when_the_groups_differ_in_source_format_or_size(image_folders, tmp_path):
    _, warnings = build_survey(*image_folders, tmp_path / "s", n_real=2, n_synthetic=2, size=32, progress=False)
    assert len(warnings) == 2
    prefix = "real and synthetic source images differ in"
    assert warnings[0].startswith(f"{prefix} file formats (real: JPEG; synthetic: PNG)")
    assert warnings[1].startswith(f"{prefix} sizes (real: 120x100; synthetic: 96x96)")
    _, none = build_survey(image_folders[1], image_folders[1], tmp_path / "t", n_real=2, n_synthetic=2,
                           size=32, progress=False)
    assert none == []


def test_list_images_finds_images_recursively_and_only_images_of_a_patch_dataset(image_folders, tmp_path):
    real, _ = image_folders
    assert [p.name for p in list_images(real)] == [f"real_{i:03d}.jpg" for i in range(6)]
    writer = PatchDatasetWriter(tmp_path / "ds", patch_size=32)
    rng = np.random.default_rng(0)
    patches = [Patch(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), np.full((32, 32), 3, np.uint8))
               for _ in range(3)]
    writer.write_slide("s1", patches)
    writer.finalize()
    found = list_images(tmp_path / "ds")
    assert [p.relative_to(tmp_path / "ds").as_posix() for p in found] == [
        f"images/s1/s1_{i:06d}.png" for i in range(3)]


@pytest.mark.parametrize("options, message", [
    ({"seed": -1}, "--seed -1 is out of range; give 0 to 9223372036854775807"),
    ({"seed": 2**63}, "--seed 9223372036854775808 is out of range"),
    ({"participants": -3}, "--participants -3 is out of range; give 0 to 100000"),
    ({"n_real": -1}, "--n-real and --n-synthetic must each be at least 1"),
    ({"size": -64}, "--size -64 is out of range"),
    ({"jpeg_quality": -5}, "--jpeg-quality -5 is out of range"),
])
def test_negative_and_out_of_range_options_are_refused_before_any_work(image_folders, tmp_path, options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_survey(*image_folders, tmp_path / "s", progress=False, **options)
    assert list(tmp_path.iterdir()) == []


def test_build_errors_say_what_to_do(image_folders, tmp_path):
    with pytest.raises(DataError, match="the --real folder has 6 images but --n-real asks for 7"):
        build_survey(*image_folders, tmp_path / "x", n_real=7, n_synthetic=1, progress=False)
    with pytest.raises(DataError, match="does not exist"):
        build_survey(tmp_path / "missing", image_folders[1], tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match="--format 'gif' is unknown"):
        build_survey(*image_folders, tmp_path / "x", image_format="gif", progress=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(JobError, match="already exists"):
        build_survey(*image_folders, tmp_path / "taken", n_real=1, n_synthetic=1, progress=False)
    assert not (tmp_path / "x").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_build_removes_the_staging_folder_a_killed_build_left_and_nothing_else(make_survey, tmp_path):
    killed = tmp_path / ".survey.k3j9x_2a.part"  # what a build killed halfway leaves beside its --out
    (killed / IMAGES_DIR).mkdir(parents=True)
    (killed / KEY_FILE).write_text("{}")
    others = [tmp_path / ".other.k3j9x_2a.part", tmp_path / "notes.txt"]
    others[0].mkdir()
    others[1].write_text("mine")
    root = make_survey()
    assert not killed.exists() and all(path.exists() for path in others)
    assert (root / SURVEY_FILE).is_file()
