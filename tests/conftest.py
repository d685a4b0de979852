import functools

import pytest
import torch

from vtr.builtin import IMAGE_TOKEN_ID, llava_inputs, tiny_llava

I = IMAGE_TOKEN_ID
SINGLE = [1, 5, 6, I, 7, 8, 9, 10]
BATCH = [[1, 5, I, 6, 7, I, 8], [1, 9, 10, 11, 12, 13, I, 14, 15, 16, 17, 18]]   # 2 images vs 1, different lengths

torch.set_num_threads(2)


@functools.lru_cache(maxsize=None)
def _model(arch: str, attn: str):
    assert arch == "llava"
    return tiny_llava(seed=0, attn_implementation=attn)


@pytest.fixture(params=["llava"])
def arch(request):
    return request.param


@pytest.fixture
def model(arch):
    return _model(arch, "sdpa")


@pytest.fixture
def eager_model(arch):
    return _model(arch, "eager")


@pytest.fixture
def single(model):
    return llava_inputs(model, [SINGLE], seed=1)


@pytest.fixture
def batch(model):
    return llava_inputs(model, BATCH, seed=2)


def split_batch(model, batch) -> list[dict]:
    """Each sample of a llava_inputs batch on its own, unpadded, with its own images."""
    out, first = [], 0
    for prompt in BATCH:
        n = prompt.count(I)
        single = llava_inputs(model, [prompt])
        single["pixel_values"] = batch["pixel_values"][first:first + n]
        first += n
        out.append(single)
    return out


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory):
    """The shipped model's architecture and processor with random weights, saved like a checkpoint."""
    from vtr.eval.train_tiny import build_model, build_processor

    path = tmp_path_factory.mktemp("random-tiny")
    processor = build_processor()
    build_model(processor, seed=1).save_pretrained(path)
    processor.save_pretrained(path)
    return path
