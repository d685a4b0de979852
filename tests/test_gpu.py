"""Checks that need a CUDA GPU, skipped elsewhere (``eval/gpu_check.sh`` runs them on a lent machine): the Triton
kernels compiled for the device pick what the fallbacks pick, and on the device the patched model changes nothing at
retain 1.0, is restored by ``remove()`` and computes what the stock modules compute on the pruned sequence, and
in bfloat16 keeps the language model's stream in it.
``VTR_TEST_DEVICE=cpu`` runs the model checks on the CPU, which is how they were written without a GPU."""
import os
import subprocess
import sys

import pytest
import torch

import vtr
from test_contract import input_dtypes
from test_methods import TRITON_KERNELS

DEVICE = os.environ.get("VTR_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_triton_kernels_equal_the_fallbacks_on_the_gpu():
    pytest.importorskip("triton")
    if DEVICE != "cuda":
        pytest.skip("the compiled kernels need CUDA (the CPU runs them in Triton's interpreter: test_methods.py)")
    run = subprocess.run([sys.executable, "-c", TRITON_KERNELS], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "VTR_KERNEL_DEVICE": "cuda"})
    assert run.stdout.strip() == "same", run.stderr[-2000:]


@pytest.mark.parametrize("method", ["random", "fastervlm", "divprune", "vispruner", "fastv", "pdrop", "dart"])
def test_the_patched_model_on_the_device_computes_the_stock_model_on_the_pruned_sequence(method):
    from vtr.eval import bench, bench_models

    model, inputs = bench_models.build("llava", "quick", DEVICE, torch.float32, "sdpa")
    with torch.no_grad():
        stock = model(**inputs).logits
        with vtr.patch(model, method, retain=1.0):
            assert torch.equal(model(**inputs).logits, stock)
        with vtr.patch(model, method, retain=0.25) as handle:
            patched = model(**inputs).logits[:, -1]
            stages = handle._engine.stages
            kept = [bench._kept_positions(model, inputs, handle.kept(stage=s)[0]) for s in range(len(stages))]
        assert torch.equal(model(**inputs).logits, stock)
    assert patched.device.type == torch.device(DEVICE).type and len(kept[-1]) < inputs["input_ids"].shape[1]
    pre = kept[0] if stages[0].layer is None else None
    llm = {stage.layer: k for stage, k in zip(stages, kept) if stage.layer is not None}
    torch.testing.assert_close(bench._ideal_prefill(model, inputs, pre, llm), patched, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["random", "fastv", "vispruner", "pdrop"])
def test_bfloat16_on_the_device(method):
    """The GPU bench's dtype, on the device: retain=1.0 changes no logit, and a patched generate() keeps every
    decoder layer's input in bfloat16."""
    from vtr.adapters import adapter_for
    from vtr.eval import bench_models

    model, inputs = bench_models.build("llava", "quick", DEVICE, torch.bfloat16, "sdpa")
    with torch.no_grad():
        stock = model(**inputs).logits
        with vtr.patch(model, method, retain=1.0):
            assert torch.equal(model(**inputs).logits, stock)
    with input_dtypes(adapter_for(model).decoder_layers) as seen, vtr.patch(model, method, retain=0.25) as handle, \
            torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert handle.stats()[0]["visual_tokens_out"] < handle.stats()[0]["visual_tokens_in"]
    assert seen == {torch.bfloat16} and out.shape[1] > inputs["input_ids"].shape[1]
