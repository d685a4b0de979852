"""``vtr bench``: prefill time of each method beside the unpatched model, the ideal and the analytic speedup.

The model (``vtr.eval.bench_models``) is LLaVA-1.5-, LLaVA-NeXT- or Qwen2.5-VL-shaped, with one image between 35 and
15 prompt tokens: on a CPU with the 7B's depth and widths / 8, in float32; on a GPU (``device="cuda"``) at full size,
in bfloat16. Weights are random, which does not change the time. Ideal: the stock modules run directly on the
already-pruned sequence (kept sets taken from the patched run), at the positions the stock model gives them - the
limit no hook can beat.
Overhead: patched minus ideal, as a share of the patched prefill (end to end, so it carries the machine's noise);
"in hooks": the time spent inside vtr's hooks (selection, gathers, masks), as a share of the patched prefill.
Decode: tokens/s of 16 greedy tokens, from the first generated token to the last, as a ratio to the unpatched
model's; KV: the cache's bytes after prefill, as a share of the unpatched cache's; peak: the most memory a generate()
holds at once above the weights and inputs (``vtr.eval.memory``), as a share of the unpatched one's; ops/syncs: the
operators vtr's hooks run in one prefill and those of them that wait for the device (``vtr.eval.launches``), what
the hooks cost on a GPU; step: the same in the decode step after it.
For FastV (and FasterVLM on LLaVA-1.5), a naive row: the same selection taken from the eager model's attention
weights, as the methods' own code does it.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from contextlib import contextmanager

import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

import vtr
from vtr.compat import CACHE_ARG, output_cache
from vtr.eval import bench_models
from vtr.eval.evaluate import StepClock, cache_bytes, sample_flops, visual_token_mask
from vtr.eval.launches import OpCount
from vtr.eval.memory import peak_bytes
from vtr.eval.stock import encode, stock_positions
from vtr.hooks import watch_hooks


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _once(fn) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def _timed(fn, repeats: int) -> float:
    """Median of ``repeats`` runs after one warm-up."""
    fn()                                                     # warm-up
    return statistics.median(_once(fn) for _ in range(repeats))


def _embeds(model, inputs, features: torch.Tensor | None = None) -> torch.Tensor:
    """The prompt's input embeddings with the image features in place (default: the stock vision pass's)."""
    ids = inputs["input_ids"]
    if features is None:
        features = torch.cat(list(encode(model, inputs).pooler_output))
    visual = visual_token_mask(model, ids)[..., None]
    return model.model.language_model.embed_tokens(ids).masked_scatter(visual, features.to(model.dtype))


@torch.no_grad()
def _prefill_on(model, inputs, embeds, pre_llm: torch.Tensor | None, llm_stages: dict):
    """The stock decoder on the pruned sequence (one sample), the last position's logits: ``pre_llm`` the positions
    that enter (None: all); ``llm_stages``: layer -> the positions kept from that layer on, or a function giving
    them when the layer is reached. Layers before a stage see the longer sequence; every token keeps the position
    the stock model gives it (M-RoPE: three rows, and no 1-D position ids for the mask and the layers)."""
    lm = model.model.language_model
    seq = torch.arange(embeds.shape[1], device=embeds.device) if pre_llm is None else pre_llm
    h, pos, cache = embeds[:, seq], stock_positions(model, inputs)[0][..., seq], DynamicCache(config=lm.config)
    if not llm_stages:
        h = lm(inputs_embeds=h, position_ids=pos, **{CACHE_ARG: cache}, use_cache=True).last_hidden_state
        return model.lm_head(h[:, -1])
    current = seq
    for i, layer in enumerate(lm.layers):
        if i == 0 or i in llm_stages:
            if i in llm_stages:
                kept = llm_stages[i]() if callable(llm_stages[i]) else llm_stages[i]
                keep = torch.isin(current, kept)
                h, pos, current = h[:, keep], pos[..., keep], current[keep]
            flat = pos if pos.dim() == 2 else None
            mask = create_causal_mask(config=lm.config, inputs_embeds=h, attention_mask=None, **{CACHE_ARG: cache},
                                      position_ids=flat, layer_idx=i)
            rope = lm.rotary_emb(h, pos)
        h = layer(h, attention_mask=mask, position_ids=flat, position_embeddings=rope, **{CACHE_ARG: cache},
                  use_cache=True)
    return model.lm_head(lm.norm(h)[:, -1])


def _ideal_prefill(model, inputs, pre_llm: torch.Tensor | None, llm_stages: dict[int, torch.Tensor]):
    """Stock modules on the pruned sequence: vision tower and projector on every token, the decoder on the kept ones."""
    return _prefill_on(model, inputs, _embeds(model, inputs), pre_llm, llm_stages)


@contextmanager
def _eager(module):
    """``module`` (a model or its vision tower) on eager attention, which returns weights, then back."""
    implementation = module.config._attn_implementation
    module.set_attn_implementation("eager")
    try:
        yield
    finally:
        module.set_attn_implementation(implementation)


def _text_and_visual(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    visual = visual_token_mask(model, inputs["input_ids"])[0]
    return (~visual).nonzero()[:, 0], visual.nonzero()[:, 0]


@torch.no_grad()
def _naive_fastv_prefill(model, inputs, layer: int, keep: int):
    """FastV the way a fork does it: the model switched to eager attention, layer K-1's attention weights taken from
    the layer itself (the whole N x N matrix), the last token's row (head mean) choosing the visual tokens kept from
    layer K on. What vtr's recomputed row saves is this run's time beside the patched one."""
    text, visual = _text_and_visual(model, inputs)
    weights = []
    hook = model.model.language_model.layers[layer - 1].self_attn.register_forward_hook(
        lambda m, a, out: weights.append(out[1]))

    def chosen():                                  # the row of the real attention weights picks the survivors
        return torch.cat([text, visual[weights[-1][0, :, -1, visual].mean(0).topk(keep).indices]])

    try:
        with _eager(model):
            return _prefill_on(model, inputs, _embeds(model, inputs), None, {layer: chosen})
    finally:
        hook.remove()


@torch.no_grad()
def _naive_fastervlm_prefill(model, inputs, keep: int):
    """FasterVLM the way its code does it: the vision tower switched to eager attention and asked for every layer's
    attention weights, the [CLS] row of the feature layer (head mean) choosing the patches, then the stock decoder on
    the kept sequence."""
    tower, layer = model.model.vision_tower, model.config.vision_feature_layer
    with _eager(tower):
        out = tower(inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
    features = model.model.multi_modal_projector(out.hidden_states[layer][0, 1:])
    text, visual = _text_and_visual(model, inputs)
    kept = visual[out.attentions[layer][0, :, 0, 1:].mean(0).topk(keep).indices]
    return _prefill_on(model, inputs, _embeds(model, inputs, features), torch.cat([text, kept]).sort().values, {})


# (method, architecture) -> its naive reference (the selection from the model's own attention weights), given the
# plugin and the number of visual tokens vtr kept
NAIVE = {**{("fastv", arch): lambda model, inputs, plugin, keep: _naive_fastv_prefill(model, inputs, plugin.layer, keep)
            for arch in bench_models.ARCHS},
         ("fastervlm", "llava"): lambda model, inputs, plugin, keep: _naive_fastervlm_prefill(model, inputs, keep)}


DECODE_TOKENS = 16


@torch.no_grad()
def _generate(model, inputs, streamer=None):
    model.generate(**inputs, max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS, do_sample=False,
                   streamer=streamer)


def _decode(model, inputs) -> float:
    """Tokens/s of one greedy generate() of ``DECODE_TOKENS`` tokens, timed from its first token to its last (so the
    prefill is left out)."""
    clock = StepClock()                  # one call for the prompt, then one per generated token
    _generate(model, inputs, clock)
    return (len(clock.times) - 2) / (clock.times[-1] - clock.times[1])


def _kept_positions(model, inputs, kept_visual: torch.Tensor) -> torch.Tensor:
    text, visual = _text_and_visual(model, inputs)
    return torch.cat([text, visual[kept_visual]]).sort().values


def run(methods: list[str], retains: list[float], repeats: int = 5, quick: bool = False, threads: int | None = None,
        out: str | None = "bench.json", device: str = "cpu", arch: str = "llava", size: str | None = None,
        attn: str = "sdpa") -> dict:
    """``arch``: a key of ``bench_models.ARCHS``; ``size``: "cpu", "quick" or "7b" (default: "7b" on CUDA, in
    bfloat16, and "cpu" elsewhere, in float32; ``quick`` means "quick"); ``attn``: the attention implementation."""
    if threads:
        torch.set_num_threads(threads)
    cuda = torch.device(device).type == "cuda"
    size = "quick" if quick else size or ("7b" if cuda else "cpu")
    model, inputs = bench_models.build(arch, size, device, torch.bfloat16 if cuda else torch.float32, attn)
    visual = visual_token_mask(model, inputs["input_ids"])

    def flops_of(stats):
        flops = sample_flops(model.config, inputs, visual, None if stats is None else [stats])[0]
        return flops and flops["total"]

    base = baseline(model, inputs, repeats, device, flops_of)
    rows = measure(model, inputs, methods, retains, repeats, base, arch)
    result = {
        "device": _device_name(device), "torch": torch.__version__, "dtype": str(model.dtype), "attn": attn,
        "arch": arch, "size": size, "model": type(model).__name__, "visual_tokens": int(visual.sum()),
        "prompt_tokens": inputs["input_ids"].shape[1], "repeats": repeats, **unpatched_figures(base), "rows": rows,
    }
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
    return result


def baseline(model, inputs, repeats: int, device, flops_of) -> dict:
    """The unpatched model's figures every row is set against. ``flops_of(stats)``: the analytic prefill FLOPs given
    a patched run's stats (None: the unpatched run), or None where they are not counted."""
    prefill = lambda: model(**inputs, use_cache=True, logits_to_keep=1)                 # noqa: E731
    with torch.no_grad():
        seconds = _timed(prefill, repeats)
        kv = cache_bytes(output_cache(prefill()))
    return {"prefill": prefill, "seconds": seconds, "kv": kv, "flops_of": flops_of, "flops": flops_of(None),
            "peak": peak_bytes(lambda: _generate(model, inputs), device), "device": device, "rates": []}


def measure(model, inputs, methods: list[str], retains: list[float], repeats: int, base: dict, arch: str) -> list:
    """A row per method and retention; one the method refuses for this model says why (the README matrix's n/a)."""
    rows = []
    for method in methods:
        for retain in retains:
            try:
                vtr.patch(model, method, retain=retain).remove()
            except ValueError as refused:
                rows.append({"method": method, "retain": retain, "skipped": str(refused)})
                continue
            rows.append(_row(model, inputs, method, retain, repeats, arch, base))
    return rows


def unpatched_figures(base: dict) -> dict:
    return {"unpatched_prefill_s": base["seconds"], "unpatched_kv_cache_bytes": base["kv"],
            "unpatched_decode_tokens_per_s": statistics.median(base["rates"]) if base["rates"] else None,
            "unpatched_peak_memory_bytes": base["peak"]}


def ideal_for(model, inputs, method: str, retain: float):
    """(a function running the ideal prefill of ``method`` at ``retain``, the patched run's stats): one patched
    prefill gives the kept sets of each stage, which the ideal path then takes as given."""
    with vtr.patch(model, method, retain=retain) as handle, torch.no_grad():
        model(**inputs, use_cache=True, logits_to_keep=1)
        stages = handle._engine.stages
        kept = [_kept_positions(model, inputs, handle.kept(stage=s)[0]) for s in range(len(stages))]
        stats = handle.stats()[0]
    pre = [k for s, k in zip(stages, kept) if s.layer is None]
    llm = {s.layer: k for s, k in zip(stages, kept) if s.layer is not None}
    return (lambda: _ideal_prefill(model, inputs, pre[-1] if pre else None, llm)), stats


def _row(model, inputs, method: str, retain: float, repeats: int, arch: str, base: dict) -> dict:
    """One method at one retention: its kept sets, then ``repeats`` interleaved runs of the unpatched, patched and
    ideal prefills and decodes."""
    prefill = base["prefill"]
    ideal_prefill, stats = ideal_for(model, inputs, method, retain)
    times = {k: [] for k in ("base", "patched", "ideal", "hooks", "rates", "base_rates")}
    for _ in range(repeats + 1):                     # interleaved, so drifts of the machine hit all of them alike
        with torch.no_grad():
            times["base"].append(_once(prefill))
            times["base_rates"].append(_decode(model, inputs))
            with vtr.patch(model, method, retain=retain) as handle:
                times["patched"].append(_once(prefill))
                times["hooks"].append(handle._engine.hook_seconds)
                times["rates"].append(_decode(model, inputs))
            times["ideal"].append(_once(ideal_prefill))
    unpatched, patched, ideal, hooks, decode, base_decode = (statistics.median(times[k][1:]) for k in (
        "base", "patched", "ideal", "hooks", "rates", "base_rates"))
    base["rates"] += times["base_rates"][1:]
    with vtr.patch(model, method, retain=retain), torch.no_grad():
        kv = cache_bytes(output_cache(prefill()))
        peak = peak_bytes(lambda: _generate(model, inputs), base["device"])
        with watch_hooks(OpCount()) as count:
            out = prefill()
        with watch_hooks(OpCount()) as step:
            model(**next_step(inputs, out))
    naive = NAIVE.get((method, arch))                # the forks' way, for what recomputing a few rows saves
    if naive is not None:
        plugin = vtr.api.resolve(method, retain)[0]
        naive = _timed(lambda: NAIVE[method, arch](model, inputs, plugin, stats["visual_tokens_out"]), repeats)
    flops = base["flops_of"](stats)
    return {
        "method": method, "retain": retain, "visual_tokens_out": stats["visual_tokens_out"],
        "layer_avg_retention": stats["layer_avg_retention"], "unpatched_s": unpatched, "prefill_s": patched,
        "ideal_s": ideal, "speedup": unpatched / patched, "ideal_speedup": unpatched / ideal,
        "analytic_speedup": base["flops"] / flops if flops else None,
        "of_ideal": ideal / patched, "overhead": (patched - ideal) / patched, "hook_s": hooks,
        "hook_share": hooks / patched, "kv_cache_bytes": kv, "kv_cache_ratio": kv / base["kv"],
        "decode_tokens_per_s": decode, "decode_speedup": decode / base_decode, "peak_memory_bytes": peak,
        "peak_memory_ratio": peak / base["peak"], "hook_ops": count.ops, "hook_syncs": count.syncs,
        "decode_hook_ops": step.ops, "decode_hook_syncs": step.syncs,
        "naive_s": naive, "naive_speedup": None if naive is None else unpatched / naive,
    }


def next_step(inputs: dict, out) -> dict:
    """The inputs of the greedy decode step after the prefill that returned ``out``."""
    mask = inputs["attention_mask"]
    return {"input_ids": out.logits[:, -1:].argmax(-1), CACHE_ARG: output_cache(out), "use_cache": True,
            "attention_mask": torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)}


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_table(result: dict) -> str:
    return "\n".join([f"device: {result['device']}, torch {result['torch']}, {result['dtype']}, {result['attn']}; "
                      f"{result['model']} ({result['arch']}, size {result['size']}): {result['visual_tokens']} visual "
                      f"tokens, prompt {result['prompt_tokens']} tokens", unpatched_line(result),
                      *format_rows(result["rows"])])


def unpatched_line(result: dict) -> str:
    decode, peak = result["unpatched_decode_tokens_per_s"], result.get("unpatched_peak_memory_bytes")
    return (f"unpatched: prefill {result['unpatched_prefill_s'] * 1e3:.1f} ms (median of {result['repeats']}), " +
            (f"decode {decode:.1f} tokens/s, " if decode else "") +
            f"KV cache {result['unpatched_kv_cache_bytes'] / 2 ** 20:.1f} MiB" +
            (f", peak {peak / 2 ** 20:.1f} MiB above the weights" if peak else ""))


def format_rows(rows: list[dict]) -> list[str]:
    lines = [f"{'method':<12} {'retain':>6} {'kept':>5} {'prefill ms':>10} {'speedup':>8} {'ideal':>7} {'analytic':>8} "
             f"{'of ideal':>8} {'overhead':>8} {'in hooks':>8} {'decode':>7} {'KV':>5} {'peak':>5} {'ops/syncs':>9} "
             f"{'step':>6}"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['method']:<12} {r['retain']:>6.3f}  n/a: {r['skipped']}")
            continue
        analytic = f"{r['analytic_speedup']:>7.2f}x" if r["analytic_speedup"] else f"{'n/a':>8}"
        lines.append(f"{r['method']:<12} {r['retain']:>6.3f} {r['visual_tokens_out']:>5} {r['prefill_s'] * 1e3:>10.1f} "
                     f"{r['speedup']:>7.2f}x {r['ideal_speedup']:>6.2f}x {analytic} "
                     f"{r['of_ideal']:>7.0%} {r['overhead']:>8.1%} {r['hook_share']:>8.1%} "
                     f"{r['decode_speedup']:>6.2f}x {r['kv_cache_ratio']:>5.0%} {r['peak_memory_ratio']:>5.0%} "
                     f"{str(r['hook_ops']) + '/' + str(r['hook_syncs']):>9} "
                     f"{str(r['decode_hook_ops']) + '/' + str(r['decode_hook_syncs']):>6}")
        if r["naive_s"] is not None:
            lines.append(f"{'':<12} {'':>6} {'':>5} {r['naive_s'] * 1e3:>10.1f} {r['naive_speedup']:>7.2f}x  naive: "
                         "eager attention weights, as the method's code takes them")
    return lines


def plot(result: dict, path: str):
    """Per retention, one panel: each method's measured prefill speedup (bar) beside its ideal (black tick) and
    analytic (grey cross) ones; readable for any number of methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in result["rows"] if "skipped" not in r]
    methods = list(dict.fromkeys(r["method"] for r in measured))
    retains = sorted({r["retain"] for r in measured}, reverse=True)
    fig, axes = plt.subplots(1, len(retains), figsize=(3.2 * len(retains) + 1, 0.3 * len(methods) + 1.4),
                             sharey=True, squeeze=False)
    for ax, retain in zip(axes[0], retains):
        rows = {r["method"]: r for r in measured if r["retain"] == retain}
        y = [i for i, m in enumerate(methods) if m in rows]
        got = [rows[m] for m in methods if m in rows]
        ax.barh(y, [r["speedup"] for r in got], color="tab:blue", label="measured")
        ax.scatter([r["ideal_speedup"] for r in got], y, marker="|", s=120, color="black", label="ideal", zorder=3)
        analytic = [(r["analytic_speedup"], i) for r, i in zip(got, y) if r["analytic_speedup"]]
        if analytic:
            ax.scatter(*zip(*analytic), marker="x", color="grey", label="analytic", zorder=3)
        ax.set_title(f"retain {retain:.3g}", fontsize=9)
        ax.set_xlabel("prefill speedup")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(methods)), methods, fontsize=8)
    axes[0][0].invert_yaxis()
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(f"{result['model']} ({result['size']}), {result['device']}", fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
