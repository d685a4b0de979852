"""DART: "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More" (Wen et al.,
EMNLP 2025). Acts once, at decoder layer K = 2, on the hidden states entering it; needs no attention weights.

Rule: pivots are the tokens whose layer-(K-1) keys (after RoPE, heads joined) have the largest L1 norm: 4 image
tokens of the image and 4 text tokens after it. For each pivot in turn, the image tokens least cosine-similar to it
(on the hidden states through the model's final norm) are picked and leave the pool; the image pivots are kept, the
text pivots are not. Survivors keep their original positions. Paper default: 128 tokens kept on LLaVA-1.5
(max_num_trunction = 128, i.e. 16 per pivot).
Differences: the official code keeps 4 + 8 x 16 = 132 (budget + image pivots); vtr spends exactly the budget: the
budget minus the image pivots is split evenly over the pivots (the first ones take the remainder). The official code
walks the pivots in a Python set's order; vtr walks them image pivots first, each group by decreasing key norm.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtr.kernels import true_first

from .base import LLMPlugin, Signals


@dataclass
class DART(LLMPlugin):
    layer: int = 2
    image_pivots: int = 4
    text_pivots: int = 4

    name = "dart"
    summary = "pivots by key L1 norm (layer K-1), keep the tokens least similar to them, at layer K=2"
    default_retain = 128 / 576
    needs = ("keys", "final_norm")

    def layers(self, num_layers: int) -> list[int]:
        if not 1 <= self.layer < num_layers:
            raise ValueError(f"DART: layer must be in 1..{num_layers - 1} (it uses layer K-1's keys), "
                             f"got {self.layer!r}")
        return [self.layer]

    def score_layer(self, layer: int) -> int:
        return layer - 1

    def keep(self, s: Signals, k: torch.Tensor) -> torch.Tensor:
        counts, budgets = s.host(k)
        length = s.text.shape[1]
        rows = s.rows()
        sample, col = rows // length, rows % length              # of each visual entry
        norms = s.keys.float().abs().sum(-1)
        feats = F.normalize(s.normed.float(), dim=-1)
        keep = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
        # each image's entries are a run of them (images fill the sequence in order); its sample and the text
        # tokens after it come back to the host at once, not image by image
        starts = [sum(counts[:i]) for i in range(len(counts))]
        images = [i for i, n in enumerate(counts) if n]
        if not images:
            return keep
        first = torch.tensor([starts[i] for i in images], device=rows.device)
        last = first + torch.tensor([counts[i] for i in images], device=rows.device) - 1
        after = torch.arange(length, device=rows.device) > col[last][:, None]
        texts = s.text[sample[first]] & after                     # (images, L)
        host = torch.cat([sample[first], texts.sum(1)]).tolist()
        for i, image in enumerate(images):
            b, cols = host[i], col[starts[image]:starts[image] + counts[image]]
            text = true_first(texts[i])[:host[len(images) + i]]
            own = norms[b, cols].argsort(descending=True)
            budget = budgets[image]
            n_img = min(self.image_pivots, len(cols), budget)
            pivots = torch.cat([cols[own[:n_img]], text[norms[b, text].argsort(descending=True)][:self.text_pivots]])
            taken = torch.zeros(len(cols), dtype=torch.bool, device=cols.device)      # picked, or an image pivot
            taken[own[:n_img]] = True
            similarity = feats[b, cols] @ feats[b, pivots].T                         # every pivot in one product
            budget, free = budget - n_img, len(cols) - n_img
            for j in range(len(pivots)):          # the pool shrinks pivot by pivot; counts are host ints: no sync
                take = min(budget // len(pivots) + (j < budget % len(pivots)), free)
                if take > 0:
                    taken[similarity[:, j].masked_fill(taken, float("inf")).topk(take, largest=False).indices] = True
                    free -= take
            keep[starts[image]:starts[image] + counts[image]] = taken
        return keep
