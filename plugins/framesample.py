"""Frame sampling: the video baseline that spends the same token budget on fewer frames, kept whole ("uniform
sampling ... equidistant frames for video", the baseline F2C and VTC-Bench compare with).

Rule: a budget of k tokens on a video of T frames of h x w tokens keeps f = ceil(k / (h w)) frames, the centres of f
equal segments of the video (frame floor((i + 1/2) T / f)); when k is not a multiple of h w, each of them keeps k / f
tokens (the first k mod f keep one more), evenly spaced in raster order. An image is a one-frame video. Acts before
the LLM; needs nothing from the model but its frames.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Plugin, Signals, evenly, shares


@dataclass
class FrameSample(Plugin):
    name = "framesample"
    summary = "video baseline: the token budget spent on fewer, equidistant frames kept whole, before the LLM"
    needs = ("frames",)

    def select(self, s: Signals, k: int) -> torch.Tensor:
        device = s.tokens.device
        t, h, w = s.frames
        per = h * w
        f = min(t, -(-k // per))
        frames = evenly(t, f).tolist()
        picks = torch.cat([frame * per + evenly(per, c, device) for frame, c in zip(frames, shares(k, f))])
        return picks.repeat(s.tokens.shape[0], 1)
