"""The synthetic shapes QA generator (vtr.eval.shapes) and the JSONL loader (vtr.eval.data)."""
import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vtr.eval import shapes as S
from vtr.eval.data import load_examples, load_image

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "shapes-test" / "test.jsonl"
SEEDS = range(60)


def _target_shape(question):
    return next(s for s in S.SHAPES if f" {s} " in question or f" {s}s " in question)


def test_deterministic_per_seed():
    a, b = S.make_example(123), S.make_example(123)
    assert (a["question"], a["answer"], a["family"]) == (b["question"], b["answer"], b["family"])
    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert S.generate(123) == S.generate(123, a["family"])
    assert S.generate(123, "count") != S.generate(124, "count")
    with pytest.raises(ValueError, match="unknown family"):
        S.generate(0, "nope")


@pytest.mark.parametrize("family", S.FAMILIES)
def test_answers_agree_with_scene(family):
    for seed in SEEDS:
        scene, q, a, f = S.generate(seed, family)
        objs, shape = scene.objects, _target_shape(q)
        same = [o for o in objs if o.shape == shape]
        assert f == family and 2 <= len(objs) <= S.MAX_OBJECTS
        if family == "color":
            assert len(same) == 1 and a == same[0].color
        elif family == "exists":
            color = q.split(" ")[3]
            assert a == ("yes" if any((o.shape, o.color) == (shape, color) for o in objs) else "no")
            assert any((o.shape == shape) != (o.color == color) for o in objs)   # a near miss
        elif family == "count":
            assert a == str(len(same)) and a in "1234" and len(same) < len(objs)
        elif family == "side":
            (o,) = same
            d = (o.x if "left" in q else o.y) - (S.IMAGE_SIZE - 1) / 2
            assert abs(d) >= S.SIDE_GAP
            assert a == (("right" if d > 0 else "left") if "left" in q else ("bottom" if d > 0 else "top"))
        else:
            small = [o for o in same if o.size == "small"]
            assert len(small) == 1 and a == small[0].color
            assert all(o.size != "small" for o in objs if o is not small[0]) and len(same) >= 2


def test_scene_questions_by_hand():
    import random

    scene = S.Scene([S.Obj("circle", "red", "small", 30, 30), S.Obj("square", "blue", "large", 180, 112),
                     S.Obj("square", "green", "medium", 60, 180)])
    qa = {q: a for q, a, _ in S.scene_questions(scene, random.Random(0))}
    assert qa["what color is the circle ?"] == "red"
    assert qa["what color is the small circle ?"] == "red"
    assert qa["is the circle on the left or right ?"] == "left"
    assert qa["is the circle at the top or bottom ?"] == "top"
    assert qa["how many squares are there ?"] == "2" and qa["how many circles are there ?"] == "1"
    assert "what color is the square ?" not in qa                  # two squares: not well-posed
    assert "how many triangles are there ?" not in qa              # answers are 1..4
    assert sorted(a for q, a in qa.items() if q.startswith("is there")) == ["no", "yes"]
    for q, a in qa.items():
        if q.startswith("is there"):
            _, _, _, color, shape, _ = q.split()
            assert (a == "yes") == any(o.shape == shape and o.color == color for o in scene.objects)
            assert any(o.shape == shape or o.color == color for o in scene.objects)     # a near miss, if a "no"


def test_objects_in_bounds_and_apart():
    for seed in range(200):
        objs = S.generate(seed)[0].objects
        assert all(S.in_bounds(o) for o in objs)
        assert not any(S.overlaps(p, q) for i, p in enumerate(objs) for q in objs[i + 1:])


def test_vocabulary_covers_questions_and_answers():
    vocab = S.vocabulary()
    assert vocab == sorted(set(vocab)) == S.vocabulary() and len(vocab) == 38
    for seed in range(100):
        _, q, a, _ = S.generate(seed)
        words = q.split(" ")
        assert q == q.lower() and words[-1] == "?" and all(w in vocab for w in words)
        assert a in vocab and " " not in a


def test_drawn_pixels_hand_checked():
    bg = S.Background("plain", 50)
    scene = S.Scene([S.Obj("circle", "red", "large", 40, 40), S.Obj("triangle", "blue", "small", 150, 100),
                     S.Obj("diamond", "yellow", "medium", 100, 180)], bg)
    px = np.asarray(S.draw(scene))
    assert px.shape == (S.IMAGE_SIZE, S.IMAGE_SIZE, 3)
    for o in scene.objects:
        assert tuple(px[o.y, o.x]) == S.COLORS[o.color]
    assert tuple(px[0, 0]) == tuple(px[-1, -1]) == (50, 50, 50)
    assert tuple(px[40 - 22, 40 - 22]) == (50, 50, 50)   # a circle's bounding-box corner is background


def test_generated_centres_have_object_colour_and_background_is_grey():
    for seed in range(10):
        ex = S.make_example(seed)
        px = np.asarray(ex["image"])
        for o in ex["scene"].objects:
            assert tuple(px[o.y, o.x]) == S.COLORS[o.color]
        bg = np.asarray(S.draw(S.Scene([], ex["scene"].background)))
        assert (bg == bg[:, :, :1]).all() and bg.max() <= 160   # neutral, darker than every shape colour's max


def test_write_split_round_trip(tmp_path):
    path = S.write_split(tmp_path, "val", 10)
    exs = load_examples(path)
    assert len(exs) == 10 and exs.skipped == 0
    assert [e.family for e in exs] == list(S.FAMILIES) * 2
    assert exs[0].id == "val-00000" and exs[0].image_path == (tmp_path / "images" / "val-00000.png").resolve()
    expected = S.make_example(S.SPLITS["val"][3], S.FAMILIES[3])
    assert (exs[3].question, exs[3].answer) == (expected["question"], expected["answer"])
    assert np.array_equal(np.asarray(load_image(exs[3])), np.asarray(expected["image"]))


def test_splits_disjoint():
    ranges = sorted(S.SPLITS.values(), key=lambda r: r.start)
    assert all(a.stop <= b.start for a, b in zip(ranges, ranges[1:]))


GOOD = {"image": "images/ok.png", "question": "what color is the circle ?", "answer": "red"}
BAD = {
    "json": ("{not json", "invalid JSON"),
    "not object": ('["a", "b"]', "expected a JSON object, got list"),
    "missing": (json.dumps({"image": "images/ok.png", "question": "q ?"}), "missing or empty key 'answer'"),
    "empty": (json.dumps({**GOOD, "question": " "}), "missing or empty key 'question'"),
    "non-string": (json.dumps({**GOOD, "answer": 3}), "'answer' must be a string, got int"),
    "no image": (json.dumps({**GOOD, "image": "images/x.png"}), "image 'images/x.png' not found"),
    "broken image": (json.dumps({**GOOD, "image": "images/broken.png"}), "image 'images/broken.png' unreadable"),
}


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "images" / "ok.png")
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    return tmp_path


@pytest.mark.parametrize("case", BAD)
def test_bad_line_raises_or_skips(data_dir, case):
    line, reason = BAD[case]
    path = data_dir / "data.jsonl"
    path.write_text("\n".join([json.dumps(GOOD), "", json.dumps({**GOOD, "id": "b", "x": 1}), line, ""]))
    with pytest.raises(ValueError) as e:
        load_examples(path)
    assert f"data.jsonl:4: {reason}" in str(e.value)
    with pytest.warns(UserWarning, match=r"data\.jsonl:4: "):
        exs = load_examples(path, on_error="skip")
    assert len(exs) == 2 and exs.skipped == 1
    assert [e.line for e in exs] == [1, 3] and exs[1].id == "b" and exs[1].extra == {"x": 1}
    assert load_image(exs[0]).getpixel((0, 0)) == (1, 2, 3)


def test_loader_edge_cases(data_dir):
    path = data_dir / "data.jsonl"
    path.write_text(json.dumps({**GOOD, "image": str((data_dir / "images" / "ok.png").resolve())}) + "\n")
    assert load_examples(path)[0].id == "data-1"   # absolute image path, default id
    with pytest.raises(ValueError, match="on_error"):
        load_examples(path, on_error="ignore")
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="no valid examples"):
        load_examples(path)
    path.write_text("{bad\n")
    with warnings.catch_warnings(record=True), pytest.raises(ValueError, match=r"no valid examples \(1 bad"):
        warnings.simplefilter("always")
        load_examples(path, on_error="skip")


def test_shipped_test_split():
    exs = load_examples(SHIPPED)
    assert len(exs) == 500 and exs.skipped == 0
    assert Counter(e.family for e in exs) == {f: 100 for f in S.FAMILIES}
    first = S.make_example(S.SPLITS["test"][0], S.FAMILIES[0])
    assert (exs[0].question, exs[0].answer) == (first["question"], first["answer"])
    assert np.array_equal(np.asarray(load_image(exs[0])), np.asarray(first["image"]))
    assert sum(p.stat().st_size for p in SHIPPED.parent.rglob("*") if p.is_file()) < 3_000_000
