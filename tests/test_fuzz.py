"""Property-based tests: whatever a user or a file gives, the answer is a valid result or the toolkit's
own one-line error, never a traceback, and nothing outside the output folder changes.

Deterministic (derandomised, no example database) and sized to run in the default test run.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from histosynth.captions import TEMPLATES, Level, caption_from_levels, parse_caption, parse_levels_option
from histosynth.cli import main
from histosynth.data.annotations import Annotation, rasterize, read_annotations
from histosynth.errors import HistosynthError
from histosynth.io import write_png_atomic
from histosynth.schema import RENAL, ClassSchema

FUZZ = dict(deadline=None, derandomize=True, database=None, print_blob=False,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                   HealthCheck.data_too_large, HealthCheck.filter_too_much])

# --- value strategies ----------------------------------------------------------------------------
odd_floats = st.floats(allow_nan=True, allow_infinity=True, width=64)
odd_numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), odd_floats,
    st.sampled_from([0, -1, 1, 255, 256, 65535, 65536, 2**31, 2**63, -0.0, 1e308, -1e308, 5e-324]),
)
json_leaves = st.one_of(st.none(), st.booleans(), odd_numbers, st.text(max_size=12))
json_values = st.recursive(
    json_leaves,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=10), children, max_size=4)),
    max_leaves=16,
)

#: strings a user might type for a number option
option_text = st.one_of(
    st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e400", "-1", "0", "1", "2", "0.5", "-0.0", "1e-320",
                     "4294967295", "4294967296", "18446744073709551616", "abc", "", " ", "0x10", "1_0", "--help"]),
    st.integers(min_value=-(2**66), max_value=2**66).map(str),
    odd_floats.map(repr),
    st.text(max_size=8),
)


def dumps(value) -> str:
    """JSON as QuPath and other tools write it, NaN / Infinity literals included."""
    return json.dumps(value, allow_nan=True)


# --- snapshots: nothing outside the output folder may change --------------------------------------
def snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    files = {}
    for path in sorted(root.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        if path.is_file():
            files[str(path.relative_to(root))] = hashlib.sha1(path.read_bytes()).hexdigest()
        elif path.is_dir():
            files[str(path.relative_to(root)) + "/"] = ""
    return files


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """The exit code and stderr of one in-process run; any exception escaping ``main`` fails the test."""
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def assert_clean_outcome(code: int, err: str) -> None:
    """Success, or a one-line `error:` message, or click's usage error (which names the bad option)."""
    assert "Traceback" not in err
    if code == 0:
        return
    if err.lstrip().startswith("Usage:"):
        assert code == 2 and "Error" in err
        return
    lines = [line for line in err.splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err


# --- caption parser -------------------------------------------------------------------------------
captioned_names = [RENAL.name_of(i) for i in RENAL.captioned_ids]
sentence = st.one_of(
    st.builds(lambda template, name: template.format(name=name), st.sampled_from(list(TEMPLATES.values())),
              st.one_of(st.sampled_from(captioned_names + ["white background", "glomeruli", "Podocytes"]),
                        st.text(max_size=12))),
    st.just(RENAL.captions.intro),
    st.text(max_size=40),
)


@settings(max_examples=120, **FUZZ)
@given(st.lists(sentence, max_size=6), st.sampled_from([" ", "\n", "\n\n", "  ", ""]))
def test_caption_parser_gives_levels_or_a_caption_error(sentences, separator):
    caption = separator.join(sentences)
    try:
        levels = parse_caption(caption)
    except HistosynthError as exc:
        assert "\n" not in str(exc) or "\n" in caption
        return
    assert list(levels) == captioned_names and all(isinstance(v, Level) for v in levels.values())
    assert parse_caption(caption_from_levels(levels)) == levels


@settings(max_examples=150, **FUZZ)
@given(st.dictionaries(st.sampled_from(captioned_names), st.sampled_from(list(Level))))
def test_every_caption_written_reads_back_as_its_levels(chosen):
    expected = {name: chosen.get(name, Level.NONE) for name in captioned_names}
    assert parse_caption(caption_from_levels(chosen)) == expected


@settings(max_examples=150, **FUZZ)
@given(st.text(max_size=60))
def test_levels_option_gives_levels_or_a_caption_error(text):
    try:
        levels = parse_levels_option(text)
    except HistosynthError:
        return
    assert set(levels) <= set(captioned_names) and all(isinstance(v, Level) for v in levels.values())


# --- schema loading -------------------------------------------------------------------------------
def valid_schema_dict() -> dict:
    return RENAL.model_copy(update={"remap": {14: 3, 300: 0}}).to_dict()


def mutated_schema(draw_path: list, value) -> dict:
    data = valid_schema_dict()
    node = data
    for key in draw_path[:-1]:
        node = node[key]
    node[draw_path[-1]] = value
    return data


schema_paths = st.sampled_from([
    ["name"], ["classes"], ["classes", 0, "id"], ["classes", 1, "name"], ["classes", 2, "color"],
    ["classes", 3, "color", 0], ["uncaptioned_ids"], ["remap"], ["remap", 14], ["captions"],
    ["captions", "medium_from"], ["captions", "high_from"], ["captions", "intro"],
])
schema_texts = st.one_of(
    st.builds(lambda path, value: yaml.safe_dump(mutated_schema(path, value)), schema_paths, json_values),
    st.builds(lambda key, value: yaml.safe_dump({**valid_schema_dict(), "remap": {key: value}}),
              odd_numbers, odd_numbers),
    json_values.map(yaml.safe_dump),
    st.text(max_size=80),
    st.sampled_from(["classes: [\n", "- a\n", "classes: .nan\n", "remap: {-1: 1}\n", "&a [*a]\n",
                     "captions: {medium_from: .nan, high_from: .inf}\n"]),
)


@settings(max_examples=150, **FUZZ)
@given(schema_texts)
def test_schema_yaml_loads_or_is_a_config_error(tmp_path, text):
    path = tmp_path / "schema.yaml"
    path.write_text(text)
    try:
        schema = ClassSchema.from_yaml(path)
    except HistosynthError as exc:
        assert "\n" not in str(exc).replace(str(path), "") or "\n" in text
        return
    ids = schema.ids
    assert all(0 <= i <= 255 for i in ids)
    assert all(0 <= raw <= 65535 and target in ids for raw, target in schema.remap.items())
    rules = schema.captions
    assert math.isfinite(rules.medium_from) and math.isfinite(rules.high_from)
    assert 0 < rules.medium_from < rules.high_from <= 1
    every_raw_id = np.arange(256, dtype=np.uint8).reshape(16, 16)
    try:
        mapped = schema.apply_remap(every_raw_id)
    except HistosynthError:
        return
    assert set(np.unique(mapped).tolist()) <= set(ids)


# --- annotation readers ---------------------------------------------------------------------------
coordinate = st.one_of(st.integers(-50, 50), st.floats(-50, 50), odd_numbers, st.text(max_size=3), st.none())
point = st.one_of(st.lists(coordinate, min_size=2, max_size=3), json_leaves)
ring = st.one_of(st.lists(point, min_size=0, max_size=6),
                 st.lists(st.tuples(st.integers(-40, 40), st.integers(-40, 40)).map(list), min_size=3, max_size=6))
geometry = st.one_of(
    st.builds(lambda rings: {"type": "Polygon", "coordinates": rings}, st.lists(ring, max_size=3)),
    st.builds(lambda polys: {"type": "MultiPolygon", "coordinates": polys},
              st.lists(st.lists(ring, max_size=2), max_size=2)),
    st.builds(lambda parts: {"type": "GeometryCollection", "geometries": parts},
              st.one_of(json_values, st.lists(st.builds(lambda r: {"type": "Polygon", "coordinates": [r]}, ring),
                                              max_size=2))),
    st.builds(lambda kind, coords: {"type": kind, "coordinates": coords},
              st.sampled_from(["Polygon", "MultiPolygon", "Point", "LineString", None]), json_values),
    json_values,
)
class_name = st.one_of(st.sampled_from(captioned_names + ["white background", "Tumour", ""]), json_leaves)
properties = st.one_of(
    st.builds(lambda name: {"classification": {"name": name}}, class_name),
    st.builds(lambda name: {"classification": name}, class_name),
    json_values,
)
feature = st.one_of(
    st.builds(lambda g, p: {"type": "Feature", "geometry": g, "properties": p}, geometry, properties),
    json_values,
)
geojson_documents = st.one_of(
    st.builds(lambda features: {"type": "FeatureCollection", "features": features},
              st.one_of(st.lists(feature, max_size=4), json_values)),
    st.lists(feature, max_size=3),
    feature,
    json_values,
)


def check_annotations(annotations: list[Annotation]) -> None:
    for annotation in annotations:
        assert np.isfinite(annotation.exterior).all() and all(np.isfinite(h).all() for h in annotation.holes)
        assert annotation.class_id in RENAL.ids
    labels = rasterize(annotations, -8, -8, 24, 24)
    assert labels.shape == (24, 24) and set(np.unique(labels).tolist()) <= set(RENAL.ids)


def check_read_or_refused(path: Path, text: str) -> None:
    """``text`` as the annotation file ``path`` is read into sound annotations, or refused in one line naming it."""
    path.write_text(text)
    try:
        annotations = read_annotations(path)
    except HistosynthError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)
        return
    check_annotations(annotations)


@settings(max_examples=180, **FUZZ)
@given(geojson_documents)
def test_geojson_reads_or_is_a_data_error(tmp_path, document):
    check_read_or_refused(tmp_path / "slide.geojson", dumps(document))


@settings(max_examples=80, **FUZZ)
@given(st.one_of(st.binary(max_size=60), st.text(max_size=60).map(str.encode)))
def test_any_bytes_as_geojson_or_asap_are_read_or_refused(tmp_path, content):
    for suffix in (".geojson", ".xml"):
        path = tmp_path / f"slide{suffix}"
        path.write_bytes(content)
        try:
            check_annotations(read_annotations(path))
        except HistosynthError as exc:
            assert str(exc).startswith(str(path))


xml_attribute = st.one_of(st.sampled_from(["0", "5", "-3", "nan", "inf", "-Infinity", "1e999", "1e300", "", "x",
                                           "2.5", "0x1"]),
                          st.integers(-60, 60).map(str), odd_floats.map(repr))


def quote(value: str) -> str:
    return value.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


@st.composite
def asap_documents(draw) -> str:
    annotations = []
    for index in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["Polygon", "Spline", "Rectangle", "Dot", "PointSet", "polygon"]))
        group = draw(st.sampled_from(captioned_names + ["None", "", "white background", "Tumour"]))
        coordinates = "".join(
            f'<Coordinate Order="{quote(draw(xml_attribute))}" X="{quote(draw(xml_attribute))}" '
            f'Y="{quote(draw(xml_attribute))}" />' for _ in range(draw(st.integers(0, 6))))
        annotations.append(f'<Annotation Name="A{index}" Type="{kind}" PartOfGroup="{quote(group)}">'
                           f"<Coordinates>{coordinates}</Coordinates></Annotation>")
    root = draw(st.sampled_from(["ASAP_Annotations", "ASAP_Annotations", "Other"]))
    return f"<{root}><Annotations>{''.join(annotations)}</Annotations></{root}>"


@settings(max_examples=120, **FUZZ)
@given(asap_documents())
def test_asap_xml_reads_or_is_a_data_error(tmp_path, document):
    check_read_or_refused(tmp_path / "slide.xml", document)


# --- command-line options -------------------------------------------------------------------------
@pytest.fixture()
def workspace(tmp_path, monkeypatch):
    """A folder of inputs the commands read (and must leave as they were); the cwd is inside it."""
    masks = tmp_path / "masks"
    write_png_atomic(masks / "m0.png", np.full((32, 32), 6, np.uint8))
    write_png_atomic(masks / "m1.png", np.full((32, 32), 3, np.uint8))
    images = tmp_path / "images"
    write_png_atomic(images / "m0.png", np.full((32, 32, 3), 200, np.uint8))
    write_png_atomic(images / "m1.png", np.full((32, 32, 3), 120, np.uint8))
    (tmp_path / "not-a-dataset").mkdir()
    (tmp_path / "not-a-dataset" / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_in(workspace: Path, capsys, argv: list[str]) -> None:
    out = workspace / "out"
    before = snapshot(workspace, skip=out)
    code, err = run_cli(argv, capsys)
    assert_clean_outcome(code, err)
    assert snapshot(workspace, skip=out) == before
    shutil.rmtree(out, ignore_errors=True)


@settings(max_examples=30, **FUZZ)
@given(st.fixed_dictionaries({
    "--steps": option_text, "--lr": option_text, "--seed": option_text, "--batch-size": option_text,
    "--mask-dropout": option_text, "--warmup-steps": option_text, "--workers": option_text,
}))
def test_train_options(workspace, capsys, options):
    argv = ["train", "not-a-dataset", "--out", "out"]
    for option, value in options.items():
        argv += [option, value]
    run_in(workspace, capsys, argv)


@settings(max_examples=30, **FUZZ)
@given(st.fixed_dictionaries({"--n": option_text, "--folds": option_text, "--bootstrap": option_text,
                              "--seed": option_text}))
def test_realism_options(workspace, capsys, options):
    argv = ["evaluate", "realism", "--real", "missing-real", "--synthetic", "missing-synthetic", "--out", "out"]
    for option, value in options.items():
        argv += [option, value]
    run_in(workspace, capsys, argv)


@settings(max_examples=25, **FUZZ)
@given(st.fixed_dictionaries({"--mpp": option_text, "--seed": option_text, "--n": option_text}),
       st.one_of(st.sampled_from(["Glomeruli=1", "Glomeruli=0", "Arteries=2,Glomeruli=1", "Tubuli=1", "=", ""]),
                 st.text(max_size=12)))
def test_phantom_stamp_options(workspace, capsys, options, add):
    argv = ["phantom", "stamp", "masks", "--add", add, "--out", "out"]
    for option, value in options.items():
        argv += [option, value]
    run_in(workspace, capsys, argv)


@settings(max_examples=25, **FUZZ)
@given(st.fixed_dictionaries({"--tile": option_text, "--batch-size": option_text}),
       st.sampled_from(["full", "thesis", "most", ""]))
def test_segment_predict_options(workspace, capsys, options, coverage):
    argv = ["segment", "predict", "images", "--segmenter", "not-a-dataset", "--out", "out", "--coverage", coverage]
    for option, value in options.items():
        argv += [option, value]
    run_in(workspace, capsys, argv)


@settings(max_examples=25, **FUZZ)
@given(st.one_of(st.sampled_from(["pairs", "../escape", ".hidden", "a/b", "..", ".", "", "x" * 300, "a\\b"]),
                 st.text(max_size=10)),
       st.sampled_from(["train", "val", "test", "none", ""]))
def test_dataset_pair_options(workspace, capsys, slide, split):
    run_in(workspace, capsys, ["dataset", "pair", "images", "masks", "--out", "out", "--slide", slide,
                               "--split", split, "--no-progress"])


@settings(max_examples=30, **FUZZ)
@given(st.text(max_size=120))
def test_caption_parse_option(workspace, capsys, text):
    run_in(workspace, capsys, ["caption", "--parse", text])


@settings(max_examples=25, **FUZZ)
@given(st.sampled_from(["-2", "0", "1", "2", "abc", "nan"]),
       st.sampled_from(["-1", "0", "8", "16", "32", "nan", "1e3"]), option_text, option_text)
def test_phantom_masks_options(workspace, capsys, n, size, seed, mpp):
    run_in(workspace, capsys, ["phantom", "masks", "--out", "out", "--n", n, "--size", size, "--seed", seed,
                               "--mpp", mpp, "--no-progress"])


@settings(max_examples=25, **FUZZ)
@given(option_text, st.sampled_from(["train", "val", "nope", ""]))
def test_latent_range_options(workspace, capsys, quantile, split):
    run_in(workspace, capsys, ["latent-range", "not-a-dataset", "--dataset", "not-a-dataset", "--quantile", quantile,
                               "--split", split])


@settings(max_examples=25, **FUZZ)
@given(st.fixed_dictionaries({"--lr": option_text, "--seed": option_text, "--dice-weight": option_text,
                              "--input-size": option_text, "--epochs": option_text}))
def test_segment_train_options(workspace, capsys, options):
    argv = ["segment", "train", "not-a-dataset", "--out", "out", "--no-progress"]
    for option, value in options.items():
        argv += [option, value]
    run_in(workspace, capsys, argv)
