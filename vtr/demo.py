"""``vtr demo image``: answer a question about an image with and without token reduction, side by side."""
from __future__ import annotations

import time
from importlib import resources

import torch

import vtr

from vtr.builtin import chat_prompt, load_model, model_inputs
from vtr.cli import DEFAULT_QUESTION


DEFAULT_EXAMPLE = "test-00004"      # a "small" question of the shipped test split: the answer sits in a few patches


def default_example():
    """The demo's default (image, question, expected answer), from the shipped shapes test split."""
    from vtr.eval.data import load_examples, load_image

    path = resources.files("vtr.assets").joinpath("shapes-test", "test.jsonl")
    example = next(e for e in load_examples(path) if e.id == DEFAULT_EXAMPLE)
    return load_image(example), example.question, example.answer


def _answer(model, processor, inputs, max_new_tokens):
    torch.manual_seed(0)
    with torch.no_grad():
        start = time.perf_counter()
        model(**inputs, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - start
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    text = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    return text.strip(), prefill


def overlay(image, kept: torch.Tensor, grid: int, path: str, size: int = 336):
    """The image as the model saw it (centre square), with dropped patches dimmed and kept ones outlined."""
    from PIL import ImageDraw

    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side)).resize((size, size))
    dim = square.point(lambda v: v // 4)
    cell = size / grid
    draw = ImageDraw.Draw(dim)
    for index in kept.tolist():
        r, c = divmod(index, grid)
        box = (round(c * cell), round(r * cell), round((c + 1) * cell), round((r + 1) * cell))
        dim.paste(square.crop(box), box[:2])
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=(255, 220, 0))
    dim.save(path)


def run(model_id=None, image_path=None, question=None, method="fastv", retain=None, budget=None,
        max_new_tokens=24, attn_implementation="sdpa", overlay_path=None, print_fn=print):
    from PIL import Image

    plugins = vtr.api.resolve(method, retain, budget)      # bad method or budget: fail before loading anything
    expected = None
    if image_path:
        image = Image.open(image_path).convert("RGB")
    else:
        image, default_question, expected = default_example()
        question = question or default_question
    question = question or DEFAULT_QUESTION
    if model_id is None:
        print_fn("built-in model: a tiny LLaVA (1.1 M parameters) trained on synthetic shapes questions, no download. "
                 "It knows only that vocabulary; pass --model for a real VLM.")
    model, processor = load_model(model_id, attn_implementation)
    inputs = model_inputs(model, processor, [image], [chat_prompt(processor, question)])

    answer, prefill = _answer(model, processor, inputs, max_new_tokens)
    with vtr.patch(model, plugins) as handle:
        pruned_answer, pruned_prefill = _answer(model, processor, inputs, max_new_tokens)
        stats, kept = handle.stats()[0], handle.kept()[0]
    print_fn(f"question: {question}" + (f"  (expected: {expected})" if expected else ""))
    print_fn(f"unpatched  answer: {answer!r}  prefill {prefill * 1e3:.1f} ms")
    print_fn(f"{method:<10} answer: {pruned_answer!r}  prefill {pruned_prefill * 1e3:.1f} ms")
    print_fn(f"visual tokens: {stats['visual_tokens_in']} in, {stats['visual_tokens_out']} out "
             f"(retention {stats['retention']:.3f}, layer-averaged {stats['layer_avg_retention']:.3f})")
    for stage in stats["stages"]:
        print_fn(f"  stage {stage['method']} at {stage['where']}: {stage['tokens_in']} -> {stage['tokens_out']}")
    if overlay_path:
        grid = int(round(stats["visual_tokens_in"] ** 0.5))
        if grid * grid != stats["visual_tokens_in"]:
            raise ValueError("--overlay needs one square grid of visual tokens")
        overlay(image, kept, grid, overlay_path)
        print_fn(f"overlay written to {overlay_path}")
    return {"answer": answer, "pruned_answer": pruned_answer, "stats": stats}
