"""What each architecture adds to the contract: LLaVA-NeXT/OneVision newline tokens and anyres scoring, and the
support matrix the README shows."""
import pytest
import torch

import vtr
from vtr.plugins import VLM_METHODS

from conftest import BATCH, SINGLE, _model, applies
from oracle import visual_positions
from tiny_models import IMAGE, anyres_newlines, make_inputs, tiny_llava_next

ANYRES = ["llava_next", "llava_onevision", "llava_next_video"]


@pytest.mark.parametrize("arch", ANYRES)
@pytest.mark.parametrize("method", VLM_METHODS)
def test_newline_tokens_are_never_dropped_and_the_budget_is_per_image(arch, method):
    model = _model(arch, "sdpa")
    if not applies(model, method):
        pytest.skip(f"{method} does not apply to {type(model).__name__}")
    batch = make_inputs(model, BATCH, seed=2)
    newlines = anyres_newlines(model, batch)
    with vtr.patch(model, method, budget=3) as handle, torch.no_grad():
        model(**batch)
    first = 0
    for kept, prompt in zip(handle.kept(), BATCH):
        images = newlines[first:first + prompt.count(IMAGE)]
        first += len(images)
        is_newline = torch.cat(images)
        assert set(is_newline.nonzero()[:, 0].tolist()) <= set(kept.tolist())
        assert len(kept) == 3 * len(images) + int(is_newline.sum())


def _crop_scores(model, inputs) -> torch.Tensor:
    """Per crop patch, from the eager tower's attention weights: [CLS] row (CLIP) or mean received (SigLIP)."""
    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    attn = out.attentions[len(out.attentions) + model.config.vision_feature_layer]      # (crops, H, P', P')
    if model.config.vision_config.model_type == "clip_vision_model":
        return attn[:, :, 0, 1:].mean(1)
    return attn.mean(dim=(1, 2))


@pytest.mark.parametrize("arch,resize", [("llava_next", None), ("llava_onevision", None),
                                         ("llava_onevision", "anyres_max_1")])
def test_anyres_cls_scores_follow_the_models_packing(arch, resize):
    """FasterVLM on anyres models: crop-patch scores laid out by the model's own pack_image_features (unpadding,
    newlines, OneVision's resize of large grids), top-k per image over the non-newline features, under a forward
    pass and under generate() (which does not pass image_sizes on)."""
    model = _model(arch, "eager")
    if resize:
        model = tiny_llava_next("eager", onevision=True)
        model.config.vision_aspect_ratio = resize                # the packed grid is shrunk bilinearly
    inputs = make_inputs(model, [SINGLE], seed=1)
    scores = _crop_scores(model, inputs)
    crops = len(inputs["pixel_values"])
    nan = torch.full((1,), float("nan"))
    if arch == "llava_onevision":
        packed = model.model.pack_image_features([scores[..., None]], inputs["image_sizes"], image_newline=nan,
                                                 vision_aspect_ratio=model.config.vision_aspect_ratio)[0][0][:, 0]
    else:
        packed = model.model.pack_image_features([scores[..., None]], inputs["image_sizes"], "default",
                                                 image_newline=nan)[0][0][:, 0]
    assert crops > 1 and packed.isnan().any()
    if resize:
        grid_tokens = len(packed) - scores.shape[1] - int(packed.isnan().sum())
        assert grid_tokens < (crops - 1) * scores.shape[1], "the example must exercise the resize"
    want = set(packed.nan_to_num(-1).topk(4).indices.tolist()) | set(packed.isnan().nonzero()[:, 0].tolist())
    for run in ("forward", "generate"):
        with vtr.patch(model, "fastervlm", budget=4) as handle, torch.no_grad():
            model(**inputs) if run == "forward" else model.generate(**inputs, max_new_tokens=1)
        assert set(handle.kept()[0].tolist()) == want, run


def test_internvl_cls_scores_are_per_tile_and_folded_by_pixel_shuffle():
    """[CLS] row of each tile from the eager tower's attention weights, folded 2x2 by the model's pixel_shuffle;
    the budget applies to the whole image (its run of placeholders), across its tiles."""
    model = _model("internvl", "eager")
    inputs = make_inputs(model, [SINGLE], seed=1, first_image=1)        # an image of 3 tiles
    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    rows = out.attentions[-1][:, :, 0, 1:].mean(1)                        # feature layer -1
    tiles, side = rows.shape[0], int(rows.shape[1] ** 0.5)
    assert tiles == 3
    scores = model.model.pixel_shuffle(rows.reshape(tiles, side, side, 1)).mean(-1).flatten()
    with vtr.patch(model, "fastervlm", budget=6) as handle, torch.no_grad():
        model(**inputs)
    assert torch.equal(handle.kept()[0], scores.topk(6).indices.sort().values)


def test_every_supported_class_is_built_in_the_tests_and_listed_in_the_readme():
    """The contract runs on a tiny model of every supported class, and the README's matrix (written by
    tests/support_matrix.py) has a row for each and a column for every method."""
    import pathlib

    from tiny_models import BUILDERS

    built = {type(_model(arch, "sdpa")).__name__ for arch in BUILDERS}
    assert built == set(vtr.supported_models("vlm"))
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    matrix = readme.split("<!-- support-matrix:start -->")[1].split("<!-- support-matrix:end -->")[0]
    vlm_table = matrix.strip().split("\n\n")[0]
    rows = {line.split("`")[1] for line in vlm_table.splitlines()[2:]}
    assert rows == built
    assert all(f"`{m}`" in matrix.splitlines()[1] for m in VLM_METHODS)


@pytest.mark.parametrize("arch", ANYRES)
def test_anyres_layout_reads_each_images_crop_grid(arch):
    """The crop grid the adapter reads from the packed features is the one the model chose for the image size."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    from vtr.adapters import adapter_for

    model = _model(arch, "sdpa")
    inputs = make_inputs(model, [SINGLE, SINGLE, SINGLE], seed=4)            # three images of different sizes
    adapter = adapter_for(model)
    probe = adapter.projector.register_forward_hook(adapter._capture)
    try:
        with torch.no_grad():
            extra = {k: inputs[k] for k in ("batch_num_images",) if k in inputs}
            features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                      **extra).pooler_output
    finally:
        probe.remove()
    layout = adapter.anyres_layout(torch.cat(list(features)), [len(f) for f in features])
    side = model.config.vision_config.image_size
    want = [get_anyres_image_grid_shape(s.tolist(), model.config.image_grid_pinpoints, side)
            for s in inputs["image_sizes"]]
    assert [tuple(g) for g in layout["grid"].tolist()] == [tuple(w) for w in want]
    assert len(set(tuple(w) for w in want)) > 1


def test_globalcom2_on_a_resized_onevision_grid_keeps_the_budget():
    model = tiny_llava_next("sdpa", onevision=True)
    model.config.vision_aspect_ratio = "anyres_max_1"
    inputs = make_inputs(model, [SINGLE], seed=1)
    newlines = int(torch.cat(anyres_newlines(model, inputs)).sum())
    with vtr.patch(model, "globalcom2", budget=5) as handle:
        model.generate(**inputs, max_new_tokens=2)
    assert len(handle.kept()[0]) == 5 + newlines


def test_qwen_images_and_videos_in_one_batch_are_refused_clearly():
    from vtr.adapters import adapter_for

    adapter = adapter_for(_model("qwen2_vl", "sdpa"))
    grids = {"image_grid_thw": torch.tensor([[1, 4, 4]]), "video_grid_thw": torch.tensor([[2, 4, 4]])}
    with pytest.raises(NotImplementedError, match="images and videos in one batch"):
        adapter.image_token_counts(grids, None, {})
    assert adapter.image_token_counts({"video_grid_thw": grids["video_grid_thw"]}, None, {}) == [8]


def test_next_video_scores_are_pooled_per_frame_like_the_features():
    """LLaVA-NeXT-Video (CLIP) frames: the [CLS] row of the feature layer (eager weights), average-pooled 2x2 like the
    resampler pools the features, frames in a row, no newline."""
    model = _model("llava_next_video", "eager")
    inputs = make_inputs(model, [SINGLE], seed=1, video=True)
    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values_videos"].flatten(0, 1), output_attentions=True)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    cls = out.attentions[model.config.vision_feature_layer][:, :, 0, 1:].mean(1).view(-1, 1, side, side)
    pooled = torch.nn.functional.avg_pool2d(cls, 2).flatten()
    assert len(pooled) == len(visual_positions(model, inputs["input_ids"])) == 4 * (side // 2) ** 2
    with vtr.patch(model, "fastervlm", budget=5) as handle, torch.no_grad():
        model(**inputs)
    assert handle.kept()[0].tolist() == sorted(pooled.topk(5).indices.tolist())


def test_onevision_video_scores_are_pooled_per_frame_like_the_features():
    """SigLIP frames: the mean attention each patch receives (eager weights), pooled 2x2 by the model's own
    apply_pooling, frames in a row; the video's closing newline is kept on top of the budget."""
    model = _model("llava_onevision", "eager")
    inputs = make_inputs(model, [SINGLE], seed=1, video=True)
    frames = inputs["pixel_values_videos"].shape[1]
    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values_videos"].flatten(0, 1), output_attentions=True)
    received = out.attentions[-1].mean(dim=(1, 2))                                      # (frames, P)
    pooled = model.model.apply_pooling(received[..., None])[..., 0].flatten()
    assert len(pooled) + 1 == len(visual_positions(model, inputs["input_ids"])) and frames == 4
    with vtr.patch(model, "fastervlm", budget=5) as handle, torch.no_grad():
        model(**inputs)
    assert handle.kept()[0].tolist() == sorted(pooled.topk(5).indices.tolist() + [len(pooled)])
