"""Load visual-QA examples from a JSONL file (the format ``vtr.eval.shapes`` writes, or your own).

One JSON object per line with the required keys "image" (a path, relative to the JSONL file's
directory or absolute), "question" and "answer" (non-empty strings), and the optional keys "id" and
"family"; any other keys are kept in ``Example.extra``. Blank lines are ignored.

A bad line (invalid JSON, not an object, a required key missing or empty, a non-string question or
answer, an image that is missing or that PIL cannot read) is reported as ``<file>:<line>: <reason>``:
``on_error="raise"`` raises ``ValueError`` at the first one; ``on_error="skip"`` warns once per bad
line, leaves it out, and counts it in the returned list's ``skipped`` attribute.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

REQUIRED = ("image", "question", "answer")


@dataclass(frozen=True)
class Example:
    id: str
    image_path: Path          # absolute
    question: str
    answer: str
    family: str | None = None
    line: int = 0             # 1-based line number in the JSONL file
    extra: dict = field(default_factory=dict)


class Examples(list):
    """A list of Example that also records how many bad lines were skipped."""
    skipped: int = 0


def _parse(text: str, root: Path, path: Path, line: int) -> Example:
    """One line to an Example; raises ValueError with the bare reason."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    for key in REQUIRED:
        value = obj.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError(f"missing or empty key {key!r}")
        if not isinstance(value, str):
            raise ValueError(f"{key!r} must be a string, got {type(value).__name__}")
    image = root / obj["image"]   # an absolute "image" replaces root
    if not image.is_file():
        raise ValueError(f"image {obj['image']!r} not found")
    try:
        with Image.open(image) as im:
            im.verify()
    except Exception as e:   # PIL raises several types for broken files
        raise ValueError(f"image {obj['image']!r} unreadable ({type(e).__name__}: {e})") from None
    extra = {k: v for k, v in obj.items() if k not in (*REQUIRED, "id", "family")}
    return Example(str(obj.get("id", f"{path.stem}-{line}")), image.resolve(), obj["question"], obj["answer"],
                   obj.get("family"), line, extra)


def load_examples(path, on_error: str = "raise") -> Examples:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    path = Path(path)
    out = Examples()
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                out.append(_parse(text, path.parent, path, line))
            except ValueError as e:
                message = f"{path}:{line}: {e}"
                if on_error == "raise":
                    raise ValueError(message) from None
                warnings.warn(message, stacklevel=2)
                out.skipped += 1
    if not out:
        raise ValueError(f"{path}: no valid examples" + (f" ({out.skipped} bad lines skipped)" if out.skipped else ""))
    return out


def load_image(example: Example) -> Image.Image:
    with Image.open(example.image_path) as im:
        return im.convert("RGB")
