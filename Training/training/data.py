"""Data and sampling: the splits, preloaded as network-ready tensors, the distinct reports encoded once, and one
``DataLoader`` per epoch over a ``DistributedSampler`` with the epoch's seeded draws (report dropout, augmentation).

Every random draw derives from (seed, epoch), never from a running random state, so a resumed run repeats the
uninterrupted one exactly, whatever the number of loader workers.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from languageguidedseg.data import Sample, apply_text_ratio, load_pair, load_split
from languageguidedseg.network import masked_mean
from languageguidedseg.preprocess import PreprocessConfig, prepare_slices
from languageguidedseg.reports import ReportParser
from languageguidedseg.text import TextEncoder

from .config import AugmentationConfig, DataConfig
from .runtime import Runtime

# An epoch's seed is SEED_STRIDE * seed + epoch: the sampler's shuffle and the epoch's draws share it.
SEED_STRIDE = 100003


def load_samples(config: DataConfig, seed: int) -> tuple[list[Sample], list[Sample]]:
    """The training and validation samples: seeded subsets (``limit``), then the kept share of training reports."""
    root = config.root()
    train, val = load_split(root, config.train_split), load_split(root, config.val_split)
    if config.limit:
        train = [train[i] for i in sorted(np.random.default_rng(seed).permutation(len(train))[:config.limit])]
    val_limit = config.val_limit or config.limit
    if val_limit:
        val = [val[i] for i in sorted(np.random.default_rng(seed + 1).permutation(len(val))[:val_limit])]
    return apply_text_ratio(train, config.text_ratio, seed), val


@dataclass
class Reports:
    """The distinct reports of a run, encoded once by the frozen text encoder, with their pseudo-labels."""

    index: dict[str, int]  # report -> row
    tokens: torch.Tensor  # [R, L, D]
    mask: torch.Tensor  # [R, L] bool
    pooled: torch.Tensor  # [R, D]
    labels: torch.Tensor  # [R, classes] bool (no columns without a report parser)
    dim: int

    @classmethod
    def encode(cls, reports: list[str], encoder: TextEncoder, parser: Optional[ReportParser]) -> Reports:
        unique = sorted(set(reports))
        index = {r: i for i, r in enumerate(unique)}
        if unique:
            encoding = encoder.encode(unique)
            tokens, mask, mean = encoding.tokens, encoding.mask, masked_mean(encoding.tokens, encoding.mask)
        else:
            tokens, mask = torch.zeros(0, 1, encoder.dim), torch.zeros(0, 1, dtype=torch.bool)
            mean = torch.zeros(0, encoder.dim)
        labels = torch.zeros(len(unique), len(parser.classes) if parser else 0, dtype=torch.bool)
        if parser:
            for report, i in index.items():
                labels[i] = torch.tensor(parser.parse(report), dtype=torch.bool)
        return cls(index, tokens, mask, mean, labels, encoder.dim)

    def rows(self, samples: list[Sample]) -> torch.Tensor:
        """Each sample's report row, -1 where it has none."""
        return torch.tensor([self.index.get(s.report, -1) if s.report else -1 for s in samples], dtype=torch.long)

    def guidance(self, report_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Report tokens for a batch; rows without a report get one dummy token (replaced by the bank)."""
        tokens = self.tokens[report_index.clamp_min(0)].clone()
        mask = self.mask[report_index.clamp_min(0)].clone()
        mask[report_index < 0] = False
        mask[report_index < 0, 0] = True
        return tokens, mask


@dataclass
class Preloaded:
    """A split as network-ready tensors (the datasets are small; the CPU, not the memory, is the bottleneck)."""

    samples: list[Sample]
    images: torch.Tensor  # [N, 3, S, S] float16, normalised
    masks: torch.Tensor  # [N, 1, S, S] bool
    report_index: torch.Tensor  # [N] row in Reports, -1 = no report

    def __len__(self) -> int:
        return len(self.samples)


def preload(samples: list[Sample], preprocess: PreprocessConfig, reports: Reports, desc: str,
            show: bool) -> Preloaded:
    from tqdm import tqdm

    size = preprocess.size
    images = torch.empty(len(samples), 3, size, size, dtype=torch.float16)
    masks = torch.empty(len(samples), 1, size, size, dtype=torch.bool)
    for i, sample in enumerate(tqdm(samples, desc=desc, disable=not show, file=sys.stderr, leave=False)):
        image, mask = load_pair(sample)
        images[i] = prepare_slices(image[None], preprocess)[0].half()
        m = torch.from_numpy(mask.astype(np.float32))[None, None]
        masks[i] = F.interpolate(m, size=(size, size), mode="nearest")[0] > 0.5
    return Preloaded(samples, images, masks, reports.rows(samples))


def augmenter(config: AugmentationConfig, size: int) -> Optional[Any]:
    """MONAI dictionary transforms moving image and mask together; no flips, because reports name the sides."""
    if not config.enabled:
        return None
    from monai.transforms import Compose, RandAffined, RandScaleIntensityd, RandShiftIntensityd

    return Compose([
        RandAffined(keys=("image", "mask"), prob=config.affine_probability,
                    rotate_range=math.radians(config.rotate_degrees), scale_range=config.scale,
                    translate_range=config.translate * size, mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandScaleIntensityd(keys="image", factors=config.intensity, prob=config.intensity_probability),
        RandShiftIntensityd(keys="image", offsets=config.intensity, prob=config.intensity_probability),
    ])


@dataclass
class EpochDraws:
    """An epoch's random draws per training sample: report dropped (bank guidance instead), augmentation seed."""

    drop: torch.Tensor  # [N] bool
    augmentation_seeds: torch.Tensor  # [N] int64

    @classmethod
    def draw(cls, seed: int, epoch: int, pool_size: int, count: int, report_dropout: float) -> EpochDraws:
        generator = torch.Generator().manual_seed(SEED_STRIDE * seed + epoch)
        # The sampler's shuffle of the pool comes first in this stream (DistributedSampler draws it from the same
        # seed); drawing it here too keeps the draws those of the published runs.
        torch.randperm(pool_size, generator=generator)
        drop = torch.rand(count, generator=generator) < report_dropout
        return cls(drop, torch.randint(0, 2**31 - 1, (count,), generator=generator))


class TrainingSet(Dataset[dict[str, Any]]):
    """One epoch's training samples (``pool``: indices into ``data``), augmented with their own seeds."""

    def __init__(self, data: Preloaded, pool: torch.Tensor, draws: EpochDraws, transform: Optional[Any],
                 bank_ready: bool):
        self.data, self.pool, self.draws, self.transform, self.bank_ready = data, pool, draws, transform, bank_ready

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, position: int) -> dict[str, Any]:
        from monai.utils import convert_to_tensor

        i = int(self.pool[position])
        image, mask = self.data.images[i].float(), self.data.masks[i].float()
        if self.transform is not None:
            self.transform.set_random_state(seed=int(self.draws.augmentation_seeds[i]))
            out = self.transform({"image": image, "mask": mask})
            image = convert_to_tensor(out["image"], track_meta=False)
            mask = convert_to_tensor(out["mask"], track_meta=False)
        report = int(self.data.report_index[i])
        # Samples without a report, and those whose report was dropped this epoch (once there is a bank), are
        # guided by the prototype bank.
        use_bank = report < 0 or (bool(self.draws.drop[i]) and self.bank_ready)
        return {"image": image, "mask": (mask > 0.5).float(), "report_index": report, "use_bank": use_bank}


def epoch_loader(data: Preloaded, epoch: int, seed: int, batch_size: int, report_dropout: float,
                 transform: Optional[Any], bank_ready: bool, runtime: Runtime, workers: int = 0) -> DataLoader:
    """The epoch's batches for this process: before the bank exists only samples with reports train."""
    pool = torch.nonzero(data.report_index >= 0).flatten() if not bank_ready else torch.arange(len(data))
    draws = EpochDraws.draw(seed, epoch, len(pool), len(data), report_dropout)
    dataset = TrainingSet(data, pool, draws, transform, bank_ready)
    # Whole steps only, over all processes; a pool smaller than one step still trains one (smaller) step.
    whole_steps = len(pool) >= batch_size * runtime.world
    sampler: DistributedSampler[dict[str, Any]] = DistributedSampler(
        dataset, num_replicas=runtime.world, rank=runtime.rank, shuffle=True, seed=SEED_STRIDE * seed,
        drop_last=whole_steps)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=whole_steps, num_workers=workers,
                      pin_memory=runtime.device.type == "cuda")
