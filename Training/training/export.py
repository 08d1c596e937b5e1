"""What a run writes: the model package (best model so far), ``log.csv``, the curves and a grid of validation cases."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from languageguidedseg.config import ModelConfig, PreprocessConfig
from languageguidedseg.fileio import atomic_path
from languageguidedseg.network import LanguageGuidedSegNet
from languageguidedseg.package import save_package
from languageguidedseg.preprocess import scale_intensity
from languageguidedseg.text import encoder_version

from .config import TrainConfig
from .data import Preloaded
from .runtime import Runtime


def model_config(config: TrainConfig) -> ModelConfig:
    """What the run's model package says about the model, before training adds its bank and provenance."""
    return ModelConfig(
        name=config.name, network=config.network, card=config.package.card(), text_encoder=config.text_encoder,
        text_encoder_version=encoder_version(config.text_encoder), preprocessing=config.preprocessing,
        report_sides=config.data.report_sides(), report_parser=config.data.report_parser,
    )


def save_model(output: Path, network: LanguageGuidedSegNet, config: TrainConfig, *, train: Preloaded, val_images: int,
               prototype_reports: list[str], metrics: dict[str, Any], epoch: int, command: str,
               runtime: Runtime) -> None:
    """The model package: weights, the bank's representative reports, provenance and validation metrics."""
    model = dataclasses.replace(
        model_config(config),
        prototype_reports=list(prototype_reports),
        training={"command": command, "config": config.to_dict(), "epoch": epoch + 1, "data": config.data.path,
                  "data_citation": config.package.data_citation, "train_images": len(train),
                  "train_reports": int((train.report_index >= 0).sum()), "val_images": val_images,
                  "world_size": runtime.world, "device": runtime.device.type, "torch": torch.__version__},
        metrics={k: round(v, 4) for k, v in metrics.items() if k.startswith("val_")},
    )
    save_package(output, network, model)


def write_log(history: list[dict[str, Any]], run_dir: Path) -> None:
    """``log.csv`` (one row per epoch) and ``curves.png``."""
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k))
    with atomic_path(run_dir / "log.csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)
    plot_curves(history, run_dir / "curves.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Training loss terms, validation Dice (both modes) and the probes (where measured) per epoch."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({k for row in history for k in row if k.startswith("train_")}):
        ax_loss.plot(epochs, [row.get(key, np.nan) for row in history], marker="o", label=key[6:])
    ax_loss.set(xlabel="epoch", ylabel="loss", title="training loss", yscale="log")
    ax_loss.legend(fontsize=8)
    for key, label in (("val_report_dice", "with report"), ("val_prototype_dice", "without report (bank)"),
                       ("val_steering", "steering probe"), ("val_zone_steering", "zone steering probe"),
                       ("val_laterality", "laterality (balanced accuracy)")):
        if any(key in row for row in history):
            ax_dice.plot(epochs, [row.get(key, np.nan) for row in history], marker="o", label=label)
    ax_dice.set(xlabel="epoch", ylabel="micro Dice / probe", title="validation")
    ax_dice.legend(fontsize=8)
    ax_dice.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def plot_cases(images: list[np.ndarray], masks: list[np.ndarray], with_report: Optional[list[np.ndarray]],
               without_report: Optional[list[np.ndarray]], preprocess: PreprocessConfig, path: Path) -> None:
    """Rows of validation cases: image, ground truth, mask with report, mask without report (each on the image's
    own grid)."""
    plt = _pyplot()
    n = len(images)
    columns = [("image", None), ("ground truth", masks), ("with report", with_report),
               ("without report", without_report)]
    fig, axes = plt.subplots(max(n, 1), 4, figsize=(10, 2.5 * max(n, 1)), squeeze=False)
    for i in range(n):
        picture = scale_intensity(images[i][None], preprocess)[0]  # as the network sees it, before resizing
        for j, (title, overlay) in enumerate(columns):
            ax = axes[i, j]
            ax.imshow(picture, cmap="gray", vmin=0, vmax=1)
            if overlay is not None and i < len(overlay):
                m = np.asarray(overlay[i], dtype=float)
                ax.imshow(np.ma.masked_where(m < 0.5, m), cmap="autumn", alpha=0.5, vmin=0, vmax=1)
            ax.set_axis_off()
            if i == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
