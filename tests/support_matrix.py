"""Writes the README's support matrix from a run of the correctness contract: ``python tests/support_matrix.py``.

A cell is checked only when every contract test of that architecture and method passed in this run (VLMs: retain 1.0
bit-identical and ``remove()``, greedy generation equal to the oracle at two retentions, padded batch equal to
per-sample runs, a sample without images beside one with, sdpa and eager keeping the same tokens, flash_attention_2's
path keeping them and generating as sdpa, bfloat16 and float16, autograd on; encoder-only ViTs: equal to the literal
rule, no reduction bit-identical and ``remove()``, bfloat16 and float16)."""
from __future__ import annotations

import collections
import pathlib
import re
import sys

import pytest

HERE = pathlib.Path(__file__).parent
README = HERE.parent / "README.md"
START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"


class Collect:
    def __init__(self):
        self.outcomes = collections.defaultdict(list)      # (arch, method) -> [(test, passed)]

    def pytest_runtest_logreport(self, report):
        if report.when != "call" and not (report.when == "setup" and report.failed):
            return
        encoder = re.search(r"test_encoders.py::(\w+)\[(\w+)-[\w-]+-(timm|open_clip)\]$", report.nodeid)
        match = re.search(r"test_contract.py::(\w+)\[(\w+)-(?:[\d.]+-|bf16-|fp16-)?([\w+]+)\]$", report.nodeid)
        if encoder:
            test, method, arch = encoder.groups()
            self.outcomes[arch, method].append((test, report.passed))
        elif match:
            test, arch, method = match.groups()
            self.outcomes[arch, method].append((test, report.passed))


def table(outcomes, classes: dict[str, str], methods: list[str]) -> str:
    lines = ["| model class | " + " | ".join(f"`{m}`" for m in methods) + " |",
             "|---|" + "---|" * len(methods)]
    for arch, cls in classes.items():
        cells = []
        for method in methods:
            runs = outcomes.get((arch, method), [])
            passed = sum(ok for _, ok in runs)
            if not runs:
                cells.append("n/a")          # skipped: the method refuses this class (it needs what it lacks)
            else:
                cells.append(f"✓ {passed}/{len(runs)}" if passed == len(runs) else f"✗ {passed}/{len(runs)}")
        lines.append(f"| {cls} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    sys.path.insert(0, str(HERE))
    from tiny_models import BUILDERS, VIDEO_ARCHS

    from vtr.plugins import ENCODER_METHODS, VLM_METHODS

    collect = Collect()
    code = pytest.main([str(HERE / "test_contract.py"), str(HERE / "test_encoders.py"), "-q", "-p",
                        "no:cacheprovider"], plugins=[collect])
    classes = {arch: f"`{type(build('sdpa')).__name__}`" for arch, build in sorted(BUILDERS.items())}
    classes.update({arch: f"{classes[base]} (video)" for arch, base in sorted(VIDEO_ARCHS.items())})
    encoders = {"timm": "`timm.VisionTransformer`", "open_clip": "`open_clip.VisionTransformer`"}
    text = README.read_text()
    start, end = text.index(START) + len(START), text.index(END)
    matrix = table(collect.outcomes, classes, VLM_METHODS) + "\n\nEncoder-only ViTs (encoder methods):\n\n" + \
        table(collect.outcomes, encoders, ENCODER_METHODS)
    README.write_text(text[:start] + "\n" + matrix + "\n" + text[end:])
    print(matrix)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
