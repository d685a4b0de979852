"""Videos: per-frame budgets for any method, and the temporal methods' rules pinned on small examples."""
import pytest
import torch

import vtr
from vtr.compat import CACHE_ARG
from vtr.kernels import density_peaks, dpc_merge, dpc_merge_groups, rows_up_to
from vtr.adapters import adapter_for
from vtr.plugins import (DyCoke, FastVID, FrameFusion, FrameSample, HoliTom, HoliTomInner, PruneVid, PruneVidMerge,
                         PruneVidPrune, Signals)
from vtr.plugins.base import apportion
from vtr.plugins.fastvid import segments
from vtr.plugins.framefusion import allowed
from vtr.plugins.holitom import static_windows
from vtr.plugins.prunevid import contiguous

from transformers import DynamicCache

from conftest import BATCH, _model, split_batch
from oracle import _causal, encode, oracle_generate, sequence_after, stock_positions, visual_positions
from references import fastvid_video, holitom_segments, holitom_video, prunevid_video
from test_methods import unit
from tiny_models import IMAGE, make_inputs

VIDEO_MODELS = ["llava_onevision", "llava_next_video", "qwen2_vl", "qwen3_vl"]


def frames_of(t, h, w, d=4, seed=0):
    """(1, t*h*w, d) random frame-major tokens and their Signals."""
    x = torch.randn(1, t * h * w, d, generator=torch.Generator().manual_seed(seed))
    return Signals(tokens=x, frames=(t, h, w), token_grid=[(t * h, w)])


def test_framesample_keeps_equidistant_whole_frames_by_hand():
    s = frames_of(8, 2, 2)                              # 8 frames of 4 tokens
    # 8 tokens -> 2 frames, the centres of [0, 4) and [4, 8): frames 2 and 6, whole
    assert FrameSample().select(s, 8).tolist() == [[8, 9, 10, 11, 24, 25, 26, 27]]
    # 6 tokens -> ceil(6 / 4) = 2 frames (2 and 6), 3 tokens each, evenly spaced: floor((i + 1/2) 4 / 3) = 0, 2, 3
    assert FrameSample().select(s, 6).tolist() == [[8, 10, 11, 24, 26, 27]]
    # 5 tokens -> 2 frames, 3 + 2 tokens; 2 of 4: floor((i + 1/2) 4 / 2) = 1, 3
    assert FrameSample().select(s, 5).tolist() == [[8, 10, 11, 25, 27]]


@pytest.mark.parametrize("arch", VIDEO_MODELS)
def test_per_frame_budget_applies_to_every_frame(arch):
    model = _model(arch, "sdpa")
    inputs = make_inputs(model, [[1, 5, IMAGE, 6, 7]], seed=1, video=True)
    for method in ("random", "divprune", "fastv"):
        with vtr.patch(model, method, budget=2, per_frame=True) as handle, torch.no_grad():
            model(**inputs)
        frames = handle.stats()[0]["frames"]
        newline = int(arch == "llava_onevision")          # OneVision's closing newline: kept, in the last frame
        assert len(frames) > 1 and [out for _, out in frames] == [2] * (len(frames) - 1) + [2 + newline], method
        with vtr.patch(model, method, budget=2) as handle, torch.no_grad():
            model(**inputs)
        assert handle.stats()[0]["visual_tokens_out"] == 2 + newline              # without: one budget per video


def test_per_frame_splits_an_image_method_into_frames():
    """A per-frame run of a pre-LLM method keeps, in each frame, what the method keeps on that frame alone."""
    model = _model("qwen2_vl", "sdpa")
    inputs = make_inputs(model, [[1, 5, IMAGE, 6, 7]], seed=1, video=True)
    with vtr.patch(model, "divprune", retain=0.5, per_frame=True) as handle, torch.no_grad():
        model(**inputs)
    kept = handle.kept()[0]
    with torch.no_grad():
        embeds = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    embeds = torch.cat(list(embeds.pooler_output if hasattr(embeds, "pooler_output") else embeds))
    t, h, w = (inputs["video_grid_thw"][0] // torch.tensor([1, 2, 2])).tolist()
    per = h * w
    for frame in range(t):
        alone = vtr.plugins.DivPrune().select(Signals(tokens=embeds[None, frame * per:(frame + 1) * per]), per // 2)
        assert sorted((alone[0] + frame * per).tolist()) == kept[(kept >= frame * per) & (kept < (frame + 1) * per)]\
            .tolist()


def test_frame_methods_refuse_models_and_inputs_without_frames():
    with pytest.raises(ValueError, match="framesample needs the frames of each video.*LlavaNext"):
        vtr.patch(_model("llava_next", "sdpa"), "framesample")
    with pytest.raises(ValueError, match="random per_frame needs the frames"):
        vtr.patch(_model("internvl", "sdpa"), "random", per_frame=True)
    with pytest.raises(ValueError, match="per_frame must be True or False"):
        vtr.patch(_model("llava", "sdpa"), "random", per_frame="yes")
    with pytest.raises(ValueError, match="must be the first stage"):
        vtr.patch(_model("llava", "sdpa"), ["random", vtr.plugins.Uniform(per_frame=True)])
    model = _model("llava_onevision", "sdpa")
    images = make_inputs(model, [[1, 5, IMAGE, 6, 7]], seed=1)
    with vtr.patch(model, "framesample"), pytest.raises(ValueError, match="need videos on LlavaOnevisionForConditionalGeneration"):
        model(**images)


def test_dycoke_ttm_pairs_then_windows_of_four_by_hand():
    """8 frames of 2 tokens (token p of frame f is index 2f + p). Pairs: frame 1 vs 0, 3 vs 2, 5 vs 4, 7 vs 6;
    windows of 4 (i < T - 4: only i = 0): frame 2 vs 0. Frames 0, 4 and 6 stay whole."""
    a, b = unit(0), unit(90)
    frames = [[a, b]] * 8
    frames[1] = [a, unit(80)]           # vs frame 0: similarities 1, 0.98 -> keeps token 1 (index 3)
    frames[2] = [unit(60), b]           # vs frame 0: 0.5, 1 -> token 0 (4)
    frames[3] = [unit(60), unit(-90)]   # vs frame 2: 1, -1 -> token 1 (7)
    frames[5] = [unit(30), b]           # vs frame 4: 0.87, 1 -> token 0 (10)
    frames[7] = [a, unit(0)]            # vs frame 6: 1, 0 -> token 1 (15)
    s = Signals(tokens=torch.tensor([sum(frames, [])]), frames=(8, 1, 2))

    def kept(plugin, k=0):
        return sorted(plugin.select(s, k)[0].tolist())

    assert kept(DyCoke(k=0.5)) == [0, 1, 3, 4, 7, 8, 9, 10, 12, 13, 15]       # int((1 - 0.5) 2) = 1 per pruned frame
    assert kept(DyCoke(budget=11), 11) == kept(DyCoke(k=0.5))                 # 6 whole + 5 shared by 5 frames
    assert kept(DyCoke(budget=8), 8) == [0, 1, 3, 4, 8, 9, 12, 13]            # 2 left: frames 1 and 2 keep one
    # below the whole frames (vtr's extension): frames 0, 4, 6 keep their token least similar to the next frame
    assert kept(DyCoke(budget=3), 3) == [1, 8, 13]


def test_dycoke_default_keeps_the_papers_share_of_a_32_frame_video():
    t = 32
    s = frames_of(t, 14, 14, seed=3)
    kept = DyCoke().select(s, 0)
    # 7 full windows of 196 + 3 x 58, and the last window (i = 28 is not < 28) as pairs: 196 + 58 + 196 + 58
    assert kept.shape[1] == 7 * (196 + 3 * 58) + 2 * (196 + 58) == 3098
    assert len(set(kept[0].tolist())) == kept.shape[1]


def test_density_peaks_by_hand():
    # points 0, 1, 2, 10 on a line, 3 nearest (self included): mean d^2 = 5/3, 2/3, 5/3, 145/3; point 1 is densest
    # (delta = largest distance, 10), points 0 and 2 have point 1 at distance 1, point 10 has point 2 at 8
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    rho = torch.tensor([-5 / 3, -2 / 3, -5 / 3, -145 / 3]).exp()
    torch.testing.assert_close(density_peaks(x, 3), rho * torch.tensor([1.0, 10.0, 1.0, 8.0]))


@pytest.mark.parametrize("beta", [None, 0.6])
def test_dpc_of_many_groups_at_once_equals_each_group_alone(beta):
    """Groups of different sizes, centres and neighbours, padded into one batch, cluster and merge as each does
    alone; a group may keep none or all of its tokens. The padding would change the result if it leaked: copies of a
    group's first token (its nearest neighbours, and dense), then far-off tokens (the largest distance)."""
    gen = torch.Generator().manual_seed(0)
    sizes, centres, neighbours = [9, 3, 14, 5, 6], [4, 3, 6, 0, 2], [7, 2, 7, 4, 1]
    x = torch.full((len(sizes), 16, 8), 50.0)
    groups = [torch.randn(n, 8, generator=gen) for n in sizes]
    for g, tokens in enumerate(groups):
        x[g, :len(tokens)] = tokens
        x[g, len(tokens):len(tokens) + 2] = tokens[0]
    centre, merged = dpc_merge_groups(x, sizes, centres, neighbours, beta)
    centre, merged = centre.split(centres), merged.split(centres)                  # group after group
    for g, tokens in enumerate(groups):
        if centres[g]:
            want_centre, want_merged = dpc_merge(tokens, centres[g], neighbours[g], beta)
            assert torch.equal(centre[g], want_centre)
            torch.testing.assert_close(merged[g], want_merged)
    assert torch.equal(centre[1], torch.arange(3))                                 # all of a group: each its own
    torch.testing.assert_close(merged[1], groups[1])
    index = torch.arange(len(sizes) * 16).view(len(sizes), 16) + 1000              # entries of an index instead
    assert dpc_merge_groups(x, sizes, centres, neighbours, beta, index=index)[0].tolist() == \
        [1000 + 16 * g + c for g in range(len(sizes)) for c in centre[g].tolist()]
    assert rows_up_to(centres, 6).tolist() == [0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 15, 16, 17, 24, 25]


def test_fastvid_segments_by_hand():
    g = torch.tensor([unit(0), unit(10), unit(60), unit(65)])      # transitions: 0.985, 0.643, 0.996
    assert segments(g, 2, 0.9) == [[0, 1], [2, 3]]                 # the lowest one (after frame 1)
    assert segments(g, 2, 0.99) == [[0], [1], [2, 3]]              # and every one below tau
    assert segments(g, 1, 0.0) == [[0, 1, 2, 3]]


def test_fastvid_anchor_frames_share_the_segments_anchors():
    plugin = FastVID(step=4)
    # 6 frames, 2 anchors each: the last frame (5) and 5 - 4 = 1 hold 6 each
    assert plugin._anchor_counts(list(range(6)), [2] * 6, [10] * 6) == [0, 6, 0, 0, 0, 6]
    # frame 5 has room for 4: the other 2 go to the segment's other frames, last first
    assert plugin._anchor_counts(list(range(6)), [2] * 6, [10] * 5 + [4]) == [0, 6, 0, 0, 2, 4]


def test_fastvid_salient_then_density_anchors_merged_by_hand():
    """2 frames of 4 tokens, budget 4: 2 per frame, 1 salient + 1 anchor each (anchors=0.5); one segment, whose last
    frame (1) holds both anchors. Frame 1's non-salient tokens u1 = (0, 1), u2 = (0, 0.9), u3 = (-1, 0.1): u2 is the
    densest (score 0.76 x 0.95), then u3 (0.56 x 0.91), then u1 (0.74 x 0.07). Members by cosine: t1, t2, u1, u2 ->
    u2; t3, u3 -> u3. u2 = 0.6 u2 + 0.4 mean(0, 1.0) = (0, 0.94); u3 = 0.6 u3 + 0.4 (-1, 0.05) = (-1, 0.08)."""
    tokens = torch.tensor([[[1, 0], [0, 1], [0, 1.1], [-1, 0], [1, 0.1], [0, 1], [0, 0.9], [-1, 0.1]]])
    s = Signals(tokens=tokens, frames=(2, 1, 4),
                cls_attention=torch.tensor([[1.0, 0, 0, 0, 1.0, 0, 0, 0]]))
    picks, values = FastVID(anchors=0.5, segments=1, tau=0.0).reduce(s, 4)
    assert picks.tolist() == [[0, 4, 6, 7]]
    torch.testing.assert_close(values[0], torch.tensor([[1, 0], [1, 0.1], [0, 0.94], [-1, 0.08]]))


def scenes(seed, t=8, per=12, d=8):
    """A video (T, N, D) of two scenes: in each, positions 0-5 barely change from frame to frame, the others are
    new in every frame; and a random attention (T, N)."""
    gen = torch.Generator().manual_seed(seed)
    scene = torch.randn(3, per, d, generator=gen)[torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])[:t]]
    x = torch.where(torch.arange(per)[:, None] < 6, scene, torch.randn(t, per, d, generator=gen))
    return x + 0.05 * torch.randn(t, per, d, generator=gen), torch.rand(t, per, generator=gen)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("method", ["fastvid", "prunevid", "holitom"])
def test_temporal_merging_of_all_groups_at_once_equals_the_literal_rule(method, seed):
    """FastVID, PruneVid and HoliTom cluster and merge every frame, segment and anchor frame of a video in one set
    of launches; each equals its rule applied group by group (tests/references.py) on videos with several
    segments, static tokens and anchor frames."""
    x, attention = scenes(seed)
    t, per = attention.shape
    s = Signals(tokens=x.reshape(1, t * per, -1), frames=(t, 3, 4), cls_attention=attention.reshape(1, -1))
    if method == "fastvid":
        plugin, k = FastVID(segments=3, tau=0.0, step=2), 40
        want = fastvid_video(plugin, x, attention, k)
    elif method == "prunevid":
        plugin, k = PruneVidMerge(budget=24, tau=0.8), 24        # ties in sharing it: the rule's order
        want = prunevid_video(plugin, x, k)
    else:
        plugin, k = HoliTom(tau=0.8, inner=False), 30
        want = holitom_video(plugin, x, attention, k)
    picks, values = plugin.reduce(s, k)
    picks, order = picks[0].sort()
    assert torch.equal(picks, want[0])
    torch.testing.assert_close(values[0][order].float(), want[1])


def test_holitom_segmentation_maximises_the_tokens_saved_by_hand():
    # 4 frames, 3 positions; similar[t, p]: position p similar from frame t to t + 1
    similar = torch.tensor([[True, True, False], [True, False, False], [False, False, True]])
    # [0, 1] saves 1 x 2 (positions 0, 1); [0, 2] would save 2 x 1, no more: the shorter wins; then [2, 3] saves 1
    got = [(a, b, static.tolist(), count) for a, b, static, count in static_windows(similar)]
    assert got == [(0, 1, [True, True, False], 2), (2, 3, [False, False, True], 1)]
    assert apportion(4, [2, 1, 1, 1, 2, 2]) == [1, 1, 0, 0, 1, 1]      # largest remainders, ties to the earlier


@pytest.mark.parametrize("seed", range(6))
def test_holitom_segmentation_from_one_read_back_equals_the_literal_one(seed):
    """The counts of every candidate segment are read back at once; the segmentation is the literal rule's."""
    g = torch.Generator().manual_seed(seed)
    frames, positions = [1, 2, 5, 9, 16, 32][seed], 7
    similar = torch.rand(frames - 1, positions, generator=g) < 0.3 + 0.1 * seed
    got = static_windows(similar)
    want = holitom_segments(similar)
    assert [(a, b, static.tolist()) for a, b, static, _ in got] == [(a, b, s.tolist()) for a, b, s in want]
    assert all(count == int(static.sum()) for _, _, static, count in got)


def test_holitom_static_clusters_and_dynamic_attention_by_hand():
    """2 frames of 5 tokens: positions 0-3 equal in both (static, one segment saves 4), position 4 flips (dynamic).
    Budget 4 over what is left (4 static, 1 + 1 dynamic): 3 static clusters, 1 dynamic token of frame 0.
    Static tokens (0, 1), (1, 1), (2.5, 1), (10, 1): by density peaks (3 neighbours) the centres are positions 0, 1
    and 2; (10, 1) joins (2.5, 1), which becomes 0.6 (2.5, 1) + 0.4 (10, 1) = (5.5, 1)."""
    static = [[0, 1], [1, 1], [2.5, 1], [10, 1]]
    tokens = torch.tensor([static + [[1, -1]] + static + [[-1, 1]]])
    s = Signals(tokens=tokens, frames=(2, 1, 5), cls_attention=torch.ones(1, 10))
    picks, values = HoliTom(tau=0.8).reduce(s, 4)
    picks, order = picks.sort()                                  # the order of reduce()'s rows is free
    values = values.gather(1, order[..., None].expand_as(values))
    assert picks.tolist() == [[0, 1, 2, 4]]
    torch.testing.assert_close(values[0], torch.tensor([[0, 1], [1, 1], [5.5, 1], [1, -1]]))
    # a budget above what the collapse leaves (8 > 6): the segment is not collapsed, 4 tokens per frame by attention
    s.cls_attention = torch.tensor([[5.0, 4, 3, 2, 1] * 2])
    picks, values = HoliTom(tau=0.8).reduce(s, 8)
    assert picks.tolist() == [[0, 1, 2, 3, 5, 6, 7, 8]] and torch.equal(values[0], tokens[0, picks[0]])


def test_reuse_frames_skips_repeated_frames_in_the_tower_and_changes_nothing_else():
    model = _model("llava_onevision", "sdpa")
    inputs = make_inputs(model, [[1, 5, IMAGE, 6, 7]], seed=1, video=True)
    inputs["pixel_values_videos"][0, 1] = inputs["pixel_values_videos"][0, 0]        # frame 1 repeats frame 0
    seen = []
    embeddings = model.model.vision_tower.embeddings                                   # inside the tower
    spy = embeddings.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            stock = model(**inputs).logits
            for method in ("fastvid", "dycoke"):         # vision attention and projected features, both expanded
                with vtr.patch(model, method, retain=0.5) as plain:
                    model(**inputs)
                with vtr.patch(model, method, retain=0.5, reuse_frames=0.0) as reused:
                    model(**inputs)
                assert reused.encoder_inputs == (3, 4) and seen[-1] == 3 and seen[-2] == 4
                assert torch.equal(reused.kept()[0], plain.kept()[0]), method
            with vtr.patch(model, "random", retain=1.0, reuse_frames=0.0):
                torch.testing.assert_close(model(**inputs).logits, stock, atol=1e-5, rtol=0)
    finally:
        spy.remove()


def test_reuse_frames_bad_input():
    with pytest.raises(ValueError, match="reuse_frames must be a threshold >= 0"):
        vtr.patch(_model("llava_onevision", "sdpa"), "random", reuse_frames=-1)
    with pytest.raises(ValueError, match="cannot skip frames in the vision tower of Qwen2VL"):
        vtr.patch(_model("qwen2_vl", "sdpa"), "random", reuse_frames=0.1)


def test_prunevid_segments_are_made_contiguous_by_hand():
    # each label keeps its longest run (label 1's lone frame 2 is dropped); the gap 0-2 joins the run on its right
    assert contiguous([0, 0, 1, 0, 0, 0, 2, 2, 1, 1]) == [[0, 1, 2, 3, 4, 5], [6, 7], [8, 9]]
    # label 0's longest run is one frame: it goes; each end joins its only neighbour
    assert contiguous([0, 1, 1, 2, 2, 2, 0]) == [[0, 1, 2], [3, 4, 5, 6]]
    assert contiguous([1, 1, 0, 2, 2]) == [[0, 1, 2], [3, 4]]                   # a tie goes left


def test_prunevid_static_tokens_merge_over_time_by_hand():
    """One segment of 2 frames: positions 0 and 1 keep their direction (cosine 0.995, 1 > tau), position 2 turns 90
    degrees (cosine 0): 0 and 1 become their mean over the segment, placed in frame 0; groups this small (<= 14) are
    not clustered by default."""
    tokens = torch.tensor([[[1, 0], [0, 1], [1, 1], [1, 0.1], [0, 1], [-1, 1]]])
    picks, values = PruneVidMerge().reduce(Signals(tokens=tokens, frames=(2, 1, 3)), 0)
    assert picks.tolist() == [[0, 1, 2, 5]]
    torch.testing.assert_close(values[0], torch.tensor([[1, 0.05], [0, 1], [1, 1], [-1, 1]]))


def test_prunevid_budget_above_what_merging_leaves_merges_nothing_over_time():
    """The example above: merging its 2 static positions leaves 4 tokens. A budget of 4 keeps exactly those; a budget
    of 5 cannot be spent on them, so nothing merges over time: frame 0 keeps its 3 tokens as they are (3 of the 5 by
    largest remainders, ties to the earlier frame) and frame 1's 3 are clustered to 2."""
    tokens = torch.tensor([[[1, 0], [0, 1], [1, 1], [1, 0.1], [0, 1], [-1, 1]]])
    signals = Signals(tokens=tokens, frames=(2, 1, 3))
    picks, _ = PruneVidMerge(budget=4).reduce(signals, 4)
    assert picks.tolist() == [[0, 1, 2, 5]]
    picks, values = PruneVidMerge(budget=5).reduce(signals, 5)
    assert picks[0, :3].tolist() == [0, 1, 2] and len(picks[0]) == 5 and set(picks[0, 3:].tolist()) < {3, 4, 5}
    torch.testing.assert_close(values[0, :3], tokens[0, :3])


def test_prunevid_default_counts_each_video_of_a_batch_for_itself():
    """With neither retain nor budget, PruneVid's stage 1 keeps what its rule leaves of each video: a still video
    and a moving one of the same size, batched, keep different numbers, each what it keeps alone."""
    model = _model("llava_onevision", "sdpa")
    batch = make_inputs(model, [[1, 5, IMAGE, 6, 7]] * 2, seed=3, video=True)
    batch["pixel_values_videos"][0] = batch["pixel_values_videos"][0, :1]             # video 0: one frame, repeated
    with vtr.patch(model, "prunevid") as handle, torch.no_grad():
        model(**batch)
        kept = handle.kept(stage=0)
        for b in range(2):
            model(**{k: v[b:b + 1] for k, v in batch.items()})
            assert torch.equal(handle.kept(stage=0)[0], kept[b])
    assert len(kept[0]) < len(kept[1])


def test_prunevid_splits_the_budget_between_its_stages():
    merge, prune = PruneVid(retain=0.2).pipeline()
    assert (merge.retain, prune.retain) == (0.5, 0.4)
    merge, prune = PruneVid(retain=0.6).pipeline()                          # above alpha: stage 1 keeps everything
    assert merge.retain == 1.0 and prune.retain == pytest.approx(0.6)
    merge, prune = PruneVid(budget=8).pipeline()
    assert (merge.budget, prune.budget) == (20, 8)
    merge, prune = PruneVid().pipeline()
    assert merge.counts_itself and prune.retain == 0.4
    assert PruneVidPrune().layers(32) == [11] and PruneVidPrune().layers(8) == [3]      # scores with layer 10 of 32


def test_question_attention_is_max_over_heads_and_questions_without_rope():
    model = _model("qwen2_vl", "sdpa")
    adapter = adapter_for(model)
    layer = adapter.decoder_layers[2]
    attn = layer.self_attn
    x = torch.randn(2, 7, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    queries = torch.tensor([[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    keys = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1] * 7], dtype=torch.bool)                 # sample 0 padded
    with torch.no_grad():
        got = adapter.question_attention(layer, x, queries, keys)
        heads, kv, d = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
        q = attn.q_proj(x).view(2, 7, heads, d)
        k = attn.k_proj(x).view(2, 7, kv, d).repeat_interleave(heads // kv, dim=2)
    for b in range(2):
        logits = torch.einsum("qhd,khd->hqk", q[b], k[b]) * attn.scaling
        probs = logits.masked_fill(~keys[b], float("-inf")).softmax(-1)                  # (heads, 7, 7)
        want = probs[:, queries[b]].amax(0).amax(0)
        torch.testing.assert_close(got[b], want)


def test_holitom_inner_merge_is_a_running_average_by_hand():
    """Survivors 0 and 2; dropped 1 and 4 are closest to 0, 3 to 2. In sequence order: h0 <- (h0 + h1) / 2, then
    h0 <- (h0 + h4) / 2 = (1, -0.025); h2 <- (h2 + h3) / 2 = (0.05, 1)."""
    tokens = torch.tensor([[[1, 0], [1, 0.1], [0, 1], [0.1, 1], [1, -0.1]]])
    s = Signals(tokens=tokens, visual=torch.ones(1, 5, dtype=torch.bool), image=torch.zeros(5, dtype=torch.long))
    values = HoliTomInner().absorb(s, torch.tensor([True, False, True, False, False]))   # a row per visual token
    torch.testing.assert_close(values[[0, 2]], torch.tensor([[1, -0.025], [0.05, 1]]))
    outer, inner = HoliTom(retain=0.1).pipeline()                     # the outer stage keeps twice the final share
    assert outer.retain == 0.2 and inner.retain == 0.5 and outer.tau == 0.8 and inner.layers(28) == [18]
    outer, inner = HoliTom().pipeline()
    assert outer.target_retain == 0.10 and outer.tau == 0.65 and inner.retain is None
    assert outer.pipeline() == [outer]                                 # the stages do not expand again


@torch.no_grad()
def dycoke_kv_oracle(model, inputs, prompt_kept, layer, share, threshold, steps):
    """Greedy decoding of the stock layers on the kept prompt (original positions) where, at every new token, the
    attention weights of layer ``layer - 1`` (the eager module's own, head mean) choose the visual cache entries
    layers >= ``layer`` may see: the top ``share``, kept while the attention stays similar (cosine >= threshold)."""
    lm = model.model.language_model
    ids = inputs["input_ids"]
    embeds = lm.embed_tokens(ids)
    visual = visual_positions(model, ids)
    embeds[0, visual] = torch.cat(list(encode(model, inputs).pooler_output)).to(embeds.dtype)
    positions, delta = stock_positions(model, inputs)
    h, pos = embeds[:, prompt_kept], positions[..., prompt_kept]
    offered = torch.isin(prompt_kept, visual)
    if model.config.model_type == "llava_onevision":
        offered[torch.nonzero(offered)[-1]] = False                  # the video's closing newline is never hidden
    k = max(1, int(share * int(offered.sum()) + 0.5))
    cache, weights = DynamicCache(config=lm.config), []
    hook = lm.layers[layer - 1].self_attn.register_forward_hook(lambda m, a, out: weights.append(out[1]))
    tokens, logits, previous, chosen = [], [], None, None
    try:
        for step in range(steps):
            hidden_mask = None
            for i, block in enumerate(lm.layers):
                q, kv = h.shape[1], cache.get_seq_length(i) + h.shape[1]
                mask = _causal(q, kv, h.dtype)
                if step and i >= layer:
                    mask = mask.clone()
                    mask[..., :len(prompt_kept)][..., hidden_mask] = torch.finfo(h.dtype).min
                h = block(h, attention_mask=mask, position_ids=pos if pos.dim() == 2 else None,
                          position_embeddings=lm.rotary_emb(h, pos), **{CACHE_ARG: cache}, use_cache=True)
                if step and i == layer - 1:
                    a = weights[-1][0, :, -1, :len(prompt_kept)].mean(0)[offered].float()
                    if previous is None or torch.nn.functional.cosine_similarity(a, previous, dim=0) < threshold:
                        chosen = torch.zeros_like(a, dtype=torch.bool)
                        chosen[a.topk(k).indices] = True
                    previous = a
                    hidden_mask = offered.clone()
                    hidden_mask[offered] = ~chosen
            logits.append(model.lm_head(lm.norm(h)[:, -1])[0])
            tokens.append(logits[-1].argmax())
            h = lm.embed_tokens(tokens[-1][None, None])
            pos = torch.full_like(pos[..., -1:], ids.shape[1] + step + delta)
    finally:
        hook.remove()
    return torch.stack(tokens), torch.stack(logits)


@pytest.mark.parametrize("arch", ["llava_onevision", "qwen2_vl"])
def test_dycoke_kv_stage_equals_the_stock_layers_with_hidden_cache_entries(arch):
    model = _model(arch, "eager")
    inputs = make_inputs(model, [[1, 5, IMAGE, 6, 7]], seed=1, video=True)
    run = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with vtr.patch(model, "dycoke", retain=0.5, kv=0.7, kv_layer=3) as handle, torch.no_grad():
        out = model.generate(**inputs, **run)
        kept = sequence_after(model, inputs["input_ids"], handle.kept()[0])
        hidden = int(handle._engine.rec.hidden.sum())
    want_tokens, want_logits = dycoke_kv_oracle(model, inputs, kept, 3, 0.3, 0.9, 8)
    assert torch.equal(out.sequences[0, inputs["input_ids"].shape[1]:], want_tokens)
    torch.testing.assert_close(torch.stack(out.logits, 1)[0], want_logits, atol=1e-4, rtol=0)
    offered = len(handle.kept()[0]) - int(arch == "llava_onevision")        # OneVision's newline is never hidden
    assert hidden == offered - max(1, int(0.3 * offered + 0.5))
    assert handle.stats()[0]["decode"] == {"method": "dycoke_kv", "layer": 3,
                                           "visible_tokens": len(handle.kept()[0]) - hidden}
    with vtr.patch(model, "dycoke", retain=0.5), torch.no_grad():               # the cache stage changes the logits
        plain = model.generate(**inputs, **run)
    assert torch.equal(plain.logits[0], out.logits[0]) and not torch.allclose(plain.logits[1], out.logits[1])


def test_dycoke_kv_stage_batch_equals_per_sample():
    model = _model("qwen2_vl", "sdpa")
    batch = make_inputs(model, BATCH, seed=2, video=True)
    run = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with vtr.patch(model, "dycoke", retain=0.5, kv=0.7), torch.no_grad():
        together = model.generate(**batch, **run)
        for b, single in enumerate(split_batch(model, batch)):
            alone = model.generate(**single, **run)
            assert torch.equal(alone.sequences[0, -6:], together.sequences[b, -6:])
            torch.testing.assert_close(torch.stack(alone.logits, 1)[0], torch.stack(together.logits, 1)[b],
                                       atol=1e-4, rtol=0)


def test_dycoke_kv_decode_step_waits_once():
    """A hiding decode step waits for the device once, in transformers' check of the mask it is handed: which
    entries are hidden and how many images there are come from host counts and budgets. Without hiding (kv=0) a
    step waits for nothing."""
    from vtr.eval.bench import next_step
    from vtr.eval.launches import OpCount
    from vtr.hooks import watch_hooks

    model = _model("qwen2_vl", "sdpa")
    inputs = make_inputs(model, [BATCH[0]], seed=2, video=True)
    for kv, per_step in ((0.7, 1), (0.0, 0)):
        with vtr.patch(model, "dycoke", retain=0.5, kv=kv), torch.no_grad():
            out, step, syncs = model(**inputs, use_cache=True), inputs, []
            for _ in range(3):
                step = next_step(step, out)
                with watch_hooks(OpCount()) as count:
                    out = model(**step)
                syncs.append(count.syncs)
        assert syncs == [per_step] * 3, (kv, syncs)


def test_framefusion_cost_model_and_merge_by_hand():
    assert allowed([], 28, 0.3) == pytest.approx(0.7)
    assert allowed([0.3], 28, 0.3) == pytest.approx(1 - 7.7 / (27 * 0.7))       # 0.593, as the paper's code gives
    # 3 frames of 2 patches; token (frame, patch). Patch 0 barely moves: (1, 0), (1, 0.1), (1, 0.2), similarities
    # 0.995 and 0.998 to the token before; patch 1 turns: (0, 1), (-1, 0), (-1, 0.1): 0, then 0.995.
    # rho = 3 / 6 < U = 0.7: the three merge. Patch 0's run (frames 1, 2) folds into frame 0: mean (1, 0.1);
    # patch 1's frame 2 folds into frame 1: (-1, 0.05). rho >= 0.1: merging goes on at the next layer.
    tokens = torch.tensor([[[1, 0], [0, 1], [1, 0.1], [-1, 0], [1, 0.2], [-1, 0.1]]])
    s = Signals(tokens=tokens, visual=torch.ones(1, 6, dtype=torch.bool), image=torch.zeros(6, dtype=torch.long),
                frame=torch.tensor([0, 0, 1, 1, 2, 2]), patch=torch.tensor([0, 1, 0, 1, 0, 1]), state={})
    keep, values = FrameFusion().drop(s, torch.tensor([6]))
    assert keep.tolist() == [True, True, False, True, False, False]
    torch.testing.assert_close(values[keep], torch.tensor([[1, 0.1], [0, 1], [-1, 0.05]]))
    assert s.state["ratios"] == {0: [0.5]} and s.state["phase"] == {0: "merge"}
    # with a budget of 5 tokens, only one may merge: the most similar (patch 0, frame 2), and merging stops
    s.state = {}
    keep, values = FrameFusion(budget=5).drop(s, torch.tensor([5]))
    assert keep.tolist() == [True, True, True, True, False, True] and s.state["phase"] == {0: "done"}


@pytest.mark.parametrize("arch", ["llava_onevision", "qwen2_vl"])
def test_framefusion_merges_a_static_video_exactly(arch):
    """Frames that repeat (a static scene): the same-patch tokens merge in the first layers; the run equals the stock
    layers with the plugin's merges applied to their own hidden states (the contract's oracle)."""
    from test_contract import generate, merges_in_llm, oracle_merges, spy

    model = _model(arch, "sdpa")
    inputs = make_inputs(model, [[1, 5, IMAGE, 6, 7]], seed=1, video=True)
    key = "pixel_values_videos"
    if arch == "qwen2_vl":     # two temporal patches of the same frames
        half = inputs[key].shape[0] // 2
        inputs[key][half:] = inputs[key][:half]
    else:
        inputs[key][:, 1:] = inputs[key][:, :1]
    with vtr.patch(model, "framefusion") as handle:
        drops = {id(p): spy(p, "drop") for p in handle.plugins if merges_in_llm(p)}
        tokens, logits = generate(model, inputs)
        stages = handle._engine.stages
        kept = {s.layer: sequence_after(model, inputs["input_ids"], handle.kept(stage=i)[0])
                for i, s in enumerate(stages)}
        protected = handle._engine.rec.protected
        layers = handle.stats()[0]["tokens_per_layer"]
    # OneVision, 4 equal frames: 75 % of the tokens are similar, above the 70 % the cost model allows, so the top
    # 70 % merge at layer 0 and the method is done. Qwen2-VL, 2 equal temporal patches: 50 % merge at layer 0,
    # then, with nothing similar left, the prune at layer 2 keeps 1 - P
    visual = len(visual_positions(model, inputs["input_ids"])) - int(arch == "llava_onevision")
    calls = len(next(iter(drops.values())))       # once done, the engine skips the method's remaining stages
    if arch == "llava_onevision":
        assert layers[0] == layers[-1] == len(handle.kept()[0]) == visual - int(0.7 * visual) + 1     # + newline
        assert calls == 1
    else:
        assert layers[0] == layers[1] == visual // 2 and layers[-1] < layers[0]
        assert calls == 3                           # merge, merge (nothing similar left), prune
    want_tokens, want_logits = oracle_generate(
        model, inputs, None, kept, tokens.shape[1], None, oracle_merges(stages, drops),
        None if protected is None else protected[0].nonzero()[:, 0])
    assert torch.equal(tokens[0], want_tokens)
    torch.testing.assert_close(logits[0], want_logits, atol=1e-4, rtol=0)


def test_dycoke_kv_stage_sdpa_and_eager_hide_the_same_entries():
    hidden = []
    for attn in ("sdpa", "eager"):
        model = _model("qwen2_vl", attn)
        inputs = make_inputs(model, [[1, 5, IMAGE, 6, 7]], seed=1, video=True)
        with vtr.patch(model, "dycoke", retain=0.5, kv=0.7) as handle, torch.no_grad():
            tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
            hidden.append((handle.kept()[0], handle._engine.rec.hidden.clone(), tokens))
    assert all(torch.equal(a, b) for a, b in zip(*hidden))
