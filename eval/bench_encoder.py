"""``vtr bench --encoder timm|open_clip``: images per second of an encoder-only ViT, unpatched and under each encoder
method (ToMe at r = 8 and 16 as in the ToMe paper's ViT-B runs, EViT at its paper schedule), on random weights.

The model is ViT-B/16-shaped at 224 px (197 tokens, 12 blocks, width 768) unless ``quick``; times are medians of
``repeats`` interleaved runs after a warm-up.
"""
from __future__ import annotations

import json
import platform
import statistics
import time

import torch

import vtr

SETTINGS = [("tome", {"r": 8}), ("tome", {"r": 16}), ("evit", {})]
SHAPES = {False: dict(image=224, patch=16, width=768, depth=12, heads=12), True: dict(image=64, patch=16, width=64,
                                                                                      depth=4, heads=2)}


def build(kind: str, quick: bool):
    s = SHAPES[quick]
    torch.manual_seed(0)
    if kind == "timm":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(img_size=s["image"], patch_size=s["patch"], embed_dim=s["width"], depth=s["depth"],
                                 num_heads=s["heads"], num_classes=1000).eval()
    if kind == "open_clip":
        from open_clip.transformer import VisionTransformer

        return VisionTransformer(image_size=s["image"], patch_size=s["patch"], width=s["width"], layers=s["depth"],
                                 heads=s["heads"], mlp_ratio=4.0, output_dim=512).eval()
    raise ValueError(f"unknown encoder {kind!r}; choose timm or open_clip")


def run(kind: str, batch: int = 8, repeats: int = 5, quick: bool = False, threads: int | None = None,
        out: str | None = "bench-encoder.json") -> dict:
    if threads:
        torch.set_num_threads(threads)
    model = build(kind, quick)
    size = SHAPES[quick]["image"]
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))

    def once(setting=None) -> float:
        with torch.no_grad():
            if setting is None:
                start = time.perf_counter()
                model(pixels)
                return time.perf_counter() - start
            with vtr.patch(model, setting[0], **setting[1]):
                start = time.perf_counter()
                model(pixels)
                return time.perf_counter() - start

    once()
    times = {None: []} | {i: [] for i in range(len(SETTINGS))}
    for _ in range(repeats):                      # interleaved, so drifts of the machine hit every setting alike
        times[None].append(once())
        for i, setting in enumerate(SETTINGS):
            times[i].append(once(setting))
    base = statistics.median(times[None])
    rows = []
    for i, (method, options) in enumerate(SETTINGS):
        with vtr.patch(model, method, **options) as handle, torch.no_grad():
            model(pixels)
            stats = handle.stats()[0]
        seconds = statistics.median(times[i])
        rows.append({"method": method, "options": options, "tokens_out": stats["tokens_out"],
                     "block_avg_retention": stats["block_avg_retention"], "seconds": seconds,
                     "images_per_s": batch / seconds, "speedup": base / seconds})
    result = {"device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "torch": torch.__version__, "encoder": kind, "shape": SHAPES[quick], "batch": batch,
              "repeats": repeats, "unpatched_images_per_s": batch / base, "rows": rows}
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
    return result


def format_table(result: dict) -> str:
    s = result["shape"]
    lines = [f"device: {result['device']}, torch {result['torch']}; {result['encoder']} ViT "
             f"({s['image']} px, patch {s['patch']}, width {s['width']}, {s['depth']} blocks), batch {result['batch']}; "
             f"unpatched {result['unpatched_images_per_s']:.1f} images/s (median of {result['repeats']})",
             f"{'method':<16} {'tokens out':>10} {'block avg':>9} {'images/s':>9} {'speedup':>8}"]
    for r in result["rows"]:
        label = r["method"] + "".join(f" {k}={v}" for k, v in r["options"].items())
        lines.append(f"{label:<16} {r['tokens_out']:>10} {r['block_avg_retention']:>9.0%} {r['images_per_s']:>9.1f} "
                     f"{r['speedup']:>7.2f}x")
    return "\n".join(lines)
