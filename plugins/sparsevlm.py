"""SparseVLM: "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference" (Zhang et al.,
ICML 2025), its v1.5 algorithm (Gumpest/SparseVLMs, the default ``USE_VERSION``), in the LLM.

Rule:
- raters: on the embeddings entering the LLM, P = softmax over the text tokens after the image of each visual
  token's dot products with them; a text token rates when its mean P over the visual tokens is above the mean;
- at layers 2, 6 and 15 of 32 (scaled to depth), the raters' attention rows (RoPE, causal mask, head mean), averaged
  over the raters, score the visual tokens; the top K_l survive the layer;
- recycling: of the dropped tokens, the int(0.3 n) + 1 best scored are clustered (DPC-kNN, int(n_rec / 10) + 1
  centres and neighbours) and each cluster becomes the mean of its members; these tokens count as visual tokens at
  the next stages.
Counts: the paper's schedules for LLaVA-1.5's 576 tokens (kept after layers 2 / 6 / 15: 300 / 200 / 110 for its
"192" setting, 303 / 110 / 36 for "128", 66 / 30 / 17 for "64"); the one whose last count is nearest the requested
retain is scaled to it, and the recycled clusters are counted in (the last stage keeps exactly the budget). The
paper's "192" is an average over the 32 layers, not what is left: ``stats()["layer_avg_retention"]`` is that figure;
``retain`` is what survives the last stage.

Differences, documented: a stage drops at the entrance of the layer after the scoring layer (the code prunes that
layer's output: the same tokens reach the same layers); clusters sit at their centre's position and every token keeps
its original position (the code appends clusters after the kept visual tokens and renumbers positions).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from vtr.kernels import dpc_merge_groups, topk_per_group

from .base import LLMPlugin, Signals

SCHEDULES = ((300, 200, 110), (303, 110, 36), (66, 30, 17))      # of 576, the paper's 192 / 128 / 64 settings


def recycled(dropped: int) -> tuple[int, int]:
    """(tokens recycled, clusters they make) when ``dropped`` tokens leave a stage."""
    if dropped <= 0:
        return 0, 0
    n = int(0.3 * dropped) + 1
    return n, n // 10 + 1


@dataclass
class SparseVLM(LLMPlugin):
    name = "sparsevlm"
    summary = "text raters' attention at LLM layers 2/6/15 of 32, dropped tokens recycled into a few cluster means"
    default_retain = 110 / 576
    needs = ("rater_attention",)
    paper_layers: ClassVar[tuple[int, ...]] = (2, 6, 15)
    recycle: bool = True

    @staticmethod
    def raters(embeds: torch.Tensor, visual: torch.Tensor, text: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Which ``text`` tokens (B, T, D; ``valid`` (B, T) marks the real ones) rate the visual tokens, the
        ``visual`` (B, L) rows of ``embeds`` (B, L, D), the embeddings entering the LLM: (B, T) bool."""
        logits = (embeds.float() @ text.float().transpose(1, 2)).masked_fill(~valid[:, None], float("-inf"))
        relevance = (logits.softmax(dim=-1) * visual[..., None]).sum(1) / visual.sum(1, keepdim=True).clamp(min=1)
        mean = (relevance * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1)
        return valid & (relevance > mean)

    def layers(self, num_layers: int) -> list[int]:
        out = []
        for layer in self.paper_layers:                  # scoring layers, scaled; each drops at the next one
            score = max(round(layer * num_layers / 32), out[-1] if out else 0)
            out.append(score + 1)
        if out[-1] >= num_layers:
            raise ValueError(f"SparseVLM: the language model has {num_layers} layers, too few for 3 stages")
        return out

    def score_layer(self, layer: int) -> int:
        return layer - 1

    def stage_counts(self, n: int, stages: int = 1) -> list[int]:
        final = self.keep_count(n)
        schedule = min(SCHEDULES, key=lambda c: abs(math.log(c[-1] / 576) - math.log(final / n)))
        counts, last = [], n
        for c in schedule[:-1]:
            last = min(last, max(final, round(final * c / schedule[-1])))
            counts.append(last)
        return counts + [final]

    def drop(self, s: Signals, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        scores, image = s.at_visual(s.rater_attention).float(), s.image
        entry, want = s.host(k)
        top = list(want)
        if self.recycle:         # the survivors by score leave room for the clusters the dropped ones make
            for i, n in enumerate(entry):
                while top[i] > 1 and top[i] + recycled(n - top[i])[1] > want[i]:
                    top[i] -= 1
        kept = topk_per_group(scores, image, torch.tensor(top, device=k.device))
        if not self.recycle:
            return kept, None
        tokens = s.at_visual(s.tokens).float()
        values = tokens.clone()
        plan = [(i, *recycled(n - top[i])) for i, n in enumerate(entry)]           # (image, recycled, clusters)
        plan = [(i, count, clusters) for i, count, clusters in plan if count and top[i] + clusters <= want[i]]
        if not plan:
            return kept, values
        # every image's best dropped tokens at once: by image, best first inside (ties: the earlier); count <= the
        # image's dropped, which come before its kept ones (-inf)
        order = scores.masked_fill(kept, float("-inf")).sort(descending=True, stable=True).indices
        if len(entry) > 1:
            order = order[image[order].sort(stable=True).indices]
        starts = [sum(entry[:i]) for i, _, _ in plan]
        counts, clusters = [count for _, count, _ in plan], [c for _, _, c in plan]
        if len(plan) == 1:
            chosen = order[starts[0]:starts[0] + counts[0]][None]
        else:                                                                       # (images recycling, most)
            chosen = order[torch.tensor([[min(start + j, len(order) - 1) for j in range(max(counts))]
                                         for start in starts], device=order.device)]
        centres, merged = dpc_merge_groups(tokens[chosen], counts, clusters, clusters, index=chosen)
        kept[centres] = True
        values[centres] = merged
        return kept, values
