"""FastV: "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
Vision-Language Models" (Chen et al., ECCV 2024).

Rule: at decoder layer K (paper: K=2, R=50%), score the visual tokens by the attention the last prompt token pays them
in layer K-1, averaged over heads; keep the top-k for every layer >= K and for the KV cache. Survivors keep their
original position ids. The engine recomputes that one attention row from layer K-1's own q/k projections (with RoPE
and GQA as the layer applies them), so the model keeps any attention implementation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LLMPlugin, Signals


@dataclass
class FastV(LLMPlugin):
    layer: int = 2

    name = "fastv"
    summary = "last prompt token's attention in layer K-1, top-k kept from layer K=2 on"
    default_retain = 0.5
    needs = ("last_attention",)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"FastV: layer must be an integer >= 1 (it scores with layer K-1), got {self.layer!r}")

    def layers(self, num_layers: int) -> list[int]:
        if self.layer >= num_layers:
            raise ValueError(f"FastV: layer {self.layer} does not exist, the language model has {num_layers} layers")
        return [self.layer]

    def score_layer(self, layer: int) -> int:
        return layer - 1

    def score(self, s: Signals) -> torch.Tensor:
        return s.last_attention
