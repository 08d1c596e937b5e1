"""Training losses: Dice + BCE on logits, TeViA text-to-vision alignment, TMCA multi-level target-informed
contrastive alignment, ProLearn's image-text InfoNCE for the prototype bank's embedding, and the distillation of an
ensemble's no-report probabilities."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from monai.losses import DiceCELoss
from torch import nn
from torch.nn import functional as F

from languageguidedseg.config import Config
from languageguidedseg.network import LanguageGuidedSegNet, masked_mean


@dataclass
class LossWeights(Config):
    """Weights of the loss terms; 0 switches a term off (for ablations)."""

    segmentation: float = 1.0
    tevia_alignment: float = 0.1
    tmca_contrastive: float = 0.1
    bank_contrastive: float = 0.1
    distillation: float = 1.0  # soft targets of the teachers on the no-report steps (only with ``teachers:``)
    tmca_temperature: float = 0.07
    bank_temperature: float = 0.1


def mask_pool(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of ``features [B, C, h, w]`` over the target region of ``mask [B, 1, H, W]`` (resized): ``[B, C]``."""
    weights = F.interpolate(mask.float(), size=features.shape[-2:], mode="area")
    return (features.float() * weights).sum((2, 3)) / weights.sum((2, 3)).clamp_min(1e-6)


def info_nce(a: torch.Tensor, b: torch.Tensor, positives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between ``a [N, D]`` and ``b [N, D]``; ``positives [N, N]`` marks matching pairs.

    Several positives per row (same report, same pseudo-label) share the target probability, in both directions.
    """
    logits = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).t() / temperature
    return 0.5 * (F.cross_entropy(logits, _shared(positives)) + F.cross_entropy(logits.t(), _shared(positives.t())))


def _shared(positives: torch.Tensor) -> torch.Tensor:
    """Each row's positives share its target probability equally."""
    return positives.float() / positives.float().sum(1, keepdim=True).clamp_min(1.0)


class SegmentationLoss(nn.Module):
    """The full training objective; returns the total and each term (for logging)."""

    def __init__(self, weights: LossWeights):
        super().__init__()
        self.weights = weights
        # MONAI's DiceCE with sigmoid on raw logits: BCE-with-logits inside, so no double sigmoid.
        self.dice_ce = DiceCELoss(sigmoid=True, batch=True)

    def forward(self, network: LanguageGuidedSegNet, out: dict[str, Any], masks: torch.Tensor,
                text_embedding: Optional[torch.Tensor] = None, text_positives: Optional[torch.Tensor] = None,
                soft: Optional[torch.Tensor] = None,
                distill: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, float]]:
        """``masks [B, 1, H, W]``; ``text_embedding [B, D]`` pooled report embeddings of samples with a report
        (rows of samples without one are ignored through ``text_positives``'s diagonal); ``soft [B, 1, H, W]`` the
        teachers' probabilities, a second target of the rows that ``distill [B]`` marks (the no-report steps)."""
        w = self.weights
        terms: dict[str, torch.Tensor] = {"segmentation": self.dice_ce(out["logits"].float(), masks)}
        has_target = masks.flatten(1).amax(1) > 0
        final = out["levels"][-1]
        foreground = mask_pool(final, masks)
        if w.tevia_alignment and has_target.any():
            # TeViA: projected text per stage should point at the (detached) foreground representation.
            target = foreground[has_target].detach()
            losses = [1 - F.cosine_similarity(head(text[has_target].float()), target, dim=-1).mean()
                      for head, text in zip(network.align_heads, out["stage_text"])]
            terms["tevia_alignment"] = torch.stack(losses).mean()
        if network.training and has_target.any():
            network.update_visual_prototype(foreground[has_target].detach())
        guide = masked_mean(out["tokens"].float(), out["token_mask"])
        if w.tmca_contrastive and int(has_target.sum()) > 1:
            # TMCA: target-informed (mask-pooled) image-text contrast at every decoder level.
            same = _same_rows(guide[has_target])
            losses = [info_nce(vis(mask_pool(level, masks)[has_target]), txt(guide[has_target]), same,
                               w.tmca_temperature)
                      for level, vis, txt in zip(out["levels"], network.contrast_visual, network.contrast_text)]
            terms["tmca_contrastive"] = torch.stack(losses).mean()
        if w.bank_contrastive and text_embedding is not None and text_positives is not None:
            keep = text_positives.diagonal()
            if int(keep.sum()) > 1:
                image_embedding = network.image_embedding(out["image_features"])
                terms["bank_contrastive"] = info_nce(image_embedding[keep], text_embedding[keep],
                                                     text_positives[keep][:, keep], w.bank_temperature)
        if w.distillation and soft is not None and distill is not None and bool(distill.any()):
            # The same Dice + BCE against the ensemble's probabilities: both take soft targets.
            terms["distillation"] = self.dice_ce(out["logits"][distill].float(), soft[distill].float())
        total = sum(getattr(w, name) * value for name, value in terms.items())
        return total, {name: float(value.detach()) for name, value in terms.items()}


def _same_rows(vectors: torch.Tensor) -> torch.Tensor:
    """Pairs with (numerically) identical guidance count as positives: repeated reports are not negatives."""
    v = F.normalize(vectors.detach(), dim=-1)
    return (v @ v.t()) > 0.999


def pseudo_label_positives(labels: torch.Tensor, has_report: torch.Tensor, reports_equal: torch.Tensor) -> torch.Tensor:
    """ProLearn's positives for the bank warm-up: same pseudo-label vector (or same report); rows without a
    report have no positives (not even themselves)."""
    if labels.numel():
        same = (labels[:, None, :] == labels[None, :, :]).all(-1) & (labels.sum(-1) > 0)[:, None]
    else:
        same = torch.zeros_like(reports_equal)
    pos = (same | reports_equal) & has_report[:, None] & has_report[None, :]
    return pos | torch.diag(has_report)
