"""The reference every patched run is checked against: the *unpatched* model's stock modules run on the pruned
sequence, written independently of the engine.

One sample, no padding. Kept embeddings keep the position ids the stock model gives them on the full sequence
(M-RoPE: its own ``get_rope_index``); for an in-LLM stage at layer K, layers < K see the longer sequence and layers
>= K (and their KV cache) the shorter one. Decoding is greedy, at the positions the stock model gives new tokens.
"""
from __future__ import annotations

import math

import torch
from transformers import DynamicCache

from vtr.compat import CACHE_ARG
from vtr.eval.stock import encode, stock_positions


def visual_positions(model, input_ids: torch.Tensor) -> torch.Tensor:
    ids = [i for i in (model.config.image_token_id, getattr(model.config, "video_token_id", None)) if i is not None]
    return torch.isin(input_ids[0], torch.tensor(ids)).nonzero()[:, 0]


def sequence_after(model, input_ids, kept_visual: torch.Tensor) -> torch.Tensor:
    """Original sequence positions that survive: all text tokens plus the kept visual tokens, ascending."""
    visual = visual_positions(model, input_ids)
    keep = torch.ones(input_ids.shape[1], dtype=torch.bool)
    keep[visual] = False
    keep[visual[kept_visual]] = True
    return keep.nonzero()[:, 0]


def _causal(q: int, kv: int, dtype) -> torch.Tensor:
    return torch.full((q, kv), torch.finfo(dtype).min, dtype=dtype).triu(1 + kv - q)[None, None]


@torch.no_grad()
def merged_before_projector(model, inputs: dict, plugin) -> torch.Tensor:
    """LLaVA-1.5 features when ``plugin`` (VisionZip, PruMerge+) merges the feature layer's outputs before the
    projector: the [CLS] row (head mean) and keys (head mean) of that layer written out from its own weights, the
    merge by the plugin's rule (pinned by its own test), then the stock projector. (images * P, D)."""
    tower = model.model.vision_tower
    out = tower(inputs["pixel_values"], output_hidden_states=True)
    layers = getattr(tower, "vision_model", tower).encoder.layers
    index = len(layers) + model.config.vision_feature_layer
    layer, attn = layers[index], layers[index].self_attn
    x = layer.layer_norm1(out.hidden_states[index])
    n, length = x.shape[:2]
    q = attn.q_proj(x).view(n, length, attn.num_heads, -1)
    k = attn.k_proj(x).view(n, length, attn.num_heads, -1)
    cls = (torch.einsum("nhd,nlhd->nhl", q[:, 0], k) * attn.scale).softmax(-1).mean(1)[:, 1:]
    features = out.hidden_states[model.config.vision_feature_layer][:, 1:]
    from vtr.plugins import Signals

    _, merged = plugin.zip(Signals(tokens=features, cls_attention=cls, keys=k.mean(2)[:, 1:]),
                           plugin.stage_counts(features.shape[1])[0])
    return model.model.multi_modal_projector(merged).flatten(0, 1)


@torch.no_grad()
def merged_after_projector(model, inputs: dict, plugin, cls_attention: torch.Tensor | None = None) -> torch.Tensor:
    """One image's (or video's) stock features with a merging plugin's values at the tokens it keeps (pooling,
    FastVID); its token grid and frames are read from the inputs: square (LLaVA-1.5), merged t x h x w (Qwen-VL),
    tiles stacked (InternVL), pooled frames (LLaVA-NeXT-Video; LLaVA-OneVision: then a closing newline).
    ``cls_attention``: the vision scores the engine handed the plugin (checked against the eager towers in
    test_methods.py and test_architectures.py)."""
    from vtr.plugins import Signals

    features = torch.cat(list(encode(model, inputs).pooler_output)).reshape(-1, model.config.text_config.hidden_size)
    n = features.shape[0]
    grid_key = "video_grid_thw" if "video_grid_thw" in inputs else "image_grid_thw"
    if grid_key in inputs:
        merge = model.config.vision_config.spatial_merge_size
        t, h, w = inputs[grid_key][0].tolist()
        frames = (t, h // merge, w // merge)
    elif "pixel_values_videos" in inputs:           # frames of side x side (OneVision: then a newline, kept)
        t = inputs["pixel_values_videos"].shape[1]
        n -= model.config.model_type == "llava_onevision"
        side = math.isqrt(n // t)
        frames = (t, side, side)
    elif model.config.model_type == "internvl":
        side = math.isqrt(model.config.image_seq_length)
        frames = (1, n // side, side)
    else:
        frames = (1, math.isqrt(n), math.isqrt(n))
    signals = Signals(tokens=features[None, :n], token_grid=[(frames[0] * frames[1], frames[2])], frames=frames,
                      cls_attention=cls_attention)
    picks, values = plugin.reduce(signals, plugin.stage_counts(n)[0])
    out = features.clone()
    out[picks[0]] = values[0]
    return out


def _absorbed(h, current, keep, visual, protected, absorb):
    from vtr.plugins import Signals

    offered = torch.isin(current, visual)
    if protected is not None:
        offered &= ~torch.isin(current, protected)
    kept = keep[offered]
    signals = Signals(tokens=h, visual=offered[None], image=torch.zeros(int(offered.sum()), dtype=torch.long),
                      counts=[int(offered.sum())], budgets=[int(kept.sum())])
    values = absorb(signals, kept)
    if values is None:                      # this stage only dropped
        return h
    h = h.clone()
    h[0, offered & keep] = values[kept].to(h.dtype)
    return h


@torch.no_grad()
def oracle_generate(model, inputs: dict, pre_llm: torch.Tensor | None, llm_stages: dict[int, torch.Tensor],
                    steps: int, features: torch.Tensor | None = None, absorbers: dict | None = None,
                    protected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens (steps,) and logits (steps, V).

    pre_llm: original positions entering the LLM (None: all); llm_stages: layer -> original positions kept from that
    layer on; features: the image features to place (default: the stock model's); absorbers: layer -> a merging
    plugin's ``absorb``, applied to this run's own hidden states at that layer (its visual tokens less the
    ``protected`` positions, one image) before the drop."""
    core = model.model
    lm = core.language_model
    input_ids = inputs["input_ids"]
    assert input_ids.shape[0] == 1 and bool(inputs["attention_mask"].all()), "the oracle takes one unpadded sample"
    embeds = lm.embed_tokens(input_ids)
    encoded = encode(model, inputs)
    visual = visual_positions(model, input_ids)
    features = torch.cat(list(encoded.pooler_output)) if features is None else features
    embeds[0, visual] = features.to(embeds.dtype)
    # Qwen3-VL DeepStack: features added to the visual tokens after the first layers, by the stock helper
    deepstack = [torch.cat(list(f)) for f in getattr(encoded, "deepstack_features", None) or []]

    full_positions, delta = stock_positions(model, inputs)
    seq = torch.arange(input_ids.shape[1]) if pre_llm is None else pre_llm
    h, pos = embeds[:, seq], full_positions[..., seq]
    cache = DynamicCache(config=lm.config)
    tokens, logits = [], []
    for step in range(steps):
        if step == 0 and not llm_stages and not deepstack:
            h = lm(inputs_embeds=h, position_ids=pos, **{CACHE_ARG: cache}, use_cache=True).last_hidden_state
        else:
            current = seq
            for i, layer in enumerate(lm.layers):
                if step == 0 and i in llm_stages:
                    keep = torch.isin(current, llm_stages[i])
                    if absorbers and i in absorbers:
                        h = _absorbed(h, current, keep, visual, protected, absorbers[i])
                    h, pos, current = h[:, keep], pos[..., keep], current[keep]
                q, kv = h.shape[1], cache.get_seq_length(i) + h.shape[1]
                h = layer(h, attention_mask=_causal(q, kv, h.dtype), position_ids=pos if pos.dim() == 2 else None,
                          position_embeddings=lm.rotary_emb(h, pos), **{CACHE_ARG: cache}, use_cache=True)
                if step == 0 and i < len(deepstack):
                    is_visual = torch.isin(current, visual)
                    rows = torch.searchsorted(visual, current[is_visual])      # each kept token's feature row
                    h = lm._deepstack_process(h, is_visual[None], deepstack[i][rows])
            h = lm.norm(h)
        step_logits = model.lm_head(h[:, -1])[0]
        token = step_logits.argmax()
        tokens.append(token)
        logits.append(step_logits)
        h = lm.embed_tokens(token[None, None])
        pos = torch.full_like(pos[..., -1:], input_ids.shape[1] + step + delta)
    return torch.stack(tokens), torch.stack(logits)
