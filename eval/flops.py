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
    """Qwen2-VL's (or Qwen2.5-VL's) vision tower and merger on images/videos of (t, h, w) patch grids: the patch
    embedding (a linear map of temporal_patch_size x patch x patch x 3 pixels), the blocks' linear layers, attention
    within each temporal slice of h x w patches (Qwen2.5-VL: within windows of ``window_size`` pixels, except in its
    full-attention blocks), and the merger's two linear layers on every ``spatial_merge_size``^2 patches."""
    v = vision_config
    windowed = hasattr(v, "fullatt_block_indexes")                  # Qwen2.5-VL
    e = v.hidden_size if windowed else v.embed_dim
    out = v.out_hidden_size if windowed else v.hidden_size
    mlp = 3 * e * v.intermediate_size if windowed else 2 * e * int(e * v.mlp_ratio)   # 2.5: gated MLP
    pixels = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    merge = v.spatial_merge_size
    group = merge ** 2
    total = 0.0
    for t, h, w in grids:
        patches = t * h * w
        full = 2 * 2 * t * (h * w) ** 2 * e                      # scores and weighting, per temporal slice
        layers = [full] * v.depth
        if windowed:                                             # windows of side ``span`` merged tokens
            span, rows, cols = v.window_size // merge // v.patch_size, h // merge, w // merge
            sides = [[min(span, n - i) for i in range(0, n, span)] for n in (rows, cols)]
            local = 2 * 2 * t * sum((a * b * group) ** 2 for a in sides[0] for b in sides[1]) * e
            layers = [full if i in v.fullatt_block_indexes else local for i in range(v.depth)]
        linear = 2 * patches * (4 * e * e + mlp)
        merger = 2 * (patches // group) * ((group * e) ** 2 + group * e * out)
        total += 2 * patches * pixels * e + v.depth * linear + sum(layers) + merger
    return total
