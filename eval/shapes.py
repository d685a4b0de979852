"""Seeded synthetic visual QA: one-word questions about procedurally drawn shapes.

Each example is a 224x224 RGB image of 2-8 non-overlapping shapes (circle, square, triangle,
diamond in red, green, blue, yellow, purple or orange; small 14 px, medium 30 px, large 46 px
across) on a neutral grey background, plain or with low-contrast stripes or blocky noise.
Five question families, each answered by one lowercase word:

  color   "what color is the <shape> ?"              -> colour (the only object of that shape)
  exists  "is there a <color> <shape> ?"             -> yes/no (50/50, always with near misses:
                                                        the shape in another colour or the colour
                                                        on another shape)
  count   "how many <shape>s are there ?"            -> "1".."4" (uniform), other shapes as distractors
  side    "is the <shape> on the left or right ?"    -> left/right, or
          "is the <shape> at the top or bottom ?"    -> top/bottom (the only object of that shape,
                                                        centre >= 20 px off the middle line)
  small   "what color is the small <shape> ?"        -> colour (the only small object of that shape;
                                                        all others medium/large, one of them the
                                                        same shape in another colour)

Words are separated by single spaces and "?" is its own word. A split is written as
``<dir>/<split>.jsonl`` plus ``<dir>/images/<id>.png``, one JSON object per line:

  {"id": "test-00000", "image": "images/test-00000.png", "question": "...", "answer": "...",
   "family": "color"}

with image paths relative to the JSONL file's directory (see ``vtr.eval.data`` for the loader).
Splits use disjoint seed ranges, so ``python -m vtr.eval.shapes --out DIR --split test -n 500``
always writes the same examples.
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 224
SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 230),
          "yellow": (240, 220, 30), "purple": (150, 40, 200), "orange": (250, 130, 20)}
SIZES = {"small": 14, "medium": 30, "large": 46}
FAMILIES = ("color", "exists", "count", "side", "small")
TEMPLATES = {"color": "what color is the {shape} ?", "exists": "is there a {color} {shape} ?",
             "count": "how many {shape}s are there ?", "side_x": "is the {shape} on the left or right ?",
             "side_y": "is the {shape} at the top or bottom ?", "small": "what color is the small {shape} ?"}
ANSWERS = (*COLORS, "yes", "no", "1", "2", "3", "4", "left", "right", "top", "bottom")
SPLITS = {"val": range(0, 500_000), "test": range(500_000, 1_000_000), "train": range(1_000_000, 2**31)}
MARGIN = 4        # minimum gap in px between the bounding boxes of two objects
SIDE_GAP = 20     # side family: minimum distance in px of the target's centre from the middle line
MAX_OBJECTS = 8


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str     # "small" | "medium" | "large"
    x: int        # centre, px
    y: int

    @property
    def px(self) -> int:
        return SIZES[self.size]


@dataclass(frozen=True)
class Background:
    kind: str     # "plain" | "stripes" | "noise"
    tone: int     # grey level; textures vary around it by at most +-12
    seed: int = 0


@dataclass
class Scene:
    objects: list[Obj]
    background: Background = field(default_factory=lambda: Background("plain", 60))


def _background_array(bg: Background) -> np.ndarray:
    r = np.random.default_rng(bg.seed)
    if bg.kind == "plain":
        grey = np.full((IMAGE_SIZE, IMAGE_SIZE), bg.tone)
    elif bg.kind == "stripes":
        period = int(r.integers(6, 20))
        coord = np.add.outer(np.arange(IMAGE_SIZE), np.arange(IMAGE_SIZE) * int(r.integers(0, 2)))
        grey = bg.tone + 10 * ((coord // period) % 2) - 5
    else:   # coarse 8 px blocks of noise: textured, but cheap to store as PNG
        cells = r.integers(-12, 13, size=(IMAGE_SIZE // 8, IMAGE_SIZE // 8))
        grey = bg.tone + np.kron(cells, np.ones((8, 8), dtype=int))
    return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def _paint(pen: ImageDraw.ImageDraw, o: Obj, fill):
    h = o.px // 2
    box = (o.x - h, o.y - h, o.x + h, o.y + h)
    if o.shape == "circle":
        pen.ellipse(box, fill=fill)
    elif o.shape == "square":
        pen.rectangle(box, fill=fill)
    elif o.shape == "triangle":
        pen.polygon([(o.x, o.y - h), (o.x + h, o.y + h), (o.x - h, o.y + h)], fill=fill)
    else:
        pen.polygon([(o.x, o.y - h), (o.x + h, o.y), (o.x, o.y + h), (o.x - h, o.y)], fill=fill)


def draw(scene: Scene) -> Image.Image:
    image = Image.fromarray(_background_array(scene.background), "RGB")
    pen = ImageDraw.Draw(image)
    for o in scene.objects:
        _paint(pen, o, COLORS[o.color])
    return image


def object_map(scene: Scene) -> np.ndarray:
    """(IMAGE_SIZE, IMAGE_SIZE) uint8: 1 + the index of the object drawn at each pixel, 0 for background."""
    image = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    pen = ImageDraw.Draw(image)
    for i, o in enumerate(scene.objects):
        _paint(pen, o, i + 1)
    return np.asarray(image)


def overlaps(a: Obj, b: Obj) -> bool:
    return max(abs(a.x - b.x), abs(a.y - b.y)) < a.px // 2 + b.px // 2 + 1 + MARGIN


def in_bounds(o: Obj) -> bool:
    h = o.px // 2
    return h <= o.x < IMAGE_SIZE - h and h <= o.y < IMAGE_SIZE - h


def _scene(rng: random.Random, specs: list[tuple[str, str, str]], region=None) -> Scene:
    """Place (shape, color, size) specs at random without overlap; ``region(obj)`` constrains specs[0]."""
    for _ in range(1000):   # restart from scratch when a crowded scene gets stuck
        placed: list[Obj] = []
        for i, (shape, color, size) in enumerate(specs):
            h = SIZES[size] // 2
            for _ in range(200):
                o = Obj(shape, color, size, rng.randint(h, IMAGE_SIZE - 1 - h), rng.randint(h, IMAGE_SIZE - 1 - h))
                if not any(overlaps(o, p) for p in placed) and (i or region is None or region(o)):
                    placed.append(o)
                    break
            else:
                break
        else:
            rng.shuffle(placed)   # the target is not always drawn first
            kind = rng.choice(("plain", "stripes", "noise"))
            return Scene(placed, Background(kind, rng.randint(25, 140), rng.randrange(2**31)))
    raise RuntimeError(f"could not place {specs}")


def _not(values, value):
    return [v for v in values if v != value]


def _specs(rng, n, shapes=SHAPES, sizes=tuple(SIZES)):
    """n random (shape, color, size) specs."""
    return [(rng.choice(shapes), rng.choice(list(COLORS)), rng.choice(sizes)) for _ in range(n)]


def _color(rng):
    shape = rng.choice(SHAPES)
    specs = _specs(rng, 1, [shape]) + _specs(rng, rng.randint(1, MAX_OBJECTS - 1), _not(SHAPES, shape))
    return _scene(rng, specs), TEMPLATES["color"].format(shape=shape), specs[0][1]


def _exists(rng):
    shape, color, yes = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.random() < 0.5
    pairs = [(shape, color)] if yes else []
    for i in range(rng.randint(2, MAX_OBJECTS) - len(pairs)):
        if i == 0 or rng.random() < 0.5:   # near miss: the shape in another colour or the colour on another shape
            pairs.append(rng.choice([(shape, c) for c in _not(COLORS, color)] + [(s, color) for s in _not(SHAPES, shape)]))
        else:
            pairs.append(rng.choice(_not([(s, c) for s in SHAPES for c in COLORS], (shape, color))))
    specs = [(s, c, rng.choice(tuple(SIZES))) for s, c in pairs]
    return _scene(rng, specs), TEMPLATES["exists"].format(color=color, shape=shape), "yes" if yes else "no"


def _count(rng):
    shape, k = rng.choice(SHAPES), rng.randint(1, 4)
    specs = _specs(rng, k, [shape]) + _specs(rng, rng.randint(k + 1, MAX_OBJECTS) - k, _not(SHAPES, shape))
    return _scene(rng, specs), TEMPLATES["count"].format(shape=shape), str(k)


def _side(rng):
    shape, axis = rng.choice(SHAPES), rng.choice("xy")
    answer = rng.choice(("left", "right") if axis == "x" else ("top", "bottom"))

    def region(o):   # image y grows downwards, so "top" is the low-y side
        d = (o.x if axis == "x" else o.y) - (IMAGE_SIZE - 1) / 2
        return d <= -SIDE_GAP if answer in ("left", "top") else d >= SIDE_GAP

    specs = _specs(rng, 1, [shape]) + _specs(rng, rng.randint(1, MAX_OBJECTS - 1), _not(SHAPES, shape))
    return _scene(rng, specs, region), TEMPLATES["side_" + axis].format(shape=shape), answer


def _small(rng):
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    decoy = (shape, rng.choice(_not(COLORS, color)), rng.choice(("medium", "large")))
    rest = _specs(rng, rng.randint(0, MAX_OBJECTS - 2), sizes=("medium", "large"))
    return _scene(rng, [(shape, color, "small"), decoy] + rest), TEMPLATES["small"].format(shape=shape), color


def scene_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """Every well-posed (question, answer, family) of the five families about one scene - one "yes" and one "no" (a
    near miss where possible) for exists - shuffled. Training asks several per image, so each image costs one vision
    pass for several answers."""
    qa = []
    middle = (IMAGE_SIZE - 1) / 2
    for shape in SHAPES:
        objs = [o for o in scene.objects if o.shape == shape]
        if len(objs) == 1:
            o = objs[0]
            qa.append((TEMPLATES["color"].format(shape=shape), o.color, "color"))
            if abs(o.x - middle) >= SIDE_GAP:
                qa.append((TEMPLATES["side_x"].format(shape=shape), "left" if o.x < middle else "right", "side"))
            if abs(o.y - middle) >= SIDE_GAP:
                qa.append((TEMPLATES["side_y"].format(shape=shape), "top" if o.y < middle else "bottom", "side"))
        if 1 <= len(objs) <= 4:
            qa.append((TEMPLATES["count"].format(shape=shape), str(len(objs)), "count"))
        small = [o for o in objs if o.size == "small"]
        if len(small) == 1:
            qa.append((TEMPLATES["small"].format(shape=shape), small[0].color, "small"))
    present = sorted({(o.shape, o.color) for o in scene.objects})
    absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in present]
    # The "no" is a near miss where the scene has one (its shape in another colour, or its colour on another shape),
    # as in the exists family: a question a model cannot answer from one attribute alone.
    near = [(s, c) for s, c in absent if any(o.shape == s or o.color == c for o in scene.objects)]
    for (shape, color), answer in ((rng.choice(present), "yes"), (rng.choice(near or absent), "no")):
        qa.append((TEMPLATES["exists"].format(color=color, shape=shape), answer, "exists"))
    rng.shuffle(qa)
    return qa


_FAMILY_FNS = {"color": _color, "exists": _exists, "count": _count, "side": _side, "small": _small}


def vocabulary() -> list[str]:
    words = set(ANSWERS)
    for template in TEMPLATES.values():
        for shape in SHAPES:
            for color in COLORS:
                words.update(template.format(shape=shape, color=color).split(" "))
    return sorted(words)


def generate(seed: int, family: str | None = None) -> tuple[Scene, str, str, str]:
    """(scene, question, answer, family) for a seed; ``family=None`` draws the family from the seed."""
    rng = random.Random(seed)
    drawn = rng.choice(FAMILIES)   # always drawn, so generate(s) == generate(s, its own family)
    family = family or drawn
    if family not in _FAMILY_FNS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return (*_FAMILY_FNS[family](rng), family)


def make_example(seed: int, family: str | None = None) -> dict:
    scene, question, answer, family = generate(seed, family)
    return {"image": draw(scene), "question": question, "answer": answer, "family": family, "scene": scene}


def examples(split: str, n: int):
    """n examples of a split, families round-robin (so balanced), seeds from the split's range."""
    seeds = SPLITS[split]
    if n > len(seeds):
        raise ValueError(f"split {split!r} has only {len(seeds)} seeds")
    for i in range(n):
        yield make_example(seeds[i], FAMILIES[i % len(FAMILIES)])


def write_split(directory, split: str, n: int) -> Path:
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    out = directory / f"{split}.jsonl"
    with open(out, "w") as f:
        for i, ex in enumerate(examples(split, n)):
            id_ = f"{split}-{i:05d}"
            ex["image"].save(directory / "images" / f"{id_}.png", optimize=True)
            row = {"id": id_, "image": f"images/{id_}.png", "question": ex["question"],
                   "answer": ex["answer"], "family": ex["family"]}
            f.write(json.dumps(row) + "\n")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m vtr.eval.shapes", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for <split>.jsonl and images/")
    p.add_argument("--split", choices=tuple(SPLITS), default="test")
    p.add_argument("-n", type=int, default=500)
    args = p.parse_args(argv)
    print(write_split(args.out, args.split, args.n))


if __name__ == "__main__":
    main()
