"""``vtr eval --stability``: how much each method's kept set moves under small input perturbations.

The "Less Is More -- Until It Breaks" paper shows token compression turns robust VLMs attackable because the
importance ranking is unstable: imperceptible perturbations reorder it. This measures that weakness per method and
retention: for every example, the set of visual tokens kept on the clean image is compared with the set kept on each
perturbed copy (Jaccard index |A & B| / |A | B|; 1 = the same tokens). Perturbations, all seeded:

- ``noise``: Gaussian pixel noise, sigma 2/255 (invisible);
- ``jpeg``: a JPEG round trip at quality 75;
- ``shift``: the image moved one pixel right (the left column repeated).

Each comparison is one prefill per image version; no answers are generated.
"""
from __future__ import annotations

import io
import statistics

import numpy as np
import torch
from PIL import Image

import vtr
from vtr.builtin import chat_prompt, model_inputs
from vtr.eval.data import load_image

PERTURBATIONS = ("noise", "jpeg", "shift")


def perturb(image: Image.Image, kind: str, seed: int = 0) -> Image.Image:
    if kind == "noise":
        pixels = np.asarray(image, dtype=np.float32)
        noise = np.random.default_rng(seed).normal(0.0, 2.0, pixels.shape)
        return Image.fromarray(np.clip(pixels + noise, 0, 255).round().astype(np.uint8))
    if kind == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=75)
        buffer.seek(0)
        with Image.open(buffer) as im:
            return im.convert("RGB")
    if kind == "shift":
        pixels = np.asarray(image)
        return Image.fromarray(np.concatenate([pixels[:, :1], pixels[:, :-1]], axis=1))
    raise ValueError(f"unknown perturbation {kind!r}; choose from {', '.join(PERTURBATIONS)}")


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def _kept(model, processor, images, texts, method: str, retain: float) -> list[set]:
    inputs = model_inputs(model, processor, images, texts)
    with vtr.patch(model, method, retain=retain) as handle, torch.no_grad():
        model(**inputs)
    return [set(k.tolist()) for k in handle.kept()]


def stability(model, processor, examples, methods: list[str], retains: list[float], batch_size: int = 8,
              suffix: str = "", show_progress: bool = True) -> list[dict]:
    """Per method x retention: mean Jaccard index of the kept sets (clean vs perturbed) and the share of examples
    whose kept set did not change at all, per perturbation."""
    from tqdm.auto import tqdm

    for method in methods:                      # unknown method or bad retention: fail before any work
        for retain in retains:
            vtr.api.resolve(method, retain, None)
    processor.tokenizer.padding_side = "left"
    results = []
    with tqdm(total=len(methods) * len(retains) * len(examples), disable=not show_progress, unit="ex") as bar:
        for method in methods:
            for retain in retains:
                bar.set_description(f"{method} @ {retain:g}")
                scores = {kind: [] for kind in PERTURBATIONS}
                for start in range(0, len(examples), batch_size):
                    chunk = examples[start:start + batch_size]
                    texts = [chat_prompt(processor, e.question + suffix) for e in chunk]
                    images = [load_image(e) for e in chunk]
                    clean = _kept(model, processor, images, texts, method, retain)
                    for kind in PERTURBATIONS:
                        moved = [perturb(im, kind, seed=start + i) for i, im in enumerate(images)]
                        scores[kind] += map(jaccard, clean, _kept(model, processor, moved, texts, method, retain))
                    bar.update(len(chunk))
                results.append({"method": method, "retain": retain, "examples": len(examples),
                                "jaccard": {k: statistics.fmean(v) for k, v in scores.items()},
                                "unchanged": {k: sum(x == 1.0 for x in v) / len(v) for k, v in scores.items()}})
    return results


def format_table(results: list[dict]) -> str:
    head = "".join(f" {'J ' + k:>9} {'same ' + k:>10}" for k in PERTURBATIONS)
    lines = [f"{'method':<10} {'retain':>6}{head}"]
    for r in results:
        cells = "".join(f" {r['jaccard'][k]:>9.3f} {r['unchanged'][k]:>10.0%}" for k in PERTURBATIONS)
        lines.append(f"{r['method']:<10} {r['retain']:>6.3f}{cells}")
    return "\n".join(lines)
