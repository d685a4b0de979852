"""Train the tiny built-in LLaVA on the synthetic shapes QA (``vtr.eval.shapes``), from scratch, on a CPU.

    python -m vtr.eval.train_tiny --out assets/tiny-llava --steps 3000

The result is a stock ``LlavaForConditionalGeneration`` (CLIP vision tower, MLP projector, Llama language model) with a
word-level tokenizer and a ``LlavaProcessor``, saved with ``save_pretrained`` so that
``AutoModelForImageTextToText.from_pretrained(path)`` and ``AutoProcessor.from_pretrained(path)`` load it like any
llava-hf checkpoint. Examples are generated on the fly from the train split's seeds; each training sequence asks up to six questions about
its image (the example's own first, then others about the same scene). The loss is the answers' and end-of-sequence
tokens' cross-entropy plus, during training only, an auxiliary per-patch loss: two linear heads on the
projector output predict the colour and the shape of the object covering each patch. Without it the from-scratch
vision tower stays at chance for the first thousand steps; the heads are dropped before saving, so the saved model is
a stock LLaVA.
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
CHAT_TEMPLATE = ("{% for message in messages %}{% for part in message['content'] %}"
                 "{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }}{% endif %}"
                 "{% endfor %}{% endfor %}")
SHAPE = dict(image_size=shapes.IMAGE_SIZE, patch_size=16, vision_hidden=96, vision_layers=3, hidden=128, layers=4,
             heads=4, kv_heads=2, intermediate=384)


def build_processor():
    """Word-level tokenizer over the shapes vocabulary (ids: <pad> 0, <s> 1, </s> 2, <image> 3) and a CLIP image
    processor at the image size; the chat template puts the image before the question."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlavaProcessor, PreTrainedTokenizerFast

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor      # no torchvision needed
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor

    vocab = {t: i for i, t in enumerate(SPECIALS + shapes.vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.decoder = decoders.WordPiece(prefix="##")          # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    size = SHAPE["image_size"]
    images = ImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=SHAPE["patch_size"],
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def build_model(processor, seed: int = 0):
    from vtr.builtin import tiny_llava

    model = tiny_llava(seed=seed, vocab=len(processor.tokenizer), **SHAPE)
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model


def patch_labels(scene, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour class (0: background, 1..6) and shape class (0: background, 1..4) of the object covering most of each
    patch (at least an eighth of it, so small objects keep a patch), row-major over the grid: (grid * grid,) each."""
    owner = torch.from_numpy(shapes.object_map(scene).astype("int64"))
    cell = shapes.IMAGE_SIZE // grid
    counts = torch.nn.functional.one_hot(owner, len(scene.objects) + 1).view(grid, cell, grid, cell, -1).sum((1, 3))
    counts[..., 0] = cell * cell // 8                 # background wins unless an object covers an eighth
    winner = counts.argmax(-1).flatten()
    colors = torch.tensor([0] + [1 + list(shapes.COLORS).index(o.color) for o in scene.objects])
    kinds = torch.tensor([0] + [1 + shapes.SHAPES.index(o.shape) for o in scene.objects])
    return colors[winner], kinds[winner]


def batch(processor, seeds, questions: int = 6, device="cpu") -> dict:
    """A training batch. Each sequence is the example's prompt, its answer and </s>, then up to ``questions - 1`` more
    questions about the same scene, each followed by its answer and </s> (``shapes.scene_questions``); prompts are
    left-padded and the tails right-padded. Labels only on answers and </s>; per-patch colour and shape classes for the
    auxiliary loss."""
    import random

    examples = [shapes.make_example(s) for s in seeds]
    tok = processor.tokenizer
    texts = [chat_prompt(processor, e["question"]) for e in examples]
    inputs = processor(images=[e["image"] for e in examples], text=texts, return_tensors="pt", padding=True)
    tails = []
    for seed, e in zip(seeds, examples):
        tail = [tok.convert_tokens_to_ids(e["answer"]), tok.eos_token_id]
        others = [qa for qa in shapes.scene_questions(e["scene"], random.Random(seed)) if qa[0] != e["question"]]
        for question, answer, _ in others[:questions - 1]:
            tail += tok.convert_tokens_to_ids(question.split()) + [tok.convert_tokens_to_ids(answer), tok.eos_token_id]
        tails.append(tail)
    width = max(map(len, tails))
    tail_ids = torch.tensor([t + [tok.pad_token_id] * (width - len(t)) for t in tails])
    tail_mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in tails])
    ids = torch.cat([inputs["input_ids"], tail_ids], dim=1)
    mask = torch.cat([inputs["attention_mask"], tail_mask], dim=1)
    answer_or_eos = (ids == tok.eos_token_id) | torch.roll(ids == tok.convert_tokens_to_ids("?"), 1, dims=1)
    labels = ids.masked_fill(~(answer_or_eos & mask.bool()), -100)
    grid = SHAPE["image_size"] // SHAPE["patch_size"]
    colors, kinds = zip(*(patch_labels(e["scene"], grid) for e in examples))
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
            "pixel_values": inputs["pixel_values"].to(device),
            "patch_colors": torch.stack(colors).to(device), "patch_shapes": torch.stack(kinds).to(device)}


@torch.no_grad()
def accuracy(model, processor, split: str = "val", n: int = 250) -> float:
    """Greedy exact match of the first generated word on ``n`` examples of a split."""
    model.eval()
    correct = 0
    seeds = shapes.SPLITS[split]
    for start in range(0, n, 50):
        chunk = [shapes.make_example(seeds[i], shapes.FAMILIES[i % 5]) for i in range(start, min(n, start + 50))]
        inputs = processor(images=[e["image"] for e in chunk], text=[chat_prompt(processor, e["question"]) for e in chunk],
                           return_tensors="pt", padding=True)
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False)[:, -1]
        words = processor.tokenizer.convert_ids_to_tokens(out.tolist())
        correct += sum(w == e["answer"] for w, e in zip(words, chunk))
    model.train()
    return correct / n


def train(out: str, steps: int, batch_size: int, lr: float, seed: int, threads: int | None, log_every: int,
          aux_weight: float = 0.5, init: str | None = None):
    if threads:
        torch.set_num_threads(threads)
    processor = build_processor()
    if init:                                   # go on training a saved model (the seeds continue past its steps)
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(init, dtype=torch.float32).train()
        done = json.loads((Path(init) / "training.json").read_text())
        seed, history = done["seed"], done.get("history", []) + [{k: v for k, v in done.items() if k != "history"}]
        first_step = sum(h["steps"] for h in history)
    else:
        model, history, first_step = build_model(processor, seed).train(), [], 0
    hidden = model.config.text_config.hidden_size
    heads = torch.nn.ModuleDict({"colors": torch.nn.Linear(hidden, len(shapes.COLORS) + 1),
                                 "shapes": torch.nn.Linear(hidden, len(shapes.SHAPES) + 1)})
    features = {}
    model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: features.update(out=out))
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    train_seeds = shapes.SPLITS["train"]
    start, log = time.time(), []
    for step in range(steps):
        seeds = [train_seeds[seed * 10_000_000 + (first_step + step) * batch_size + i] for i in range(batch_size)]
        inputs = batch(processor, seeds)
        targets = {"colors": inputs.pop("patch_colors"), "shapes": inputs.pop("patch_shapes")}
        loss = model(**inputs).loss
        aux = sum(torch.nn.functional.cross_entropy(heads[k](features["out"]).flatten(0, 1), t.flatten())
                  for k, t in targets.items())
        opt.zero_grad(set_to_none=True)
        (loss + aux_weight * aux).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            val = accuracy(model, processor, n=100)
            log.append({"step": step + 1, "loss": loss.item(), "aux_loss": aux.item(), "val_accuracy": val,
                        "minutes": (time.time() - start) / 60})
            print(json.dumps(log[-1]), flush=True)
    model.eval()
    model.model.multi_modal_projector._forward_hooks.clear()
    recipe = {"shape": SHAPE, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "aux_weight": aux_weight,
              "threads": torch.get_num_threads(), "minutes": (time.time() - start) / 60, "log": log, "history": history}
    path = Path(out)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    (path / "training.json").write_text(json.dumps(recipe, indent=1))
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
    p.add_argument("--aux-weight", type=float, default=0.5, help="weight of the per-patch colour/shape loss")
    p.add_argument("--init", help="a model saved by this script, to train further")
    a = p.parse_args(argv)
    train(a.out, a.steps, a.batch_size, a.lr, a.seed, a.threads, a.log_every, a.aux_weight, a.init)


if __name__ == "__main__":
    main()
