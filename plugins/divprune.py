"""DivPrune: "Diversity-based Visual Token Pruning for Large Multimodal Models" (Alvar et al., CVPR 2025).

Rule: greedy max-min diversity on D = 1 - cos between the projected visual tokens of an image, before the LLM. The
first pick is the token with the largest nearest-neighbour distance; each later pick is argmax_j min_{s in kept} D[s, j].
Each greedy step is one vectorised update over all tokens of all images (``vtr.kernels.max_min_diversity``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vtr.kernels import max_min_diversity

from .base import Plugin, Signals


@dataclass
class DivPrune(Plugin):
    name = "divprune"
    summary = "greedy max-min cosine diversity of the projected tokens, before the LLM"

    def select(self, s: Signals, k: int) -> torch.Tensor:
        return max_min_diversity(s.tokens, k)
