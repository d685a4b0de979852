"""Encoder methods (ToMe, EViT) inside LLaVA-1.5's vision tower: the tower's tokens are merged as in an encoder-only
ViT, every patch then carries its merged token's value, and the first patch of each merged token enters the LLM.
Checked against the tower's layers run by hand with the literal ToMe rule, and the stock language model."""
import torch

import vtr

from conftest import SINGLE, _model
from oracle import oracle_generate, sequence_after, visual_positions
from references import tome_merge
from test_contract import generate, hooks_on
from tiny_models import make_inputs


@torch.no_grad()
def reference_features(model, pixels, steps):
    """LLaVA's features (hidden_states[-2] without [CLS], through the projector) with ToMe between attention and MLP
    of the tower's layers up to the feature layer, one image at a time by hand; returns, per image, the merged tokens'
    first patches (ascending) and their projected values."""
    tower = model.model.vision_tower
    layers = tower.encoder.layers[:len(tower.encoder.layers) + model.config.vision_feature_layer + 1]
    x = tower.pre_layrnorm(tower.embeddings(pixels))
    out = []
    for b in range(len(x)):
        h, size, members = x[b], torch.ones(x.shape[1]), [[i] for i in range(x.shape[1])]
        for i, layer in enumerate(layers):
            attn, n = layer.self_attn, len(h)
            y = layer.layer_norm1(h)
            q, k, v = (proj(y).view(n, attn.num_heads, -1) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            probs = (torch.einsum("qhd,khd->hqk", q, k) * attn.scale + size.log()).softmax(-1)
            h = h + attn.out_proj(torch.einsum("hqk,khd->qhd", probs, v).reshape(n, -1))
            if steps[i]:
                h, size, members = tome_merge(h, size, k, steps[i], members=members)
            h = h + layer.mlp(layer.layer_norm2(h))
        first = [min(m) - 1 for m in members[1:]]                    # patches, without the [CLS] token
        order = sorted(range(len(first)), key=first.__getitem__)
        out.append((torch.tensor(first)[order], model.model.multi_modal_projector(h[1:][order])))
    return out


def test_tome_in_the_tower_equals_the_literal_rule_and_the_stock_language_model():
    model = _model("llava", "sdpa")
    inputs = make_inputs(model, [SINGLE], seed=1)
    with vtr.patch(model, "tome", r=4) as handle:
        tokens, logits = generate(model, inputs)
        kept, steps = handle.kept()[0], handle._engine.tower.steps
    (first, values), = reference_features(model, inputs["pixel_values"], steps)
    assert sum(steps) > 0 and torch.equal(kept, first)
    with torch.no_grad():
        features = torch.cat(list(model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output))
    features[first] = values
    want_tokens, want_logits = oracle_generate(model, inputs, sequence_after(model, inputs["input_ids"], kept), {},
                                               tokens.shape[1], features)
    assert torch.equal(tokens[0], want_tokens)
    torch.testing.assert_close(logits[0], want_logits, atol=1e-4, rtol=0)


def test_encoder_methods_in_the_tower_change_nothing_without_reduction_and_remove_cleanly():
    model = _model("llava", "sdpa")
    inputs = make_inputs(model, [SINGLE], seed=1)
    with torch.no_grad():
        reference = model(**inputs).logits
    before = hooks_on(model)
    for method, options in (("tome", {"r": 0}), ("evit", {"retain": 1.0})):
        with vtr.patch(model, method, **options) as handle, torch.no_grad():
            assert torch.equal(model(**inputs).logits, reference)
            assert handle.stats()[0]["retention"] == 1.0
        assert hooks_on(model) == before
    with vtr.patch(model, "evit", retain=0.5) as handle, torch.no_grad():          # EViT fuses the rest into one
        model(**inputs)
        visual = len(visual_positions(model, inputs["input_ids"]))
        assert 0 < handle.stats()[0]["visual_tokens_out"] < visual


def test_encoder_methods_in_a_tower_are_refused_where_they_cannot_run():
    import pytest

    with pytest.raises(ValueError, match="first stage, inside LLaVA-1.5's vision tower"):
        vtr.patch(_model("qwen2_vl", "sdpa"), "tome", r=2)
    with pytest.raises(ValueError, match="first stage"):
        vtr.patch(_model("llava", "sdpa"), ["random", "tome"], retain=0.5)
    with pytest.raises(ValueError, match="cannot be followed by a method that reads the tower"):
        vtr.patch(_model("llava", "sdpa"), ["tome", "fastervlm"], retain=0.5)


def test_tome_in_the_tower_batch_equals_per_sample_and_sdpa_equals_eager():
    from conftest import BATCH, split_batch

    model, eager = _model("llava", "sdpa"), _model("llava", "eager")
    batch = make_inputs(model, BATCH, seed=2)
    with vtr.patch(model, "tome", r=4) as handle:
        tokens, logits = generate(model, batch)
        kept = handle.kept()
        for b, single in enumerate(split_batch(model, batch)):
            one_tokens, one_logits = generate(model, single)
            assert torch.equal(handle.kept()[0], kept[b]) and torch.equal(one_tokens[0], tokens[b])
            torch.testing.assert_close(one_logits[0], logits[b], atol=1e-4, rtol=0)
    with vtr.patch(eager, "tome", r=4) as handle, torch.no_grad():
        eager(**batch)
        assert all(torch.equal(a, b) for a, b in zip(handle.kept(), kept))


def test_tome_in_the_tower_with_frame_reuse_keeps_the_same_tokens():
    model = _model("llava", "sdpa")
    batch = make_inputs(model, [[1, 5, 3, 6, 3, 7]], seed=2)               # two images in one sample
    batch["pixel_values"][1] = batch["pixel_values"][0]                     # the second repeats the first
    with vtr.patch(model, "tome", r=4) as plain, torch.no_grad():
        want = model(**batch).logits
    with vtr.patch(model, "tome", r=4, reuse_frames=0.0) as reused, torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, want, atol=1e-5, rtol=0)
        assert reused.encoder_inputs == (1, 2) and torch.equal(reused.kept()[0], plain.kept()[0])
