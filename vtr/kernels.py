"""Selection kernels shared by the plugins and the engine, on plain tensors.

None of them needs the model's attention weights: attention rows are recomputed for the few queries a method needs
(O(queries x keys) memory), and selection steps are vectorised over every image or sample of the batch. On CUDA the
greedy max-min loop and the duplicate-removal rounds run as fused Triton kernels where Triton is installed
(``vtr.kernels_triton``).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


RECEIVED_BLOCK_BYTES = 256 * 2 ** 20   # attention_received off the CPU: logits block size


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as Llama-family layers apply it, ``x * cos + rotate_half(x) * sin``: x (B, H, L, d), cos/sin
    (B, L, d). Written as one product and two in-place halves, without rotate_half's copy: half the passes."""
    half = x.shape[-1] // 2
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


def attention_rows(q: torch.Tensor, k: torch.Tensor, scale: float, key_mask: torch.Tensor | None = None,
                   chunk: int = 8192, heads: str = "mean", query_slots: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of a few query rows, averaged over heads (``heads="max"``: their maximum).

    q: (B, H, Q, d) queries; k: (B, Hkv, L, d) keys, with H a multiple of Hkv (grouped-query attention);
    key_mask: (B, L) bool, False for keys the queries must not see; query_slots: (B, Q) each query's own index
    among the keys, for the causal mask (None: no causal mask). Returns (B, Q, L) in float32.
    Logits are computed in key chunks of ``chunk``, so memory stays O(B x H x Q x L).
    """
    b, h, nq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    qg = (q.float() * scale).reshape(b, hkv, h // hkv * nq, d)      # a group's query heads share their keys
    kt = k.float().transpose(-1, -2)
    logits = qg @ kt if n <= chunk else torch.cat([qg @ kt[..., s:s + chunk] for s in range(0, n, chunk)], dim=-1)
    logits = logits.view(b, hkv, h // hkv, nq, n)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, None, :], float("-inf"))
    if query_slots is not None:
        later = torch.arange(n, device=q.device) > query_slots[..., None]                 # (B, Q, L)
        logits = logits.masked_fill(later[:, None, None], float("-inf"))
    probs = logits.softmax(dim=-1).reshape(b, h, nq, n)
    return probs.amax(dim=1) if heads == "max" else probs.mean(dim=1)


def attention_received(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int | None = None) -> torch.Tensor:
    """Mean softmax attention each token receives from all queries of its own sequence, averaged over heads.

    q, k: (..., H, N, d), one sequence per leading index. Returns (..., N) in float32. Query rows are processed in
    chunks of ``chunk``, so memory stays O(H x chunk x N); the full attention matrix is never held. By default 64 on a
    CPU, where small blocks stay in cache (64 queries ran about 3x faster than 1,024 on 8 x 2 heads x 729 tokens);
    elsewhere as many as keep a block of logits within ``RECEIVED_BLOCK_BYTES`` (each block costs launches).
    """
    if chunk is None:
        per_query = 4 * math.prod(k.shape[:-1])                 # float32 logits of one query row, all sequences
        chunk = 64 if q.device.type == "cpu" else max(64, RECEIVED_BLOCK_BYTES // per_query)
    qs, kt = q.float() * scale, k.float().transpose(-1, -2)
    received = torch.zeros(k.shape[:-3] + k.shape[-2:-1], device=k.device)
    for s in range(0, q.shape[-2], chunk):
        received += (qs[..., s:s + chunk, :] @ kt).softmax(-1).sum(dim=(-3, -2))
    return received / (q.shape[-3] * q.shape[-2])


def gather_tokens(x: torch.Tensor, index: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens of x (B or 1, L, D) at index (B, L'): (B, L', D); rows where ``mask`` (B, L') is False become zero.
    One row ``index_select`` on the flattened tokens (several times faster than ``gather`` with an expanded index)."""
    b, width = index.shape
    if x.shape[0] == 1:
        rows = index.flatten()
    else:
        rows = (index + torch.arange(b, device=index.device)[:, None] * x.shape[1]).flatten()
    out = x.reshape(-1, x.shape[-1]).index_select(0, rows).view(b, width, x.shape[-1])
    return out if mask is None else out.masked_fill_(~mask[..., None], 0)


def max_min_diversity(x: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min diversity (farthest-point / k-center) on D = 1 - cos, per image.

    x: (I, P, D). The first pick is the token with the largest nearest-neighbour distance; each later pick maximises
    its distance to the closest token already picked. Works on cosine similarity (max-min on 1 - cos is min-max on
    cos). Returns (I, k) indices in pick order.
    """
    xn = F.normalize(x.detach().float(), dim=-1)            # selection is not differentiable
    sim = xn @ xn.transpose(1, 2)                             # (I, P, P)
    sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))         # a token is not its own neighbour
    first = sim.amax(dim=1).argmin(dim=1)                     # the largest nearest-neighbour distance
    if sim.device.type == "cpu":
        return _greedy_numpy(sim, first, k)
    fused = _triton() if sim.is_cuda else None
    return fused.max_min_greedy(sim, first, k) if fused is not None else _greedy_torch(sim, first, k)


def _triton():
    """``vtr.kernels_triton`` where Triton is installed, else None."""
    try:
        from vtr import kernels_triton
    except ImportError:
        return None
    return kernels_triton


def _greedy_torch(sim: torch.Tensor, first: torch.Tensor, k: int) -> torch.Tensor:
    """The k - 1 greedy steps, one vectorised update over all images per step. ``closest``: each token's highest
    similarity to a pick; picked tokens are set to +inf so they are never picked again."""
    images, n = sim.shape[:2]
    flat = sim.view(images * n, n)
    offsets = torch.arange(images, device=sim.device) * n
    closest = flat.index_select(0, offsets + first)
    picks = [first]
    inf = torch.full((images, 1), float("inf"), device=sim.device)
    for _ in range(1, k):
        closest.scatter_(1, picks[-1][:, None], inf)
        picks.append(closest.argmin(dim=1))
        torch.maximum(closest, flat.index_select(0, offsets + picks[-1]), out=closest)
    return torch.stack(picks, dim=1)


def _greedy_numpy(sim: torch.Tensor, first: torch.Tensor, k: int) -> torch.Tensor:
    """The same steps as ``_greedy_torch`` in NumPy: on a CPU each step costs ~5 us instead of ~20 us of per-op
    dispatch, which matters because the k steps are sequential."""
    s = sim.numpy()
    rows = np.arange(s.shape[0])
    picks = np.empty((s.shape[0], k), dtype=np.int64)
    picks[:, 0] = first.numpy()
    closest = s[rows, picks[:, 0]]
    for step in range(1, k):
        closest[rows, picks[:, step - 1]] = np.inf
        picks[:, step] = closest.argmin(axis=1)
        np.maximum(closest, s[rows, picks[:, step]], out=closest)
    return torch.from_numpy(picks)


NEIGHBOURS = 16          # how many nearest tokens duplicate removal looks among before it reads a whole row


def duplicate_removal(x: torch.Tensor, keep: int, per_round: int) -> torch.Tensor:
    """Repeated bipartite duplicate removal (VisPruner's diverse tokens), per image: x (I, M, D) -> (I, keep) indices,
    ascending. Each round splits the remaining tokens (in order) into even and odd ones, scores each even token by its
    highest cosine similarity to an odd one and removes the ``per_round`` highest (ties: the earlier), until ``keep``
    are left. The similarity matrix is one product; the rounds, short sequential steps, run as one Triton kernel on a
    GPU and on the host elsewhere (a device loop would pay launches and a sync per round). Both (the host above 600
    tokens) look for an even token's highest similarity among its ``NEIGHBOURS`` nearest first, and read its row only
    when none of them is odd (the host then keeps that row's nearest alive tokens as the token's new list)."""
    images, n = x.shape[:2]
    if not 0 <= keep <= n:
        raise ValueError(f"duplicate_removal: keep must be in 0..{n}, got {keep}")
    if keep == 0:
        return torch.empty(images, 0, dtype=torch.long, device=x.device)
    xn = F.normalize(x.detach().float(), dim=-1)
    sim = xn @ xn.transpose(1, 2)
    drops = duplicate_rounds(n, keep, per_round)
    fused = _triton() if sim.is_cuda and n <= 8192 else None
    if fused is not None:
        return fused.duplicate_removal(sim, drops, keep, NEIGHBOURS)
    return _duplicate_rounds_numpy(sim.cpu().numpy(), drops, keep).to(x.device)


def duplicate_rounds(n: int, keep: int, per_round: int) -> list[int]:
    """How many tokens each round of ``duplicate_removal`` removes: it depends on the counts only."""
    drops, count = [], n
    while count > keep:
        drops.append(min(per_round, count - keep, (count + 1) // 2))      # at most every even token
        count -= drops[-1]
    return drops


def _duplicate_rounds_numpy(sim: np.ndarray, drops: list[int], keep: int,
                            neighbours: int = NEIGHBOURS) -> torch.Tensor:
    """The rounds of ``duplicate_removal`` on the host, image by image, on the one similarity matrix (a new product
    per round took twice as long on a CPU). Above 600 tokens each even token first looks among its ``neighbours``
    most similar tokens, most similar first: the first odd one there is its highest (the rest of its row is no higher).
    A token with none reads its row over the alive tokens and keeps that row's ``neighbours`` highest as its new list,
    which stays valid as tokens only leave (lists of the first round alone left 48 rows a round to read at 8,192
    tokens). ``neighbours=0``: every token reads its row. On this CPU the lists made 1,400-1,500 tokens 3-5x faster;
    on 500 they cost as much as they save."""
    images, n = sim.shape[:2]
    lists = bool(neighbours) and n > 600
    if lists:
        near = torch.from_numpy(sim).topk(min(neighbours, n), dim=-1)
        near_values, near_index = near.values.numpy().copy(), near.indices.numpy().astype(np.int32)
    out = np.empty((images, keep), dtype=np.int64)
    odd_token = np.zeros(n, dtype=bool)
    for image, s in enumerate(sim):
        alive = np.arange(n)
        for drop in drops:
            even, odd = alive[::2], alive[1::2]
            if not lists:
                duplicate = s.take(even, axis=0).take(odd, axis=1).max(axis=1)
            else:
                odd_token[:] = False
                odd_token[odd] = True
                found = odd_token.take(near_index[image].take(even, axis=0))         # (even, neighbours)
                first = found.argmax(axis=1)
                duplicate = near_values[image, even, first]
                missed = np.flatnonzero(~found[np.arange(len(even)), first])
                if len(missed):
                    duplicate[missed] = _refresh_lists(s, even[missed], alive, near_values[image],
                                                       near_index[image])
            alive = np.delete(alive, 2 * _top_first(duplicate, drop))    # the j-th even token sits at 2j in ``alive``
        out[image] = alive
    return torch.from_numpy(out)


def _refresh_lists(s: np.ndarray, rows: np.ndarray, alive: np.ndarray, values: np.ndarray,
                   index: np.ndarray) -> np.ndarray:
    """Even tokens ``rows`` with no odd token in their lists: their highest similarity to an odd token (the odd ones
    sit at 1, 3, ... in ``alive``), read from their rows; each row's most similar alive tokens become its list,
    descending (fewer alive tokens than slots: all of them, so an odd one is always found before the stale rest)."""
    row = s.take(rows, axis=0).take(alive, axis=1)
    width = min(index.shape[1], len(alive))
    top = np.argpartition(-row, width - 1, axis=1)[:, :width]       # unordered; nothing left out is higher
    top_values = np.take_along_axis(row, top, axis=1)
    order = np.argsort(-top_values, axis=1)
    index[rows, :width] = alive[np.take_along_axis(top, order, axis=1)]
    values[rows, :width] = np.take_along_axis(top_values, order, axis=1)
    return row[:, 1::2].max(axis=1)


def _top_first(values: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` largest ``values`` (ties: the earlier), unordered: the set a stable descending sort
    puts first, from one partition instead of a sort (up to 600 values the sort is as fast)."""
    if len(values) <= 600:
        return np.argsort(-values, kind="stable")[:count]
    cut = np.partition(values, len(values) - count)[len(values) - count]      # the count-th largest
    above = np.flatnonzero(values > cut)
    return np.concatenate([above, np.flatnonzero(values == cut)[:count - len(above)]])


def true_first(mask: torch.Tensor) -> torch.Tensor:
    """Indices along the last dimension of ``mask`` (bool, or 0/1): its True entries, then its False ones, each
    ascending. Where the host knows how many are True, ``true_first(mask)[..., :count]`` is ``nonzero`` without its
    sync."""
    return mask.long().argsort(dim=-1, descending=True, stable=True)


def query_rows(queries: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions of ``queries`` (B, L) bool, each sample's first, padded to the largest count (``width`` where the
    caller knows it, at least that count: no read-back): ``order`` (B, Q) and ``valid`` (B, Q), False for the padding
    rows (whose attention rows may be all masked)."""
    count = queries.sum(1)
    order = true_first(queries)[:, :width or max(1, int(count.max()))]
    return order, torch.arange(order.shape[1], device=queries.device) < count[:, None]


def group_counts(group: torch.Tensor, groups: int) -> torch.Tensor:
    """(groups,) long: how many entries of ``group`` (N,) are each of [0, groups). ``bincount`` without its wait:
    CUDA's reads the largest entry back to the host to size its output."""
    return torch.zeros(groups, dtype=torch.long, device=group.device).index_add_(0, group, torch.ones_like(group))


def group_means(x: torch.Tensor, group: torch.Tensor, groups: int) -> torch.Tensor:
    """The float32 mean of the rows of x (N, D) in each group: ``group`` (N,) holds each row's group in [0, groups),
    and every group has a row. One sum for all groups, not a gather and a mean per group (a launch each on a GPU)."""
    total = torch.zeros(groups, x.shape[-1], device=x.device).index_add_(0, group, x.float())
    return total / group_counts(group, groups)[:, None]


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


def density_peaks(x: torch.Tensor, neighbours: int | list[int], sizes: list[int] | None = None) -> torch.Tensor:
    """DPC-kNN scores (density-peaks clustering, as FastVID, PruneVid and HoliTom use it): ``x`` (N, D) -> (N,)
    rho * delta, with d = ||x_i - x_j|| / sqrt(D), rho = exp(-mean of d^2 over the ``neighbours`` nearest tokens,
    itself included) and delta = distance to the nearest denser token (the densest: the largest distance). Ties in
    rho are not broken by noise (the papers' code adds 1e-6 noise): equal densities are not "denser".
    Many groups in one set of launches (not one per group): ``x`` (G, N, D) with group g in its first ``sizes[g]``
    rows (the rest padding, scored -inf) and ``neighbours`` one count or one per group -> (G, N), each group scored
    as it would be alone."""
    single = x.dim() == 2
    x = x.float()[None] if single else x.float()
    groups, n = x.shape[:2]
    sizes = [n] * groups if sizes is None else sizes
    near = [min(neighbours if isinstance(neighbours, int) else neighbours[g], sizes[g]) for g in range(groups)]
    d = torch.cdist(x, x) / x.shape[-1] ** 0.5
    valid = pair = None
    if min(sizes) < n:                          # padding: nobody's neighbour (its own distances all inf: rho 0)
        valid = torch.arange(n, device=x.device) < torch.tensor(sizes, device=x.device)[:, None]      # (G, N)
        pair = valid[:, :, None] & valid[:, None, :]
        d = d.masked_fill(~pair, float("inf"))
    closest = d.topk(max(near), dim=-1, largest=False).values ** 2
    if min(near) < max(near):
        k = torch.tensor(near, device=x.device)[:, None]
        rho = (-closest.masked_fill(torch.arange(max(near), device=x.device) >= k[..., None], 0).sum(-1) / k).exp()
    else:
        rho = (-closest.mean(-1)).exp()
    denser = rho[:, None, :] > rho[:, :, None]                       # [i, j]: j is denser than i
    delta = d.masked_fill(~denser, float("inf")).amin(-1)
    farthest = (d if pair is None else d.masked_fill(~pair, 0)).flatten(1).amax(1)[:, None]
    score = torch.where(denser.any(-1), delta, farthest) * rho
    if valid is not None:
        score = score.masked_fill(~valid, float("-inf"))
    return score[0] if single else score


def dpc_clusters(x: torch.Tensor, centres: int, neighbours: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering of ``x`` (N, D): the ``centres`` tokens of highest ``density_peaks`` score (ties: the
    earlier), in ascending index order, and each token's cluster (the nearest centre by distance; a centre is its
    own). ``dpc_groups`` does many groups at once."""
    centre, owner = dpc_groups(x[None], [x.shape[0]], [centres], [neighbours])
    return centre[0, :centres], owner[0]


def dpc_groups(x: torch.Tensor, sizes: list[int], centres: list[int], neighbours: list[int]):
    """``dpc_clusters`` of each group of ``x`` (G, N, D), group g in its first ``sizes[g]`` rows, with its own
    number of ``centres`` and ``neighbours``: (centre (G, C) each group's centres ascending, then N where it has
    fewer than C = max(centres); owner (G, N), each token's cluster)."""
    groups, n = x.shape[:2]
    device, most = x.device, max(centres)
    score = density_peaks(x, neighbours, sizes)
    centre = score.sort(dim=-1, descending=True, stable=True).indices[:, :most]       # ties: the earlier token
    missing = None
    if min(centres) < most:                      # a group's centres, then N (none) where it has fewer
        missing = torch.arange(most, device=device) >= torch.tensor(centres, device=device)[:, None]
        centre = centre.masked_fill(missing, n)
    centre = centre.sort(dim=-1).values
    at_centre = x.float().gather(1, centre.clamp(max=n - 1)[..., None].expand(-1, -1, x.shape[-1]))
    far = torch.cdist(x.float(), at_centre)
    owner = (far if missing is None else far.masked_fill(missing[:, None, :], float("inf"))).argmin(-1)
    own = torch.arange(most, device=device).expand(groups, -1)
    if missing is None:
        return centre, owner.scatter_(1, centre, own)
    owner = torch.cat([owner, owner[:, :1]], dim=1).scatter_(1, centre, own)[:, :n]   # column N: the missing
    return centre, owner


def dpc_merge(x: torch.Tensor, centres: int, neighbours: int, beta: float | None = None):
    """``dpc_clusters`` of ``x`` (N, D), each merged into its centre: (centre indices ascending, (centres, D) float
    values): the mean of the cluster (beta None, PruneVid), or beta x_centre + (1 - beta) mean(its other members)
    (HoliTom; a centre alone keeps its value). ``dpc_merge_groups`` does many groups at once."""
    return dpc_merge_groups(x[None], [x.shape[0]], [centres], [neighbours], beta)


def dpc_merge_groups(x: torch.Tensor, sizes: list[int], centres: list[int], neighbours: list[int],
                     beta: float | None = None, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``dpc_merge`` of each group of ``x`` (G, N, D) (laid out as for ``dpc_groups``), flat: every group's centres,
    group after group, each group's ascending, as entries of ``index`` (G, N) (None: their rows in the group), and
    their merged values (sum(centres), D) float."""
    centre, owner = dpc_groups(x, sizes, centres, neighbours)
    groups, n, dim = x.shape
    most = centre.shape[1]
    x = x.float()
    cluster = owner if groups == 1 else owner + torch.arange(groups, device=x.device)[:, None] * most
    if min(sizes) < n:                                                 # padding goes to a spare cluster, then away
        valid = torch.arange(n, device=x.device) < torch.tensor(sizes, device=x.device)[:, None]
        cluster = cluster.masked_fill(~valid, groups * most)
    cluster = cluster.flatten()
    size = group_counts(cluster, groups * most + 1)[:-1].view(groups, most, 1).clamp(min=1)
    total = torch.zeros(groups * most + 1, dim, device=x.device).index_add_(0, cluster, x.flatten(0, 1))
    total = total[:-1].view(groups, most, dim)
    centre = centre.clamp(max=n - 1)                                   # the filler: any row
    if beta is None:
        merged = total / size
    else:
        own = x.gather(1, centre[..., None].expand(-1, -1, dim))
        others = size - 1
        mean = (total - own) / others.clamp(min=1)
        merged = torch.where(others > 0, beta * own + (1 - beta) * mean, own)
    kept = rows_up_to(centres, most, x.device) if min(centres) < most else slice(None)
    at = centre if index is None else index.gather(1, centre)
    return at.flatten()[kept], merged.flatten(0, 1)[kept]


def rows_up_to(counts: list[int], width: int, device=None) -> torch.Tensor:
    """Indices into a flattened (G, ``width``) of each row's first ``counts[g]`` entries, row by row: a padded
    per-group result made flat from host counts (no read-back)."""
    return torch.tensor([g * width + j for g, count in enumerate(counts) for j in range(count)], dtype=torch.long,
                        device=device)


class Plan:
    """How a ViT block reduces its tokens: ``dest`` (B, N) is each token's slot in [0, width) (-1: dropped); a slot
    is the ``weight``-weighted average of its tokens (None: weighted by size) and its size the sum of theirs.
    ``reduce`` applies the plan, ``expand`` copies each slot back to its tokens (so a token-wise layer can run on the
    slots)."""

    def __init__(self, dest: torch.Tensor, weight: torch.Tensor | None, width: int):
        self.dest, self.weight, self.width = dest, weight, width

    def _sum(self, values: torch.Tensor) -> torch.Tensor:
        b = values.shape[0]
        out = values.new_zeros(b, self.width + 1, *values.shape[2:])          # slot ``width`` collects the dropped
        index = self.dest.masked_fill(self.dest < 0, self.width)
        index = index.view(b, -1, *[1] * (values.dim() - 2)).expand_as(values)
        return out.scatter_add_(1, index, values)[:, :self.width]

    def reduce(self, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, D), size (B, N) -> slots (B, width, D) and their sizes (B, width)."""
        w = (size if self.weight is None else self.weight).to(x.dtype)
        return self._sum(x * w[..., None]) / self._sum(w)[..., None], self._sum(size)

    def expand(self, y: torch.Tensor) -> torch.Tensor:
        """(B, width, D) -> (B, N, D); dropped tokens get slot 0 (they leave at the next ``reduce``)."""
        return gather_tokens(y, self.dest.clamp(min=0))
