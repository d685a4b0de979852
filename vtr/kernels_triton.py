"""Triton versions of the selection kernels whose PyTorch form is a long chain of small launches, for CUDA tensors.

``vtr.kernels`` picks them when Triton is installed and the tensors are on a GPU, and falls back to PyTorch (NumPy on
a CPU) everywhere else. With ``TRITON_INTERPRET=1`` they run on CPU tensors, which is how the tests compare them with
the fallbacks on a machine without a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _max_min_greedy(sim_ptr, first_ptr, picks_ptr, n, k, stride_image, stride_row, BLOCK: tl.constexpr):
    # One program per image: ``closest`` (each token's highest similarity to a pick) stays in registers for all k
    # steps, where the PyTorch loop launches three kernels per step.
    image = tl.program_id(0)
    offsets = tl.arange(0, BLOCK)
    valid = offsets < n
    rows = sim_ptr + image * stride_image
    pick = tl.load(first_ptr + image)
    tl.store(picks_ptr + image * k, pick)
    closest = tl.load(rows + pick * stride_row + offsets, mask=valid, other=float("inf"))
    for step in range(1, k):
        closest = tl.where(offsets == pick, float("inf"), closest)        # a pick is never picked again
        pick = tl.argmin(closest, axis=0).to(tl.int64)                     # ties: the first index, as torch.argmin
        tl.store(picks_ptr + image * k + step, pick)
        row = tl.load(rows + pick * stride_row + offsets, mask=valid, other=float("inf"))
        closest = tl.maximum(closest, row)


def max_min_greedy(sim: torch.Tensor, first: torch.Tensor, k: int) -> torch.Tensor:
    """The k - 1 greedy max-min steps of ``vtr.kernels.max_min_diversity`` in one launch: sim (I, P, P) float32 with
    -inf on the diagonal, first (I,) long, k <= P. Returns (I, k) long indices in pick order."""
    images, n = sim.shape[:2]
    picks = torch.empty(images, k, dtype=torch.long, device=sim.device)
    _max_min_greedy[(images,)](sim, first.long().contiguous(), picks, n, k, sim.stride(0), sim.stride(1),
                               BLOCK=triton.next_power_of_2(n))
    return picks
