"""Analytic prefill FLOPs of LLaVA-style and Qwen2-VL models (multiply-add = 2 FLOPs).

Counted: every linear layer of the vision tower, projector and decoder; attention score and weighting products
(all pairs in the bidirectional vision tower, L(L+1)/2 pairs under the causal decoder mask); the LM head for the one
position whose logits prefill needs. Norms, activations and softmax are left out (a few percent at most).
"""
from __future__ import annotations


def vision_flops(vision_config, images: int, tokens: int) -> float:
    d, f = vision_config.hidden_size, vision_config.intermediate_size
    per_layer = 2 * tokens * (4 * d * d + 2 * d * f) + 2 * 2 * tokens * tokens * d
    return images * vision_config.num_hidden_layers * per_layer


def decoder_layer_flops(text_config, length: int) -> float:
    d, f = text_config.hidden_size, text_config.intermediate_size
    head = getattr(text_config, "head_dim", None) or d // text_config.num_attention_heads
    q, kv = text_config.num_attention_heads * head, text_config.num_key_value_heads * head
    linear = 2 * length * (d * q + 2 * d * kv + q * d + 3 * d * f)
    attention = 2 * 2 * (length * (length + 1) // 2) * q
    return linear + attention


def prefill_flops(config, images: int, visual_per_image: int, lengths_per_layer: list[int]) -> dict:
    """FLOPs of one prefill whose decoder layer i sees ``lengths_per_layer[i]`` tokens."""
    vision = vision_flops(config.vision_config, images, visual_per_image + 1)
    d_v, d = config.vision_config.hidden_size, config.text_config.hidden_size
    projector = images * visual_per_image * 2 * (d_v * d + d * d)
    llm = sum(decoder_layer_flops(config.text_config, n) for n in lengths_per_layer)
    head = 2 * d * config.text_config.vocab_size
    return {"vision": vision + projector, "llm": llm + head, "total": vision + projector + llm + head}


def qwen2_vl_vision_flops(vision_config, grids: list[tuple[int, int, int]]) -> float:
    """Qwen2-VL's vision tower and merger on images/videos of (t, h, w) patch grids: the patch embedding (a linear map
    of temporal_patch_size x patch x patch x 3 pixels), full attention within each temporal slice of h x w patches,
    and the merger's two linear layers on every ``spatial_merge_size``^2 patches."""
    e, depth = vision_config.embed_dim, vision_config.depth
    f = int(e * vision_config.mlp_ratio)
    pixels = vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size ** 2
    group = vision_config.spatial_merge_size ** 2
    total = 0.0
    for t, h, w in grids:
        patches = t * h * w
        per_layer = 2 * patches * (4 * e * e + 2 * e * f) + 2 * 2 * t * (h * w) ** 2 * e
        merger = 2 * (patches // group) * ((group * e) ** 2 + group * e * vision_config.hidden_size)
        total += 2 * patches * pixels * e + depth * per_layer + merger
    return total
