"""Functions the vtr_shapes task YAML names: the image, the prompt text, and the two scores."""
from pathlib import Path

from PIL import Image

from vtr.eval.evaluate import is_correct, normalise

# The folder of test.jsonl, which the "image" paths are relative to: the same file the YAML's data_files names.
ROOT = Path(__file__).resolve().parents[3] / "assets" / "shapes-test"


def doc_to_visual(doc):
    with Image.open(ROOT / doc["image"]) as im:
        return [im.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def process_results(doc, results):
    """exact_match: the normalised prediction (lower case, punctuation stripped) equals the normalised answer;
    accuracy: it starts with the answer's words, the rule ``vtr eval`` scores by."""
    prediction = results[0]
    return {"exact_match": float(normalise(prediction) == normalise(doc["answer"])),
            "accuracy": float(is_correct(prediction, doc["answer"]))}
