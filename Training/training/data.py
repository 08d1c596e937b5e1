"""Data and sampling: the splits, preloaded as network-ready tensors, the distinct reports encoded once, and one
``DataLoader`` per epoch over a ``DistributedSampler`` with the epoch's seeded draws (report dropout, augmentation).

Every random draw derives from (seed, epoch), never from a running random state, so a resumed run repeats the
uninterrupted one exactly, whatever the number of loader workers.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from languageguidedseg.config import PreprocessConfig
from languageguidedseg.data import Sample, apply_text_ratio, load_pair, load_split
from languageguidedseg.network import masked_mean
from languageguidedseg.preprocess import prepare_slices
from languageguidedseg.reports import ReportParser
from languageguidedseg.text import TextEncoder

from .config import DataConfig
from .edits import report_edits
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

    def extended(self, reports: list[str], encoder: TextEncoder, parser: Optional[ReportParser]) -> Reports:
        """These reports plus new ones, appended: the existing rows keep their numbers."""
        new = sorted(set(reports) - set(self.index))
        if not new:
            return self
        more = Reports.encode(new, encoder, parser)
        length = max(self.tokens.shape[1], more.tokens.shape[1])

        def padded(t: torch.Tensor) -> torch.Tensor:  # [R, L, D] or [R, L] to ``length`` tokens
            return F.pad(t, (0, 0, 0, length - t.shape[1]) if t.ndim == 3 else (0, length - t.shape[1]))

        index = {**self.index, **{r: len(self.index) + i for r, i in more.index.items()}}
        return Reports(index, torch.cat([padded(self.tokens), padded(more.tokens)]),
                       torch.cat([padded(self.mask), padded(more.mask)]), torch.cat([self.pooled, more.pooled]),
                       torch.cat([self.labels, more.labels]), self.dim)

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
    # Report edits: sample i has edit_count[i] of them from edit_start[i] on; their reports (rows in Reports once
    # the run has encoded them, edit_report_index) and targets.
    edit_reports: list[str] = field(default_factory=list)
    edit_masks: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 1, 1, 1, dtype=torch.bool))
    edit_start: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    edit_count: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    edit_report_index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    # Distillation: the teachers' averaged no-report probabilities [N, 1, S, S] float16 (training/distill.py).
    soft: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.samples)


def preload(samples: list[Sample], preprocess: PreprocessConfig, reports: Reports, desc: str,
            show: bool, edit_scheme: Optional[str] = None) -> Preloaded:
    """Network-ready images and masks; with ``edit_scheme`` (a report parser's name) the report edits too, whose
    reports the caller encodes (:meth:`Reports.extended`) and indexes (``edit_report_index``)."""
    from tqdm import tqdm

    size = preprocess.size
    images = torch.empty(len(samples), 3, size, size, dtype=torch.float16)
    masks = torch.empty(len(samples), 1, size, size, dtype=torch.bool)
    edit_reports, edit_masks, counts = [], [], []

    def resized(mask: np.ndarray) -> torch.Tensor:
        m = torch.from_numpy(mask.astype(np.float32))[None, None]
        return F.interpolate(m, size=(size, size), mode="nearest")[0] > 0.5

    for i, sample in enumerate(tqdm(samples, desc=desc, disable=not show, file=sys.stderr, leave=False)):
        image, mask = load_pair(sample)
        images[i] = prepare_slices(image[None], preprocess)[0].half()
        masks[i] = resized(mask)
        edits = report_edits(sample.report, mask, edit_scheme) if edit_scheme else []
        edit_reports += [edit.report for edit in edits]
        edit_masks += [resized(edit.mask) for edit in edits]
        counts.append(len(edits))
    count = torch.tensor(counts, dtype=torch.long)
    stacked = torch.stack(edit_masks) if edit_masks else torch.zeros(0, 1, size, size, dtype=torch.bool)
    return Preloaded(samples, images, masks, reports.rows(samples), edit_reports, stacked,
                     torch.cumsum(count, 0) - count, count)


@dataclass
class EpochDraws:
    """An epoch's random draws per training sample: report dropped (bank guidance instead), augmentation seed, and
    the report edit it trains on (-1: its own report and mask)."""

    drop: torch.Tensor  # [N] bool
    augmentation_seeds: torch.Tensor  # [N] int64
    edit: torch.Tensor  # [N] int64, an index into the Preloaded's edits or -1

    @classmethod
    def draw(cls, seed: int, epoch: int, pool_size: int, count: int, report_dropout: float,
             report_edits: float = 0.0, data: Optional[Preloaded] = None) -> EpochDraws:
        generator = torch.Generator().manual_seed(SEED_STRIDE * seed + epoch)
        # The sampler's shuffle of the pool comes first in this stream (DistributedSampler draws it from the same
        # seed); drawing it here too keeps the draws those of the published runs.
        torch.randperm(pool_size, generator=generator)
        drop = torch.rand(count, generator=generator) < report_dropout
        seeds = torch.randint(0, 2**31 - 1, (count,), generator=generator)
        edit = torch.full((count,), -1, dtype=torch.long)
        if report_edits > 0 and data is not None and len(data.edit_reports):
            # Drawn after the others, so that a run without edits keeps its draws.
            chosen = torch.rand(count, generator=generator) < report_edits
            pick = torch.randint(0, 2**31 - 1, (count,), generator=generator)
            candidate = data.edit_start + pick % data.edit_count.clamp_min(1)
            edit = torch.where(chosen & (data.edit_count > 0), candidate, edit)
        return cls(drop, seeds, edit)


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
        edit = int(self.draws.edit[i])
        item = {"image": self.data.images[i].float(),
                "mask": (self.data.edit_masks[edit] if edit >= 0 else self.data.masks[i]).float()}
        if self.data.soft is not None:
            item["soft"] = self.data.soft[i].float()
        if self.transform is not None:
            self.transform.set_random_state(seed=int(self.draws.augmentation_seeds[i]))
            item = {key: convert_to_tensor(value, track_meta=False) for key, value in self.transform(item).items()}
        report = int(self.data.report_index[i])
        # Samples without a report, and those whose report was dropped this epoch (once there is a bank), are
        # guided by the prototype bank.
        use_bank = report < 0 or (bool(self.draws.drop[i]) and self.bank_ready)
        # An edited sample is guided by the edit's report (never the bank); report_index stays the case's own, with
        # which the bank's contrastive term pairs the whole image.
        guide = int(self.data.edit_report_index[edit]) if edit >= 0 else report
        item["mask"] = (item["mask"] > 0.5).float()
        return {**item, "report_index": report, "guide_index": guide, "use_bank": use_bank and edit < 0}


def epoch_loader(data: Preloaded, epoch: int, seed: int, batch_size: int, report_dropout: float,
                 transform: Optional[Any], bank_ready: bool, runtime: Runtime, workers: int = 0,
                 report_edits: float = 0.0) -> DataLoader:
    """The epoch's batches for this process: before the bank exists only samples with reports train; a share
    ``report_edits`` of the samples with report edits trains on one of them."""
    pool = torch.nonzero(data.report_index >= 0).flatten() if not bank_ready else torch.arange(len(data))
    draws = EpochDraws.draw(seed, epoch, len(pool), len(data), report_dropout, report_edits, data)
    dataset = TrainingSet(data, pool, draws, transform, bank_ready)
    # Whole steps only, over all processes; a pool smaller than one step still trains one (smaller) step.
    whole_steps = len(pool) >= batch_size * runtime.world
    sampler: DistributedSampler[dict[str, Any]] = DistributedSampler(
        dataset, num_replicas=runtime.world, rank=runtime.rank, shuffle=True, seed=SEED_STRIDE * seed,
        drop_last=whole_steps)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=whole_steps, num_workers=workers,
                      pin_memory=runtime.device.type == "cuda")
