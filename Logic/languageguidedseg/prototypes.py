"""ProLearn's prototype bank: text-free guidance from an image embedding (prototype-driven semantic approximation).

Each prototype is a joint vector: an image half (a key in the image-embedding space) and a text half (a sentence
embedding in the text encoder's space). A query compares an image embedding with the image halves by cosine
similarity; the text halves of the top k prototypes become the guidance tokens in place of report tokens. Each
prototype also keeps a representative report (stored in the model package's JSON), so an approximation can be
shown to the user as text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import LgsegError


@dataclass
class BankQuery:
    """The result of a bank query for a batch: guidance tokens ``[B, k, D]``, mask, indices and similarities."""

    tokens: torch.Tensor
    mask: torch.Tensor
    indices: torch.Tensor
    similarities: torch.Tensor


class PrototypeBank(nn.Module):
    """A bank of ``size`` prototypes with image keys ``[P, D]`` and learnable text values ``[P, D]``."""

    def __init__(self, size: int, dim: int, top_k: int = 3):
        super().__init__()
        self.top_k = top_k
        self.register_buffer("image_keys", torch.zeros(size, dim))
        # The text halves are fine-tuned by the segmentation loss after clustering.
        self.text_values = nn.Parameter(torch.zeros(size, dim))
        self.register_buffer("classes", torch.full((size,), -1, dtype=torch.long))

    @property
    def size(self) -> int:
        return self.image_keys.shape[0]

    @torch.no_grad()
    def fill(self, image_keys: torch.Tensor, text_values: torch.Tensor, classes: torch.Tensor) -> None:
        """Replace the bank's content (e.g. with k-means centres); the bank is resized if needed."""
        device = self.image_keys.device
        self.image_keys = nn.functional.normalize(image_keys.float(), dim=-1).to(device)
        self.text_values = nn.Parameter(text_values.float().to(device))
        self.classes = classes.long().to(device)

    def query(self, image_embedding: torch.Tensor, top_k: int | None = None) -> BankQuery:
        """Top-k prototypes by cosine similarity of ``image_embedding [B, D]`` to the image keys."""
        if self.size == 0:
            raise LgsegError("this model has no prototype bank; give a report, or use a model trained with a bank")
        k = min(top_k or self.top_k, self.size)
        sims = nn.functional.normalize(image_embedding.float(), dim=-1) @ self.image_keys.t()
        best, idx = sims.topk(k, dim=-1)
        tokens = self.text_values[idx]
        mask = torch.ones(idx.shape, dtype=torch.bool, device=idx.device)
        return BankQuery(tokens=tokens, mask=mask, indices=idx, similarities=best)
