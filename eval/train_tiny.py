"""Train the tiny built-in models on the synthetic shapes QA (``vtr.eval.shapes``), from scratch, on a CPU.

    python -m vtr.eval.train_tiny --out my-tiny-llava --vision-steps 1200 --steps 3000 --lr 2e-3
    python -m vtr.eval.train_tiny --out my-tiny-qwen --arch qwen2_vl --vision-steps 1200 --steps 3000 --video-every 4

The result is a stock ``LlavaForConditionalGeneration`` (or ``Qwen2VLForConditionalGeneration``) with a word-level
tokenizer and the architecture's processor, saved with ``save_pretrained`` so that ``from_pretrained(path)`` loads it
like a hub checkpoint. Examples are generated on the fly from the train split's seeds.

Each training sequence is one image, then every question its scene allows (up to 16), each followed by its answer and
</s>; with --isolate-questions each question sees the image and its own words only (``isolated_questions``). The
loss is the cross-entropy of the answers and </s>, plus training-only terms:
- per-patch probes on the projector output (colour, shape, size, object centre, row, column; the colour and shape
  probes are the words' input embeddings);
- a focus loss steering one attention head at each "?" to the patches the question names;
- with --inventory-weight, a second head at each "how many" and "is there" question's "?" steered to spread its
  weight evenly over the image, so its output is the mean visual token; a probe marks each object's centre patch with
  the object's colour and shape, so that mean is an inventory of the scene in which every object counts once;
- with --tally-weight, a third head of that layer at the same questions steered to give <s> and each centre patch of
  the objects the question counts the same weight, 1 / (n + 1) for n objects: its output then tells the count (and
  whether there is one), and the centres' inventory entries make "a red circle" one class, not two attributes;
- with --gather-weight, head 0 of the first decoder layer at each "?" steered evenly onto the question's colour,
  shape and size words, so the "?" carries all of them, not only the word before it.
A vision-only warm-up trains the tower and projector on the probes first. Probes and hooks are dropped before saving,
so the saved model is the stock architecture. The README's "The built-in model" says what each piece fixed.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from vtr.builtin import chat_prompt
from vtr.eval import shapes

SPECIALS = ["<pad>", "<s>", "</s>", "<image>", "<unk>"]
QWEN_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = ("{% for message in messages %}{% for part in message['content'] %}"
                 "{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }}{% endif %}"
                 "{% endfor %}{% endfor %}")
QWEN_CHAT_TEMPLATE = ("{% for message in messages %}{% for part in message['content'] %}"
                      "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
                      "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|> "
                      "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endfor %}")
SHAPE = dict(image_size=shapes.IMAGE_SIZE, patch_size=16, vision_hidden=128, vision_layers=4, hidden=128, layers=4,
             heads=4, kv_heads=2, intermediate=384)
# Qwen2-VL: 8 px patches merged 2 x 2, so a 224 px image gives the same 14 x 14 grid of 16 px tokens as the LLaVA.
QWEN_SHAPE = dict(patch_size=8, merge=2, vision_hidden=96, vision_layers=3, hidden=128, layers=4, heads=4, kv_heads=2,
                  intermediate=384)
ARCHS = ("llava", "qwen2_vl")


def _tokenizer(words: list[str], extra_specials: list[str]):
    """Word-level tokenizer (ids: <pad> 0, <s> 1, </s> 2, <image> 3, <unk> 4, then ``extra_specials``, then
    ``words``) that starts every text with <s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + extra_specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.decoder = decoders.WordPiece(prefix="##")          # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", *extra_specials]})
    return tokenizer


def build_processor(arch: str = "llava"):
    """The tokenizer (``_tokenizer``) and image processor of a built-in model; the chat template puts the image (or
    video) before the question.

    llava: the shapes vocabulary and a CLIP image processor at the image size. qwen2_vl: the shapes and clips
    vocabularies, Qwen2-VL's vision tokens, and Qwen2-VL image and video processors fixed at 224 px images (14 x 14
    merged tokens) and 112 px frames (7 x 7 merged tokens per pair of frames). The video processor needs torchvision."""
    if arch == "qwen2_vl":
        from transformers import Qwen2VLProcessor, Qwen2VLVideoProcessor

        try:
            from transformers import Qwen2VLImageProcessorPil as ImageProcessor      # no torchvision needed
        except ImportError:
            from transformers import Qwen2VLImageProcessor as ImageProcessor
        from vtr.eval import clips

        tokenizer = _tokenizer(sorted(set(shapes.vocabulary()) | set(clips.vocabulary())), QWEN_SPECIALS)
        grid = dict(patch_size=QWEN_SHAPE["patch_size"], merge_size=QWEN_SHAPE["merge"], temporal_patch_size=2)
        image_pixels, frame_pixels = shapes.IMAGE_SIZE ** 2, (shapes.IMAGE_SIZE // 2) ** 2
        return Qwen2VLProcessor(
            image_processor=ImageProcessor(min_pixels=image_pixels, max_pixels=image_pixels, **grid),
            video_processor=Qwen2VLVideoProcessor(min_pixels=frame_pixels, max_pixels=frame_pixels, **grid),
            tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE)
    if arch != "llava":
        raise ValueError(f"unknown built-in architecture {arch!r}; expected one of {ARCHS}")
    from transformers import LlavaProcessor

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor      # no torchvision needed
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor

    tokenizer = _tokenizer(shapes.vocabulary(), [])
    size = SHAPE["image_size"]
    images = ImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=SHAPE["patch_size"],
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def build_model(processor, seed: int = 0, arch: str = "llava"):
    """A randomly initialised built-in model over the processor's vocabulary."""
    if arch == "qwen2_vl":
        model = _qwen2_vl(processor.tokenizer, seed)
    else:
        from vtr.builtin import tiny_llava

        model = tiny_llava(seed=seed, vocab=len(processor.tokenizer), **SHAPE)
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model


def _qwen2_vl(tokenizer, seed: int):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    s = QWEN_SHAPE
    head_dim = s["hidden"] // s["heads"]
    third = head_dim // 2 // 4                  # M-RoPE: temporal, height and width sections of the rotary pairs
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [head_dim // 2 - 2 * third, third, third]}
    text = dict(vocab_size=len(tokenizer), hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                max_position_embeddings=4096, rope_parameters=rope, rms_norm_eps=1e-6,      # the LLaVA's (Llama's)
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    vision = dict(depth=s["vision_layers"], embed_dim=s["vision_hidden"], hidden_size=s["hidden"],
                  num_heads=s["vision_hidden"] // 16, mlp_ratio=2, in_channels=3, patch_size=s["patch_size"],
                  spatial_merge_size=s["merge"], temporal_patch_size=2)
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in zip(
        ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"), QWEN_SPECIALS)}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def patch_owners(scene, grid: int) -> torch.Tensor:
    """The index of the object covering most of each patch (at least an eighth of it, so small objects keep a patch),
    -1 for background; row-major, (grid * grid,)."""
    import numpy as np

    owner = shapes.object_map(scene).astype(np.int64)
    cell, n = shapes.IMAGE_SIZE // grid, len(scene.objects) + 1
    cells = (np.arange(grid * cell) // cell)[:, None] * grid + (np.arange(grid * cell) // cell)[None, :]
    counts = np.bincount((cells * n + owner).ravel(), minlength=grid * grid * n).reshape(grid * grid, n)
    counts[:, 0] = cell * cell // 8                   # background wins unless an object covers an eighth
    return torch.from_numpy(counts.argmax(-1)) - 1


def centre_patch(obj, grid: int) -> int:
    """Row-major index of the patch of a grid x grid image that holds ``obj``'s centre."""
    cell = shapes.IMAGE_SIZE // grid
    return min(obj.y // cell, grid - 1) * grid + min(obj.x // cell, grid - 1)


def question_objects(scene, question: str) -> list[int]:
    """Indices of the objects a shapes question is about: those of its shape, and of its colour ("is there a red
    circle") or size ("the small circle") where it names one."""
    words = question.split()
    shape = next(w.removesuffix("s") for w in words if w.removesuffix("s") in shapes.SHAPES)
    color = next((w for w in words if w in shapes.COLORS), None)
    return [i for i, o in enumerate(scene.objects) if o.shape == shape and color in (None, o.color)
            and ("small" not in words or o.size == "small")]


def patch_targets(scene, grid: int) -> dict[str, torch.Tensor]:
    """Per-patch classes for the auxiliary loss, row-major over the grid, (grid * grid,) each: the colour (0:
    background, 1..6), shape (0, 1..4) and size (0, 1..3) of the object covering most of the patch (at least an eighth
    of it, so small objects keep a patch); whether an object's centre lies in the patch (what counting needs: one mark
    per object, however many patches it covers); the colour and shape of the object centred there as one class (0:
    none, else 1 + colour * shapes + shape: an inventory entry, for ``inventory_loss``); and the patch's row and
    column (what the side questions need)."""
    winner = patch_owners(scene, grid) + 1
    objects = scene.objects
    colors = torch.tensor([0] + [1 + list(shapes.COLORS).index(o.color) for o in objects])
    kinds = torch.tensor([0] + [1 + shapes.SHAPES.index(o.shape) for o in objects])
    sizes = torch.tensor([0] + [1 + list(shapes.SIZES).index(o.size) for o in objects])
    inventory = torch.zeros(grid * grid, dtype=torch.long)
    for o in objects:
        inventory[centre_patch(o, grid)] = 1 + list(shapes.COLORS).index(o.color) * len(shapes.SHAPES) + \
            shapes.SHAPES.index(o.shape)
    centres = (inventory > 0).long()
    rows, cols = torch.arange(grid).repeat_interleave(grid), torch.arange(grid).repeat(grid)
    return {"colors": colors[winner], "shapes": kinds[winner], "sizes": sizes[winner], "centres": centres,
            "inventory": inventory, "rows": rows, "cols": cols}


class WordHead(torch.nn.Module):
    """A per-patch classifier whose class vectors are the language model's input embeddings of the class names (a
    learned vector for "none" first): the visual tokens of a red patch are pulled toward the word "red", so the
    question's words find them by attention without first learning a private code."""

    def __init__(self, embeddings: torch.nn.Embedding, word_ids: list[int], none: bool = True):
        super().__init__()
        self.embeddings = embeddings                  # the model's own: the loss trains them too
        self.register_buffer("ids", torch.tensor(word_ids), persistent=False)
        self.none = torch.nn.Parameter(torch.zeros(1, embeddings.embedding_dim)) if none else None
        self.bias = torch.nn.Parameter(torch.zeros(len(word_ids) + bool(none)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        words = self.embeddings.weight[self.ids]
        weight = words if self.none is None else torch.cat([self.none, words])
        return features @ weight.T + self.bias


def aux_heads(hidden: int, grid: int, embeddings: torch.nn.Embedding | None = None, tokenizer=None,
              inventory: bool = False) -> torch.nn.ModuleDict:
    """Probes on the projector output, one per ``patch_targets`` key (training only; the inventory probe only with
    ``inventory``). With the model's ``embeddings`` and ``tokenizer``, colour and shape are ``WordHead``s over the
    colour and shape words."""
    classes = {"colors": len(shapes.COLORS) + 1, "shapes": len(shapes.SHAPES) + 1, "sizes": len(shapes.SIZES) + 1,
               "centres": 2, "rows": grid, "cols": grid}
    if inventory:
        classes["inventory"] = 1 + len(shapes.COLORS) * len(shapes.SHAPES)
    heads = {k: torch.nn.Linear(hidden, n) for k, n in classes.items()}
    if embeddings is not None:
        for key, words in (("colors", list(shapes.COLORS)), ("shapes", list(shapes.SHAPES))):
            heads[key] = WordHead(embeddings, tokenizer.convert_tokens_to_ids(words))
    return torch.nn.ModuleDict(heads)


def aux_loss(heads, features: torch.Tensor, targets: dict) -> torch.Tensor:
    """Sum of the heads' cross-entropies; shape and size only over patches an object covers, so the background, most
    of every image, does not drown the hardest target (telling a large circle's inside from a square's)."""
    objects = targets["colors"] > 0
    loss = 0.0
    for key in heads:
        logits, target = heads[key](features), targets[key]
        if key in ("shapes", "sizes"):
            logits, target = logits[objects], target[objects]
        loss = loss + torch.nn.functional.cross_entropy(logits.flatten(0, -2), target.flatten())
    return loss


@torch.no_grad()
def aux_accuracy(heads, features: torch.Tensor, targets: dict) -> dict[str, float]:
    """Each head's accuracy over the patches an object covers (what the questions read)."""
    objects = targets["colors"] > 0
    return {k: round(float((heads[k](features)[objects].argmax(-1) == targets[k][objects]).float().mean()), 3)
            for k in heads}


def stacked_targets(examples) -> dict[str, torch.Tensor]:
    grid = SHAPE["image_size"] // SHAPE["patch_size"]
    per_example = [patch_targets(e["scene"], grid) for e in examples]
    return {k: torch.stack([t[k] for t in per_example]) for k in per_example[0]}


_per_token = ("mm_token_type_ids",)      # Qwen2-VL's processor marks each prompt token as text (0) or visual


def batch(processor, seeds, questions: int = 16, device="cpu", video: bool = False) -> dict:
    """A training batch. Each sequence is the example's prompt, its answer and </s>, then up to ``questions - 1`` more
    questions about the same scene, each followed by its answer and </s> (``shapes.scene_questions``; text tokens are
    cheap beside the image's, so each image is asked all it can answer); prompts are left-padded and the tails
    right-padded. Labels only on answers and </s>; ``targets``: the per-patch classes of the auxiliary loss.
    ``video``: clips (``vtr.eval.clips``) with their three questions instead, and no per-patch targets.
    ``segments`` (B, L): which question each token belongs to (``isolated_questions`` uses it)."""
    import random

    from vtr.eval import clips

    tok = processor.tokenizer
    if video:
        examples = [clips.make_clip(s) for s in seeds]
        texts = [chat_prompt(processor, e["question"], images=0, videos=1) for e in examples]
        inputs = processor(videos=[e["frames"] for e in examples], text=texts, return_tensors="pt", padding=True)
        ask = lambda seed, e: random.Random(seed).sample(clips.clip_questions(e["clip"]), 3)     # noqa: E731
    else:
        examples = [shapes.make_example(s) for s in seeds]
        texts = [chat_prompt(processor, e["question"]) for e in examples]
        inputs = processor(images=[e["image"] for e in examples], text=texts, return_tensors="pt", padding=True)
        ask = lambda seed, e: shapes.scene_questions(e["scene"], random.Random(seed))          # noqa: E731
    tails, tail_segments, asked = [], [], []
    for seed, e in zip(seeds, examples):
        tail, segment = [tok.convert_tokens_to_ids(e["answer"]), tok.eos_token_id], [1, 1]
        others = [qa for qa in ask(seed, e) if qa[0] != e["question"]][:questions - 1]
        for k, (question, answer, _) in enumerate(others, start=2):
            words = tok.convert_tokens_to_ids(question.split()) + [tok.convert_tokens_to_ids(answer), tok.eos_token_id]
            tail, segment = tail + words, segment + [k] * len(words)
        tails.append(tail)
        tail_segments.append(segment)
        asked.append([e["question"]] + [q for q, _, _ in others])
    width = max(map(len, tails))
    tail_ids = torch.tensor([t + [tok.pad_token_id] * (width - len(t)) for t in tails])
    tail_mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in tails])
    ids = torch.cat([inputs["input_ids"], tail_ids], dim=1)
    mask = torch.cat([inputs["attention_mask"], tail_mask], dim=1)
    # Segments: -1 padding, 0 the prompt up to its question (image or video included), k the k-th question with
    # its answer and </s> (the first question's words end the prompt).
    prompt = inputs["attention_mask"].long() - 1
    for b, e in enumerate(examples):
        prompt[b, prompt.shape[1] - len(e["question"].split()):] = 1
    segments = torch.cat([prompt, torch.tensor([s + [-1] * (width - len(s)) for s in tail_segments])], dim=1)
    answer_or_eos = (ids == tok.eos_token_id) | torch.roll(ids == tok.convert_tokens_to_ids("?"), 1, dims=1)
    labels = ids.masked_fill(~(answer_or_eos & mask.bool()), -100)
    out = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
           "segments": segments.to(device),
           **{k: v.to(device) for k, v in inputs.items() if k not in ("input_ids", "attention_mask", *_per_token)},
           **{k: torch.cat([inputs[k], torch.zeros_like(tail_ids)], dim=1).to(device) for k in _per_token if k in inputs}}
    if not video:
        out["targets"] = {k: t.to(device) for k, t in stacked_targets(examples).items()}
        out["focus"] = focus_masks(examples, asked).to(device)
        out["inventory"] = inventory_questions(asked).to(device)
        out["tally"] = tally_masks(examples, asked).to(device)
    return out


def focus_masks(examples, asked: list[list[str]]) -> torch.Tensor:
    """(images, questions, patches) bool: for each question of each sequence, in order, the patches of the objects it
    is about (none for an "is there" question answered no)."""
    grid = shapes.IMAGE_SIZE // 16
    out = torch.zeros(len(examples), max(map(len, asked)), grid * grid, dtype=torch.bool)
    for b, (e, questions) in enumerate(zip(examples, asked)):
        owners = patch_owners(e["scene"], grid)
        for q, question in enumerate(questions):
            out[b, q] = torch.isin(owners, torch.tensor(question_objects(e["scene"], question), dtype=torch.long))
    return out


def isolated_questions(model, inputs: dict) -> tuple[dict, torch.Tensor]:
    """The model inputs that replace ``inputs``' mask (an additive (B, 1, L, L) one) and positions, and the mask as
    (B, L, L) bool (True: may attend), under which every question of a ``batch`` sequence sees the image and its own
    words only, at the positions it would have as the only question after the image: each is trained as if asked
    alone, while the image passes through the model once. Without this the later questions read the earlier answers
    ("is there a red circle ?" after "what color is the circle ? blue" needs no pixels), and the model learns to read
    them instead of looking (measured: see the README)."""
    ids, mask, segments = inputs["input_ids"], inputs["attention_mask"], inputs["segments"]
    n = ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()
    visible = (segments[:, :, None] == segments[:, None, :]) | (segments == 0)[:, None, :]
    allowed = causal & visible & (segments >= 0)[:, None, :]
    allowed |= torch.eye(n, dtype=torch.bool, device=ids.device)       # padding sees itself: no empty softmax row
    if hasattr(model.model, "get_rope_index"):                          # M-RoPE: the model's own 3D positions
        positions, _ = model.model.get_rope_index(
            ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"), attention_mask=mask)
    else:
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    positions = positions.clone()
    for b in range(len(ids)):                 # question k moves back to where the first question starts
        first = int((segments[b] == 1).nonzero()[0])
        for k in range(2, int(segments[b].max()) + 1):
            where = segments[b] == k
            positions[..., b, where] -= int(where.nonzero()[0]) - first
    blocked = torch.zeros(allowed.shape, device=ids.device).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return {"attention_mask": blocked[:, None], "position_ids": positions}, allowed


def _head_weights(captured: dict, inputs: dict, head: int) -> torch.Tensor:
    """One attention head's weights (B, L, L) in the decoder layer whose input ``captured`` holds, recomputed from the
    layer's own projections and RoPE (the layer itself runs sdpa, which returns no weights), under the causal mask or
    the batch's ``allowed`` mask (``isolated_questions``)."""
    from vtr.kernels import apply_rope

    layer, hidden, (cos, sin) = captured["layer"], captured["hidden"], captured["rope"]
    attn, ids, mask = layer.self_attn, inputs["input_ids"], inputs["attention_mask"].bool()
    x = layer.input_layernorm(hidden)
    b, n, d = *ids.shape, attn.head_dim
    kv = head // (attn.config.num_attention_heads // attn.config.num_key_value_heads)
    q = apply_rope(attn.q_proj(x).view(b, n, -1, d)[:, :, head:head + 1].transpose(1, 2), cos, sin)[:, 0]
    k = apply_rope(attn.k_proj(x).view(b, n, -1, d)[:, :, kv:kv + 1].transpose(1, 2), cos, sin)[:, 0]
    scores = (q @ k.transpose(1, 2)) * attn.scaling
    allowed = inputs.get("allowed")
    if allowed is None:
        allowed = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()[None] & mask[:, None, :]
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


def _head_at_questions(model, captured: dict, inputs: dict, question_mark: int, questions: int, head: int):
    """``_head_weights`` at each sequence's first ``questions`` "?" marks (where the answers are predicted): per
    sequence, its weights on the image's patches (Q, patches) and on the first token (<s>, the usual attention
    sink), (Q,)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    weights = _head_weights(captured, inputs, head)                               # (B, L, L)
    visual = (ids == model.config.image_token_id).nonzero()[:, 1].view(len(ids), -1)   # every image alike
    for i in range(len(ids)):
        marks = (ids[i] == question_mark).nonzero()[:, 0][:questions]
        yield weights[i, marks][:, visual[i]], weights[i, marks, int(mask[i].nonzero()[0])]


def attribute_words(tokenizer) -> torch.Tensor:
    """Token ids of the words that name what a question is about: colours, shapes (and plurals), "small"."""
    words = [*shapes.COLORS, *shapes.SHAPES, *(f"{w}s" for w in shapes.SHAPES), "small"]
    return torch.tensor(tokenizer.convert_tokens_to_ids(words))


def gather_loss(captured: dict, inputs: dict, attributes: torch.Tensor, question_mark: int, eos: int) -> torch.Tensor:
    """How far head 0 of the first decoder layer, at each question's "?", is from even weights over the question's
    attribute words (``attribute_words``: "red" and "circle" in "is there a red circle ?"): the mean of -log of
    each word's weight minus log(number of words) (0 when even). A "?" that reads only the word before it carries the shape
    but not the colour, and the focus head then finds a blue circle for "a red circle" (measured: see the README)."""
    ids = inputs["input_ids"]
    weights = _head_weights(captured, inputs, head=0)
    losses = []
    for i in range(len(ids)):
        ends = (ids[i] == eos).nonzero()[:, 0]
        for m in (ids[i] == question_mark).nonzero()[:, 0].tolist():
            start = int(ends[ends < m].max()) + 1 if (ends < m).any() else 0     # this question's own words only
            words = start + torch.isin(ids[i, start:m], attributes).nonzero()[:, 0]
            if len(words):
                losses.append(-torch.log(weights[i, m, words] + 1e-6).mean() - math.log(len(words)))
    return torch.stack(losses).mean() if losses else torch.zeros(())


def focus_loss(model, captured: dict, inputs: dict, focus: torch.Tensor, question_mark: int) -> torch.Tensor:
    """How little of head 0's weight at each question's "?" (``_head_at_questions``) falls on the patches of the
    objects the question is about, or, when there are none ("is there a red circle ?" answered no), on <s> ("nothing
    matched"): the mean of -log(that weight)."""
    losses = []
    for wanted, (patches, sink) in zip(focus, _head_at_questions(model, captured, inputs, question_mark,
                                                                   focus.shape[1], head=0)):
        wanted = wanted[: len(sink)]
        mass = (patches * wanted).sum(-1)                                        # (questions,)
        losses.append(-torch.log(torch.where(wanted.any(-1), mass, sink) + 1e-6))
    return torch.cat(losses).mean()


def inventory_questions(asked: list[list[str]]) -> torch.Tensor:
    """(images, questions) bool: which questions of each sequence, in order, are answered from the scene's inventory
    ("how many circles", "is there a red circle")."""
    out = torch.zeros(len(asked), max(map(len, asked)), dtype=torch.bool)
    for b, questions in enumerate(asked):
        out[b, :len(questions)] = torch.tensor([q.startswith(("how many", "is there")) for q in questions])
    return out


def tally_masks(examples, asked: list[list[str]]) -> torch.Tensor:
    """(images, questions, patches) bool: for each "how many" and "is there" question of each sequence, in order, the
    centre patches of the objects it counts (``question_objects``); nothing for the other questions."""
    grid = shapes.IMAGE_SIZE // 16
    out = torch.zeros(len(examples), max(map(len, asked)), grid * grid, dtype=torch.bool)
    for b, (e, questions) in enumerate(zip(examples, asked)):
        for q, question in enumerate(questions):
            if question.startswith(("how many", "is there")):
                objects = e["scene"].objects
                out[b, q, [centre_patch(objects[i], grid) for i in question_objects(e["scene"], question)]] = True
    return out


def tally_loss(model, captured: dict, inputs: dict, tally: torch.Tensor, asked: torch.Tensor,
               question_mark: int) -> torch.Tensor:
    """How far head 2's weights at each inventory question's "?" (``_head_at_questions``; ``asked``:
    ``inventory_questions``) are from equal on <s> and on each centre patch of the question's objects (``tally``):
    the mean of -log of those n + 1 weights minus log(n + 1) (0 when equal). Equal shares are what softmax can give
    for any n (each centre's logit level with <s>'s), and the head's output, (v<s> + sum of the centres' values) /
    (n + 1), then moves with n; all on <s> means there is none."""
    losses = []
    for wanted, ask, (patches, sink) in zip(tally, asked, _head_at_questions(model, captured, inputs, question_mark,
                                                                             tally.shape[1], head=2)):
        for q in ask[: len(sink)].nonzero()[:, 0].tolist():
            shares = torch.cat([sink[q:q + 1], patches[q, wanted[q]]])
            losses.append(-torch.log(shares + 1e-6).mean() - math.log(len(shares)))
    return torch.stack(losses).mean() if losses else torch.zeros(())


def inventory_loss(model, captured: dict, inputs: dict, wanted: torch.Tensor, question_mark: int) -> torch.Tensor:
    """How far head 1's weights at each inventory question's "?" (``_head_at_questions``) are from even over the
    image's patches: their cross-entropy against the uniform distribution minus its entropy (a KL, 0 when even).
    Even weights make the head's output the mean of its values over the patches, in which each object's centre
    patch (``patch_targets``' inventory entry) counts exactly once, however many objects there are. Steering it to
    a fixed share (1/5) on each counted centre and the rest on <s> instead saturates: softmax cannot give that for
    every n at once (``tally_loss``'s equal shares it can)."""
    losses = []
    for asked, (patches, _) in zip(wanted, _head_at_questions(model, captured, inputs, question_mark,
                                                               wanted.shape[1], head=1)):
        ce = -torch.log(patches + 1e-6).mean(-1) - math.log(patches.shape[-1])
        losses.append(ce[asked[: len(ce)]])
    return torch.cat(losses).mean() if sum(map(len, losses)) else torch.zeros(())


def vision_batch(processor, seeds, device="cpu") -> dict:
    """Images and per-patch targets only, for the warm-up of the vision tower and projector. For the LLaVA the images
    are at the processor's size already, so its resize and crop do nothing: only its rescale and normalisation are
    applied; Qwen2-VL's processor also cuts the patches, so it runs whole."""
    import numpy as np

    examples = [shapes.make_example(s) for s in seeds]
    targets = {k: t.to(device) for k, t in stacked_targets(examples).items()}
    images = processor.image_processor
    if hasattr(images, "merge_size"):
        out = images(images=[e["image"] for e in examples], return_tensors="pt")
        return {"pixel_values": out["pixel_values"].to(device), "image_grid_thw": out["image_grid_thw"].to(device),
                "targets": targets}
    pixels = torch.from_numpy(np.stack([np.asarray(e["image"]) for e in examples])).permute(0, 3, 1, 2)
    pixels = (pixels * images.rescale_factor - torch.tensor(images.image_mean)[:, None, None]) / torch.tensor(
        images.image_std)[:, None, None]
    return {"pixel_values": pixels.float().to(device), "targets": targets}


@torch.no_grad()
def accuracy(model, processor, split: str = "val", n: int = 250, video: bool = False) -> dict[str, float]:
    """Greedy exact match of the first generated word on ``n`` examples of a split (families round-robin): overall
    and per family. ``video``: on clips (``vtr.eval.clips``) instead of images."""
    from vtr.eval import clips

    model.eval()
    families = clips.FAMILIES if video else shapes.FAMILIES
    hits = {f: [] for f in families}
    seeds = shapes.SPLITS[split]
    for start in range(0, n, 50):
        if video:
            chunk = [clips.make_clip(seeds[i], families[i % 3]) for i in range(start, min(n, start + 50))]
            inputs = processor(videos=[e["frames"] for e in chunk], text=[chat_prompt(
                processor, e["question"], images=0, videos=1) for e in chunk], return_tensors="pt", padding=True)
        else:
            chunk = [shapes.make_example(seeds[i], families[i % 5]) for i in range(start, min(n, start + 50))]
            inputs = processor(images=[e["image"] for e in chunk], text=[chat_prompt(processor, e["question"])
                                                                        for e in chunk], return_tensors="pt", padding=True)
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False)[:, -1]
        for word, e in zip(processor.tokenizer.convert_ids_to_tokens(out.tolist()), chunk):
            hits[e["family"]].append(word == e["answer"])
    model.train()
    return {"all": sum(map(sum, hits.values())) / n, **{f: sum(h) / max(1, len(h)) for f, h in hits.items()}}


def _schedule(opt, steps: int):
    """Linear warm-up over the first 5 % of steps, then cosine decay to zero."""
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))


def _projector(model) -> torch.nn.Module:
    """The module whose output is the visual tokens the language model receives, in raster order per image."""
    return model.model.visual.merger if hasattr(model.model, "visual") else model.model.multi_modal_projector


def load_teacher(path: str, model, tokenizer, copy: bool = True):
    """A LLaVA saved by this script, frozen, as a Qwen2-VL student's teacher. With ``copy`` (a new student) the
    student's language model starts as a copy of the teacher's (same shape; embedding and output rows matched by token,
    the Qwen2 q/k/v biases zero), so only its vision tower has to be trained to give the visual tokens the teacher's
    projector gives; without (a student trained further) the teacher only supplies those visual tokens."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    teacher = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
    teacher_processor = AutoProcessor.from_pretrained(path)
    source, target = teacher.model.language_model, model.model.language_model
    missing = {k for k in target.state_dict() if not k.endswith((".bias", "embed_tokens.weight"))} - set(
        source.state_dict())
    if missing:
        raise ValueError(f"the teacher's language model does not match the student's: {sorted(missing)[:3]}")
    if not copy:
        return teacher, teacher_processor
    rows = teacher_processor.tokenizer.get_vocab()
    with torch.no_grad():
        target.load_state_dict({k: v for k, v in source.state_dict().items() if k != "embed_tokens.weight"},
                               strict=False)
        for name, bias in target.named_parameters():
            if name.endswith(".bias"):
                bias.zero_()
        for student, given in ((target.embed_tokens.weight, source.embed_tokens.weight),
                               (model.lm_head.weight, teacher.lm_head.weight)):
            for token, i in tokenizer.get_vocab().items():
                if token in rows:
                    student[i] = given[rows[token]]
    return teacher, teacher_processor


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared error of the student's visual tokens against the teacher's, relative to the teacher's mean square."""
    return (student - teacher).pow(2).mean() / teacher.pow(2).mean()


def train(out: str, steps: int, batch_size: int, lr: float, seed: int, threads: int | None, log_every: int,
          aux_weight: float = 0.5, init: str | None = None, vision_steps: int = 0, questions: int = 16,
          arch: str = "llava", val_examples: int = 250, video_every: int = 0, word_heads: bool = True,
          focus_weight: float = 1.0, focus_layer: int = 1, teacher: str | None = None, distill_weight: float = 1.0,
          vision_lr: float | None = None, inventory_weight: float = 0.0, gather_weight: float = 0.0,
          isolate: bool = False, tally_weight: float = 0.0):
    if threads:
        torch.set_num_threads(threads)
    if init:                                   # go on training a saved model (the seeds continue past its steps)
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(init, dtype=torch.float32).train()
        done = json.loads((Path(init) / "training.json").read_text())
        seed, history = done["seed"], done.get("history", []) + [{k: v for k, v in done.items() if k != "history"}]
        arch = done.get("arch", "llava")
        first_step = sum(h.get("steps_done", h["steps"]) + h.get("vision_steps", 0) for h in history)
        processor = build_processor(arch)
    else:
        processor = build_processor(arch)
        model, history, first_step = build_model(processor, seed, arch).train(), [], 0
    if video_every and arch != "qwen2_vl":
        raise ValueError("video steps need a video-capable built-in model: --arch qwen2_vl")
    if teacher and arch != "qwen2_vl":
        raise ValueError("--teacher trains a Qwen2-VL (--arch qwen2_vl) from a trained tiny LLaVA")
    if teacher:
        teacher_model, teacher_processor = load_teacher(teacher, model, processor.tokenizer, copy=not init)
    grid = shapes.IMAGE_SIZE // 16             # both architectures: one visual token per 16 px cell
    heads = aux_heads(model.config.text_config.hidden_size, grid, model.get_input_embeddings() if word_heads else None,
                      processor.tokenizer, inventory=bool(inventory_weight or tally_weight))
    features = {}
    projector = _projector(model)
    # The projector's output as (images, grid * grid, hidden): Qwen2-VL's merger returns every image's tokens in one run.
    projector.register_forward_hook(lambda m, a, out: features.update(out=out.reshape(-1, grid * grid, out.shape[-1])))

    def distilled(seeds) -> torch.Tensor:
        """The distillation term on the images of ``seeds`` (the student's features must be in ``features``)."""
        if not teacher:
            return torch.zeros(())
        pixels = vision_batch(teacher_processor, seeds)["pixel_values"]      # the same scenes, drawn again
        return distill_loss(features["out"], torch.cat(list(teacher_model.model.get_image_features(
            pixel_values=pixels).pooler_output)).view_as(features["out"]))
    train_seeds = shapes.SPLITS["train"]
    start, log = time.time(), []

    def seeds_at(step):                        # every step of every phase and run draws fresh scenes
        return [train_seeds[seed * 10_000_000 + (first_step + step) * batch_size + i] for i in range(batch_size)]

    def update(opt, sched, params, loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()

    def save(done: int):
        """The model as it is after ``done`` question steps (at every log, so a long run can be cut short), without
        the training-only heads and hook; training goes on from the same objects."""
        hooks = dict(projector._forward_hooks)
        projector._forward_hooks.clear()
        recipe = {"arch": arch, "shape": QWEN_SHAPE if arch == "qwen2_vl" else SHAPE, "vision_steps": vision_steps,
                  "vision_lr": vision_lr or lr, "steps": steps, "steps_done": done, "batch_size": batch_size, "lr": lr,
                  "seed": seed,
                  "aux_weight": aux_weight, "questions": questions, "video_every": video_every,
                  "word_heads": word_heads, "focus_weight": focus_weight, "focus_layer": focus_layer,
                  "inventory_weight": inventory_weight, "gather_weight": gather_weight, "isolate": isolate,
                  "tally_weight": tally_weight,
                  "teacher": teacher, "distill_weight": distill_weight if teacher else None,
                  "threads": torch.get_num_threads(), "minutes": (time.time() - start) / 60, "log": log,
                  "history": history}
        path = Path(out)
        model.save_pretrained(path)
        processor.save_pretrained(path)
        (path / "training.json").write_text(json.dumps(recipe, indent=1))
        projector._forward_hooks.update(hooks)

    # Phase 1: the vision tower and projector learn the per-patch targets alone (a step costs a tenth of a full one).
    tower = model.model.visual if arch == "qwen2_vl" else model.model.vision_tower
    params = list({id(p): p for p in [*tower.parameters(), *projector.parameters(), *heads.parameters()]}.values())
    opt = torch.optim.AdamW(params, lr=vision_lr or lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = _schedule(opt, vision_steps)
    for step in range(vision_steps):
        inputs = vision_batch(processor, seeds_at(step))
        targets = inputs.pop("targets")
        model.model.get_image_features(**inputs)
        aux = aux_loss(heads, features["out"], targets)
        distill = distilled(seeds_at(step))
        update(opt, sched, params, aux + distill_weight * distill)
        if (step + 1) % log_every == 0 or step + 1 == vision_steps:
            log.append({"vision_step": step + 1, "aux_loss": aux.item(), "distill_loss": distill.item(),
                        "minutes": (time.time() - start) / 60,
                        "object_patch_accuracy": aux_accuracy(heads, features["out"], targets)})
            print(json.dumps(log[-1]), flush=True)
    # Phase 2: the whole model on the questions, the auxiliary losses kept on. The head losses read the inputs of the
    # focus layer and of the first layer through pre-hooks (removed with the others before saving).
    captured, first, question_mark = {}, {}, processor.tokenizer.convert_tokens_to_ids("?")
    attributes, eos = attribute_words(processor.tokenizer), processor.tokenizer.eos_token_id

    def capture(into: dict):
        return lambda m, args, kwargs: into.update(layer=m, hidden=args[0] if args else kwargs["hidden_states"],
                                                   rope=kwargs["position_embeddings"])
    layers = model.model.language_model.layers
    hooks = [layers[focus_layer].register_forward_pre_hook(capture(captured), with_kwargs=True),
             layers[0].register_forward_pre_hook(capture(first), with_kwargs=True)]
    params = list({id(p): p for p in [*model.parameters(), *heads.parameters()]}.values())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = _schedule(opt, steps)
    for step in range(steps):
        video = bool(video_every) and step % video_every == video_every - 1
        inputs = batch(processor, seeds_at(vision_steps + step), questions, video=video)
        targets, focus, inventory, tally, segments = (inputs.pop(k, None)
                                                      for k in ("targets", "focus", "inventory", "tally", "segments"))
        if isolate:
            isolated, allowed = isolated_questions(model, {**inputs, "segments": segments})
            loss = model(**{**inputs, **isolated}).loss
            inputs["allowed"] = allowed                 # what the head losses recompute their weights under
        else:
            loss = model(**inputs).loss
        aux = aux_loss(heads, features["out"], targets) if targets else torch.zeros(())
        distill = distilled(seeds_at(vision_steps + step)) if not video else torch.zeros(())
        guide = (focus_loss(model, captured, inputs, focus, question_mark) if focus is not None and focus_weight
                 else torch.zeros(()))
        spread = (inventory_loss(model, captured, inputs, inventory, question_mark)
                  if inventory is not None and inventory_weight else torch.zeros(()))
        tallied = (tally_loss(model, captured, inputs, tally, inventory, question_mark)
                   if tally is not None and tally_weight else torch.zeros(()))
        gathered = (gather_loss(first, inputs, attributes, question_mark, eos) if not video and gather_weight
                    else torch.zeros(()))
        update(opt, sched, params, loss + aux_weight * aux + focus_weight * guide + distill_weight * distill
               + inventory_weight * spread + gather_weight * gathered + tally_weight * tallied)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            val = accuracy(model, processor, n=val_examples)
            log.append({"step": step + 1, "loss": loss.item(), "aux_loss": aux.item(), "focus_loss": guide.item(),
                        "inventory_loss": spread.item(), "gather_loss": gathered.item(), "tally_loss": tallied.item(),
                        "distill_loss": distill.item(),
                        "val_accuracy": val["all"], "val_by_family": val, "minutes": (time.time() - start) / 60})
            if video_every:
                log[-1]["video_val_by_family"] = accuracy(model, processor, n=val_examples // 2, video=True)
            print(json.dumps(log[-1]), flush=True)
            save(step + 1)
    model.eval()
    for hook in hooks:
        hook.remove()
    save(steps)
    projector._forward_hooks.clear()
    return model, processor


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m vtr.eval.train_tiny", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--aux-weight", type=float, default=0.5, help="weight of the per-patch auxiliary loss")
    p.add_argument("--vision-steps", type=int, default=0, help="warm-up steps of the vision tower and projector alone")
    p.add_argument("--questions", type=int, default=16, help="questions asked per training image, at most")
    p.add_argument("--init", help="a model saved by this script, to train further (its architecture)")
    p.add_argument("--arch", choices=ARCHS, default="llava")
    p.add_argument("--focus-weight", type=float, default=1.0, help="weight of the loss that steers one attention "
                   "head at each question's '?' to the patches of the objects it names; 0: off")
    p.add_argument("--focus-layer", type=int, default=1, help="the decoder layer of that head")
    p.add_argument("--inventory-weight", type=float, default=0.0, help="weight of the loss that spreads a second head "
                   "of that layer evenly over the image at each 'how many' and 'is there' question's '?'; when on, a "
                   "probe also marks each object's centre patch with its colour and shape; 0: off")
    p.add_argument("--tally-weight", type=float, default=0.0, help="weight of the loss that steers a third head of "
                   "that layer at each 'how many' and 'is there' question's '?' to equal weights on <s> and on the "
                   "centre patches of the objects it counts (the centre probe comes on too); 0: off")
    p.add_argument("--gather-weight", type=float, default=0.0, help="weight of the loss that spreads head 0 of the "
                   "first decoder layer evenly over each question's colour, shape and size words at its '?'; 0: off")
    p.add_argument("--isolate-questions", action="store_true", help="each question of a training sequence sees the "
                   "image and its own words only, at the positions of a lone question, not the questions and "
                   "answers before it")
    p.add_argument("--free-heads", action="store_true", help="colour and shape probes with their own weights, not "
                   "tied to the colour and shape words' embeddings")
    p.add_argument("--video-every", type=int, default=0, help="every N-th question step trains on video clips "
                   "(qwen2_vl only); 0: images only")
    p.add_argument("--teacher", help="qwen2_vl: a tiny LLaVA saved by this script (e.g. the shipped "
                   "assets/tiny-llava): a new model's language model starts as its copy; the visual tokens are "
                   "distilled from its projector's")
    p.add_argument("--vision-lr", type=float, help="learning rate of the vision warm-up (default: --lr)")
    p.add_argument("--distill-weight", type=float, default=1.0, help="weight of the distillation loss (--teacher)")
    a = p.parse_args(argv)
    train(a.out, a.steps, a.batch_size, a.lr, a.seed, a.threads, a.log_every, a.aux_weight, a.init, a.vision_steps,
          a.questions, a.arch, video_every=a.video_every, word_heads=not a.free_heads,
          focus_weight=a.focus_weight, focus_layer=a.focus_layer, teacher=a.teacher, distill_weight=a.distill_weight,
          vision_lr=a.vision_lr, inventory_weight=a.inventory_weight, tally_weight=a.tally_weight,
          gather_weight=a.gather_weight, isolate=a.isolate_questions)


if __name__ == "__main__":
    main()
