"""Triton versions of the selection kernels whose PyTorch form is a long chain of small launches or a host loop, for
CUDA tensors.

``vtr.kernels`` picks them when Triton is installed and the tensors are on a GPU, and falls back to PyTorch (NumPy on
a CPU) everywhere else. With ``TRITON_INTERPRET=1`` they run on CPU tensors, which is how the tests compare them with
the fallbacks on a machine without a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


ROWS = 64           # even tokens duplicate removal looks up at a time


def warps(block: int) -> int:
    """Warps for one program that reduces a ``block`` of values per step: Triton's fused-softmax tutorial rule (more
    warps, fewer values per thread, shorter reductions); not tuned on a GPU here."""
    return 4 if block < 2048 else 8 if block < 4096 else 16


@triton.jit
def _max_min_greedy(sim_ptr, first_ptr, picks_ptr, n, k, stride_image, stride_row, BLOCK: tl.constexpr):
    # One program per image: ``closest`` (each token's highest similarity to a pick) stays in registers for all k
    # steps, where the PyTorch loop launches three kernels per step.
    image = tl.program_id(0).to(tl.int64)                              # image * stride may pass 2**31
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
    block = triton.next_power_of_2(n)
    picks = torch.empty(images, k, dtype=torch.long, device=sim.device)
    _max_min_greedy[(images,)](sim, first.long().contiguous(), picks, n, k, sim.stride(0), sim.stride(1),
                               BLOCK=block, num_warps=warps(block))
    return picks


@triton.jit
def _duplicate_removal(sim_ptr, near_ptr, drops_ptr, evens_ptr, odd_ptr, dup_ptr, out_ptr, n, keep, rounds,
                       stride_image, stride_row, PER_ROUND: tl.constexpr, NEAR: tl.constexpr, BLOCK: tl.constexpr,
                       ROWS: tl.constexpr):
    # One program per image runs every round, the alive set in registers. An even token's highest similarity to an
    # odd one is the first odd token among its NEAR most similar (``near_ptr``, sorted): the rest of its row is no
    # higher. ROWS even tokens are looked up at a time; only a token with no odd one there reads its row, alone (a
    # ROWS x BLOCK tile of rows would bound ROWS by the registers, and the rounds' sequential steps grow as M / ROWS).
    image = tl.program_id(0).to(tl.int64)                              # image * stride may pass 2**31
    offsets = tl.arange(0, BLOCK)
    near_k = tl.arange(0, NEAR)
    slot = tl.arange(0, ROWS)
    sim = sim_ptr + image * stride_image
    near = near_ptr + image * BLOCK * NEAR
    evens_buf, odd_buf, dup_buf = evens_ptr + image * BLOCK, odd_ptr + image * BLOCK, dup_ptr + image * BLOCK
    alive = offsets < n
    for r in range(rounds):
        rank = tl.cumsum(alive.to(tl.int32), axis=0) - 1                  # position among the alive tokens
        even = alive & (rank % 2 == 0)
        odd = alive & (rank % 2 == 1)
        tl.store(evens_buf + rank // 2, offsets, mask=even)               # the j-th even token's index at slot j
        tl.store(odd_buf + offsets, odd.to(tl.int8))
        evens = (tl.sum(alive.to(tl.int32), axis=0) + 1) // 2
        tl.debug_barrier()
        for start in range(0, evens, ROWS):
            j = start + slot
            valid = j < evens
            row = tl.load(evens_buf + j, mask=valid, other=0)
            neighbour = tl.load(near + row[:, None] * NEAR + near_k[None, :], mask=valid[:, None], other=0)
            is_odd = tl.load(odd_buf + neighbour, mask=valid[:, None], other=0) != 0
            first = tl.min(tl.where(is_odd, near_k[None, :], NEAR), axis=1)   # NEAR: none of them is odd
            best = tl.sum(tl.where(near_k[None, :] == first[:, None], neighbour, 0), axis=1)
            dup = tl.load(sim + row * stride_row + best, mask=valid & (first < NEAR), other=float("-inf"))
            missed = valid & (first == NEAR)
            while tl.sum(missed.to(tl.int32), axis=0) > 0:
                one = slot == tl.min(tl.where(missed, slot, ROWS), axis=0)
                token = tl.sum(tl.where(one, row, 0), axis=0)
                line = tl.load(sim + token * stride_row + offsets, mask=odd, other=float("-inf"))
                dup = tl.where(one, tl.max(line, axis=0), dup)
                missed = missed & ~one
            tl.store(dup_buf + j, dup, mask=valid)
        tl.debug_barrier()
        dup = tl.load(dup_buf + rank // 2, mask=even, other=float("-inf"))
        drops = tl.load(drops_ptr + r)
        for step in range(PER_ROUND):
            pick = tl.argmax(tl.where(even, dup, float("-inf")), axis=0, tie_break_left=True)   # ties: the earlier
            pick = tl.where(step < drops, pick, BLOCK)                        # past this round's drops: no token
            alive = alive & (offsets != pick)
            even = even & (offsets != pick)
        tl.debug_barrier()                                                # the scratch rows are rewritten next round
    rank = tl.cumsum(alive.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + image * keep + rank, offsets, mask=alive & (rank < keep))


def duplicate_removal(sim: torch.Tensor, drops: list[int], keep: int, neighbours: int) -> torch.Tensor:
    """Every round of ``vtr.kernels.duplicate_removal`` in one launch: sim (I, M, M) float32, drops the tokens each
    round removes (known in advance: they depend on the counts only), 1 <= keep <= M, ``neighbours`` (a power of 2)
    nearest tokens looked among first. Returns (I, keep) long indices, ascending."""
    images, n = sim.shape[:2]
    block = triton.next_power_of_2(n)
    near = torch.arange(n, device=sim.device, dtype=torch.int32)[None, :, None].repeat(images, 1, neighbours)
    near[..., :min(neighbours, n)] = sim.topk(min(neighbours, n), dim=-1).indices.int()   # padded with the token,
    near = torch.nn.functional.pad(near, (0, 0, 0, block - n)).contiguous()     # which is never odd to itself
    out = torch.empty(images, keep, dtype=torch.long, device=sim.device)
    dup = torch.empty(images, block, device=sim.device)
    evens = torch.empty(images, block, dtype=torch.int32, device=sim.device)
    odd = torch.empty(images, block, dtype=torch.int8, device=sim.device)
    schedule = torch.tensor(drops or [0], dtype=torch.int32).to(sim.device, non_blocking=True)
    _duplicate_removal[(images,)](sim, near, schedule, evens, odd, dup, out, n, keep, len(drops), sim.stride(0),
                                 sim.stride(1), PER_ROUND=max(drops, default=1), NEAR=neighbours, BLOCK=block,
                                 ROWS=ROWS, num_warps=warps(block))
    return out
