"""One adapter per architecture: everything model-specific (where the vision tower, projector, decoder layers and image
tokens are, how attention rows are recomputed) lives here; the engine and the methods stay model-agnostic."""
from __future__ import annotations

from .internvl import InternVLAdapter
from .llava import LlavaAdapter, LlavaNextAdapter, LlavaNextVideoAdapter, LlavaOnevisionAdapter
from .qwen_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter, Qwen3VLAdapter
from .vit import OpenClipViTAdapter, TimmViTAdapter

ADAPTERS = (LlavaAdapter, LlavaNextAdapter, LlavaNextVideoAdapter, LlavaOnevisionAdapter, Qwen2VLAdapter,
            Qwen2_5_VLAdapter, Qwen3VLAdapter, InternVLAdapter, TimmViTAdapter, OpenClipViTAdapter)


def _label(cls) -> str:
    """transformers classes by name; timm and open_clip (both call theirs VisionTransformer) with their package."""
    package = cls.__module__.split(".")[0]
    return cls.__name__ if package == "transformers" else f"{package}.{cls.__name__}"


def supported_models(kind: str | None = None) -> list[str]:
    """The supported model classes (``kind``: "vlm" or "encoder" for one kind only); timm's and open_clip's ViTs are
    listed when those packages are installed."""
    return [_label(cls) for adapter in ADAPTERS if kind in (None, adapter.kind) for cls in adapter.model_classes()]


def adapter_for(model):
    for adapter in ADAPTERS:
        if isinstance(model, adapter.model_classes()):
            return adapter(model)
    raise TypeError(f"vtr does not support {type(model).__name__}; supported models: {', '.join(supported_models())}")
