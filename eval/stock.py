"""The stock model's own steps, written without vtr: the vision pass of a prompt's images or videos, and the positions
the model gives the prompt. The benchmark's ideal path and the tests' oracle build on them."""
from __future__ import annotations

import torch


def encode(model, inputs: dict):
    """The stock vision pass of the inputs' images or videos (``pooler_output``: one feature run per image/video)."""
    if "video_grid_thw" in inputs:
        return model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    if "pixel_values_videos" in inputs:
        return model.model.get_video_features(inputs["pixel_values_videos"])
    return model.model.get_image_features(**{k: inputs[k] for k in ("pixel_values", "image_grid_thw", "image_sizes",
                                                                     "batch_num_images") if k in inputs})


def stock_positions(model, inputs: dict) -> tuple[torch.Tensor, int]:
    """(positions of the full prompt, (..., 1, L): M-RoPE models' own ``get_rope_index``, else 0..L-1; the offset of
    a new token's position from its index in the sequence)."""
    ids = inputs["input_ids"]
    if "mm_token_type_ids" not in inputs:
        return torch.arange(ids.shape[1], device=ids.device)[None], 0
    positions, deltas = model.model.get_rope_index(ids, inputs["mm_token_type_ids"],
                                                   image_grid_thw=inputs.get("image_grid_thw"),
                                                   video_grid_thw=inputs.get("video_grid_thw"))
    return positions, int(deltas[0])
