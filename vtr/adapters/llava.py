"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP vision tower, MLP projector, Llama-family language model.

Visual features come from ``vision_feature_layer`` (-2 on LLaVA-1.5) with the [CLS] token dropped
(``vision_feature_select_strategy="default"``); each image fills one run of ``image_token_id`` placeholders, in order.
"""
from __future__ import annotations

import torch
from torch import nn

from vtr.kernels import apply_rope, attention_rows


class LlavaAdapter:
    name = "llava"

    @staticmethod
    def model_classes():
        from transformers import LlavaForConditionalGeneration

        return (LlavaForConditionalGeneration,)

    def __init__(self, model):
        config = model.config
        core = model.model
        self.model = model
        self.vlm = core                                   # receives input_ids, pixel_values, masks, cache
        self.projector: nn.Module = core.multi_modal_projector
        self.language_model: nn.Module = core.language_model
        self.decoder_layers = list(self.language_model.layers)
        self.text_config = self.language_model.config
        self.image_token_id = config.image_token_id

        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise TypeError("vtr supports one vision_feature_layer, not a list of them")
        tower = core.vision_tower
        encoder_layers = getattr(tower, "vision_model", tower).encoder.layers
        # hidden_states[0] is the embedding output, hidden_states[i] the output of encoder layer i - 1
        self.feature_layer = encoder_layers[len(encoder_layers) + layer if layer < 0 else layer - 1]
        self.has_cls = config.vision_config.model_type == "clip_vision_model"
        self.features_keep_cls = config.vision_feature_select_strategy == "full"

    def cls_attention(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """[CLS]->token attention of a CLIP encoder layer, head mean, over the tokens that become features: (I, P)."""
        if not self.has_cls:
            raise ValueError("this vision tower has no [CLS] token; CLS-attention methods cannot score it")
        attn = layer.self_attn
        x = layer.layer_norm1(hidden)
        n, heads, d = x.shape[0], attn.num_heads, attn.head_dim
        q = attn.q_proj(x[:, :1]).view(n, 1, heads, d).transpose(1, 2)
        k = attn.k_proj(x).view(n, x.shape[1], heads, d).transpose(1, 2)
        rows = attention_rows(q, k, attn.scale)[:, 0]
        return rows if self.features_keep_cls else rows[:, 1:]

    def attention_input(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """What the layer's attention projections receive: its input norm applied to the hidden states."""
        return layer.input_layernorm(hidden)

    def key_projection(self, layer: nn.Module) -> nn.Module:
        """The module whose output is the layer's keys before norm and RoPE; hooked to reuse them, not recompute."""
        return layer.self_attn.k_proj

    def last_token_attention(self, layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             key_mask: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the last position (the last prompt token under left padding) in a decoder layer, from the
        layer's own q/k projections, q/k norms and RoPE, head mean: (B, L). ``x`` is the attention input
        (``attention_input``); ``keys`` the layer's own k projection of it when a hook caught it, else recomputed."""
        attn = layer.self_attn
        b, n, d = x.shape[0], x.shape[1], attn.head_dim
        q = attn.q_proj(x[:, -1:]).view(b, 1, -1, d)
        k = (attn.k_proj(x) if keys is None else keys).view(b, n, -1, d)
        if hasattr(attn, "q_norm"):                       # Qwen3-style per-head norms before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos[:, -1:], sin[:, -1:])
        k = apply_rope(k.transpose(1, 2), cos, sin)
        return attention_rows(q, k, attn.scaling, key_mask)[:, 0]
