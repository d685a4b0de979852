import copy
import functools

import pytest
import torch

from vtr.plugins import METHODS
from flash_reference import to_flash
from tiny_models import BUILDERS, IMAGE, VIDEO_ARCHS, make_inputs
from tiny_models import split_batch as _split

I = IMAGE
SINGLE = [1, 5, 6, I, 7, 8, 9, 10]
BATCH = [[1, 5, I, 6, 7, I, 8], [1, 9, 10, 11, 12, 13, I, 14, 15, 16, 17, 18]]   # 2 images vs 1, different lengths

torch.set_num_threads(2)


@functools.lru_cache(maxsize=None)
def _model(arch: str, attn: str):
    if attn == "flash_attention_2":               # the same weights, switched to the FA2 path (flash_reference.py)
        return to_flash(BUILDERS[VIDEO_ARCHS.get(arch, arch)]("sdpa"))
    return BUILDERS[VIDEO_ARCHS.get(arch, arch)](attn)


@pytest.fixture(params=sorted(BUILDERS) + sorted(VIDEO_ARCHS))
def arch(request):
    return request.param


ANYRES = ("llava_next", "llava_onevision", "llava_next_video")
APPLIES = {"globalcom2": lambda arch: arch in ANYRES,             # needs a thumbnail plus crops (images)
           "visionzip": lambda arch: arch == "llava",             # where the projector sees one image's patches
           "kcenter": lambda arch: arch == "llava",
           "todre": lambda arch: arch == "llava",                 # its first stage is kcenter
           "prumerge+": lambda arch: arch == "llava",
           "pool": lambda arch: arch not in ANYRES}               # needs one 2-D token grid per image


def applies(model, method: str, video: bool = False) -> bool:
    if video and method == "globalcom2":
        return False
    if "frames" in METHODS[method].needs:              # frames: LLaVA images, Qwen images and videos, LLaVA-OneVision
        arch = model.config.model_type                 # and LLaVA-NeXT-Video videos
        return arch in ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl") or (arch in ANYRES[1:] and video)
    return APPLIES.get(method, lambda arch: True)(model.config.model_type)


@pytest.fixture
def model(arch, request):
    model = _model(arch, "sdpa")
    method = request.node.callspec.params.get("method") if hasattr(request.node, "callspec") else None
    if method is not None and not applies(model, method, video=arch in VIDEO_ARCHS):
        pytest.skip(f"{method} does not apply to {type(model).__name__} (refused: test_api.py)")
    return model


@pytest.fixture
def eager_model(arch):
    return _model(arch, "eager")


@pytest.fixture
def flash_model(arch):
    return _model(arch, "flash_attention_2")


@functools.lru_cache(maxsize=None)
def half_model(arch: str, dtype: torch.dtype):
    """The same weights in half precision: bfloat16 (the GPU benchmark's) or float16 (the llava-hf checkpoints')."""
    return copy.deepcopy(_model(arch, "sdpa")).to(dtype)


@pytest.fixture
def llava():
    """The LLaVA tiny model, for tests of the engine that do not depend on the architecture."""
    return _model("llava", "sdpa")


@pytest.fixture
def llava_single(llava):
    return make_inputs(llava, [SINGLE], seed=1)


@pytest.fixture
def single(model, arch):
    return make_inputs(model, [SINGLE], seed=1, video=arch in VIDEO_ARCHS)


@pytest.fixture
def batch(model, arch):
    return make_inputs(model, BATCH, seed=2, video=arch in VIDEO_ARCHS)


def split_batch(model, batch) -> list[dict]:
    return _split(model, batch, BATCH)


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory):
    """The shipped model's architecture and processor with random weights, saved like a checkpoint."""
    from vtr.eval.train_tiny import build_model, build_processor

    path = tmp_path_factory.mktemp("random-tiny")
    processor = build_processor()
    build_model(processor, seed=1).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def random_qwen_dir(tmp_path_factory):
    """The built-in Qwen2-VL architecture and processor (images and videos) with random weights, saved like a
    checkpoint; skipped without torchvision, which transformers' video processors need."""
    pytest.importorskip("torchvision")
    from vtr.eval.train_tiny import build_model, build_processor

    path = tmp_path_factory.mktemp("random-qwen")
    processor = build_processor("qwen2_vl")
    build_model(processor, seed=1, arch="qwen2_vl").save_pretrained(path)
    processor.save_pretrained(path)
    return path
