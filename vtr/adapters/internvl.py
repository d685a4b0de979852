"""InternVL (``InternVLForConditionalGeneration``, InternVL3 and later as ported to transformers): an InternViT tower
run on every tile of every image (a thumbnail plus up to 12 tiles, chosen by the processor), pixel shuffle that folds
each 2x2 group of patches into one token, an MLP projector, a Qwen2/Llama language model.

The model does not know which tiles belong to which image: the processor writes ``<img>``, the tiles' placeholders,
``</img>`` for each image, so an image is one run of consecutive ``image_token_id`` placeholders, and a budget or
retain applies to the image across its tiles. CLS-attention methods use the [CLS] token of each tile: its attention
to the tile's patches in the feature layer, head mean, averaged over the patches the model's own ``pixel_shuffle``
folds into each token.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from vtr.kernels import attention_rows

from .base import Adapter


class InternVLAdapter(Adapter):
    name = "internvl"
    has_token_grid = True

    @staticmethod
    def model_classes():
        from transformers import InternVLForConditionalGeneration

        return (InternVLForConditionalGeneration,)

    def __init__(self, model):
        super().__init__(model)
        self.projector: nn.Module = self.vlm.multi_modal_projector
        self.vision_model = self.vlm.vision_tower
        self.feature_layer = self._feature_layer(self.vision_model.encoder.layer)
        self.features_keep_cls = self.config.vision_feature_select_strategy == "full"

    def image_token_counts(self, kwargs: dict, visual: torch.Tensor, encoded: dict) -> list[int]:
        """One run of placeholders per image (``<img>`` and ``</img>`` separate them)."""
        flags = visual.int()
        zero = flags.new_zeros(flags.shape[0], 1)
        edges = torch.diff(torch.cat([zero, flags, zero], dim=1), dim=1)        # +1 at a run's start, -1 after it
        starts, ends = (edges == 1).nonzero(), (edges == -1).nonzero()         # row-major: runs in sequence order
        return (ends[:, 1] - starts[:, 1]).tolist()

    def token_grids(self, sizes: list[int]) -> list[tuple[int, int]]:
        """Each tile's square grid, tiles stacked top to bottom (cells never straddle two tiles when they divide
        the tile's side)."""
        side = math.isqrt(self.config.image_seq_length)
        return [(n // side, side) for n in sizes]

    def score_projections(self) -> tuple[nn.Module, ...]:
        attn = self.feature_layer.attention
        return attn.q_norm, attn.k_norm            # the normalised projections (Identity where qk_normalization is off)

    def cls_attention(self, layer: nn.Module, args: tuple, kwargs: dict, projected: tuple) -> torch.Tensor:
        if self.features_keep_cls:
            raise ValueError("vision_feature_select_strategy='full' keeps the [CLS] token among the features; "
                             "CLS-attention methods expect it removed")
        attn, (q, k) = layer.attention, projected
        tiles, n, heads, d = k.shape[0], k.shape[1], attn.num_heads, attn.head_dim
        q = q[:, :1].reshape(tiles, 1, heads, d).transpose(1, 2)
        k = k.reshape(tiles, n, heads, d).transpose(1, 2)
        rows = attention_rows(q, k, attn.scale)[:, 0, 1:]                       # (tiles, patches)
        side = int((n - 1) ** 0.5)
        folded = self.vlm.pixel_shuffle(rows.reshape(tiles, side, side, 1), scale_factor=self.config.downsample_ratio)
        return folded.mean(dim=-1).flatten()
