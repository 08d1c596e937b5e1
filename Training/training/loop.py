"""The training loop: one optimiser step per batch, validation in both modes every epoch, the best model kept,
and an atomic checkpoint from which ``--resume`` continues exactly where the run stopped."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from languageguidedseg.data import Sample, load_pair
from languageguidedseg.errors import LgsegError
from languageguidedseg.evaluation import evaluate
from languageguidedseg.fileio import atomic_path
from languageguidedseg.inference import Segmenter
from languageguidedseg.network import LanguageGuidedSegNet
from languageguidedseg.package import CONFIG_FILE, load_package
from languageguidedseg.probes import laterality_probe, steering_probe, zone_steering_probe
from languageguidedseg.reports import get_parser
from languageguidedseg.text import TextEncoder

from . import export
from .augment import augmenter
from .bank import BankMembers, align_query, fill_bank, join_bank, refresh_bank_keys
from .config import NOT_SHAPING_RESULTS, TrainConfig, flatten, repository_path
from .data import Reports, epoch_loader, load_samples, preload
from .distill import soft_targets
from .domain import describe_package
from .losses import SegmentationLoss, pseudo_label_positives
from .optim import build_optimizer, replace_parameter, warmup_cosine
from .runtime import Runtime

CASES = 6  # validation cases in val_cases.png


class TrainStep(torch.nn.Module):
    """Network forward and loss in one module, so that DDP sees every parameter the loss heads use."""

    def __init__(self, network: LanguageGuidedSegNet, criterion: SegmentationLoss):
        super().__init__()
        self.network, self.criterion = network, criterion

    def forward(self, images, tokens, token_mask, use_bank, masks, text_embedding, positives, soft=None):
        out = self.network(images, tokens, token_mask, use_bank=use_bank, return_features=True)
        # The teachers' probabilities are a target of the no-report (bank-guided) steps only.
        return self.criterion(self.network, out, masks, text_embedding, positives, soft,
                              use_bank if soft is not None else None)


class Trainer:
    """A run: ``fit`` loads the data, trains, validates and writes the package, logs and checkpoints."""

    def __init__(self, config: TrainConfig, output: Path, command: str, runtime: Runtime):
        self.config, self.output, self.command, self.runtime = config, output, command, runtime
        self.run_dir = output.parent / f"{output.name}-training"
        self.bank = BankMembers()
        self.val_cases: list[Sample] = []

    # -- data and model ------------------------------------------------------------------------------------------
    def load_data(self) -> None:
        from tqdm import tqdm

        c, show = self.config, self.runtime.show_progress
        c.data.report_sides()  # a data set that does not say what its left and right mean stops the run here
        train, val = load_samples(c.data, c.seed)
        self.text_encoder = TextEncoder(c.text_encoder)
        parser = get_parser(c.data.report_parser)
        self.reports = Reports.encode([s.report for s in train + val if s.report], self.text_encoder, parser)
        edit_scheme = c.data.report_parser if c.data.report_edits > 0 else None
        self.train = preload(train, c.preprocessing, self.reports, "loading train", show, edit_scheme)
        if self.train.edit_reports:
            self.reports = self.reports.extended(self.train.edit_reports, self.text_encoder, parser)
            self.train.edit_report_index = torch.tensor([self.reports.index[r] for r in self.train.edit_reports])
        if c.teachers and c.losses.distillation:
            self.train.soft = soft_targets(train, c.teachers, c.preprocessing.size, self.run_dir, self.runtime)
        # The steering and laterality probes run on data sets whose reports name the image's sides.
        self.probes = c.data.report_sides() == "image"
        # Validation reads the images as lgseg evaluate does (scored on their own grid), kept in memory.
        self.val = val
        self.val_pairs = {s: load_pair(s) for s in tqdm(val, desc="loading val", disable=not show, file=sys.stderr,
                                                          leave=False)}
        self.runtime.log(f"{len(train)} training images ({sum(s.report is not None for s in train)} with reports, "
                         f"{int((self.train.edit_count > 0).sum())} with report edits), "
                         f"{len(val)} validation images, {len(self.reports.index)} distinct reports")

    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.train) / (self.config.optimisation.batch_size * self.runtime.world)))

    def build(self, bank_size: int, bank_tokens: int = 0) -> None:
        c = self.config
        network_config = dataclasses.replace(c.network, text_dim=self.reports.dim, bank_size=bank_size,
                                             bank_tokens=bank_tokens)
        torch.manual_seed(c.seed)
        self.network = LanguageGuidedSegNet(network_config, pretrained_encoder=True).to(self.runtime.device)
        self.network = self.network.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.network, c.optimisation)
        self.scheduler = warmup_cosine(self.optimizer, c.optimisation, self.steps_per_epoch())
        self.criterion = SegmentationLoss(c.losses)
        self._wrap()

    def init_from(self, folder: str) -> None:
        """Start from a model package's weights and prototype bank (``init_from``: fine-tuning)."""
        package = load_package(repository_path(folder))
        if package.config.text_encoder != self.config.text_encoder:
            raise LgsegError(f"init_from model '{folder}' uses the text encoder '{package.config.text_encoder}', "
                             f"this config '{self.config.text_encoder}'; use the same text_encoder")
        self.build(package.config.network.bank_size, package.config.network.bank_tokens)
        if self.network.config != package.config.network:
            raise LgsegError(f"init_from model '{folder}' has another network than this config's network: section; "
                             "copy its network settings into the config")
        self.network.load_state_dict(package.state_dict)
        self.bank = join_bank(self.network, self.train, package.config.prototype_reports, self.runtime)
        self.runtime.log(f"initialised from {folder} (prototype bank: {self.network.bank.size} prototypes)")

    def _wrap(self) -> None:
        self.model: torch.nn.Module = TrainStep(self.network, self.criterion)
        if self.runtime.distributed:
            from torch.nn.parallel import DistributedDataParallel

            device = self.runtime.device
            # Some heads are idle in some steps (no bank during the warm-up, terms switched off).
            self.model = DistributedDataParallel(self.model, find_unused_parameters=True,
                                                 device_ids=[device.index] if device.type == "cuda" else None)

    def build_bank(self) -> None:
        c = self.config
        if c.bank.query_epochs:
            before, after = align_query(self.network, self.train, self.reports, c.bank.query_epochs,
                                        c.optimisation.lr, c.losses.bank_temperature, c.seed, self.runtime)
            self.runtime.log(f"bank query aligned in {c.bank.query_epochs} passes: image-to-report retrieval "
                             f"accuracy on the training reports {before:.3f} -> {after:.3f}")
        old = self.network.bank.text_values
        self.bank = fill_bank(self.network, self.train, self.reports, c.bank.clusters_per_class, c.seed,
                              self.runtime, c.bank.tokens)
        replace_parameter(self.optimizer, old, self.network.bank.text_values)
        self._wrap()
        tokens = f", {self.network.bank.tokens} tokens each" if self.network.bank.tokens else ""
        self.runtime.log(f"prototype bank: {self.network.bank.size} prototypes{tokens}")

    # -- one epoch -----------------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        from tqdm import tqdm

        c, runtime = self.config, self.runtime
        bank_ready = epoch >= c.bank.warmup_epochs
        transform = augmenter(c.augmentation, c.preprocessing, soft=self.train.soft is not None)
        workers = runtime.loader_workers(c.data.workers, augmenting=transform is not None)
        loader = epoch_loader(self.train, epoch, c.seed, c.optimisation.batch_size, c.optimisation.report_dropout,
                              transform, bank_ready, runtime, workers, c.data.report_edits)
        self.network.train()
        totals: dict[str, float] = {}
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{c.optimisation.epochs}{'' if bank_ready else ' (bank warm-up)'}",
                   disable=not runtime.show_progress, file=sys.stderr, leave=False)
        steps = 0
        for batch in bar:
            loss, terms = self.train_step(batch)
            terms["loss"] = loss
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v
            steps += 1
            bar.set_postfix(loss=f"{totals['loss'] / steps:.3f}")
        bar.close()
        return {f"train_{k}": v / max(1, steps) for k, v in totals.items()}

    def train_step(self, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
        """One optimiser step on a batch from :func:`epoch_loader`; returns the loss and each term."""
        device = self.runtime.device
        images = batch["image"].to(device, memory_format=torch.channels_last)
        masks = batch["mask"].to(device)
        report_index = batch["report_index"]
        tokens, token_mask = self.reports.guidance(batch["guide_index"])
        has_report = report_index >= 0
        positives = pseudo_label_positives(self.reports.labels[report_index.clamp_min(0)], has_report,
                                           report_index[:, None] == report_index[None, :])
        text_embedding = self.reports.pooled[report_index.clamp_min(0)]
        soft = batch["soft"].to(device) if "soft" in batch else None
        with self.runtime.autocast():
            loss, terms = self.model(images, tokens.to(device), token_mask.to(device), batch["use_bank"].to(device),
                                     masks, text_embedding.to(device), positives.to(device), soft)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.config.optimisation.gradient_clip)
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach()), terms

    def validate(self, keep: int = 0) -> tuple[dict[str, float], dict[str, list[np.ndarray]]]:
        """Micro Dice/IoU on the validation split with reports and without (prototype bank), with the engine's
        evaluation (the same as ``lgseg evaluate``); the first ``keep`` predictions of each mode for the figure."""
        config = dataclasses.replace(export.model_config(self.config), network=self.network.config,
                                     prototype_reports=self.bank.reports)
        segmenter = Segmenter(self.network, config, self.runtime.device, text_encoder=self.text_encoder, batch_size=32)
        # Before the bank exists, only the images with a report can be segmented.
        has_bank = self.network.bank.size > 0
        samples = self.val if has_bank else [s for s in self.val if s.report]
        results: dict[str, float] = {}
        kept: dict[str, list[np.ndarray]] = {}
        self.val_cases = samples[:keep]  # the images of the kept predictions
        self.network.eval()
        try:
            for mode, guidance in (("report", "given"), ("prototype", "none")):
                if not samples or (guidance == "none" and not has_bank):
                    continue
                evaluation = evaluate(segmenter, samples, guidance, keep=keep, load=self.val_pairs.__getitem__)
                s = evaluation.scores
                results.update({f"val_{mode}_dice": s.dice, f"val_{mode}_iou": s.iou,
                                f"val_{mode}_mean_dice": s.mean_dice, f"val_{mode}_mean_iou": s.mean_iou})
                kept[mode] = evaluation.predictions
            if self.probes and has_bank:
                results.update(self.run_probes(segmenter))
        finally:
            self.network.train()
        return results, kept

    def run_probes(self, segmenter: Segmenter) -> dict[str, float]:
        """The steering probes (sides, zones) and the approximated report's laterality on the val split (probes.py)."""
        results = {}
        steering = steering_probe(lambda images, reports: segmenter.predict_slices(images, reports)[0], self.val,
                                  segmenter.config.card.threshold, segmenter.batch_size)
        if steering.n:
            results["val_steering"] = steering.steering
        zones = zone_steering_probe(lambda images, reports: segmenter.predict_slices(images, reports)[0], self.val,
                                    segmenter.config.card.threshold, segmenter.batch_size)
        if zones.n:
            results["val_zone_steering"] = zones.zone_steering
        laterality = laterality_probe(segmenter.approximated_reports, self.val, segmenter.batch_size)
        if laterality.n:
            results["val_laterality"] = laterality.balanced_accuracy
        return results

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def check_fresh_output(self) -> None:
        """A new run never overwrites a model package or an interrupted run's checkpoint without being told."""
        if (self.output / CONFIG_FILE).exists():
            raise LgsegError(f"'{self.output}' already holds a model package; choose another --output, or remove it "
                             "first")
        if self.checkpoint_path().exists():
            raise LgsegError(f"'{self.run_dir}' holds the checkpoint of an earlier run; continue it with --resume, "
                             "or remove that folder first")

    def save_checkpoint(self, epoch: int, best: float, history: list[dict[str, Any]]) -> None:
        if not self.runtime.main:
            return
        state = {"epoch": epoch, "best": best, "history": history, "bank_size": self.network.bank.size,
                 "bank_tokens": self.network.bank.tokens,
                 "network": self.network.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "members": self.bank.members,
                 "representatives": self.bank.representatives, "prototype_reports": self.bank.reports,
                 "config": self.config.to_dict()}
        with atomic_path(self.checkpoint_path()) as tmp:
            torch.save(state, tmp)

    def load_checkpoint(self) -> tuple[int, float, list[dict[str, Any]]]:
        path = self.checkpoint_path()
        if not path.is_file():
            raise LgsegError(f"no checkpoint to resume at {path}; start without --resume")
        # weights_only: the checkpoint is read as tensors and plain containers, never as arbitrary objects.
        state = torch.load(path, map_location="cpu", weights_only=True)
        # Read through TrainConfig: a key added since the checkpoint was written counts at its default, which keeps
        # the behaviour from before the key existed.
        before, now = flatten(TrainConfig.from_dict(state["config"]).to_dict()), flatten(self.config.to_dict())
        changed = sorted(k for k in set(before) | set(now)
                         if k not in NOT_SHAPING_RESULTS and before.get(k) != now.get(k))
        if changed:
            raise LgsegError(f"--resume needs the same settings as the interrupted run (changed: {', '.join(changed)})")
        self.build(state["bank_size"], state.get("bank_tokens", 0))
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.bank = BankMembers(state["members"], state["representatives"], state["prototype_reports"])
        return state["epoch"] + 1, state["best"], state["history"]

    # -- the run -------------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False, stop_after: Optional[int] = None) -> dict[str, Any]:
        """Train (or continue) for the configured epochs, or ``stop_after`` epochs of this call; the last row."""
        runtime, c = self.runtime, self.config
        if not resume:
            self.check_fresh_output()
        self.load_data()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            start, best, history = self.load_checkpoint()
            runtime.log(f"resuming after epoch {start} of {c.optimisation.epochs}")
        else:
            if c.init_from:
                self.init_from(c.init_from)
            else:
                self.build(bank_size=0)
            start, best, history = 0, -1.0, []
        epochs = c.optimisation.epochs
        end = epochs if stop_after is None else min(epochs, start + stop_after)
        for epoch in range(start, end):
            started = time.perf_counter()
            if epoch == c.bank.warmup_epochs and self.network.bank.size == 0:
                self.build_bank()
            row: dict[str, Any] = {"epoch": epoch + 1}
            row.update(self.train_epoch(epoch))
            if epoch == epochs - 1 and self.network.bank.size == 0:
                self.build_bank()  # a run shorter than the warm-up still ships a bank
            refresh_bank_keys(self.network, self.train, self.bank, runtime)
            metrics, kept = self.validate(keep=CASES) if runtime.main else ({}, {})
            row.update(metrics)
            row["lr"] = self.scheduler.get_last_lr()[-1]
            row["seconds"] = round(time.perf_counter() - started, 1)
            history.append(row)
            if runtime.main:
                best = self._report_epoch(epoch, row, metrics, kept, history, best)
            self.save_checkpoint(epoch, best, history)
            runtime.barrier()
        runtime.leave()
        if runtime.main and end == epochs and (self.output / CONFIG_FILE).is_file():
            # The finished model's description of its images, for the applicability check (training.domain).
            describe_package(self.output, c.data, c.package.domain_images, runtime.device.type)
        return history[-1] if history else {}

    def interpolate(self, tuned: Path, weight: float) -> dict[str, Any]:
        """WiSE-FT (Wortsman et al., CVPR 2022): write the package whose weights are ``(1 - weight)`` times those
        of the config's ``init_from`` plus ``weight`` times those of ``tuned``, a fine-tune of it; validated, described
        and recorded as a run's package. A fine-tune's new skill (``weight`` of it) keeps more of what the start
        did well than the fine-tune alone. Returns the validation metrics."""
        c = self.config
        if not c.init_from:
            raise LgsegError("--interpolate needs the config's init_from: the package that the fine-tune started from")
        if not 0.0 < weight < 1.0:
            raise LgsegError(f"--interpolate-weight must lie between 0 and 1 (the fine-tune's share), not {weight}")
        self.check_fresh_output()
        package, start_package = load_package(tuned), load_package(repository_path(c.init_from))
        if (package.config.network != start_package.config.network
                or package.config.prototype_reports != start_package.config.prototype_reports):
            raise LgsegError(f"'{tuned}' has another network or prototype bank than init_from '{c.init_from}'; give "
                             "the package that a fine-tune from init_from wrote")
        self.load_data()
        self.init_from(c.init_from)
        start = self.network.state_dict()
        self.network.load_state_dict({key: torch.lerp(start[key].float(), value.to(start[key].device).float(),
                                                      weight).to(start[key].dtype)
                                      if value.is_floating_point() else value
                                      for key, value in package.state_dict.items()})
        refresh_bank_keys(self.network, self.train, self.bank, self.runtime)  # with the interpolated encoder
        metrics, _ = self.validate()
        epoch = int(package.config.training.get("epoch", c.optimisation.epochs)) - 1
        export.save_model(self.output, self.network, c, train=self.train, val_images=len(self.val),
                          prototype_reports=self.bank.reports, metrics=metrics, epoch=epoch, command=self.command,
                          runtime=self.runtime)
        describe_package(self.output, c.data, c.package.domain_images, self.runtime.device.type)
        self.runtime.log("interpolated: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "mean" not in k))
        return metrics

    def _report_epoch(self, epoch: int, row: dict[str, Any], metrics: dict[str, float],
                      kept: dict[str, list[np.ndarray]], history: list[dict[str, Any]], best: float) -> float:
        """Keep the best model (by the mean micro Dice of both modes), write the log and figures; the new best."""
        dice = [v for k, v in metrics.items() if k.endswith("_dice") and "mean" not in k]
        score = float(np.mean(dice)) if dice else -1.0
        if score > best and self.network.bank.size:
            best = score
            export.save_model(self.output, self.network, self.config, train=self.train,
                              val_images=len(self.val), prototype_reports=self.bank.reports, metrics=row,
                              epoch=epoch, command=self.command, runtime=self.runtime)
        export.write_log(history, self.run_dir)
        cases = [self.val_pairs[s] for s in self.val_cases]
        export.plot_cases([image for image, _ in cases], [mask for _, mask in cases], kept.get("report"),
                          kept.get("prototype"), self.config.preprocessing, self.run_dir / "val_cases.png")
        self.runtime.log(f"epoch {epoch + 1}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in row.items() if k.startswith("val_") and "mean" not in k)
            + f" ({row['seconds']:.0f} s)")
        return best
