"""PruneVid: "PruneVid: Visual Token Pruning for Efficient Video Large Language Models" (Huang et al., ACL 2025
Findings), as its official code runs it (Visual-AI/PruneVid, on PLLaVA). Two stages:

1. Before the LLM (``PruneVidMerge``): frames are clustered by their mean token (DPC-kNN, int(0.25 T) centres, 7
   neighbours) and the clusters made contiguous: each label keeps its longest run(s) (none if that is one frame),
   and each gap joins the longer neighbouring run (ties: the left one). In a segment of W frames a position is
   static when its mean cosine over all pairs of distinct frames is above tau = 0.8; static tokens become their mean
   over the segment. Then the static set of each segment and the dynamic set of each frame are clustered (DPC-kNN,
   int(0.5 n) centres, 7 neighbours; groups of 14 tokens or fewer are left as they are), a cluster becoming the mean
   of its members.
2. Inside the LLM (``PruneVidPrune``): at layer 10 of 32 (scaled to depth), the tokens after the video (the question
   and what follows) score each visual token by attention computed from the layer's input without RoPE and without a
   causal mask, max over heads, then max over those queries; alpha = 0.4 of each video's tokens are kept from the
   next layer on.

Budgets: by default stage 1 sets its own count as above and stage 2 keeps alpha. With ``retain`` r (or ``budget``),
stage 1 keeps r / alpha (at most all) and stage 2 the rest of the way to r; stage 1 then spends its budget exactly,
shared by its groups in proportion to their sizes (largest remainders). In a video so static that merging alone would
leave fewer tokens than that budget, stage 1 merges nothing over time and only clusters each frame's tokens.

Differences, documented: merged tokens sit at their cluster centre's position (a static one in the segment's first
frame) and keep their original positions (the code lists static tokens first); stage 2 keeps alpha of each video
rather than of each segment's static set and each frame's dynamic set, and leaves the KV cache of the layers before
it whole (the code prunes it too).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vtr.kernels import dpc_clusters, dpc_merge_groups, group_means, true_first

from .base import LLMPlugin, Plugin, Signals, apportion


def _run(labels: list[int], i: int, step: int) -> int:
    """Length of the run of ``labels[i]`` from i on, in direction ``step``."""
    n, label = 0, labels[i]
    while 0 <= i < len(labels) and labels[i] == label:
        n, i = n + 1, i + step
    return n


def contiguous(labels: list[int]) -> list[list[int]]:
    """PruneVid's refinement of frame cluster labels into segments (lists of frames)."""
    runs = []                                                   # [label, start, length]
    for f, label in enumerate(labels):
        if runs and runs[-1][0] == label and runs[-1][1] + runs[-1][2] == f:
            runs[-1][2] += 1
        else:
            runs.append([label, f, 1])
    longest = {}
    for label, _, n in runs:
        longest[label] = max(longest.get(label, 0), n)
    refined = [-1] * len(labels)
    for label, start, n in runs:
        if n == longest[label] > 1:
            refined[start:start + n] = [label] * n
    f = 0
    while f < len(refined):                                     # each gap joins the longer neighbouring run
        if refined[f] != -1:
            f += 1
            continue
        end = f
        while end < len(refined) and refined[end] == -1:
            end += 1
        left = _run(refined, f - 1, -1) if f else 0
        right = _run(refined, end, 1) if end < len(refined) else 0
        label = refined[f - 1] if left and left >= right else refined[end] if right else 0
        refined[f:end] = [label] * (end - f)
        f = end
    segments = []
    for f, label in enumerate(refined):
        if segments and refined[segments[-1][-1]] == label:
            segments[-1].append(f)
        else:
            segments.append([f])
    return segments


@dataclass
class PruneVidMerge(Plugin):
    name = "prunevid_merge"
    summary = "PruneVid stage 1: static tokens merged over time in segments, then spatial DPC-kNN clusters"
    needs = ("frames",)
    adaptive = True
    neighbours: ClassVar[int] = 7
    smallest: ClassVar[int] = 14             # groups of at most this many tokens are not clustered (default count)
    tau: float = 0.8
    segment_ratio: float = 0.25
    cluster_ratio: float = 0.5

    def reduce(self, s: Signals, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        t, h, w = s.frames
        picks, values = [], []
        for x in s.tokens.view(-1, t, h * w, s.tokens.shape[-1]):
            p, v = self._video(x, k)
            picks.append(p)
            values.append(v)
        return torch.stack(picks), torch.stack(values)

    def _video(self, x, k):
        t, per, dim = x.shape
        means = x.float().mean(1)
        centres = max(1, int(t * self.segment_ratio))
        segments = contiguous(dpc_clusters(means, centres, min(self.neighbours, t))[1].tolist()) if t > 1 else [[0]]
        frames, positions, tokens, sizes, rule = self._groups(x, segments, merge_static=True)
        if not self.counts_itself and sum(sizes) < k:          # the budget keeps more than merging leaves
            frames, positions, tokens, sizes, rule = self._groups(x, segments, merge_static=False)
        if self.counts_itself:
            quotas = [int(self.cluster_ratio * n) if n > self.smallest else n for n in sizes]
        else:                                                  # shared in the rule's order of the groups
            quotas = [0] * len(sizes)
            for group, quota in zip(rule, apportion(k, [sizes[g] for g in rule])):
                quotas[group] = quota
        # every group clustered at once; a group kept whole is its own clusters (each token its own mean)
        tokens_at = positions + torch.tensor(frames, device=x.device)[:, None] * per
        picks, merged = dpc_merge_groups(tokens, sizes, quotas, [min(self.neighbours, n) for n in sizes],
                                         index=tokens_at)
        return picks, merged.to(x.dtype)

    def _groups(self, x, segments, merge_static: bool) -> tuple:
        """The groups as padded rows: the static set of each segment that has one (it sits in the segment's first
        frame; a static token is its mean over the segment), then each frame's other tokens. Returns the frame of
        each (host ints), positions (G, N) in the frame, tokens (G, N, D) float, sizes (host ints) and the rule's
        order of the groups (segment by segment, its static set first). Without ``merge_static`` every token of a
        frame is in its frame's group."""
        t, per, dim = x.shape
        segment_of = torch.tensor([i for i, segment in enumerate(segments) for _ in segment], device=x.device)
        width = torch.tensor([len(segment) for segment in segments], device=x.device)[:, None]
        x = x.float()
        if merge_static:           # mean cosine over ordered pairs of distinct frames: (|sum of u|^2 - W) / W(W - 1)
            u = torch.zeros(len(segments), per, dim, device=x.device).index_add_(0, segment_of,
                                                                                 F.normalize(x, dim=-1))
            static = ((u ** 2).sum(-1) - width) / (width * (width - 1)).clamp(min=1) > self.tau
            static &= width > 1
        else:
            static = torch.zeros(len(segments), per, dtype=torch.bool, device=x.device)
        counts = static.sum(1).tolist()                        # one read-back, then indices instead of masks
        statics = [i for i, count in enumerate(counts) if count]
        order = torch.cat([true_first(static[statics]), true_first(~static)[segment_of]])
        index = order[..., None].expand(-1, -1, dim)
        tokens = x.gather(1, index[len(statics):])
        if statics:
            mean = group_means(x.flatten(1), segment_of, len(segments))[statics].view(len(statics), per, dim)
            tokens = torch.cat([mean.gather(1, index[:len(statics)]), tokens])
        rule = []
        for i, segment in enumerate(segments):
            rule += ([statics.index(i)] if counts[i] else []) + [len(statics) + f for f in segment]
        frames = [segments[i][0] for i in statics] + list(range(t))
        sizes = [counts[i] for i in statics] + [per - counts[i] for i, segment in enumerate(segments) for _ in segment]
        return frames, order, tokens, sizes, rule


@dataclass
class PruneVidPrune(LLMPlugin):
    name = "prunevid_prune"
    summary = "PruneVid stage 2: question-to-visual attention (no RoPE, max-max) at LLM layer 10 of 32"
    default_retain = 0.4
    needs = ("question_attention",)
    layer: int | None = None          # the scoring layer (paper: 10 of 32); None scales it to the model's depth

    def layers(self, num_layers: int) -> list[int]:
        score = self.layer if self.layer is not None else max(0, round(10 * num_layers / 32))
        if not 0 <= score < num_layers - 1:
            raise ValueError(f"PruneVid: layer {score} must score before the last of {num_layers} layers")
        return [score + 1]

    def score_layer(self, layer: int) -> int:
        return layer - 1

    def score(self, s: Signals) -> torch.Tensor:
        return s.question_attention


@dataclass
class PruneVid(Plugin):
    name = "prunevid"
    summary = "PruneVid: static merging + DPC-kNN clusters before the LLM, question-guided pruning at layer 10"
    where = "projector+llm"
    needs = ("frames",)
    alpha: float = 0.4
    tau: float = 0.8
    segment_ratio: float = 0.25
    cluster_ratio: float = 0.5
    layer: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.alpha <= 1:
            raise ValueError(f"PruneVid: alpha (the share stage 2 keeps) must be in (0, 1], got {self.alpha!r}")

    def pipeline(self) -> list[Plugin]:
        merge = dict(tau=self.tau, segment_ratio=self.segment_ratio, cluster_ratio=self.cluster_ratio)
        if self.budget is not None:
            first = PruneVidMerge(budget=math.ceil(self.budget / self.alpha), **merge)
            return [first, PruneVidPrune(budget=self.budget, layer=self.layer)]
        if self.retain is None:
            return [PruneVidMerge(**merge), PruneVidPrune(retain=self.alpha, layer=self.layer)]
        first = min(1.0, self.retain / self.alpha)
        return [PruneVidMerge(retain=first, **merge), PruneVidPrune(retain=self.retain / first, layer=self.layer)]
