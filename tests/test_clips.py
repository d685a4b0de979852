"""The synthetic video QA clips (``vtr.eval.clips``) and video rows in the data loader."""
import json
from collections import Counter

import numpy as np
import pytest

from vtr.eval import clips as C
from vtr.eval import shapes as S
from vtr.eval.data import load_examples, load_frames, load_image


def centre_colour(frame, o):
    return tuple(np.asarray(frame)[o.y, o.x])


def test_clip_events_hand_checked():
    """A clip built by hand: the square moves right during frames 4-8, a red circle appears at 2, a blue diamond at 10."""
    clip = C.Clip(still=(S.Obj("triangle", "green", "large", 40, 180),),
                  mover=S.Obj("square", "yellow", "medium", 40, 60), goal=(180, 60), move=(4, 8),
                  appearing=(S.Obj("circle", "red", "medium", 100, 140), S.Obj("diamond", "blue", "small", 180, 180)),
                  appear_at=(2, 10), background=S.Background("plain", 50))
    assert C.clip_questions(clip) == [("which color appeared last ?", "blue", "last"),
                                      ("which shape appeared first ?", "circle", "first"),
                                      ("did the square move left or right ?", "right", "move")]
    frames = C.frames(clip, size=S.IMAGE_SIZE)
    assert len(frames) == C.FRAMES
    assert [clip.mover_at(t).x for t in (0, 4, 6, 8, 15)] == [40, 40, 110, 180, 180]
    grey = (50, 50, 50)
    circle, diamond = clip.appearing
    assert [centre_colour(frames[t], circle) == grey for t in (1, 2)] == [True, False]
    assert [centre_colour(frames[t], diamond) for t in (9, 10)] == [grey, S.COLORS["blue"]]
    assert centre_colour(frames[0], clip.mover) == S.COLORS["yellow"] and centre_colour(frames[15], clip.mover) == grey
    # Still frames repeat exactly: only the appearances (2, 10) and the move (5..8) change the picture.
    changed = [t for t in range(1, C.FRAMES) if np.asarray(frames[t]).tolist() != np.asarray(frames[t - 1]).tolist()]
    assert changed == [2, 5, 6, 7, 8, 10]
    upward = C.Clip(clip.still, S.Obj("square", "yellow", "medium", 140, 180), (140, 40), (0, 4), clip.appearing,
                  clip.appear_at, clip.background)
    assert C.clip_questions(upward)[2] == ("did the square move up or down ?", "up", "move")


def test_generated_clips_are_well_posed():
    for seed in range(40):
        ex = C.make_clip(seed)
        clip = ex["clip"]
        objects = [*clip.still, *clip.appearing]
        assert [o.shape for o in objects].count(clip.mover.shape) == 0               # the mover's shape is unique
        assert len({o.color for o in clip.appearing}) == len({o.shape for o in clip.appearing}) == len(clip.appearing)
        assert list(clip.appear_at) == sorted(set(clip.appear_at)) and 0 < clip.appear_at[0]
        assert abs(clip.goal[0] - clip.mover.x) + abs(clip.goal[1] - clip.mover.y) >= C.MIN_TRAVEL
        for t in range(C.FRAMES):                                                    # nothing ever overlaps
            scene = clip.scene_at(t).objects
            assert all(S.in_bounds(o) for o in scene)
            assert not any(S.overlaps(a, b) for i, a in enumerate(scene) for b in scene[i + 1:])
        assert (ex["question"], ex["answer"], ex["family"]) in C.clip_questions(clip)
        assert all(w in C.vocabulary() for w in ex["question"].split() + [ex["answer"]])
    answers = Counter(C.make_clip(s, "move")["answer"] for s in range(200))
    assert set(answers) == {"left", "right", "up", "down"} and min(answers.values()) > 25
    with pytest.raises(ValueError, match="unknown family 'colour'"):
        C.make_clip(0, "colour")


def test_clips_are_seeded():
    a, b = C.make_clip(7), C.make_clip(7)
    assert a["clip"] == b["clip"] and np.asarray(a["frames"][5]).tolist() == np.asarray(b["frames"][5]).tolist()
    assert C.make_clip(8)["clip"] != a["clip"]


def test_write_split_and_video_rows(tmp_path):
    pytest.importorskip("av")
    pytest.importorskip("decord")
    path = C.write_split(tmp_path, "val", 3)
    exs = load_examples(path)
    assert [e.family for e in exs] == list(C.FAMILIES) and exs[0].image_path is None
    assert exs[1].video_path == (tmp_path / "clips" / "val-00001.mp4").resolve()
    expected = C.make_clip(S.SPLITS["val"][1], "first")
    assert (exs[1].question, exs[1].answer) == (expected["question"], expected["answer"])
    frames = load_frames(exs[1], C.FRAMES)
    drawn = np.stack([np.asarray(f, dtype=float) for f in expected["frames"]])
    decoded = np.stack([np.asarray(f, dtype=float) for f in frames])
    assert decoded.shape == drawn.shape and np.abs(decoded - drawn).mean() < 4          # H.264 is lossy, but close
    with pytest.raises(ValueError, match="is a video row"):
        load_image(exs[0])

    lines = [json.loads(x) for x in path.read_text().splitlines()]
    (tmp_path / "clips" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    bad = {"both": ({**lines[0], "image": "clips/val-00000.mp4"}, "expected one of the keys 'image' or 'video', not both"),
           "missing": ({**lines[0], "video": "clips/x.mp4"}, "video 'clips/x.mp4' not found"),
           "corrupt": ({**lines[0], "video": "clips/broken.mp4"}, "video 'clips/broken.mp4' unreadable")}
    for row, reason in bad.values():
        path.write_text("\n".join(json.dumps(x) for x in (lines[0], row)))
        with pytest.raises(ValueError, match=f"val.jsonl:2: {reason}"):
            load_examples(path)
        with pytest.warns(UserWarning, match=f"val.jsonl:2: {reason}"):
            assert len(load_examples(path, on_error="skip")) == 1
