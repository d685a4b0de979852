"""What the engine knows about a generation: the stages of a patch, the sequence layouts after each drop, and the
record of the current prefill and decode steps (plain data, read by the engine's hooks and the Handle)."""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate

import torch

from vtr.kernels import true_first
from vtr.plugins.base import Plugin


@dataclass
class Stage:
    """One drop point of one plugin. ``layer`` is None for projector stages."""

    plugin: Plugin
    step: int                 # index of this stage among its plugin's stages
    steps: int                # how many stages the plugin has
    layer: int | None = None
    score_layer: int | None = None

    def describe(self) -> dict:
        where = f"llm layer {self.layer}" if self.layer is not None else \
            "vision tower" if self.plugin.where == "encoder" else "projector"
        return {"method": self.plugin.name, "where": where, "layer": self.layer}


@dataclass
class Layout:
    """A (left-padded) sequence layout. ``orig``: original sequence index of each slot, -1 for padding;
    ``slot0``: index of each slot in layout 0 (the sequence the language model receives); ``mask``: ``orig >= 0``,
    kept rather than recomputed (the hooks read it several times per layer); ``full``: the host knows ``mask`` is all
    True (no padding), so the layers' mask needs no check on the device; ``entry_counts``: grouping ("image" or
    "frame") -> droppable visual tokens of each image or frame, host ints, once they have been read back."""

    orig: torch.Tensor
    slot0: torch.Tensor
    mask: torch.Tensor
    src: torch.Tensor | None = None   # index of each slot in the previous layout (None: this is layout 0 unchanged)
    full: bool = False
    entry_counts: dict[str, list[int]] = field(default_factory=dict)

    def compact(self, keep: torch.Tensor, entry_counts: tuple[str, torch.Tensor] | None = None,
                lengths: list[int] | None = None) -> "Layout":
        """The layout of the slots where ``keep`` (B, L), a subset of ``mask``, is True, in order, left-padded again;
        this layout itself where ``keep`` is all of it. One read-back to the host for the new width, whether anything
        was dropped and whether the new layout has padding; ``entry_counts`` (grouping, counts on the device), the
        new layout's visual tokens per image or frame, comes back in the same read-back. ``lengths``: each row's
        count of ``keep``, where the host knows it and that something is dropped (nothing is read back)."""
        b, length = keep.shape
        counts = keep.sum(1)
        if lengths is not None:
            assert entry_counts is None, "counts known on the host go onto the layout directly"
            width, shortest = max(lengths), min(lengths)
        else:
            read = [counts.max(), (keep != self.mask).sum(), counts.min()]
            if entry_counts is not None:
                read.append(entry_counts[1])
            width, dropped, shortest, *entries = torch.cat([t.view(-1) for t in read]).tolist()
            if not dropped:
                if entry_counts is not None:
                    self.entry_counts[entry_counts[0]] = entries
                return self
        slot = keep.cumsum(1) - 1 + (width - counts)[:, None]          # each kept slot's place, right-aligned
        src = torch.zeros(b, width + 1, dtype=torch.long, device=keep.device)   # column ``width``: the dropped
        src.scatter_(1, slot.masked_fill(~keep, width), torch.arange(length, device=keep.device).expand(b, -1))
        src = src[:, :width]
        valid = torch.arange(width, device=keep.device) >= (width - counts)[:, None]
        orig = self.orig.gather(1, src).masked_fill(~valid, -1)
        return Layout(orig=orig, slot0=self.slot0.gather(1, src), mask=valid, src=src, full=shortest == width,
                      entry_counts={entry_counts[0]: entries} if entry_counts is not None else {})


@dataclass
class Record:
    """What the engine knows about the current generation, set at prefill."""

    visual: torch.Tensor            # (B, L) bool: image-token positions of the original sequence
    length: int                     # original prompt length L
    layouts: list[Layout]           # [layout 0, after LLM stage 1, ...]
    per_sample_visual: list[int]    # image tokens per sample
    per_sample_length: list[int]    # tokens per sample, padding left out
    alive: list[torch.Tensor] = field(default_factory=list)    # per stage: (B, L) bool over the original sequence
    positions: torch.Tensor | None = None   # (..., B, L) position ids the language model got (M-RoPE: 3-4 rows)
    protected: torch.Tensor | None = None   # (B, L) bool: visual tokens never dropped (newline tokens)
    injections: list[torch.Tensor] | None = None   # per early layer: (visual tokens, D) features added to its output
    feature_row: torch.Tensor | None = None        # (B, L) row of each image token in ``injections``
    image_local: list[int] = field(default_factory=list)    # index of each image inside its sample
    image_sample: list[int] = field(default_factory=list)   # the sample of each image
    _image_of: torch.Tensor | None = None
    _frame_of: torch.Tensor | None = None
    _patch_of: torch.Tensor | None = None
    _placeholders: torch.Tensor | None = None

    image_sizes: list[int] = field(default_factory=list)   # tokens of each image
    newline_counts: list[int] | None = None    # protected tokens of each image, where the adapter knows them
    frame_grids: list[tuple[int, int, int]] | None = None   # frames, rows, columns of each image (where the
                                                            # adapter knows)
    frame_sizes: list[int] | None = None       # tokens of each frame, image after image (a closing newline counts
                                               # in its video's last frame)
    stage_keep: dict[int, tuple] = field(default_factory=dict)   # plugin id -> (I, stages) tokens kept: host, device
    prefill: bool = True
    # per forward pass
    step_kwargs: dict[tuple, dict] = field(default_factory=dict)   # (layout index, hide) -> rewritten kwargs
    hidden: torch.Tensor | None = None      # decoding: (B, L) visual entries the decode method hides this step
    entry_embeds: torch.Tensor | None = None   # the embeddings entering the language model (layout 0)
    raters: torch.Tensor | None = None      # (B, L) SparseVLM's rater tokens, over the original sequence
    question_width: int | None = None   # most question tokens (after the last image) in a sample: text, never
                                        # dropped, so as many in every layout; raters (a subset) fit in it too
    decode_state: dict = field(default_factory=dict)   # what the decode method keeps from step to step
    decode_entries: tuple | None = None     # decoding: the prompt entries (visual, rows, image, k, counts, budgets)
    plugin_state: dict = field(default_factory=dict)   # id(plugin) -> what its stages pass on, this prefill
    pending: dict[int, tuple[dict, int]] = field(default_factory=dict)  # stage -> (signals, layout index)
    armed: dict[int, tuple] = field(default_factory=dict)   # score layer -> (stage, layout index, cos/sin), until keys
    tail: torch.Tensor | None = None   # decode: (B, t) mask of the tokens after the prompt

    def _over_visual(self, values: torch.Tensor) -> torch.Tensor:
        """(B, L) long: ``values`` at the visual tokens, in sequence order, -1 elsewhere."""
        return torch.full(self.visual.shape, -1, dtype=torch.long, device=self.visual.device).masked_scatter(
            self.visual, values)

    def _numbered(self, sizes: list[int]) -> torch.Tensor:
        """(B, L) long: which run of ``sizes`` visual tokens each visual token is in, -1 elsewhere."""
        device = self.visual.device
        return self._over_visual(torch.arange(len(sizes), device=device).repeat_interleave(
            torch.tensor(sizes, device=device), output_size=sum(sizes)))      # a known size: no read-back

    @property
    def placeholders(self) -> torch.Tensor:
        """(image tokens,) the row of each image token in the flattened (B * L), image after image: ``nonzero``
        without its wait, since the host knows how many there are."""
        if self._placeholders is None:
            self._placeholders = true_first(self.visual.flatten())[:sum(self.image_sizes)]
        return self._placeholders

    @property
    def image_of(self) -> torch.Tensor:
        """(B, L) long: global image index of each image token, -1 elsewhere (made when an in-LLM stage needs it)."""
        if self._image_of is None:
            self._image_of = self._numbered(self.image_sizes)
        return self._image_of

    @property
    def patch_of(self) -> torch.Tensor:
        """(B, L) long: each image token's place in its frame (raster order), -1 elsewhere."""
        if self._patch_of is None:
            device, sizes = self.visual.device, self.frame_sizes
            starts = torch.tensor(list(accumulate(sizes, initial=0))[:-1], device=device)     # host sums
            first = starts.repeat_interleave(torch.tensor(sizes, device=device), output_size=sum(sizes))
            self._patch_of = self._over_visual(torch.arange(sum(sizes), device=device) - first)
        return self._patch_of

    @property
    def frame_of(self) -> torch.Tensor:
        """(B, L) long: global frame index of each image token, -1 elsewhere (per-frame in-LLM stages)."""
        if self._frame_of is None:
            self._frame_of = self._numbered(self.frame_sizes)
        return self._frame_of
