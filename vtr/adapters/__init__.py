"""One adapter per architecture: everything model-specific (where the vision tower, projector, decoder layers and image
tokens are, how attention rows are recomputed) lives here; the engine and the methods stay model-agnostic."""
from __future__ import annotations

from .internvl import InternVLAdapter
from .llava import LlavaAdapter, LlavaNextAdapter, LlavaOnevisionAdapter
from .qwen_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter, Qwen3VLAdapter

ADAPTERS = (LlavaAdapter, LlavaNextAdapter, LlavaOnevisionAdapter, Qwen2VLAdapter, Qwen2_5_VLAdapter, Qwen3VLAdapter,
            InternVLAdapter)


def supported_models() -> list[str]:
    return [cls.__name__ for adapter in ADAPTERS for cls in adapter.model_classes()]


def adapter_for(model):
    for adapter in ADAPTERS:
        if isinstance(model, adapter.model_classes()):
            return adapter(model)
    raise TypeError(f"vtr does not support {type(model).__name__}; supported models: {', '.join(supported_models())}")
