"""HoliTom: "HoliTom: Holistic Token Merging for Fast Video Large Language Models" (Shao et al., NeurIPS 2025), its
outer (pre-LLM) stage, as the official code runs it on LLaVA-OneVision (cokeshao/HoliTom).

Rule:
- s_t(p): cosine of frames t and t + 1 at token position p. A segment [a, b] collapses the positions similar (> tau)
  across every consecutive pair inside it, saving (b - a) tokens each; the segmentation maximises the tokens saved
  (dynamic programming; ties favour shorter segments). Each such static position becomes the mean over the segment.
- The budget is spread over what is left: r' = r T N / (T N - saved) of every group.
- Dynamic tokens (each frame's other positions): the top r' by vision attention (the default D = 0: no contextual
  tokens).
- Static tokens of a segment: r' of them become DPC-kNN cluster centres (``vtr.kernels.dpc_clusters``, min(7, centres)
  neighbours); a centre takes beta x_c + (1 - beta) mean(its other members), beta = 0.6.
Defaults: retain 0.10 with tau = 0.65, or tau = 0.80 for larger retains (the paper's scripts).

In vtr a static token sits at its position in the segment's first frame and every token keeps its original position
(the code lists static tokens first and renumbers). The budget is spent exactly: groups get r' of their size by
largest remainders (the code rounds each group on its own); when the budget exceeds what is left after the collapse,
the segments that save least are not collapsed (vtr's extension). Vision attention: the engine's [CLS] attention,
the mean attention received in the feature layer on SigLIP/Qwen towers, as the code computes it. The inner stage
(``HoliTomInner``, merging at LLM layer 18 of 28, scaled to depth, or ``merge_layer``) follows, as the paper's scripts
run it (``inner=False`` leaves it out): a retain covers both stages, the outer one keeping twice what the inner one
keeps; by default the outer stage keeps 0.10 and the inner one half of that.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vtr.kernels import dpc_merge_groups, group_counts, group_means, rows_up_to, true_first

from .base import LLMPlugin, Plugin, Signals, apportion


def static_windows(similar: torch.Tensor) -> list[tuple[int, int, torch.Tensor, int]]:
    """The segmentation saving most tokens: ``similar`` (T - 1, N) bool, positions similar from frame t to t + 1.
    Returns (first, last, static positions, how many) per segment. A position is static over frames [a, i] when its
    run of similar steps ending at step i - 1 is at least i - a long, so every candidate's count comes from one
    read-back, and the dynamic programming runs on host ints (a read-back per candidate was T^2 / 2 GPU syncs)."""
    t, device = similar.shape[0] + 1, similar.device
    steps = torch.arange(t - 1, device=device)[:, None]
    run = steps - torch.cummax(torch.where(similar, -1, steps), dim=0).values        # (T - 1, N)
    static = (run[:, :, None] >= torch.arange(1, t, device=device)).sum(1).tolist()   # [step][length - 1]
    best, start = [0] * (t + 1), [0] * t                # best[i + 1]: most saved over frames 0..i
    for i in range(t):
        best[i + 1], start[i] = best[i], i              # frame i alone
        for a in range(i - 1, -1, -1):                  # the segment [a, i], longer and longer
            gain = best[a] + (i - a) * static[i - 1][i - a - 1]
            if gain > best[i + 1]:
                best[i + 1], start[i] = gain, a
    spans, i = [], t - 1
    while i >= 0:
        spans.append((start[i], i))
        i = start[i] - 1
    spans.reverse()
    # every segment's static positions at once (a lone frame's: none, its run can never be t long)
    last = torch.tensor([max(b - 1, 0) for _, b in spans], device=device)
    length = torch.tensor([b - a if b > a else t for a, b in spans], device=device)
    masks = run[last] >= length[:, None] if t > 1 else torch.zeros(1, similar.shape[1], dtype=torch.bool,
                                                                   device=device)
    return [(a, b, mask, static[b - 1][b - a - 1] if b > a else 0) for (a, b), mask in zip(spans, masks)]


@dataclass
class HoliTom(Plugin):
    name = "holitom"
    summary = "HoliTom: segments that collapse static tokens, dynamic tokens by attention, static ones clustered"
    where = "projector+llm"      # with its inner stage (the default)
    needs = ("frames", "cls_attention")
    default_retain = 0.10
    max_neighbours: ClassVar[int] = 7
    tau: float | None = None     # None: 0.65 at retain <= 0.10, else 0.80
    beta: float = 0.6
    inner: bool = True           # also the inner stage (HoliTomInner), as the paper's scripts run it
    merge_layer: int | None = None

    def pipeline(self) -> list[Plugin]:
        if not self.inner:
            return [self]
        outer = dict(tau=self.tau, beta=self.beta, inner=False)
        if self.tau is None:        # the threshold the paper pairs with the outer stage's own retention
            outer["tau"] = 0.65 if (self.retain is None or 2 * self.retain <= 0.10) else 0.80
        if self.budget is not None:
            return [HoliTom(budget=2 * self.budget, **outer), HoliTomInner(budget=self.budget, layer=self.merge_layer)]
        if self.retain is None:
            return [HoliTom(**outer), HoliTomInner(layer=self.merge_layer)]
        first = min(1.0, 2 * self.retain)
        return [HoliTom(retain=first, **outer), HoliTomInner(retain=self.retain / first, layer=self.merge_layer)]

    def reduce(self, s: Signals, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        t, h, w = s.frames
        per = h * w
        tau = self.tau if self.tau is not None else (0.65 if self.target_retain <= 0.10 else 0.80)
        picks, values = [], []
        for x, attention in zip(s.tokens.view(-1, t, per, s.tokens.shape[-1]), s.cls_attention.view(-1, t, per)):
            unit = F.normalize(x.float(), dim=-1)
            similar = (unit[:-1] * unit[1:]).sum(-1) > tau                   # (T - 1, N)
            p, v = self._video(x, attention, static_windows(similar), k)
            picks.append(p)
            values.append(v)
        return torch.stack(picks), torch.stack(values)

    def _video(self, x, attention, segments, k):
        t, per = x.shape[:2]
        saved = [(b - a) * count for a, b, _, count in segments]
        for i in sorted(range(len(segments)), key=lambda i: saved[i]):      # over budget: collapse fewer segments
            if t * per - sum(saved) >= k:
                break
            a, b, static, _ = segments[i]
            segments[i], saved[i] = (a, b, torch.zeros_like(static), 0), 0
        groups = []              # in order, each segment's static set (if any), then its frames' other tokens
        for i, (a, b, _, count) in enumerate(segments):
            groups += [("static", i, count)] * bool(count) + [("frame", f, per - count) for f in range(a, b + 1)]
        quotas = apportion(k, [size for _, _, size in groups])
        dynamic = [q for (kind, _, _), q in zip(groups, quotas) if kind == "frame"]           # frame by frame
        statics = [(i, q) for (kind, i, _), q in zip(groups, quotas) if kind == "static" and q]
        segment_of = torch.tensor([i for i, (a, b, _, _) in enumerate(segments) for _ in range(a, b + 1)],
                                  device=x.device)
        static = torch.stack([segment[2] for segment in segments])                  # (segments, N)
        # a frame's dynamic tokens: the top by attention (ties: the earlier), all frames at once
        top = attention.masked_fill(static[segment_of], float("-inf")).sort(dim=-1, descending=True, stable=True)
        top = top.indices + torch.arange(t, device=x.device)[:, None] * per
        picks = [top.flatten()[rows_up_to(dynamic, per, x.device)]]
        values = [x.flatten(0, 1)[picks[0]]]
        if statics:             # a segment's static tokens: their mean over it, clustered, all segments at once
            which = torch.tensor([i for i, _ in statics], device=x.device)
            mean = group_means(x.flatten(1), segment_of, len(segments))[which].view(len(statics), per, -1)
            order = true_first(static[which])                               # the static positions first
            tokens = mean.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
            quota = [q for _, q in statics]
            first = torch.tensor([segments[i][0] for i, _ in statics], device=x.device)[:, None] * per
            centre, merged = dpc_merge_groups(tokens, [segments[i][3] for i, _ in statics], quota,
                                              [min(self.max_neighbours, q) for q in quota], self.beta,
                                              index=order + first)
            picks.append(centre)
            values.append(merged.to(x.dtype))
        return torch.cat(picks), torch.cat(values)


@dataclass
class HoliTomInner(LLMPlugin):
    """HoliTom's inner stage: at LLM layer 18 of 28 (scaled to depth), the last token's attention in the layer before
    (head mean) keeps the top 1 - r of each video's tokens (r = 0.5); each dropped token is merged into its most
    cosine-similar survivor (hidden states entering the layer), in sequence order, h <- (h + h_dropped) / 2."""
    name = "holitom_inner"
    summary = "HoliTom inner stage: half the visual tokens merged into their most similar survivor at layer 18 of 28"
    default_retain = 0.5
    needs = ("last_attention",)
    layer: int | None = None

    def layers(self, num_layers: int) -> list[int]:
        layer = self.layer if self.layer is not None else max(1, round(18 * num_layers / 28))
        if not 1 <= layer < num_layers:
            raise ValueError(f"HoliTom: merge layer {layer} must be in [1, {num_layers})")
        return [layer]

    def score_layer(self, layer: int) -> int:
        return layer - 1

    def score(self, s: Signals) -> torch.Tensor:
        return s.last_attention

    def absorb(self, s: Signals, kept: torch.Tensor) -> torch.Tensor:
        tokens = s.at_visual(s.tokens).float()
        survivors = sum(s.budgets) if s.budgets is not None else int(kept.sum())     # keep(): exactly k per video
        alive, gone = true_first(kept).split([survivors, len(kept) - survivors])    # each ascending
        unit = F.normalize(tokens, dim=-1)
        similarity = unit[gone] @ unit[alive].T
        similarity.masked_fill_(s.image[gone][:, None] != s.image[alive][None, :], float("-inf"))   # own video only
        owner = similarity.argmax(1)                  # each dropped token's survivor (index among the kept)
        # the running average h <- (h + d) / 2 over a survivor's dropped tokens d_1 < ... < d_m (sequence order):
        # h / 2^m + sum_i d_i / 2^(m - i + 1)
        members = group_counts(owner, survivors)
        order = torch.argsort(owner, stable=True)                    # by survivor, sequence order inside
        rank = torch.empty_like(owner)
        rank[order] = torch.arange(len(owner), device=owner.device) - (torch.cumsum(members, 0) - members)[owner[order]]
        weight = 0.5 ** (members[owner] - rank).float()
        out = tokens.clone()
        out[alive] = tokens[alive] * (0.5 ** members.float())[:, None]
        return out.index_add_(0, alive[owner], tokens[gone] * weight[:, None])
