"""Encoder-only ViTs: timm's ``VisionTransformer`` and open_clip's ``VisionTransformer`` (``model.visual``), for
classification and image embeddings. Methods reduce tokens between a block's attention and its MLP; the adapter says
where the block's keys/queries, MLP input and MLP output are, and how to pass an additive attention bias.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn


def _optional(module: str, name: str) -> tuple[type, ...]:
    """(the class,) when its package is installed, else () (timm and open_clip are optional extras)."""
    try:
        return (getattr(importlib.import_module(module), name),)
    except ImportError:
        return ()


class TimmViTAdapter:
    name = "timm"
    kind = "encoder"
    bias_kwarg = "attn_mask"           # the keyword of ``bias_target`` that takes an additive attention bias

    @staticmethod
    def model_classes():
        return _optional("timm.models.vision_transformer", "VisionTransformer")

    def __init__(self, model):
        self.model = model
        self.blocks = list(model.blocks)
        self.prefix = model.num_prefix_tokens
        self.has_cls = bool(getattr(model, "has_class_token", self.prefix > 0))

    def qk_source(self, block) -> tuple[nn.Module, bool]:
        """(module, post): a forward hook on the fused qkv projection sees the block's queries and keys."""
        return block.attn.qkv, True

    def queries_keys(self, block, args, output) -> tuple[torch.Tensor, torch.Tensor]:
        attn = block.attn
        b, n = output.shape[:2]
        q, k, _ = output.view(b, n, 3, attn.num_heads, attn.head_dim).unbind(2)
        return attn.q_norm(q.transpose(1, 2)).transpose(1, 2), attn.k_norm(k.transpose(1, 2)).transpose(1, 2)

    def scale(self, block) -> float:
        return block.attn.scale

    def mlp_input(self, block) -> nn.Module:
        return block.norm2

    def mlp_output(self, block) -> nn.Module:
        return block.ls2

    def takes_bias(self) -> bool:
        """Whether the attention adds a float mask to its logits (timm and open_clip call PyTorch's SDPA with it)."""
        return True

    def bias_target(self, block) -> nn.Module:
        """The module whose ``attn_mask`` keyword takes an additive (B, 1, 1, N) bias."""
        return block.attn

    def bias(self, log_size: torch.Tensor, heads: int) -> torch.Tensor:
        return log_size[:, None, None, :]

    def heads(self, block) -> int:
        return block.attn.num_heads


class OpenClipViTAdapter(TimmViTAdapter):
    name = "open_clip"

    @staticmethod
    def model_classes():
        return _optional("open_clip.transformer", "VisionTransformer")

    def __init__(self, model):
        if not model.transformer.batch_first:
            raise TypeError("vtr supports open_clip towers with batch_first=True (open_clip >= 2.24)")
        self.model = model
        self.blocks = list(model.transformer.resblocks)
        self.has_cls, self.prefix = True, 1          # open_clip always prepends a class embedding

    def qk_source(self, block) -> tuple[nn.Module, bool]:
        """nn.MultiheadAttention projects q/k/v with one fused weight and no submodule: a pre-hook on it sees the
        block's normalised input, and the q/k projections are applied to it."""
        return block.attn, False

    def queries_keys(self, block, args, output) -> tuple[torch.Tensor, torch.Tensor]:
        attn = block.attn
        x = args[0]
        d = attn.embed_dim
        q = F.linear(x, attn.in_proj_weight[:d], attn.in_proj_bias[:d] if attn.in_proj_bias is not None else None)
        k = F.linear(x, attn.in_proj_weight[d:2 * d], attn.in_proj_bias[d:2 * d] if attn.in_proj_bias is not None
                     else None)
        b, n = x.shape[:2]
        return q.view(b, n, attn.num_heads, -1), k.view(b, n, attn.num_heads, -1)

    def scale(self, block) -> float:
        return (block.attn.embed_dim // block.attn.num_heads) ** -0.5

    def mlp_input(self, block) -> nn.Module:
        return block.ln_2

    def mlp_output(self, block) -> nn.Module:
        return block.ls_2

    def bias_target(self, block) -> nn.Module:
        return block

    def bias(self, log_size: torch.Tensor, heads: int) -> torch.Tensor:
        """nn.MultiheadAttention takes a float mask of (B * heads, N, N)."""
        b, n = log_size.shape
        return log_size[:, None, None, :].expand(b, heads, n, n).reshape(b * heads, n, n)


class VisionTowerAdapter(TimmViTAdapter):
    """A VLM's CLIP/SigLIP vision tower (LLaVA-1.5), as an encoder for encoder methods (ToMe, EViT) that the VLM
    engine runs inside it, up to the layer the features come from."""
    name = "vision_tower"
    bias_kwarg = "attention_mask"

    def __init__(self, tower: nn.Module, layers: list, has_cls: bool):
        self.model, self.blocks = tower, layers
        self.has_cls, self.prefix = has_cls, int(has_cls)

    def qk_source(self, block) -> tuple[nn.Module, bool]:
        return block.self_attn.k_proj, True

    def takes_bias(self) -> bool:
        """flash_attention_2 reads a mask as padding and has no way to add a bias; eager and sdpa add it."""
        return self.model.config._attn_implementation in ("eager", "sdpa")

    def queries_keys(self, block, args, output) -> tuple[torch.Tensor, torch.Tensor]:
        attn = block.self_attn
        b, n = output.shape[:2]
        q = attn.q_proj(args[0]).view(b, n, attn.num_heads, attn.head_dim)      # the k projection's input is normed
        return q, output.view(b, n, attn.num_heads, attn.head_dim)

    def scale(self, block) -> float:
        return block.self_attn.scale

    def mlp_input(self, block) -> nn.Module:
        return block.layer_norm2

    def mlp_output(self, block) -> nn.Module:
        return block.mlp

    def bias_target(self, block) -> nn.Module:
        return block.self_attn

    def heads(self, block) -> int:
        return block.self_attn.num_heads
