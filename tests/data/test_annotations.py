"""QuPath GeoJSON and ASAP XML annotations, and the rasterisation rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.path import Path as PolygonPath

from histosynth.data.annotations import Annotation, rasterize, read_annotations
from histosynth.errors import DataError
from histosynth.schema import RENAL


def square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def qupath_feature(name: str | None, geometry: dict) -> dict:
    properties = {"objectType": "annotation"}
    if name is not None:
        properties["classification"] = {"name": name, "color": [0, 200, 0]}
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def write_geojson(path, features) -> str:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


ASAP = """<?xml version="1.0"?>
<ASAP_Annotations>
  <Annotations>
    <Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="{outer}" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="0" X="2" Y="2" />
        <Coordinate Order="2" X="10" Y="10" />
        <Coordinate Order="1" X="10" Y="2" />
        <Coordinate Order="3" X="2" Y="10" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 1" Type="Polygon" PartOfGroup="white background" Color="#64FE2E">
      <Coordinates>
        <Coordinate Order="0" X="4" Y="4" /><Coordinate Order="1" X="6" Y="4" />
        <Coordinate Order="2" X="6" Y="6" /><Coordinate Order="3" X="4" Y="6" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Dot 0" Type="Dot" PartOfGroup="None" Color="#64FE2E">
      <Coordinates><Coordinate Order="0" X="1" Y="1" /></Coordinates>
    </Annotation>
  </Annotations>
  <AnnotationGroups>
    <Group Name="Glomeruli" PartOfGroup="None" Color="#64FE2E"><Attributes /></Group>
  </AnnotationGroups>
</ASAP_Annotations>
"""


def test_qupath_polygon_with_hole_and_multipolygon(tmp_path):
    path = write_geojson(tmp_path / "a.geojson", [
        qupath_feature("Tubuli", {"type": "Polygon", "coordinates": [square(1, 1, 9, 9), square(3, 3, 5, 5)]}),
        qupath_feature("glomeruli", {"type": "MultiPolygon",
                                     "coordinates": [[square(10, 0, 12, 2)], [square(10, 10, 12, 12)]]}),
        qupath_feature("Arteries", {"type": "Point", "coordinates": [5, 5]}),
    ])
    annotations = read_annotations(path, RENAL)
    assert [(a.class_id, a.class_name, len(a.holes)) for a in annotations] == [
        (3, "Tubuli", 1), (4, "glomeruli", 0), (4, "glomeruli", 0)]
    expected = np.zeros((12, 12), dtype=np.uint8)
    expected[1:9, 1:9] = 3
    expected[3:5, 3:5] = 0  # the hole
    expected[0:2, 10:12] = 4
    expected[10:12, 10:12] = 4
    np.testing.assert_array_equal(rasterize(annotations, 0, 0, 12, 12), expected)


def test_qupath_bare_feature_lists_and_single_features(tmp_path):
    feature = qupath_feature("Glomeruli", {"type": "Polygon", "coordinates": [square(0, 0, 4, 4)]})
    (tmp_path / "list.geojson").write_text(json.dumps([feature]))
    (tmp_path / "one.json").write_text(json.dumps(feature))
    for name in ("list.geojson", "one.json"):
        (annotation,) = read_annotations(tmp_path / name)
        assert annotation.class_id == 4 and annotation.area == 16.0


def test_asap_groups_name_classes_and_background_polygons_cut_holes(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(ASAP.format(outer="Glomeruli"))
    annotations = read_annotations(path, RENAL)
    assert [a.class_id for a in annotations] == [4, 0]
    np.testing.assert_array_equal(annotations[0].exterior, [[2, 2], [10, 2], [10, 10], [2, 10]])
    expected = np.zeros((12, 12), dtype=np.uint8)
    expected[2:10, 2:10] = 4
    expected[4:6, 4:6] = 0
    np.testing.assert_array_equal(rasterize(annotations, 0, 0, 12, 12), expected)


def test_boundary_rule_left_and_top_edges_in_right_and_bottom_out():
    # Pixel centres at k + 0.5: a square from 0.5 to 3.5 has centres exactly on all four edges.
    edge = [Annotation(3, "Tubuli", np.array(square(0.5, 0.5, 3.5, 3.5))[:-1])]
    expected = np.zeros((5, 5), dtype=np.uint8)
    expected[0:3, 0:3] = 3
    np.testing.assert_array_equal(rasterize(edge, 0, 0, 5, 5), expected)


def test_polygons_sharing_an_edge_split_its_pixels_without_gap_or_overlap():
    left = Annotation(3, "Tubuli", np.array([[0, 0], [5.5, 0], [3.5, 8], [0, 8]]))
    right = Annotation(4, "Glomeruli", np.array([[5.5, 0], [10, 0], [10, 8], [3.5, 8]]))
    alone_left = rasterize([left], 0, 0, 10, 8) > 0
    alone_right = rasterize([right], 0, 0, 10, 8) > 0
    assert not (alone_left & alone_right).any()
    assert (alone_left | alone_right).all()


def test_smaller_polygons_win_whatever_the_file_order():
    cortex = Annotation(6, "other kidney tissue", np.array(square(0, 0, 10, 10)))
    glomerulus = Annotation(4, "Glomeruli", np.array(square(2, 2, 5, 5)))
    for order in ([cortex, glomerulus], [glomerulus, cortex]):
        labels = rasterize(order, 0, 0, 10, 10)
        assert (labels[2:5, 2:5] == 4).all() and (labels == 4).sum() == 9 and (labels == 6).sum() == 91


def test_rasterisation_matches_matplotlib_point_in_polygon_at_pixel_centres():
    rng = np.random.default_rng(3)
    for _ in range(20):
        count = rng.integers(3, 25)
        angles = np.sort(rng.uniform(0, 2 * np.pi, count))
        radii = rng.uniform(8, 60, count)
        exterior = (np.c_[70 + radii * np.cos(angles), 60 + radii * np.sin(angles)]
                    + rng.uniform(-1e-3, 1e-3, (count, 2)))
        hole = np.c_[70 + 4 * np.cos(np.linspace(0, 5, 6)), 60 + 4 * np.sin(np.linspace(0, 5, 6))]
        # Offset and downsample: pixel (i, j) has its centre at (10 + 2 (j + .5), 4 + 2 (i + .5)).
        labels = rasterize([Annotation(3, "Tubuli", exterior, (hole,))], 10, 4, 70, 65, downsample=2)
        yy, xx = np.mgrid[0:65, 0:70]
        centres = np.c_[10 + 2 * (xx.ravel() + 0.5), 4 + 2 * (yy.ravel() + 0.5)]
        expected = PolygonPath(exterior).contains_points(centres) & ~PolygonPath(hole).contains_points(centres)
        np.testing.assert_array_equal(labels.ravel() == 3, expected)


def assert_refused(path: Path, text: str, message: str) -> None:
    """``text`` written to ``path`` is refused with a one-line DataError that starts with the path."""
    path.write_text(text)
    with pytest.raises(DataError, match=message) as err:
        read_annotations(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


@pytest.mark.parametrize("content, message", [
    ({"type": "FeatureCollection",
      "features": [qupath_feature(None, {"type": "Polygon", "coordinates": [square(0, 0, 2, 2)]})]},
     r"an annotation has no class name; classify every annotation"),
    ({"type": "FeatureCollection",
      "features": [qupath_feature("Tumour", {"type": "Polygon", "coordinates": [square(0, 0, 2, 2)]})]},
     r"unknown class name 'Tumour'"),
    ({"type": "FeatureCollection", "features": []}, r"holds no polygon annotations"),
    ({"type": "FeatureCollection",
      "features": [qupath_feature("Tubuli", {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]})]},
     r"a Polygon has malformed coordinates"),
])
def test_bad_geojson_is_a_one_line_error_naming_the_file(tmp_path, content, message):
    assert_refused(tmp_path / "bad.geojson", json.dumps(content), message)


def test_bad_files_are_errors(tmp_path):
    unclassified = tmp_path / "none.xml"
    unclassified.write_text(ASAP.format(outer="None"))
    with pytest.raises(DataError, match=r"none\.xml: an annotation has no class name"):
        read_annotations(unclassified)
    broken = tmp_path / "broken.geojson"
    broken.write_text("{not json")
    with pytest.raises(DataError, match=r"broken\.geojson: not valid JSON"):
        read_annotations(broken)
    with pytest.raises(DataError, match=r"annotation file .*missing\.xml does not exist"):
        read_annotations(tmp_path / "missing.xml")
    other = tmp_path / "a.csv"
    other.write_text("x,y\n")
    with pytest.raises(DataError, match=r"unknown annotation format"):
        read_annotations(other)


POLYGON = {"type": "Polygon", "coordinates": [square(0, 0, 8, 8)]}


@pytest.mark.parametrize("text, message", [
    # json reads NaN / Infinity literals; such a ring once rasterised into a class filling every patch
    ('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Polygon", '
     '"coordinates": [[[0, 0], [NaN, 0], [8, 8], [0, 8]]]}, "properties": {"classification": {"name": "Tubuli"}}}]}',
     r"feature 0: a Polygon has malformed coordinates \(a coordinate is NaN or infinite"),
    ('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "MultiPolygon", '
     '"coordinates": [[[[0, 0], [8, 0], [8, -Infinity], [0, 8]]]]}, '
     '"properties": {"classification": {"name": "Tubuli"}}}]}',
     r"feature 0: a MultiPolygon has malformed coordinates \(a coordinate is NaN or infinite"),
    ('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Polygon", '
     '"coordinates": [[[0, 0], [1e999, 0], [8, 8]]]}, "properties": {"classification": {"name": "Tubuli"}}}]}',
     r"a coordinate is NaN or infinite"),
    ('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Polygon", '
     '"coordinates": [[[0, 0], [1e300, 0], [8, 8]]]}, "properties": {"classification": {"name": "Tubuli"}}}]}',
     r"a coordinate lies beyond 2147483648 pixels"),
])
def test_non_finite_geojson_coordinates_are_refused_naming_file_and_feature(tmp_path, text, message):
    assert_refused(tmp_path / "slide.geojson", text, message)


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-Infinity", "1e999"])
def test_non_finite_asap_coordinates_are_refused_naming_file_and_annotation(tmp_path, value):
    path = tmp_path / "slide.xml"
    path.write_text(ASAP.format(outer="Glomeruli").replace('X="10" Y="10"', f'X="{value}" Y="10"'))
    with pytest.raises(DataError, match=r"slide\.xml: annotation 0 \('Annotation 0'\) has malformed coordinates "
                                        r"\(a coordinate is NaN or infinite") as err:
        read_annotations(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content, message", [
    ({"type": "FeatureCollection", "features": 5}, r"'features' must be a list of GeoJSON features, got int"),
    ({"type": "FeatureCollection", "features": {"a": 1}}, r"'features' must be a list of GeoJSON features, got dict"),
    ({"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": "Polygon",
                                                 "properties": {"classification": {"name": "Tubuli"}}}]},
     r"feature 0 has a geometry of type str, not a GeoJSON geometry object"),
    ({"type": "FeatureCollection", "features": [
        qupath_feature("Tubuli", POLYGON),
        {"type": "Feature", "id": "abc", "geometry": [[0, 0], [1, 1]], "properties": {}}]},
     r"feature 1 \('abc'\) has a geometry of type list, not a GeoJSON geometry object"),
    ({"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": POLYGON, "properties": "Tubuli"}]},
     r"feature 0 has 'properties' of type str, not an object"),
    ({"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": POLYGON,
                                                 "properties": {"classification": {"name": 3}}}]},
     r"feature 0 has a class name that is not text \(3\)"),
    ({"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": POLYGON,
                                                 "properties": {"classification": 3}}]},
     r"feature 0 has a class name that is not text \(3\)"),
    ({"type": "FeatureCollection", "features": [qupath_feature("Tubuli", {"type": "Polygon"})]},
     r"feature 0: a Polygon has malformed coordinates \('coordinates'\)"),
    ({"type": "FeatureCollection",
      "features": [qupath_feature("Tubuli", {"type": "Polygon", "coordinates": "0 0 8 8"})]},
     r"feature 0: a Polygon has malformed coordinates"),
    ({"type": "FeatureCollection", "features": [qupath_feature("Tubuli", {"type": "Polygon", "coordinates": [[
        ["0", "0"], ["8", "0"], ["8", "8"]]]})]},
     r"feature 0: a Polygon has malformed coordinates \(a ring must be a list of \[x, y\] number pairs\)"),
    ({"type": "FeatureCollection", "features": [qupath_feature("Tubuli", {"type": "GeometryCollection",
                                                                          "geometries": "abc"})]},
     r"feature 0: a GeometryCollection has malformed coordinates \('geometries' must be a list\)"),
    ({"type": "FeatureCollection", "features": [qupath_feature("Tubuli", {"type": "GeometryCollection",
                                                                          "geometries": ["abc"]})]},
     r"feature 0 has a geometry of type str"),
    ({"type": "FeatureCollection", "features": [qupath_feature("Tubuli", {"type": "MultiPolygon",
                                                                          "coordinates": 7})]},
     r"feature 0: a MultiPolygon has malformed coordinates"),
])
def test_malformed_geojson_structures_are_one_line_errors(tmp_path, content, message):
    assert_refused(tmp_path / "bad.geojson", json.dumps(content), message)


def test_deeply_nested_json_is_a_data_error(tmp_path):
    path = tmp_path / "deep.geojson"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(DataError, match=r"deep\.geojson: not valid JSON \(nested too deeply\)"):
        read_annotations(path)


def test_features_without_properties_or_geometry_still_read(tmp_path):
    path = write_geojson(tmp_path / "ok.geojson", [
        qupath_feature("Tubuli", POLYGON),
        {"type": "Feature", "geometry": None, "properties": {"classification": {"name": "Tubuli"}}},
    ])
    (annotation,) = read_annotations(path)
    assert annotation.class_id == 3 and annotation.exterior.shape == (5, 2)
