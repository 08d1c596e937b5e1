"""The description of the images a model was trained on (the engine's ``languageguidedseg.domain``), computed for a
model package from its data set: the encoder's pooled features of the training split, their principal subspace with
shrunk variances, and a threshold calibrated on the val split.

The same code describes a package at the end of training and an existing package (``train.py --describe-domain``):
it reads the package, computes the features with the engine's inference code (what every segmentation computes),
and rewrites the package with the same weights and the description added. Training/README.md has the figures
behind the method and its settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from languageguidedseg.config import DomainConfig
from languageguidedseg.data import Sample, load_pair, load_split
from languageguidedseg.domain import Domain
from languageguidedseg.errors import LgsegError
from languageguidedseg.inference import Segmenter
from languageguidedseg.package import load_package, save_package

from .config import DataConfig

METHOD = "mahalanobis"
# Principal components kept: at most 512, all of EfficientNet-Lite0's pooled features (a full Mahalanobis distance);
# variances shrunk by a tenth of their mean (Training/README.md: the separation figures behind both).
COMPONENTS = 512
SHRINKAGE = 0.1
COVERAGE = 0.995  # the share of the val split at or above the threshold (the issue asks for at least 0.99)


def pooled_features(segmenter: Segmenter, samples: Sequence[Sample]) -> torch.Tensor:
    """The encoder's pooled features ``[N, C]`` of the samples' images, as inference computes them."""
    features = []
    batch: list[np.ndarray] = []
    for index, sample in enumerate(samples):
        image = load_pair(sample)[0]
        if batch and (image.shape != batch[0].shape or len(batch) == segmenter.batch_size):
            features.append(segmenter.pooled_features(np.stack(batch)).cpu())
            batch = []
        batch.append(image)
        if index == len(samples) - 1:
            features.append(segmenter.pooled_features(np.stack(batch)).cpu())
    return torch.cat(features) if features else torch.empty(0)


def fit_domain(train: torch.Tensor, val: torch.Tensor, images: str, components: int = COMPONENTS,
               shrinkage: float = SHRINKAGE, coverage: float = COVERAGE) -> Domain:
    """The description of the images whose features are ``train`` ``[N, C]``, its threshold calibrated so that a
    share ``coverage`` of the val images ``val`` ``[M, C]`` is in-domain."""
    if len(train) < 2 or not len(val):
        raise LgsegError("describing a model's images needs at least 2 training and 1 val image")
    features = train.double()
    mean = features.mean(0)
    centred = features - mean
    variances, vectors = torch.linalg.eigh(centred.T @ centred / (len(features) - 1))
    variances, vectors = variances.flip(0).clamp(min=0.0), vectors.flip(1)  # largest first
    components = min(components, features.shape[1])
    shrunk = variances[:components] + shrinkage * variances.mean()
    basis = vectors[:, :components] / shrunk.sqrt()
    provisional = DomainConfig(images=images, method=METHOD, components=components, shrinkage=shrinkage,
                               scale=1.0, threshold=0.5)
    domain = Domain(provisional, mean.float(), basis.float())
    scale = float(domain.distances(train).median())
    domain.config = dataclasses.replace(provisional, scale=scale)
    val_scores = domain.scores(val).double().numpy()
    # An actual val score: at least ``coverage`` of the val images are at or above it.
    threshold = float(np.quantile(val_scores, 1.0 - coverage, method="lower"))
    domain.config = dataclasses.replace(domain.config, threshold=threshold, train_images=len(train),
                                        val_images=len(val),
                                        val_in_domain_rate=round(float((val_scores >= threshold).mean()), 4))
    return domain


def describe_package(folder: Path, data: DataConfig, images: str, device: str = "cpu") -> DomainConfig:
    """Describe the images of the model package in ``folder`` from ``data``'s train and val splits (at most
    ``data.limit`` / ``data.val_limit`` images each) and rewrite the package: the same weights, the description
    added (replacing one it had)."""
    if not images.strip():
        raise LgsegError("the training images need describing in words for the applicability warning; set "
                         "package.domain_images, e.g. 'a frontal chest X-ray'")
    package = load_package(folder)
    segmenter = Segmenter.load(package, device)
    splits = []
    for split, limit in ((data.train_split, data.limit), (data.val_split, data.val_limit or data.limit)):
        samples = load_split(data.root(), split)
        splits.append(pooled_features(segmenter, samples[:limit] if limit else samples))
    domain = fit_domain(splits[0], splits[1], images.strip())
    save_package(folder, package.build_network("cpu"), package.config, half=package.weights_dtype == "float16",
                 domain=domain)
    return domain.config
