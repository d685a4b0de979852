"""ToDRE: "ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient Large Vision-Language Models"
(2025; no public code). Two stages:

1. ``kcenter`` (greedy k-center on the vision encoder's output, before the projector; the paper's first version):
   keeps ``retain`` of the tokens (paper: 10 %).
2. ``ToDRERelevance``, task-aware, in the LLM: at layer 7L/8 (28 of 32) the text tokens after the image look at the
   visual ones: alpha = the share of their attention (head mean, averaged over them) that goes to the visual tokens.
   When alpha < tau (0.10) the text no longer needs the image and every visual token of the sample is removed from
   the next layer on; otherwise none is. (The paper also requires the visual-to-text share below tau; with the image
   before the question that share is 0 under the causal mask, so the test is the text-to-visual one.)

So ``retain`` is what stage 1 keeps; stage 2 keeps all of it or nothing (``stats()`` reports which, and the layer-
averaged retention counts it). The paper's second version replaces k-center by max-sum diversification around a
[CLS]-attention pivot; vtr follows the first, as the issue asks. Applies where ``kcenter`` does (LLaVA-1.5).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LLMPlugin, Plugin, Signals
from .kcenter import KCenter


@dataclass
class ToDRERelevance(LLMPlugin):
    name = "todre_relevance"
    summary = "ToDRE stage 2: all visual tokens removed after layer 7L/8 when the text's attention to them is < 10 %"
    needs = ("text_attention",)
    adaptive = True
    tau: float = 0.10
    layer: int | None = None          # the checking layer (paper: 7L/8); tokens go from the next layer on

    def layers(self, num_layers: int) -> list[int]:
        check = self.layer if self.layer is not None else min(round(7 * num_layers / 8), num_layers - 2)
        if not 0 <= check < num_layers - 1:
            raise ValueError(f"ToDRE: layer {check} must check before the last of {num_layers} layers")
        return [check + 1]

    def score_layer(self, layer: int) -> int:
        return layer - 1

    def keep(self, s: Signals, k: torch.Tensor) -> torch.Tensor:
        share = (s.text_attention.float() * s.visual).sum(1)              # (B,) text-to-visual attention share
        return s.at_visual((share >= self.tau)[:, None].expand_as(s.visual))     # each visual token's sample's


@dataclass
class ToDRE(Plugin):
    name = "todre"
    summary = "ToDRE: k-center before the projector, then all visual tokens dropped late once the text is done"
    where = "projector+llm"
    default_retain = 0.1
    needs = ("before_projector",)
    tau: float = 0.10
    layer: int | None = None

    def pipeline(self) -> list[Plugin]:
        return [KCenter(retain=self.retain if self.budget is None else None, budget=self.budget),
                ToDRERelevance(tau=self.tau, layer=self.layer)]
