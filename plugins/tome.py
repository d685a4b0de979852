"""ToMe: "Token Merging: Your ViT But Faster" (Bolya et al., ICLR 2023).

Rule (bipartite soft matching), in every block between attention and MLP: the metric is the block's keys averaged
over heads, L2-normalised; tokens alternate into sets A and B; each A token finds its most similar B token; the r
most similar edges are merged by size-weighted average (at most half of A per block); prefix tokens ([CLS], registers)
are never merged. Proportional attention adds log(size) to the attention logits (the official default for timm; an
additive SDPA mask, so it turns flash attention off; ``prop_attn=False`` keeps any kernel).
``r`` is the number merged per block (an int, or one per block); ``retain`` instead picks the constant r that leaves
that fraction of the patch tokens after the last block. Encoder-only ViTs (timm / open_clip), and LLaVA-1.5's vision
tower up to its feature layer, where every patch then carries its merged token's value and the first patch of each
merged token enters the LLM (at its own position).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtr.kernels import Plan

from .base import EncoderPlugin


@dataclass
class ToMe(EncoderPlugin):
    r: int | tuple[int, ...] | None = None
    prop_attn: bool = True

    name = "tome"
    summary = "bipartite soft matching of keys, r tokens merged per ViT block (encoders)"
    needs = ("keys",)

    def __post_init__(self):
        super().__post_init__()
        if self.r is not None and self.budget is not None:
            raise ValueError("ToMe: give r or budget/retain, not both")
        values = self.r if isinstance(self.r, (tuple, list)) else [self.r]
        if any(v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0) for v in values):
            raise ValueError(f"ToMe: r must be an integer >= 0 (or one per block), got {self.r!r}")

    def reductions(self, depth: int, tokens: int) -> list[int]:
        """Tokens merged in each block, before the 50 % cap."""
        if isinstance(self.r, (tuple, list)):
            if len(self.r) != depth:
                raise ValueError(f"ToMe: {len(self.r)} values of r for {depth} blocks")
            return list(self.r)
        if self.r is not None:
            return [self.r] * depth
        return [-(-(tokens - self.keep_count(tokens)) // depth)] * depth      # ceil: reach the target

    def plan(self, keys: torch.Tensor, prefix: int, r: int) -> Plan | None:
        """keys (B, N, H, d) -> the merge plan: slots [prefix..., unmerged A (in order)..., B...]."""
        metric = F.normalize(keys.float().mean(dim=2)[:, prefix:], dim=-1)
        a, b = metric[:, ::2], metric[:, 1::2]
        r = min(r, a.shape[1])
        if r <= 0:
            return None
        best, match = (a @ b.transpose(1, 2)).max(dim=-1)                   # each A token's closest B token
        order = best.argsort(dim=-1, descending=True)
        merged, kept = order[:, :r], order[:, r:].sort(dim=-1).values
        batch, n_a, n_b = keys.shape[0], a.shape[1], b.shape[1]
        device = keys.device
        dest_a = torch.empty(batch, n_a, dtype=torch.long, device=device)
        dest_a.scatter_(1, kept, prefix + torch.arange(n_a - r, device=device).expand(batch, -1))
        b_slot = prefix + n_a - r
        dest_a.scatter_(1, merged, b_slot + match.gather(1, merged))
        dest = torch.empty(batch, keys.shape[1] - prefix, dtype=torch.long, device=device)
        dest[:, ::2], dest[:, 1::2] = dest_a, b_slot + torch.arange(n_b, device=device)
        head = torch.arange(prefix, device=device).expand(batch, -1)
        return Plan(torch.cat([head, dest], dim=1), None, prefix + n_a - r + n_b)
