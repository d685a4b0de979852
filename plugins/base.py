"""The base every vtr method derives from: a small dataclass that scores or selects visual tokens on plain tensors.

A method never touches the model. The engine (``vtr.engine``) hands it a :class:`Signals` for one stage of the whole
batch and applies what it returns; the adapters know where the model keeps its tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vtr.kernels import group_counts, topk_per_group


def evenly(n: int, k: int, device=None) -> torch.Tensor:
    """k of range(n), evenly spaced: the centres of k equal segments, floor((i + 1/2) n / k)."""
    return ((torch.arange(k, device=device) + 0.5) * n / k).long()


def shares(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal integers, the larger ones first."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def apportion(total: int, sizes: list[int]) -> list[int]:
    """``total`` (at most ``sum(sizes)``) split in proportion to ``sizes`` by largest remainders (ties: the earlier
    part), so the parts add up exactly and none exceeds its size."""
    whole = max(1, sum(sizes))
    parts = [total * n // whole for n in sizes]                    # integers: ties are exact
    for i in sorted(range(len(sizes)), key=lambda i: -(total * sizes[i] % whole))[:total - sum(parts)]:
        parts[i] += 1
    return parts


@dataclass
class Signals:
    """What one stage sees, for the whole batch.

    tokens: projector stage: ``(images, P, D)`` projected features of each image; LLM stage: ``(B, L, D)`` hidden
        states entering the stage's decoder layer.
    cls_attention: ``(images, P)`` [CLS]->patch attention (head mean) of the vision layer the features come from.
    last_attention: ``(B, L)`` attention of the last prompt token (head mean) over the current sequence.
    visual: ``(B, L)`` bool, which positions of ``tokens`` are visual tokens still alive (LLM stage only).
    image_index: index of each image inside its own sample, host ints (projector stage only).
    keys: ``(B, L, Hkv * d)`` the score layer's keys as its attention uses them (per-head norm, RoPE), heads joined;
        LLM stage, for methods that need "keys".
    text: ``(B, L)`` bool, the text (non-image) tokens of the sequence (LLM stage).
    normed: ``(B, L, D)`` ``tokens`` through the language model's final norm (methods that need "final_norm").
    image: ``(V,)`` image index of each entry of ``tokens[visual]``, ascending (images fill the sequence in order)
        (LLM stage).
    positions: ``(B, L)`` original sequence index of each position, -1 for padding (LLM stage).
    token_grid: rows and columns of each image's token grid, host ints (projector stage, methods that need "grid").
    layout: anyres models (LLaVA-NeXT/OneVision), projector stage, for methods that need "anyres_layout": ``crop``
        ``(images, P)`` (0 = the base image / thumbnail, then the grid crops in raster order), ``row``/``col`` (the
        token's place in the thumbnail, or in the image's unpadded grid of crop patches), ``grid`` ``(images, 2)``
        crops per column and per row, ``side`` patches per crop side.
    rater_attention: ``(B, L)`` SparseVLM's scores: the attention its rater tokens pay each token (RoPE, causal
        mask, head mean), averaged over the raters (LLM stage, methods that need "rater_attention").
    text_attention: ``(B, L)`` the same for the text tokens after the image (methods that need "text_attention").
    question_attention: ``(B, L)`` the attention the tokens after the video pay each token, without RoPE or causal
        mask, max over heads and over those queries (LLM stage, methods that need "question_attention").
    frame, patch: ``(V,)`` each visual token's global frame and its place in that frame (LLM stage, methods that
        need "patches").
    state: what a multi-stage LLM method passes from one of its stages to the next, within one prefill.
    visual_rows: ``(V,)`` each visual entry's row in the flattened ``(B * L)`` (LLM stage); ``at_visual`` reads by it.
    counts, budgets: host ints, per image (per frame with ``per_frame``): its visual entries entering the stage, and
        ``k`` (LLM stage): a method that needs them on the host reads them here, not back from the device.
    frames: frames, rows and columns of every image of the call (all alike), host ints (a video's tokens come frame
        after frame, each in raster order; an image is one frame), projector stage, where the adapter knows them.
    """

    tokens: torch.Tensor
    cls_attention: torch.Tensor | None = None
    last_attention: torch.Tensor | None = None
    visual: torch.Tensor | None = None
    image_index: list[int] | None = None
    keys: torch.Tensor | None = None
    text: torch.Tensor | None = None
    normed: torch.Tensor | None = None
    image: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    token_grid: list[tuple[int, int]] | None = None
    layout: dict | None = None
    frames: tuple[int, int, int] | None = None
    question_attention: torch.Tensor | None = None
    frame: torch.Tensor | None = None
    patch: torch.Tensor | None = None
    state: dict | None = None
    rater_attention: torch.Tensor | None = None
    text_attention: torch.Tensor | None = None
    visual_rows: torch.Tensor | None = None
    counts: list[int] | None = None
    budgets: list[int] | None = None

    def rows(self) -> torch.Tensor:
        """``visual_rows``: each visual entry's row of the flattened (B * L), the engine's or found here once."""
        if self.visual_rows is None:
            self.visual_rows = self.visual.flatten().nonzero()[:, 0]
        return self.visual_rows

    def at_visual(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (B, L, ...) at the visual entries, in ``t[visual]``'s order, gathered by ``rows()`` (indexing by the
        mask again would wait for the device each time)."""
        return t.flatten(0, 1).index_select(0, self.rows())

    def host(self, k: torch.Tensor) -> tuple[list[int], list[int]]:
        """(counts, budgets) as host ints: the engine's, or read back where a caller built these signals without
        them."""
        counts = self.counts if self.counts is not None else group_counts(self.image, len(k)).tolist()
        return counts, self.budgets if self.budgets is not None else k.tolist()


@dataclass
class Plugin:
    """A token-reduction method. ``retain`` is the fraction of an image's visual tokens kept after the method's last
    stage; ``budget`` is the number kept per image instead (capped at what the image has). Give at most one; with
    neither, the paper's default applies. A video counts as one image, unless ``per_frame``.
    """

    retain: float | None = None
    budget: int | None = None
    #: videos: each frame is reduced on its own, ``retain``/``budget`` apply per frame (images are one frame)
    per_frame: bool = False

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: "projector": selects on the projector output, before the LLM; "llm": drops inside the decoder.
    where: ClassVar[str] = "projector"
    default_retain: ClassVar[float] = 0.25
    #: signals the engine must compute for this method: "cls_attention", "last_attention".
    needs: ClassVar[tuple[str, ...]] = ()
    #: with neither retain nor budget, the paper's own rule sets how many tokens are kept: ``select`` may return
    #: any number of them (the engine then calls it one image at a time)
    adaptive: ClassVar[bool] = False

    def __post_init__(self):
        if self.retain is not None and self.budget is not None:
            raise ValueError(f"{type(self).__name__}: give retain or budget, not both")
        if self.retain is not None:
            if isinstance(self.retain, bool) or not isinstance(self.retain, (int, float)) or not 0 < self.retain <= 1:
                raise ValueError(f"{type(self).__name__}: retain must be a fraction in (0, 1], got {self.retain!r}")
        if not isinstance(self.per_frame, bool):
            raise ValueError(f"{type(self).__name__}: per_frame must be True or False, got {self.per_frame!r}")
        if self.per_frame and self.where == "encoder":
            raise ValueError(f"{type(self).__name__}: per_frame applies to VLM methods, not encoder-only ones")
        if self.budget is not None:
            if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
                raise ValueError(f"{type(self).__name__}: budget must be an integer >= 1, got {self.budget!r}")

    @property
    def counts_itself(self) -> bool:
        return self.adaptive and self.retain is None and self.budget is None

    @property
    def target_retain(self) -> float:
        return self.retain if self.retain is not None else self.default_retain

    def keep_count(self, n: int) -> int:
        """Tokens of an n-token image kept after the method (at least 1, at most n)."""
        if self.budget is not None:
            return min(n, self.budget)
        return max(1, min(n, int(self.target_retain * n + 0.5)))

    def stage_counts(self, n: int, stages: int = 1) -> list[int]:
        """Tokens of an n-token image kept after each of ``stages`` stages; progressive methods override this."""
        return [self.keep_count(n)]

    def score(self, s: Signals) -> torch.Tensor:
        """Importance of each token, higher is kept first: ``(images, P)`` or ``(B, L)``."""
        raise NotImplementedError(f"{type(self).__name__} defines neither score() nor select()")

    def select(self, s: Signals, k: int) -> torch.Tensor:
        """Projector stage: ``(images, k)`` indices of the kept tokens of each image. Default: top-k of score()."""
        return self.score(s).topk(k, dim=-1).indices

    def pipeline(self) -> list["Plugin"]:
        """The plugins this method runs as, in order: itself, or the stages of a method that acts both before and
        inside the LLM (PruneVid), with the budget split between them."""
        return [self]

    def reduce(self, s: Signals, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Projector stage: the kept indices ``(images, k)``, distinct, and, for methods that merge rather than only
        select, the kept tokens' new values ``(images, k, D)`` in the same order (None: unchanged). Default:
        ``select``."""
        return self.select(s, k), None


@dataclass
class LLMPlugin(Plugin):
    """A method that drops visual tokens inside the language model, at the entrance of some decoder layers."""

    where: ClassVar[str] = "llm"

    def layers(self, num_layers: int) -> list[int]:
        """Decoder layers (0-based) at whose entrance tokens are dropped, ascending, one per stage."""
        raise NotImplementedError

    def score_layer(self, layer: int) -> int:
        """The decoder layer whose q/k projections give the attention row used to drop at ``layer``."""
        return layer

    def stage_needs(self, state: dict) -> tuple[str, ...]:
        """The signals a stage scored with its own layer needs, given what earlier stages left in ``state``."""
        return self.needs

    def finished(self, state: dict) -> bool:
        """Whether, given ``state``, the remaining stages of this forward pass will drop nothing (an adaptive
        method that has stopped early), so the engine skips them."""
        return False

    def keep(self, s: Signals, k: torch.Tensor) -> torch.Tensor:
        """Which of the visual tokens ``s.tokens[s.visual]`` survive, ``k[i]`` of image i: (V,) bool. Default: the
        top ``k`` of ``score()`` per image (ties: earlier first)."""
        return topk_per_group(s.at_visual(self.score(s)).float(), s.image, k)

    def drop(self, s: Signals, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the engine calls: ``keep`` and then ``absorb``, returning (kept (V,) bool, values (V, D) or None);
        methods whose merge depends on how they chose override this instead."""
        kept = self.keep(s, k)
        return kept, self.absorb(s, kept)

    def absorb(self, s: Signals, kept: torch.Tensor) -> torch.Tensor | None:
        """For methods that merge the dropped tokens into the survivors: new hidden states ``(V, D)`` for the visual
        tokens ``s.tokens[s.visual]``, of which only the survivors' rows are read (whole rows: the engine writes them
        by index, not by the ``kept`` mask, which would wait for the device). Default: None (dropped tokens vanish)."""
        return None


@dataclass
class DecodePlugin(Plugin):
    """A method that acts while decoding: at every generated token it chooses which visual entries of the KV cache
    the layers from ``decode_layer`` on may attend to (the cache keeps them all, positions do not change)."""

    where: ClassVar[str] = "decode"

    def decode_layer(self, num_layers: int) -> int:
        """The first layer whose attention skips the hidden entries; the layer before it scores them."""
        raise NotImplementedError

    def visible(self, s: Signals, k: torch.Tensor, state: dict) -> torch.Tensor:
        """Which visual entries ``s.last_attention[s.visual]`` (the new token's attention in the layer before
        ``decode_layer``, head mean) stay visible, ``k[i]`` of image i: (V,) bool. ``state`` persists from step to
        step of one generation."""
        raise NotImplementedError


@dataclass
class EncoderPlugin(Plugin):
    """A method that reduces tokens inside the blocks of an encoder-only ViT (timm, open_clip), between attention and
    MLP; ``retain``/``budget`` count the patch tokens (prefix tokens such as [CLS] are never reduced)."""

    where: ClassVar[str] = "encoder"

    def reductions(self, depth: int, tokens: int) -> list[int]:
        """Tokens removed in each block, for an encoder of ``depth`` blocks with ``tokens`` patch tokens."""
        raise NotImplementedError
