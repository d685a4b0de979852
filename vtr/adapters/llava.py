"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP vision tower, MLP projector, Llama-family language model.

Visual features come from ``vision_feature_layer`` (-2 on LLaVA-1.5) with the [CLS] token dropped
(``vision_feature_select_strategy="default"``); each image fills one run of ``image_token_id`` placeholders, in order.
"""
from __future__ import annotations

import torch
from torch import nn

from vtr.kernels import attention_rows

from .base import Adapter


class LlavaAdapter(Adapter):
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
        self.projector: nn.Module = core.multi_modal_projector    # one (tokens, D) output per image
        self.language_model: nn.Module = core.language_model
        self.decoder_layers = list(self.language_model.layers)
        self.text_config = self.language_model.config
        self.image_token_id = config.image_token_id

        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise TypeError("vtr supports one vision_feature_layer, not a list of them")
        self.vision_model = core.vision_tower
        encoder_layers = getattr(self.vision_model, "vision_model", self.vision_model).encoder.layers
        # hidden_states[0] is the embedding output, hidden_states[i] the output of encoder layer i - 1
        self.feature_layer = encoder_layers[len(encoder_layers) + layer if layer < 0 else layer - 1]
        self.has_cls = config.vision_config.model_type == "clip_vision_model"
        self.features_keep_cls = config.vision_feature_select_strategy == "full"

    def image_token_counts(self, kwargs: dict, total: int) -> list[int]:
        """Every image of a LLaVA-1.5 batch has the same number of features."""
        images = kwargs["pixel_values"].shape[0]
        return [total // images] * images

    def cls_attention(self, layer: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        """[CLS]->token attention of a CLIP encoder layer, head mean, over the tokens that become features."""
        if not self.has_cls:
            raise ValueError("this vision tower has no [CLS] token; CLS-attention methods cannot score it")
        attn = layer.self_attn
        x = layer.layer_norm1(args[0] if args else kwargs["hidden_states"])
        n, heads, d = x.shape[0], attn.num_heads, attn.head_dim
        q = attn.q_proj(x[:, :1]).view(n, 1, heads, d).transpose(1, 2)
        k = attn.k_proj(x).view(n, x.shape[1], heads, d).transpose(1, 2)
        rows = attention_rows(q, k, attn.scale)[:, 0]
        return (rows if self.features_keep_cls else rows[:, 1:]).flatten()
