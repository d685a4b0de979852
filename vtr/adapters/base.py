"""What every adapter shares: the decoder side of a Llama/Qwen-family language model (pre-norm layers with
``self_attn.{q,k}_proj``, optional per-head q/k norms, RoPE cos/sin handed to each layer).

``Adapter.__init__`` finds ``vlm`` (the module whose forward receives input_ids, pixel values, masks and the cache),
``language_model``, ``decoder_layers``, ``text_config`` and ``image_token_id``; each adapter adds ``vision_model`` and
``feature_layer`` (hooked for [CLS]-attention methods) and implements ``image_token_counts``, ``score_projections``
and ``cls_attention``.
"""
from __future__ import annotations

import torch
from torch import nn

from vtr.kernels import apply_rope, attention_rows, query_rows


class Adapter:
    name = ""
    kind = "vlm"
    #: (module, forward hook) pairs to install with the vision hooks of CLS-attention methods
    vision_output_hooks: list = []
    #: whether ``token_grids`` knows each image's 2-D token grid
    has_token_grid = False
    #: whether ``frame_grids`` knows each image's or video's frames (per-frame and temporal methods)
    has_frames = False
    #: whether the vision tower takes one pixel tensor per frame or crop, so ``reuse_frames`` can skip repeats
    reuses_frames = False
    #: whether some image placeholders hold tokens that are never dropped (``protected``)
    newline_tokens = False
    #: how many first decoder layers get visual features added to their output (Qwen3-VL's DeepStack); 0: none
    injection_layers = 0

    @staticmethod
    def model_classes() -> tuple[type, ...]:
        raise NotImplementedError

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        """The placeholder ids whose tokens the engine reduces."""
        return (self.image_token_id,)

    def __init__(self, model):
        """The language-model side every ``*ForConditionalGeneration`` VLM shares: ``model.model`` receives the
        inputs and holds ``language_model``."""
        self.model = model
        self.config = model.config
        self.vlm = model.model                        # receives input_ids, pixel values, masks, cache
        self.language_model: nn.Module = self.vlm.language_model
        self.decoder_layers = list(self.language_model.layers)
        self.text_config = self.language_model.config
        self.image_token_id = self.config.image_token_id

    def _feature_layer(self, encoder_layers) -> nn.Module:
        """The encoder layer whose output is ``hidden_states[vision_feature_layer]`` (hidden_states[0] is the
        embedding output, hidden_states[i] the output of layer i - 1)."""
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise TypeError("vtr supports one vision_feature_layer, not a list of them")
        return encoder_layers[len(encoder_layers) + layer if layer < 0 else layer - 1]

    def image_token_counts(self, kwargs: dict, visual: torch.Tensor, encoded: dict) -> list[int]:
        """Tokens of each image (or video) of the batch, in placeholder order, from the forward kwargs of ``vlm``;
        ``visual``: (B, L) bool, the placeholders of input_ids; ``encoded``: modality -> feature counts of a vision
        pass that ran before the forward (generate()); empty when none did."""
        raise NotImplementedError

    def protected(self, features: torch.Tensor) -> torch.Tensor:
        """(features,) bool over the batch's visual features (as placed in the language model's input), True for
        those never dropped (LLaVA-NeXT's newline tokens); called only when ``newline_tokens``."""
        raise NotImplementedError

    #: per image of the last ``image_token_counts``: how many of its tokens ``protected`` flags, where the host knows
    #: (None: the engine counts them on the device)
    newline_counts: list[int] | None = None

    def arrange_scores(self, scores: torch.Tensor, features: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """``cls_attention``'s output laid out like ``features`` (one score per feature; ``sizes``: features per
        image)."""
        return scores

    def token_grids(self, sizes: list[int]) -> list[tuple[int, int]]:
        """Rows and columns of each image's token grid (valid after the vision tower ran)."""
        raise NotImplementedError

    def frame_grids(self, sizes: list[int]) -> list[tuple[int, int, int]]:
        """Frames, rows and columns of each image's or video's tokens, which come frame after frame in raster order
        (an image is one frame); tokens beyond ``t * h * w`` are protected ones (a closing newline)."""
        return [(1, h, w) for h, w in self.token_grids(sizes)]

    def begin_vision(self, args: tuple, kwargs: dict):
        """Called before the vision model runs (for methods that need [CLS] attention, grids or frames)."""

    def repeat_images(self, source: list[int]):
        """generate() repeated encoded images (num_beams > 1): what the adapter kept per image of the vision pass,
        re-laid for the images the language model receives, image j being encoded image ``source[j]``."""

    def score_projections(self) -> tuple[nn.Module, ...]:
        """The modules of ``feature_layer`` whose outputs (its queries and keys) ``cls_attention`` reads, in the order
        it takes them."""
        raise NotImplementedError

    def cls_attention(self, layer: nn.Module, args: tuple, kwargs: dict, projected: tuple) -> torch.Tensor:
        """Importance scores from ``feature_layer``'s attention, flat, computed after the layer ran from its inputs
        (``args``, ``kwargs``) and the outputs of its ``score_projections`` (``projected``): the queries and keys are
        the layer's own, not computed again. ``arrange_scores`` lays them out like the features."""
        raise NotImplementedError

    def take_injections(self, kwargs: dict) -> list[torch.Tensor] | None:
        """The features the language model would add after its first ``injection_layers`` layers, one
        (visual tokens, D) tensor per layer in placeholder order, taken out of the language model's ``kwargs`` so the
        engine adds them itself to the tokens that are still there."""
        return None

    # ------------------------------------------------------------------ decoder side (Llama / Qwen family)
    def attention_input(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """What the layer's attention projections receive: its input norm applied to the hidden states."""
        return layer.input_layernorm(hidden)

    def key_projection(self, layer: nn.Module) -> nn.Module:
        """The module whose output is the layer's keys before norm and RoPE; hooked to reuse them, not recompute."""
        return layer.self_attn.k_proj

    def last_token_attention(self, layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             key_mask: torch.Tensor, keys: torch.Tensor | None = None,
                             past: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the last position (the last prompt token under left padding) in a decoder layer, from the
        layer's own q/k projections, q/k norms and RoPE, head mean: (B, L). ``x`` is the attention input
        (``attention_input``); ``keys`` the layer's own k projection of it when a hook caught it, else recomputed;
        ``past``: the layer's cached keys (B, Hkv, T, d), which come first (decoding).
        cos/sin are what the layer receives (for M-RoPE models already composed from the three position axes)."""
        attn = layer.self_attn
        b, d = x.shape[0], attn.head_dim
        q = attn.q_proj(x[:, -1:]).view(b, 1, -1, d)
        if hasattr(attn, "q_norm"):                       # Qwen3-style per-head norms before RoPE
            q = attn.q_norm(q)
        q = apply_rope(q.transpose(1, 2), cos[:, -1:], sin[:, -1:])
        k = self.rotated_keys(layer, attn.k_proj(x) if keys is None else keys, cos, sin)
        if past is not None:
            k = torch.cat([past.to(k.dtype), k], dim=2)
        return attention_rows(q, k, attn.scaling, key_mask)[:, 0]

    def rater_attention(self, layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        key_mask: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor | None = None,
                        width: int | None = None) -> torch.Tensor:
        """The attention rows of the ``queries`` positions (B, L) bool, as the layer computes them (q/k norms, RoPE,
        causal mask), head mean, averaged over those queries: (B, L) (SparseVLM's raters, ToDRE's text tokens).
        ``width``: at least the largest count of queries in a sample, where the caller knows it."""
        attn = layer.self_attn
        b, d = x.shape[0], attn.head_dim
        order, valid = query_rows(queries, width)
        pick = lambda t: t.expand(b, -1, -1).gather(1, order[..., None].expand(-1, -1, t.shape[-1]))   # noqa: E731
        q = attn.q_proj(pick(x)).view(b, order.shape[1], -1, d)
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
        q = apply_rope(q.transpose(1, 2), pick(cos), pick(sin))
        k = self.rotated_keys(layer, attn.k_proj(x) if keys is None else keys, cos, sin)
        rows = attention_rows(q, k, attn.scaling, key_mask, query_slots=order)
        return rows.masked_fill(~valid[..., None], 0).sum(1) / valid.sum(1).clamp(min=1)[:, None]

    def question_attention(self, layer: nn.Module, x: torch.Tensor, queries: torch.Tensor, key_mask: torch.Tensor,
                           keys: torch.Tensor | None = None, width: int | None = None) -> torch.Tensor:
        """PruneVid's scores: the attention of the ``queries`` positions (B, L) bool, from the layer's q/k projections
        (and q/k norms) without RoPE and without the causal mask, max over heads, then max over the queries: (B, L).
        ``x`` is the attention input; ``keys`` the layer's own k projection when a hook caught it."""
        attn = layer.self_attn
        b, d = x.shape[0], attn.head_dim
        order, valid = query_rows(queries, width)
        q = attn.q_proj(x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))).view(b, order.shape[1], -1, d)
        k = (attn.k_proj(x) if keys is None else keys).view(b, x.shape[1], -1, d)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        rows = attention_rows(q.transpose(1, 2), k.transpose(1, 2), attn.scaling, key_mask, heads="max")
        return rows.masked_fill(~valid[..., None], 0).amax(dim=1)

    def rotated_keys(self, layer: nn.Module, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The layer's keys as its attention uses them: the k projection (B, L, Hkv * d) through the per-head norm
        (Qwen3) and RoPE: (B, Hkv, L, d)."""
        attn = layer.self_attn
        k = keys.view(*keys.shape[:2], -1, attn.head_dim)
        if hasattr(attn, "k_norm"):
            k = attn.k_norm(k)
        return apply_rope(k.transpose(1, 2), cos, sin)
