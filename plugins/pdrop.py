"""PyramidDrop: "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction"
(Xing et al., CVPR 2025).

Rule: the decoder is split into stages; at the entrance of each stage layer the hidden states go through that layer's
input norm, q/k projections and RoPE, the attention row of the last instruction (prompt) token is recomputed, averaged
over heads, and the top ``ratio`` of the surviving visual tokens is kept. Paper defaults: layers 8/16/24 of 32 with
ratio 0.5 each (576 -> 288 -> 144 -> 72 on LLaVA-1.5); vtr scales the layers to the model's depth.

Budgets: ``retain`` (or ``budget``) is what survives the last stage, so ``ratio = retain ** (1 / stages)``; with
neither, ``ratio`` (0.5) applies. ``Handle.stats()`` reports the per-layer counts and their layer average, which is
what FLOPs follow. Survivors keep their original position ids (vtr's single convention; the paper renumbers).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LLMPlugin, Signals

PAPER_LAYERS = (8, 16, 24)
PAPER_DEPTH = 32


@dataclass
class PyramidDrop(LLMPlugin):
    ratio: float = 0.5
    layer_list: tuple[int, ...] | None = None

    name = "pdrop"
    summary = "last instruction token's attention, recomputed at layers 8/16/24 of 32 (scaled), ratio 0.5 per stage"
    needs = ("last_attention",)

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.ratio <= 1:
            raise ValueError(f"PyramidDrop: ratio must be in (0, 1], got {self.ratio!r}")

    @property
    def target_retain(self) -> float:
        return self.retain if self.retain is not None else self.ratio ** len(PAPER_LAYERS)

    def layers(self, num_layers: int) -> list[int]:
        if self.layer_list is not None:
            layers = sorted(self.layer_list)
        else:
            layers = sorted({max(1, round(l * num_layers / PAPER_DEPTH)) for l in PAPER_LAYERS})
        if len(set(layers)) != len(layers) or layers[0] < 1 or layers[-1] >= num_layers:
            raise ValueError(f"PyramidDrop: stage layers {layers} must be distinct and within 1..{num_layers - 1}")
        return layers

    def stage_counts(self, n: int, stages: int = len(PAPER_LAYERS)) -> list[int]:
        final = self.keep_count(n)
        ratio = self.ratio if self.retain is None and self.budget is None else (final / n) ** (1 / stages)
        counts = [max(final, int(n * ratio ** (i + 1) + 0.5)) for i in range(stages - 1)]
        return counts + [final]

    def score(self, s: Signals) -> torch.Tensor:
        return s.last_attention
