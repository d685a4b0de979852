"""Small LLaVA-architecture models built from configs (no download), for the offline demo, the benchmark and tests.

They are real ``LlavaForConditionalGeneration`` instances (CLIP vision tower + Llama language model), so every adapter
and method runs on them exactly as on llava-hf checkpoints. Their weights are random: they do not understand images.
"""
from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN_ID = 3


def llava_config(image_size: int = 56, patch_size: int = 8, vision_hidden: int = 32, vision_layers: int = 3,
                 hidden: int = 64, layers: int = 8, heads: int = 4, kv_heads: int = 2, intermediate: int | None = None,
                 vocab: int = 96, attn_implementation: str = "sdpa") -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                              num_hidden_layers=vision_layers, num_attention_heads=max(1, vision_hidden // 16),
                              image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden)
    text = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate or hidden * 2, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                       max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                         image_seq_length=(image_size // patch_size) ** 2)
    config._attn_implementation = attn_implementation
    return config


def tiny_llava(seed: int = 0, attn_implementation: str = "sdpa", dtype=torch.float32, **shape) -> LlavaForConditionalGeneration:
    """A randomly initialised LLaVA of the given shape, in eval mode."""
    torch.manual_seed(seed)
    config = llava_config(attn_implementation=attn_implementation, **shape)
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
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    images = sum(p.count(config.image_token_id) for p in prompts)
    g = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    pixel_values = torch.randn(images, 3, size, size, generator=g).to(model.dtype)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def builtin_processor(image_size: int, patch_size: int):
    """A LlavaProcessor for the built-in model: a character-level tokenizer (printable ASCII plus <pad>, <s>, </s>
    and <image>, whose id is ``IMAGE_TOKEN_ID``) and a CLIP image processor at ``image_size``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor      # no torchvision needed
    except ImportError:                                                       # older transformers
        from transformers import CLIPImageProcessor as ImageProcessor

    specials = ["<pad>", "<s>", "</s>", "<image>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)])}
    assert vocab["<image>"] == IMAGE_TOKEN_ID
    backend = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = ImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)


def builtin_llava(attn_implementation: str = "sdpa"):
    """The offline demo's model and processor: LLaVA architecture, 224 px, 14 px patches (256 visual tokens).
    Untrained: its answers are noise until a trained built-in model ships."""
    shape = dict(image_size=224, patch_size=14, vision_hidden=64, vision_layers=4, hidden=128, layers=8, heads=4,
                 kv_heads=2, vocab=128)
    model = tiny_llava(seed=0, attn_implementation=attn_implementation, **shape)
    return model, builtin_processor(shape["image_size"], shape["patch_size"])
