"""Tiny models of every supported architecture, built from configs of the real transformers classes (no download),
and batch inputs for token-id prompts in which ``IMAGE`` stands for one image."""
from __future__ import annotations

import torch

from vtr.builtin import IMAGE_TOKEN_ID, llava_inputs, tiny_llava

IMAGE = IMAGE_TOKEN_ID
VISION_START, VISION_END, VIDEO = 90, 91, 92
PAD = 0


def _qwen_text(rope: dict) -> dict:
    return dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, rope_parameters=rope, pad_token_id=PAD,
                bos_token_id=1, eos_token_id=2)


def tiny_qwen2_vl(attn: str, version: str = "2"):
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}   # head_dim 16 -> 8 pairs
    vision = dict(depth=2, num_heads=2, in_channels=3, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END)
    if version == "2":
        config = Qwen2VLConfig(text_config=_qwen_text(rope), vision_config=dict(vision, embed_dim=32, hidden_size=64),
                               **ids)
        cls = Qwen2VLForConditionalGeneration
    else:
        config = Qwen2_5_VLConfig(text_config=_qwen_text(rope), **ids, vision_config=dict(
            vision, depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=64, window_size=16,
            fullatt_block_indexes=[1]))
        cls = Qwen2_5_VLForConditionalGeneration
    return _finish(cls, config, attn)


def tiny_qwen3_vl(attn: str):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2], "mrope_interleaved": True}
    config = Qwen3VLConfig(
        text_config=dict(_qwen_text(rope), head_dim=16),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64,
                           deepstack_visual_indexes=[0, 1, 2]),   # layer 2 is FastV's drop layer
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END)
    return _finish(Qwen3VLForConditionalGeneration, config, attn)


def _finish(cls, config, attn: str):
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = cls(config).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None      # random weights: let every test decode its full length
    return model


PINPOINTS = [[32, 64], [64, 32], [64, 64]]
IMAGE_SIZES = [(40, 60), (64, 30), (50, 50), (20, 70)]    # (H, W) of the anyres models' images, in turn


def tiny_llava_next(attn: str, onevision: bool = False, video: bool = False):
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration, LlavaOnevisionConfig,
                              LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig)

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
                  patch_size=8)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=96, max_position_embeddings=4096, pad_token_id=PAD, bos_token_id=1,
                eos_token_id=2)
    if onevision:      # SigLIP (no [CLS]), Qwen2
        config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**vision), text_config=Qwen2Config(**text),
                                      image_token_id=IMAGE, video_token_id=VIDEO, image_grid_pinpoints=PINPOINTS,
                                      vision_aspect_ratio="anyres_max_9")
        return _finish(LlavaOnevisionForConditionalGeneration, config, attn)
    if video:          # LLaVA-NeXT-Video: CLIP, Llama, each video frame average-pooled 2x2
        config = LlavaNextVideoConfig(vision_config=CLIPVisionConfig(**vision, projection_dim=32),
                                      text_config=LlamaConfig(**text), image_token_id=IMAGE, video_token_id=VIDEO,
                                      image_grid_pinpoints=PINPOINTS, spatial_pool_stride=2)
        return _finish(LlavaNextVideoForConditionalGeneration, config, attn)
    config = LlavaNextConfig(vision_config=CLIPVisionConfig(**vision, projection_dim=32),
                             text_config=LlamaConfig(**text), image_token_id=IMAGE, image_grid_pinpoints=PINPOINTS)
    return _finish(LlavaNextForConditionalGeneration, config, attn)


IMG_START, IMG_END = 93, 94
INTERNVL_TILES = [1, 3, 2, 1]           # tiles of each InternVL image, in turn (thumbnail included)


def tiny_internvl(attn: str):
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=64, patch_size=8, use_qk_norm=True, norm_type="rms_norm")
    text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=96, max_position_embeddings=4096, pad_token_id=PAD,
                       bos_token_id=1, eos_token_id=2)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, image_seq_length=16)
    return _finish(InternVLForConditionalGeneration, config, attn)


BUILDERS = {
    "llava": lambda attn: tiny_llava(seed=0, attn_implementation=attn),
    "qwen2_vl": lambda attn: tiny_qwen2_vl(attn, "2"),
    "qwen2_5_vl": lambda attn: tiny_qwen2_vl(attn, "2.5"),
    "qwen3_vl": tiny_qwen3_vl,
    "llava_next": tiny_llava_next,
    "llava_onevision": lambda attn: tiny_llava_next(attn, onevision=True),
    "llava_next_video": lambda attn: tiny_llava_next(attn, video=True),
    "internvl": tiny_internvl,
}
VIDEO_ARCHS = {f"{arch}_video": arch for arch in ("llava_onevision", "llava_next_video", "qwen2_vl", "qwen2_5_vl",
                                                  "qwen3_vl")}     # the same models on videos

# grids (t, h, w in patches) of the images, in order, for the Qwen models: different sizes in one batch
QWEN_GRIDS = [(1, 8, 12), (1, 12, 8), (1, 16, 16), (1, 8, 8)]


def make_inputs(model, prompts: list[list[int]], seed: int = 0, first_image: int = 0, video: bool = False) -> dict:
    """Left-padded batch inputs with random images (Qwen: of the sizes in ``QWEN_GRIDS``, in turn from
    ``first_image``; with ``video``, videos instead)."""
    if model.config.model_type == "llava":
        return llava_inputs(model, prompts, seed=seed)
    if model.config.model_type in ("llava_onevision", "llava_next_video") and video:
        return _frame_video_inputs(model, prompts, seed)
    if model.config.model_type in ("llava_next", "llava_onevision", "llava_next_video"):
        return _anyres_inputs(model, prompts, seed, first_image)
    if model.config.model_type == "internvl":
        return _internvl_inputs(model, prompts, seed, first_image)
    return _qwen_inputs(model, prompts, seed, first_image, video)


def _pad(rows: list[list[int]]) -> dict:
    width = max(map(len, rows))
    return {"input_ids": torch.tensor([[PAD] * (width - len(r)) + r for r in rows]),
            "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])}


def _frame_video_inputs(model, prompts, seed, frames: int = 4):
    """Videos of ``frames`` frames, as many placeholders each as the stock model makes features of it (frames pooled,
    in a row; OneVision: then a newline)."""
    config = model.config
    videos = sum(p.count(IMAGE) for p in prompts)
    size = config.vision_config.image_size
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(videos, frames, 3, size, size, generator=g)
    with torch.no_grad():
        tokens = model.model.get_video_features(pixels[:1]).pooler_output.shape[1]
    rows = [[t for tok in p for t in ([config.video_token_id] * tokens if tok == IMAGE else [tok])] for p in prompts]
    return {**_pad(rows), "pixel_values_videos": pixels}


def _anyres_crops(model, sizes: torch.Tensor, counts: list[int]) -> list[int]:
    """Crops of each image: base + grid; OneVision gives images of multi-image samples their base crop only."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    crops = [image_size_to_num_patches(s, config.image_grid_pinpoints, config.vision_config.image_size)
             for s in sizes]
    if config.model_type == "llava_onevision":
        alone = [n == 1 for n in counts for _ in range(n)]
        crops = [c if a else 1 for c, a in zip(crops, alone)]
    return crops


def _anyres_inputs(model, prompts, seed, first_image):
    """Crops of each image stacked (4-D pixel_values); the number of placeholders per image is what the stock model
    makes of it (base + unpadded crops + newlines)."""
    config = model.config
    counts = [p.count(IMAGE) for p in prompts]
    sizes = torch.tensor([IMAGE_SIZES[(first_image + i) % len(IMAGE_SIZES)] for i in range(sum(counts))])
    crops = _anyres_crops(model, sizes, counts)
    extra = {"batch_num_images": torch.tensor(counts)} if config.model_type == "llava_onevision" else {}
    g = torch.Generator().manual_seed(seed)
    side = config.vision_config.image_size
    pixel_values = torch.randn(sum(crops), 3, side, side, generator=g).to(model.dtype)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values, sizes, **extra).pooler_output
    tokens = iter(len(f) for f in features)
    rows = [[t for tok in p for t in ([config.image_token_id] * next(tokens) if tok == IMAGE else [tok])]
            for p in prompts]
    return {**_pad(rows), "pixel_values": pixel_values, "image_sizes": sizes, **extra}


def split_batch(model, batch: dict, prompts: list[list[int]]) -> list[dict]:
    """Each sample of a ``make_inputs`` batch on its own, unpadded, with its own images."""
    out, first = [], 0
    video = "pixel_values_videos" in batch
    for prompt in prompts:
        n = prompt.count(IMAGE)
        single = make_inputs(model, [prompt], first_image=first, video=video)
        if "pixel_values_videos" in batch and "video_grid_thw" not in batch:       # LLaVA-family: one row per video
            single["pixel_values_videos"] = batch["pixel_values_videos"][first:first + n]
            assert torch.equal(single["input_ids"][0], batch["input_ids"][len(out), -single["input_ids"].shape[1]:])
        elif model.config.model_type == "internvl":
            tiles = _internvl_tiles(0, sum(p.count(IMAGE) for p in prompts))
            start = sum(tiles[:first])
            single["pixel_values"] = batch["pixel_values"][start:start + sum(tiles[first:first + n])]
            assert torch.equal(single["input_ids"][0], batch["input_ids"][len(out), -single["input_ids"].shape[1]:])
        elif "image_sizes" in batch:
            crops = _anyres_crops(model, batch["image_sizes"], [p.count(IMAGE) for p in prompts])
            start = sum(crops[:first])
            single["pixel_values"] = batch["pixel_values"][start:start + sum(crops[first:first + n])]
            single["image_sizes"] = batch["image_sizes"][first:first + n]
            assert torch.equal(single["input_ids"][0], batch["input_ids"][len(out), -single["input_ids"].shape[1]:])
        elif "image_grid_thw" in batch or video:
            grid, pixels = ("video_grid_thw", "pixel_values_videos") if video else ("image_grid_thw", "pixel_values")
            patches = batch[grid].prod(-1)
            start = int(patches[:first].sum())
            single[grid] = batch[grid][first:first + n]
            single[pixels] = batch[pixels][start:start + int(patches[first:first + n].sum())]
            assert torch.equal(single["input_ids"][0], batch["input_ids"][len(out), -single["input_ids"].shape[1]:])
        else:
            single["pixel_values"] = batch["pixel_values"][first:first + n]
        first += n
        out.append(single)
    return out


def _internvl_tiles(first_image: int, n: int) -> list[int]:
    return [INTERNVL_TILES[(first_image + i) % len(INTERNVL_TILES)] for i in range(n)]


def _internvl_inputs(model, prompts, seed, first_image):
    """Each image: ``<img>``, its tiles' placeholders, ``</img>``; pixel_values holds all tiles in order."""
    tiles = iter(_internvl_tiles(first_image, sum(p.count(IMAGE) for p in prompts)))
    per_tile = model.config.image_seq_length
    rows = [[t for tok in p for t in ([IMG_START] + [IMAGE] * per_tile * next(tiles) + [IMG_END] if tok == IMAGE
                                      else [tok])] for p in prompts]
    total = sum(_internvl_tiles(first_image, sum(p.count(IMAGE) for p in prompts)))
    side = model.config.vision_config.image_size[0]
    g = torch.Generator().manual_seed(seed)
    return {**_pad(rows), "pixel_values": torch.randn(total, 3, side, side, generator=g).to(model.dtype)}


def _qwen_inputs(model, prompts, seed, first_image, video=False):
    """Images, or with ``video`` videos of 2 temporal patches (4 frames), of the sizes in ``QWEN_GRIDS``."""
    config = model.config
    token = config.video_token_id if video else config.image_token_id
    merge = config.vision_config.spatial_merge_size
    vision = config.vision_config
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    rows, grids = [], []
    for prompt in prompts:
        row = []
        for tok in prompt:
            if tok == IMAGE:
                grid = QWEN_GRIDS[(first_image + len(grids)) % len(QWEN_GRIDS)]
                grid = (2, *grid[1:]) if video else grid
                grids.append(grid)
                per_frame = grid[1] * grid[2] // merge ** 2
                if video and config.model_type == "qwen3_vl":         # Qwen3-VL: one run per temporal patch
                    for _ in range(grid[0]):
                        row += [VISION_START] + [token] * per_frame + [VISION_END]
                else:
                    row += [VISION_START] + [token] * (grid[0] * per_frame) + [VISION_END]
            else:
                row.append(tok)
        rows.append(row)
    width = max(map(len, rows))
    input_ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.cat([torch.randn(t * h * w, patch_dim, generator=g) for t, h, w in grids])
    kind = "videos" if video else ""
    return {"input_ids": input_ids,
            "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
            "mm_token_type_ids": (input_ids == token).int() * (2 if video else 1),
            f"pixel_values{'_' + kind if video else ''}": pixel_values.to(model.dtype),
            f"{'video' if video else 'image'}_grid_thw": torch.tensor(grids)}


def anyres_newlines(model, inputs: dict) -> list[torch.Tensor]:
    """Per image of a LLaVA-NeXT/OneVision batch: which of its features are newline tokens, from the model's own
    packing of zeros with a newline of ones."""
    counts = inputs["batch_num_images"].tolist() if "batch_num_images" in inputs else \
        [1] * len(inputs["image_sizes"])
    crops = _anyres_crops(model, inputs["image_sizes"], counts)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    zeros = list(torch.zeros(sum(crops), side * side, 1).split(crops))
    core, sizes = model.model, inputs["image_sizes"]
    if model.config.model_type == "llava_onevision":
        packed = core.pack_image_features(zeros, sizes, image_newline=torch.ones(1),
                                          vision_aspect_ratio=model.config.vision_aspect_ratio)[0]
    else:
        packed = core.pack_image_features(zeros, sizes, model.config.vision_feature_select_strategy,
                                          image_newline=torch.ones(1))[0]
    return [p[:, 0] == 1 for p in packed]
