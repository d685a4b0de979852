"""Selection kernels shared by the plugins and the engine, on plain tensors.

None of them needs the model's attention weights: attention rows are recomputed for the few queries a method needs
(O(queries x keys) memory), and selection steps are vectorised over every image or sample of the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as Llama-family layers apply it: x (B, H, L, d), cos/sin (B, L, d)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def attention_rows(q: torch.Tensor, k: torch.Tensor, scale: float, key_mask: torch.Tensor | None = None,
                   chunk: int = 8192) -> torch.Tensor:
    """Softmax attention of a few query rows, averaged over heads.

    q: (B, H, Q, d) queries; k: (B, Hkv, L, d) keys, with H a multiple of Hkv (grouped-query attention);
    key_mask: (B, L) bool, False for keys the queries must not see. Returns (B, Q, L) in float32.
    Logits are computed in key chunks of ``chunk``, so memory stays O(B x H x Q x L).
    """
    b, h, nq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    qg = q.float().reshape(b, hkv, h // hkv, nq, d)
    logits = torch.cat([torch.einsum("bkgqd,bkld->bkgql", qg, k[:, :, s:s + chunk].float())
                        for s in range(0, n, chunk)], dim=-1) * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, None, :], float("-inf"))
    return logits.softmax(dim=-1).reshape(b, h, nq, n).mean(dim=1)


def gather_tokens(x: torch.Tensor, index: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens of x (B or 1, L, D) at index (B, L'): (B, L', D); rows where ``mask`` (B, L') is False become zero."""
    out = x.expand(index.shape[0], -1, -1).gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
    return out if mask is None else out * mask[..., None]


def max_min_diversity(x: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min diversity (farthest-point / k-center) on D = 1 - cos, per image.

    x: (I, P, D). The first pick is the token with the largest nearest-neighbour distance; each later pick maximises
    its distance to the closest token already picked. One vectorised update per step over all images.
    Returns (I, k) indices in pick order.
    """
    images, n = x.shape[:2]
    xn = F.normalize(x.float(), dim=-1)
    dist = 1 - xn @ xn.transpose(1, 2)                       # (I, P, P)
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    nearest = dist.masked_fill(eye, float("inf")).amin(dim=1)   # (I, P) nearest-neighbour distance
    rows = torch.arange(images, device=x.device)
    picks = torch.empty(images, k, dtype=torch.long, device=x.device)
    picks[:, 0] = nearest.argmax(dim=1)
    taken = torch.zeros(images, n, dtype=torch.bool, device=x.device)
    taken[rows, picks[:, 0]] = True
    closest = dist[rows, picks[:, 0]]                         # (I, P) distance to the nearest pick
    for step in range(1, k):
        nxt = closest.masked_fill(taken, float("-inf")).argmax(dim=1)
        picks[:, step] = nxt
        taken[rows, nxt] = True
        closest = torch.minimum(closest, dist[rows, nxt])
    return picks


def topk_per_group(scores: torch.Tensor, group: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep the ``k[g]`` highest-scoring entries of each group g.

    scores: (N,) float; group: (N,) long group id of each entry (>= 0); k: (G,) how many to keep per group.
    Returns an (N,) bool keep mask. Ties are broken by position (earlier first). Fully vectorised.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[torch.sort(group[order], stable=True).indices]          # by group, score-descending inside
    g_sorted = group[order]
    starts = torch.searchsorted(g_sorted, g_sorted, right=False)
    rank = torch.arange(len(order), device=scores.device) - starts
    keep = torch.zeros_like(group, dtype=torch.bool)
    keep[order] = rank < k[g_sorted]
    return keep
