"""Load visual-QA examples from a JSONL file (the format ``vtr.eval.shapes`` writes, or your own).

One JSON object per line with the required keys "image" or "video" (one of them: a path, relative to the
JSONL file's directory or absolute; a video is a file decord reads or a directory of frames, as
``vtr.video.load_video`` takes), "question" and "answer" (non-empty strings), and the optional keys "id"
and "family"; any other keys are kept in ``Example.extra``. Blank lines are ignored.

A bad line (invalid JSON, not an object, a required key missing or empty, both "image" and "video", a
non-string question or answer, an image that is missing or that PIL cannot read, a video that is missing or
whose first frame cannot be decoded) is reported as ``<file>:<line>: <reason>``:
``on_error="raise"`` raises ``ValueError`` at the first one; ``on_error="skip"`` warns once per bad
line, leaves it out, and counts it in the returned list's ``skipped`` attribute.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

REQUIRED = ("question", "answer")
VISUALS = ("image", "video")


@dataclass(frozen=True)
class Example:
    id: str
    image_path: Path | None   # absolute; None for a video row
    question: str
    answer: str
    family: str | None = None
    line: int = 0             # 1-based line number in the JSONL file
    extra: dict = field(default_factory=dict)
    video_path: Path | None = None     # absolute; None for an image row


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
    given = [k for k in VISUALS if k in obj]
    if len(given) != 1:
        raise ValueError("expected one of the keys 'image' or 'video'" + (", not both" if given else ""))
    kind = given[0]
    for key in (kind, *REQUIRED):
        value = obj.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError(f"missing or empty key {key!r}")
        if not isinstance(value, str):
            raise ValueError(f"{key!r} must be a string, got {type(value).__name__}")
    visual = root / obj[kind]   # an absolute path replaces root
    if not visual.exists():
        raise ValueError(f"{kind} {obj[kind]!r} not found")
    (_check_image if kind == "image" else _check_video)(visual, obj[kind])
    extra = {k: v for k, v in obj.items() if k not in (*VISUALS, *REQUIRED, "id", "family")}
    path_of = {"image_path": None, "video_path": None, f"{kind}_path": visual.resolve()}
    return Example(str(obj.get("id", f"{path.stem}-{line}")), path_of["image_path"], obj["question"], obj["answer"],
                   obj.get("family"), line, extra, path_of["video_path"])


def _check_image(path: Path, name: str):
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:   # PIL raises several types for broken files
        raise ValueError(f"image {name!r} unreadable ({type(e).__name__}: {e})") from None


def _check_video(path: Path, name: str):
    from vtr.video import load_video

    try:
        load_video(path, num_frames=1)
    except ImportError as e:
        raise ImportError(f"reading the video {name!r} needs decord: pip install 'vtr[video]' ({e})") from None
    except ValueError as e:
        raise ValueError(f"video {name!r} unreadable ({e})") from None


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
    if example.image_path is None:
        raise ValueError(f"example {example.id!r} is a video row, not an image row")
    with Image.open(example.image_path) as im:
        return im.convert("RGB")


def load_frames(example: Example, num_frames: int) -> list[Image.Image]:
    """``num_frames`` frames of a video row, uniformly spread over the clip (``vtr.video.load_video``)."""
    from vtr.video import load_video

    if example.video_path is None:
        raise ValueError(f"example {example.id!r} is an image row, not a video row")
    return [Image.fromarray(f) for f in load_video(example.video_path, num_frames=num_frames).frames]
