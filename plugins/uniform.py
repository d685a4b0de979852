"""Uniform sampling: a regular spatial grid of each image's tokens, before the LLM (the baseline "simple image
downsampling consistently outperforms many advanced compression methods", VTC-Bench; LLaVolta and UniPruneBench ship
it beside pooling).

Rule: on a square grid (LLaVA's 24 x 24) with a square budget, the tokens at the centres of a k_side x k_side grid of
equal cells (576 -> 144 keeps every second row and column); otherwise k tokens evenly spaced in raster order
(index floor((i + 1/2) * n / k)). Needs nothing from the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Plugin, Signals, evenly


@dataclass
class Uniform(Plugin):
    name = "uniform"
    summary = "a regular grid of each image's tokens (strided sampling), before the LLM"

    def select(self, s: Signals, k: int) -> torch.Tensor:
        images, n = s.tokens.shape[:2]
        side, k_side = math.isqrt(n), math.isqrt(k)
        if side * side == n and k_side * k_side == k:
            rows = evenly(side, k_side)
            picks = (rows[:, None] * side + rows[None, :]).flatten()
        else:
            picks = evenly(n, k)
        return picks.to(s.tokens.device).expand(images, k)
