"""The LLaVA family: LLaVA-1.5 (``LlavaForConditionalGeneration``), LLaVA-NeXT (``LlavaNextForConditionalGeneration``)
and LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): a CLIP or SigLIP tower, an MLP projector, a
Llama/Qwen2 language model; each image fills one run of ``image_token_id`` placeholders, in order.

LLaVA-1.5: one crop per image; features from ``vision_feature_layer`` (-2) without the [CLS] token.
NeXT / OneVision (anyres): a base image plus a grid of crops; the model packs the crops' features into one image grid,
removes the padding (OneVision may also shrink it bilinearly) and ends each row with an ``image_newline`` token. A
retain/budget applies per image across its crops, and newline tokens are never dropped.

Scores from the vision tower (CLS-attention methods) are per crop patch; a packed feature takes the score of the crop
patch whose projector output it copies (OneVision images whose grid the model resizes are not supported by them yet). Towers without a [CLS] token (SigLIP) score a patch by the mean attention it
receives in the feature layer (all heads, all queries of its crop), the documented fallback.
"""
from __future__ import annotations

import torch
from torch import nn

from vtr.kernels import attention_received, attention_rows

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
        self.config = config
        self.vlm = core                                   # receives input_ids, pixel_values, masks, cache
        self.projector: nn.Module = core.multi_modal_projector    # one (tokens, D) output per crop
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

    def image_token_counts(self, kwargs: dict, visual: torch.Tensor, encoded: list[int] | None) -> list[int]:
        """Every image of a LLaVA-1.5 batch has the same number of features."""
        if encoded is not None:
            return encoded
        images = kwargs["pixel_values"].shape[0]
        return [int(visual.sum()) // images] * images

    def cls_attention(self, layer: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        """Per crop: [CLS]->patch attention of the feature layer (head mean) over the patches that become features;
        without a [CLS] token, the mean attention each patch receives. Flat, crop after crop."""
        attn = layer.self_attn
        x = layer.layer_norm1(args[0] if args else kwargs["hidden_states"])
        n, heads, d = x.shape[0], attn.num_heads, attn.head_dim
        k = attn.k_proj(x).view(n, x.shape[1], heads, d).transpose(1, 2)
        if self.has_cls:
            q = attn.q_proj(x[:, :1]).view(n, 1, heads, d).transpose(1, 2)
            rows = attention_rows(q, k, attn.scale)[:, 0]
            rows = rows if self.features_keep_cls else rows[:, 1:]
        else:
            q = attn.q_proj(x).view(n, x.shape[1], heads, d).transpose(1, 2)
            rows = attention_received(q, k, attn.scale)
        return rows.flatten()


class LlavaNextAdapter(LlavaAdapter):
    name = "llava_next"

    @staticmethod
    def model_classes():
        from transformers import LlavaNextForConditionalGeneration

        return (LlavaNextForConditionalGeneration,)

    def __init__(self, model):
        super().__init__(model)
        self.crop_features: torch.Tensor | None = None     # the projector's last output, (crops * P, D)
        self.vision_output_hooks = [(self.projector, self._capture)]

    def _capture(self, module, args, output):
        self.crop_features = output.flatten(0, -2)

    def _crops(self, image_sizes, kwargs: dict) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return [image_size_to_num_patches(size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
                for size in image_sizes]

    def _pack(self, values: list[torch.Tensor], image_sizes, newline: torch.Tensor) -> list[torch.Tensor]:
        return self.vlm.pack_image_features(values, image_sizes, self.config.vision_feature_select_strategy,
                                            image_newline=newline)[0]

    def image_token_counts(self, kwargs: dict, visual: torch.Tensor, encoded: list[int] | None) -> list[int]:
        """From the pre-encoded features under generate(); else the model's own packing of the crops."""
        if encoded is not None:
            return encoded
        sizes = kwargs["image_sizes"]
        crops = self._crops(sizes, kwargs)
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        patches = side * side + int(self.has_cls and self.features_keep_cls)      # features per crop
        ones = torch.ones(sum(crops), patches, 1, device=sizes.device)
        return [len(p) for p in self._pack(list(ones.split(crops)), sizes, torch.ones(1, device=sizes.device))]

    def protected(self, features: torch.Tensor) -> torch.Tensor:
        """Newline tokens: the features that are the model's ``image_newline`` vector."""
        return (features == self.vlm.image_newline.to(features.dtype)).all(dim=-1)

    def _sources(self, features: torch.Tensor) -> torch.Tensor:
        """Each packed feature is a copy of one crop patch's projector output (newlines aside): its row in the
        projector output (crops * P), matched by value; -1 for newlines."""
        crops = self.crop_features.to(features.dtype)
        _, ids = torch.unique(torch.cat([crops, features]), dim=0, return_inverse=True)
        source = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long, device=ids.device)
        source[ids[:len(crops)]] = torch.arange(len(crops), device=ids.device)
        index = source[ids[len(crops):]]
        if bool(((index < 0) & ~self.protected(features)).any()):
            raise NotImplementedError(f"vtr: {type(self.model).__name__} resized this image's crop grid "
                                      "(anyres_max); vision-tower scores cannot follow resized features yet")
        return index

    def arrange_scores(self, scores: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """A packed feature takes the score of the crop patch it copies, wherever unpadding moved it."""
        return scores[self._sources(features).clamp(min=0)]

    def anyres_layout(self, features: torch.Tensor, sizes: list[int]) -> dict:
        """Where each packed feature comes from (see ``Signals.layout``). An image's features are its thumbnail's
        patches, then its unpadded grid of crop patches row by row, each row ended by a newline; the crops met in
        the first grid row are the crops per row."""
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        source, newline = self._sources(features), self.protected(features)
        crop, row, col, grids, start = [], [], [], [], 0
        for n in sizes:
            src, nl = source[start:start + n], newline[start:start + n]
            c = src // (side * side)
            c = (c - c[0]).masked_fill(nl, -1)                   # the thumbnail comes first: crop 0
            patch = src % (side * side)
            r, q = (patch // side).masked_fill(c != 0, 0), (patch % side).masked_fill(c != 0, 0)
            grid = c > 0
            if bool(grid.any()):
                g0 = int(grid.nonzero()[0])
                line = torch.cumsum(nl[g0:].long(), 0) - nl[g0:].long()          # the grid row of each token
                starts = torch.cat([line.new_zeros(1), nl[g0:].nonzero()[:, 0] + 1])
                offset = torch.arange(n - g0, device=src.device) - starts[line]
                r[g0:] = torch.where(grid[g0:], line, r[g0:])
                q[g0:] = torch.where(grid[g0:], offset, q[g0:])
                per_row, crops = len(set(c[g0:][grid[g0:] & (line == 0)].tolist())), int(c.max())
                if crops % per_row:
                    raise ValueError("vtr: could not read this image's crop grid from its packed features")
                grids.append((crops // per_row, per_row))
            else:
                grids.append((0, 0))
            crop.append(c), row.append(r), col.append(q)
            start += n
        return {"crop": torch.cat(crop), "row": torch.cat(row), "col": torch.cat(col),
                "grid": torch.tensor(grids, device=source.device), "side": side}


class LlavaOnevisionAdapter(LlavaNextAdapter):
    name = "llava_onevision"

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

    def image_token_counts(self, kwargs: dict, visual: torch.Tensor, encoded: list[int] | None) -> list[int]:
        if kwargs.get("pixel_values_videos") is not None or (kwargs.get("mm_encoder_outputs") or {}).get("video"):
            raise NotImplementedError("vtr: video input to LlavaOnevisionForConditionalGeneration is not reduced yet")
        return super().image_token_counts(kwargs, visual, encoded)

    def _pack(self, values: list[torch.Tensor], image_sizes, newline: torch.Tensor) -> list[torch.Tensor]:
        return self.vlm.pack_image_features(values, image_sizes, image_newline=newline,
                                            vision_aspect_ratio=self.config.vision_aspect_ratio)[0]
