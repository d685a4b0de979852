"""FrameFusion: "FrameFusion: Combining Similarity and Importance for Video Token Reduction on Large Visual Language
Models" (Fu et al., ICCV 2025), as its official code runs it (thu-nics/FrameFusion), in the LLM.

Rule, at the entrance of layers 0, 1, 2, ... of each video:
- merge: each token's similarity is its cosine with the previous surviving token of the same patch (the same place
  in the nearest earlier frame left). With rho the share of tokens at or above S = 0.6 and U the reduction the cost
  model still allows: if rho < U, every such token merges (a run of them into the token before the run: the
  unweighted mean of the run and that token) and merging goes on at the next layer unless rho < 0.1; otherwise
  only the top int(U N) merge and the method is done;
- prune, once, at the layer after merging stops: the last token's attention (head mean) keeps the top 1 - P.
- cost model (cost = 0.3, the average share of visual tokens over the layers): with merge ratios s_1..s_n,
  S_i = prod_{j <= i} (1 - s_j), remain = L cost - sum_i S_i; U (and P) = 1 - remain / ((L - n) S_n), 0 if negative.
With ``retain``/``budget`` instead, merging stops where the budget is reached and the prune keeps exactly it.

Differences, documented: merges happen at layer entrances (the code merges once more after layer 0's attention, then
after each layer's attention); L is the model's depth (the code takes 28 for every model); a Qwen frame is a temporal
patch of 2 frames; newline tokens are never merged (the code gives them patch types of their own).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vtr.kernels import group_counts, topk_per_group

from .base import LLMPlugin, Signals


def allowed(ratios: list[float], depth: int, cost: float) -> float:
    """The reduction the cost model still allows after merges of ``ratios``."""
    kept, spent = 1.0, 0.0
    for r in ratios:
        kept *= 1 - r
        spent += kept
    remain = depth * cost - spent
    return min(1.0, max(0.0, 1 - remain / ((depth - len(ratios)) * kept)))


@dataclass
class FrameFusion(LLMPlugin):
    name = "framefusion"
    summary = "FrameFusion: same-patch tokens of consecutive frames merged in early LLM layers, then pruned by attention"
    needs = ("frames", "patches", "last_attention")
    adaptive = True
    cost: float = 0.3
    similarity: float = 0.6
    ratio_floor: float = 0.1
    depth: int = field(default=28, init=False, repr=False)

    def layers(self, num_layers: int) -> list[int]:
        self.depth = num_layers
        return list(range(num_layers - 1))

    def stage_counts(self, n: int, stages: int = 1) -> list[int]:
        return [self.keep_count(n)] * stages

    def _last(self, state: dict) -> bool:
        """Whether the coming stage is the last one; with a budget, videos still merging are pruned there."""
        return not self.counts_itself and state.get("calls", 0) == self.depth - 2

    def stage_needs(self, state: dict) -> tuple[str, ...]:
        phases = state.get("phase", {}).values()
        return ("last_attention",) if "prune" in phases or (self._last(state) and "merge" in phases) else ()

    def finished(self, state: dict) -> bool:
        phase = state.get("phase")
        return bool(phase) and all(p == "done" for p in phase.values())

    def drop(self, s: Signals, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        phase, ratios = s.state.setdefault("phase", {}), s.state.setdefault("ratios", {})
        if self._last(s.state):
            phase.update({i: "prune" for i, p in phase.items() if p == "merge"})
        s.state["calls"] = s.state.get("calls", 0) + 1
        image, tokens = s.image, s.at_visual(s.tokens)
        keep, values = torch.ones_like(image, dtype=torch.bool), tokens.clone()
        pruning = [i for i in range(len(k)) if phase.get(i) == "prune"]
        counts, budgets = s.host(k)                   # each video's tokens here and its budget, host ints
        if pruning:                                   # the last token's attention keeps the top 1 - P
            scores = s.at_visual(s.last_attention).float()
            want = [budgets[i] if not self.counts_itself else
                    round(counts[i] * (1 - allowed(ratios.get(i, []), self.depth, self.cost))) for i in range(len(k))]
            chosen = topk_per_group(scores, image, torch.tensor(want, device=k.device))
            keep = torch.where(torch.isin(image, torch.tensor(pruning, device=k.device)), chosen, keep)
            phase.update({i: "done" for i in pruning})
        merging = [i for i in range(len(k)) if phase.setdefault(i, "merge") == "merge"]
        if not merging:
            return keep, values if pruning else None
        # each token's predecessor: the previous token of the same video and patch, in frame order
        order = torch.argsort(image * (1 << 32) + s.patch, stable=True)       # (video, patch); frames ascend inside
        group = image[order] * (1 << 32) + s.patch[order]
        first = torch.ones_like(group, dtype=torch.bool)
        first[1:] = group[1:] != group[:-1]
        unit = F.normalize(tokens[order].float(), dim=-1)
        sim = torch.full_like(group, -2.0, dtype=torch.float)
        sim[1:] = (unit[1:] * unit[:-1]).sum(-1)
        sim.masked_fill_(first, -2.0)
        similar = sim >= self.similarity
        groups = len(k)                               # every video's count of similar tokens in one read-back
        matching = group_counts(torch.where(similar, image[order], groups), groups + 1).tolist()
        selected = torch.zeros_like(first)
        for i in merging:
            n, matches = counts[i], matching[i]
            if not n:                                  # no tokens of this video here: nothing to merge
                continue
            mine = image[order] == i
            room = n if self.counts_itself else n - budgets[i]          # a budget: never below it
            done = ratios.setdefault(i, [])
            cap = allowed(done, self.depth, self.cost) if self.counts_itself else 1.0
            rho = matches / n
            if rho < cap and matches < room:
                selected |= mine & similar
                done.append(rho)
                phase[i] = "prune" if rho < self.ratio_floor else "merge"
            else:                                      # the budget is met by merging alone
                candidates = torch.where(mine & ~first, sim, torch.tensor(float("-inf"), device=sim.device))
                selected[candidates.topk(min(int(cap * n), room)).indices] = True
                phase[i] = "done"
        # a run of selected tokens folds into the token before it (its anchor): their unweighted mean
        size = len(order)
        position = torch.arange(size, device=order.device)
        anchor = torch.cummax(torch.where(selected, -1, position), 0).values
        total = torch.zeros_like(unit).index_add_(0, anchor, tokens[order].float())
        merged = (total / group_counts(anchor, size).clamp(min=1)[:, None]).to(tokens.dtype)
        has_members = group_counts(torch.where(selected, anchor, size), size + 1)[:size] > 0
        keep[order] = keep[order] & ~selected
        values[order] = torch.where(has_members[:, None], merged, values[order])
        return keep, values
