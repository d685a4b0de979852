"""Each method's selection rule pinned on small examples, and the selection kernels checked against the model's own
attention weights (eager, output_attentions), which vtr itself never asks for."""
import math

import pytest
import torch

import vtr
from vtr.kernels import attention_rows, max_min_diversity, topk_per_group
from vtr.plugins import DivPrune, FastV, FasterVLM, PyramidDrop, Random, Signals


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


def test_topk_per_group_by_hand():
    scores = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.2, 0.4])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    keep = topk_per_group(scores, group, torch.tensor([2, 1]))
    assert keep.tolist() == [False, True, True, True, False, False]


def test_attention_rows_matches_softmax_with_gqa_and_mask():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 6, 8)
    mask = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    want = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.5)
    want = want.masked_fill(~mask[:, None, None], float("-inf")).softmax(-1).mean(1)
    torch.testing.assert_close(attention_rows(q, k, 0.5, mask, chunk=4), want)


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
    picks = Random(seed=1).select(Signals(tokens=tokens, image_index=torch.tensor([0, 1, 0])), 5)
    assert torch.equal(picks[0], picks[2]) and not torch.equal(picks[0], picks[1])
    other = Random(seed=2).select(Signals(tokens=tokens, image_index=torch.tensor([0, 1, 0])), 5)
    assert not torch.equal(picks[0], other[0])


def _eager_attentions(model, inputs):
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
        vision = model.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    return out, vision


def test_cls_attention_kernel_equals_clip_attention_weights(eager_model, single):
    out, vision = _eager_attentions(eager_model, single)
    layer = len(vision.attentions) + eager_model.config.vision_feature_layer      # -2 -> second to last
    want = vision.attentions[layer][:, :, 0, 1:].mean(1)
    with vtr.patch(eager_model, "fastervlm", budget=5) as handle:
        with torch.no_grad():
            eager_model(**single)
        kept = handle.kept()[0]
    assert torch.equal(kept, want[0].topk(5).indices.sort().values)


@pytest.mark.parametrize("method,score_layer", [("fastv", 1), ("pdrop", 2)])
def test_last_token_attention_equals_decoder_attention_weights(eager_model, single, method, score_layer):
    """FastV scores with layer K-1 = 1, PyramidDrop's first stage with its own layer 2 (of 8): the recomputed row must
    pick the same tokens as the eager model's real attention weights (last query, head mean)."""
    out, _ = _eager_attentions(eager_model, single)
    visual = (single["input_ids"][0] == eager_model.config.image_token_id)
    row = out.attentions[score_layer][0, :, -1, :].mean(0)[visual]
    with vtr.patch(eager_model, method, budget=7) as handle:
        with torch.no_grad():
            eager_model(**single)
        first = handle.kept(stage=0)[0]
    k = len(first)
    assert torch.equal(first, row.topk(k).indices.sort().values)
