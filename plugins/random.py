"""Random: a uniform random subset of each image's visual tokens, chosen before the LLM.

The baseline every benchmark needs (UniPruneBench finds it "surprisingly strong"). The subset of an image depends only
on ``seed`` and the image's index inside its sample, so a sample keeps the same tokens alone or in any batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Plugin, Signals


@dataclass
class Random(Plugin):
    seed: int = 0

    name = "random"
    summary = "uniform random subset of each image's tokens (seeded), before the LLM"

    def select(self, s: Signals, k: int) -> torch.Tensor:
        n = s.tokens.shape[1]
        picks = []
        for index in s.image_index:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            picks.append(torch.randperm(n, generator=g)[:k])
        return torch.stack(picks).to(s.tokens.device)
