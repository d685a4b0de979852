"""The LLaVA family: LLaVA-1.5 (``LlavaForConditionalGeneration``), LLaVA-NeXT (``LlavaNextForConditionalGeneration``)
and LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): a CLIP or SigLIP tower, an MLP projector, a
Llama/Qwen2 language model; each image fills one run of ``image_token_id`` placeholders, in order.

LLaVA-1.5: one crop per image; features from ``vision_feature_layer`` (-2) without the [CLS] token.
NeXT / OneVision (anyres): a base image plus a grid of crops; the model packs the crops' features into one image grid,
removes the padding (OneVision may also shrink it bilinearly) and ends each row with an ``image_newline`` token. A
retain/budget applies per image across its crops, and newline tokens are never dropped.

Scores from the vision tower (CLS-attention methods) are per crop patch; they are packed like the features (base crop,
then the crop grid, unpadded and, on OneVision, resized as the model does). Under generate() the model does not pass
``image_sizes`` on, so the crop grid and unpadded window of each image are read back from its packed features: the
adapter reproduces the first channels from the projector's crop outputs and keeps the geometry that matches.
Towers without a [CLS] token (SigLIP) score a patch by the mean attention it receives in the feature layer (all
heads, all queries of its crop), the documented fallback.
"""
from __future__ import annotations

import math
from itertools import accumulate

import torch
from torch import nn

from vtr.kernels import attention_received, attention_rows

from .base import Adapter


class LlavaAdapter(Adapter):
    name = "llava"
    #: the projector sees each image's feature-layer patches as one sequence, in feature order (VisionZip-style
    #: methods merge there)
    merges_before_projector = True
    has_token_grid = True
    has_frames = True
    reuses_frames = True

    @staticmethod
    def model_classes():
        from transformers import LlavaForConditionalGeneration

        return (LlavaForConditionalGeneration,)

    def __init__(self, model):
        super().__init__(model)
        config = self.config
        self.projector: nn.Module = self.vlm.multi_modal_projector    # one (tokens, D) output per crop
        self.vision_model = self.vlm.vision_tower
        self.feature_layer = self._feature_layer(getattr(self.vision_model, "vision_model",
                                                         self.vision_model).encoder.layers)
        self.has_cls = config.vision_config.model_type == "clip_vision_model"
        self.features_keep_cls = config.vision_feature_select_strategy == "full"

    def tower_adapter(self):
        """The vision tower up to the feature layer, for encoder methods (ToMe, EViT) run inside it."""
        from .vit import VisionTowerAdapter

        layers = list(getattr(self.vision_model, "vision_model", self.vision_model).encoder.layers)
        return VisionTowerAdapter(self.vision_model, layers[:layers.index(self.feature_layer) + 1], self.has_cls)

    def image_token_counts(self, kwargs: dict, visual: torch.Tensor, encoded: dict) -> list[int]:
        """Every image of a LLaVA-1.5 batch has a feature per patch of its pixels (and the [CLS] one with the "full"
        strategy): known from the shapes, nothing read back."""
        if "image" in encoded:
            return encoded["image"]
        pixels, patch = kwargs["pixel_values"], self.config.vision_config.patch_size
        cls = int(self.has_cls and self.features_keep_cls)
        features = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch) + cls
        return [features] * pixels.shape[0]

    def token_grids(self, sizes: list[int]) -> list[tuple[int, int]]:
        side = [math.isqrt(n) for n in sizes]
        if any(s * s != n for s, n in zip(side, sizes)):
            raise ValueError("vtr: the image features do not form a square grid")
        return [(s, s) for s in side]

    def score_projections(self) -> tuple[nn.Module, ...]:
        attn = self.feature_layer.self_attn
        return attn.q_proj, attn.k_proj

    def cls_attention(self, layer: nn.Module, args: tuple, kwargs: dict, projected: tuple) -> torch.Tensor:
        """Per crop: [CLS]->patch attention of the feature layer (head mean) over the patches that become features;
        without a [CLS] token, the mean attention each patch receives. Flat, crop after crop."""
        q, k = (self._heads(layer, t).transpose(1, 2) for t in projected)       # (crops, heads, tokens, d)
        if self.has_cls:
            rows = attention_rows(q[:, :, :1], k, layer.self_attn.scale)[:, 0]
            rows = rows if self.features_keep_cls else rows[:, 1:]
        else:
            rows = attention_received(q, k, layer.self_attn.scale)
        return rows.flatten()

    @staticmethod
    def _heads(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        attn = layer.self_attn
        return x.view(x.shape[0], x.shape[1], attn.num_heads, attn.head_dim)

    def feature_keys(self, layer: nn.Module, projected: tuple) -> torch.Tensor:
        """The feature layer's keys, head mean, of the patches that become features: (I, P, d)."""
        keys = self._heads(layer, projected[1]).mean(dim=2)
        return keys if self.features_keep_cls or not self.has_cls else keys[:, 1:]


class LlavaNextAdapter(LlavaAdapter):
    name = "llava_next"
    newline_tokens = True
    merges_before_projector = False              # crops are packed after the projector
    has_token_grid = False                       # a thumbnail plus an unpadded crop grid, with newlines
    has_frames = False
    tower_adapter = None                         # crops are packed after the tower: no encoder methods inside it

    @staticmethod
    def model_classes():
        from transformers import LlavaNextForConditionalGeneration

        return (LlavaNextForConditionalGeneration,)

    def __init__(self, model):
        super().__init__(model)
        self.side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        self.crop_features: torch.Tensor | None = None     # the projector's last output, (crops, P, D)
        self.vision_output_hooks = [(self.projector, self._capture)]
        self._cache: tuple | None = None

    def _capture(self, module, args, output):
        self.crop_features = output

    def _crops(self, image_sizes, kwargs: dict) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return [image_size_to_num_patches(size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
                for size in image_sizes]

    def _pack(self, values: list[torch.Tensor], image_sizes, newline: torch.Tensor) -> list[torch.Tensor]:
        return self.vlm.pack_image_features(values, image_sizes, self.config.vision_feature_select_strategy,
                                            image_newline=newline)[0]

    def image_token_counts(self, kwargs: dict, visual: torch.Tensor, encoded: dict) -> list[int]:
        """From the pre-encoded features under generate(); else the model's own packing of the crops."""
        self.newline_counts = None
        if "image" in encoded:
            return encoded["image"]
        sizes = kwargs["image_sizes"].tolist()      # read once: the model's functions take host sizes as well
        crops = self._crops(sizes, kwargs)
        patches = self.side * self.side + int(self.has_cls and self.features_keep_cls)      # features per crop
        # the model's own packing of a one-channel stand-in, on the CPU (shape work, no device read): features 1,
        # newlines 0
        packed = self._pack(list(torch.ones(sum(crops), patches, 1).split(crops)), sizes, torch.zeros(1))
        self.newline_counts = torch.stack([(p == 0).sum() for p in packed]).tolist()
        return [len(p) for p in packed]

    def protected(self, features: torch.Tensor) -> torch.Tensor:
        """Newline tokens: the features that are the model's ``image_newline`` vector."""
        return (features == self.vlm.image_newline.to(features.dtype)).all(dim=-1)

    # ------------------------------------------------------------------ where each packed feature comes from
    def _shrunk(self, height: int, width: int) -> tuple[int, int]:
        """The size the model gives an unpadded grid of crop patches (LLaVA-NeXT keeps it)."""
        return height, width

    def _shrink(self, grid: torch.Tensor) -> torch.Tensor:
        return grid

    def _full_grid(self, crops: torch.Tensor, n_h: int, n_w: int) -> torch.Tensor:
        """(n_h * n_w, P, k) crop patches -> (k, n_h * side, n_w * side), crops in raster order, as the model tiles
        them."""
        side = self.side
        return crops.reshape(n_h, n_w, side, side, -1).permute(4, 0, 2, 1, 3).reshape(-1, n_h * side, n_w * side)

    def _geometry(self, features: torch.Tensor, sizes: list[int]) -> list[dict]:
        """Per image: its crops (base first) in the projector output, and the crop grid, unpadded window and packed
        size the model used, found by reproducing the first channels of its packed features from the crops (the
        model does not pass ``image_sizes`` on under generate(), so they are read back, and verified)."""
        if self._cache is not None and self._cache[0] is features:
            return self._cache[1]
        crops = self.crop_features.to(features.dtype)
        patches, probe = crops.shape[1], min(8, crops.shape[-1])
        starts = [0, *accumulate(sizes)][:-1]
        # one read for all images: the crop an image's packed features start with (its base crop; exactly one must
        # match) and the newline rows of its crop grid
        first = (crops[:, None, 0] == features[starts][None]).all(dim=-1)                  # (crops, images)
        newline = self.protected(features)
        rows = torch.stack([newline[start + patches:start + n].sum() for start, n in zip(starts, sizes)])
        read = torch.cat([first.sum(dim=0), first.long().argmax(dim=0), rows]).tolist()
        matches, bases, grid_rows = read[:len(sizes)], read[len(sizes):2 * len(sizes)], read[2 * len(sizes):]
        if any(m != 1 for m in matches):
            raise RuntimeError("vtr: the image features do not come from this forward pass's vision tower")
        out = []
        for i, (start, n) in enumerate(zip(starts, sizes)):
            base = bases[i]
            count = (bases[i + 1] if i + 1 < len(bases) else len(crops)) - base
            geometry = {"base": base, "crops": count, "grid": (0, 0), "patches": patches}
            grid_part = features[start + patches:start + n]
            if count > 1:
                rows = grid_rows[i]
                cols = len(grid_part) // rows - 1
                want = grid_part.view(rows, cols + 1, -1)[:, :cols, :probe].permute(2, 0, 1)
                geometry.update(self._search(crops[base + 1:base + count, :, :probe], count - 1, rows, cols, want))
            out.append(geometry)
        self._cache = (features, out)
        return out

    def _search(self, crops: torch.Tensor, count: int, rows: int, cols: int, want: torch.Tensor) -> dict:
        side = self.side
        for n_h in (h for h in range(1, count + 1) if count % h == 0):
            n_w = count // n_h
            full = self._full_grid(crops, n_h, n_w)
            height, width = n_h * side, n_w * side
            windows = [(height - 2 * pad, width, pad, 0) for pad in range(height // 2)] + \
                [(height, width - 2 * pad, 0, pad) for pad in range(1, width // 2)]
            for h, w, top, left in windows:                 # the model crops its padding symmetrically
                if self._shrunk(h, w) != (rows, cols):
                    continue
                got = self._shrink(full[:, top:top + h, left:left + w])
                if torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.detach().abs().max())):
                    return {"grid": (n_h, n_w), "window": (top, left, h, w), "packed": (rows, cols)}
        raise NotImplementedError(f"vtr: could not trace {type(self.model).__name__}'s packed image features back to "
                                  "its crops (a packing this adapter does not know)")

    def arrange_scores(self, scores: torch.Tensor, features: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Per-crop-patch scores packed like the features: the base crop's, then the crop grid's, unpadded (and
        resized) as the model did it; newline slots get 0."""
        out = []
        for g, n in zip(self._geometry(features, sizes), sizes):
            per_crop = scores.view(-1, g["patches"])[g["base"]:g["base"] + g["crops"]].float()
            packed = [per_crop[0]]
            if g["crops"] > 1:
                top, left, h, w = g["window"]
                grid = self._shrink(self._full_grid(per_crop[1:, :, None], *g["grid"])[:, top:top + h, left:left + w])
                packed.append(torch.cat([grid[0], grid.new_zeros(grid.shape[1], 1)], dim=1).flatten())
            flat = torch.cat(packed)
            out.append(torch.cat([flat, flat.new_zeros(n - len(flat))]))       # a lone base crop's newline
        return torch.cat(out)

    def anyres_layout(self, features: torch.Tensor, sizes: list[int]) -> dict:
        """Where each packed feature comes from (see ``Signals.layout``): a grid token belongs to the crop its
        source position (before a resize: the nearest) falls in."""
        side, crop, row, col, grids = self.side, [], [], [], []
        for g, n in zip(self._geometry(features, sizes), sizes):
            device = features.device
            patch = torch.arange(g["patches"], device=device)
            c, r, q = [torch.zeros_like(patch)], [patch // side], [patch % side]
            if g["crops"] > 1:
                (top, left, h, w), (rows, cols), n_w = g["window"], g["packed"], g["grid"][1]
                rr, cc = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols + 1, device=device),
                                        indexing="ij")
                src_r = ((rr + 0.5) * h / rows - 0.5).round().clamp(0, h - 1).long() + top
                src_c = ((cc + 0.5) * w / cols - 0.5).round().clamp(0, w - 1).long() + left
                grid_crop = (src_r // side) * n_w + src_c // side + 1
                c.append(grid_crop.masked_fill(cc == cols, -1).flatten())
                r.append(rr.flatten()), q.append(cc.flatten())
            c, r, q = torch.cat(c), torch.cat(r), torch.cat(q)
            pad = n - len(c)                                   # a lone base crop's newline
            crop.append(torch.cat([c, c.new_full((pad,), -1)]))
            row.append(torch.cat([r, r.new_zeros(pad)])), col.append(torch.cat([q, q.new_zeros(pad)]))
            grids.append(g["grid"])
        return {"crop": torch.cat(crop), "row": torch.cat(row), "col": torch.cat(col),
                "grid": torch.tensor(grids, device=features.device), "side": side}


class _VideoAdapter(LlavaNextAdapter):
    """LLaVA-NeXT-family models that take videos too: each frame's features pooled by the model (``pooled_side``
    tokens a side), frames in a row, then, on OneVision, one newline; a video is one unit of the budget."""
    has_frames = True                            # videos only
    video_newline = False

    def __init__(self, model):
        super().__init__(model)
        self.video_token_id = model.config.video_token_id
        self.video = False                          # whether the current batch holds videos (not images)

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.image_token_id, self.video_token_id)

    @property
    def pooled_side(self) -> int:
        raise NotImplementedError

    def pool_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """(frames, side * side) patch scores pooled like the features: (frames, pooled_side ** 2)."""
        raise NotImplementedError

    def image_token_counts(self, kwargs: dict, visual: torch.Tensor, encoded: dict) -> list[int]:
        images = kwargs.get("pixel_values") is not None or "image" in encoded
        videos = kwargs.get("pixel_values_videos")
        self.video = videos is not None or "video" in encoded
        if images and self.video:
            raise NotImplementedError("vtr: images and videos in one batch are not reduced yet; send them apart")
        if not self.video:
            return super().image_token_counts(kwargs, visual, encoded)
        if "video" in encoded:
            counts = encoded["video"]
        else:
            counts = [videos.shape[1] * self.pooled_side ** 2 + self.video_newline] * videos.shape[0]
        self.newline_counts = [int(self.video_newline)] * len(counts)
        return counts

    def arrange_scores(self, scores: torch.Tensor, features: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Videos: each frame's patch scores pooled like its features, frames in a row (0 for a closing newline)."""
        if not self.video:
            return super().arrange_scores(scores, features, sizes)
        pooled = self.pool_scores(scores.view(-1, self.side * self.side).float())
        out, start = [], 0
        for n in sizes:
            frames = (n - self.video_newline) // pooled.shape[1]
            out += [pooled[start:start + frames].flatten(), pooled.new_zeros(int(self.video_newline))]
            start += frames
        return torch.cat(out)

    def frame_grids(self, sizes: list[int]) -> list[tuple[int, int, int]]:
        if not self.video:
            raise ValueError(f"vtr: per-frame and temporal methods need videos on {type(self.model).__name__} (its "
                             "images are a thumbnail plus crops, not frames)")
        side = self.pooled_side
        return [((n - self.video_newline) // side ** 2, side, side) for n in sizes]

    def anyres_layout(self, features: torch.Tensor, sizes: list[int]) -> dict:
        if self.video:
            raise NotImplementedError("vtr: a video has no thumbnail and crops for an anyres-layout method")
        return super().anyres_layout(features, sizes)


class LlavaNextVideoAdapter(_VideoAdapter):
    """LLaVA-NeXT-Video: images as LLaVA-NeXT; a video frame's features pooled by ``vision_resampler`` (2x2 average
    by default), no newline."""
    name = "llava_next_video"

    @staticmethod
    def model_classes():
        from transformers import LlavaNextVideoForConditionalGeneration

        return (LlavaNextVideoForConditionalGeneration,)

    @property
    def pooled_side(self) -> int:
        return self.side // self.config.spatial_pool_stride

    def pool_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """The resampler's own pooling (average or max); its "conv" mode has no score analogue: averaged."""
        grid, stride = scores.view(-1, 1, self.side, self.side), self.config.spatial_pool_stride
        pool = nn.functional.max_pool2d if self.config.spatial_pool_mode == "max" else nn.functional.avg_pool2d
        return pool(grid, stride, stride).flatten(1)


class LlavaOnevisionAdapter(_VideoAdapter):
    name = "llava_onevision"
    video_newline = True

    @staticmethod
    def model_classes():
        from transformers import LlavaOnevisionForConditionalGeneration

        return (LlavaOnevisionForConditionalGeneration,)

    def _crops(self, image_sizes, kwargs: dict) -> list[int]:
        crops = super()._crops(image_sizes, kwargs)
        per_sample = kwargs.get("batch_num_images")
        if per_sample is None:
            return crops
        single = [n == 1 for n in per_sample.tolist() for _ in range(n)]   # multi-image samples: base image only
        return [c if s else 1 for c, s in zip(crops, single)]

    @property
    def pooled_side(self) -> int:
        return math.ceil(self.side / 2)

    def pool_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """The model's own ``apply_pooling`` (2x2 bilinear)."""
        return self.vlm.apply_pooling(scores[..., None])[..., 0]

    def _pack(self, values: list[torch.Tensor], image_sizes, newline: torch.Tensor) -> list[torch.Tensor]:
        return self.vlm.pack_image_features(values, image_sizes, image_newline=newline,
                                            vision_aspect_ratio=self.config.vision_aspect_ratio)[0]

    def _ratio(self, height: int, width: int) -> float:
        """OneVision shrinks an unpadded grid larger than ``anyres_max_N`` crops' worth (by more than 10 %)."""
        most = int(self.config.vision_aspect_ratio.strip("anyres_max_"))
        return math.sqrt(height * width / (most * self.side ** 2))

    def _shrunk(self, height: int, width: int) -> tuple[int, int]:
        ratio = self._ratio(height, width)
        return (int(height // ratio), int(width // ratio)) if ratio > 1.1 else (height, width)

    def _shrink(self, grid: torch.Tensor) -> torch.Tensor:
        size = self._shrunk(*grid.shape[1:])
        if size == tuple(grid.shape[1:]):
            return grid
        return nn.functional.interpolate(grid[None], list(size), mode="bilinear")[0]
