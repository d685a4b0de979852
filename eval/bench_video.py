"""``vtr bench --video``: the figures of ``vtr bench`` (prefill beside the unpatched model, the ideal and the analytic
speedup; decode, KV cache and peak memory) for video methods.

The model is LLaVA-OneVision-shaped (SigLIP at 384 px with 14 px patches: 27 x 27 patches per frame, pooled 2x2 to
14 x 14 = 196 tokens per frame plus the video's closing newline; Qwen2 language model): LLaVA-OneVision-7B on 32
frames (``--size 7b``), or on a CPU its depths with widths divided by 8 on 8 frames; weights are random, which does
not change the time. Ideal: the stock modules
run on the already-reduced sequence (``vtr.eval.bench``). Analytic: prefill FLOPs unpatched over patched (vision
tower, projector and decoder; ``vtr.eval.flops``); the vision tower runs on every frame either way.
"""
from __future__ import annotations

import json
import math

import torch

import vtr
from vtr.eval import bench_models
from vtr.eval.bench import _device_name, _timed, baseline, format_rows, measure, unpatched_figures, unpatched_line
from vtr.eval.flops import prefill_flops

# llava-hf/llava-onevision-qwen2-7b-ov-hf: SigLIP so400m/14 at 384 px, Qwen2-7B
SHAPE_7B = dict(frames=32, image_size=384, patch_size=14, vision_hidden=1152, vision_layers=26, vision_heads=16,
                vision_intermediate=4304, hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944,
                vocab=152064)
# CPU: the 7B's depths (26 vision blocks, 28 decoder layers) and proportions with every width divided by 8, so a
# selection's cost (one feature layer's attention for a score) stands against a tower and decoder of the real depth;
# 8 frames (1,569 visual tokens). Heads of 72 (vision) and 64 (text) dims; the text keeps Qwen2-7B's 7:1 GQA.
SHAPE = dict(frames=8, image_size=384, patch_size=14, vision_hidden=144, vision_layers=26, vision_heads=2,
             vision_intermediate=538, hidden=448, layers=28, heads=7, kv_heads=1, intermediate=2368, vocab=1024)
QUICK_SHAPE = dict(frames=4, image_size=112, patch_size=14, vision_hidden=64, vision_layers=2, hidden=256, layers=8,
                   heads=4, kv_heads=2, intermediate=704, vocab=1024)
SHAPES = {"cpu": SHAPE, "quick": QUICK_SHAPE, "7b": SHAPE_7B}
VIDEO_TOKEN = 5


def video_model(shape: dict, device="cpu", dtype=torch.float32, attn: str = "sdpa"):
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)

    vision = SiglipVisionConfig(hidden_size=shape["vision_hidden"],
                                intermediate_size=shape.get("vision_intermediate", shape["vision_hidden"] * 4),
                                num_hidden_layers=shape["vision_layers"],
                                num_attention_heads=shape.get("vision_heads", 2),
                                image_size=shape["image_size"], patch_size=shape["patch_size"])
    text = Qwen2Config(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                       num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"], max_position_embeddings=32768,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=4,
                                  video_token_id=VIDEO_TOKEN, vision_feature_layer=-1)
    return bench_models.build_random(LlavaOnevisionForConditionalGeneration, config, device, dtype, attn)


def video_inputs(shape: dict, device="cpu", dtype=torch.float32) -> dict:
    """One video of ``shape["frames"]`` random frames between 15 and 20 prompt tokens; pooled 2 x 2, each frame gives
    ceil(side / 2)^2 tokens, and the video a closing newline."""
    per_frame = math.ceil(shape["image_size"] // shape["patch_size"] / 2) ** 2
    ids = [1] + list(range(10, 24)) + [VIDEO_TOKEN] * (shape["frames"] * per_frame + 1) + list(range(30, 50))
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.tensor([ids], device=device),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=device),
            "pixel_values_videos": torch.randn(1, shape["frames"], 3, shape["image_size"], shape["image_size"],
                                               generator=g).to(device, dtype)}


def run(methods: list[str], retains: list[float], repeats: int = 3, quick: bool = False, threads: int | None = None,
        out: str | None = "bench_video.json", device: str = "cpu", size: str | None = None,
        attn: str = "sdpa") -> dict:
    """``size``: "cpu" (widths scaled down), "quick" or "7b" (LLaVA-OneVision-7B, in bfloat16; the default on CUDA)."""
    if threads:
        torch.set_num_threads(threads)
    cuda = torch.device(device).type == "cuda"
    size = "quick" if quick else size or ("7b" if cuda else "cpu")
    if size not in SHAPES:
        raise ValueError(f"video bench size {size!r} is not defined; choose from {', '.join(SHAPES)}")
    shape, dtype = SHAPES[size], torch.bfloat16 if cuda else torch.float32
    model, inputs = video_model(shape, device, dtype, attn), video_inputs(shape, device, dtype)
    patches = (shape["image_size"] // shape["patch_size"]) ** 2
    ids = inputs["input_ids"][0].tolist()
    visual = ids.count(VIDEO_TOKEN)
    text = len(ids) - visual

    def flops_of(stats):
        per_layer = [visual] * shape["layers"] if stats is None else stats["tokens_per_layer"]
        return prefill_flops(model.config, shape["frames"], patches, [text + n for n in per_layer])["total"]

    base = baseline(model, inputs, repeats, device, flops_of)
    rows = measure(model, inputs, methods, retains, repeats, base, "llava-onevision-video")
    result = {"device": _device_name(device), "torch": torch.__version__, "dtype": str(dtype), "attn": attn,
              "size": size, "shape": shape, "visual_tokens": visual, "prompt_tokens": len(ids),
              "repeats": repeats, **unpatched_figures(base), "rows": rows,
              "frame_reuse": _frame_reuse(model, inputs["pixel_values_videos"], repeats)}
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
    return result


@torch.no_grad()
def _frame_reuse(model, video: torch.Tensor, repeats: int) -> dict:
    """Vision-tower time of a video whose frames each come twice (a static scene sampled densely), unpatched and
    with ``reuse_frames=0`` (only exact repeats are reused, so the features are the same)."""
    doubled = video[:, : video.shape[1] // 2].repeat_interleave(2, dim=1)
    encode = lambda: model.model.get_video_features(doubled)                          # noqa: E731
    base = _timed(encode, repeats)
    with vtr.patch(model, "random", retain=1.0, reuse_frames=0.0) as handle:
        reused = _timed(encode, repeats)
        encoded, given = handle.encoder_inputs
    return {"frames": given, "encoded": encoded, "unpatched_s": base, "reuse_s": reused,
            "saved": 1 - reused / base}


def format_table(result: dict) -> str:
    shape, reuse = result["shape"], result["frame_reuse"]
    return "\n".join([f"device: {result['device']}, torch {result['torch']}, {result['dtype']}, {result['attn']}, size "
                      f"{result['size']}; {shape['frames']} frames, {result['visual_tokens']} visual tokens, prompt "
                      f"{result['prompt_tokens']} tokens", unpatched_line(result), *format_rows(result["rows"]),
                      f"frame reuse: {reuse['frames']} frames, each twice: {reuse['encoded']} encoded, vision tower "
                      f"{reuse['unpatched_s'] * 1e3:.1f} -> {reuse['reuse_s'] * 1e3:.1f} ms "
                      f"({reuse['saved']:.0%} saved)"])
