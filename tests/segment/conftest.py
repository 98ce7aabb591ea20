"""Fixtures of the segmentation tests: tiny synthetic tissue and a segmenter trained on it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def _load_toydata():
    spec = importlib.util.spec_from_file_location("segment_toydata", Path(__file__).with_name("toydata.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def toy():
    return _load_toydata()


@pytest.fixture(scope="session")
def toy_dataset(toy, tmp_path_factory):
    return toy.shared_dataset(tmp_path_factory)


@pytest.fixture(scope="session")
def multiclass_folder(toy, tmp_path_factory):
    return toy.shared_multiclass_segmenter(tmp_path_factory)
