"""Average pooling: the visual tokens of each image averaged over a regular 2-D grid of cells, before the LLM (the
baseline of LLaVolta, "Efficient Multi-modal Models via Stage-wise Visual Context Compression": pooling away 70 % of
the tokens costs about 3 % on GQA; UniPruneBench's ``pool_pre_llm``).

Rule: the image's token grid (24 x 24 on LLaVA-1.5, the merged h x w grid on Qwen-VL, tiles stacked on InternVL) is
cut into a x b cells with a * b = k and a / b closest to the grid's aspect ratio (adaptive pooling: cell i spans rows
floor(i R / a) to ceil((i + 1) R / a)); each cell becomes the mean of its tokens, placed at the position of its
first (top-left) token. 2 x 2 pooling of 576 tokens is k = 144, 3 x 3 is k = 64. When k has no factor pair that fits
the grid, cells are runs of consecutive tokens in raster order instead.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from vtr.kernels import group_means

from .base import Plugin, Signals


def _shape(rows: int, cols: int, k: int) -> tuple[int, int] | None:
    pairs = [(a, k // a) for a in range(1, k + 1) if k % a == 0 and a <= rows and k // a <= cols]
    if not pairs:
        return None
    # the aspect ratio closest to the grid's; on a tie, fewer rows of cells
    return min(pairs, key=lambda p: (round(abs(math.log(p[0] / p[1]) - math.log(rows / cols)), 9), p[0]))


def cells(rows: int, cols: int, k: int) -> list[torch.Tensor]:
    """The k cells of a rows x cols grid (raster order), each as the token indices it averages."""
    shape = _shape(rows, cols, k)
    if shape is None:
        n = rows * cols
        return [torch.arange(i * n // k, (i + 1) * n // k) for i in range(k)]
    a, b = shape
    spans = lambda size, parts: [(i * size // parts, -(-(i + 1) * size // parts)) for i in range(parts)]  # noqa: E731
    grid = torch.arange(rows * cols).view(rows, cols)
    return [grid[r0:r1, c0:c1].flatten() for r0, r1 in spans(rows, a) for c0, c1 in spans(cols, b)]


@functools.lru_cache(maxsize=64)
def _pairs(rows: int, cols: int, k: int) -> tuple[torch.Tensor, ...]:
    """The cells of ``cells`` as (each cell's first token, the tokens of every cell, their cells), computed once per
    grid and budget (a cell's tokens may sit in the next cell too)."""
    with torch.inference_mode(False):        # cached: a first call under inference_mode must not make them unusable
        grid = cells(rows, cols, k)
        sizes = [len(c) for c in grid]
        cell = torch.repeat_interleave(torch.arange(k), torch.tensor(sizes), output_size=sum(sizes))
        return torch.stack([c[0] for c in grid]), torch.cat(grid), cell


@dataclass
class Pool(Plugin):
    name = "pool"
    summary = "2-D average pooling of each image's token grid down to the budget, before the LLM"
    needs = ("grid",)

    def reduce(self, s: Signals, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each cell's first token, which takes the mean of the cell."""
        picks, values = [], []
        for i, (rows, cols) in enumerate(s.token_grid):
            first, members, cell = (t.to(s.tokens.device) for t in _pairs(rows, cols, k))
            picks.append(first)
            values.append(group_means(s.tokens[i, members], cell, k).to(s.tokens.dtype))
        return torch.stack(picks), torch.stack(values)
