"""The image benchmark's models: random-weight VLMs of real architectures, built from their transformers configs (no
download), each with one prompt: 35 text tokens, one image, 15 text tokens.

Sizes: "7b" is the released checkpoint's shape (for a GPU, in bfloat16); "cpu" keeps its depth and proportions with
every width divided by 8 (so each method's layers sit where they do in the real model, and the vision tower weighs
what it does); "cpu-wide" (LLaVA only) divides them by 4; "quick" is a small model for smoke runs. Weights are
random, which does not change the time.
"""
from __future__ import annotations

from importlib.util import find_spec

import torch

from vtr.builtin import IMAGE_TOKEN_ID, llava_inputs, tiny_llava

BEFORE, AFTER = [1] + list(range(10, 44)), list(range(50, 65))       # 35 and 15 text tokens
VISION_START, VISION_END = 5, 6                                      # Qwen's markers around the image's tokens

# LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14-336 (24 layers, the last unused), Vicuna-7B. LLaVA-NeXT-7B
# (llava-hf/llava-v1.6-vicuna-7b-hf) has the same tower and language model.
LLAVA = {
    "7b": dict(image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_intermediate=4096,
               vision_heads=16, hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32064),
    # the vision tower ~1/21 of the language model's FLOPs per token, as in the 7B
    "cpu": dict(image_size=336, patch_size=14, vision_hidden=256, vision_layers=9, hidden=512, layers=32, heads=8,
                kv_heads=8, intermediate=1376, vocab=1024),
    "quick": dict(image_size=112, patch_size=14, vision_hidden=128, vision_layers=2, hidden=128, layers=8, heads=8,
                  kv_heads=8, intermediate=344, vocab=1024),
    # widths / 4 (twice "cpu"'s): how the hooks' share of the prefill moves as the model widens toward the 7B
    "cpu-wide": dict(image_size=336, patch_size=14, vision_hidden=512, vision_layers=9, hidden=1024, layers=32,
                     heads=16, kv_heads=16, intermediate=2752, vocab=1024),
}
# Qwen2.5-VL-7B-Instruct; "cpu": widths / 8, head_dim 64 (the M-RoPE sections halved with it)
QWEN25 = {
    "7b": dict(vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584),
               text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064), mrope=[16, 24, 24], grid=(1, 48, 64)),
    "cpu": dict(vision=dict(depth=32, hidden_size=160, intermediate_size=428, num_heads=2, out_hidden_size=448),
                text=dict(hidden_size=448, intermediate_size=2368, num_hidden_layers=28, num_attention_heads=7,
                          num_key_value_heads=1, vocab_size=1024), mrope=[8, 12, 12], grid=(1, 48, 64)),
    "quick": dict(vision=dict(depth=8, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128),
                  text=dict(hidden_size=128, intermediate_size=344, num_hidden_layers=8, num_attention_heads=2,
                            num_key_value_heads=1, vocab_size=1024), mrope=[8, 12, 12], grid=(1, 16, 16)),
}


def llava(size: str, device, dtype, attn: str):
    """LLaVA-1.5: 576 visual tokens per 336 px image (64 at "quick")."""
    check_attention(attn, device)                # the other models check in build_random
    model = tiny_llava(seed=0, dtype=dtype, device=device, attn_implementation=attn, **LLAVA[size])
    return model, llava_inputs(model, [BEFORE + [IMAGE_TOKEN_ID] + AFTER])


def llava_next(size: str, device, dtype, attn: str):
    """LLaVA-NeXT: a 672 x 672 image as the base crop plus 2 x 2 crops of 336 px, each row of the grid closed by a
    newline token: 5 x 576 + 48 = 2,928 visual tokens (at "quick", a third of the sides)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    from vtr.builtin import llava_config

    base = llava_config(**LLAVA[size])                       # the same tower and language model as LLaVA-1.5
    side = base.vision_config.image_size
    pinpoints = [[side, 2 * side], [2 * side, side], [2 * side, 2 * side], [3 * side, side], [side, 3 * side]]
    config = LlavaNextConfig(vision_config=base.vision_config, text_config=base.text_config,
                             image_token_id=IMAGE_TOKEN_ID, image_grid_pinpoints=pinpoints)
    model = build_random(LlavaNextForConditionalGeneration, config, device, dtype, attn)
    sizes = torch.tensor([[2 * side, 2 * side]], device=device)
    pixels = torch.randn(5, 3, side, side, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    with torch.no_grad():                                    # as many placeholders as the stock model makes features
        tokens = len(model.model.get_image_features(pixels, sizes).pooler_output[0])
    ids = torch.tensor([BEFORE + [IMAGE_TOKEN_ID] * tokens + AFTER], device=device)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
                   "image_sizes": sizes}


def qwen2_5_vl(size: str, device, dtype, attn: str):
    """Qwen2.5-VL at its native resolution: an 896 x 672 px image, 64 x 48 patches of 14 px merged 2 x 2 into 768
    visual tokens (at "quick", 16 x 16 patches: 64 tokens)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    shape = QWEN25[size]
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": shape["mrope"]}
    text = dict(shape["text"], max_position_embeddings=32768, rope_parameters=rope, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
    vision = dict(shape["vision"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[i for i in (7, 15, 23, 31) if i < shape["vision"]["depth"]])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID,
                              video_token_id=4, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    model = build_random(Qwen2_5_VLForConditionalGeneration, config, device, dtype, attn)
    t, h, w = shape["grid"]
    ids = torch.tensor([BEFORE + [VISION_START] + [IMAGE_TOKEN_ID] * (t * h * w // 4) + [VISION_END] + AFTER],
                       device=device)
    pixels = torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
                   "image_grid_thw": torch.tensor([[t, h, w]], device=device),
                   "mm_token_type_ids": (ids == IMAGE_TOKEN_ID).int()}


def check_attention(attn: str, device):
    """Where flash_attention_2 cannot run, say so before a model is built."""
    if attn == "flash_attention_2" and (torch.device(device).type != "cuda" or find_spec("flash_attn") is None):
        raise ValueError("--attn flash_attention_2 needs a CUDA device (--device cuda) and the flash-attn package "
                         "(pip install vtr[flash]); on a CPU use sdpa or eager")


def build_random(cls, config, device, dtype, attn: str):
    """``cls`` with seeded random weights, built on ``device`` in ``dtype``, in eval mode."""
    check_attention(attn, device)
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(config).to(dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


ARCHS = {"llava": llava, "llava-next": llava_next, "qwen2.5-vl": qwen2_5_vl}


def build(arch: str, size: str, device="cpu", dtype=torch.float32, attn: str = "sdpa"):
    """(model, inputs) of ``arch`` at ``size``, with attention implementation ``attn`` ("sdpa", "eager" or, with
    flash-attn on a GPU, "flash_attention_2")."""
    if arch not in ARCHS:
        raise ValueError(f"unknown bench architecture {arch!r}; choose from {', '.join(ARCHS)}")
    sizes = QWEN25 if arch == "qwen2.5-vl" else LLAVA
    if size not in sizes:
        raise ValueError(f"bench size {size!r} is not defined for {arch}; choose from {', '.join(sizes)}")
    return ARCHS[arch](size, device, dtype, attn)
