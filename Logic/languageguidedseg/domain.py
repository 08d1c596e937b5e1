"""Applicability: whether an image looks like the images a model was trained on.

A package's domain description (``ModelConfig.domain`` and the ``domain.*`` arrays of its weights file, written by
``Training/``) models the encoder's pooled features (:meth:`LanguageGuidedSegNet.pooled_features`: each feature map
that every forward computes anyway, averaged over space) of the training images: their mean and a whitening basis
of their principal components (variances shrunk by a share of their mean), so that the distance of an image is the
Mahalanobis distance of its features in that subspace (all of it, for the shipped models). The distance ``d``
becomes ``domain_score = 2 ** (-d / scale)``, ``scale`` being the training images' median distance: 1.0 at the
centre of the training images, 0.5 as far as the median training image, near 0 far from all of them. An image is
in-domain when its score is at least the threshold, calibrated so that at least 99% of the data set's val images
are (``Training/README.md`` has the figures).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from .config import DomainConfig
from .errors import LgsegError

DOMAIN_PREFIX = "domain."  # the arrays' keys in the weights file; not part of the network's state dict


class Domain:
    """A model's domain description, ready to score pooled features ``[N, C]``."""

    def __init__(self, config: DomainConfig, mean: torch.Tensor, basis: torch.Tensor):
        if mean.ndim != 1 or basis.shape != (mean.shape[0], config.components):
            raise LgsegError(f"the domain description's arrays (mean {tuple(mean.shape)}, basis "
                             f"{tuple(basis.shape)}) do not match its {config.components} components; "
                             "re-describe the model with Training/train.py --describe-domain")
        self.config = config
        self.mean = mean.float()
        self.basis = basis.float()

    @classmethod
    def from_arrays(cls, config: DomainConfig, arrays: Mapping[str, torch.Tensor]) -> Domain:
        """From the package's ``domain.*`` arrays (keys without the prefix)."""
        if set(arrays) != {"mean", "basis"}:
            raise LgsegError(f"the domain description needs the arrays mean and basis, not {sorted(arrays)}; "
                             "re-describe the model with Training/train.py --describe-domain")
        return cls(config, arrays["mean"], arrays["basis"])

    def arrays(self) -> dict[str, torch.Tensor]:
        """The arrays as the package stores them (keys without the prefix)."""
        return {"mean": self.mean, "basis": self.basis}

    def to(self, device: torch.device) -> Domain:
        return Domain(self.config, self.mean.to(device), self.basis.to(device))

    def distances(self, pooled: torch.Tensor) -> torch.Tensor:
        """The Mahalanobis distance ``[N]`` of pooled features ``[N, C]`` in the training images' subspace."""
        return ((pooled.float() - self.mean) @ self.basis).norm(dim=1)

    def scores(self, pooled: torch.Tensor) -> torch.Tensor:
        """``domain_score`` ``[N]``: 1.0 at the training images' centre, 0.5 at their median distance."""
        return torch.exp2(-self.distances(pooled) / self.config.scale)


@dataclass
class Applicability:
    """Whether an image (a slice, or a volume judged slice by slice) is in a model's domain.

    ``in_domain`` and ``score`` are None where the model has no domain description (applicability unknown); for a
    volume ``score`` is the median of its slices' scores, ``in_domain`` says whether that median reaches the
    threshold (at least half of the slices are in-domain) and ``slices`` is (slices in-domain, slices judged).
    """

    in_domain: Optional[bool] = None
    score: Optional[float] = None
    slices: Optional[tuple[int, int]] = None
    warning: str = ""


def judge(domain: Optional[Domain], scores: Union[Sequence[float], np.ndarray], model: str,
          volume: bool = False) -> Applicability:
    """Applicability of one image from its slices' ``scores``; ``volume``: report the slice counts too."""
    if domain is None or not len(scores):
        return Applicability()
    values = np.asarray(scores, dtype=np.float64)
    threshold = domain.config.threshold
    score = float(np.median(values))
    inside = score >= threshold
    warning = "" if inside else out_of_domain_warning(domain.config, model)
    slices = (int((values >= threshold).sum()), len(values)) if volume else None
    return Applicability(in_domain=bool(inside), score=round(score, 6), slices=slices, warning=warning)


def out_of_domain_warning(config: DomainConfig, model: str) -> str:
    """The plain-words warning for an image outside the domain of ``model``."""
    return (f"this image does not look like {config.images} (the images {model} was trained on); its mask and "
            "approximated report are unreliable")
