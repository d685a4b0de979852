"""What differs between the transformers versions vtr supports (5.20 and later)."""
from __future__ import annotations

import inspect

from transformers.masking_utils import create_causal_mask

# transformers 5.24 renamed the KV cache argument of every forward from past_key_values to cache (the old name warns,
# and goes in 5.40); hooks read it under either name, and vtr passes it under the installed version's.
CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def output_cache(output):
    """The KV cache a forward returned (``output.cache``; ``past_key_values`` before 5.24, a warning after)."""
    return getattr(output, CACHE_ARG)


def cache_of(kwargs: dict):
    """The KV cache a forward's keyword arguments carry, or None."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache
