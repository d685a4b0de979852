"""``vtr bench --kernels``: the selection steps that are sequential by nature, timed alone at image, high-resolution
and video sizes (576, 2,880 and 8,192 candidates): greedy max-min diversity (DivPrune, k-center; k steps) and
VisPruner's duplicate-removal rounds, each from one precomputed similarity matrix, as the fused Triton kernel (CUDA
with Triton), the PyTorch loop and the host (NumPy) loop; and the attention row of the last query over every key at
the 7B's shape (32 query heads, 8 key heads in groups, head size 128), recomputed in key chunks (FastV, PDrop) against
the full softmax matrix a method reading attention weights would need. Every implementation of a step must pick the
same tokens ("same")."""
from __future__ import annotations

import json
import statistics
import time

import torch
import torch.nn.functional as F

from vtr import kernels
from vtr.kernels import (NEIGHBOURS, _duplicate_rounds_numpy, _greedy_numpy, _greedy_torch, attention_rows,
                         duplicate_rounds)
from vtr.plugins.vispruner import DROP_PER_ROUND

SIZES = (576, 2880, 8192)
QUICK_SIZES = (64, 160)
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def _time(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls after one warm-up (Triton compiles there), and the last result."""
    out, times = fn(), []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _similarity(n: int, device: torch.device, seed: int) -> torch.Tensor:
    x = torch.randn(1, n, 64, generator=torch.Generator().manual_seed(seed)).to(device)
    xn = F.normalize(x, dim=-1)
    return xn @ xn.transpose(1, 2)


def _rows(name: str, n: int, k: int, impls: dict, device: torch.device, repeats: int) -> list[dict]:
    timed = {impl: _time(fn, device, repeats) for impl, fn in impls.items()}
    picks = [out.cpu() for _, out in timed.values()]
    same = all(torch.equal(p, picks[0]) for p in picks)
    return [{"kernel": name, "n": n, "k": k, "impl": impl, "ms": 1e3 * seconds, "same": same}
            for impl, (seconds, _) in timed.items()]


def run(repeats: int = 5, quick: bool = False, device: str = "cpu", out: str = "") -> dict:
    device = torch.device(device)
    fused = kernels._triton() if device.type == "cuda" else None
    rows = []
    for n in QUICK_SIZES if quick else SIZES:
        keep = n // 4
        sim = _similarity(n, device, seed=n)
        greedy = sim.clone()
        greedy.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
        first = greedy.amax(dim=1).argmin(dim=1)
        impls = {"numpy": lambda: _greedy_numpy(greedy.cpu(), first.cpu(), keep),
                 "torch": lambda: _greedy_torch(greedy, first, keep)}
        if fused is not None:
            impls["triton"] = lambda: fused.max_min_greedy(greedy, first, keep)
        rows += _rows("max-min diversity", n, keep, impls, device, repeats)

        drops = duplicate_rounds(n, keep, DROP_PER_ROUND)
        impls = {"numpy": lambda: _duplicate_rounds_numpy(sim.cpu().numpy(), drops, keep)}
        if fused is not None and n <= 8192:
            impls["triton"] = lambda: fused.duplicate_removal(sim, drops, keep, NEIGHBOURS)
        rows += _rows("duplicate removal", n, keep, impls, device, repeats)

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        g = torch.Generator().manual_seed(n)
        q = torch.randn(1, HEADS, 1, HEAD_DIM, generator=g).to(device, dtype)
        k = torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=g).to(device, dtype)
        scale = HEAD_DIM ** -0.5
        row_s, _ = _time(lambda: attention_rows(q, k, scale), device, repeats)
        row = {"kernel": "last-query attention", "n": n, "k": 1, "impl": "rows", "ms": 1e3 * row_s,
               "bytes": 4 * HEADS * n, "full_ms": None, "full_bytes": 4 * HEADS * n * n}
        if device.type == "cuda" or n <= 2880:       # the full matrix of 8,192 tokens is 8 GiB: not on this CPU
            every = torch.randn(1, HEADS, n, HEAD_DIM, generator=g).to(device, dtype)   # all queries, as weights need
            keys = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
            row["full_ms"] = 1e3 * _time(lambda: (every @ keys.transpose(-1, -2) * scale).float().softmax(-1)
                                         .mean(1)[:, -1], device, repeats)[0]
        rows.append(row)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"cpu ({torch.get_num_threads()} threads)", "torch": torch.__version__, "triton": fused is not None,
              "repeats": repeats, "rows": rows}
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def format_table(result: dict) -> str:
    lines = [f"selection kernels on {result['device']} (median of {result['repeats']}; ms)",
             f"{'kernel':22s} {'n':>6s} {'k':>5s} {'impl':>7s} {'ms':>9s}  note"]
    for r in result["rows"]:
        if "same" in r:
            note = f"picks {'the same' if r['same'] else 'DIFFER'}"
        else:
            full = "not run" if r["full_ms"] is None else f"{r['full_ms']:.2f} ms"
            note = f"full weights {full}, {r['full_bytes'] / 2 ** 20:.0f} MiB (rows: {r['bytes'] / 2 ** 10:.0f} KiB)"
        lines.append(f"{r['kernel']:22s} {r['n']:6d} {r['k']:5d} {r['impl']:>7s} {r['ms']:9.2f}  {note}")
    return "\n".join(lines)
