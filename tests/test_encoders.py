"""Encoder-only ViTs (timm, open_clip): ToMe and EViT inside the blocks, checked against literal per-sample
implementations of the papers' rules written here with plain loops."""
import math

import pytest
import torch
import torch.nn.functional as F

import vtr
from vtr.plugins import EViT, ToMe

from references import tome_merge
from test_contract import hooks_on, input_dtypes

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")


def tiny_timm():
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=5).eval()    # 64 patches + [CLS]


def tiny_open_clip():
    torch.manual_seed(0)
    return open_clip.transformer.VisionTransformer(
        image_size=32, patch_size=4, width=32, layers=4, heads=2, mlp_ratio=2.0, output_dim=16).eval()


MODELS = {"timm": tiny_timm, "open_clip": tiny_open_clip}


def images(n=2):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------- literal references, one sample at a time
def evit_fuse(x, cls_row, keep, prefix=1):
    """EViT for one sample: keep the top ``keep`` patches by [CLS] attention, fuse the rest by that attention."""
    patches = cls_row[prefix:]
    top = sorted(patches.topk(keep).indices.tolist())
    rest = [i for i in range(len(patches)) if i not in top]
    w = patches[rest]
    fused = (x[prefix:][rest] * w[:, None]).sum(0) / w.sum()
    return torch.cat([x[:prefix], x[prefix:][top], fused[None]])


def reference_encoder(kind, model, pixels, method, steps):
    """The blocks run by hand: attention (with ToMe's log-size bias), the method between attention and MLP, MLP."""
    if kind == "timm":
        x = model.norm_pre(model._pos_embed(model.patch_embed(pixels)))
        blocks = model.blocks
    else:
        x = model._embeds(pixels)
        blocks = model.transformer.resblocks
    out = []
    for b in range(len(x)):
        h, size = x[b], torch.ones(x.shape[1])
        for i, block in enumerate(blocks):
            n = len(h)
            if kind == "timm":
                attn, norm1, norm2, mlp, ls1, ls2 = block.attn, block.norm1, block.norm2, block.mlp, block.ls1, block.ls2
                q, k, v = attn.qkv(norm1(h)).view(n, 3, attn.num_heads, -1).unbind(1)
                scale, proj = attn.scale, attn.proj
            else:
                attn, norm1, norm2, mlp, ls1, ls2 = block.attn, block.ln_1, block.ln_2, block.mlp, block.ls_1, block.ls_2
                q, k, v = F.linear(norm1(h), attn.in_proj_weight, attn.in_proj_bias).view(n, 3, attn.num_heads,
                                                                                          -1).unbind(1)
                scale, proj = q.shape[-1] ** -0.5, attn.out_proj
            logits = torch.einsum("qhd,khd->hqk", q, k) * scale
            if method == "tome":
                logits = logits + size.log()[None, None, :]
            probs = logits.softmax(-1)
            o = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, -1)
            h = h + ls1(proj(o))
            if steps[i] > 0 and method == "tome":
                h, size = tome_merge(h, size, k, steps[i])
            elif steps[i] > 0:
                h = evit_fuse(h, probs[:, 0].mean(0), n - 1 - steps[i])
            h = h + ls2(mlp(norm2(h)))
        out.append(h)
    return torch.stack(out)


def head(kind, model, tokens):
    if kind == "timm":
        return model.forward_head(model.norm(tokens))
    pooled, _ = model._pool(tokens)
    return pooled @ model.proj


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("method,options", [("tome", {"r": 6}), ("evit", {})])
def test_encoder_methods_equal_their_literal_rule(kind, method, options):
    model, pixels = MODELS[kind](), images()
    with vtr.patch(model, method, **options) as handle, torch.no_grad():
        got = model(pixels)
        steps = handle._engine.steps
    assert sum(steps) > 0
    with torch.no_grad():
        want = head(kind, model, reference_encoder(kind, model, pixels, method, steps))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    stats = handle.stats()[0]
    assert stats["tokens_in"] == 64 and stats["tokens_out"] < 64


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("method,options", [("tome", {"r": 0}), ("tome", {"retain": 1.0}), ("evit", {"retain": 1.0})])
def test_no_reduction_is_bit_identical_and_remove_restores(kind, method, options):
    model, pixels = MODELS[kind](), images()
    with torch.no_grad():
        reference = model(pixels)
    before = hooks_on(model)
    with vtr.patch(model, method, **options) as handle, torch.no_grad():
        assert torch.equal(model(pixels), reference)
        assert handle.stats()[0]["retention"] == 1.0
    assert hooks_on(model) == before
    with torch.no_grad():
        assert torch.equal(model(pixels), reference)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method,options,none", [("tome", {"r": 6}, {"r": 0}), ("evit", {}, {"retain": 1.0})])
def test_half_precision_stays_in_it(kind, dtype, method, options, none):
    """Every block sees the stream in the model's half dtype while tokens merge, and no reduction changes nothing."""
    model, pixels = MODELS[kind]().to(dtype), images().to(dtype)
    with torch.no_grad():
        reference = model(pixels)
    blocks = model.blocks if kind == "timm" else model.transformer.resblocks
    with input_dtypes(blocks) as seen, vtr.patch(model, method, **options) as handle, torch.no_grad():
        out = model(pixels)
        assert handle.stats()[0]["tokens_out"] < 64
    assert seen == {dtype} and out.dtype == dtype and torch.isfinite(out).all()
    with vtr.patch(model, method, **none), torch.no_grad():
        assert torch.equal(model(pixels), reference)


def test_tome_bipartite_rule_by_hand():
    """[CLS] + 6 patches: A = patches 0, 2, 4; B = 1, 3, 5. Patch 2 is closest to 3 (cos 1), patch 4 to 5 (cos 0.8),
    patch 0 to 1 (cos 0.6): r = 2 merges 2 -> 3 and 4 -> 5 and keeps 0."""
    def unit(deg):
        return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]
    keys = torch.tensor([[1.0, 0.0], unit(0), unit(53.13), unit(90), unit(90), unit(180), unit(180 + 36.87)])
    plan = ToMe(r=2).plan(keys[None, :, None, :], prefix=1, r=2)
    # slots: [CLS]=0, unmerged A (patch 0)=1, B (patches 1, 3, 5)=2, 3, 4
    assert plan.dest.tolist() == [[0, 1, 2, 3, 3, 4, 4]] and plan.width == 5


def test_evit_keeps_the_most_attended_and_fuses_the_rest_by_attention():
    plan = EViT(fuse=True).plan(torch.tensor([[0.1, 0.5, 0.05, 0.35]]), prefix=1, r=2)
    assert plan.dest.tolist() == [[0, 3, 1, 3, 2]] and plan.width == 4          # keep patches 1 and 3, fuse 0 and 2
    x = torch.arange(5.0)[None, :, None]
    slots, sizes = plan.reduce(x, torch.ones(1, 5))
    assert slots[0, :, 0].tolist() == pytest.approx([0, 2, 4, (1 * 0.1 + 3 * 0.05) / 0.15])
    assert sizes.tolist() == [[1, 1, 1, 2]]


def test_evit_paper_schedule_scales_to_depth():
    assert EViT().reductions(12, 196) == [0, 0, 0, 59, 0, 0, 41, 0, 0, 29, 0, 0]     # 196 -> 137 -> 96 -> 67
    assert EViT().reductions(4, 64)[0] == 0 and sum(EViT(retain=0.25).reductions(4, 64)) == 48


def test_vlm_methods_refuse_encoders():
    vit = tiny_timm()
    with pytest.raises(ValueError, match="encoder-only"):
        vtr.patch(vit, "fastv")
    assert hooks_on(vit) == 0
    assert {"timm.VisionTransformer", "open_clip.VisionTransformer"} <= set(vtr.supported_models())
