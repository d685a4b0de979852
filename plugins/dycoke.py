"""DyCoke: "Dynamic Compression of Tokens for Fast Video Large Language Models" (Tao et al., CVPR 2025), its temporal
token merging (TTM), before the LLM.

Rule (as the official code runs it, KD-TAO/DyCoke ``llava_arch.py``): tokens of two frames are compared at the same
patch position by cosine similarity of the projected (and, on LLaVA-OneVision, pooled) features.
- pairs: for frames i = 0, 2, 4, ..., frame i + 1 keeps its tokens least similar to frame i;
- windows of 4: for i = 0, 4, 8, ... while i < T - 4, frame i + 2 keeps its tokens least similar to frame i.
So a window keeps frame i whole and prunes frames i+1, i+2 (against frame i) and i+3 (against frame i+2). The
pruned tokens are dropped ("merging" in the paper's name: the survivors stand for them). Paper default: a pruned frame
keeps int((1 - k) N) of its N tokens, k = 0.7 (about 49 % of a 32-frame video); with ``retain``/``budget`` the
budget is spent exactly: whole frames as above, the rest shared evenly by the pruned frames.

Differences from the official code, all documented here: kept tokens keep their raster order and original positions
(the code lists a pruned frame's survivors by similarity and renumbers positions); an odd last frame is kept whole
(the code drops it); a budget below the whole frames' tokens (vtr's extension; the paper has no such setting) also
prunes the whole frames, each keeping its tokens least similar to the frame after it; an image (one frame) is
kept whole, or under a budget keeps evenly spaced tokens, as ``framesample``.

The paper's second stage runs with ``kv=p`` (paper: p = 0.7 at layer 3): ``DyCokeKV``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtr.kernels import topk_per_group

from .base import DecodePlugin, Plugin, Signals, evenly, shares


def references(t: int) -> dict[int, int]:
    """Pruned frame -> the frame it is compared with (DyCoke's pairs, then windows of 4)."""
    ref = {i + 1: i for i in range(0, t - 1, 2)}
    ref.update({i + 2: i for i in range(0, t - 4, 4)})
    return ref


@dataclass
class DyCoke(Plugin):
    name = "dycoke"
    summary = "DyCoke TTM: frames pruned to their tokens least similar to the same patch of an earlier frame"
    needs = ("frames",)
    adaptive = True
    #: fraction of a pruned frame's tokens pruned (paper: K = 0.7), when neither retain nor budget is given
    k: float = 0.7
    #: the decode-time stage: the fraction of visual cache entries hidden from layers >= kv_layer (paper: 0.7)
    kv: float | None = None
    kv_layer: int = 3

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.k < 1:
            raise ValueError(f"DyCoke: k (the pruned fraction of a pruned frame) must be in [0, 1), got {self.k!r}")
        if self.kv is not None and not 0 <= self.kv < 1:
            raise ValueError(f"DyCoke: kv (the hidden fraction of the cache's visual entries) must be in [0, 1), "
                             f"got {self.kv!r}")

    def pipeline(self) -> list[Plugin]:
        if self.kv is None:
            return [self]
        ttm = DyCoke(retain=self.retain, budget=self.budget, k=self.k, per_frame=self.per_frame)
        return [ttm, DyCokeKV(retain=1 - self.kv, layer=self.kv_layer)]

    def select(self, s: Signals, k: int) -> torch.Tensor:
        images, n, d = s.tokens.shape
        t, h, w = s.frames
        per = h * w
        if t == 1:                              # an image: a whole first frame, or evenly spaced tokens (a budget)
            return evenly(per, per if self.counts_itself else k, s.tokens.device).expand(images, -1)
        x = F.normalize(s.tokens.float().view(images, t, per, d), dim=-1)
        ref = references(t)
        pruned = sorted(ref)
        whole = [f for f in range(t) if f not in ref]
        if self.counts_itself:
            keep = dict.fromkeys(pruned, int((1 - self.k) * per))
        elif k >= len(whole) * per:
            keep = dict(zip(pruned, shares(k - len(whole) * per, len(pruned))))
        else:                                  # below the whole frames: they are pruned too, the pruned ones emptied
            keep = dict.fromkeys(pruned, 0)
            keep.update(zip(whole, shares(k, len(whole))))
            ref.update({f: f + 1 if f + 1 < t else f - 1 for f in whole})
        picks = []
        for f in range(t):
            if f not in keep:
                picks.append(torch.arange(per, device=x.device).expand(images, per) + f * per)
            elif keep[f]:
                similarity = (x[:, f] * x[:, ref[f]]).sum(-1)                       # (images, per)
                picks.append(similarity.topk(keep[f], dim=-1, largest=False).indices + f * per)
        return torch.cat(picks, dim=1)


@dataclass
class DyCokeKV(DecodePlugin):
    """DyCoke's second stage: at every generated token, the new token's attention in layer L - 1 (head mean) over the
    cache's visual entries picks the top 1 - p of them (p = 0.7, L = 3); layers >= L attend to those only (the cache
    keeps every entry, as the official code's does, and positions stay). The choice is kept while the attention stays
    similar to the previous token's (cosine >= 0.9) and made again when it changes (the official code then falls
    back to the whole cache instead; vtr follows the paper's description)."""
    name = "dycoke_kv"
    summary = "DyCoke stage 2: while decoding, layers >= 3 see only the visual cache entries the new token attends to"
    default_retain = 0.3
    needs = ("last_attention",)
    layer: int = 3
    threshold: float = 0.9

    def decode_layer(self, num_layers: int) -> int:
        if not 1 <= self.layer < num_layers:
            raise ValueError(f"DyCoke: kv_layer must be in [1, {num_layers}) (it scores with the layer before)")
        return self.layer

    def visible(self, s: Signals, k: torch.Tensor, state: dict) -> torch.Tensor:
        scores = s.at_visual(s.last_attention).float()
        chosen = topk_per_group(scores, s.image, k)
        previous, kept = state.get("attention"), state.get("visible")
        if previous is not None and previous.shape == scores.shape:     # per image: stable attention keeps its choice
            images = len(s.host(k)[0])
            dot = torch.zeros(images, device=scores.device).index_add_(0, s.image, scores * previous)
            norms = [torch.zeros(images, device=scores.device).index_add_(0, s.image, v * v).sqrt()
                     for v in (scores, previous)]
            stable = dot / (norms[0] * norms[1]).clamp(min=1e-12) >= self.threshold
            chosen = torch.where(stable[s.image], kept, chosen)
        state.update(attention=scores, visible=chosen)
        return chosen
