"""Train the tiny built-in LLaVA on the synthetic shapes QA (``vtr.eval.shapes``), from scratch, on a CPU.

    python -m vtr.eval.train_tiny --out assets/tiny-llava --steps 3000

The result is a stock ``LlavaForConditionalGeneration`` (CLIP vision tower, MLP projector, Llama language model) with a
word-level tokenizer and a ``LlavaProcessor``, saved with ``save_pretrained`` so that
``AutoModelForImageTextToText.from_pretrained(path)`` and ``AutoProcessor.from_pretrained(path)`` load it like any
llava-hf checkpoint. Examples are generated on the fly from the train split's seeds; the loss is on the answer word and
the end-of-sequence token only.
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


def batch(processor, seeds, device="cpu") -> dict:
    """A training batch: prompt + answer + </s>, right-padded; labels only on the answer and </s>."""
    examples = [shapes.make_example(s) for s in seeds]
    tok = processor.tokenizer
    texts = [chat_prompt(processor, e["question"]) for e in examples]
    inputs = processor(images=[e["image"] for e in examples], text=texts, return_tensors="pt", padding=True)
    answers = torch.tensor([tok.convert_tokens_to_ids(e["answer"]) for e in examples])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]          # left-padded prompts
    eos = torch.full_like(answers, tok.eos_token_id)
    ids = torch.cat([ids, answers[:, None], eos[:, None]], dim=1)
    mask = torch.cat([mask, torch.ones(len(seeds), 2, dtype=mask.dtype)], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
            "pixel_values": inputs["pixel_values"].to(device)}


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


def train(out: str, steps: int, batch_size: int, lr: float, seed: int, threads: int | None, log_every: int):
    if threads:
        torch.set_num_threads(threads)
    processor = build_processor()
    model = build_model(processor, seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    train_seeds = shapes.SPLITS["train"]
    start, log = time.time(), []
    for step in range(steps):
        seeds = [train_seeds[seed * 10_000_000 + step * batch_size + i] for i in range(batch_size)]
        loss = model(**batch(processor, seeds)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            val = accuracy(model, processor, n=100)
            log.append({"step": step + 1, "loss": float(loss), "val_accuracy": val, "minutes": (time.time() - start) / 60})
            print(json.dumps(log[-1]), flush=True)
    model.eval()
    recipe = {"shape": SHAPE, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
              "threads": torch.get_num_threads(), "minutes": (time.time() - start) / 60, "log": log}
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
    a = p.parse_args(argv)
    train(a.out, a.steps, a.batch_size, a.lr, a.seed, a.threads, a.log_every)


if __name__ == "__main__":
    main()
