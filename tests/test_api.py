"""The public API: validation before anything is touched, budgets, pipelines, the handle."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import vtr
from vtr.plugins import VLM_METHODS, DivPrune, FastV, PyramidDrop, ToMe

from conftest import BATCH, applies
from test_contract import hooks_on
from tiny_models import VIDEO_ARCHS, anyres_newlines, make_inputs


@pytest.mark.parametrize("kwargs,message", [
    ({"retain": 0}, "retain"), ({"retain": 1.5}, "retain"), ({"retain": -0.1}, "retain"),
    ({"retain": "half"}, "retain"), ({"budget": 0}, "budget"), ({"budget": 2.5}, "budget"),
    ({"retain": 0.5, "budget": 8}, "not both"), ({"layer": 99}, "layer 99"), ({"colour": 1}, "colour"),
])
def test_bad_arguments_are_rejected_before_the_model_is_touched(model, kwargs, message):
    before = hooks_on(model)
    with pytest.raises(ValueError, match=message):
        vtr.patch(model, "fastv", **kwargs)
    assert hooks_on(model) == before


def test_unknown_method_names_the_choices(model):
    with pytest.raises(ValueError, match="unknown method 'fastvv'.*divprune"):
        vtr.patch(model, "fastvv")


def test_unsupported_model_is_a_type_error_listing_the_supported_ones():
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=50))
    with pytest.raises(TypeError, match="LlamaForCausalLM.*LlavaForConditionalGeneration.*Qwen2VLFor"):
        vtr.patch(lm, "fastv")
    assert hooks_on(lm) == 0


def test_a_model_spread_over_devices_is_refused_before_it_is_touched(llava):
    """accelerate's device_map over two GPUs, or parameters left on two devices: refused, naming them; one device in
    the map is accepted."""
    before = hooks_on(llava)
    llava.hf_device_map = {"model.vision_tower": 0, "model.multi_modal_projector": 0, "model.language_model": 1}
    try:
        with pytest.raises(ValueError, match=r"spread over several devices \(0, 1\).*device_map=\{'': 0\}"):
            vtr.patch(llava, "fastv", retain=0.25)
        assert hooks_on(llava) == before
        llava.hf_device_map = {"": 0}
        vtr.patch(llava, "fastv", retain=0.25).remove()
    finally:
        del llava.hf_device_map
    split = copy.deepcopy(llava)
    split.lm_head.to("meta")
    with pytest.raises(ValueError, match=r"several devices \(cpu, meta\)"):
        vtr.patch(split, "fastv", retain=0.25)
    assert hooks_on(split) == before


def test_batch_without_images_is_refused_before_any_layer_runs(model, single):
    ran = []
    probe = model.model.language_model.register_forward_pre_hook(lambda *a: ran.append(1))
    try:
        with vtr.patch(model, "divprune", retain=0.5):
            text = {"input_ids": torch.tensor([[1, 5, 6, 7]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
            with pytest.raises(ValueError, match="no images"):
                model(**text)
    finally:
        probe.remove()
    assert not ran


def test_a_static_cache_is_refused_before_anything_runs(model, single):
    """generate(cache_implementation="static") gives every layer fixed slots, which the shorter sequences cannot fill;
    refused by name at the forward pass's start (it used to fail deep inside with a shape error)."""
    ran = []
    probe = model.model.get_input_embeddings().register_forward_pre_hook(lambda *a: ran.append(1))
    try:
        with vtr.patch(model, "fastv", retain=0.5):
            with pytest.raises(ValueError, match=r"StaticCache \(StaticLayer layers\).*default dynamic cache"):
                model.generate(**single, max_new_tokens=2, do_sample=False, cache_implementation="static")
    finally:
        probe.remove()
    assert not ran


@pytest.mark.parametrize("method", ["random", "fastv", "fastervlm", "visionzip"])
def test_beam_search_keeps_what_greedy_keeps(model, arch, batch, method):
    """generate(num_beams=2) encodes each image once and repeats its features for the beams; the vision pass's own
    signals ([CLS] scores, crops, Qwen's grids) are traced to the copies: retain=1.0 gives the stock beams, and each
    beam keeps the tokens a greedy run keeps for its sample. Images encoded as one tensor (InternVL's tiles, LLaVA's
    videos) cannot be traced: a method that reads [CLS] scores is refused by name there."""
    if not applies(model, method, video=arch in VIDEO_ARCHS):
        pytest.skip(f"{method} does not apply to {type(model).__name__}")
    beams = dict(max_new_tokens=3, do_sample=False, num_beams=2)
    refused = method == "fastervlm" and arch in ("internvl", "llava_next_video_video", "llava_onevision_video")
    with torch.no_grad():
        stock = model.generate(**batch, **beams)
    for retain in (1.0, 0.25):
        with vtr.patch(model, method, retain=retain) as handle, torch.no_grad():
            model.generate(**batch, max_new_tokens=1, do_sample=False)
            greedy = handle.kept()
            if refused:
                with pytest.raises(RuntimeError, match="num_beams or num_return_sequences > 1"):
                    model.generate(**batch, **beams)
                continue
            out = model.generate(**batch, **beams)
            kept = handle.kept()
        assert all(torch.equal(kept[2 * b + beam], greedy[b]) for b in range(2) for beam in range(2))
        if retain == 1.0:
            assert torch.equal(out, stock)
        else:
            assert len(greedy[0]) < handle.stats()[0]["visual_tokens_in"]


def test_beam_search_traces_merges_in_the_vision_tower(llava):
    """ToMe in LLaVA-1.5's tower, alone and before FastV: each beam keeps what a greedy run keeps for its sample."""
    batch = make_inputs(llava, BATCH, seed=2)
    for method in (ToMe(r=4), [ToMe(r=4), FastV(retain=0.5)]):
        with vtr.patch(llava, method) as handle, torch.no_grad():
            llava.generate(**batch, max_new_tokens=1, do_sample=False)
            greedy = handle.kept()
            llava.generate(**batch, max_new_tokens=3, do_sample=False, num_beams=2)
            kept = handle.kept()
        assert all(torch.equal(kept[2 * b + beam], greedy[b]) for b in range(2) for beam in range(2))


def test_caches_vtr_accepts():
    """Dynamic caches; a sliding window (Mistral's default 4,096) while the prompt fits in it, where it holds every
    token; a static one never."""
    from transformers import DynamicCache, MistralConfig, StaticCache

    from vtr.engine import _check_cache

    config = MistralConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                           sliding_window=16)
    _check_cache(DynamicCache(config=LlamaConfig(num_hidden_layers=2)), 10_000)
    _check_cache(DynamicCache(config=config), 16)
    with pytest.raises(ValueError, match="prompt of 17 tokens is longer than the model's sliding window \\(16\\)"):
        _check_cache(DynamicCache(config=config), 17)
    with pytest.raises(ValueError, match="StaticCache"):
        _check_cache(StaticCache(config=config, max_cache_len=32), 8)


def test_patching_twice_is_an_error_and_remove_allows_again(model):
    handle = vtr.patch(model, "fastv")
    try:
        with pytest.raises(RuntimeError, match="already patched"):
            vtr.patch(model, "divprune")
    finally:
        handle.remove()
    vtr.patch(model, "divprune").remove()


def test_budget_larger_than_the_image_keeps_everything(model, single):
    with torch.no_grad():
        reference = model(**single).logits
        with vtr.patch(model, "divprune", budget=10_000) as handle:
            assert torch.equal(model(**single).logits, reference)
    assert handle.stats()[0]["retention"] == 1.0


@pytest.mark.parametrize("method", VLM_METHODS)
def test_budget_is_tokens_per_image(model, batch, method):
    with vtr.patch(model, method, budget=9) as handle, torch.no_grad():
        model(**batch)
    newlines = [0, 0]                    # LLaVA-NeXT/OneVision keep their newline tokens on top of the budget
    if "image_sizes" in batch:
        per_image = [int(n.sum()) for n in anyres_newlines(model, batch)]
        newlines = [per_image[0] + per_image[1], per_image[2]]
    elif model.config.model_type == "llava_onevision":             # a OneVision video ends with one newline
        newlines = [2, 1]
    assert [len(k) for k in handle.kept()] == [18 + newlines[0], 9 + newlines[1]]          # two images, then one


def test_pipeline_runs_in_order_and_reports_each_stage(llava, llava_single):
    with vtr.patch(llava, [DivPrune(retain=0.5), FastV(retain=0.5)]) as handle, torch.no_grad():
        llava(**llava_single)
    stats = handle.stats()[0]
    assert [(s["method"], s["tokens_in"], s["tokens_out"]) for s in stats["stages"]] == \
        [("divprune", 49, 25), ("fastv", 25, 13)]
    assert set(handle.kept(stage=1)[0].tolist()) <= set(handle.kept(stage=0)[0].tolist())
    assert stats["tokens_per_layer"] == [25, 25] + [13] * 6
    assert stats["layer_avg_retention"] == pytest.approx((2 * 25 + 6 * 13) / (8 * 49))


def test_pipeline_retain_is_split_evenly_over_its_stages(llava, llava_single):
    with vtr.patch(llava, ["divprune", "fastv"], retain=0.25) as handle, torch.no_grad():
        llava(**llava_single)
    assert [p.retain for p in handle.plugins] == [0.5, 0.5]
    assert [s["tokens_out"] for s in handle.stats()[0]["stages"]] == [25, 13]      # 24.5 and 12.5 round up
    with pytest.raises(ValueError, match="retain"):
        vtr.patch(llava, ["divprune", "fastv"], retain=1.5)
    with pytest.raises(ValueError, match="plugin objects carry their own"):
        vtr.patch(llava, [DivPrune(), "fastv"], retain=0.25)


def test_pipeline_order_is_checked(llava):
    with pytest.raises(ValueError, match="before every in-LLM method"):
        vtr.patch(llava, [FastV(), DivPrune()])
    with pytest.raises(ValueError, match="after the previous stage"):
        vtr.patch(llava, [PyramidDrop(), FastV(layer=3)])


def test_progressive_stats(llava, llava_single):
    with vtr.patch(llava, "pdrop") as handle, torch.no_grad():
        llava(**llava_single)
    stats = handle.stats()[0]
    assert [s["tokens_out"] for s in stats["stages"]] == [25, 12, 6]     # 49 * 0.5^i, rounded
    assert stats["tokens_per_layer"] == [49, 49, 25, 25, 12, 12, 6, 6]


def test_methods_registry_has_summaries():
    registry = vtr.methods()
    assert set(registry) >= {"random", "fastervlm", "divprune", "fastv", "pdrop"}
    assert all(cls.summary and cls.__doc__ for cls in registry.values())


def test_right_padding_is_refused(model, batch):
    right = {**batch, "input_ids": batch["input_ids"].flip(1), "attention_mask": batch["attention_mask"].flip(1)}
    with vtr.patch(model, "fastv"), pytest.raises(ValueError, match="left-padded"):
        model(**right)


def test_anyres_only_method_refuses_other_models_before_touching_them(llava):
    before = hooks_on(llava)
    with pytest.raises(ValueError, match="globalcom2 needs an anyres model"):
        vtr.patch(llava, "globalcom2", retain=0.5)
    assert hooks_on(llava) == before


def test_supported_models_and_handle_repr(model):
    assert "LlavaForConditionalGeneration" in vtr.supported_models()
    handle = vtr.patch(model, "fastv")
    assert "fastv active" in repr(handle)
    handle.remove()
    assert "removed" in repr(handle) and not handle.active
