"""Seeded synthetic video QA: short clips of shapes that appear and move, with one-word temporal questions.

A clip is FRAMES frames (FPS per second) of the ``vtr.eval.shapes`` world, drawn at 224 px and stored at ``size`` px:
one or two still objects, one "mover" whose shape no other object has, and two or three objects that appear one at a
time (distinct shapes and colours), each staying once it is there. The mover crosses at least a third of the image
in a straight line during a window of 4-8 frames and holds still before and after, so most of the clip is runs of
identical frames: temporal merging has plenty to merge, and the answers sit in the few frames where something changes.

  last    "which color appeared last ?"            -> the colour of the object that appeared last
  first   "which shape appeared first ?"           -> the shape of the object that appeared first
  move    "did the <shape> move left or right ?"   -> left/right, or
          "did the <shape> move up or down ?"      -> up/down (the mover; image y grows downwards)

A split is written as ``<dir>/<split>.jsonl`` plus ``<dir>/clips/<id>.mp4`` (H.264 via PyAV), one JSON object per line:

  {"id": "test-00000", "video": "clips/test-00000.mp4", "question": "...", "answer": "...", "family": "last"}

with video paths relative to the JSONL file's directory (``vtr.eval.data`` loads these rows as well as image rows).
Splits use the seed ranges of ``shapes.SPLITS``: ``python -m vtr.eval.clips --out DIR --split test -n 90`` always
writes the same clips.
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from vtr.eval import shapes

FRAMES, FPS = 16, 4
FAMILIES = ("last", "first", "move")
TEMPLATES = {"last": "which color appeared last ?", "first": "which shape appeared first ?",
             "move_x": "did the {shape} move left or right ?", "move_y": "did the {shape} move up or down ?"}
ANSWERS = (*shapes.COLORS, *shapes.SHAPES, "left", "right", "up", "down")
MIN_TRAVEL = shapes.IMAGE_SIZE // 3


@dataclass(frozen=True)
class Clip:
    still: tuple[shapes.Obj, ...]
    mover: shapes.Obj                      # its position before it moves
    goal: tuple[int, int]                  # its centre after it moves
    move: tuple[int, int]                  # it moves from frame move[0] (still there) to frame move[1] (arrived)
    appearing: tuple[shapes.Obj, ...]      # in order of appearance
    appear_at: tuple[int, ...]             # the first frame each is visible in, increasing
    background: shapes.Background

    def mover_at(self, t: int) -> shapes.Obj:
        (t0, t1), o = self.move, self.mover
        f = min(1.0, max(0.0, (t - t0) / (t1 - t0)))
        x, y = round(o.x + f * (self.goal[0] - o.x)), round(o.y + f * (self.goal[1] - o.y))
        return shapes.Obj(o.shape, o.color, o.size, x, y)

    def scene_at(self, t: int) -> shapes.Scene:
        shown = [o for o, s in zip(self.appearing, self.appear_at) if s <= t]
        return shapes.Scene([*self.still, self.mover_at(t), *shown], self.background)


def _clip(rng: random.Random) -> Clip:
    colors = list(shapes.COLORS)
    for _ in range(1000):
        mover_shape = rng.choice(shapes.SHAPES)
        others = shapes._not(shapes.SHAPES, mover_shape)
        n_appear = rng.randint(2, 3)
        kinds, tints = rng.sample(others, n_appear), rng.sample(colors, n_appear)
        mover_size = rng.choice(("medium", "large"))
        h = shapes.SIZES[mover_size] // 2
        axis = rng.choice("xy")
        a, b = rng.randint(h, shapes.IMAGE_SIZE - 1 - h), rng.randint(h, shapes.IMAGE_SIZE - 1 - h)
        c = rng.randint(h, shapes.IMAGE_SIZE - 1 - h)
        if abs(a - b) < MIN_TRAVEL:
            continue
        start, goal = ((a, c), (b, c)) if axis == "x" else ((c, a), (c, b))
        mover = shapes.Obj(mover_shape, rng.choice(colors), mover_size, *start)
        t0 = rng.randint(0, FRAMES - 5)
        t1 = min(FRAMES - 1, t0 + rng.randint(4, 8))
        path = [shapes.Obj(mover.shape, mover.color, mover.size, *p) for p in _segment(start, goal)]
        placed = []
        specs = [(k, t, rng.choice(tuple(shapes.SIZES))) for k, t in zip(kinds, tints)]
        specs += [(rng.choice(others), rng.choice(colors), rng.choice(tuple(shapes.SIZES)))
                  for _ in range(rng.randint(1, 2))]
        for shape, color, size in specs:
            s = shapes.SIZES[size] // 2
            for _ in range(200):
                o = shapes.Obj(shape, color, size, rng.randint(s, shapes.IMAGE_SIZE - 1 - s),
                               rng.randint(s, shapes.IMAGE_SIZE - 1 - s))
                if not any(shapes.overlaps(o, p) for p in placed + path):
                    placed.append(o)
                    break
            else:
                break
        else:
            appear_at = tuple(sorted(rng.sample(range(1, FRAMES - 1), n_appear)))
            kind = rng.choice(("plain", "stripes", "noise"))
            background = shapes.Background(kind, rng.randint(25, 140), rng.randrange(2**31))
            return Clip(tuple(placed[n_appear:]), mover, goal, (t0, t1), tuple(placed[:n_appear]), appear_at,
                        background)
    raise RuntimeError("could not place a clip")


def _segment(start, goal, step: int = 4):
    """Points every ``step`` px along the mover's path, both ends included: what must stay clear of other objects."""
    n = max(1, max(abs(goal[0] - start[0]), abs(goal[1] - start[1])) // step)
    return [(round(start[0] + i / n * (goal[0] - start[0])), round(start[1] + i / n * (goal[1] - start[1])))
            for i in range(n + 1)]


def clip_questions(clip: Clip) -> list[tuple[str, str, str]]:
    """The (question, answer, family) of every family about one clip."""
    dx, dy = clip.goal[0] - clip.mover.x, clip.goal[1] - clip.mover.y
    if dx:
        move = (TEMPLATES["move_x"].format(shape=clip.mover.shape), "right" if dx > 0 else "left")
    else:
        move = (TEMPLATES["move_y"].format(shape=clip.mover.shape), "down" if dy > 0 else "up")
    return [(TEMPLATES["last"], clip.appearing[-1].color, "last"), (TEMPLATES["first"], clip.appearing[0].shape, "first"),
            (*move, "move")]


def frames(clip: Clip, size: int = 112) -> list:
    """The clip's FRAMES frames as PIL images of ``size`` px."""
    from PIL import Image

    return [shapes.draw(clip.scene_at(t)).resize((size, size), Image.BILINEAR) for t in range(FRAMES)]


def make_clip(seed: int, family: str | None = None, size: int = 112) -> dict:
    """One example: the clip's frames, a question of ``family`` (drawn from the seed when None) and its answer."""
    rng = random.Random(seed)
    drawn = rng.choice(FAMILIES)
    family = family or drawn
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    clip = _clip(rng)
    question, answer, _ = next(qa for qa in clip_questions(clip) if qa[2] == family)
    return {"frames": frames(clip, size), "question": question, "answer": answer, "family": family, "clip": clip}


def vocabulary() -> list[str]:
    words = set(ANSWERS)
    for template in TEMPLATES.values():
        for shape in shapes.SHAPES:
            words.update(template.format(shape=shape).split(" "))
    return sorted(words)


def write_mp4(path, images, fps: int = FPS):
    """Frames (PIL images, even sizes) to an H.264 mp4 with PyAV."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = images[0].size
        stream.pix_fmt = "yuv420p"
        for image in images:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(image.convert("RGB")), format="rgb24")))
        container.mux(stream.encode())


def write_split(directory, split: str, n: int, size: int = 112) -> Path:
    directory = Path(directory)
    (directory / "clips").mkdir(parents=True, exist_ok=True)
    seeds = shapes.SPLITS[split]
    out = directory / f"{split}.jsonl"
    with open(out, "w") as f:
        for i in range(n):
            ex = make_clip(seeds[i], FAMILIES[i % len(FAMILIES)], size)
            id_ = f"{split}-{i:05d}"
            write_mp4(directory / "clips" / f"{id_}.mp4", ex["frames"])
            row = {"id": id_, "video": f"clips/{id_}.mp4", "question": ex["question"], "answer": ex["answer"],
                   "family": ex["family"]}
            f.write(json.dumps(row) + "\n")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m vtr.eval.clips", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for <split>.jsonl and clips/")
    p.add_argument("--split", choices=tuple(shapes.SPLITS), default="test")
    p.add_argument("-n", type=int, default=90)
    p.add_argument("--size", type=int, default=112, help="frame size in px (even)")
    args = p.parse_args(argv)
    print(write_split(args.out, args.split, args.n, args.size))


if __name__ == "__main__":
    main()
