"""FastVID: "FastVID: Dynamic Density Pruning for Fast Video Large Language Models" (Shen et al., arXiv 2503.11187),
before the LLM, as its official code runs it on LLaVA-OneVision (LunarShen/FastVID).

Rule:
- DySeg: transition similarity s_t = cos(g_t, g_t+1) of consecutive frames' global features; a segment ends after
  each of the c - 1 lowest transitions and after every transition below tau (c = 8, tau = 0.9).
- Budget: each frame gets R of the retained tokens (retention 0.10 by default, the paper's scripts); int(d R) of them
  are anchors, the rest salient tokens (d = 0.4).
- Salient tokens: in every frame, the top tokens by vision attention, kept as they are.
- STPrune: in each segment, the anchor frames are its last frame and every p-th frame before it (p = 4); they share
  the segment's anchors. An anchor frame's anchors are its top non-salient tokens by density-peaks score rho * delta
  (4 nearest neighbours, ``vtr.kernels.density_peaks``). Every non-salient token of the segment joins its most
  cosine-similar anchor of that frame (each anchor frame absorbs the whole segment), and an anchor becomes
  w x + (1 - w) mean(its members), w = max(1 / (members + 1), beta), beta = 0.6.
Kept tokens keep their original positions, as in the official code.

Differences, documented: the frame's global feature is the mean of its projected tokens and the vision attention is
the engine's [CLS] attention (the mean attention received in the feature layer on SigLIP/Qwen towers): the official
code reads both from SigLIP's attention-pooling head, which Hugging Face's LLaVA-OneVision tower does not keep. The
budget is spent exactly (the official code floors it per frame): frame budgets differ by at most one, and anchors an
anchor frame has no room for go to the segment's other frames, last first. An image is a one-frame video.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vtr.kernels import density_peaks, rows_up_to, true_first

from .base import Plugin, Signals, shares


def cuts(g: torch.Tensor, count: int, tau: float) -> torch.Tensor:
    """DySeg: (..., T - 1) bool, where the frames of ``g`` (..., T, D) global features are cut: after the
    ``count - 1`` lowest transitions and every one below ``tau``."""
    g = F.normalize(g.float(), dim=-1)
    similarity = (g[..., :-1, :] * g[..., 1:, :]).sum(-1)
    lowest = similarity.topk(min(count - 1, similarity.shape[-1]), dim=-1, largest=False).indices
    return torch.zeros_like(similarity, dtype=torch.bool).scatter_(-1, lowest, True) | (similarity < tau)


def runs(cut: list[bool]) -> list[list[int]]:
    """The segments of frames that host-side ``cut`` flags (one per transition) make."""
    bounds = [-1, *(i for i, c in enumerate(cut) if c), len(cut)]
    return [list(range(a + 1, b + 1)) for a, b in zip(bounds, bounds[1:])]


def segments(g: torch.Tensor, count: int, tau: float) -> list[list[int]]:
    """DySeg's segments of one video's frames, ``g`` (T, D)."""
    return runs(cuts(g, count, tau).tolist())


@dataclass
class FastVID(Plugin):
    name = "fastvid"
    summary = "FastVID: segments by frame similarity, salient tokens by attention + density-peak anchors merged"
    needs = ("frames", "cls_attention")
    default_retain = 0.10
    neighbours: ClassVar[int] = 4
    segments: int = 8           # c: at least this many segments
    tau: float = 0.9            # a transition below this similarity always cuts
    anchors: float = 0.4        # d: the anchors' share of a frame's budget
    step: int = 4               # p: every p-th frame of a segment (from its last) holds anchors
    beta: float = 0.6           # an anchor's least weight in its merge

    def __post_init__(self):
        super().__post_init__()
        if self.segments < 1 or self.step < 1 or not 0 <= self.anchors <= 1 or not 0 <= self.beta <= 1:
            raise ValueError("FastVID: segments and step must be >= 1, anchors and beta fractions in [0, 1]")

    def reduce(self, s: Signals, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        t, h, w = s.frames
        per, dim = h * w, s.tokens.shape[-1]
        budget = shares(k, t)
        anchors = [int(self.anchors * r) for r in budget]
        salient = [r - a for r, a in zip(budget, anchors)]
        picks, values = [], []
        videos = s.tokens.view(-1, t, per, dim)
        flags = cuts(videos.mean(2), self.segments, self.tau).tolist()          # every video's, in one read-back
        for x, attention, cut in zip(videos, s.cls_attention.view(-1, t, per), flags):
            p, v = self._video(x, attention, salient, anchors, runs(cut))
            picks.append(p)
            values.append(v)
        return torch.stack(picks), torch.stack(values)

    def _video(self, x, attention, salient, anchors, spans):
        t, per, dim = x.shape
        device, flat = x.device, x.reshape(-1, dim)
        offset = torch.arange(t, device=device)[:, None] * per                # each frame's first token
        ranked = attention.sort(dim=-1, descending=True, stable=True).indices      # ties: the earlier token
        top = torch.arange(per, device=device) < torch.tensor(salient, device=device)[:, None]
        rest = true_first(~torch.zeros_like(top).scatter_(1, ranked, top))   # each frame's non-salient tokens first,
        room = [per - n for n in salient]                                     # ascending (their count is known)
        picks = [(ranked + offset).flatten()[rows_up_to(salient, per, device)]]
        values = [flat[picks[0]]]
        holders = [(i, f, count) for i, segment in enumerate(spans)          # (segment, anchor frame, anchors)
                   for f, count in zip(segment, self._anchor_counts(segment, anchors, room)) if count]
        if not holders:
            return torch.cat(picks), torch.cat(values)
        # every anchor frame at once: its anchors are its non-salient tokens of highest density-peaks score
        frames, counts = [f for _, f, _ in holders], [count for _, _, count in holders]
        order = rest[frames]                                                  # (H, N)
        candidates = x[frames].gather(1, order[..., None].expand(-1, -1, dim))
        score = density_peaks(candidates, self.neighbours, [room[f] for f in frames])
        best = score.sort(dim=-1, descending=True, stable=True).indices[:, :max(counts)]            # (H, C)
        anchor = (order.gather(1, best) + offset[frames]).flatten()
        # each segment's non-salient tokens join their most similar anchor of each of its anchor frames
        members = (rest + offset).flatten()[rows_up_to(room, per, device)]
        unit = F.normalize(flat.float(), dim=-1)
        similarity = (unit[members] @ unit[anchor].T).view(len(members), *best.shape)
        if min(counts) < best.shape[1]:                                      # fewer anchors than the most
            spare = torch.arange(best.shape[1], device=device) >= torch.tensor(counts, device=device)[:, None]
            similarity.masked_fill_(spare, float("-inf"))
        cluster = similarity.argmax(-1) + torch.arange(len(holders), device=device) * best.shape[1]    # (M, H)
        if len(spans) > 1:                                # another segment's anchor frame: a spare row
            segment_of = torch.tensor([i for i, segment in enumerate(spans) for f in segment for _ in range(room[f])],
                                      device=device)
            cluster.masked_fill_(segment_of[:, None] != torch.tensor([i for i, _, _ in holders], device=device),
                                 anchor.numel())
        joins = torch.zeros(anchor.numel() + 1, len(members), device=device).scatter_(0, cluster.T, 1.0)[:-1]
        size, total = joins.sum(1, keepdim=True), joins @ flat[members].float()
        weight = (1 / (size + 1)).clamp(min=self.beta)
        merged = weight * flat[anchor].float() + (1 - weight) * total / size.clamp(min=1)
        kept = rows_up_to(counts, best.shape[1], device)
        return torch.cat([*picks, anchor[kept]]), torch.cat([*values, merged[kept].to(x.dtype)])

    def _anchor_counts(self, segment: list[int], anchors: list[int], room: list[int]) -> list[int]:
        """Anchors of each frame of a segment: the segment's total shared by its anchor frames (the last, then every
        ``step``-th before it); what a frame has no room for goes to the others, last first."""
        total, last = sum(anchors[f] for f in segment), segment[-1]
        holders = [f for f in segment if (last - f) % self.step == 0]
        counts = dict.fromkeys(segment, 0)
        for f, c in zip(holders, shares(total, len(holders))):
            counts[f] = min(c, room[f])
        left = total - sum(counts.values())
        for f in reversed(segment):
            extra = min(left, room[f] - counts[f])
            counts[f] += extra
            left -= extra
        return [counts[f] for f in segment]
