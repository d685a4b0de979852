"""VisionZip: "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (Yang et al., CVPR 2025,
arXiv 2412.04467). Acts on the vision feature layer's output, before the projector.

Rule: **dominant** tokens are the top [CLS]->patch attention of the feature layer (-2), summed over heads; the rest
gives **contextual** tokens: targets chosen uniformly (a fixed stride) among the remaining tokens, every other
remaining token assigned to the target whose key (the feature layer's keys, head mean, L2-normalised) has the highest
dot product with its own, and each target replaced by the mean of itself and its assigned tokens. The projector then
runs on the dominant and merged contextual features. Defaults: 54 dominant + 10 contextual at a 64-token budget, the
same proportion (10/64 contextual) at other budgets.
vtr applies it where the projector sees one image's patches as one sequence (LLaVA-1.5); other architectures refuse it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtr.kernels import group_means, true_first

from .base import Plugin, Signals


@dataclass
class VisionZip(Plugin):
    contextual_ratio: float = 10 / 64

    name = "visionzip"
    summary = "[CLS]-attention dominant tokens + contextual tokens merged by key similarity, before the projector"
    needs = ("cls_attention", "vision_keys", "before_projector")

    def zip(self, s: Signals, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """s.tokens (I, P, D) feature-layer outputs, s.cls_attention (I, P), s.keys (I, P, Dk) -> (kept indices (I, k)
        ascending, the features with each contextual target replaced by its merged mean)."""
        images, n = s.cls_attention.shape
        contextual = min(round(k * self.contextual_ratio), k) if k < n else 0
        dominant = s.cls_attention.topk(k - contextual, dim=-1).indices
        merged, kept = s.tokens.clone(), []
        keys = F.normalize(s.keys.float(), dim=-1)
        for i in range(images):
            rest = torch.ones(n, dtype=torch.bool, device=dominant.device)
            rest[dominant[i]] = False
            rest = true_first(rest)[:n - dominant.shape[1]]              # ascending; the count is known
            picks = [dominant[i]]
            if contextual:
                stride = len(rest) // contextual
                is_target = torch.zeros(len(rest), dtype=torch.bool, device=rest.device)
                is_target[torch.arange(contextual, device=rest.device) * stride] = True
                order = true_first(is_target)
                targets, others = rest[order[:contextual]], rest[order[contextual:]]
                owner = (keys[i, others] @ keys[i, targets].T).argmax(dim=1)        # each token's closest target
                group = torch.cat([torch.arange(contextual, device=rest.device), owner])   # a target and its own
                merged[i, targets] = group_means(s.tokens[i, torch.cat([targets, others])], group, contextual).to(
                    merged.dtype)
                picks.append(targets)
            kept.append(torch.cat(picks).sort().values)
        return torch.stack(kept), merged
