"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
``Qwen3VLForConditionalGeneration``).

A ViT with 2-D RoPE runs over all images at once (``cu_seqlens`` keeps each image to itself; Qwen2.5-VL attends in
windows except in a few full-attention blocks and reorders tokens by window); a PatchMerger turns each 2x2 group of
patches into one token. Selection therefore works on merged tokens, one run of ``image_token_id`` per image, with
``t*h*w / merge**2`` tokens (dynamic resolution: images differ). The language model uses 3-axis M-RoPE: the model
computes position ids on the full, unpruned layout and the engine gathers the kept columns; ``rope_deltas`` stay the
model's own, so decoding continues at the positions the stock model gives.

Qwen3-VL adds DeepStack: features from intermediate vision layers are added to the visual tokens' hidden states after
the first decoder layers; the engine adds them itself, to the tokens still in the sequence (their own rows).

No [CLS] token: CLS-attention methods score a merged token by the mean attention its patches receive in the last
vision block (all heads, all queries of the same image), the fallback FasterVLM-style methods use for such encoders.
"""
from __future__ import annotations

from itertools import accumulate

import torch
from torch import nn

from vtr.kernels import attention_received, rotate_half

from .base import Adapter


class Qwen2VLAdapter(Adapter):
    name = "qwen2_vl"
    has_token_grid = True
    has_frames = True

    @staticmethod
    def model_classes():
        from transformers import Qwen2VLForConditionalGeneration

        return (Qwen2VLForConditionalGeneration,)

    def __init__(self, model):
        super().__init__(model)
        config, core = self.config, self.vlm
        self.video_token_id = config.video_token_id
        self.vision_model = core.visual
        self.feature_layer = core.visual.blocks[-1]
        self.merge = config.vision_config.spatial_merge_size
        self.merged_order: torch.Tensor | None = None      # block order -> merger output order (Qwen2.5-VL windows)
        self.grid_thw: torch.Tensor | None = None          # (images, 3) patches per image, from the vision pass
        self.grid_list: list[list[int]] = []               # the same on the host
        self._read_grid: tuple[torch.Tensor, list] | None = None

    def _host_grid(self, grid: torch.Tensor) -> list[list[int]]:
        """``grid`` as host ints, read once per forward: the token counts and the vision pass get the same tensor."""
        if self._read_grid is None or self._read_grid[0] is not grid:
            self._read_grid = (grid, grid.tolist())
        return self._read_grid[1]

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.image_token_id, self.video_token_id)

    def image_token_counts(self, kwargs: dict, visual: torch.Tensor, encoded: dict) -> list[int]:
        """Images and videos: t * h * w / merge**2 tokens each (a video is one unit, its budget covers its frames)."""
        counts = {}
        for modality, grid in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
            if modality in encoded:
                counts[modality] = encoded[modality]
            elif kwargs.get(grid) is not None:
                counts[modality] = [t * h * w // self.merge ** 2 for t, h, w in self._host_grid(kwargs[grid])]
        if len(counts) > 1:
            raise NotImplementedError("vtr: images and videos in one batch are not reduced yet; send them apart")
        return next(iter(counts.values()))

    def begin_vision(self, args: tuple, kwargs: dict):
        self.grid_thw = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        self.grid_list = self.encoded_grids = self._host_grid(self.grid_thw)

    def repeat_images(self, source: list[int]):
        self.grid_list = [self.encoded_grids[e] for e in source]       # again for each prefill (use_cache=False)

    def token_grids(self, sizes: list[int]) -> list[tuple[int, int]]:
        """The merged grid: frames stacked, (t * h / merge, w / merge)."""
        return [(t * h // self.merge, w // self.merge) for t, h, w in self.grid_list]

    def frame_grids(self, sizes: list[int]) -> list[tuple[int, int, int]]:
        """A frame is a temporal patch (2 video frames), of (h / merge, w / merge) merged tokens."""
        return [(t, h // self.merge, w // self.merge) for t, h, w in self.grid_list]

    def score_projections(self) -> tuple[nn.Module, ...]:
        return (self.feature_layer.attn.qkv,)

    def cls_attention(self, layer: nn.Module, args: tuple, kwargs: dict, projected: tuple) -> torch.Tensor:
        cos, sin = (t.float().unsqueeze(-2) for t in kwargs["position_embeddings"])
        attn, qkv = layer.attn, projected[0]
        q, k, _ = qkv.reshape(qkv.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = (t.float() * cos + rotate_half(t.float()) * sin for t in (q, k))       # the block's vision RoPE
        bounds = self.attention_bounds(args, kwargs)
        received = torch.cat([attention_received(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), attn.scaling)
                              for a, b in zip(bounds[:-1], bounds[1:])])
        merged = received.view(-1, self.merge ** 2).mean(dim=1)      # a merge group's patches are consecutive
        return merged if self.merged_order is None else merged[self.merged_order]

    def attention_bounds(self, args: tuple, kwargs: dict) -> list[int]:
        """Where the feature block's attention spans start and end: each temporal patch's h * w patches (the block's
        ``cu_seqlens``), from the host grid rather than a device read."""
        return [0, *accumulate(h * w for t, h, w in self.grid_list for _ in range(t))]


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    name = "qwen2_5_vl"

    @staticmethod
    def model_classes():
        from transformers import Qwen2_5_VLForConditionalGeneration

        return (Qwen2_5_VLForConditionalGeneration,)

    def begin_vision(self, args: tuple, kwargs: dict):
        """The blocks see the patches in window order; the merger output is put back in image order."""
        from transformers.vision_utils import get_vision_window_index

        super().begin_vision(args, kwargs)
        visual = self.vision_model
        # from the host grid, so the index is built on the CPU without a device read
        window_index, _ = get_vision_window_index(torch.tensor(self.grid_list), visual.spatial_merge_size,
                                                  visual.window_size, visual.patch_size)
        self.merged_order = torch.argsort(window_index).to(self.grid_thw.device, non_blocking=True)

    def attention_bounds(self, args: tuple, kwargs: dict) -> list[int]:
        """The full-attention blocks span frames; a windowed feature block (small configs) reads its windows."""
        visual = self.vision_model
        if len(visual.blocks) - 1 in visual.fullatt_block_indexes:
            return super().attention_bounds(args, kwargs)
        return (kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]).tolist()


class Qwen3VLAdapter(Qwen2VLAdapter):
    name = "qwen3_vl"

    @staticmethod
    def model_classes():
        from transformers import Qwen3VLForConditionalGeneration

        return (Qwen3VLForConditionalGeneration,)

    def __init__(self, model):
        super().__init__(model)
        self.injection_layers = len(model.config.vision_config.deepstack_visual_indexes)

    def take_injections(self, kwargs: dict) -> list[torch.Tensor] | None:
        embeds = kwargs.get("deepstack_visual_embeds")
        kwargs["deepstack_visual_embeds"] = kwargs["visual_pos_masks"] = None
        return embeds
