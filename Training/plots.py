"""Training figures: loss and Dice curves, and a grid of validation cases."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from languageguidedseg.fileio import atomic_path
from languageguidedseg.preprocess import PreprocessConfig


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict], path: Path) -> None:
    """Training loss terms and validation Dice (both modes) per epoch."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({k for row in history for k in row if k.startswith("train_")}):
        ax_loss.plot(epochs, [row.get(key, np.nan) for row in history], marker="o", label=key[6:])
    ax_loss.set(xlabel="epoch", ylabel="loss", title="training loss", yscale="log")
    ax_loss.legend(fontsize=8)
    for key, label in (("val_report_dice", "with report"), ("val_prototype_dice", "without report (bank)"),
                       ("val_steering", "steering probe")):
        if any(key in row for row in history):
            ax_dice.plot(epochs, [row.get(key, np.nan) for row in history], marker="o", label=label)
    ax_dice.set(xlabel="epoch", ylabel="micro Dice / steering", title="validation")
    ax_dice.legend(fontsize=8)
    ax_dice.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def plot_cases(images: torch.Tensor, masks: torch.Tensor, with_report: Optional[torch.Tensor],
               without_report: Optional[torch.Tensor], preprocess: PreprocessConfig, path: Path) -> None:
    """Rows of validation cases: image, ground truth, mask with report, mask without report."""
    plt = _pyplot()
    n = len(images)
    columns = [("image", None), ("ground truth", masks), ("with report", with_report),
               ("without report", without_report)]
    fig, axes = plt.subplots(n, 4, figsize=(10, 2.5 * n), squeeze=False)
    mean = torch.tensor(preprocess.mean).view(3, 1, 1)
    std = torch.tensor(preprocess.std).view(3, 1, 1)
    for i in range(n):
        picture = (images[i].float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        for j, (title, overlay) in enumerate(columns):
            ax = axes[i, j]
            ax.imshow(picture)
            if overlay is not None and i < len(overlay):
                m = overlay[i].squeeze().numpy().astype(float)
                ax.imshow(np.ma.masked_where(m < 0.5, m), cmap="autumn", alpha=0.5, vmin=0, vmax=1)
            ax.set_axis_off()
            if i == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
