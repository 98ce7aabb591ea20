"""Class schemas: the renal default, YAML round trip, remapping and validation messages."""

from __future__ import annotations

import numpy as np
import pytest

from histosynth.errors import ConfigError, DataError
from histosynth.schema import RENAL, RENAL_PIXEL_SHARES, ClassInfo, ClassSchema, load_schema


def test_renal_default_matches_the_spec_table():
    assert [(c.id, c.name) for c in RENAL.classes] == [
        (0, "white background"), (1, "Arteries"), (2, "Atrophic Tubuli"), (3, "Tubuli"),
        (4, "Glomeruli"), (5, "Sclerotic Glomeruli"), (6, "other kidney tissue"), (7, "Dilated Tubuli"),
    ]
    assert RENAL.captioned_ids == [1, 2, 3, 4, 5, 6, 7]
    assert sum(RENAL_PIXEL_SHARES.values()) == pytest.approx(0.9999, abs=1e-3)


def test_yaml_round_trip(tmp_path):
    schema = RENAL.model_copy(update={"name": "mine", "remap": {14: 3, 15: 0}})
    path = tmp_path / "schema.yaml"
    schema.to_yaml(path)
    assert ClassSchema.from_yaml(path) == schema
    assert load_schema(path) == schema
    assert load_schema("renal") is RENAL
    assert load_schema(None) is RENAL


def test_remap_folds_raw_ids_onto_classes():
    human = ClassSchema(
        name="human",
        classes=[{"id": 0, "name": "background", "color": (255, 255, 255)},
                 {"id": 1, "name": "Tubuli", "color": (0, 0, 255)},
                 {"id": 2, "name": "Glomeruli", "color": (0, 255, 0)}],
        remap={10: 1, 11: 1, 12: 1, 20: 2},
    )
    raw = np.array([[0, 10, 11], [12, 20, 1]], dtype=np.uint8)
    assert human.apply_remap(raw).tolist() == [[0, 1, 1], [1, 2, 1]]
    with pytest.raises(DataError, match=r"\[30\].*remap"):
        human.apply_remap(np.array([[30]]), source="m.png")


def test_colorize_uses_class_colours():
    rgb = RENAL.colorize(np.array([[0, 4]], np.uint8))
    assert rgb.tolist() == [[[255, 255, 255], [50, 205, 50]]]


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("classes:\n  - {id: 0, name: bg, color: [0, 0, 0]}\n  - {id: 0, name: x, color: [1, 1, 1]}\n", "unique"),
        ("classes:\n  - {id: 0, name: bg, color: [0, 0, 300]}\n", "classes.0.color"),
        ("classes:\n  - {id: 0, name: bg, color: [0, 0, 0]}\nuncaptioned_ids: [5]\n", "uncaptioned_ids"),
        ("classes:\n  - {id: 0, name: bg, color: [0, 0, 0]}\ncolour: red\n", "colour"),
        ("classes:\n  - {id: 0, name: bg, color: [0, 0, 0]}\ncaptions: {medium_from: 0.5, high_from: 0.4}\n",
         "medium_from"),
        ("- just a list\n", "mapping"),
        ("classes: [\n", "not valid YAML"),
    ],
)
def test_bad_schema_yaml_names_the_field(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message) as info:
        ClassSchema.from_yaml(path)
    assert str(path) in str(info.value)


def test_missing_schema_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_schema("/nonexistent/schema.yaml")


def test_unknown_class_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="'Podocytes'.*'Glomeruli'"):
        RENAL.id_of("Podocytes")
    assert RENAL.id_of("glomeruli") == 4


@pytest.mark.parametrize("remap, message", [
    # once accepted: numpy's negative indexing then mapped raw id 255 onto class 1
    ("{-1: 1}", r"schema.yaml: remap sources \[-1\] cannot occur in a mask: raw ids are 0-65535"),
    ("{70000: 1}", r"remap sources \[70000\] cannot occur in a mask"),
    ("{3: -1}", r"remap targets \[-1\] are not ids of any class"),
])
def test_remap_sources_outside_the_raw_id_range_are_refused_at_load(tmp_path, remap, message):
    path = tmp_path / "schema.yaml"
    path.write_text("classes:\n  - {id: 0, name: bg, color: [0, 0, 0]}\n  - {id: 1, name: a, color: [9, 9, 9]}\n"
                    f"remap: {remap}\n")
    with pytest.raises(ConfigError, match=message) as info:
        ClassSchema.from_yaml(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_remap_of_16_bit_ids_leaves_unmapped_ids_to_the_mask_check():
    schema = ClassSchema(classes=[ClassInfo(id=0, name="bg", color=(0, 0, 0)),
                                  ClassInfo(id=1, name="a", color=(9, 9, 9))], remap={300: 1})
    assert schema.apply_remap(np.array([[0, 300]], np.uint16)).tolist() == [[0, 1]]
    with pytest.raises(DataError, match=r"m\.png: mask ids \[255\] are not in schema"):
        schema.apply_remap(np.array([[0, 255]], np.uint8), source="m.png")


@pytest.mark.parametrize("values, message", [
    (np.array([[0, -1]], np.int16), r"m\.png: a label mask holds whole class ids from 0, got int16 values"),
    (np.array([[0.0, 1.5]]), r"m\.png: a label mask holds whole class ids from 0, got float64 values"),
])
def test_masks_with_negative_or_fractional_values_are_data_errors(values, message):
    with pytest.raises(DataError, match=message):
        RENAL.apply_remap(values, source="m.png")
    assert RENAL.apply_remap(np.array([[True, False]])).tolist() == [[1, 0]]


@pytest.mark.parametrize("captions, field", [
    ("{medium_from: .nan}", "captions.medium_from"),
    ("{high_from: .inf}", "captions.high_from"),
    ("{medium_from: -.inf}", "captions.medium_from"),
])
def test_non_finite_caption_thresholds_are_refused_naming_the_field(tmp_path, captions, field):
    path = tmp_path / "schema.yaml"
    path.write_text(f"classes:\n  - {{id: 0, name: bg, color: [0, 0, 0]}}\ncaptions: {captions}\n")
    with pytest.raises(ConfigError, match=rf"field '{field}': Input should be a finite number") as info:
        ClassSchema.from_yaml(path)
    assert "\n" not in str(info.value)


def test_yaml_syntax_errors_are_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("\x1f")  # PyYAML's message spans two lines, with the position on the second
    with pytest.raises(ConfigError,
                       match=r"not valid YAML \(ReaderError: unacceptable character #x001f: .* position 0\)") as info:
        ClassSchema.from_yaml(path)
    assert "\n" not in str(info.value)
