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


def _sorted(picks, values):
    """Picks ascending, each value with its pick (the order of a method's rows is free)."""
    picks, order = torch.cat(picks).sort()
    return picks, torch.cat(values)[order]


def fastvid_video(plugin, x, attention, k):
    """FastVID's pre-LLM rule on one video x (T, N, D), frame by frame and anchor frame by anchor frame."""
    from vtr.kernels import density_peaks
    from vtr.plugins.base import shares
    from vtr.plugins.fastvid import segments
    t, per, dim = x.shape
    budget = shares(k, t)
    anchors = [int(plugin.anchors * r) for r in budget]
    salient = [r - a for r, a in zip(budget, anchors)]
    top = [attention[f].topk(salient[f]).indices for f in range(t)]
    rest = [torch.tensor([p for p in range(per) if p not in top[f].tolist()]) for f in range(t)]
    picks, values = [top[f] + f * per for f in range(t)], [x[f, top[f]] for f in range(t)]
    unit = F.normalize(x.float(), dim=-1)
    for segment in segments(x.mean(1), plugin.segments, plugin.tau):
        members = [(f, p) for f in segment for p in rest[f].tolist()]
        counts = plugin._anchor_counts(segment, anchors, [len(r) for r in rest])
        for f, count in zip(segment, counts):
            if not count:
                continue
            anchor = rest[f][density_peaks(x[f, rest[f]], plugin.neighbours).topk(count).indices].tolist()
            joined = {a: [] for a in anchor}
            for g, p in members:
                joined[max(anchor, key=lambda a: float(unit[g, p] @ unit[f, a]))].append(x[g, p].float())
            for a in anchor:
                weight = max(1 / (len(joined[a]) + 1), plugin.beta)
                mean = torch.stack(joined[a]).mean(0) if joined[a] else torch.zeros(dim)
                picks.append(torch.tensor([a + f * per]))
                values.append((weight * x[f, a].float() + (1 - weight) * mean)[None])
    return _sorted(picks, values)


def prunevid_video(plugin, x, k):
    """PruneVid's stage 1 on one video x (T, N, D) with a budget k: segments, each segment's static positions (mean
    cosine over all pairs of distinct frames), then each group clustered on its own."""
    from vtr.kernels import dpc_clusters, dpc_merge
    from vtr.plugins.base import apportion
    from vtr.plugins.prunevid import contiguous
    t, per, _ = x.shape
    labels = dpc_clusters(x.float().mean(1), max(1, int(t * plugin.segment_ratio)), min(plugin.neighbours, t))[1]
    groups = []                                        # (frame, positions, tokens)
    for segment in contiguous(labels.tolist()):
        u, w = F.normalize(x[segment].float(), dim=-1), len(segment)
        pairs = [(i, j) for i in range(w) for j in range(w) if i != j]
        static = [p for p in range(per)
                  if pairs and sum(float(u[i, p] @ u[j, p]) for i, j in pairs) / len(pairs) > plugin.tau]
        if static:
            groups.append((segment[0], static, x[segment][:, static].float().mean(0)))
        others = [p for p in range(per) if p not in static]
        groups += [(f, others, x[f, others].float()) for f in segment]
    assert sum(len(p) for _, p, _ in groups) >= k, "pick a budget merging can meet"
    picks, values = [], []
    for (f, positions, tokens), quota in zip(groups, apportion(k, [len(p) for _, p, _ in groups])):
        if quota:
            centre, merged = dpc_merge(tokens, quota, min(plugin.neighbours, len(positions)))
            picks.append(torch.tensor(positions)[centre] + f * per)
            values.append(merged)
    return _sorted(picks, values)


def holitom_video(plugin, x, attention, k):
    """HoliTom's outer stage on one video x (T, N, D) whose budget needs every segment collapsed: each segment's
    static tokens clustered on their own, each frame's other tokens by attention, group by group."""
    from vtr.kernels import dpc_merge
    from vtr.plugins.base import apportion
    t, per, _ = x.shape
    unit = F.normalize(x.float(), dim=-1)
    groups = []                                        # (first frame, positions, last frame or None)
    for a, b, static in holitom_segments((unit[:-1] * unit[1:]).sum(-1) > plugin.tau):
        positions = torch.arange(per)
        if static.any():
            groups.append((a, positions[static], b))
        groups += [(f, positions[~static], None) for f in range(a, b + 1)]
    assert per * t - sum(len(p) * (b - a) for a, p, b in groups if b is not None) >= k, "pick a smaller budget"
    picks, values = [], []
    for (f, positions, last), quota in zip(groups, apportion(k, [len(p) for _, p, _ in groups])):
        if not quota:
            continue
        if last is None:
            keep = positions[attention[f, positions].topk(quota).indices]
            picks.append(keep + f * per)
            values.append(x[f, keep].float())
        else:
            centre, merged = dpc_merge(x[f:last + 1, positions].float().mean(0), quota,
                                       min(plugin.max_neighbours, quota), plugin.beta)
            picks.append(positions[centre] + f * per)
            values.append(merged)
    return _sorted(picks, values)
