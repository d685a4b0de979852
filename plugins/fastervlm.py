"""FasterVLM: "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM Inference Faster"
(Zhang et al., arXiv 2412.01818).

Rule: score each patch by the vision encoder's [CLS]->patch attention in the layer LLaVA takes its features from
(``vision_feature_layer``, -2 on LLaVA-1.5), averaged over heads; keep the top-k; the projector runs on all tokens and
the keep mask is applied to its output. The engine recomputes only the [CLS] query row from that layer's own q/k
projections, so the vision tower keeps any attention implementation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Plugin, Signals


@dataclass
class FasterVLM(Plugin):
    name = "fastervlm"
    summary = "[CLS]->patch attention of the vision feature layer, top-k, after the projector"
    needs = ("cls_attention",)

    def score(self, s: Signals) -> torch.Tensor:
        return s.cls_attention
