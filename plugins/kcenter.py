"""k-center: greedy max-min diversity (farthest-point) on the vision encoder's output, before the projector — the
first stage of ToDRE ("ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient Large
Vision-Language Models", 2025), which keeps a small diverse subset of the encoder's tokens (the paper removes 90 %).

Rule: the same greedy routine as DivPrune (first pick: the largest nearest-neighbour distance; then argmax_j min over
the picks of 1 - cos), on the feature layer's outputs instead of the projected tokens. ``todre`` runs it with ToDRE's
second, task-aware stage inside the LLM. Applies where the projector sees one image's patches as one sequence
(LLaVA-1.5); elsewhere ``divprune`` runs the same routine after the projector.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vtr.kernels import max_min_diversity

from .base import Plugin, Signals


@dataclass
class KCenter(Plugin):
    name = "kcenter"
    summary = "greedy k-center (max-min cosine diversity) on the vision encoder's output, before the projector"
    default_retain = 0.1
    needs = ("before_projector",)

    def zip(self, s: Signals, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept indices (images, k), ascending, and the features unchanged (nothing is merged)."""
        return max_min_diversity(s.tokens, k).sort(dim=1).values, s.tokens
