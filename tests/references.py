"""Literal, one-sample-at-a-time references of the papers' rules, shared by the tests."""
import torch
import torch.nn.functional as F


def tome_merge(x, size, keys, r, prefix=1, members=None):
    """ToMe bipartite soft matching of one sample: x (N, C), size (N,), keys (N, H, d). With ``members`` (the input
    tokens each row stands for, a list per row) also returns them for the merged rows."""
    metric = F.normalize(keys.mean(1), dim=-1)
    a_ids, b_ids = list(range(prefix, len(x), 2)), list(range(prefix + 1, len(x), 2))
    best = {i: max(b_ids, key=lambda j: float(metric[i] @ metric[j])) for i in a_ids}
    sims = {i: float(metric[i] @ metric[best[i]]) for i in a_ids}
    merged = sorted(a_ids, key=lambda i: -sims[i])[:r]
    total = {j: x[j] * size[j] for j in b_ids}
    weight = {j: size[j].clone() for j in b_ids}
    group = {j: list(members[j]) if members else [] for j in b_ids}
    for i in merged:
        total[best[i]] = total[best[i]] + x[i] * size[i]
        weight[best[i]] = weight[best[i]] + size[i]
        if members:
            group[best[i]] += members[i]
    order = list(range(prefix)) + [i for i in a_ids if i not in merged]
    rows = [x[i] for i in order] + [total[j] / weight[j] for j in b_ids]
    sizes = [size[i] for i in order] + [weight[j] for j in b_ids]
    if members is None:
        return torch.stack(rows), torch.stack(sizes)
    return torch.stack(rows), torch.stack(sizes), [members[i] for i in order] + [group[j] for j in b_ids]


def holitom_segments(similar):
    """HoliTom's segmentation, literally: every candidate segment [a, i] scored by how many positions stay similar
    over all its steps, (i - a) tokens saved each; the best total by dynamic programming, shorter segments on ties.
    Returns (first, last, static positions) per segment."""
    t = similar.shape[0] + 1
    best, start = [0] * (t + 1), [0] * t
    for i in range(t):
        best[i + 1], start[i] = best[i], i
        for a in range(i - 1, -1, -1):
            gain = best[a] + (i - a) * int(similar[a:i].all(0).sum())
            if gain > best[i + 1]:
                best[i + 1], start[i] = gain, a
    segments, i = [], t - 1
    while i >= 0:
        a = start[i]
        segments.append((a, i, similar[a:i].all(0) if i > a else torch.zeros(similar.shape[1], dtype=torch.bool)))
        i = a - 1
    return segments[::-1]
