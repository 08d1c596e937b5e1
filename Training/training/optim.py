"""The optimiser (AdamW, a slower learning rate for the encoder) and its warm-up + cosine schedule."""

from __future__ import annotations

import math

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
    """Linear warm-up over ``warmup_steps`` (at most a tenth of the run), then cosine decay to 0; step per batch."""
    total = max(1, steps_per_epoch * config.epochs)
    warmup = min(config.warmup_steps, total // 10 + 1)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
