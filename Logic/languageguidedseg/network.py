"""The text-guided segmentation network.

A GuideDecoder-style decoder on a multi-scale image encoder. Per attention stage: self-attention among visual
tokens (TeViA: queries and keys re-weighted by the momentum visual prototype, ``q = q * g + q``), cross-attention
from visual tokens to per-stage projected guidance tokens (TeViA's text projections), and TMCA's language-guided
target enhancement (text-conditioned channel modulation); then an up-sampling block with the skip connection
(MONAI's ``UnetResBlock``, see ``blocks.py``). The remaining skips are merged by plain up-sampling blocks down to
the decoder's finest level (stride 4 by default, as in GuideDecoder), where a head gives one logit channel,
up-sampled bilinearly to the input resolution.

The guidance tokens come either from a report (text encoder tokens) or from the prototype bank (ProLearn); both
are ``[B, L, text_dim]`` with a mask, so one forward serves both. Bank guidance is refined before each attention
stage by ProLearn's guided approximation (``GuidedApproximation``: the retrieved prototype tokens attend to the
stage's visual features and to its skip features); report guidance goes to the stages as it is.
``forward(..., return_features=True)`` also returns what the training losses need: the decoder features per level
(for TMCA's multi-level contrastive alignment), the pooled projected text per stage and the final features (for
TeViA's alignment).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .blocks import UnetOutBlock, UnetResBlock
from .config import NetworkConfig
from .encoders import build_encoder
from .prototypes import PrototypeBank


def _sincos_2d(height: int, width: int, dim: int, device: torch.device) -> torch.Tensor:
    """Fixed 2D sine-cosine position encoding ``[H * W, dim]`` (GuideDecoder adds one to the visual tokens)."""
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter, 1)))
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                            torch.arange(width, device=device, dtype=torch.float32), indexing="ij")
    ys, xs = ys.reshape(-1, 1) * omega, xs.reshape(-1, 1) * omega
    enc = torch.cat([ys.sin(), ys.cos(), xs.sin(), xs.cos()], dim=1)
    return F.pad(enc, (0, dim - enc.shape[1]))


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens: ``[B, L, D]``, ``[B, L]`` -> ``[B, D]``."""
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class GuideStage(nn.Module):
    """Self-attention (prototype re-weighted), cross-attention to guidance tokens, text channel modulation."""

    position: torch.Tensor

    def __init__(self, dim: int, text_dim: int, visual_dim: int, heads: int, grid: int):
        super().__init__()
        self.heads = heads
        self.norm_self = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj_self = nn.Linear(dim, dim)
        # TeViA: the momentum visual prototype gates the channels of queries and keys; zero init = identity.
        self.prototype_gate = nn.Linear(visual_dim, dim)
        nn.init.zeros_(self.prototype_gate.weight)
        nn.init.zeros_(self.prototype_gate.bias)
        # TeViA: per-stage text projection (supervised by the alignment loss during training).
        self.text_proj = nn.Sequential(nn.Linear(text_dim, dim), nn.LayerNorm(dim))
        self.norm_cross = nn.LayerNorm(dim)
        self.q_cross = nn.Linear(dim, dim)
        self.kv_cross = nn.Linear(dim, 2 * dim)
        self.proj_cross = nn.Linear(dim, dim)
        # TMCA: language-guided target enhancement, text-conditioned channel scale and shift; zero init = identity.
        self.modulation = nn.Linear(dim, 2 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)
        self.register_buffer("position", _sincos_2d(grid, grid, dim, torch.device("cpu")), persistent=False)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                prototype: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        pos = self.position if self.position.shape[0] == h * w else _sincos_2d(h, w, c, x.device)
        tokens = x.flatten(2).transpose(1, 2) + pos.to(x.dtype)

        q, k, v = self.qkv(self.norm_self(tokens)).chunk(3, dim=-1)
        gate = torch.tanh(self.prototype_gate(prototype)).to(q.dtype)
        q, k = q * gate + q, k * gate + k
        attn = F.scaled_dot_product_attention(self._split(q), self._split(k), self._split(v))
        tokens = tokens + self.proj_self(attn.transpose(1, 2).reshape(b, h * w, c))

        guide = self.text_proj(text)
        q = self._split(self.q_cross(self.norm_cross(tokens)))
        k, v = (self._split(t) for t in self.kv_cross(guide).chunk(2, dim=-1))
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=text_mask[:, None, None, :])
        tokens = tokens + self.proj_cross(attn.transpose(1, 2).reshape(b, h * w, c))

        pooled_text = masked_mean(guide, text_mask)
        scale, shift = self.modulation(pooled_text).chunk(2, dim=-1)
        tokens = tokens * (1 + torch.tanh(scale)).unsqueeze(1) + shift.unsqueeze(1)
        return tokens.transpose(1, 2).reshape(b, c, h, w), pooled_text


class _ApproximationBranch(nn.Module):
    """Self-attention among the prototype tokens, then cross-attention from them to one map of visual tokens, at
    ``width`` channels; returns the change to the tokens."""

    position: torch.Tensor

    def __init__(self, text_dim: int, context_dim: int, width: int, heads: int, grid: int):
        super().__init__()
        self.heads, self.width = heads, width
        self.norm_self = nn.LayerNorm(text_dim)
        self.qkv = nn.Linear(text_dim, 3 * width)
        self.proj_self = nn.Linear(width, text_dim)
        self.norm_cross = nn.LayerNorm(text_dim)
        self.q_cross = nn.Linear(text_dim, width)
        self.kv_cross = nn.Linear(context_dim, 2 * width)
        self.proj_cross = nn.Linear(width, text_dim)
        # Where on the image a visual token lies matters (reports name places): a 2D position encoding on the keys.
        self.register_buffer("position", _sincos_2d(grid, grid, width, torch.device("cpu")), persistent=False)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = x.shape
        return x.transpose(1, 2).reshape(b, n, self.width)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._split(t) for t in self.qkv(self.norm_self(tokens)).chunk(3, dim=-1))
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        refined = tokens + self.proj_self(self._merge(attn))

        h, w = context.shape[-2:]
        k, v = self.kv_cross(context.flatten(2).transpose(1, 2)).chunk(2, dim=-1)
        pos = self.position if self.position.shape[0] == h * w else _sincos_2d(h, w, self.width, context.device)
        k = k + pos.to(k.dtype)
        q = self._split(self.q_cross(self.norm_cross(refined)))
        attn = F.scaled_dot_product_attention(q, self._split(k), self._split(v))
        return refined + self.proj_cross(self._merge(attn)) - tokens


class GuidedApproximation(nn.Module):
    """ProLearn's guided approximation at one decoder stage: the retrieved prototype tokens look at this image.

    Two branches, each self-attention among the tokens then cross-attention from the tokens to visual tokens: one to
    the stage's own features, one to the skip features of the next finer level. The output is the tokens plus both
    branches' changes, layer-normed. Attention runs at the stage's width rather than the text's, so even the stride-4
    skip map (3136 tokens at 224) costs little.
    """

    def __init__(self, text_dim: int, dim: int, skip_dim: int, heads: int, grid: int):
        super().__init__()
        self.visual = _ApproximationBranch(text_dim, dim, dim, heads, grid)
        self.skip = _ApproximationBranch(text_dim, skip_dim, dim, heads, 2 * grid)
        self.norm = nn.LayerNorm(text_dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, visual: torch.Tensor,
                skip: torch.Tensor) -> torch.Tensor:
        """``tokens [B, L, text_dim]`` with ``mask [B, L]``, ``visual [B, dim, h, w]``, ``skip [B, skip_dim, H, W]``."""
        return self.norm(tokens + self.visual(tokens, mask, visual) + self.skip(tokens, mask, skip))


class UpStage(nn.Module):
    """Bilinear x2 up-sampling, concatenation with the skip, and a MONAI residual conv block."""

    def __init__(self, cin: int, skip: int, cout: int):
        super().__init__()
        self.block = UnetResBlock(cin + skip, cout)

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor]) -> torch.Tensor:
        size = skip.shape[-2:] if skip is not None else (x.shape[-2] * 2, x.shape[-1] * 2)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.block(torch.cat([x, skip], 1) if skip is not None else x)


def _merge_guidance(tokens: torch.Tensor, mask: torch.Tensor, bank_tokens: torch.Tensor, bank_mask: torch.Tensor,
                    use_bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, report tokens or bank tokens, padded to a common length."""
    length = max(tokens.shape[1], bank_tokens.shape[1])
    tokens, mask = F.pad(tokens, (0, 0, 0, length - tokens.shape[1])), F.pad(mask, (0, length - mask.shape[1]))
    bank_tokens = F.pad(bank_tokens, (0, 0, 0, length - bank_tokens.shape[1]))
    bank_mask = F.pad(bank_mask, (0, length - bank_mask.shape[1]))
    pick = use_bank.view(-1, 1)
    return torch.where(pick.unsqueeze(-1), bank_tokens.to(tokens.dtype), tokens), torch.where(pick, bank_mask, mask)


class LanguageGuidedSegNet(nn.Module):
    """Image + guidance tokens -> one foreground logit per pixel."""

    visual_prototype: torch.Tensor

    def __init__(self, config: NetworkConfig, pretrained_encoder: bool = False, image_size: int = 224):
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config.encoder, pretrained=pretrained_encoder)
        enc_ch, enc_strides = self.encoder.channels, self.encoder.strides
        dec = config.decoder_channels
        if not 2 <= len(dec) <= len(enc_ch):
            raise ValueError(f"decoder_channels needs 2 to {len(enc_ch)} entries for encoder {config.encoder}")
        self.bottleneck = nn.Conv2d(enc_ch[-1], dec[0], 1)
        final_dim = dec[-1]
        self.guide_stages = nn.ModuleList(
            GuideStage(dec[i], config.text_dim, final_dim, config.heads, image_size // enc_strides[-1 - i])
            for i in range(config.attention_stages)
        )
        # Up path: from each decoder level to the next finer encoder level (skip), ending at the finest stride.
        self.up_stages = nn.ModuleList(
            UpStage(dec[i], enc_ch[-2 - i], dec[i + 1]) for i in range(len(dec) - 1)
        )
        # ProLearn: per attention stage, the bank's tokens refined with the stage's and the skip's features.
        self.approximations = nn.ModuleList(
            GuidedApproximation(config.text_dim, dec[i], enc_ch[-2 - i], config.heads,
                                image_size // enc_strides[-1 - i])
            for i in range(config.attention_stages if config.guided_approximation else 0)
        )
        self.head = UnetOutBlock(final_dim, 1)
        self.final_stride = enc_strides[-len(dec)]

        # ProLearn: image embedding for the prototype bank, from the encoder's deepest features.
        self.embed_head = nn.Sequential(nn.Linear(enc_ch[-1], 512), nn.GELU(), nn.Linear(512, config.text_dim))
        self.bank = PrototypeBank(config.bank_size, config.text_dim, config.bank_top_k, config.bank_tokens)
        # TeViA: alignment heads (projected text per stage -> final feature space) and the momentum prototype.
        self.align_heads = nn.ModuleList(nn.Linear(dec[i], final_dim) for i in range(config.attention_stages))
        self.register_buffer("visual_prototype", torch.zeros(final_dim))
        # TMCA: per-level projections of mask-pooled visual features and of the pooled guidance text.
        self.contrast_visual = nn.ModuleList(nn.Linear(c, config.contrast_dim) for c in dec)
        self.contrast_text = nn.ModuleList(nn.Linear(config.text_dim, config.contrast_dim) for _ in dec)

    @staticmethod
    def query_features(deepest: torch.Tensor) -> torch.Tensor:
        """The encoder's deepest feature map pooled as the bank query's head takes it ``[B, C]``."""
        return deepest.mean(dim=(2, 3)).float()

    @staticmethod
    def pooled_features(feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Each of the encoder's feature maps averaged over space, concatenated shallowest first ``[B, sum(C)]``:
        what a model's domain description models (domain.py). The shallow levels carry the colours and intensities
        that the deepest one no longer tells apart (Training/README.md has the figures)."""
        return torch.cat([level.mean(dim=(2, 3)).float() for level in feats], dim=1)

    def image_embedding(self, deepest: torch.Tensor) -> torch.Tensor:
        """The bank query vector ``[B, text_dim]`` from the encoder's deepest feature map."""
        return self.embed_head(self.query_features(deepest))

    def forward(self, images: torch.Tensor, tokens: Optional[torch.Tensor] = None,
                token_mask: Optional[torch.Tensor] = None, use_bank: Optional[torch.Tensor] = None,
                return_features: bool = False) -> Any:
        """Segment ``images [B, 3, H, W]`` guided by ``tokens [B, L, D]`` or, when None, by the prototype bank.

        ``use_bank [B]`` (bool) takes the bank's guidance for some samples of a batch that has report tokens
        (training mixes both). Returns logits ``[B, 1, H, W]``, or a dict with the training features too and the
        encoder's pooled features (``pooled_features``: what the applicability check scores, domain.py).
        """
        feats = self.encoder(images)
        query = None
        bank_rows: Optional[torch.Tensor] = None  # the samples that the bank guides; None with query: all of them
        if tokens is None:
            query = self.bank.query(self.image_embedding(feats[-1]))
            tokens, token_mask = query.tokens, query.mask
        else:
            if token_mask is None:
                token_mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            if use_bank is not None and bool(use_bank.any()):
                query = self.bank.query(self.image_embedding(feats[-1]))
                tokens, token_mask = _merge_guidance(tokens, token_mask, query.tokens, query.mask, use_bank)
                bank_rows = torch.nonzero(use_bank).flatten()
        tokens = tokens.to(feats[-1].dtype)

        x = self.bottleneck(feats[-1])
        # A copy, so the momentum update during training cannot change a tensor that autograd saved.
        prototype = self.visual_prototype.clone()
        levels, stage_text = [], []
        for i, up in enumerate(self.up_stages):
            if i < len(self.guide_stages):
                guide = tokens
                if query is not None and i < len(self.approximations):
                    guide = self._approximate(i, tokens, token_mask, bank_rows, query.tokens.shape[1], x,
                                              feats[-2 - i])
                x, pooled = self.guide_stages[i](x, guide, token_mask, prototype)
                stage_text.append(pooled)
            levels.append(x)
            x = up(x, feats[-2 - i])
        levels.append(x)
        logits = self.head(x)
        if self.final_stride > 1:
            logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        if not return_features:
            return logits
        return {"logits": logits, "levels": levels, "stage_text": stage_text, "tokens": tokens,
                "token_mask": token_mask, "bank_query": query, "image_features": feats[-1],
                "pooled_features": self.pooled_features(feats)}

    def _approximate(self, stage: int, tokens: torch.Tensor, mask: torch.Tensor, rows: Optional[torch.Tensor],
                     length: int, visual: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """The guidance of attention stage ``stage``: the bank's tokens refined by its guided approximation, in the
        ``rows`` that the bank guides (None: all); report tokens stay as they are."""
        block = self.approximations[stage]
        if rows is None:
            return block(tokens, mask, visual, skip)
        # The bank's ``length`` tokens come first in each bank row (see _merge_guidance), then padding.
        refined = block(tokens[rows, :length], mask[rows, :length], visual[rows], skip[rows])
        return tokens.index_put((rows,), F.pad(refined, (0, 0, 0, tokens.shape[1] - length)))

    @torch.no_grad()
    def update_visual_prototype(self, foreground: torch.Tensor) -> None:
        """TeViA's momentum update of the visual prototype with a batch of foreground features ``[B, C]``."""
        if foreground.numel() == 0:
            return
        batch_mean = foreground.float().mean(0)
        if torch.count_nonzero(self.visual_prototype) == 0:
            self.visual_prototype.copy_(batch_mean)
        else:
            m = self.config.prototype_momentum
            self.visual_prototype.mul_(m).add_(batch_mean, alpha=1 - m)
