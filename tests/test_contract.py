"""The correctness contract, for every registered method on every supported architecture."""
import contextlib
import copy
import dataclasses

import pytest
import torch

import vtr
from vtr.adapters import adapter_for
from vtr.plugins import VLM_METHODS, LLMPlugin, Plugin

from conftest import half_model, split_batch
from tiny_models import IMAGE, VIDEO_ARCHS, make_inputs
from oracle import (merged_after_projector, merged_before_projector, oracle_generate, sequence_after,
                    visual_positions)

ALL = VLM_METHODS
STEPS = 6


def generate(model, inputs, steps=STEPS):
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, dim=1)


def hooks_on(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@contextlib.contextmanager
def input_dtypes(modules):
    """The dtypes of the first input every one of ``modules`` receives inside the block (a pre-hook each, removed
    after)."""
    seen = set()
    probes = [m.register_forward_pre_hook(lambda module, args: seen.add(args[0].dtype)) for m in modules]
    try:
        yield seen
    finally:
        for probe in probes:
            probe.remove()


@pytest.mark.parametrize("method", ALL)
def test_retain_one_is_bit_identical_and_remove_restores(model, single, method):
    with torch.no_grad():
        reference = model(**single).logits
    ref_tokens, ref_logits = generate(model, single)
    before = hooks_on(model)
    handle = vtr.patch(model, method, retain=1.0)
    try:                                      # a failure here must not leave the shared model patched
        assert hooks_on(model) > before
        with torch.no_grad():
            assert torch.equal(model(**single).logits, reference)
        tokens, logits = generate(model, single)
        assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits)
        assert handle.stats()[0]["retention"] == 1.0
    finally:
        handle.remove()
    assert hooks_on(model) == before
    assert not [k for k in vars(model) if "vtr" in k.lower()]
    with torch.no_grad():
        assert torch.equal(model(**single).logits, reference)


def merges_in_llm(plugin) -> bool:
    cls = type(plugin)
    return isinstance(plugin, LLMPlugin) and (cls.absorb is not LLMPlugin.absorb or cls.drop is not LLMPlugin.drop)


def spy(plugin, method: str = "reduce") -> list:
    """The (Signals, k) the engine hands ``plugin.reduce`` (or ``drop``), call after call; a multi-stage method's
    state as each call found it."""
    seen, call = [], getattr(plugin, method)

    def record(s, k):
        seen.append((dataclasses.replace(s, state=copy.deepcopy(s.state)), k))
        return call(s, k)
    setattr(plugin, method, record)
    return seen


def oracle_merges(stages, drops: dict) -> dict:
    """Layer -> the merge an in-LLM merging stage applies, rebuilt on the oracle's own hidden states: the plugin's
    rule with the scores the engine handed it (checked against the eager model in test_methods.py)."""
    merges, calls = {}, {}
    for stage in stages:
        if stage.layer is None or not merges_in_llm(stage.plugin):
            continue
        if calls.get(id(stage.plugin), 0) == len(drops[id(stage.plugin)]):
            continue                                 # the method had finished: the engine skipped its later stages
        signals, k = drops[id(stage.plugin)][calls.setdefault(id(stage.plugin), 0)]
        calls[id(stage.plugin)] += 1

        def merge(s, keep, plugin=stage.plugin, seen=signals, k=k):
            s.last_attention, s.rater_attention = seen.last_attention, seen.rater_attention
            s.frame, s.patch, s.state = seen.frame, seen.patch, copy.deepcopy(seen.state)
            kept, values = plugin.drop(s, k)
            assert torch.equal(kept, keep), "the oracle's hidden states choose other survivors"
            return values
        merges[stage.layer] = merge
    return merges


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("retain", [0.25, 0.5])
def test_generation_equals_oracle(model, single, method, retain):
    with vtr.patch(model, method, retain=retain) as handle:
        seen = spy(handle.plugins[0])
        drops = {id(p): spy(p, "drop") for p in handle.plugins if merges_in_llm(p)}
        tokens, logits = generate(model, single)
        stages = handle._engine.stages
        kept = [sequence_after(model, single["input_ids"], k) for k in
                (handle.kept(stage=s) [0] for s in range(len(stages)))]
    pre = [k for s, k in zip(stages, kept) if s.layer is None]
    llm = {s.layer: k for s, k in zip(stages, kept) if s.layer is not None}
    visual = len(visual_positions(model, single["input_ids"]))
    assert len(handle.kept()[0]) < visual, "the method must actually drop tokens here"
    features, plugin = None, handle.plugins[0]
    if plugin.name in ("visionzip", "prumerge+"):                  # merged features enter the projector
        features = merged_before_projector(model, single, plugin)
    elif seen and type(plugin).reduce is not Plugin.reduce:        # pooling, FastVID: merged values enter the LLM
        features = merged_after_projector(model, single, plugin, seen[0][0].cls_attention)
    absorbers = oracle_merges(stages, drops)
    protected = handle._engine.rec.protected
    protected = None if protected is None else protected[0].nonzero()[:, 0]
    want_tokens, want_logits = oracle_generate(model, single, pre[-1] if pre else None, llm, tokens.shape[1],
                                               features, absorbers, protected)
    assert torch.equal(tokens[0], want_tokens)
    torch.testing.assert_close(logits[0], want_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ALL)
def test_padded_batch_equals_per_sample(model, batch, method):
    with vtr.patch(model, method, retain=0.25) as handle:
        tokens, logits = generate(model, batch)
        kept = handle.kept()
        counts = [s["visual_tokens_out"] for s in handle.stats()]
        assert counts[0] != counts[1], "samples must keep different numbers of visual tokens"
        for b, single in enumerate(split_batch(model, batch)):
            one_tokens, one_logits = generate(model, single)
            assert torch.equal(handle.kept()[0], kept[b])
            assert torch.equal(one_tokens[0], tokens[b])
            torch.testing.assert_close(one_logits[0], logits[b], atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ALL)
def test_a_sample_without_images_in_a_batch_runs_as_the_stock_model(model, arch, method):
    """A padded batch whose second sample has no image: the first generates as it does alone under the patch, the
    second as the stock model generates its text."""
    prompts = [[1, 5, IMAGE, 6, 7, IMAGE, 8], [1, 9, 10, 11, 12, 13, 14]]
    video = arch in VIDEO_ARCHS
    batch = make_inputs(model, prompts, seed=2, video=video)
    with_images = make_inputs(model, prompts[:1], seed=2, video=video)        # the same images: the same seed
    text = {"input_ids": torch.tensor(prompts[1:]), "attention_mask": torch.ones(1, len(prompts[1]), dtype=torch.long)}
    want_text = generate(model, text)
    with vtr.patch(model, method, retain=0.25) as handle:
        tokens, logits = generate(model, batch)
        assert handle.stats()[1]["visual_tokens_in"] == 0 and handle.stats()[1]["retention"] == 1.0
        want_tokens, want_logits = generate(model, with_images)
    assert torch.equal(tokens[0], want_tokens[0]) and torch.equal(tokens[1], want_text[0][0])
    torch.testing.assert_close(logits[0], want_logits[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[1], want_text[1][0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ALL)
def test_sdpa_and_eager_keep_the_same_tokens(model, eager_model, batch, method):
    kept = {}
    for name, m in (("sdpa", model), ("eager", eager_model)):
        assert m.config._attn_implementation == name
        with vtr.patch(m, method, retain=0.25) as handle:
            with torch.no_grad():
                m(**batch)
            kept[name] = [handle.kept(stage=s) for s in range(len(handle._engine.stages))]
    for a, b in zip(kept["sdpa"], kept["eager"]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("method", ALL)
def test_flash_attention_2_keeps_the_same_tokens_and_generates_as_sdpa(model, flash_model, batch, single, method):
    """transformers' FA2 path with flash-attn's kernels replaced by an exact reference (flash_reference.py): padded
    batches (unpadded by the 2-D mask) and a single sequence with gaps in its position ids."""
    for inputs in (batch, single):
        runs = []
        for m in (model, flash_model):
            with vtr.patch(m, method, retain=0.25) as handle:
                tokens, logits = generate(m, inputs, steps=4)
                runs.append((tokens, logits, [handle.kept(stage=s) for s in range(len(handle._engine.stages))]))
        (tokens, logits, kept), (flash_tokens, flash_logits, flash_kept) = runs
        assert all(torch.equal(a, b) for stage, flash_stage in zip(kept, flash_kept)
                   for a, b in zip(stage, flash_stage))
        assert torch.equal(tokens, flash_tokens)
        torch.testing.assert_close(flash_logits, logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_stays_in_it_and_retain_one_is_bit_identical(model, arch, single, method, dtype):
    """In bfloat16 and float16 every method patches and generates with the language model's hidden states in that
    dtype (a value a method computed in float32 and wrote back unconverted would reach the layers), and retain=1.0
    leaves every logit bit-identical; float32 tests alone would not see either."""
    half = half_model(arch, dtype)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in single.items()}
    ref_tokens, ref_logits = generate(half, inputs)
    with vtr.patch(half, method, retain=1.0):
        tokens, logits = generate(half, inputs)
    assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits)
    with input_dtypes(adapter_for(half).decoder_layers) as seen, vtr.patch(half, method, retain=0.25) as handle:
        tokens, logits = generate(half, inputs)
        assert handle.stats()[0]["visual_tokens_out"] < handle.stats()[0]["visual_tokens_in"]
    assert seen == {dtype} and torch.isfinite(logits).all()


@pytest.mark.parametrize("method", ALL)
def test_autograd_on_selects_the_same_and_gradients_reach_the_tower(model, single, method):
    """Without torch.no_grad (and after a call under inference_mode, whose tensors a cache could keep): the same
    logits as under no_grad, and backward reaches the vision tower through the kept (or merged) tokens."""
    with vtr.patch(model, method, retain=0.25):
        with torch.inference_mode():
            want = model(**single).logits
        try:
            logits = model(**single).logits
            torch.testing.assert_close(logits.detach(), want, atol=1e-5, rtol=0)
            logits.float().square().mean().backward()
            tower = adapter_for(model).vision_model
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters())
        finally:
            model.zero_grad(set_to_none=True)
