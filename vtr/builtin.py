"""Small LLaVA-architecture models built from configs (no download), for the offline demo, the benchmark and tests.

They are real ``LlavaForConditionalGeneration`` instances (CLIP vision tower + Llama language model), so every adapter
and method runs on them exactly as on llava-hf checkpoints. Their weights are random: they do not understand images.
``load_model()`` loads the one that does: the tiny LLaVA trained on the shapes QA, shipped in ``vtr/assets``.
"""
from __future__ import annotations

from importlib import resources

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN_ID = 3


def llava_config(image_size: int = 56, patch_size: int = 8, vision_hidden: int = 32, vision_layers: int = 3,
                 hidden: int = 64, layers: int = 8, heads: int = 4, kv_heads: int = 2, intermediate: int | None = None,
                 vocab: int = 96, attn_implementation: str = "sdpa", vision_intermediate: int | None = None,
                 vision_heads: int | None = None) -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_intermediate or vision_hidden * 2,
                              num_hidden_layers=vision_layers,
                              num_attention_heads=vision_heads or max(1, vision_hidden // 16),
                              image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden)
    text = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate or hidden * 2, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                       max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                         image_seq_length=(image_size // patch_size) ** 2)
    config._attn_implementation = attn_implementation
    return config


def tiny_llava(seed: int = 0, attn_implementation: str = "sdpa", dtype=torch.float32, device="cpu",
               **shape) -> LlavaForConditionalGeneration:
    """A randomly initialised LLaVA of the given shape, in eval mode, built on ``device`` (a 7B-sized one
    initialises in seconds on a GPU)."""
    torch.manual_seed(seed)
    config = llava_config(attn_implementation=attn_implementation, **shape)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return model


def llava_inputs(model, prompts: list[list[int]], seed: int = 0) -> dict:
    """Batch inputs for token-id prompts in which each ``IMAGE_TOKEN_ID`` stands for one image; left-padded.

    Returns ``input_ids``, ``attention_mask`` and ``pixel_values`` (one random image per placeholder)."""
    config = model.config
    per_image = config.image_seq_length
    rows = []
    for prompt in prompts:
        row = []
        for tok in prompt:
            row.extend([config.image_token_id] * per_image if tok == config.image_token_id else [tok])
        rows.append(row)
    width = max(map(len, rows))
    pad = config.text_config.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=model.device)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
    images = sum(p.count(config.image_token_id) for p in prompts)
    g = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    pixel_values = torch.randn(images, 3, size, size, generator=g).to(model.device, model.dtype)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def tiny_video_model(seed: int = 0, attn_implementation: str = "sdpa"):
    """A randomly initialised LLaVA-OneVision (SigLIP 56 px / 8 px patches -> 4 x 4 pooled tokens per frame, Qwen2
    language model) over the shipped tokenizer's vocabulary plus a video token: the offline video demo's model. It
    runs every video path of the real checkpoints, but its answers are noise."""
    from transformers import (AutoTokenizer, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)

    tokenizer = AutoTokenizer.from_pretrained(str(shipped_model_path()))
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                image_size=56, patch_size=8)
    text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tokenizer) + 1, max_position_embeddings=4096,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                                  video_token_id=len(tokenizer), vision_feature_layer=-1)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def tiny_video_inputs(model, tokenizer, frames, question: str) -> dict:
    """The video (T, H, W, 3 uint8 frames, resized to the tower's size), then the question, as token ids."""
    size = model.config.vision_config.image_size
    video = torch.nn.functional.interpolate(torch.as_tensor(frames).permute(0, 3, 1, 2).float(), size=(size, size),
                                            mode="bilinear", antialias=True)
    side = -(-(size // model.config.vision_config.patch_size) // 2)         # the model pools each frame 2x2
    placeholders = [model.config.video_token_id] * (len(frames) * side * side + 1)   # + the closing newline
    ids = [tokenizer.bos_token_id, *placeholders, *tokenizer(question, add_special_tokens=False).input_ids]
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "pixel_values_videos": (video / 127.5 - 1)[None]}


SHIPPED = ("tiny-llava", "tiny-qwen2-vl")      # the tiny models trained on the shapes QA, in vtr/assets


def shipped_model_path(name: str = "tiny-llava"):
    """A tiny model trained on the synthetic shapes QA (``python -m vtr.eval.train_tiny``), shipped in assets."""
    if name not in SHIPPED:
        raise ValueError(f"no shipped model {name!r}; the shipped ones are {', '.join(SHIPPED)}")
    return resources.files("vtr.assets").joinpath(name)


def load_model(model_id: str | None = None, attn_implementation: str = "sdpa", device: str | None = None):
    """(model, processor) for a Hugging Face id or local path, or a shipped model's name (``SHIPPED``, offline); None
    loads the shipped tiny LLaVA. ``device``: where to put the whole model; by default a hub model goes whole to the
    current GPU where there is one (vtr refuses a model spread over several devices) and the shipped ones stay on the
    CPU."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    shipped = model_id is None or model_id in SHIPPED
    source = str(shipped_model_path(model_id or "tiny-llava")) if shipped else model_id
    if device is None:
        device = "cuda" if torch.cuda.is_available() and not shipped else None
    model = AutoModelForImageTextToText.from_pretrained(source, dtype="auto", attn_implementation=attn_implementation,
                                                        device_map=device)
    return model.eval(), AutoProcessor.from_pretrained(source)


def chat_prompt(processor, question: str, images: int = 1, videos: int = 0) -> str:
    """The images, then the videos, then the question, in the processor's own chat template."""
    content = [{"type": "image"}] * images + [{"type": "video"}] * videos + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def model_inputs(model, processor, images: list, texts: list[str], videos: list | None = None):
    """The processor's batch (padded on the tokenizer's side) on the model's device, pixel values in its dtype.
    ``videos``: one list of frames (PIL images or HxWx3 arrays) per video, for processors that take videos."""
    if videos and getattr(processor, "video_processor", None) is None:
        raise ValueError(f"{type(model).__name__} ({type(processor).__name__}) takes images only, not videos")
    extra = {"videos": videos} if videos else {}
    inputs = processor(images=images or None, text=texts, return_tensors="pt", padding=True, **extra).to(model.device)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(model.dtype)
    return inputs
