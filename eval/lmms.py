"""lmms-eval model "vtr": a Hugging Face VLM, patched by vtr, answering lmms-eval's generate_until tasks.

    lmms-eval eval --model vtr --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=fastv,retain=0.25 \
        --tasks vtr_shapes --include_path "$(python -c 'import vtr.eval.lmms as m; print(m.TASKS)')" \
        --output_path out/lmms --log_samples

model_args: ``pretrained`` (a hub id or a local path; default: vtr's shipped tiny LLaVA), ``method`` (a vtr method, or
``none`` for the unpatched model), ``retain`` (fraction of visual tokens kept) or ``budget`` (tokens kept per image),
``attn_implementation``, ``max_new_tokens`` (used where the task sets none), ``frames`` (frames sampled uniformly
from each video of a video task, 16 by default; video tasks need a model whose processor takes videos, such as
Qwen2-VL or LLaVA-OneVision), ``device``, and any option of the method (for example ``layer=2``). The batch size is
lmms-eval's own ``--batch_size N`` (in model_args it would clash with it).

Devices: one process puts a hub model whole on its current GPU (vtr refuses a model spread over several devices). In
a multi-process run
(``accelerate launch --num_processes 8 -m lmms_eval ...``) each process puts the whole model on its own GPU,
``cuda:$LOCAL_RANK``, and lmms-eval gives each process its share of the documents.

Answers are greedy whatever the task's temperature; ``until`` strings cut them.

vtr's figures per request go into the samples log (``--log_samples``) under ``token_counts``: visual_tokens_in,
visual_tokens_out, retention and layer_avg_retention beside input_tokens and output_tokens. Their means over requests
go into the results JSON under ``throughput`` as avg_visual_tokens_in, avg_visual_tokens_out, avg_retention and
avg_layer_avg_retention.

lmms-eval finds this class through the entry point ``vtr = "vtr.eval.lmms:manifest"`` of the group
``lmms_eval.models``.
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from vtr.builtin import chat_prompt, model_inputs
from vtr.eval.evaluate import visual_token_mask

try:
    from lmms_eval.api.instance import GenerationResult, TokenCounts
    from lmms_eval.api.model import lmms
    from lmms_eval.models.model_utils.gen_metrics import log_metrics
except ImportError as err:
    raise ImportError("vtr.eval.lmms needs lmms-eval: pip install 'vtr[lmms]'") from err

TASKS = Path(__file__).with_name("lmms_tasks")      # the --include_path of the vtr_shapes and vtr_clips tasks
STATS = ("visual_tokens_in", "visual_tokens_out", "retention", "layer_avg_retention")


def manifest():
    """The entry point's payload: lmms-eval imports the class only when ``--model vtr`` asks for it."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vtr", simple_class_path="vtr.eval.lmms.VTRModel")


@dataclass
class VTRTokenCounts(TokenCounts):
    """lmms-eval writes ``to_dict()`` of each response's TokenCounts into its logged sample; this one adds vtr's."""
    visual_tokens_in: int | None = None
    visual_tokens_out: int | None = None
    retention: float | None = None
    layer_avg_retention: float | None = None

    def to_dict(self):
        return {**super().to_dict(), **{k: getattr(self, k) for k in STATS if getattr(self, k) is not None}}


class VTRModel(lmms):
    is_simple = True        # requests carry (context, gen_kwargs, doc_to_visual, doc_id, task, split)

    def __init__(self, pretrained: str | None = None, method: str = "fastv", retain: float | None = None,
                 budget: int | None = None, attn_implementation: str = "sdpa", max_new_tokens: int = 16,
                 batch_size: int | str = 1, device: str | None = None, max_batch_size: int | None = None,
                 frames: int = 16, **options):
        super().__init__()
        import vtr
        from vtr.builtin import load_model

        if str(batch_size).startswith("auto"):
            raise ValueError("the vtr model takes a number for --batch_size, not 'auto'")
        if method != "none":
            vtr.api.resolve(method, retain, budget, options)     # a bad method or option fails before the load
        self.batch_size, self.max_new_tokens, self.frames = int(batch_size), int(max_new_tokens), int(frames)
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        if device is None and int(os.environ.get("WORLD_SIZE", 1)) > 1 and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"     # data parallel: one whole model per process
        self.model, self.processor = load_model(pretrained, attn_implementation=attn_implementation, device=device)
        self.processor.tokenizer.padding_side = "left"
        self.handle = None if method == "none" else vtr.patch(self.model, method, retain=retain, budget=budget,
                                                              **options)

    @property
    def device(self) -> torch.device:
        """Where lmms-eval's multi-process runs put the tensors they gather."""
        return self.model.device

    def generate_until(self, requests) -> list[GenerationResult]:
        results = [None] * len(requests)

        def settings(i):            # requests with the same generation settings share generate() calls
            return repr(requests[i].args[1])

        for _, group in itertools.groupby(sorted(range(len(requests)), key=settings), key=settings):
            group = list(group)
            for start in range(0, len(group), self.batch_size):
                chunk = group[start:start + self.batch_size]
                for i, result in zip(chunk, self._answer([requests[i].args for i in chunk])):
                    results[i] = result
        return results

    def _answer(self, batch) -> list[GenerationResult]:
        gen_kwargs = batch[0][1]
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else until
        images, videos, texts = [], [], []
        for context, _, doc_to_visual, doc_id, task, split in batch:
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
            pictures = [v for v in visuals if isinstance(v, Image.Image)]
            clips = [self._frames(v) for v in visuals if isinstance(v, (str, Path))]
            if len(pictures) + len(clips) != len(visuals):
                kinds = sorted({type(v).__name__ for v in visuals})
                raise NotImplementedError(f"the vtr model answers image and video tasks only (got {kinds})")
            images += pictures
            videos += clips
            texts.append(chat_prompt(self.processor, context, len(pictures), len(clips)))
        inputs = model_inputs(self.model, self.processor, images, texts, videos)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(**inputs, do_sample=False,
                                      max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)))
        elapsed = time.perf_counter() - start
        new = out[:, inputs["input_ids"].shape[1]:]
        answers = self.processor.batch_decode(new, skip_special_tokens=True)
        stats = self._stats(inputs["input_ids"], bool(images or videos))
        pad = self.model.generation_config.pad_token_id
        results = []
        for b, text in enumerate(answers):
            for stop in until:
                text = text.split(stop)[0]
            produced = int((new[b] != pad).sum()) if pad is not None else new.shape[1]
            stat = {k: stats[b][k] for k in STATS}
            # One entry per request, so lmms-eval's summary means (avg_<key> in "throughput") are means per request.
            log_metrics(elapsed / len(batch), produced, produced / elapsed, {**stat, "total_requests": 1})
            counts = VTRTokenCounts(input_tokens=int(inputs["attention_mask"][b].sum()), output_tokens=produced, **stat)
            results.append(GenerationResult(text=text.strip(), token_counts=counts))
        return results

    def _frames(self, path) -> list:
        """A video task's visual is the video's path: ``frames`` frames, uniformly spread over it."""
        from vtr.video import load_video

        return list(load_video(path, num_frames=self.frames).frames)

    def _stats(self, input_ids, has_visuals: bool) -> list[dict]:
        if self.handle is not None and has_visuals:
            return self.handle.stats()       # the batch's prefill, which generate() just ran
        # Unpatched (method=none), or no image or video: every visual token is kept.
        visual = visual_token_mask(self.model, input_ids).sum(1).tolist()
        return [{"visual_tokens_in": n, "visual_tokens_out": n, "retention": 1.0, "layer_avg_retention": 1.0}
                for n in visual]

    def loglikelihood(self, requests):
        raise NotImplementedError("the vtr model answers generate_until tasks only; loglikelihood (multiple-choice "
                                  "scoring by likelihood) is not implemented: use the task's generate_until variant")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the vtr model answers single-round generate_until tasks only")
