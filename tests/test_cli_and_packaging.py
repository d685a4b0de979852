"""The command line and the installed package, as a user meets them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vtr
from vtr.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_methods_lists_the_registry(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("random", "fastervlm", "divprune", "fastv", "pdrop"):
        assert name in out


def test_demo_image_offline_with_overlay(tmp_path, capsys):
    overlay = tmp_path / "kept.png"
    assert main(["demo", "image", "--method", "divprune", "--budget", "64", "--max-new-tokens", "3",
                 "--overlay", str(overlay)]) == 0
    out = capsys.readouterr().out
    assert "trained on synthetic shapes" in out and "196 in, 64 out" in out
    from PIL import Image

    assert Image.open(overlay).size == (336, 336)


def test_demo_rejects_bad_input(capsys, monkeypatch):
    from vtr import demo

    monkeypatch.setattr(demo, "load_model", lambda *a: pytest.fail("the model was loaded before the method was checked"))
    assert main(["demo", "image", "--method", "nosuch"]) == 2
    assert "unknown method 'nosuch'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "image", "--retain", "1.5"])


def test_demo_video_offline_with_frame_strip(tmp_path, capsys):
    pytest.importorskip("decord")
    strip = tmp_path / "frames.png"
    assert main(["demo", "video", "--method", "framesample", "--budget", "32", "--max-new-tokens", "2",
                 "--overlay", str(strip)]) == 0
    out = capsys.readouterr().out
    assert "UNTRAINED" in out and "8 frames" in out and "129 in, 33 out" in out       # 8 x 16 + the newline
    # framesample: 2 equidistant frames (2 and 6) kept whole, the newline with the last frame
    assert "16->0, 16->0, 16->16, 16->0, 16->0, 16->0, 16->16, 17->1" in out
    from PIL import Image

    assert Image.open(strip).size == (8 * 4 * 24, 4 * 24)


def test_demo_video_rejects_bad_input_before_loading_a_model(tmp_path, capsys, monkeypatch):
    from vtr import builtin, demo

    monkeypatch.setattr(demo, "load_model", lambda *a: pytest.fail("a model was loaded before the input was checked"))
    monkeypatch.setattr(builtin, "tiny_video_model", lambda *a, **k: pytest.fail("a model was built first"))
    assert main(["demo", "video", "--method", "nosuch"]) == 2
    assert "unknown method 'nosuch'" in capsys.readouterr().err
    assert main(["demo", "video", "--video", str(tmp_path / "missing.mp4")]) == 2
    assert "no such video" in capsys.readouterr().err


def test_bench_quick_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--methods", "divprune,fastv", "--retain", "0.25", "--repeats", "1",
                 "--out", str(out), "--plot", str(tmp_path / "bench.png")]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "bench.png").size[0] > 0
    result = json.loads(out.read_text())
    assert [r["method"] for r in result["rows"]] == ["divprune", "fastv"]
    for row in result["rows"]:
        assert row["prefill_s"] > 0 and row["ideal_s"] > 0 and row["analytic_speedup"] > 1
        assert row["decode_tokens_per_s"] > 0 and 0 < row["kv_cache_ratio"] < 1      # fewer tokens cached
        assert row["peak_memory_bytes"] > 0 and row["peak_memory_ratio"] > 0
        assert row["hook_ops"] > 0 and 0 <= row["hook_syncs"] < row["hook_ops"]
        assert row["decode_hook_ops"] > 0 and row["decode_hook_syncs"] == 0     # an unpadded step waits for nothing
    assert result["unpatched_peak_memory_bytes"] > 0
    assert "analytic" in capsys.readouterr().out


def test_bench_on_qwen2_5_vl_says_what_does_not_apply(tmp_path, capsys):
    """A method that refuses the architecture (VisionZip needs a [CLS] token) gets an n/a row, not a crash."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--arch", "qwen2.5-vl", "--quick", "--methods", "visionzip,fastv", "--retain", "0.25",
                 "--repeats", "1", "--out", str(out)]) == 0
    skipped, measured = json.loads(out.read_text())["rows"]
    assert skipped["method"] == "visionzip" and "visionzip" in skipped["skipped"].lower()
    assert measured["analytic_speedup"] > 1 and measured["naive_s"] > 0       # Qwen2.5-VL's vision FLOPs counted
    assert "n/a" in capsys.readouterr().out


@pytest.mark.parametrize("kind", [[], ["--video"]])
def test_bench_refuses_flash_attention_2_on_a_cpu(kind, capsys):
    """Said before a model is built, instead of failing in the first attention call."""
    assert main(["bench", *kind, "--quick", "--attn", "flash_attention_2", "--device", "cpu", "--out", ""]) == 2
    err = capsys.readouterr().err
    assert "flash_attention_2 needs a CUDA device (--device cuda) and the flash-attn package" in err


@pytest.mark.parametrize("kind", [["--arch", "qwen2.5-vl"], ["--video"]])
def test_bench_refuses_a_size_its_model_does_not_have(kind, capsys):
    """cpu-wide (widths / 4) is LLaVA's only."""
    assert main(["bench", *kind, "--size", "cpu-wide", "--out", ""]) == 2
    assert "size 'cpu-wide' is not defined" in capsys.readouterr().err


def test_tensor_peak_counts_the_bytes_held_at_once():
    """A CPU has no allocator statistics; the bench's peak memory there comes from the operators' outputs."""
    from vtr.eval.memory import TensorPeak

    weights = torch.ones(1000)                    # made before the watch: not counted
    with TensorPeak() as watch:
        a = weights * 2                           # 4,000 bytes
        view = a.view(10, 100).t()                # a view and an in-place update: nothing new
        a.add_(1)
        b = a + view.t().flatten()                # 8,000 held
        del a, view
        c = b * 3                                 # a is freed: 8,000 again
        del b, c
        d = torch.empty(500)                      # 2,000, maybe at a freed address
    assert watch.peak == 8000
    assert watch.live == d.untyped_storage().nbytes() == 2000


def test_op_count_counts_launches_and_syncs():
    """What a hook would cost on a GPU, counted on the CPU: operators that launch a kernel, and those that wait."""
    from vtr.eval.launches import OpCount

    x = torch.arange(12.0)
    with OpCount() as count:
        x.view(3, 4).t()[0]                       # views and size queries: no kernel
        x.shape, x.numel()
        y = (x * 2).sum()                         # 2 kernels
        x.add_(1)                                 # in place: a kernel
        y.item()                                  # a kernel that waits
        torch.nonzero(x > 4)                      # 2 kernels, one waits: its output's shape needs the values
        x[x > 4]                                  # so does indexing by a mask (a nonzero inside); not by indices
        x[torch.tensor([0, 2])]
        x[x > 4] = 0                              # a masked fill: no wait
        x[:2].tolist()                            # a copy to the host on a GPU; on a CPU, counted all the same
        x.repeat_interleave(torch.tensor([1] * 12))                  # 2 kernels, one waits: its output's length
        x.repeat_interleave(torch.tensor([1] * 12), output_size=12)  # told the length: no wait
    assert (count.ops, count.syncs) == (16, 5)
    assert "tolist" not in torch.Tensor.__dict__                        # the counting wrapper is gone


def test_watch_hooks_counts_the_hooks_operators_only():
    from vtr.eval.launches import OpCount
    from vtr.hooks import HookSet, watch_hooks

    inner, outer = torch.nn.Linear(4, 4), torch.nn.Identity()
    hooks = HookSet()
    hooks._add(inner, lambda module, args: (args[0] * 2,), with_kwargs=False)      # one kernel per call
    hooks._add(outer, lambda module, args: (inner(args[0]).sum().item(),) and None, with_kwargs=False)  # nests
    x = torch.ones(2, 4)
    try:
        with watch_hooks(OpCount()) as count:
            outer(x)                   # outer's hook: inner's hook (1), the linear inside it (1), sum, item
            inner(x)                   # inner's hook again; the linear itself is not a hook's
        assert (count.ops, count.syncs) == (5, 1)
        inner(x)                       # after the block: nothing counted
        assert count.ops == 5
    finally:
        hooks.remove()
    assert not inner._forward_pre_hooks and not outer._forward_pre_hooks


@pytest.mark.parametrize("method", sorted(m for m, cls in vtr.methods().items() if cls.where in ("projector", "llm")))
def test_hook_syncs_do_not_grow_with_the_images(llava, method):
    """A sample with three images waits for the device as often as one with one: budgets, counts and positions of
    every image come back to the host together, not image by image."""
    from conftest import applies
    from tiny_models import IMAGE, make_inputs
    from vtr.eval.launches import OpCount
    from vtr.hooks import watch_hooks

    if not applies(llava, method):
        pytest.skip(f"{method} does not apply to LLaVA-1.5")
    syncs = []
    for prompt in ([1, 5, IMAGE, 6, 7, 8], [1, 5, IMAGE, 6, IMAGE, 7, IMAGE, 8]):
        inputs = make_inputs(llava, [prompt], seed=3)
        with vtr.patch(llava, method, retain=0.25), torch.no_grad(), watch_hooks(OpCount()) as count:
            llava(**inputs, use_cache=True)
        syncs.append(count.syncs)
    assert syncs[0] == syncs[1]


def test_kernel_bench_quick_writes_json(tmp_path, capsys):
    """Each sequential selection step timed in every implementation the device has (host and PyTorch loops on a
    CPU), all picking the same tokens; the attention row beside the full weights' matrix."""
    out = tmp_path / "kernels.json"
    assert main(["bench", "--kernels", "--quick", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    steps = [r for r in result["rows"] if "same" in r]
    assert {(r["kernel"], r["impl"]) for r in steps} == {("max-min diversity", "numpy"), ("max-min diversity", "torch"),
                                                         ("duplicate removal", "numpy")}
    assert all(r["same"] and r["ms"] > 0 and r["k"] == r["n"] // 4 for r in steps)
    rows = [r for r in result["rows"] if r["kernel"] == "last-query attention"]
    assert [r["n"] for r in rows] == [64, 160] and all(r["full_ms"] > 0 and r["full_bytes"] == r["n"] * r["bytes"]
                                                       for r in rows)
    assert "picks the same" in capsys.readouterr().out


def test_launch_count_prints_operators_and_syncs_per_method(capsys):
    """``python -m vtr.eval.launches``: a projector method waits once per prefill (the prompt's read-back), and
    grouping many frames' clusters costs PruneVid no more launches per frame as frames are added."""
    from vtr.eval.launches import main as launches

    launches(["random", "prunevid", "--frames", "2"])
    launches(["prunevid", "--frames", "6"])
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [(line[0], line[3]) for line in lines] == [("random", "1"), ("prunevid", "4"), ("prunevid", "4")]
    assert int(lines[2][1]) < int(lines[1][1]) + 4 * 5


def test_video_bench_quick_writes_json(tmp_path, capsys):
    out = tmp_path / "bench_video.json"
    assert main(["bench", "--video", "--quick", "--methods", "fastvid,dycoke", "--retain", "0.25", "--repeats", "1",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["visual_tokens"] == 4 * 16 + 1 and [r["method"] for r in result["rows"]] == ["fastvid", "dycoke"]
    for row in result["rows"]:           # 25 % of the 64 frame tokens, plus the newline
        assert row["visual_tokens_out"] == 17 and row["prefill_s"] > 0 and row["analytic_speedup"] > 1
        assert row["ideal_s"] > 0 and row["decode_tokens_per_s"] > 0 and 0 < row["kv_cache_ratio"] < 1
        assert row["peak_memory_bytes"] > 0 and row["peak_memory_ratio"] > 0 and row["hook_ops"] > 0
    reuse = result["frame_reuse"]                      # each frame twice: half of them reach the vision tower
    assert reuse["frames"] == 4 and reuse["encoded"] == 2 and reuse["reuse_s"] > 0
    assert "4 frames" in capsys.readouterr().out


@pytest.mark.parametrize("encoder", ["timm", "open_clip"])
def test_encoder_bench_quick_writes_json(tmp_path, capsys, encoder):
    pytest.importorskip(encoder)
    out = tmp_path / "bench.json"
    assert main(["bench", "--encoder", encoder, "--quick", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["method"] for r in result["rows"]] == ["tome", "tome", "evit"]
    assert all(r["images_per_s"] > 0 and r["tokens_out"] < 16 for r in result["rows"])
    assert "images/s" in capsys.readouterr().out


def test_non_editable_install_imports(tmp_path):
    """``pip install .`` lays plugins/, video/, eval/ and assets/ out as vtr.plugins, vtr.video, vtr.eval, vtr.assets."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True)
    code = ("import vtr, vtr.plugins, vtr.video, vtr.eval.bench, vtr.eval.evaluate, vtr.demo, vtr.builtin; "
            "assert vtr.__file__.startswith(%r), vtr.__file__; "
            "assert {'random', 'fastervlm', 'divprune', 'globalcom2', 'fastv', 'pdrop', 'tome', 'evit', 'dycoke', 'fastvid', 'framesample'} <= "
            "set(vtr.methods()); "
            "vtr.demo.default_example(); "
            "import pathlib; assert all((pathlib.Path(vtr.builtin.shipped_model_path(name)) / 'model.safetensors')"
            ".is_file() for name in vtr.builtin.SHIPPED); "
            "from importlib import resources; assert resources.files('vtr.assets').joinpath('clip.mp4').is_file()"
            % str(target))
    env = {**os.environ, "PYTHONPATH": str(target)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)


@pytest.mark.parametrize("arch", ["llava", "llava-next", "qwen2.5-vl"])
@pytest.mark.parametrize("method", ["random", "fastv"])
def test_the_benchs_ideal_path_gives_the_patched_logits(arch, method):
    """The ideal the benchmark times (stock modules on the pruned sequence, stock positions: M-RoPE for Qwen2.5-VL,
    anyres crops for LLaVA-NeXT) computes what the patched model computes, before the LLM and inside it."""
    from vtr.eval import bench, bench_models

    model, inputs = bench_models.build(arch, "quick")
    with vtr.patch(model, method, retain=0.25) as handle, torch.no_grad():
        patched = model(**inputs).logits[:, -1]
        layer = handle._engine.stages[0].layer
        kept = bench._kept_positions(model, inputs, handle.kept(stage=0)[0])
    assert len(kept) < inputs["input_ids"].shape[1]
    pre, llm = (kept, {}) if layer is None else (None, {layer: kept})
    torch.testing.assert_close(bench._ideal_prefill(model, inputs, pre, llm), patched, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["framesample", "fastv"])
def test_the_video_benchs_ideal_path_gives_the_patched_logits(method):
    from vtr.eval import bench, bench_video

    model, inputs = bench_video.video_model(bench_video.QUICK_SHAPE), bench_video.video_inputs(bench_video.QUICK_SHAPE)
    with vtr.patch(model, method, retain=0.25) as handle, torch.no_grad():
        patched = model(**inputs).logits[:, -1]
        layer = handle._engine.stages[0].layer
        kept = bench._kept_positions(model, inputs, handle.kept(stage=0)[0])
    pre, llm = (kept, {}) if layer is None else (None, {layer: kept})
    torch.testing.assert_close(bench._ideal_prefill(model, inputs, pre, llm), patched, atol=1e-4, rtol=0)


def test_the_benchs_naive_fastv_keeps_what_vtr_keeps(llava, llava_single):
    """The naive reference (eager attention weights) must make the same choice, or its timing compares nothing."""
    from vtr.eval.bench import _naive_fastv_prefill

    with vtr.patch(llava, "fastv", budget=7), torch.no_grad():
        patched = llava(**llava_single).logits[:, -1]
    torch.testing.assert_close(_naive_fastv_prefill(llava, llava_single, 2, 7), patched, atol=1e-4, rtol=0)
    assert llava.config._attn_implementation == "sdpa"                  # switched back


def test_the_benchs_naive_fastervlm_keeps_what_vtr_keeps(llava, llava_single):
    from vtr.eval.bench import _naive_fastervlm_prefill

    with vtr.patch(llava, "fastervlm", budget=5), torch.no_grad():
        patched = llava(**llava_single).logits[:, -1]
    torch.testing.assert_close(_naive_fastervlm_prefill(llava, llava_single, 5), patched, atol=1e-4, rtol=0)
    assert llava.config.vision_config._attn_implementation == "sdpa"
