"""The optimiser (AdamW, a slower learning rate for the encoder) and its warm-up + cosine schedule."""

from __future__ import annotations

import torch

from languageguidedseg.network import LanguageGuidedSegNet

from .config import OptimisationConfig


def build_optimizer(network: LanguageGuidedSegNet, config: OptimisationConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, after freezing the encoder's early blocks.

    The stem and first blocks keep their ImageNet weights: generic edges, and the costliest part of the backward
    pass on a CPU.
    """
    if config.freeze_encoder_blocks:
        network.encoder.freeze_early_blocks(config.freeze_encoder_blocks)
    encoder_ids = {id(p) for p in network.encoder.parameters()}
    encoder = [p for p in network.encoder.parameters() if p.requires_grad]
    other = [p for p in network.parameters() if id(p) not in encoder_ids and p.requires_grad]
    return torch.optim.AdamW([{"params": encoder, "lr": config.encoder_lr}, {"params": other, "lr": config.lr}],
                             weight_decay=config.weight_decay)


def replace_parameter(optimizer: torch.optim.Optimizer, old: torch.nn.Parameter, new: torch.nn.Parameter) -> None:
    """Put ``new`` where ``old`` was in the optimiser's groups (e.g. the bank's text values once it is filled)."""
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
                optimizer.state.pop(old, None)


def warmup_cosine(optimizer: torch.optim.Optimizer, config: OptimisationConfig,
                  steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """MONAI's linear warm-up over ``warmup_steps`` (at most a tenth of the run), then cosine decay to 0 at the
    run's last step; stepped once per batch. Warm-up starts at 1/warmup of the learning rate, not at 0, so that
    no step is spent without learning."""
    from monai.optimizers import WarmupCosineSchedule

    total = max(1, steps_per_epoch * config.epochs)
    warmup = min(config.warmup_steps, total // 10 + 1)
    return WarmupCosineSchedule(optimizer, warmup_steps=warmup, t_total=total, warmup_multiplier=1 / warmup)
