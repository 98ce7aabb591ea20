"""Captions follow the exact templates, thresholds and ordering, and parse back to their levels."""

from __future__ import annotations

import numpy as np
import pytest

from histosynth.captions import (
    GENERATING_CAPTION,
    UNCONDITIONAL_CAPTION,
    Level,
    canonical_caption,
    caption_for_levels,
    caption_for_mask,
    caption_from_levels,
    level_of,
    parse_caption,
    parse_levels_option,
    prevalence_levels,
    prevalences,
    read_captions_file,
)
from histosynth.errors import CaptionError, DataError
from histosynth.schema import RENAL

INTRO = "This image showcases various types of tissue structures found in renal tissue."
ONLY_GLOMERULI = INTRO + "\nThe image shows a low amount of Glomeruli."


def mask_with_shares(shares: dict[int, int], total: int = 100) -> np.ndarray:
    """A 10x10 mask holding `count` pixels of each id; the rest is background (id 0)."""
    flat = np.zeros(total, dtype=np.uint8)
    start = 0
    for class_id, count in shares.items():
        flat[start:start + count] = class_id
        start += count
    return flat.reshape(10, total // 10)


def test_generating_caption_is_the_thesis_caption():
    mask = mask_with_shares({3: 30, 4: 50, 6: 0})
    assert caption_for_mask(mask) == GENERATING_CAPTION
    assert GENERATING_CAPTION == (
        f"{INTRO}\nThe prevalence of Tubuli is medium.\n"
        "There is a lot of Glomeruli visible in the image."
    )


def test_threshold_edges_are_inclusive_at_the_upper_level():
    assert level_of(0.0) is Level.NONE
    assert level_of(1e-9) is Level.LOW
    assert level_of(0.19999) is Level.LOW
    assert level_of(0.2) is Level.MEDIUM
    assert level_of(0.39999) is Level.MEDIUM
    assert level_of(0.4) is Level.HIGH
    assert level_of(1.0) is Level.HIGH


def test_exact_prevalence_edges_from_masks():
    # 20 of 100 pixels is exactly 0.2 -> medium; 40 of 100 exactly 0.4 -> high.
    mask = mask_with_shares({2: 20, 6: 40, 7: 1})
    assert caption_for_mask(mask) == (
        f"{INTRO}\n"
        "The prevalence of Atrophic Tubuli is medium.\n"
        "There is a lot of other kidney tissue visible in the image.\n"
        "The image shows a low amount of Dilated Tubuli."
    )


def test_thesis_second_example_in_ascending_id_order():
    mask = mask_with_shares({6: 30, 5: 5, 3: 45, 2: 10})
    assert caption_for_mask(mask) == (
        f"{INTRO}\n"
        "The image shows a low amount of Atrophic Tubuli.\n"
        "There is a lot of Tubuli visible in the image.\n"
        "The image shows a low amount of Sclerotic Glomeruli.\n"
        "The prevalence of other kidney tissue is medium."
    )


def test_background_counts_in_denominator_but_is_never_named():
    mask = mask_with_shares({3: 39})  # 61 % background
    shares = prevalences(mask)
    assert shares[0] == pytest.approx(0.61)
    assert shares[3] == pytest.approx(0.39)
    assert caption_for_mask(mask) == f"{INTRO}\nThe prevalence of Tubuli is medium."


def test_all_background_mask_gives_intro_only():
    assert caption_for_mask(np.zeros((8, 8), np.uint8)) == INTRO


def test_mask_with_unknown_id_is_rejected():
    mask = np.full((4, 4), 9, np.uint8)
    with pytest.raises(DataError, match=r"\[9\]"):
        caption_for_mask(mask)


def test_parse_reads_the_generating_caption():
    levels = parse_caption(GENERATING_CAPTION)
    assert levels["Tubuli"] is Level.MEDIUM
    assert levels["Glomeruli"] is Level.HIGH
    assert {k for k, v in levels.items() if v is not Level.NONE} == {"Tubuli", "Glomeruli"}
    assert "white background" not in levels


def test_parse_accepts_sentences_on_one_line():
    one_line = GENERATING_CAPTION.replace("\n", " ")
    assert parse_caption(one_line) == parse_caption(GENERATING_CAPTION)


def test_unconditional_caption_states_nothing():
    assert set(parse_caption("").values()) == {Level.NONE}


def test_parse_quotes_unknown_sentence():
    with pytest.raises(CaptionError, match="'Kidneys are nice.'"):
        parse_caption(f"{INTRO}\nKidneys are nice.")


def test_parse_quotes_unknown_class():
    with pytest.raises(CaptionError, match="'Podocytes'"):
        parse_caption("The prevalence of Podocytes is medium.")


def test_parse_rejects_a_class_named_twice():
    with pytest.raises(CaptionError, match="twice"):
        parse_caption("The prevalence of Tubuli is medium. There is a lot of Tubuli visible in the image.")


@pytest.mark.parametrize("seed", range(25))
def test_parse_inverts_caption_for_random_masks(seed):
    rng = np.random.default_rng(seed)
    present = rng.choice(8, size=rng.integers(1, 8), replace=False)
    weights = rng.dirichlet(np.ones(len(present)))
    mask = rng.choice(present, size=(64, 64), p=weights).astype(np.uint8)
    assert parse_caption(caption_for_mask(mask)) == prevalence_levels(mask)


def test_levels_option_round_trips_to_caption():
    levels = parse_levels_option("Glomeruli=high, tubuli=MEDIUM")
    assert caption_from_levels(levels) == GENERATING_CAPTION


def test_levels_option_errors_name_the_bad_part():
    with pytest.raises(CaptionError, match="'Glomeruli=huge'|'huge'"):
        parse_levels_option("Glomeruli=huge")
    with pytest.raises(CaptionError, match="'Glomeruli high'"):
        parse_levels_option("Glomeruli high")
    with pytest.raises(CaptionError, match="never named"):
        parse_levels_option("white background=low")


def test_custom_schema_changes_names_and_thresholds():
    schema = RENAL.model_copy(update={
        "captions": RENAL.captions.model_copy(update={"intro": "Lung tissue.", "medium_from": 0.1}),
    })
    mask = mask_with_shares({3: 15})
    assert caption_for_mask(mask, schema) == "Lung tissue.\nThe prevalence of Tubuli is medium."


# --- captions a user writes ---------------------------------------------------------------------
def test_captions_are_rewritten_in_the_trained_form():
    shuffled = "There is a lot of Glomeruli visible in the image. The prevalence of Tubuli is medium."
    assert canonical_caption(shuffled, RENAL) == GENERATING_CAPTION
    assert canonical_caption(GENERATING_CAPTION.replace("\n", "\\n"), RENAL) == GENERATING_CAPTION
    assert canonical_caption("  ", RENAL) == UNCONDITIONAL_CAPTION
    assert caption_for_levels("Glomeruli=high, Tubuli=medium", RENAL) == GENERATING_CAPTION
    assert caption_for_levels({"glomeruli": "low"}, RENAL) == ONLY_GLOMERULI


def test_unknown_classes_and_levels_are_named():
    with pytest.raises(CaptionError, match=r"^unknown class name 'Glomerulus'; schema 'renal' has "):
        canonical_caption("There is a lot of Glomerulus visible in the image.", RENAL)
    with pytest.raises(CaptionError,
                       match=r"^unknown level 'huge' for 'Glomeruli'; use one of none, low, medium, high$"):
        caption_for_levels("Glomeruli=huge", RENAL)


def test_captions_file_one_per_line(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("There is a lot of Glomeruli visible in the image. The prevalence of Tubuli is medium.\n"
                    "\n"
                    "The image shows a low amount of Glomeruli.\n")
    assert read_captions_file(path, RENAL) == [GENERATING_CAPTION, ONLY_GLOMERULI]
    path.write_text("The image shows a low amount of Glomeruli.\n\nThe image shows a low amount of Podocytes.\n")
    with pytest.raises(CaptionError, match=rf"^{path}, line 3: unknown class name 'Podocytes'"):
        read_captions_file(path, RENAL)
    path.write_text("\n\n")
    with pytest.raises(DataError, match="holds no caption"):
        read_captions_file(path, RENAL)
