"""LLaVA-PruMerge+: "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models" (Shang et al.,
2024; repo 42Shawn/LLaVA-PruMerge, its default ``forward``). Acts on the vision feature layer's output, before the
projector.

Rule:
- outliers: the patches whose [CLS] attention a is above Q3 + 1.5 IQR of the image's attention values (the upper
  fence only) are kept, highest first;
- PruMerge+ adds spatially uniform samples: with ratio = outliers / P, every int(int(1 / ratio) / 3)-th patch in
  raster order that is not kept already;
- merge: each kept token i takes in its 32 most similar other tokens by cosine of the keys,
  x_i <- x_i + sum_j a_j x_j (the raw attention weights, not normalised, as the code does);
- one more token: the sum over the tokens not kept of a_j x_j.
The projector then runs on these. The paper's counts are adaptive (about 25 % for PruMerge+); vtr spends exactly
the budget (default 25 %): the outliers first (at most the budget less one), then the uniform samples, evenly
spaced among the tokens not kept, to fill it, the last slot being the extra token, placed at the last position not
kept (the code appends it after the others).

Differences, documented: the [CLS] attention and keys are the feature layer's (head mean), the signals VisionZip
uses; the code reads the next layer's q/k as a single head over the full width. The fence is per image (the code
pools the attention values of a batch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vtr.kernels import true_first

from .base import Plugin, Signals, evenly


@dataclass
class PruMergePlus(Plugin):
    name = "prumerge+"
    summary = "PruMerge+: [CLS]-attention outliers (IQR) + uniform samples, each merging its key neighbours"
    needs = ("cls_attention", "vision_keys", "before_projector")
    neighbours: ClassVar[int] = 32

    def zip(self, s: Signals, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """s.tokens (I, P, D) feature-layer outputs, s.cls_attention (I, P), s.keys (I, P, Dk) -> (kept indices (I, k)
        ascending, the features with the kept tokens merged and the extra token written in)."""
        images, n = s.cls_attention.shape
        keys = F.normalize(s.keys.float(), dim=-1)
        merged, kept = s.tokens.clone(), []
        attention = s.cls_attention.float()
        q1, q3 = torch.quantile(attention, torch.tensor([0.25, 0.75], device=attention.device), dim=1)
        outliers = (attention > (q3 + 1.5 * (q3 - q1))[:, None]).sum(1).tolist()   # every image's, in one read-back
        for i in range(images):
            a = attention[i]
            picks = a.topk(max(1, min(outliers[i], k - 1))).indices
            if k > 1 and len(picks) < k - 1:                        # uniform samples among the rest
                rest = torch.ones(n, dtype=torch.bool, device=a.device)
                rest[picks] = False
                rest = true_first(rest)[:n - len(picks)]             # ascending; the count is known
                picks = torch.cat([picks, rest[evenly(len(rest), k - 1 - len(picks), a.device)]])
            similarity = keys[i, picks] @ keys[i].T
            similarity[torch.arange(len(picks), device=a.device), picks] = float("-inf")      # other tokens only
            near = similarity.topk(min(self.neighbours, n - 1), dim=-1).indices    # (picks, 32)
            x = s.tokens[i].float()
            merged[i, picks] = (x[picks] + (a[near, None] * x[near]).sum(1)).to(merged.dtype)
            if k > 1:
                others = torch.ones(n, dtype=torch.bool, device=a.device)
                others[picks] = False
                others = true_first(others)[:n - len(picks)]                  # ascending; the count is known
                extra = others[-1:]                           # a 1-element index: a 0-d one would be read back
                merged[i, extra] = (a[others, None] * x[others]).sum(0, keepdim=True).to(merged.dtype)
                picks = torch.cat([picks, extra])
            kept.append(picks.sort().values)
        return torch.stack(kept), merged
