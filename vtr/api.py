"""The public API: ``patch(model, method, retain=..., budget=...)`` -> a :class:`Handle`."""
from __future__ import annotations

import weakref

import torch

from vtr.adapters import adapter_for
from vtr.encoder import EncoderEngine
from vtr.engine import Engine
from vtr.plugins import METHODS, Plugin

_ACTIVE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # model -> its Handle; nothing is set on the model


def methods() -> dict[str, type[Plugin]]:
    """Registered method names -> plugin classes (each has a one-line ``summary``)."""
    return dict(METHODS)


def resolve(method, retain=None, budget=None, options=None) -> list[Plugin]:
    """The plugins ``patch`` would install for these arguments, validated; no model is needed."""
    options = options or {}
    if isinstance(method, (list, tuple)):
        if not method:
            raise ValueError("an empty pipeline reduces nothing")
        if budget is not None or options:
            raise ValueError("for a pipeline give retain= (split over its stages) or configure each plugin object")
        if retain is None:
            return [p for m in method for p in resolve(m)]
        if not all(isinstance(m, str) for m in method):
            raise ValueError("a pipeline retain= is split over method names; plugin objects carry their own")
        Plugin(retain=retain)                                   # validates the fraction
        # the documented split: every stage keeps the same fraction of what reaches it
        return [p for m in method for p in resolve(m, retain ** (1 / len(method)))]
    if isinstance(method, Plugin):
        if retain is not None or budget is not None or options:
            raise ValueError(f"{type(method).__name__} is already configured; set retain/budget on the object")
        return method.pipeline()
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
        try:
            return METHODS[method](retain=retain, budget=budget, **options).pipeline()
        except TypeError as err:
            raise ValueError(f"{method}: {err}") from None
    raise TypeError(f"method must be a name, a Plugin or a list of them, not {type(method).__name__}")


def patch(model: torch.nn.Module, method, retain: float | None = None, budget: int | None = None,
          reuse_frames: float | None = None, **options) -> "Handle":
    """Reduce the visual tokens ``model`` processes, by forward hooks on its stock modules, until ``remove()``.

    ``method``: a registered name (see :func:`methods`), a plugin object, or a list of them run in order (vision
    encoder -> projector output -> LLM layers); a ``retain`` given to a list of names is split evenly: each stage
    keeps ``retain ** (1 / stages)`` of what reaches it. ``retain``: fraction of each image's visual tokens kept;
    ``budget``: visual tokens kept per image. ``model`` is a supported VLM or an encoder-only ViT (timm, open_clip;
    encoder methods such as ``tome``). ``reuse_frames``: a threshold; a video frame (or image crop) whose pixels
    differ from the last encoded one by at most this mean absolute difference (in the processor's units) skips the
    vision tower and reuses that one's features (LLaVA-family towers; 0 reuses exact repeats only). Everything is
    validated before the model is touched.
    """
    adapter = adapter_for(model)
    _check_one_device(model)
    plugins = resolve(method, retain, budget, options)
    if adapter.kind == "encoder":
        if reuse_frames is not None:
            raise ValueError("reuse_frames applies to VLMs, not encoder-only ViTs")
        engine = EncoderEngine(adapter, plugins)
    else:
        engine = Engine(adapter, plugins, reuse_frames)
    if model in _ACTIVE:
        raise RuntimeError("this model is already patched by vtr; call remove() on its handle first")
    engine.install()
    handle = Handle(model, engine)
    _ACTIVE[model] = handle
    return handle


def _check_one_device(model: torch.nn.Module):
    """A generation's index tensors (masks, layouts, positions) live on one device, where every hook expects them; a
    model spread over several devices (accelerate's ``device_map`` over GPUs, offloading, modules moved by hand) would
    meet them on another. Refused until that is supported and tested on such a machine."""
    mapped = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
    placed = {str(p.device) for p in model.parameters()}
    spread = mapped if len(mapped) > 1 else placed
    if len(spread) > 1:
        raise ValueError(f"the model is spread over several devices ({', '.join(sorted(spread))}); vtr needs it on "
                         "one: load it with device_map={'': 0} (or \"cuda\"), or move it with model.to(device)")


class Handle:
    """The result of :func:`patch`: inspects the last prefill and undoes the patch. Also a context manager."""

    def __init__(self, model, engine: Engine):
        self._model = weakref.ref(model)
        self._engine = engine

    @property
    def plugins(self) -> list[Plugin]:
        return list(self._engine.plugins)

    @property
    def active(self) -> bool:
        return bool(self._engine.hooks)

    def kept(self, stage: int = -1) -> list[torch.Tensor]:
        """Per sample: indices (ascending) of its visual tokens that survive ``stage`` (default: the last stage).
        Visual tokens are numbered in sequence order over all images of the sample."""
        return self._engine.kept(stage)

    @property
    def encoder_inputs(self) -> tuple[int, int]:
        """(inputs the vision tower encoded, inputs it was given) in the last vision pass, under ``reuse_frames``."""
        return tuple(self._engine.encoder_inputs)

    def frame_grids(self) -> list[list[int]]:
        """[frames, rows, columns] of each image or video of the last prefill, in order (an image is one frame)."""
        return self._engine.frame_grids()

    def positions(self) -> torch.Tensor:
        """(B, L') original sequence index of each position of the language model's output (-1 for padding)."""
        return self._engine.positions()

    def stats(self) -> list[dict]:
        """Per sample: tokens in and out, retention, each stage's counts, and the layer-averaged retention (what
        FLOPs follow)."""
        return self._engine.stats()

    def remove(self):
        """Take every hook off; the model is exactly what it was before :func:`patch`."""
        self._engine.remove()
        model = self._model()
        if model is not None and _ACTIVE.get(model) is self:
            del _ACTIVE[model]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def __repr__(self):
        names = "+".join(p.name for p in self._engine.plugins)
        return f"<vtr.Handle {names} {'active' if self.active else 'removed'}>"
