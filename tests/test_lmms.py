"""The lmms-eval model "vtr" (``vtr.eval.lmms``) and the vtr_shapes task; skipped where lmms-eval is not installed."""
import functools
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.models.model_utils.gen_metrics import reset_logged_metrics, summarize_logged_metrics  # noqa: E402
from lmms_eval.models.registry_v2 import ModelRegistryV2  # noqa: E402

from vtr.eval.data import load_examples, load_image  # noqa: E402
from vtr.eval.lmms import TASKS, VTRModel, manifest  # noqa: E402

TEST_SPLIT = Path(__file__).resolve().parents[1] / "assets" / "shapes-test" / "test.jsonl"
CLIPS_SPLIT = Path(__file__).resolve().parents[1] / "assets" / "clips-test" / "test.jsonl"
FASTV_QUARTER = {"visual_tokens_in": 196, "visual_tokens_out": 49, "retention": 0.25,
                 "layer_avg_retention": (2 * 196 + 2 * 49) / (4 * 196)}   # fastv keeps all for 2 of the 4 layers



@functools.lru_cache(maxsize=None)
def first_examples(n=3):
    return load_examples(TEST_SPLIT)[:n]


def answer(lm, gen_kwargs):
    """lm's responses to the first 3 test examples, asked as lmms-eval asks a simple model."""
    examples = first_examples()
    lm.task_dict = {"shapes": {"test": examples}}
    requests = [Instance("generate_until", (e.question, dict(gen_kwargs), lambda doc: [load_image(doc)], i, "shapes",
                                            "test"), idx=0, metadata={"task": "shapes", "doc_id": i, "repeats": 1})
                for i, e in enumerate(examples)]
    return lm.generate_until(requests)


def test_answers_and_records_what_each_request_kept(random_model_dir):
    reset_logged_metrics()
    lm = VTRModel.create_from_arg_string(f"pretrained={random_model_dir},method=fastv,retain=0.25",
                                         {"batch_size": 2})
    results = answer(lm, {"max_new_tokens": 3})          # 3 requests in batches of 2: one full, one short
    assert len(results) == 3
    for r in results:
        counts = r.token_counts.to_dict()
        assert {k: counts[k] for k in FASTV_QUARTER} == pytest.approx(FASTV_QUARTER)
        assert 1 <= counts["output_tokens"] <= 3 and counts["input_tokens"] > 196
    summary = summarize_logged_metrics()                 # what lmms-eval puts under "throughput"
    assert summary["avg_retention"] == pytest.approx(0.25) and summary["avg_visual_tokens_out"] == 49


def test_until_cuts_the_answer_and_retain_one_changes_nothing(random_model_dir):
    unpatched = VTRModel(pretrained=str(random_model_dir), method="none")
    kept_all = VTRModel(pretrained=str(random_model_dir), method="random", retain=1.0, batch_size=3)
    texts = [r.text for r in answer(unpatched, {"max_new_tokens": 4})]
    assert [r.text for r in answer(kept_all, {"max_new_tokens": 4})] == texts
    stats = answer(unpatched, {"max_new_tokens": 4})[0].token_counts
    assert (stats.visual_tokens_in, stats.visual_tokens_out, stats.retention) == (196, 196, 1.0)
    cut = [r.text for r in answer(unpatched, {"max_new_tokens": 4, "until": [" "]})]
    assert cut == [t.split(" ")[0] for t in texts]


def ask_about_clips(lm, n=3, frames=8):
    """lm's responses to the first n clips of the shipped video split, asked as lmms-eval asks: the visual is the
    video's path."""
    pytest.importorskip("decord")
    examples = load_examples(CLIPS_SPLIT)[:n]
    lm.task_dict = {"clips": {"test": examples}}
    return lm.generate_until([Instance("generate_until", (e.question, {"max_new_tokens": 2}, lambda doc: [str(doc.video_path)],
                                                          i, "clips", "test"), idx=0,
                                       metadata={"task": "clips", "doc_id": i, "repeats": 1})
                              for i, e in enumerate(examples)])


def test_video_requests(random_qwen_dir, random_model_dir):
    reset_logged_metrics()
    lm = VTRModel(pretrained=str(random_qwen_dir), method="fastv", retain=0.25, frames=8, batch_size=2)
    results = ask_about_clips(lm)
    # 8 frames of 112 px: 4 temporal patches of 7 x 7 merged tokens; fastv keeps a quarter.
    for r in results:
        counts = r.token_counts.to_dict()
        assert (counts["visual_tokens_in"], counts["visual_tokens_out"]) == (196, 49) and counts["retention"] == 0.25
    unpatched = VTRModel(pretrained=str(random_qwen_dir), method="none", frames=8)
    assert [r.token_counts.visual_tokens_in for r in ask_about_clips(unpatched, n=1)] == [196]
    with pytest.raises(ValueError, match="takes images only, not videos"):
        ask_about_clips(VTRModel(pretrained=str(random_model_dir), method="fastv", retain=0.5), n=1)
    with pytest.raises(ValueError, match="frames must be >= 1"):
        VTRModel(pretrained=str(random_qwen_dir), frames=0)


def test_bad_arguments_fail_before_loading(tmp_path):
    missing = str(tmp_path / "no-model")                 # loading it would fail with another error
    with pytest.raises(ValueError, match="unknown method"):
        VTRModel(pretrained=missing, method="nope")
    with pytest.raises(ValueError, match="'auto'"):
        VTRModel(pretrained=missing, batch_size="auto")


def test_loglikelihood_is_refused(random_model_dir):
    lm = VTRModel(pretrained=str(random_model_dir), method="fastv", retain=0.5)
    with pytest.raises(NotImplementedError, match="generate_until"):
        lm.loglikelihood([])


def test_manifest_resolves_to_the_class():
    registry = ModelRegistryV2()
    registry.register_manifest(manifest())
    assert registry.get_model_class("vtr") is VTRModel


def run_cli(tmp_path, model_args: str, task: str, limit: int, launcher=(sys.executable,)) -> tuple[dict, list[dict]]:
    """``lmms-eval`` in a subprocess, offline: the results JSON and the logged samples."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if "vtr" not in importlib.metadata.entry_points(group="lmms_eval.models").names:
        # vtr installed without the entry point (an older install): declare it in a stand-in distribution.
        info = tmp_path / "site" / "vtr_lmms_entry_point-0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vtr-lmms-entry-point\nVersion: 0\n")
        (info / "entry_points.txt").write_text("[lmms_eval.models]\nvtr = vtr.eval.lmms:manifest\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(info.parent), env.get("PYTHONPATH")]))
    out = tmp_path / "out"
    subprocess.run([*launcher, "-m", "lmms_eval", "--model", "vtr", "--model_args", model_args, "--batch_size", "2",
                    "--tasks", task, "--include_path", str(TASKS), "--limit", str(limit), "--output_path", str(out),
                    "--log_samples"], check=True, env=env, timeout=600, capture_output=True)
    (results_file,) = out.rglob("*_results.json")
    (samples_file,) = out.rglob(f"*_samples_{task}.jsonl")
    results = json.loads(results_file.read_text())
    assert results["n-samples"][task]["effective"] == limit
    assert {"exact_match,none", "accuracy,none"} <= set(results["results"][task])
    return results, [json.loads(line) for line in samples_file.read_text().splitlines()]


def test_cli_end_to_end_offline(random_model_dir, tmp_path):
    results, samples = run_cli(tmp_path, f"pretrained={random_model_dir},method=fastv,retain=0.25", "vtr_shapes", 4)
    assert results["throughput"]["avg_retention"] == pytest.approx(0.25)
    assert results["throughput"]["avg_visual_tokens_out"] == 49
    assert len(samples) == 4
    for s in samples:
        assert {k: s["token_counts"][0][k] for k in FASTV_QUARTER} == pytest.approx(FASTV_QUARTER)


def test_cli_data_parallel_offline(random_model_dir, tmp_path):
    """Two processes (torchrun on the CPU, gloo): lmms-eval gives each its share of the documents and gathers them."""
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    _, samples = run_cli(tmp_path, f"pretrained={random_model_dir},method=fastv,retain=0.25", "vtr_shapes", 6, launcher)
    assert sorted(s["doc_id"] for s in samples) == list(range(6))
    assert all(s["token_counts"][0]["visual_tokens_out"] == 49 for s in samples)


def test_cli_video_task_offline(random_qwen_dir, tmp_path):
    pytest.importorskip("decord")
    results, samples = run_cli(tmp_path, f"pretrained={random_qwen_dir},method=dycoke,frames=8", "vtr_clips", 3)
    assert len(samples) == 3 and all(s["token_counts"][0]["visual_tokens_in"] == 196 for s in samples)
    assert 0 < results["throughput"]["avg_retention"] < 1          # DyCoke merges the clips' repeated frames
