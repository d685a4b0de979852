"""GlobalCom²: "Compression with Global Guidance: Towards Training-free High-Resolution MLLMs Acceleration" (Liu et
al., AAAI 2026, arXiv 2501.05179), for anyres models (LLaVA-NeXT, LLaVA-OneVision); it acts after the projector.

Rule: the thumbnail (base image) guides the crops. A crop's importance S_j is the thumbnail's [CLS] attention summed
over the thumbnail region the crop covers (the thumbnail map split evenly by the crop grid); sigma = softmax(S / tau)
with tau = 10; crop j keeps the fraction r_j = min(1, r * (1 + sigma_j - mean(sigma))) of its tokens, the thumbnail r.
Inside a crop, a token's score is its crop's own [CLS] attention plus the thumbnail's attention map resized
(bilinear) onto the unpadded crop grid, each L2-normalised over the crop (equal weights, the paper's alpha = 0.5);
the thumbnail keeps its top tokens by its own [CLS] attention. Newline tokens are kept by the engine.
Differences: the official code sums pre-softmax [CLS] logits; vtr uses the attention probabilities FasterVLM uses.
Quotas are rounded down, then the tokens left over go one by one to the parts with the largest remainders, so every
image keeps exactly its budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Plugin, Signals


@dataclass
class GlobalCom2(Plugin):
    temperature: float = 10.0

    name = "globalcom2"
    summary = "anyres: the thumbnail's [CLS] attention sets each crop's share and guides selection in it"
    needs = ("cls_attention", "anyres_layout")

    def select(self, s: Signals, k: int) -> torch.Tensor:
        return torch.stack([self._one(s, i, k) for i in range(s.tokens.shape[0])])

    def _one(self, s: Signals, i: int, k: int) -> torch.Tensor:
        layout, attn = s.layout, s.cls_attention[i].float()
        crop, row, col = layout["crop"][i], layout["row"][i], layout["col"][i]
        side, (n_h, n_w) = layout["side"], layout["grid"][i].tolist()
        thumb = torch.zeros(side, side, device=attn.device)
        thumb[row[crop == 0], col[crop == 0]] = attn[crop == 0]
        r = k / len(attn)
        parts = [crop == 0] + [crop == j for j in range(1, n_h * n_w + 1)]
        ratios = [r]
        if n_h * n_w:
            ph, pw = side // n_h, side // n_w
            strength = torch.stack([thumb[g // n_w * ph:side if g // n_w == n_h - 1 else (g // n_w + 1) * ph,
                                          g % n_w * pw:side if g % n_w == n_w - 1 else (g % n_w + 1) * pw].sum()
                                    for g in range(n_h * n_w)])
            sigma = ((strength - strength.max()) / self.temperature).softmax(0)
            ratios += (r * (1 + sigma - sigma.mean())).clamp(max=1).tolist()
        quotas = _apportion([int(p.sum()) for p in parts], ratios, k)
        score = attn.clone()
        grid = crop > 0
        if bool(grid.any()):
            rows, cols = int(row[grid].max()) + 1, int(col[grid].max()) + 1
            guide = F.interpolate(thumb[None, None], size=(rows, cols), mode="bilinear", align_corners=False)[0, 0]
            for part in parts[1:]:
                local, glob = attn[part], guide[row[part], col[part]]
                score[part] = F.normalize(local, dim=0) + F.normalize(glob, dim=0)
        picks = [part.nonzero()[:, 0][score[part].topk(q).indices] for part, q in zip(parts, quotas) if q]
        return torch.cat(picks)


def _apportion(sizes: list[int], ratios: list[float], total: int) -> list[int]:
    """Per part: floor(size * ratio), then the tokens still owed to ``total`` one by one to the largest remainders
    (never more than a part has)."""
    exact = [n * q for n, q in zip(sizes, ratios)]
    quotas = [int(e) for e in exact]
    order = sorted(range(len(sizes)), key=lambda j: quotas[j] - exact[j])
    while sum(quotas) < total:
        for j in order:
            if quotas[j] < sizes[j] and sum(quotas) < total:
                quotas[j] += 1
    while sum(quotas) > total:
        j = max(range(len(sizes)), key=lambda j: quotas[j])
        quotas[j] -= 1
    return quotas
