"""EViT: "Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations" (Liang et al.,
ICLR 2022), used training-free.

Rule, in the blocks where it acts (between attention and MLP): rank the patch tokens by the attention the [CLS] token
pays them in that block (head mean), keep the top ``keep_rate``, and fuse the rest into one token, their average
weighted by that attention (``fuse=False`` drops them instead). Paper defaults (DeiT, 12 blocks): blocks 4, 7 and 10
(1-based) with keep rate 0.7; vtr scales the blocks to the encoder's depth. ``retain``/``budget`` set what survives the
last stage instead. Encoder-only ViTs (timm / open_clip) and LLaVA-1.5's vision tower, with a [CLS] token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vtr.kernels import Plan

from .base import EncoderPlugin

PAPER_BLOCKS = (3, 6, 9)       # 0-based
PAPER_DEPTH = 12


@dataclass
class EViT(EncoderPlugin):
    keep_rate: float = 0.7
    fuse: bool = True

    name = "evit"
    summary = "[CLS] attention in blocks 4/7/10 of 12 (scaled), keep 70 % per stage, fuse the rest (encoders)"
    needs = ("cls_attention",)

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.keep_rate <= 1:
            raise ValueError(f"EViT: keep_rate must be in (0, 1], got {self.keep_rate!r}")

    def reductions(self, depth: int, tokens: int) -> list[int]:
        blocks = sorted({min(depth - 1, round(b * depth / PAPER_DEPTH)) for b in PAPER_BLOCKS})
        if self.retain is None and self.budget is None:
            counts, n = [], tokens
            for _ in blocks:
                n = max(1, int(n * self.keep_rate + 0.5))
                counts.append(n)
        else:
            final = self.keep_count(tokens)
            rate = (final / tokens) ** (1 / len(blocks))
            counts = [max(final, int(tokens * rate ** (i + 1) + 0.5)) for i in range(len(blocks) - 1)] + [final]
        out, before = [0] * depth, tokens
        for block, n in zip(blocks, counts):
            out[block], before = before - n, n
        return out

    def plan(self, cls_attention: torch.Tensor, prefix: int, r: int) -> Plan | None:
        """cls_attention (B, N - prefix) over the patch tokens -> slots [prefix..., kept (in order)..., fused]."""
        batch, n = cls_attention.shape
        if r <= 0:
            return None
        keep = n - r
        kept = cls_attention.topk(keep, dim=-1).indices.sort(dim=-1).values
        device = cls_attention.device
        rest = prefix + keep if self.fuse else -1
        dest = torch.full((batch, n), rest, dtype=torch.long, device=device)
        dest.scatter_(1, kept, prefix + torch.arange(keep, device=device).expand(batch, -1))
        head = torch.arange(prefix, device=device).expand(batch, -1)
        weight = torch.cat([torch.ones(batch, prefix, device=device), cls_attention.float()], dim=1)
        return Plan(torch.cat([head, dest], dim=1), weight, prefix + keep + int(self.fuse))
