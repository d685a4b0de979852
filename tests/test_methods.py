"""Each method's selection rule pinned on small examples, and the selection kernels checked against the model's own
attention weights (eager, output_attentions), which vtr itself never asks for."""
import math

import numpy as np
import pytest
import torch

import vtr
from vtr.compat import output_cache
from vtr.kernels import (attention_received, attention_rows, duplicate_removal, group_counts, max_min_diversity,
                         topk_per_group, true_first)
from vtr.plugins import (DART, DivPrune, FastV, GlobalCom2, Pool, PruMergePlus, PyramidDrop, Random, Signals, SparseVLM,
                         ToDRE, ToDRERelevance, Uniform, VisionZip, VisPruner)

from conftest import SINGLE, _model
from oracle import visual_positions
from tiny_models import IMAGE as I, anyres_newlines, make_inputs, tiny_qwen2_vl


def unit(degrees):
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_divprune_greedy_max_min_by_hand():
    # tokens at 0, 10, 90, 180 and 45 degrees; D = 1 - cos.
    # nearest-neighbour distances: 0.015, 0.015, 0.293, 1.0, 0.181 -> first pick 180 (index 3);
    # farthest from {180}: 0 deg (D=2) -> index 0; then from {180, 0}: 90 deg (min D=1) -> index 2; then 45 (0.293).
    x = torch.tensor([[unit(0), unit(10), unit(90), unit(180), unit(45)]])
    assert max_min_diversity(x, 4).tolist() == [[3, 0, 2, 4]]
    assert DivPrune(budget=3).select(Signals(tokens=x), 3).tolist() == [[3, 0, 2]]


def test_divprune_is_batched_per_image():
    x = torch.tensor([[unit(0), unit(10), unit(90), unit(180), unit(45)],
                      [unit(180), unit(45), unit(0), unit(10), unit(90)]])
    assert max_min_diversity(x, 2).tolist() == [[3, 0], [0, 2]]


def test_divprune_greedy_paths_agree_with_the_definition():
    """The NumPy (CPU) and torch (GPU) greedy loops both equal a literal per-image max-min on D = 1 - cos."""
    from vtr.kernels import _greedy_numpy, _greedy_torch
    x = torch.randn(3, 40, 8, generator=torch.Generator().manual_seed(0))
    d = 1 - torch.nn.functional.cosine_similarity(x[:, :, None], x[:, None], dim=-1)
    expected = []
    for img in d:
        picks = [int(img.masked_fill(torch.eye(40, dtype=torch.bool), float("inf")).amin(0).argmax())]
        while len(picks) < 12:
            picks.append(max((j for j in range(40) if j not in picks), key=lambda j: float(img[picks, j].min())))
        expected.append(picks)
    assert max_min_diversity(x, 12).tolist() == expected
    xn = torch.nn.functional.normalize(x, dim=-1)
    sim = xn @ xn.transpose(1, 2)
    sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    first = sim.amax(1).argmin(1)
    assert torch.equal(_greedy_torch(sim, first, 12), _greedy_numpy(sim, first, 12))


TRITON_KERNELS = """
import os
import torch
from vtr.kernels import _duplicate_rounds_numpy, _greedy_torch, duplicate_rounds
from vtr.kernels_triton import duplicate_removal, max_min_greedy
device = os.environ.get("VTR_KERNEL_DEVICE", "cpu")      # cpu: Triton's interpreter; cuda: the compiled kernels
g = torch.Generator().manual_seed(0)
for n, keeps in ((45, (1, 2, 7, 20, 44, 45)), (10, (1, 3)), (300, (100,))):   # under 16 tokens: padded lists
    x = torch.randn(3, n, 8, generator=g)
    x[1, 5] = x[1, 7]                               # ties: both take the first index
    x[2] = x[2, :1]                                 # every token alike
    if n == 300:                                    # 12 clusters: most lists run out of odd tokens, rows are read
        x[0] = torch.randn(12, 8, generator=g)[torch.randint(0, 12, (n,), generator=g)]
    xn = torch.nn.functional.normalize(x, dim=-1)
    sim = xn @ xn.transpose(1, 2)
    for keep in keeps:
        drops = duplicate_rounds(n, keep, 8)
        want = _duplicate_rounds_numpy(sim.numpy(), drops, keep, neighbours=0)
        assert torch.equal(duplicate_removal(sim.to(device), drops, keep, 16).cpu(), want), (n, keep)
sim = xn[:, :40] @ xn[:, :40].transpose(1, 2)
sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
first = sim.amax(1).argmin(1)
for k in (1, 12, 40):
    assert torch.equal(max_min_greedy(sim.to(device), first.to(device), k).cpu(), _greedy_torch(sim, first, k)), k
print("same")
"""


def test_triton_kernels_equal_the_fallbacks():
    """The fused Triton kernels (max-min: one launch for all k steps; duplicate removal: one for all rounds) pick
    what the PyTorch / NumPy loops pick, ties included; run by Triton's interpreter on the CPU (a fresh process: the
    interpreter is chosen when the kernel module is imported)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", TRITON_KERNELS], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.stdout.strip() == "same", run.stderr[-2000:]


TRITON_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vtr import kernels_triton as K
from vtr.kernels import NEIGHBOURS
h100 = GPUTarget("cuda", 90, 32)
ints = dict.fromkeys(("n", "keep", "rounds", "k", "stride_image", "stride_row"), "i32")
duplicates = {"sim_ptr": "*fp32", "near_ptr": "*i32", "drops_ptr": "*i32", "evens_ptr": "*i32", "odd_ptr": "*i8",
              "dup_ptr": "*fp32", "out_ptr": "*i64"}
for block in (64, 8192):                                         # the smallest and largest launches
    signature = {**duplicates, **{k: ints[k] for k in ("n", "keep", "rounds", "stride_image", "stride_row")},
                 **dict.fromkeys(("PER_ROUND", "NEAR", "BLOCK", "ROWS"), "constexpr")}
    constants = {"PER_ROUND": 8, "NEAR": NEIGHBOURS, "BLOCK": block, "ROWS": K.ROWS}
    source = ASTSource(K._duplicate_removal, signature, constexprs=constants)
    assert "cubin" in triton.compile(source, target=h100, options={"num_warps": K.warps(block)}).asm
signature = {"sim_ptr": "*fp32", "first_ptr": "*i64", "picks_ptr": "*i64",
             **{k: ints[k] for k in ("n", "k", "stride_image", "stride_row")}, "BLOCK": "constexpr"}
for block in (1024, 8192):
    source = ASTSource(K._max_min_greedy, signature, constexprs={"BLOCK": block})
    assert "cubin" in triton.compile(source, target=h100, options={"num_warps": K.warps(block)}).asm
print("compiled")
"""


def test_triton_kernels_compile_for_an_h100(tmp_path):
    """The interpreter accepts code the GPU compiler refuses; compiling to an sm_90 cubin (Triton ships ptxas, no GPU
    needed) checks the kernels as a GPU would build them."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", TRITON_COMPILE], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRITON_CACHE_DIR": str(tmp_path)})
    assert run.stdout.strip() == "compiled", run.stderr[-2000:]


def test_topk_per_group_by_hand():
    scores = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.2, 0.4])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    keep = topk_per_group(scores, group, torch.tensor([2, 1]))
    assert keep.tolist() == [False, True, True, True, False, False]


def test_group_counts_and_visual_gathers_equal_their_syncing_forms():
    """The forms that do not wait for a GPU (an index_add of ones, a gather by rows found once) give what bincount
    and indexing by the mask give."""
    group = torch.tensor([2, 0, 2, 2, 4])
    assert group_counts(group, 6).tolist() == torch.bincount(group, minlength=6).tolist() == [1, 0, 3, 0, 1, 0]
    visual = torch.tensor([[False, True, True, False], [True, False, False, True]])
    hidden = torch.arange(24.0).view(2, 4, 3)
    s = Signals(tokens=hidden, visual=visual)
    assert torch.equal(s.at_visual(hidden), hidden[visual])
    assert torch.equal(s.at_visual(hidden[..., 0]), hidden[..., 0][visual])
    assert s.visual_rows.tolist() == [1, 2, 4, 7]
    mask = torch.tensor([False, True, False, True, True])
    assert true_first(mask).tolist() == [1, 3, 4, 0, 2] and true_first(mask)[:3].tolist() == mask.nonzero()[:, 0].tolist()


def test_layout_compact_by_hand():
    """Kept slots move right, in order, each row left-padded to the widest; the host learns whether any row is
    padded (so the layers' mask can be left out) and gets the same layout back when nothing was dropped; counts handed
    to the compaction come back with it, onto the layout they describe."""
    from vtr.layout import Layout

    slots = torch.arange(4).expand(2, 4)
    layout = Layout(orig=slots, slot0=slots, mask=torch.ones(2, 4, dtype=torch.bool))
    even = layout.compact(torch.tensor([[True, False, True, True], [True, True, False, True]]))
    assert even.orig.tolist() == [[0, 2, 3], [0, 1, 3]] and even.full
    uneven = layout.compact(torch.tensor([[True, False, True, True], [False, True, False, True]]))
    assert uneven.orig.tolist() == [[0, 2, 3], [-1, 1, 3]] and uneven.src.tolist()[1][1:] == [1, 3]
    assert uneven.mask.tolist() == [[True] * 3, [False, True, True]] and not uneven.full
    assert uneven.compact(uneven.mask) is uneven
    carried = layout.compact(torch.tensor([[True, False, True, True]] * 2), ("image", torch.tensor([3, 1])))
    assert carried.entry_counts == {"image": [3, 1]} and not layout.entry_counts
    assert uneven.compact(uneven.mask, ("frame", torch.tensor([2]))) is uneven and uneven.entry_counts["frame"] == [2]
    told = layout.compact(torch.tensor([[True, False, True, True], [False, True, False, True]]), lengths=[3, 2])
    assert told.orig.tolist() == uneven.orig.tolist() and told.mask.tolist() == uneven.mask.tolist() and not told.full



def test_stage_counts_come_back_with_the_compaction(llava):
    """The host knows each image's visual tokens before the LLM (its sizes, less what a pre-LLM method kept), and
    each in-LLM stage's compaction brings back the survivors per image (or frame) with the new width: FastV waits for
    the device twice per prefill (the prompt's checks, its compaction), a third PyramidDrop stage adds one wait, not
    two, and a projector method only the prompt's checks (each sample's new length is known); what each layout
    carries equals a fresh count, for groupings and stacks that differ."""
    import dataclasses
    from conftest import BATCH
    from vtr.eval.launches import OpCount
    from vtr.hooks import watch_hooks

    inputs = make_inputs(llava, [BATCH[0]], seed=3)
    syncs = {}
    for name, method in [("fastv", FastV(retain=0.5)), ("uniform", "uniform"),
                         (2, PyramidDrop(retain=0.25, layer_list=(2, 4))),
                         (3, PyramidDrop(retain=0.25, layer_list=(2, 4, 6)))]:
        with vtr.patch(llava, method, **({"retain": 0.25} if method == "uniform" else {})), torch.no_grad(), \
                watch_hooks(OpCount()) as count:
            llava(**inputs, use_cache=True)
        syncs[name] = count.syncs
    assert syncs["fastv"] == 2 and syncs["uniform"] == 1 and syncs[3] == syncs[2] + 1

    video = _model("llava_onevision", "sdpa")     # a closing newline per video, never dropped: not counted
    anyres = _model("llava_next", "sdpa")         # a newline per row of crops, counted by the host (forward pass)
    for model, video_input, stack in [
            (anyres, False, [Random(retain=0.5), FastV(retain=0.5, layer=3)]),
            (anyres, False, [PyramidDrop(retain=0.5, layer_list=(2, 4))]),
            (video, False, [Random(retain=0.5), FastV(retain=0.5, layer=3)]),     # OneVision images, multi-image too
            (llava, False, [Random(retain=0.5), PyramidDrop(retain=0.5, layer_list=(2, 4))]),
            (video, True, [PyramidDrop(retain=0.5, layer_list=(2,)), FastV(retain=0.5, layer=4, per_frame=True)]),
            (video, True, [Random(retain=0.5), FastV(retain=0.5, layer=3)])]:
        with vtr.patch(model, stack) as handle, torch.no_grad():
            model(**make_inputs(model, BATCH, seed=2, video=video_input), use_cache=True)
            engine = handle._engine
        carried = [(layout, grouping, counts) for layout in engine.rec.layouts
                   for grouping, counts in layout.entry_counts.items()]
        assert len(carried) >= len(engine.llm_stages)      # layout 0 and each one a later stage reads
        for layout, grouping, counts in carried:
            fresh = dataclasses.replace(layout, entry_counts={})
            assert engine._visual_entries(engine.rec, fresh, grouping)[4] == counts, (stack, grouping)


def test_a_decode_step_reads_nothing_back(llava):
    """Past the prefill, an unpadded sample's decode step runs every stage's layers without a device read: the stock
    model found its whole mask all ones, so the shorter caches' masks are skipped too (a padded batch, or a method
    that hides tokens while decoding, builds them; the contract tests check those)."""
    from conftest import BATCH
    from vtr.eval.bench import next_step
    from vtr.eval.launches import OpCount
    from vtr.hooks import watch_hooks

    inputs = make_inputs(llava, [BATCH[0]], seed=3)
    with vtr.patch(llava, PyramidDrop(retain=0.25, layer_list=(2, 4, 6))), torch.no_grad():
        out = llava(**inputs, use_cache=True)
        with watch_hooks(OpCount()) as count:
            llava(**next_step(inputs, out))
    assert count.ops > 0 and count.syncs == 0


def test_attention_rows_matches_softmax_with_gqa_and_mask():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 6, 8)
    mask = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    want = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.5)
    want = want.masked_fill(~mask[:, None, None], float("-inf")).softmax(-1).mean(1)
    torch.testing.assert_close(attention_rows(q, k, 0.5, mask, chunk=4), want)


@pytest.mark.parametrize("chunk", [None, 3, 7, 64])
def test_attention_received_is_the_mean_column_of_the_softmax_in_any_chunks(chunk):
    torch.manual_seed(0)
    q, k = torch.randn(5, 2, 7, 8), torch.randn(5, 2, 7, 8)            # 5 sequences, 2 heads, 7 tokens
    want = (q @ k.transpose(-1, -2) * 0.5).softmax(-1).mean(dim=(-3, -2))
    torch.testing.assert_close(attention_received(q, k, 0.5, chunk=chunk), want)


def test_keep_counts_follow_retain_and_budget():
    assert FastV(retain=0.25).keep_count(576) == 144
    assert FastV(retain=1 / 9).keep_count(576) == 64
    assert FastV(budget=1000).keep_count(576) == 576
    assert FastV().keep_count(576) == 288                      # paper default R = 50%


def test_pdrop_paper_schedule():
    p = PyramidDrop()
    assert p.layers(32) == [8, 16, 24] and p.layers(8) == [2, 4, 6]
    assert p.stage_counts(576, 3) == [288, 144, 72]            # lambda = 0.5 per stage
    assert PyramidDrop(budget=64).stage_counts(576, 3)[-1] == 64


def test_random_is_seeded_per_image_position():
    tokens = torch.zeros(3, 20, 4)
    picks = Random(seed=1).select(Signals(tokens=tokens, image_index=[0, 1, 0]), 5)
    assert torch.equal(picks[0], picks[2]) and not torch.equal(picks[0], picks[1])
    other = Random(seed=2).select(Signals(tokens=tokens, image_index=[0, 1, 0]), 5)
    assert not torch.equal(picks[0], other[0])


def test_cls_attention_kernel_equals_clip_attention_weights():
    model = _model("llava", "eager")
    inputs = make_inputs(model, [SINGLE], seed=1)
    with torch.no_grad():
        vision = model.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    layer = len(vision.attentions) + model.config.vision_feature_layer      # -2 -> second to last
    want = vision.attentions[layer][:, :, 0, 1:].mean(1)
    with vtr.patch(model, "fastervlm", budget=5) as handle:
        with torch.no_grad():
            model(**inputs)
        kept = handle.kept()[0]
    assert torch.equal(kept, want[0].topk(5).indices.sort().values)


@pytest.mark.parametrize("arch, case", [("qwen2_vl", "image"), ("qwen2_vl", "video"), ("qwen2_5_vl", "image"),
                                        ("qwen2_5_vl", "video"), ("qwen2_5_vl", "full-attention last block"),
                                        ("qwen3_vl", "video")])
def test_towers_without_cls_score_by_attention_received_in_the_last_block(arch, case):
    """The fallback, written out naively: full softmax attention of the last vision block per image, the mean each
    patch receives (over heads and queries), averaged over its merge group; merged tokens are matched to the
    tower's output order by running the stock merger (Qwen2.5-VL's blocks see patches in window order). The block's
    attention spans (the engine takes them from the host grid: each temporal patch of each image) come from the
    stock tower's own ``cu_seqlens``; two images of different sizes, or a video's two temporal patches."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    model = _model(arch, "eager")
    if case == "full-attention last block":       # as in the real checkpoints (the tiny one's last block is windowed)
        model = tiny_qwen2_vl("eager", version="2.5")
        model.model.visual.fullatt_block_indexes = [1, 2]
    video = case == "video"
    inputs = make_inputs(model, [[1, 5, I, 6, I, 7]], seed=1, video=video)
    pixels, grid = ((inputs["pixel_values_videos"], inputs["video_grid_thw"]) if video else
                    (inputs["pixel_values"], inputs["image_grid_thw"]))
    visual, seen = model.model.visual, {}
    probe = visual.blocks[-1].register_forward_pre_hook(lambda m, a, kw: seen.update(x=a[0], kw=kw), with_kwargs=True)
    try:
        with torch.no_grad():
            out = visual(pixels, grid_thw=grid)
    finally:
        probe.remove()
    block, merge = visual.blocks[-1], model.config.vision_config.spatial_merge_size
    n = seen["x"].shape[0]
    q, k, _ = block.attn.qkv(block.norm1(seen["x"])).reshape(n, 3, block.attn.num_heads, -1).permute(1, 0, 2, 3)
    q, k = apply_rotary_pos_emb_vision(q, k, *seen["kw"]["position_embeddings"])
    bounds = seen["kw"]["cu_seqlens"].tolist()
    windowed = arch == "qwen2_5_vl" and case != "full-attention last block"
    assert windowed or len(bounds) - 1 == int(grid[:, 0].sum())         # else one span per temporal patch
    received = torch.cat([(torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * block.attn.scaling).softmax(-1).mean((0, 1))
                          for a, b in zip(bounds[:-1], bounds[1:])])
    block_order = received.view(-1, merge ** 2).mean(1)
    with torch.no_grad():
        merged = visual.merger(out.last_hidden_state)
    order = [int((merged == row).all(1).nonzero()[0]) for row in out.pooler_output]
    want = block_order[order]
    if arch == "qwen2_5_vl":
        assert order != sorted(order), "the example must exercise the window reordering"
    with vtr.patch(model, "fastervlm", budget=5) as handle, torch.no_grad():
        model(**inputs)
    per_image = [t * h * w // merge ** 2 for t, h, w in grid.tolist()]        # budget 5 per image (or video)
    starts = torch.tensor(per_image).cumsum(0) - torch.tensor(per_image)
    expected = torch.cat([part.topk(5).indices.sort().values + start
                          for part, start in zip(want.split(per_image), starts)])
    assert torch.equal(handle.kept()[0], expected)


@pytest.mark.parametrize("method,score_layer", [("fastv", 1), ("pdrop", 2)])
def test_last_token_attention_equals_decoder_attention_weights(eager_model, single, method, score_layer):
    """FastV scores with layer K-1 = 1, PyramidDrop's first stage with its own layer 2 (of 8): the recomputed row must
    pick the same tokens as the eager model's real attention weights (last query, head mean)."""
    with torch.no_grad():
        out = eager_model(**single, output_attentions=True)
    visual = torch.zeros(single["input_ids"].shape[1], dtype=torch.bool)
    visual[visual_positions(eager_model, single["input_ids"])] = True
    row = out.attentions[score_layer][0, :, -1, :].mean(0)[visual]
    newline = torch.cat(anyres_newlines(eager_model, single)) if "image_sizes" in single else torch.zeros_like(row).bool()
    if eager_model.config.model_type == "llava_onevision" and "pixel_values_videos" in single:
        newline[-1] = True                                # a OneVision video ends with its newline
    row[newline] = float("inf")                       # LLaVA-NeXT/OneVision newline tokens are always kept
    with vtr.patch(eager_model, method, budget=7) as handle:
        with torch.no_grad():
            eager_model(**single)
        first = handle.kept(stage=0)[0]
    assert torch.equal(first, row.topk(len(first)).indices.sort().values)


def test_globalcom2_thumbnail_sets_crop_shares_and_guides_selection():
    """A 2x2 thumbnail and a 1x2 grid of 2x2 crops. Thumbnail attention [[.1, .2], [.05, .65]]: the right crop covers
    .85 of it, the left .15; with tau = 0.1, sigma ~ (0.001, 0.999), so at k = 6 (r = 1/2) the shares are
    thumbnail 2, left 4 * .5 * (1 + .001 - .5) = 1.0 -> 1, right 4 * .5 * 1.499 = 3.0 -> 2 + the leftover 1 = 3.
    The crops' own attention is flat, so the thumbnail map resized onto the 2x4 grid decides inside them."""
    thumb = [0.1, 0.2, 0.05, 0.65]
    crop = torch.tensor([[0] * 4 + [1] * 4 + [2] * 4])
    row = torch.tensor([[0, 0, 1, 1] * 3])
    col = torch.tensor([[0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3]])
    layout = {"crop": crop, "row": row, "col": col, "grid": torch.tensor([[1, 2]]), "side": 2}
    s = Signals(tokens=torch.zeros(1, 12, 4), cls_attention=torch.tensor([thumb + [0.3] * 8]), layout=layout)
    picks = GlobalCom2(temperature=0.1).select(s, 6)[0]
    # thumbnail: its two most attended (1, 3); left crop: guide at (1, 1) = .2 is its best (7);
    # right crop: (1, 3) = .65, (1, 2) = .5, (0, 3) = .2 (11, 10, 9)
    assert sorted(picks.tolist()) == [1, 3, 7, 9, 10, 11]


def test_uniform_grid_by_hand():
    tokens = torch.zeros(2, 16, 3)                       # a 4 x 4 grid
    assert Uniform().select(Signals(tokens=tokens), 4).tolist() == [[5, 7, 13, 15]] * 2   # rows/cols 1 and 3
    assert Uniform().select(Signals(tokens=torch.zeros(1, 10, 3)), 3).tolist() == [[1, 5, 8]]   # (i + .5) * 10 / 3


def test_vispruner_important_then_diverse_by_hand():
    """Tokens 0..4 at 10, 0, 90, 90 and 225 degrees: even 0, 2, 4 against odd 1, 3 have highest similarities
    cos 10 = .98, 1 and -.71. Keeping 3 drops the two most duplicated even tokens, 2 and 0. In VisPruner with k = 3
    and r = 1/3, token 5 is the important one and two diverse tokens are needed: all three even tokens go."""
    x = torch.tensor([unit(10), unit(0), unit(90), unit(90), unit(225), unit(45)])
    assert duplicate_removal(x[None, :5], 3, 8).tolist() == [[1, 3, 4]]
    assert duplicate_removal(torch.tensor([[unit(0)] * 4]), 3, 8).tolist() == [[1, 2, 3]]   # a tie drops the earlier
    s = Signals(tokens=x[None], cls_attention=torch.tensor([[0.1, 0.1, 0.1, 0.1, 0.1, 0.5]]))
    picks = VisPruner(important_ratio=1 / 3).select(s, 3)[0]
    assert picks.tolist() == [5, 1, 3]


def test_duplicate_removal_neighbour_lists_change_nothing():
    """Above 600 tokens the host rounds read each token's 16 nearest first: the same picks as reading every row,
    with exact duplicates (ties; the first round's lists soon hold no odd token and are rebuilt) and with 1-token
    lists (nearly every token falls back to its row)."""
    from vtr.kernels import _duplicate_rounds_numpy, duplicate_rounds

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 16, generator=g)[:, torch.randint(0, 40, (700,), generator=g)]     # many exact repeats
    x[1] += 0.1 * torch.randn(700, 16, generator=g)
    xn = torch.nn.functional.normalize(x, dim=-1)
    sim = (xn @ xn.transpose(1, 2)).numpy()
    for keep in (100, 5):                          # 5: fewer tokens left than a list holds
        drops = duplicate_rounds(700, keep, 8)
        rows = _duplicate_rounds_numpy(sim, drops, keep, neighbours=0)
        assert torch.equal(_duplicate_rounds_numpy(sim, drops, keep), rows)
        assert torch.equal(_duplicate_rounds_numpy(sim, drops, keep, neighbours=1), rows)


def test_top_first_is_the_head_of_a_stable_descending_sort():
    """Duplicate removal's drops (ties: the earlier token) from a partition: the same set as the sort, ties included."""
    from vtr.kernels import _top_first

    g = torch.Generator().manual_seed(0)
    for n in (5, 700, 2000):                          # up to 600 values it sorts
        values = torch.randint(0, 20, (n,), generator=g).float().numpy()       # every value many times over
        for count in (1, 3, 8, n):
            want = np.argsort(-values, kind="stable")[:count]
            assert sorted(_top_first(values, count).tolist()) == sorted(want.tolist()), (n, count)


def test_dart_pivots_then_least_similar_by_hand():
    """Positions 1-5 are one image, 6-7 text after it. Key norms make position 2 the image pivot and 7 the text
    pivot. Budget 3: the image pivot, then one pick per pivot. Features (angles): 2 at 0, 1 at 10, 3 at 180, 4 at 90,
    5 at 170, 7 at 175 degrees. Pivot 2's least similar is 3 (cos -1); then pivot 7's is 1 (cos 165 = -.97)."""
    angles = [0, 10, 0, 180, 90, 170, 0, 175]
    feats = torch.tensor([unit(a) for a in angles])[None]
    keys = torch.tensor([0, 1, 5, 2, 3, 4, 1, 9.0])[None, :, None]
    visual = torch.tensor([[False, True, True, True, True, True, False, False]])
    s = Signals(tokens=feats, normed=feats, keys=keys, visual=visual, text=~visual, image=torch.zeros(5).long(),
                positions=torch.arange(8)[None])
    keep = DART(image_pivots=1, text_pivots=1).keep(s, torch.tensor([3]))
    assert keep.tolist() == [True, True, True, False, False]          # positions 1, 2, 3


def test_dart_keys_are_the_layers_rotated_keys():
    """The keys DART ranks are what layer K-1 caches at prefill (after its norm and RoPE)."""
    model = _model("qwen3_vl", "sdpa")              # q/k norms and M-RoPE: the hardest case
    inputs = make_inputs(model, [SINGLE], seed=1)
    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
    want = cache.layers[1].keys.transpose(1, 2).flatten(2)
    seen = {}

    class Spy(DART):
        def keep(self, s, k):
            seen["keys"] = s.keys
            return super().keep(s, k)

    with vtr.patch(model, Spy(retain=0.5)), torch.no_grad():
        model(**inputs)
    torch.testing.assert_close(seen["keys"], want, atol=1e-5, rtol=1e-5)


def test_visionzip_dominant_then_contextual_merge_by_hand():
    """8 tokens, budget 5 with 2 contextual: dominant = the 3 most [CLS]-attended (0, 2, 4). The rest 1, 3, 5, 6, 7
    with stride 5 // 2 = 2 gives targets 1 and 5; by key, 3 joins 1 and 6, 7 join 5; each target becomes the mean."""
    attention = torch.tensor([[0.5, 0.1, 0.4, 0.05, 0.3, 0.02, 0.01, 0.03]])
    keys = torch.tensor([[unit(0), unit(10), unit(0), unit(20), unit(0), unit(100), unit(95), unit(110)]])
    tokens = torch.arange(8.0).view(1, 8, 1).repeat(1, 1, 2)
    kept, merged = VisionZip(contextual_ratio=0.4).zip(
        Signals(tokens=tokens, cls_attention=attention, keys=keys), 5)
    assert kept.tolist() == [[0, 1, 2, 4, 5]]
    assert merged[0, :, 0].tolist() == [0, (1 + 3) / 2, 2, 3, 4, (5 + 6 + 7) / 3, 6, 7]


def test_visionzip_refuses_models_whose_projector_does_not_see_one_image():
    model = _model("qwen2_vl", "sdpa")
    with pytest.raises(ValueError, match="visionzip works before the projector"):
        vtr.patch(model, "visionzip", retain=0.25)
    with pytest.raises(ValueError, match="must be the first stage"):
        vtr.patch(_model("llava", "sdpa"), [DivPrune(retain=0.5), VisionZip(retain=0.5)])


def test_pool_cells_by_hand():
    from vtr.plugins.pool import cells

    # 4 x 4 grid to 4 tokens: 2 x 2 cells; the first token of each cell is kept and takes the cell's mean
    assert [c.tolist() for c in cells(4, 4, 4)] == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    # 4 x 6 grid to 6: 2 x 3 cells of 2 x 2 (the aspect ratio is kept)
    assert [len(c) for c in cells(4, 6, 6)] == [4] * 6 and cells(4, 6, 6)[1].tolist() == [2, 3, 8, 9]
    # 7 x 7 to 12: 3 x 4 adaptive cells overlap (rows 0-3, 2-5, 4-7 ...)
    assert cells(7, 7, 12)[0].tolist() == [0, 1, 7, 8, 14, 15]
    # a 2 x 3 grid to 5: no a x b = 5 fits, so runs of consecutive tokens
    assert [c.tolist() for c in cells(2, 3, 5)] == [[0], [1], [2], [3], [4, 5]]
    tokens = torch.arange(16.0).view(1, 16, 1)
    s = Signals(tokens=tokens, token_grid=[(4, 4)])
    picks, values = Pool().reduce(s, 4)
    assert picks.tolist() == [[0, 2, 8, 10]] and values[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]


def test_kcenter_runs_the_max_min_routine_on_the_encoder_output():
    from vtr.plugins import KCenter

    x = torch.tensor([[unit(0), unit(5), unit(90), unit(180), unit(185)]])
    kept, same = KCenter().zip(Signals(tokens=x), 3)
    assert kept.tolist() == max_min_diversity(x, 3).sort(dim=1).values.tolist() and same is x
    assert set(kept[0].tolist()) >= {2}          # the lone token at 90 degrees is the first, most isolated pick


def test_sparsevlm_raters_by_hand():
    # visual tokens (1, 0), (0, 1); text tokens (1, 0), (0, 1), (0, 0). P (softmax over text of the dot products):
    # visual 0 -> (e, 1, 1) / (e + 2), visual 1 -> (1, e, 1) / (e + 2); means: (e+1, e+1, 2) / 2 (e + 2): the first
    # two are above the mean 1/3, the third below
    visual, text = torch.tensor([[1.0, 0], [0, 1]]), torch.tensor([[1.0, 0], [0, 1], [0, 0]])
    every = torch.ones(1, 3, dtype=torch.bool)
    assert SparseVLM.raters(visual[None], every[:, :2], text[None], every).tolist() == [[True, True, False]]
    # batched beside a sample with one visual row (1, 0) among non-visual ones and text (1, 0), (0, 0) x 3:
    # P = (e, 1, 1, 1) / (e + 3), only the first above the mean 1/4; the first sample's padding changes nothing
    embeds = torch.stack([torch.cat([visual, torch.tensor([[5.0, 5]])]), torch.tensor([[1.0, 0], [7, 7], [7, 7]])])
    texts = torch.stack([torch.cat([text, torch.tensor([[9.0, 9]])]), torch.tensor([[1.0, 0], [0, 0], [0, 0], [0, 0]])])
    rows = torch.tensor([[True, True, False], [True, False, False]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    assert SparseVLM.raters(embeds, rows, texts, valid).tolist() == [[True, True, False, False],
                                                                     [True, False, False, False]]


def test_sparsevlm_schedule_layers_and_recycling_by_hand():
    assert SparseVLM(retain=110 / 576).stage_counts(576, 3) == [300, 200, 110]          # the paper's "192"
    assert SparseVLM(retain=36 / 576).stage_counts(576, 3) == [303, 110, 36]            # "128"
    assert SparseVLM(retain=17 / 576).stage_counts(576, 3) == [66, 30, 17]              # "64"
    assert SparseVLM().layers(32) == [3, 7, 16]          # scored with layers 2, 6, 15; dropped from the next
    # 10 tokens to 4: the top 3 by score survive; of the 7 dropped, int(0.3 x 7) + 1 = 3 best are recycled into
    # 3 // 10 + 1 = 1 cluster, their mean, placed at one of them
    tokens = torch.arange(20.0).view(1, 10, 2)
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.7, 0.6, 0.05, 0.5, 0.0, 0.3]])
    s = Signals(tokens=tokens, visual=torch.ones(1, 10, dtype=torch.bool), image=torch.zeros(10, dtype=torch.long),
                rater_attention=scores)
    kept, values = SparseVLM().drop(s, torch.tensor([4]))
    survivors = kept.nonzero()[:, 0].tolist()
    assert len(survivors) == 4 and {0, 2, 4} < set(survivors) and set(survivors) - {0, 2, 4} <= {5, 7, 9}
    cluster = (set(survivors) - {0, 2, 4}).pop()                    # values: one row per visual token
    torch.testing.assert_close(values[cluster], tokens[0, [5, 7, 9]].mean(0))
    assert torch.equal(values[[0, 2, 4]], tokens[0, [0, 2, 4]])
    kept, values = SparseVLM(recycle=False).drop(s, torch.tensor([4]))
    assert kept.nonzero()[:, 0].tolist() == [0, 2, 4, 5] and values is None


def test_sparsevlm_recycles_every_image_at_once_as_each_alone():
    """Three images in one row (40, 57 and 30 tokens, 1 + 2 + 1 clusters recycled), then each alone: the same
    survivors and values; ties in score go to the earlier token in both."""
    gen = torch.Generator().manual_seed(0)
    sizes, budgets = [40, 57, 30], [12, 20, 9]
    tokens = torch.randn(1, sum(sizes), 6, generator=gen)
    scores = torch.rand(1, sum(sizes), generator=gen).round(decimals=1)                # many ties
    image = torch.arange(3).repeat_interleave(torch.tensor(sizes))

    def signals(rows):
        return Signals(tokens=tokens[:, rows], visual=torch.ones(1, len(rows), dtype=torch.bool),
                       image=image[rows] - image[rows][0], rater_attention=scores[:, rows])
    kept, values = SparseVLM().drop(signals(torch.arange(sum(sizes))), torch.tensor(budgets))
    assert (values != tokens[0]).any(dim=1).sum() == 1 + 2 + 1
    for i, budget in enumerate(budgets):
        rows = (image == i).nonzero()[:, 0]
        alone_kept, alone_values = SparseVLM().drop(signals(rows), torch.tensor([budget]))
        assert torch.equal(kept[rows], alone_kept) and int(alone_kept.sum()) == budget
        torch.testing.assert_close(values[rows], alone_values)


def test_sparsevlm_rater_scores_equal_the_eager_attention_weights(eager_model, single):
    """The raters' rows of the scoring layer's real attention weights (head mean), averaged over the raters."""
    with torch.no_grad():
        out = eager_model(**single, output_attentions=True)
    with vtr.patch(eager_model, "sparsevlm", retain=0.25) as handle:
        plugin, seen = handle.plugins[0], []
        drop = plugin.drop
        plugin.drop = lambda s, k: (seen.append(s), drop(s, k))[1]
        with torch.no_grad():
            eager_model(**single)
        raters = handle._engine.rec.raters[0]
        layer = handle._engine.llm_stages[0].score_layer
    assert raters.any()
    want = out.attentions[layer][0].mean(0)[raters].mean(0)
    torch.testing.assert_close(seen[0].rater_attention[0], want, atol=1e-5, rtol=1e-4)


def test_todre_removes_every_visual_token_once_the_text_looks_away_by_hand():
    # sample 0: the text pays 0.02 + 0.03 = 5 % of its attention to its visual tokens (< 10 %): all of them go;
    # sample 1: 0.2 + 0.1 = 30 %: all stay
    visual = torch.tensor([[False, True, True, False], [True, True, False, False]])
    attention = torch.tensor([[0.5, 0.02, 0.03, 0.45], [0.2, 0.1, 0.3, 0.4]])
    s = Signals(tokens=torch.zeros(2, 4, 1), visual=visual, text_attention=attention)
    assert ToDRERelevance().keep(s, torch.tensor([2, 2])).tolist() == [False, False, True, True]
    assert ToDRERelevance().layers(32) == [29] and ToDRERelevance().layers(8) == [7]    # checks 7L/8, drops after
    stage1, stage2 = ToDRE(retain=0.2).pipeline()
    assert stage1.name == "kcenter" and stage1.retain == 0.2 and stage2.tau == 0.1


def test_todre_text_attention_equals_the_eager_attention_weights(eager_model, single):
    """The rows of the text tokens after the image in the checking layer's real attention weights (head mean),
    averaged over them; all visual tokens go exactly when their share is below tau."""
    with torch.no_grad():
        out = eager_model(**single, output_attentions=True)
    after = int(visual_positions(eager_model, single["input_ids"])[-1]) + 1
    visual = torch.zeros(single["input_ids"].shape[1], dtype=torch.bool)
    visual[visual_positions(eager_model, single["input_ids"])] = True
    for tau, gone in ((0.0, False), (1.01, True)):
        with vtr.patch(eager_model, ToDRERelevance(tau=tau)) as handle:
            plugin, seen = handle.plugins[0], []
            drop = plugin.drop
            plugin.drop = lambda s, k: (seen.append(s), drop(s, k))[1]
            with torch.no_grad():
                eager_model(**single)
            layer = handle._engine.llm_stages[0].score_layer
        want = out.attentions[layer][0].mean(0)[after:].mean(0)
        torch.testing.assert_close(seen[0].text_attention[0], want, atol=1e-5, rtol=1e-4)
        protected = 0 if handle._engine.rec.protected is None else int(handle._engine.rec.protected.sum())
        assert len(handle.kept()[0]) == (protected if gone else int(visual.sum()))


def test_prumerge_plus_outliers_uniform_samples_and_merge_by_hand():
    """8 patches x_j = (j, 1); attention 0.9 on patch 0, 0.01/0.02 elsewhere: Q1 = 0.01, Q3 = 0.02, the fence
    0.035 leaves one outlier (patch 0). Budget 4: the outlier, 2 uniform samples among the other 7 (their 2nd and
    6th: patches 2 and 6), and the extra token at the last patch not kept (7). With 7 other tokens all are among the
    32 nearest, so x_i <- x_i + sum_{j != i} a_j x_j, where sum_j a_j x_j = (0.40, 1.0); the extra token is
    sum over patches 1, 3, 4, 5, 7 of a_j x_j = (0.24, 0.06)."""
    x = torch.stack([torch.arange(8.0), torch.ones(8)], dim=1)[None]
    a = torch.tensor([[0.9, 0.01, 0.02, 0.01, 0.02, 0.01, 0.02, 0.01]])
    s = Signals(tokens=x, cls_attention=a, keys=torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(0)))
    kept, merged = PruMergePlus().zip(s, 4)
    assert kept.tolist() == [[0, 2, 6, 7]]
    torch.testing.assert_close(merged[0, [0, 2, 6, 7]],
                               torch.tensor([[0.40, 1.1], [2.36, 1.98], [6.28, 1.98], [0.24, 0.06]]))


def test_sparsevlm_stats_report_the_papers_layer_average(llava, llava_single):
    """The paper's "192 tokens" is the visual-token count averaged over the decoder's layers: stats() report it."""
    with vtr.patch(llava, "sparsevlm", retain=0.25) as handle, torch.no_grad():
        llava(**llava_single)
    stats = handle.stats()[0]
    assert stats["layer_avg_tokens"] == sum(stats["tokens_per_layer"]) / len(stats["tokens_per_layer"])
    assert stats["visual_tokens_out"] < stats["layer_avg_tokens"] < stats["visual_tokens_in"]
