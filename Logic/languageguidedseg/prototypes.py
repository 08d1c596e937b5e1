"""ProLearn's prototype bank: text-free guidance from an image embedding (prototype-driven semantic approximation).

Each prototype is a joint vector: an image half (a key in the image-embedding space) and a text half in the text
encoder's space: as in ProLearn, the members' token features averaged position by position (``[T, D]`` with a token
mask), or, in the first shipped models, one pooled sentence embedding (``[D]``). A query compares an image embedding
with the image halves by cosine similarity; the text halves of the top k prototypes become the guidance tokens in
place of report tokens (``k x T`` tokens, or ``k``). Each
prototype also keeps a representative report (stored in the model package's JSON), so an approximation can be
shown to the user as text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from .errors import LgsegError


@dataclass
class BankQuery:
    """The result of a bank query for a batch: guidance tokens ``[B, k * T, D]`` (``[B, k, D]`` for a pooled bank),
    their mask, and the prototypes' indices and similarities ``[B, k]``."""

    tokens: torch.Tensor
    mask: torch.Tensor
    indices: torch.Tensor
    similarities: torch.Tensor


class PrototypeBank(nn.Module):
    """A bank of ``size`` prototypes with image keys ``[P, D]`` and learnable text values: ``[P, T, D]`` token
    features with ``token_mask [P, T]`` (``tokens`` = T), or ``[P, D]`` pooled vectors (``tokens`` = 0)."""

    image_keys: torch.Tensor
    classes: torch.Tensor
    token_mask: Optional[torch.Tensor]

    def __init__(self, size: int, dim: int, top_k: int = 3, tokens: int = 0):
        super().__init__()
        self.top_k = top_k
        self.register_buffer("image_keys", torch.zeros(size, dim))
        # The text halves are fine-tuned by the segmentation loss after clustering.
        self.text_values = nn.Parameter(torch.zeros(size, tokens, dim) if tokens else torch.zeros(size, dim))
        # A pooled bank has no token mask (and none in its state dict: the first shipped packages load as saved).
        self.register_buffer("token_mask", torch.zeros(size, tokens, dtype=torch.bool) if tokens else None)
        self.register_buffer("classes", torch.full((size,), -1, dtype=torch.long))

    @property
    def size(self) -> int:
        return self.image_keys.shape[0]

    @property
    def tokens(self) -> int:
        """Text tokens per prototype; 0 for a pooled bank."""
        return self.text_values.shape[1] if self.text_values.ndim == 3 else 0

    @torch.no_grad()
    def fill(self, image_keys: torch.Tensor, text_values: torch.Tensor, classes: torch.Tensor,
             token_mask: Optional[torch.Tensor] = None) -> None:
        """Replace the bank's content (e.g. with k-means centres); the bank is resized if needed. ``text_values``
        ``[P, T, D]`` with ``token_mask [P, T]`` makes a token bank, ``[P, D]`` a pooled one."""
        if (text_values.ndim == 3) != (token_mask is not None):
            raise ValueError("token text values [P, T, D] need a token mask [P, T]; pooled values [P, D] take none")
        device = self.image_keys.device
        self.image_keys = nn.functional.normalize(image_keys.float(), dim=-1).to(device)
        self.text_values = nn.Parameter(text_values.float().to(device))
        self.token_mask = None if token_mask is None else token_mask.bool().to(device)
        self.classes = classes.long().to(device)

    def rank(self, image_embedding: torch.Tensor, top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Similarities and indices ``[B, k]`` of the top-k prototypes by cosine similarity of ``image_embedding
        [B, D]`` to the image keys, without gathering their text (ranking every prototype stays cheap)."""
        if self.size == 0:
            raise LgsegError("this model has no prototype bank; give a report, or use a model trained with a bank")
        k = min(top_k or self.top_k, self.size)
        sims = nn.functional.normalize(image_embedding.float(), dim=-1) @ self.image_keys.t()
        return sims.topk(k, dim=-1)

    def query(self, image_embedding: torch.Tensor, top_k: int | None = None) -> BankQuery:
        """The top-k prototypes of :meth:`rank` with their text tokens, the guidance for the decoder."""
        best, idx = self.rank(image_embedding, top_k)
        if self.token_mask is None:
            tokens = self.text_values[idx]
            mask = torch.ones(idx.shape, dtype=torch.bool, device=idx.device)
        else:  # the k prototypes' token sequences one after the other
            tokens = self.text_values[idx].flatten(1, 2)
            mask = self.token_mask[idx].flatten(1, 2)
        return BankQuery(tokens=tokens, mask=mask, indices=idx, similarities=best)


@dataclass
class BankContent:
    """k-means result: image keys, text values (with their token mask for a token bank), the class of each
    prototype, its members and representative."""

    image_keys: torch.Tensor
    text_values: torch.Tensor
    classes: torch.Tensor
    members: list[list[int]]
    representatives: list[int]
    token_mask: Optional[torch.Tensor] = None


def average_tokens(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The members' token features ``[N, T, D]`` (mask ``[N, T]``) averaged position by position over the members
    that have a token there; a position is kept where at least half of the members have one (a few long reports
    do not lengthen the prototype). Returns ``[T, D]`` and ``[T]``."""
    weights = mask.float().unsqueeze(-1)
    mean = (tokens.float() * weights).sum(0) / weights.sum(0).clamp_min(1.0)
    keep = mask.float().mean(0) >= 0.5
    keep[0] = True  # every prototype keeps at least its first token
    return mean * keep.unsqueeze(-1), keep


def build_bank(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
               class_members: Optional[Sequence[Sequence[int]]], clusters_per_class: int = 16,
               seed: int = 0, text_tokens: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> BankContent:
    """Cluster joint image+text vectors into prototypes (ProLearn's PSA).

    ``class_members[c]`` lists the samples of pseudo-label class ``c`` (a sample may belong to several); None
    clusters all samples together into ``clusters_per_class`` prototypes. Each prototype keeps the member nearest
    to its centre, whose report represents it as text. The clustering uses the pooled ``text_embeddings [N, D]``;
    with ``text_tokens`` (each sample's token features ``[N, T, D]`` and mask ``[N, T]``) each prototype's text
    half is its members' averaged tokens (:func:`average_tokens`), else their mean pooled embedding.
    """
    try:
        from sklearn.cluster import KMeans  # a training dependency: inference only queries a bank
    except ImportError as exc:
        raise LgsegError("building a prototype bank needs scikit-learn; install the training extras "
                         "(pip install -e \".[training]\")") from exc

    image = nn.functional.normalize(image_embeddings.float(), dim=-1)
    text = nn.functional.normalize(text_embeddings.float(), dim=-1)
    joint = torch.cat([image, text], dim=1).numpy()
    groups = [list(range(len(joint)))] if class_members is None else [list(m) for m in class_members]
    keys, values, masks, classes, members, representatives = [], [], [], [], [], []
    for c, group in enumerate(groups):
        if not group:
            continue
        k = min(clusters_per_class, len(group))
        kmeans = KMeans(n_clusters=k, random_state=seed, n_init=4).fit(joint[group])
        for j in range(k):
            idx = [group[i] for i in np.flatnonzero(kmeans.labels_ == j)]
            if not idx:
                continue
            centre = torch.from_numpy(kmeans.cluster_centers_[j]).float()
            distances = ((torch.from_numpy(joint[idx]) - centre) ** 2).sum(1)
            keys.append(centre[: image.shape[1]])
            if text_tokens is None:
                values.append(text_embeddings[idx].float().mean(0))  # the text half, in the encoder's own scale
            else:
                value, mask = average_tokens(text_tokens[0][idx], text_tokens[1][idx])
                values.append(value)
                masks.append(mask)
            classes.append(c if class_members is not None else -1)
            members.append(idx)
            representatives.append(idx[int(distances.argmin())])
    if not keys:
        raise LgsegError("no sample with a report to build the prototype bank from; raise the text ratio (the share "
                         "of training reports kept)", option="text_ratio")
    return BankContent(torch.stack(keys), torch.stack(values), torch.tensor(classes), members, representatives,
                       torch.stack(masks) if masks else None)


def refresh_keys(bank: PrototypeBank, image_embeddings: torch.Tensor, members: Sequence[Sequence[int]]) -> None:
    """Recompute each prototype's image key as the mean embedding of its members under the current encoder (a
    prototype without members keeps its key)."""
    image = nn.functional.normalize(image_embeddings.float(), dim=-1)
    keys = bank.image_keys.detach().cpu().clone()
    for k, m in enumerate(members):
        if len(m):
            keys[k] = nn.functional.normalize(image[list(m)].mean(0), dim=-1)
    with torch.no_grad():
        bank.image_keys.copy_(keys.to(bank.image_keys.device))
