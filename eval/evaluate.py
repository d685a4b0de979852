"""``vtr eval``: what each method costs in accuracy and saves in compute, at every retention, beside the unpatched model.

For each run (the unpatched model, then every method x retention) the examples are answered greedily in left-padded
batches with the stock ``generate()``, and the run reports: accuracy (overall and per question family), retention
requested and measured, visual tokens in/out, analytic FLOPs of vision + LLM, time to first token (vision tower and
prefill), decode time per token, KV-cache bytes at the end of generation and, on CUDA, peak memory. All figures are
means per sample.

An answer is correct when the normalised prediction (lower case, punctuation stripped) starts with the normalised
reference answer's words, so "Yes." matches "yes" and "red" does not match "reddish".
"""
from __future__ import annotations

import json
import re
import statistics
import time
from contextlib import contextmanager, nullcontext

import torch
from transformers.generation.streamers import BaseStreamer

import vtr
from vtr.adapters import adapter_for
from vtr.builtin import chat_prompt, model_inputs
from vtr.compat import output_cache
from vtr.eval.data import load_frames, load_image
from vtr.eval.flops import decoder_layer_flops, prefill_flops, qwen2_vl_vision_flops

REFERENCE = "unpatched"
MEAN_ABLATION = "mean-visual"


def normalise(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def is_correct(prediction: str, answer: str) -> bool:
    want = normalise(answer)
    return bool(want) and normalise(prediction)[:len(want)] == want


class StepClock(BaseStreamer):
    """Times of ``generate()``'s streamer calls: one for the prompt, then one per generated step."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


def _batch_inputs(model, processor, examples, suffix: str, num_frames: int):
    """Image rows give one image each, video rows ``num_frames`` frames of their video, uniformly spread."""
    texts = [chat_prompt(processor, e.question + suffix, int(e.video_path is None), int(e.video_path is not None))
             for e in examples]
    images = [load_image(e) for e in examples if e.video_path is None]
    videos = [load_frames(e, num_frames) for e in examples if e.video_path is not None]
    return model_inputs(model, processor, images, texts, videos)


def _answer_batch(model, processor, inputs, max_new_tokens: int) -> dict:
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    clock = StepClock()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=clock,
                             return_dict_in_generate=True)
    times = clock.times
    steps = len(times) - 2                      # decode steps after the first token
    prompt_len = inputs["input_ids"].shape[1]
    return {"texts": processor.batch_decode(out.sequences[:, prompt_len:], skip_special_tokens=True),
            "ttft_s": times[1] - start,
            "decode_s_per_token": (times[-1] - times[1]) / steps if steps > 0 else None,
            "kv_cache_bytes": cache_bytes(output_cache(out)),
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def visual_token_mask(model, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the image and video placeholders of ``input_ids``, the tokens vtr reduces."""
    ids = torch.tensor(adapter_for(model).visual_token_ids, device=input_ids.device)
    return torch.isin(input_ids, ids)


def sample_flops(config, inputs, visual: torch.Tensor, stats: list[dict] | None) -> list[dict]:
    """Analytic prefill FLOPs of each sample, over its unpadded tokens (``visual``: the placeholder mask): LLaVA-style
    models (a fixed number of tokens per image) and Qwen2-VL / Qwen2.5-VL (the patch grids the processor reports);
    None for the others."""
    text = (inputs["attention_mask"].bool() & ~visual).sum(1).tolist()
    layers = config.text_config.num_hidden_layers
    qwen = any(hasattr(config.vision_config, k) for k in ("embed_dim", "fullatt_block_indexes"))   # Qwen2(.5)-VL
    if not qwen and not hasattr(config, "image_seq_length"):
        return [None] * len(text)
    if qwen:                                      # each sample's grids, in the order the processor lists them
        grids = {k: list(map(tuple, inputs[f"{k}_grid_thw"].tolist())) if f"{k}_grid_thw" in inputs else []
                 for k in ("image", "video")}
        group = config.vision_config.spatial_merge_size ** 2
    out = []
    for b, n_text in enumerate(text):
        n_visual = int(visual[b].sum())
        kept = stats[b]["tokens_per_layer"] if stats else [n_visual] * layers
        if not qwen:
            per_image = config.image_seq_length
            out.append(prefill_flops(config, n_visual // per_image, per_image, [n_text + k for k in kept]))
            continue
        mine = []
        for kind, token in (("image", config.image_token_id), ("video", config.video_token_id)):
            tokens = int((inputs["input_ids"][b] == token).sum())
            while tokens > 0:
                mine.append(grids[kind].pop(0))
                tokens -= mine[-1][0] * mine[-1][1] * mine[-1][2] // group
        vision = qwen2_vl_vision_flops(config.vision_config, mine)
        llm = sum(decoder_layer_flops(config.text_config, n_text + k) for k in kept)
        llm += 2 * config.text_config.hidden_size * config.text_config.vocab_size
        out.append({"vision": vision, "llm": llm, "total": vision + llm})
    return out


@contextmanager
def mean_visual_tokens(model):
    """Replace every image's (or video's) visual tokens by their mean, at the projector output: the control that shows
    whether a model reads the image's layout at all. Accuracy under it should fall to what the question alone allows."""
    visual = getattr(model.model, "visual", None)
    if visual is not None and hasattr(visual, "spatial_merge_size"):
        # Qwen2-VL family: one (tokens, D) output for all the batch's images, each grid_thw.prod() / merge^2 long.
        def hook(module, args, kwargs, out):
            sizes = (kwargs["grid_thw"].prod(-1) // module.spatial_merge_size ** 2).tolist()
            out.pooler_output = torch.cat([p.mean(0, keepdim=True).expand_as(p)
                                           for p in out.pooler_output.split(sizes)])
            return out
        handle = visual.register_forward_hook(hook, with_kwargs=True)
    else:
        projector = getattr(adapter_for(model), "projector", None)
        if projector is None:
            raise ValueError(f"the mean-visual control needs a per-image projector output; {type(model).__name__} "
                             "has none vtr can hook")
        handle = projector.register_forward_hook(lambda module, args, out: out.mean(-2, keepdim=True).expand_as(out))
    try:
        yield
    finally:
        handle.remove()


def run_one(model, processor, examples, method: str | None, retain: float, batch_size: int, max_new_tokens: int,
            suffix: str = "", progress=None, label: str | None = None, num_frames: int = 16) -> dict:
    """One run over all examples; ``method=None`` runs the model unpatched, or under ``label == MEAN_ABLATION``
    with each image's visual tokens replaced by their mean."""
    rows, measures = [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        inputs = _batch_inputs(model, processor, chunk, suffix, num_frames)
        if method is None:
            with mean_visual_tokens(model) if label == MEAN_ABLATION else nullcontext():
                result = _answer_batch(model, processor, inputs, max_new_tokens)
            stats = None
        else:
            with vtr.patch(model, method, retain=retain) as handle:
                result = _answer_batch(model, processor, inputs, max_new_tokens)
                stats = handle.stats()
        mask = visual_token_mask(model, inputs["input_ids"])
        flops = sample_flops(model.config, inputs, mask, stats)
        visual = mask.sum(1).tolist()
        for b, (example, text) in enumerate(zip(chunk, result["texts"])):
            s = stats[b] if stats else {"visual_tokens_in": visual[b], "visual_tokens_out": visual[b],
                                        "layer_avg_retention": 1.0}
            rows.append({"id": example.id, "family": example.family, "answer": example.answer,
                         "prediction": text.strip(), "correct": is_correct(text, example.answer),
                         "visual_tokens_in": s["visual_tokens_in"], "visual_tokens_out": s["visual_tokens_out"],
                         "layer_avg_retention": s["layer_avg_retention"], "flops": flops[b]})
        measures.append((len(chunk), result))
        if progress is not None:
            progress.update(len(chunk))
    return _summarise(label or method or REFERENCE, retain, rows, measures)


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _summarise(method: str, retain: float, rows: list[dict], measures: list[tuple[int, dict]]) -> dict:
    n = len(rows)
    families = sorted({r["family"] for r in rows if r["family"]})
    per_sample = lambda key: _mean([m[key] / size for size, m in measures if m[key] is not None])   # noqa: E731
    tokens_in = sum(r["visual_tokens_in"] for r in rows)
    return {
        "method": method, "retain": retain, "examples": n,
        "accuracy": sum(r["correct"] for r in rows) / n,
        "accuracy_by_family": {f: _mean([float(r["correct"]) for r in rows if r["family"] == f]) for f in families},
        "retention": sum(r["visual_tokens_out"] for r in rows) / tokens_in,
        "layer_avg_retention": _mean([r["layer_avg_retention"] for r in rows]),
        "visual_tokens_in": tokens_in / n, "visual_tokens_out": sum(r["visual_tokens_out"] for r in rows) / n,
        "flops_vision": _mean([r["flops"] and r["flops"]["vision"] for r in rows]),
        "flops_llm": _mean([r["flops"] and r["flops"]["llm"] for r in rows]),
        "ttft_s": per_sample("ttft_s"), "decode_s_per_token": _mean([m["decode_s_per_token"] for _, m in measures]),
        "kv_cache_bytes": per_sample("kv_cache_bytes"), "peak_memory_bytes": _mean([m["peak_memory_bytes"]
                                                                                    for _, m in measures]),
        "predictions": [{k: r[k] for k in ("id", "prediction", "correct")} for r in rows],
    }


def evaluate(model, processor, examples, methods: list[str], retains: list[float], batch_size: int = 8,
             max_new_tokens: int = 4, suffix: str = "", show_progress: bool = True, ablation: bool = False,
             num_frames: int = 16) -> list[dict]:
    """The unpatched reference (and, with ``ablation``, the mean-visual-token control), then every method at every
    retention. Video rows are answered from ``num_frames`` frames of their video."""
    from tqdm.auto import tqdm

    for method in methods:                      # unknown method or bad retention: fail before any work
        for retain in retains:
            vtr.api.resolve(method, retain, None)
    processor.tokenizer.padding_side = "left"
    runs = [(None, 1.0, REFERENCE)] + [(None, 1.0, MEAN_ABLATION)] * ablation + [(m, r, m) for m in methods
                                                                                  for r in retains]
    results = []
    with tqdm(total=len(runs) * len(examples), disable=not show_progress, unit="ex") as bar:
        for method, retain, label in runs:
            bar.set_description(f"{label} @ {retain:g}")
            results.append(run_one(model, processor, examples, method, retain, batch_size, max_new_tokens, suffix, bar,
                                   label, num_frames))
    return results


def plot(results: list[dict], path: str, title: str = ""):
    """Accuracy against measured retention, one line per method, the unpatched model as a dashed reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    reference = next(r for r in results if r["method"] == REFERENCE)
    ax.axhline(reference["accuracy"], color="black", linestyle="--", label=REFERENCE)
    for r in results:
        if r["method"] == MEAN_ABLATION:
            ax.axhline(r["accuracy"], color="grey", linestyle=":", label="visual tokens -> their mean")
    for method in dict.fromkeys(r["method"] for r in results if r["method"] not in (REFERENCE, MEAN_ABLATION)):
        runs = sorted((r for r in results if r["method"] == method), key=lambda r: r["layer_avg_retention"])
        ax.plot([r["layer_avg_retention"] for r in runs], [r["accuracy"] for r in runs], marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("visual tokens kept (layer-averaged retention)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(results: list[dict]) -> str:
    lines = [f"{'method':<10} {'retain':>6} {'kept':>7} {'layer avg':>9} {'accuracy':>8} {'GFLOPs':>7} "
             f"{'TTFT ms':>8} {'KV KiB':>7}"]
    for r in results:
        lines.append(f"{r['method']:<10} {r['retain']:>6.3f} {r['visual_tokens_out']:>7.1f} "
                     f"{r['layer_avg_retention']:>9.3f} {r['accuracy']:>8.1%} "
                     f"{_gflops(r):>7} {r['ttft_s'] * 1e3:>8.1f} "
                     f"{r['kv_cache_bytes'] / 1024:>7.0f}")
    return "\n".join(lines)


def _gflops(run: dict) -> str:
    return "n/a" if run["flops_vision"] is None else f"{(run['flops_vision'] + run['flops_llm']) / 1e9:.2f}"


def write(results: list[dict], path: str, **meta):
    with open(path, "w") as f:
        json.dump({**meta, "runs": results}, f, indent=1)
