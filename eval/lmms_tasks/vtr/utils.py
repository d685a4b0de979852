"""Functions the vtr_shapes and vtr_clips task YAMLs name: the image or video, the prompt text, and the two scores."""
from pathlib import Path

from PIL import Image

from vtr.eval.evaluate import is_correct, normalise

# The folders of the test.jsonl files, which the "image" and "video" paths are relative to: the same files the YAMLs'
# data_files name.
ASSETS = Path(__file__).resolve().parents[3] / "assets"


def doc_to_visual(doc):
    with Image.open(ASSETS / "shapes-test" / doc["image"]) as im:
        return [im.convert("RGB")]


def clip_to_visual(doc):
    """A video task's visual is the video's path; the model samples its frames."""
    return [str(ASSETS / "clips-test" / doc["video"])]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def process_results(doc, results):
    """exact_match: the normalised prediction (lower case, punctuation stripped) equals the normalised answer;
    accuracy: it starts with the answer's words, the rule ``vtr eval`` scores by."""
    prediction = results[0]
    return {"exact_match": float(normalise(prediction) == normalise(doc["answer"])),
            "accuracy": float(is_correct(prediction, doc["answer"]))}
