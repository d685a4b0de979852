"""VisPruner: "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs" (Zhang et al.,
ICCV 2025), the successor of FasterVLM; scores in the vision tower, selects after the projector.

Rule: of a budget of T tokens, T_imp = round(T * r) are the **important** ones, the top [CLS]->patch attention of the
vision feature layer (head mean); the other T - T_imp are **diverse** tokens from the rest: repeatedly split the
remaining tokens (in order) into even and odd ones, score each even token by its highest cosine similarity to the odd
ones, and drop the 8 most duplicated (ties: the earlier), until T - T_imp are left. Similarity is measured on the
projected tokens. Defaults (README): r = 0.75 at 64 tokens (48 + 16), r = 0.5 at 128 (64 + 64); vtr uses 0.75 up to
64 tokens and 0.5 above unless ``important_ratio`` is given. Towers without [CLS] use the adapter's fallback score.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vtr.kernels import duplicate_removal, gather_tokens, true_first

from .base import Plugin, Signals

DROP_PER_ROUND = 8


@dataclass
class VisPruner(Plugin):
    important_ratio: float | None = None

    name = "vispruner"
    summary = "[CLS]-attention important tokens plus diverse ones by repeated duplicate removal, after the projector"
    needs = ("cls_attention",)

    def __post_init__(self):
        super().__post_init__()
        if self.important_ratio is not None and not 0 <= self.important_ratio <= 1:
            raise ValueError(f"VisPruner: important_ratio must be in [0, 1], got {self.important_ratio!r}")

    def select(self, s: Signals, k: int) -> torch.Tensor:
        ratio = self.important_ratio if self.important_ratio is not None else (0.75 if k <= 64 else 0.5)
        important = s.cls_attention.topk(round(k * ratio), dim=-1).indices
        images, tokens = s.tokens.shape[:2]
        rest = torch.ones(images, tokens, dtype=torch.bool, device=s.tokens.device).scatter_(1, important, False)
        rest = true_first(rest)[:, :tokens - important.shape[1]]      # the same count in every image, ascending
        diverse = duplicate_removal(gather_tokens(s.tokens, rest), k - important.shape[1], DROP_PER_ROUND)
        return torch.cat([important, rest.gather(1, diverse)], dim=1)
