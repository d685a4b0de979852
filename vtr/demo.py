"""``vtr demo image|video``: answer a question about an image or a video with and without token reduction, side by
side."""
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


def _answer(model, decode, inputs, max_new_tokens):
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        start = time.perf_counter()              # timed after generate() warmed up, so the first run pays no set-up
        model(**inputs, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - start
    return decode(out[0, inputs["input_ids"].shape[1]:]).strip(), prefill


def _highlight(square, kept: torch.Tensor, rows: int, cols: int):
    """``square`` (PIL, the tokens' grid over it) with the cells not in ``kept`` dimmed and kept ones outlined."""
    from PIL import ImageDraw

    dim = square.point(lambda v: v // 4)
    draw = ImageDraw.Draw(dim)
    cell_w, cell_h = square.width / cols, square.height / rows
    for index in kept.tolist():
        r, c = divmod(index, cols)
        box = (round(c * cell_w), round(r * cell_h), round((c + 1) * cell_w), round((r + 1) * cell_h))
        dim.paste(square.crop(box), box[:2])
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=(255, 220, 0))
    return dim


def overlay(image, kept: torch.Tensor, grid: int, path: str, size: int = 336):
    """The image as the model saw it (centre square), with dropped patches dimmed and kept ones outlined."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side)).resize((size, size))
    _highlight(square, kept, grid, grid).save(path)


def frame_strip(frames, kept: torch.Tensor, grid: list[int], path: str, cell: int = 24, per_row: int = 8):
    """The video's frames in rows of ``per_row``, each with its dropped tokens dimmed and kept ones outlined (a
    model frame of several video frames, as Qwen's temporal patches, shows the first of them)."""
    from PIL import Image

    t, rows, cols = grid
    stride = len(frames) // t
    tiles = [_highlight(Image.fromarray(frames[f * stride]).resize((cols * cell, rows * cell)),
                        kept[(kept >= f * rows * cols) & (kept < (f + 1) * rows * cols)] - f * rows * cols, rows, cols)
             for f in range(t)]
    width, height = tiles[0].size
    strip = Image.new("RGB", (width * min(t, per_row), height * -(-t // per_row)))
    for f, tile in enumerate(tiles):
        strip.paste(tile, ((f % per_row) * width, (f // per_row) * height))
    strip.save(path)


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
    model, processor = load_model(model_id, attn_implementation)
    if model_id is None:
        size = sum(p.numel() for p in model.parameters()) / 1e6
        print_fn(f"built-in model: a tiny LLaVA ({size:.1f} M parameters) trained on synthetic shapes questions, no "
                 "download. It knows only that vocabulary; pass --model for a real VLM.")
    inputs = model_inputs(model, processor, [image], [chat_prompt(processor, question)])

    decode = lambda ids: processor.decode(ids, skip_special_tokens=True)     # noqa: E731
    answer, prefill = _answer(model, decode, inputs, max_new_tokens)
    with vtr.patch(model, plugins) as handle:
        pruned_answer, pruned_prefill = _answer(model, decode, inputs, max_new_tokens)
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


DEFAULT_VIDEO_QUESTION = "What moves in the video?"


def run_video(model_id=None, video_path=None, question=None, method="fastvid", retain=None, budget=None,
              num_frames=None, max_new_tokens=24, attn_implementation="sdpa", overlay_path=None, print_fn=print):
    """Answer a question about a video with and without ``method``; print tokens in and out, overall and per frame,
    and prefill times. Offline by default: the shipped clip and an untrained tiny LLaVA-OneVision."""
    from vtr.video import load_video

    plugins = vtr.api.resolve(method, retain, budget)      # bad method or budget: fail before loading anything
    path = video_path or str(resources.files("vtr.assets").joinpath("clip.mp4"))
    frames = load_video(path, num_frames=num_frames or (8 if model_id is None else 16)).frames
    question = question or DEFAULT_VIDEO_QUESTION
    if model_id is None:
        from vtr.builtin import tiny_video_model, tiny_video_inputs

        print_fn("built-in video model: an UNTRAINED tiny LLaVA-OneVision (random weights, no download): it runs the "
                 "real video path, token counts and timings are real, its answers are noise; pass --model for a VLM.")
        model, tokenizer = tiny_video_model(attn_implementation=attn_implementation)
        inputs = tiny_video_inputs(model, tokenizer, frames, question)
        decode = lambda ids: tokenizer.decode([i for i in ids.tolist() if i < len(tokenizer)],   # noqa: E731
                                              skip_special_tokens=True)
    else:
        model, processor = load_model(model_id, attn_implementation)
        content = [{"type": "video"}, {"type": "text", "text": question}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(text=[prompt], videos=[list(frames)], return_tensors="pt").to(model.device)
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(model.dtype)
        decode = lambda ids: processor.decode(ids, skip_special_tokens=True)     # noqa: E731

    answer, prefill = _answer(model, decode, inputs, max_new_tokens)
    with vtr.patch(model, plugins) as handle:
        pruned_answer, pruned_prefill = _answer(model, decode, inputs, max_new_tokens)
        stats, kept, grid = handle.stats()[0], handle.kept()[0], handle.frame_grids()[0]
    print_fn(f"video: {path}, {len(frames)} frames; question: {question}")
    print_fn(f"unpatched  answer: {answer!r}  prefill {prefill * 1e3:.1f} ms")
    print_fn(f"{method:<10} answer: {pruned_answer!r}  prefill {pruned_prefill * 1e3:.1f} ms "
             f"({prefill / pruned_prefill:.2f}x)")
    print_fn(f"visual tokens: {stats['visual_tokens_in']} in, {stats['visual_tokens_out']} out "
             f"(retention {stats['retention']:.3f}, layer-averaged {stats['layer_avg_retention']:.3f})")
    frame_counts = stats.get("frames", [[stats["visual_tokens_in"], stats["visual_tokens_out"]]])
    print_fn("per frame (in -> out): " + ", ".join(f"{i}->{o}" for i, o in frame_counts))
    if overlay_path:
        frame_strip(frames, kept, grid, overlay_path)
        print_fn(f"frame strip written to {overlay_path}")
    return {"answer": answer, "pruned_answer": pruned_answer, "stats": stats}
