"""A BERT text tower read straight from a Hugging Face folder (``config.json``, ``tokenizer.json``,
``model.safetensors``), for start-up time.

Importing ``transformers`` costs about 2 s on a 2-core machine (its model code pulls in ``torch._dynamo`` and
``torch.distributed``), which is most of a one-image ``lgseg segment``. A BERT encoder is a few lines of torch, so
plain BERT checkpoints (the default all-MiniLM-L6-v2, and BERT-family biomedical encoders such as PubMedBERT) load
here with the ``tokenizers`` library and ``safetensors``; anything else goes through ``transformers``
(:class:`~languageguidedseg.text.TextEncoder` decides). ``Testing/test_text.py`` checks token ids and features
against ``transformers`` on every report of both data sets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .fileio import PathLike

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# The config.json values this implementation covers (these are transformers' defaults when a key is absent); other
# values go through transformers.
_SUPPORTED = {"hidden_act": "gelu", "position_embedding_type": "absolute"}


@dataclass(frozen=True)
class BertConfig:
    """The architecture fields of a BERT ``config.json``."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def read(cls, folder: PathLike) -> Optional[BertConfig]:
        """The config of a plain BERT folder, or None when the folder holds another architecture."""
        try:
            raw = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(raw, dict) or any(raw.get(key, value) != value for key, value in _SUPPORTED.items()):
            return None
        if raw.get("model_type") != "bert" or raw.get("is_decoder") or raw.get("add_cross_attention"):
            return None
        try:
            return cls(**{name: raw[name] for name in cls.__dataclass_fields__})
        except (KeyError, TypeError):
            return None


class _Layer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.attention_output = nn.Linear(c.hidden_size, c.hidden_size)
        self.attention_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.intermediate = nn.Linear(c.hidden_size, c.intermediate_size)
        self.output = nn.Linear(c.intermediate_size, c.hidden_size)
        self.output_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, self.heads, width // self.heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                                  attn_mask=keep[:, None, None, :])
        x = self.attention_norm(x + self.attention_output(attended.transpose(1, 2).reshape(n, length, width)))
        return self.output_norm(x + self.output(F.gelu(self.intermediate(x))))


class BertEncoder(nn.Module):
    """BERT's embeddings and encoder layers; ``forward`` returns the last hidden state ``[N, L, D]``."""

    def __init__(self, config: BertConfig):
        super().__init__()
        c = config
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.embedding_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None] \
            + self.token_type_embeddings.weight[0]  # one segment: token type 0 everywhere
        x = self.embedding_norm(x)
        keep = attention_mask.bool()
        for layer in self.layers:
            x = layer(x, keep)
        return x

    @staticmethod
    def state_dict_from_hf(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename a Hugging Face BERT state dict (with or without the ``bert.`` prefix) to this module's names;
        the pooler and any task head are left out."""
        renames = {"embeddings.LayerNorm.": "embedding_norm.", "attention.self.query.": "query.",
                   "attention.self.key.": "key.", "attention.self.value.": "value.",
                   "attention.output.dense.": "attention_output.", "attention.output.LayerNorm.": "attention_norm.",
                   "intermediate.dense.": "intermediate.", "output.dense.": "output.",
                   "output.LayerNorm.": "output_norm.", "encoder.layer.": "layers."}
        out = {}
        for name, tensor in weights.items():
            name = name.removeprefix("bert.")
            if not name.startswith(("embeddings.", "encoder.")) or name.endswith("position_ids"):
                continue
            for old, new in renames.items():
                name = name.replace(old, new)
            out[name.removeprefix("embeddings.")] = tensor
        return out


def load_bert(folder: PathLike) -> Optional[tuple[Tokenizer, BertEncoder]]:
    """``(tokenizer, encoder)`` for a plain BERT folder with ``tokenizer.json`` and ``model.safetensors``; None for
    anything else (the caller then uses ``transformers``)."""
    folder = Path(folder)
    config = BertConfig.read(folder)
    if config is None or not (folder / "tokenizer.json").is_file() or not (folder / "model.safetensors").is_file():
        return None
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    encoder = BertEncoder(config)
    weights = BertEncoder.state_dict_from_hf(load_file(str(folder / "model.safetensors")))
    if set(weights) != set(encoder.state_dict()):
        return None
    encoder.load_state_dict(weights)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer, encoder
