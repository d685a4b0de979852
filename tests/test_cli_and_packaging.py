"""The command line and the installed package, as a user meets them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_bench_quick_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--methods", "divprune,fastv", "--retain", "0.25", "--repeats", "1",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["method"] for r in result["rows"]] == ["divprune", "fastv"]
    for row in result["rows"]:
        assert row["prefill_s"] > 0 and row["ideal_s"] > 0 and row["analytic_speedup"] > 1
    assert "analytic" in capsys.readouterr().out


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
            "assert {'random', 'fastervlm', 'divprune', 'globalcom2', 'fastv', 'pdrop', 'tome', 'evit'} <= "
            "set(vtr.methods()); "
            "vtr.demo.default_example(); "
            "import pathlib; assert (pathlib.Path(vtr.builtin.shipped_model_path()) / 'model.safetensors').is_file()"
            % str(target))
    env = {**os.environ, "PYTHONPATH": str(target)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)
