"""The hook engine: turns a list of plugins into forward hooks on a stock model and applies what they select.

Hook points (all ``register_forward_hook`` / ``register_forward_pre_hook(with_kwargs=True)`` on stock modules):
- the multimodal model's forward (pre): starts a record at prefill, or a decode step;
- the vision feature layer (pre): [CLS] attention, for methods that need it;
- the language model (pre): pre-LLM methods select per image on the projected features (read from inputs_embeds,
  since generate() may run the vision tower before the forward), and the losers leave the sequence, mask and position
  ids;
- each decoder layer from the first in-LLM stage on (pre): drops at stage layers, and gives every later layer the
  mask, position ids and RoPE cos/sin of the shortened sequence;
- the first decoder layers (post), for models that add visual features there (Qwen3-VL DeepStack): the engine adds
  them to the visual tokens still in the sequence;
- the key projection of a layer that scores for a later stage (post): the last token's attention row is computed from
  the keys the layer computes anyway (a stage that scores with its own layer, before dropping, recomputes them).

Conventions: survivors keep their original position ids (gaps stay), so decoding continues at the original positions;
each shortened sequence is left-padded again, so samples of a batch may keep different numbers of tokens. The KV
cache of a layer holds the sequence that layer saw, so layers after an in-LLM stage cache fewer entries.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import create_causal_mask

from vtr.encoder import EncoderEngine
from vtr.compat import CACHE_ARG, cache_of
from vtr.hooks import HookSet, map_output
from vtr.kernels import gather_tokens, group_counts, query_rows, true_first
from vtr.layout import Layout, Record, Stage
from vtr.plugins.base import DecodePlugin, EncoderPlugin, LLMPlugin, Plugin, Signals


def _repeated_images(encoded: dict) -> list[int] | None:
    """generate() with num_beams or num_return_sequences > 1 encodes each image once and repeats each sample's group
    of features for every copy of the sample; where the features are a list, the copies are the same tensor
    objects. For each image the language model receives, the encoded one it repeats (None: nothing repeated). The
    vision pass's own signals ([CLS] scores, merges, grids) cover the encoded images only."""
    for out in encoded.values():
        features = getattr(out, "pooler_output", None)
        if isinstance(features, (list, tuple)):
            first: dict[int, int] = {}
            source = [first.setdefault(id(f), len(first)) for f in features]
            if len(first) < len(source):
                return source
    return None


def _check_cache(past, length: int):
    """vtr shortens the sequence inside the language model, so each layer's cache holds as many entries as that
    layer saw; a cache with fixed slots per layer (StaticCache: ``cache_implementation="static"``) or a quantized one
    would not match. A sliding window (LLaVA-NeXT's Mistral keeps 4,096 tokens by default) is accepted for a prompt
    of ``length`` tokens that it holds whole, where it is a full cache and vtr's causal masks are the model's.
    Refused at the forward pass's start, before anything has run."""
    if past is None:
        return
    for layer in past.layers:
        if type(layer) is DynamicSlidingWindowLayer and length > layer.sliding_window:
            raise ValueError(f"vtr: a prompt of {length} tokens is longer than the model's sliding window "
                             f"({layer.sliding_window}); vtr's masks would differ from the model's there")
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            kinds = ", ".join(sorted({type(layer).__name__ for layer in past.layers}))
            raise ValueError(f"vtr: a {type(past).__name__} ({kinds} layers) cannot hold the shorter sequences vtr "
                             "makes; generate with the default dynamic cache (no cache_implementation)")


class Engine(HookSet):
    def __init__(self, adapter, plugins: list[Plugin], reuse_frames: float | None = None):
        super().__init__()
        self.adapter = adapter
        self.plugins = plugins
        if reuse_frames is not None:
            if isinstance(reuse_frames, bool) or not isinstance(reuse_frames, (int, float)) or reuse_frames < 0:
                raise ValueError(f"reuse_frames must be a threshold >= 0, got {reuse_frames!r}")
            if not adapter.reuses_frames:
                raise ValueError(f"reuse_frames: vtr cannot skip frames in the vision tower of "
                                 f"{type(adapter.model).__name__} (it needs one pixel tensor per frame or crop)")
        self.reuse_frames = reuse_frames
        self.reused_from: torch.Tensor | None = None   # the encoded input each vision input reuses (reuse_frames)
        self.encoder_inputs = [0, 0]                # inputs encoded, inputs in all, of the last vision pass
        self.num_layers = len(adapter.decoder_layers)
        self.stages: list[Stage] = []
        last_layer = -1
        self.decode: DecodePlugin | None = None       # a method that hides cache entries while decoding (last)
        self.tower = None                             # an encoder method running inside the vision tower
        self.tower_kept: torch.Tensor | None = None   # (images, W) each merged token's first patch
        for plugin in plugins:
            if self.decode is not None:
                raise ValueError(f"{self.decode.name} acts while decoding, so it must be the last method")
            if isinstance(plugin, DecodePlugin):
                self.decode, self.decode_layer = plugin, plugin.decode_layer(self.num_layers)
                continue
            if isinstance(plugin, EncoderPlugin):
                tower = getattr(adapter, "tower_adapter", None)
                if tower is None or self.stages or adapter.features_keep_cls:
                    raise ValueError(f"{plugin.name} works inside encoder-only ViTs (timm, open_clip) and, as the "
                                     "first stage, inside LLaVA-1.5's vision tower (features without [CLS]), not in "
                                     f"{type(adapter.model).__name__}'s")
                self.tower = EncoderEngine(tower(), [plugin])
                self.stages.append(Stage(plugin, 0, 1))
                continue
            if "anyres_layout" in plugin.needs and not hasattr(adapter, "anyres_layout"):
                raise ValueError(f"{plugin.name} needs an anyres model (a thumbnail plus crops: LLaVA-NeXT, "
                                 f"LLaVA-OneVision), not {type(adapter.model).__name__}")
            if "before_projector" in plugin.needs and (self.stages or not getattr(adapter, "merges_before_projector",
                                                                                      False)):
                raise ValueError(f"{plugin.name} works before the projector: it must be the first stage, on "
                                 "a model whose projector sees each image's patches in feature order (LLaVA-1.5), "
                                 f"not {type(adapter.model).__name__}")
            if "grid" in plugin.needs and not adapter.has_token_grid:
                raise ValueError(f"{plugin.name} needs each image's 2-D token grid, which vtr does not read from "
                                 f"{type(adapter.model).__name__}")
            by_frame = "frames" in plugin.needs or plugin.per_frame
            if by_frame and not adapter.has_frames:
                raise ValueError(f"{plugin.name}{' per_frame' if plugin.per_frame else ''} needs the frames of each "
                                 f"video, which vtr does not read from {type(adapter.model).__name__}")
            if by_frame and not isinstance(plugin, LLMPlugin) and self.stages:
                raise ValueError(f"{plugin.name}{' per_frame' if plugin.per_frame else ''} works on whole frames: it "
                                 "must be the first stage of the pipeline")
            if isinstance(plugin, LLMPlugin):
                layers = plugin.layers(self.num_layers)
                for step, layer in enumerate(layers):
                    if layer <= last_layer:
                        raise ValueError(f"{plugin.name}: stage layer {layer} must come after the previous stage's "
                                         f"layer {last_layer}; a pipeline runs projector methods, then LLM methods "
                                         f"in layer order")
                    self.stages.append(Stage(plugin, step, len(layers), layer, plugin.score_layer(layer)))
                    last_layer = layer
            else:
                if last_layer >= 0:
                    raise ValueError(f"{plugin.name} acts before the LLM, so it must come before every in-LLM method")
                self.stages.append(Stage(plugin, 0, 1))
        self.llm_stages = [s for s in self.stages if s.layer is not None]
        if self.tower is not None and any({"cls_attention", "vision_keys"} & set(s.plugin.needs)
                                          for s in self.stages[1:]):
            raise ValueError(f"{self.tower.plugin.name} in the vision tower cannot be followed by a method that "
                             "reads the tower's attention or keys")
        self.by_frame = any("frames" in p.needs or p.per_frame for p in plugins)
        self.asks_questions = any({"rater_attention", "text_attention", "question_attention"} & set(p.needs)
                                  for p in plugins)
        self.rec: Record | None = None
        # generate() with num_beams / num_return_sequences > 1: the encoded image each of the LLM's images repeats
        self.encoded_source: list[int] | None = None
        # generate() runs the vision tower before the model's forward: its signals wait here until then
        self.cls_attention: torch.Tensor | None = None
        self.vision_keys: torch.Tensor | None = None
        self.projected: dict[torch.nn.Module, torch.Tensor] = {}      # the feature layer's query/key projection outputs
        self.zipped: torch.Tensor | None = None      # (I, k) kept by a stage that merged before the projector

    # ------------------------------------------------------------------ installation
    def install(self):
        a = self.adapter
        try:
            self._add(a.vlm, self._begin)
            needs = {need for s in self.stages if s.plugin is not getattr(self.tower, "plugin", None)
                     for need in s.plugin.needs}                # an encoder method's needs are the tower's own
            if needs & {"cls_attention", "grid"} or a.has_frames:
                self._add(a.vision_model, lambda module, args, kwargs: a.begin_vision(args, kwargs))
            if self.reuse_frames is not None:
                self._add(a.vision_model, self._skip_repeats)
            if "cls_attention" in needs:
                # The scores reuse the query and key projections the feature layer computes anyway, after it ran.
                for module in a.score_projections():
                    self._add(module, self._keep_projection, post=True)
                self._add(a.feature_layer, self._vision_layer, post=True, with_kwargs=True)
                for module, hook in a.vision_output_hooks:
                    self._add(module, hook, post=True)
            if any("before_projector" in s.plugin.needs for s in self.stages):
                self._add(a.projector, self._before_projector, with_kwargs=False)
            if self.tower is not None:
                self.tower.install()
                self._add(a.vision_model, self._expand_tower, post=True)
            if self.reuse_frames is not None:            # after the feature-layer hooks: their outputs expand too
                self._add(a.vision_model, self._expand_repeats, post=True)
            self._add(a.language_model, self._enter_llm)
            for i in range(min(a.injection_layers, self.num_layers)):
                self._add(a.decoder_layers[i], self._inject_hook(i), post=True)
            if self.llm_stages or self.decode is not None:
                first = min([min(s.layer, s.score_layer) for s in self.llm_stages] +
                            ([self.decode_layer - 1] if self.decode is not None else []))
                for i in range(first, self.num_layers):
                    self._add(a.decoder_layers[i], self._layer_hook(i))
                for i in {s.score_layer for s in self.llm_stages if s.score_layer != s.layer}:
                    self._add(a.key_projection(a.decoder_layers[i]), self._keys_hook(i), post=True)
        except Exception:
            self.remove()
            raise

    def remove(self):
        super().remove()
        if self.tower is not None:
            self.hook_seconds += self.tower.hook_seconds
            self.tower.hook_seconds = 0.0
            self.tower.remove()
        self.cls_attention = self.vision_keys = self.zipped = None     # the record stays readable
        self.projected.clear()

    # ------------------------------------------------------------------ results (read through the Handle)
    def _record(self) -> Record:
        rec = self.rec
        if rec is None:
            raise RuntimeError("no prefill with images has run through the patched model yet")
        return rec

    def kept(self, stage: int = -1) -> list[torch.Tensor]:
        """Per sample: indices (ascending) of its visual tokens that survive ``stage`` (default: the last stage).
        Visual tokens are numbered in sequence order over all images of the sample."""
        rec = self._record()
        stages = len(self.stages)
        if not -stages <= stage < stages:
            raise IndexError(f"stage {stage} out of range: this patch has {stages} stages")
        alive = rec.alive[stage] if len(rec.alive) == stages else None
        if alive is None:
            raise RuntimeError("the last forward pass did not reach every stage")
        visual_index = rec.visual.long().cumsum(1) - 1            # each image token's number in its sample
        return [visual_index[b][alive[b] & rec.visual[b]] for b in range(alive.shape[0])]

    def frame_grids(self) -> list[list[int]]:
        """Frames, rows and columns of each image or video of the last prefill (an image is one frame)."""
        rec = self._record()
        if rec.frame_grids is None:
            raise RuntimeError(f"vtr reads no frames from {type(self.adapter.model).__name__} or these inputs")
        return [list(g) for g in rec.frame_grids]

    def positions(self) -> torch.Tensor:
        """(B, L') original sequence index of each position of the language model's output (-1 for padding)."""
        return self._record().layouts[-1].orig

    def stats(self) -> list[dict]:
        """Per sample: visual tokens in and out, retention, each stage's counts, and for in-LLM stages the
        layer-averaged retention (what the LLM's FLOPs follow)."""
        rec = self._record()
        depth = self.num_layers
        out = []
        videos = rec.frame_grids is not None and any(t > 1 for t, _, _ in rec.frame_grids)
        for b in range(rec.visual.shape[0]):
            total = rec.per_sample_visual[b]
            counts = [int(a[b].sum()) for a in rec.alive]
            stages, before = [], total
            for stage, n in zip(self.stages, counts):
                stages.append({**stage.describe(), "tokens_in": before, "tokens_out": n})
                before = n
            per_layer = []
            for layer in range(depth):
                n = total
                for stage, c in zip(self.stages, counts):
                    if stage.layer is None or stage.layer <= layer:
                        n = c
                per_layer.append(n)
            out.append({                    # a sample without images (beside others that have) keeps all of none
                "visual_tokens_in": total,
                "visual_tokens_out": counts[-1] if counts else total,
                "retention": (counts[-1] if counts else total) / total if total else 1.0,
                "layer_avg_retention": sum(per_layer) / (depth * total) if total else 1.0,
                "layer_avg_tokens": sum(per_layer) / depth,     # what SparseVLM's "192 tokens" counts
                "tokens_per_layer": per_layer,
                "stages": stages,
            })
            if self.decode is not None:       # what the decode method left visible at the last generated token
                hidden = 0 if rec.hidden is None else int(rec.hidden[b].sum())
                out[-1]["decode"] = {"method": self.decode.name, "layer": self.decode_layer,
                                     "visible_tokens": per_layer[self.decode_layer] - hidden}
            if videos and not total:
                out[-1]["frames"] = []
            elif videos:                     # tokens in and out of each frame of the sample's videos
                frame = rec.frame_of[b][rec.visual[b]]
                frame = frame - frame.min()
                kept = rec.alive[-1][b][rec.visual[b]] if rec.alive else torch.ones_like(frame, dtype=torch.bool)
                tokens_in = frame.bincount()
                out[-1]["frames"] = torch.stack([tokens_in, frame[kept].bincount(minlength=len(tokens_in))], 1).tolist()
        return out

    # ------------------------------------------------------------------ hooks
    def _begin(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        past = cache_of(kwargs)
        past_len = past.get_seq_length() if past is not None else 0
        encoded = {m: [int(f.shape[0]) for f in out.pooler_output]
                   for m, out in (kwargs.get("mm_encoder_outputs") or {}).items() if out is not None}
        if encoded or kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None:
            if past_len:
                raise NotImplementedError("vtr: images arriving after a filled KV cache (multi-turn) are not supported")
            if input_ids is None:
                raise ValueError("vtr: pass input_ids (not inputs_embeds) so the image tokens can be located")
            _check_cache(past, input_ids.shape[1])
            self.encoded_source = _repeated_images(kwargs.get("mm_encoder_outputs") or {})
            if self.encoded_source is not None:
                self.adapter.repeat_images(self.encoded_source)
            rec = self._new_record(input_ids, kwargs.get("attention_mask"))
            sizes = self.adapter.image_token_counts(kwargs, rec.visual, encoded)
            self._assign_images(rec, sizes)
            rec.newline_counts = self.adapter.newline_counts if self.adapter.newline_tokens else None
            self.rec = rec
        elif self.rec is not None and past_len:
            rec = self.rec
            rec.prefill, rec.step_kwargs, rec.pending, rec.armed = False, {}, {}, {}
            q = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[1]
            mask = kwargs.get("attention_mask")
            if mask is not None:
                rec.tail = mask[:, rec.length:].bool()
            else:
                width = past_len + q - rec.layouts[self._layout_index(0, True)].orig.shape[1]   # layer 0's cache
                rec.tail = torch.ones(rec.visual.shape[0], width, dtype=torch.bool, device=rec.visual.device)
            if kwargs.get("position_ids") is None:    # the model would count positions from the shortened cache
                kwargs["position_ids"] = self._decode_positions(rec, q)
                return args, kwargs
        else:
            raise ValueError("vtr: this batch has no images (pixel_values is None), so there are no visual tokens "
                             "to reduce; remove the patch for text-only input")

    def _new_record(self, input_ids, attention_mask) -> Record:
        b, length = input_ids.shape
        device = input_ids.device
        ids = self.adapter.visual_token_ids
        visual = input_ids == ids[0] if len(ids) == 1 else torch.isin(input_ids, torch.tensor(ids, device=device))
        mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(visual)
        if mask.dim() != 2:
            raise ValueError("vtr: attention_mask must be the 2-D padding mask")
        read = [visual.sum(1), mask.sum(1), mask[:, -1].all().view(1)]
        if self.asks_questions:
            read.append(_after_last(visual, mask).sum(1).amax().view(1))
        read = torch.cat(read).tolist()                # one read-back for all
        per_sample, lengths, left_padded, questions = read[:b], read[b:2 * b], read[2 * b], read[2 * b + 1:]
        if not sum(per_sample):
            raise ValueError(f"vtr: pixel values were given but input_ids hold no image or video tokens (ids {ids})")
        if not left_padded:
            raise ValueError("vtr: samples must be left-padded, as generate() needs for decoder-only models "
                             "(set processor.tokenizer.padding_side = 'left')")
        slots = torch.arange(length, device=device).expand(b, length)
        return Record(visual=visual, length=length, per_sample_visual=per_sample, per_sample_length=lengths,
                      question_width=max(1, questions[0]) if questions else None,
                      layouts=[Layout(orig=slots.masked_fill(~mask, -1), slot0=slots, mask=mask)])

    def _keep_projection(self, module, args, output):
        self.projected[module] = output

    def _vision_layer(self, module, args, kwargs, output):
        projected = tuple(self.projected.pop(m) for m in self.adapter.score_projections())
        self.cls_attention = self.adapter.cls_attention(module, args, kwargs, projected)
        if any("vision_keys" in s.plugin.needs for s in self.stages):
            self.vision_keys = self.adapter.feature_keys(module, projected)

    def _before_projector(self, module, args):
        """A first stage that works on the feature layer's outputs (VisionZip, k-center) selects (and merges) here;
        the kept indices are applied with the other pre-LLM stages."""
        plugin, x = self.stages[0].plugin, args[0]
        k = plugin.stage_counts(x.shape[1])[0]
        self.zipped = None
        if k >= x.shape[1]:
            return None
        cls = None if self.cls_attention is None else self.cls_attention.view(x.shape[0], -1)
        signals = Signals(tokens=x, cls_attention=cls, keys=self.vision_keys)
        self.zipped, merged = plugin.zip(signals, k)
        return (merged, *args[1:])

    def _skip_repeats(self, module, args, kwargs):
        """reuse_frames: an input (frame or crop) whose pixels differ from the last encoded one by at most the
        threshold (mean absolute difference, in the processor's units) is not encoded; it reuses that one's
        outputs (the idea of STC's frame cacher)."""
        pixels = args[0] if args else kwargs["pixel_values"]
        source, last = [], 0
        for i in range(pixels.shape[0]):
            if i and float((pixels[i] - pixels[last]).abs().mean()) > self.reuse_frames:
                last = i
            source.append(last)
        source = torch.tensor(source, device=pixels.device)
        encoded = source.unique()
        self.encoder_inputs = [len(encoded), len(source)]
        self.reused_from = torch.searchsorted(encoded, source)   # each input's row among the encoded ones
        if len(encoded) == len(source):
            return None
        pixels = pixels.index_select(0, encoded)
        return ((pixels, *args[1:]), kwargs) if args else (args, {**kwargs, "pixel_values": pixels})

    def _expand_repeats(self, module, args, output):
        """Every output of the vision pass (and the [CLS] scores taken inside it) back to one row per input."""
        source, self.reused_from = self.reused_from, None
        encoded = self.encoder_inputs[0]
        if source is None or encoded == len(source):
            return None

        def expand(x):
            return x.index_select(0, source) if torch.is_tensor(x) and x.shape[0] == encoded else x

        map_output(output, expand)
        if self.cls_attention is not None:
            self.cls_attention = self.cls_attention.view(encoded, -1)[source].flatten()
        self.vision_keys = None if self.vision_keys is None else expand(self.vision_keys)
        self.tower_kept = None if self.tower_kept is None else expand(self.tower_kept)
        return output

    def _expand_tower(self, module, args, output):
        """An encoder method merged the tower's tokens: the outputs it reduced go back to one row per patch (each
        patch takes its merged token's value), so the projector and the placeholders see every patch; the first
        patch of each merged token is what the pre-LLM stage keeps."""
        source, width = self.tower.source, self.tower.counts[-1] if self.tower.counts else None
        if width is None or width == source.shape[1]:
            self.tower_kept = None
            return None

        def expand(x):
            return gather_tokens(x, source.clamp(min=0)) if torch.is_tensor(x) and x.dim() == 3 and \
                x.shape[1] == width else x

        map_output(output, expand)
        prefix, n = self.tower.adapter.prefix, source.shape[1]
        first = torch.full((source.shape[0], width), n, dtype=torch.long, device=source.device)
        first.scatter_reduce_(1, source.clamp(min=0), torch.arange(n, device=source.device).expand_as(source), "amin")
        self.tower_kept = (first[:, prefix:] - prefix).sort(dim=1).values
        return output

    @staticmethod
    def _assign_images(rec: Record, sizes: list[int]):
        """Image features fill the image placeholders in row-major order, one run of ``sizes[i]`` tokens each; an
        image may not run across two samples."""
        counts = rec.per_sample_visual
        if sum(sizes) != sum(counts):
            raise ValueError(f"vtr: {sum(counts)} image tokens in input_ids, but the images have {sum(sizes)} features")
        local, sample, filled, seen = [], 0, 0, 0
        for n in sizes:
            while filled == counts[sample]:
                sample, filled, seen = sample + 1, 0, 0
            if filled + n > counts[sample]:
                raise ValueError("vtr: an image's placeholders are split across samples")
            local.append(seen)
            rec.image_sample.append(sample)
            filled, seen = filled + n, seen + 1
        rec.image_sizes = sizes
        rec.image_local = local

    @staticmethod
    def _host_entry_counts(rec: Record):
        """Layout 0's entries a stage may drop, per image and frame, from host counts: every image token but the
        protected newlines (a video's closing one sits in its last frame)."""
        newlines = rec.newline_counts or [0] * len(rec.image_sizes)
        counts = {"image": [n - p for n, p in zip(rec.image_sizes, newlines)]}
        if rec.frame_sizes is not None:
            frames, start = list(rec.frame_sizes), 0
            for (t, _, _), p in zip(rec.frame_grids, newlines):
                start += t
                frames[start - 1] -= p
            counts["frame"] = frames
        rec.layouts[0].entry_counts.update(counts)

    def _read_frames(self, rec: Record):
        """Each image's frame grid and each frame's token count (videos; an image is one frame)."""
        try:
            grids = self.adapter.frame_grids(rec.image_sizes)
        except ValueError:
            if self.by_frame:
                raise
            return                                     # no frames in these inputs (LLaVA-OneVision images)
        sizes = []
        for n, (t, h, w) in zip(rec.image_sizes, grids):
            if not 0 <= n - t * h * w <= 1:
                raise RuntimeError(f"vtr: {n} tokens do not make {t} frames of {h} x {w}")
            sizes += [h * w] * (t - 1) + [n - (t - 1) * h * w]
        rec.frame_grids, rec.frame_sizes = [tuple(g) for g in grids], sizes

    def _on_encoded_images(self, rec: Record, features: torch.Tensor, layout):
        """``layout(features, sizes)``, an adapter's per-feature reading of the vision pass (its [CLS] scores, its
        crops), for the images the LLM receives: where generate() repeated encoded images, it reads each encoded
        image's first copy and its result is repeated like them (tensors of one row per feature or per image)."""
        source = self.encoded_source
        if source is None:
            return layout(features, rec.image_sizes)
        first = [source.index(e) for e in range(max(source) + 1)]
        sizes = [rec.image_sizes[j] for j in first]
        spans = features.split(rec.image_sizes)
        out = layout(torch.cat([spans[j] for j in first]), sizes)

        def repeat(t):
            if not torch.is_tensor(t):
                return t
            if t.shape[0] == len(first) != sum(sizes):                 # one row per image
                return t[source]
            return torch.cat([t.split(sizes)[e] for e in source])
        return {key: repeat(value) for key, value in out.items()} if isinstance(out, dict) else repeat(out)

    def _select_before_llm(self, rec: Record, embeds: torch.Tensor) -> torch.Tensor:
        """Pre-LLM methods select on the projected features, read where the model placed them in ``inputs_embeds``
        (this works whether the forward pass or ``generate()`` ran the vision tower). Images with the same number of
        features are selected together, one (images, P, D) batch per size. Returns ``embeds``, with the values of
        merging methods (pooling) written in."""
        placeholders, device = rec.placeholders, embeds.device          # image after image
        total = len(placeholders)
        features = embeds.reshape(-1, embeds.shape[-1]).index_select(0, placeholders)      # (total, D)
        protected = None if rec.protected is None else rec.protected.flatten()[placeholders]   # never offered, kept
        if protected is None:
            candidates, counts, shielded = None, rec.image_sizes, [0] * len(rec.image_sizes)
        else:
            shielded = rec.newline_counts                                 # the host's, else one read-back
            if shielded is None:
                shielded = torch.stack([p.sum() for p in protected.split(rec.image_sizes)]).tolist()
            counts = [n - p for n, p in zip(rec.image_sizes, shielded)]
            candidates = true_first(~protected)[:sum(counts)]
        sizes = torch.tensor(counts, device=device)
        offsets = torch.cumsum(sizes, 0) - sizes
        frames = rec.frame_grids
        pre_llm = [s for s in self.stages if s.layer is None]
        # A method counting for itself may keep a different number of each image's tokens: it sees one at a time.
        alone = any(s.plugin.counts_itself for s in pre_llm)
        images_of = {}         # (candidates per image, its frame grid if known[, the image]) -> [image indices]
        for i, n in enumerate(counts):
            key = (n, *(() if frames is None else frames[i]), *((i,) if alone else ()))
            images_of.setdefault(key, []).append(i)
        groups = {key: torch.tensor(ids, device=device) for key, ids in images_of.items()}     # the same, on the device
        alive = {key: torch.arange(key[0], device=device).expand(len(ids), -1) for key, ids in groups.items()}

        def rows_of(ids, survivors):               # (G, alive) rows of ``features`` of these images' survivors
            rows = offsets[ids][:, None] + survivors
            return rows if candidates is None else candidates[rows]

        cls = None if self.cls_attention is None else self._on_encoded_images(
            rec, features, lambda f, sizes: self.adapter.arrange_scores(self.cls_attention, f, sizes))
        zipped, tower_kept, source = self.zipped, self.tower_kept, self.encoded_source
        if source is not None:                  # one row per image the LLM receives
            zipped = None if zipped is None else zipped[source]
            tower_kept = None if tower_kept is None else tower_kept[source]
        anyres = grids = None
        if any("anyres_layout" in s.plugin.needs for s in pre_llm):
            anyres = self._on_encoded_images(rec, features, self.adapter.anyres_layout)
        if any("grid" in s.plugin.needs for s in pre_llm):
            grids = self.adapter.token_grids(rec.image_sizes)
        merged = False
        self.cls_attention = None
        for stage in pre_llm:
            tower = isinstance(stage.plugin, EncoderPlugin)
            if "cls_attention" in stage.plugin.needs and not tower and (cls is None or cls.shape != (total,)):
                raise RuntimeError("vtr: the vision tower's [CLS] scores do not cover the images the language model "
                                   "receives: the tower did not run under the patch, or generate() repeated images "
                                   "it encoded as one tensor (num_beams or num_return_sequences > 1), which vtr "
                                   "cannot trace back to them here; use num_beams=1 and num_return_sequences=1")
            survivors = torch.zeros(total, dtype=torch.bool, device=device) if protected is None else protected.clone()
            plugin = stage.plugin
            for key, ids in groups.items():
                n = key[0]
                rows = rows_of(ids, alive[key])
                # per_frame: every frame is an image of its own, with its own budget
                t, per = (key[1], n // key[1]) if plugin.per_frame else (1, rows.shape[1])
                k = plugin.stage_counts(per)[0]
                if "before_projector" in plugin.needs:                # selected (and merged) already
                    if zipped is not None:
                        alive[key] = zipped[ids]
                        rows = rows_of(ids, alive[key])
                elif isinstance(plugin, EncoderPlugin):              # merged in the tower: one patch per token
                    if tower_kept is not None:
                        alive[key] = tower_kept[ids]
                        rows = rows_of(ids, alive[key])
                elif k < per or plugin.counts_itself:
                    whole = candidates is None and len(groups) == 1 and rows.shape[1] == n
                    tokens = features.view(-1, n, features.shape[-1]) if whole else features[rows]   # whole: no copy
                    signals = Signals(tokens=tokens.reshape(-1, per, tokens.shape[-1]),
                                      image_index=[rec.image_local[i] for i in images_of[key] for _ in range(t)],
                                      cls_attention=None if cls is None else cls[rows].view(-1, per))
                    if anyres is not None:
                        signals.layout = {"crop": anyres["crop"][rows], "row": anyres["row"][rows],
                                          "col": anyres["col"][rows], "grid": anyres["grid"][ids],
                                          "side": anyres["side"]}
                    if frames is not None:        # every image of the group has this grid (it is in the key)
                        signals.frames = (key[1] // t, key[2], key[3])
                    if grids is not None:
                        signals.token_grid = [grids[i] for i in images_of[key]] if t == 1 else \
                            [signals.frames[1:]] * (len(ids) * t)
                    picks, values = plugin.reduce(signals, k)                         # (images * t, k)
                    if plugin.counts_itself:
                        k = picks.shape[1]
                    elif picks.shape[1] != k:
                        raise RuntimeError(f"{plugin.name} selected {picks.shape[1]} tokens of {per}, not {k}")
                    picks, order = picks.sort(dim=1)
                    picks = (picks.view(len(ids), t, k) + torch.arange(t, device=device)[:, None] * per).flatten(1)
                    alive[key] = alive[key].gather(1, picks)
                    rows = rows_of(ids, alive[key])
                    if values is not None:                            # the kept tokens take the merged values
                        values = values.gather(1, order[..., None].expand_as(values))
                        values = values.reshape(-1, features.shape[-1]).to(features.dtype)
                        if features.requires_grad:      # autograd: the tokens the values came from stay intact
                            features = features.index_put((rows.flatten(),), values)
                        else:
                            features[rows.flatten()] = values
                        merged = True
                survivors[rows.flatten()] = True
            rec.alive.append(torch.zeros_like(rec.visual).masked_scatter(rec.visual, survivors))
        if rec.alive:         # each image's survivors and so each sample's new length are known on the host
            kept = [0] * len(counts)
            for key, ids in images_of.items():
                for i in ids:
                    kept[i] = alive[key].shape[1]
            lengths = list(rec.per_sample_length)
            for i, sample in enumerate(rec.image_sample):
                lengths[sample] -= rec.image_sizes[i] - shielded[i] - kept[i]
            if lengths != rec.per_sample_length:
                layout = rec.layouts[0].compact(rec.layouts[0].mask & (~rec.visual | rec.alive[-1]), lengths=lengths)
                layout.slot0 = torch.arange(layout.orig.shape[1], device=device).expand_as(layout.orig)
                layout.entry_counts["image"] = kept
                rec.layouts[0] = layout
        if merged:
            embeds = embeds.reshape(-1, embeds.shape[-1]).index_copy(0, placeholders, features).view_as(embeds)
        return embeds

    def _enter_llm(self, module, args, kwargs):
        rec = self.rec
        if rec.prefill:
            rec.positions = kwargs.get("position_ids")
            if rec.positions is None:                  # what the language model would use: 0..L-1
                b, length = rec.visual.shape
                rec.positions = torch.arange(length, device=rec.visual.device).expand(b, length)
            if self.adapter.newline_tokens:
                embeds = kwargs["inputs_embeds"]
                protected = self.adapter.protected(embeds.flatten(0, 1).index_select(0, rec.placeholders))
                rec.protected = torch.zeros_like(rec.visual).masked_scatter(rec.visual, protected)
            if self.adapter.has_frames:
                self._read_frames(rec)
            if rec.protected is None or rec.newline_counts is not None:     # the host knows each image's entries
                self._host_entry_counts(rec)
            if any(s.layer is None for s in self.stages):
                kwargs["inputs_embeds"] = self._select_before_llm(rec, kwargs["inputs_embeds"])
            rec.injections = self.adapter.take_injections(kwargs)      # edits kwargs in place
            if rec.injections is not None:                             # each image token's row in them
                rec.feature_row = (rec.visual.flatten().cumsum(0) - 1).view_as(rec.visual)
        layout = rec.layouts[0]
        if layout.src is None:            # nothing dropped before the LLM
            if rec.prefill:
                rec.entry_embeds = kwargs["inputs_embeds"]
            return args, kwargs
        if rec.prefill:
            mask = layout.mask
            kwargs["inputs_embeds"] = rec.entry_embeds = gather_tokens(kwargs["inputs_embeds"], layout.src, mask)
            kwargs["attention_mask"] = mask.long()
            src = layout.src.expand(*rec.positions.shape[:-2], *layout.src.shape)
            kwargs["position_ids"] = rec.positions.gather(-1, src).masked_fill(~mask, 0)
        else:
            kwargs["attention_mask"] = torch.cat([layout.mask, rec.tail], dim=1).long()
        return args, kwargs

    @staticmethod
    def _decode_positions(rec: Record, q: int) -> torch.Tensor:
        """Original positions of the next q tokens, for callers that pass no position_ids while decoding: they
        follow the largest prompt position (on every M-RoPE axis alike, as the stock models count them)."""
        lead = rec.positions.shape[:-2]
        last = rec.positions.reshape(-1, *rec.positions.shape[-2:]).amax(dim=(0, 2))[:, None]     # (B, 1)
        start = last + rec.tail.shape[1] - q + 1
        return (start + torch.arange(q, device=start.device)).expand(*lead, -1, -1)

    def _inject_hook(self, i: int):
        def hook(module, args, output):
            rec = self.rec
            if rec is None or not rec.prefill or rec.injections is None or i >= len(rec.injections):
                return None
            layout = rec.layouts[self._layout_index(i, True)]
            orig = layout.orig.clamp(min=0)
            visual = layout.mask & rec.visual.gather(1, orig)
            rows = rec.feature_row.gather(1, orig)[visual]
            out = output.clone()
            out[visual] = out[visual] + rec.injections[i][rows].to(out.dtype)
            return out
        return hook

    def _layer_hook(self, i: int):
        def hook(module, args, kwargs):
            return self._layer(i, module, args, kwargs)
        return hook

    def _layout_index(self, layer: int, inclusive: bool) -> int:
        """Index of the layout the hidden states are in when entering ``layer`` (before/after its own drop); a stage
        that dropped nothing shares its predecessor's layout, and the lowest index of a shared layout is returned."""
        index = sum(1 for s in self.llm_stages if s.layer < layer or (inclusive and s.layer == layer))
        layouts = self.rec.layouts
        while index > 0 and layouts[index] is layouts[index - 1]:
            index -= 1
        return index

    def _layer(self, i: int, module, args, kwargs):
        rec = self.rec
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = args[1:] if args else ()
        if not rec.prefill:
            if self.decode is not None and i == self.decode_layer - 1:
                self._hide(rec, module, hidden, kwargs)
            hide = self.decode is not None and i >= self.decode_layer and rec.hidden is not None
            return (hidden, *rest), self._kwargs_for(self._layout_index(i, True), kwargs, hidden, hide)
        for index, stage in enumerate(self.llm_stages):      # a stage that scores with its own layer's input
            if stage.layer == i and stage.score_layer == i:
                rec.pending[index] = self._attention(rec, module, hidden, self._layout_index(i, False), kwargs,
                                                     stage.plugin)
        for index, stage in enumerate(self.llm_stages):
            if stage.layer == i:
                hidden = self._drop(rec, index, stage, hidden)
        now = self._layout_index(i, True)
        layer_kwargs = self._kwargs_for(now, kwargs, hidden)
        for index, stage in enumerate(self.llm_stages):      # a stage that scores with an earlier layer's input:
            if stage.score_layer == i and stage.layer != i:   # scored when this layer's own keys are computed
                rec.armed[i] = (index, now, layer_kwargs["position_embeddings"])
        return (hidden, *rest), layer_kwargs

    def _attention(self, rec, module, hidden, layout_index, kwargs, plugin):
        if "last_attention" not in plugin.stage_needs(rec.plugin_state.setdefault(id(plugin), {})):
            return {}, layout_index
        kw = self._kwargs_for(layout_index, kwargs, hidden)
        cos, sin = kw["position_embeddings"]
        x = self.adapter.attention_input(module, hidden)
        scores = self.adapter.last_token_attention(module, x, cos, sin, rec.layouts[layout_index].mask)
        return {"last_attention": scores}, layout_index

    def _keys_hook(self, i: int):
        def hook(module, args, keys):
            armed = self.rec.armed.pop(i, None) if self.rec is not None else None
            if armed is not None:
                index, layout_index, (cos, sin) = armed
                layer, mask = self.adapter.decoder_layers[i], self.rec.layouts[layout_index].mask
                plugin = self.llm_stages[index].plugin
                needs, taken = set(plugin.needs), {}
                if "last_attention" in needs:
                    taken["last_attention"] = self.adapter.last_token_attention(layer, args[0], cos, sin, mask, keys)
                if needs & {"rater_attention", "text_attention"}:     # mean attention rows of some text tokens
                    layout = self.rec.layouts[layout_index]
                    if "rater_attention" in needs:
                        queries = self._raters(plugin).gather(1, layout.orig.clamp(min=0))
                        queries &= layout.mask
                    else:
                        queries = self._questions(layout)
                    name = "rater_attention" if "rater_attention" in needs else "text_attention"
                    taken[name] = self.adapter.rater_attention(layer, args[0], cos, sin, mask, queries, keys,
                                                               self.rec.question_width)
                if "question_attention" in needs:
                    queries = self._questions(self.rec.layouts[layout_index])
                    taken["question_attention"] = self.adapter.question_attention(layer, args[0], queries, mask, keys,
                                                                                  self.rec.question_width)
                if "keys" in needs:               # as the attention uses them: normed, rotated, heads joined
                    rotated = self.adapter.rotated_keys(layer, keys, cos, sin)
                    taken["keys"] = rotated.transpose(1, 2).flatten(2)
                self.rec.pending[index] = (taken, layout_index)
        return hook

    def _raters(self, plugin) -> torch.Tensor:
        """(B, L) the text tokens after the image that ``plugin.raters`` picks from the embeddings entering the LLM,
        over the original sequence (once per prefill, all samples at once)."""
        rec = self.rec
        if rec.raters is None:
            layout, embeds = rec.layouts[0], rec.entry_embeds
            visual = layout.mask & rec.visual.gather(1, layout.orig.clamp(min=0))
            order, valid = query_rows(self._questions(layout), self.rec.question_width)
            text = embeds.gather(1, order[..., None].expand(-1, -1, embeds.shape[-1]))
            raters = torch.zeros_like(visual).scatter_(1, order, plugin.raters(embeds, visual, text, valid))
            rec.raters = torch.zeros_like(rec.visual).scatter_(1, layout.orig.clamp(min=0), raters & layout.mask)
        return rec.raters

    def _questions(self, layout: Layout) -> torch.Tensor:
        """(B, L) bool: the tokens after each sample's last visual token (the question and what follows it)."""
        return _after_last(layout.mask & self.rec.visual.gather(1, layout.orig.clamp(min=0)), layout.mask)

    def _hide(self, rec: Record, layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict):
        """Decoding, at the layer before the decode method's: the new token's attention over this layer's cache
        (head mean), and which visual entries the deeper layers see this step (``rec.hidden``: the others)."""
        index = self._layout_index(self.decode_layer - 1, True)
        layout = rec.layouts[index]
        cos, sin = self._kwargs_for(index, kwargs, hidden)["position_embeddings"]
        past = cache_of(kwargs).layers[self.decode_layer - 1].keys
        x = self.adapter.attention_input(layer, hidden)
        row = self.adapter.last_token_attention(layer, x, cos, sin, torch.cat([layout.mask, rec.tail], dim=1),
                                                past=past)[:, :layout.orig.shape[1]]
        orig = layout.orig.clamp(min=0)
        if rec.decode_entries is None:      # the prompt's visual entries in the cache: the same at every step
            _, visual, rows, image, entry = self._visual_entries(rec, layout, "image")
            budgets = [self.decode.stage_counts(n)[0] for n in entry]
            k = torch.tensor(budgets, device=hidden.device)
            rec.decode_entries = visual, rows, image, k, entry, budgets
        visual, rows, image, k, entry, budgets = rec.decode_entries
        keep = self.decode.visible(Signals(tokens=hidden, last_attention=row, visual=visual, image=image,
                                           visual_rows=rows, counts=entry, budgets=budgets), k, rec.decode_state)
        shown = torch.zeros_like(visual)
        shown.view(-1)[rows] = keep
        # k[i] of image i stay visible: something is hidden exactly where a budget is below its count (host ints)
        hides = any(b < n for b, n in zip(budgets, entry))
        rec.hidden = torch.zeros_like(rec.visual).scatter_(1, orig, visual & ~shown) if hides else None

    def _kwargs_for(self, index: int, kwargs: dict, hidden: torch.Tensor, hide: bool = False) -> dict:
        """Layer kwargs for a sequence in layout ``index``, computed once per forward pass and layout; ``hide``
        (decoding, layers from the decode method's on): the visual entries in ``rec.hidden`` masked out."""
        rec = self.rec
        if index == 0 and not hide:
            return kwargs
        key = (index, hide)
        if key in rec.step_kwargs:
            return {**kwargs, **rec.step_kwargs[key]}
        layout = rec.layouts[index]
        stage_layer = self.llm_stages[index - 1].layer if index else self.decode_layer
        past = cache_of(kwargs)
        new = {}
        if rec.prefill:
            idx = layout.slot0
            new["position_embeddings"] = tuple(gather_tokens(t, idx) for t in kwargs["position_embeddings"])
            positions = kwargs.get("position_ids")
            if positions is not None:
                new["position_ids"] = positions.expand(idx.shape[0], -1).gather(1, idx)
            # no padding and a cache: no mask, which the stock layers read as all True without checking it on the
            # device (without a cache, transformers would take the skipped positions for packed sequences)
            mask2d = None if layout.full and past is not None else layout.mask
        elif layout.full and not hide and hidden.shape[1] == 1 and kwargs.get("attention_mask") is None:
            # the stock mask of the whole cache was skipped (it checked it is all ones, one query): so is a shorter
            # unpadded one's, and the check (a device read per stage and step) need not run again
            mask2d = None
        else:
            visible = layout.mask & ~rec.hidden.gather(1, layout.orig.clamp(min=0)) if hide else layout.mask
            mask2d = torch.cat([visible, rec.tail], dim=1)
        new["attention_mask"] = create_causal_mask(
            config=self.adapter.text_config, inputs_embeds=hidden,
            attention_mask=None if mask2d is None else mask2d.long(),
            position_ids=new.get("position_ids", kwargs.get("position_ids")), layer_idx=stage_layer,
            **{CACHE_ARG: past})
        rec.step_kwargs[key] = new
        return {**kwargs, **new}

    @staticmethod
    def _groups(rec: Record, grouping: str) -> tuple[torch.Tensor, int]:
        """(B, L) image or frame of each visual token over the original sequence (-1 elsewhere), and how many."""
        if grouping == "frame":
            return rec.frame_of, len(rec.frame_sizes)
        return rec.image_of, len(rec.image_sizes)

    def _visual_entries(self, rec: Record, layout: Layout, grouping: str) -> tuple:
        """(orig, visual, rows, group, counts) of ``layout``: each slot's original index (padding: 0), the visual tokens
        a stage may drop or a decode method hide (not the protected newlines), their rows in the flattened (B * L),
        the image or frame of each (``grouping``) and how many each image or frame has, host ints. At most one
        read-back (none where the previous stage's compaction brought the counts back): a ``nonzero`` for the rows
        would be a second, and indexing by the mask again would wait for the device each time."""
        group_of, groups = self._groups(rec, grouping)
        orig = layout.orig.clamp(min=0)
        visual = layout.mask & rec.visual.gather(1, orig)
        if rec.protected is not None:
            visual &= ~rec.protected.gather(1, orig)
        group = group_of.gather(1, orig)
        if grouping not in layout.entry_counts:
            layout.entry_counts[grouping] = group_counts(torch.where(visual, group, groups).flatten(),
                                                         groups + 1)[:groups].tolist()
        counts = layout.entry_counts[grouping]
        rows = true_first(visual.flatten())[:sum(counts)]
        return orig, visual, rows, group.flatten().index_select(0, rows), counts

    def _next_grouping(self, index: int) -> str | None:
        """The grouping the next user of the visual entries after LLM stage ``index`` counts them by, if any."""
        if index + 1 < len(self.llm_stages):
            return _grouping(self.llm_stages[index + 1].plugin)
        return "image" if self.decode is not None else None

    def _drop(self, rec: Record, index: int, stage: Stage, hidden: torch.Tensor) -> torch.Tensor:
        taken, scored_layout = rec.pending.pop(index)
        layout = rec.layouts[-1]
        if stage.plugin.finished(rec.plugin_state.setdefault(id(stage.plugin), {})):
            rec.alive.append(rec.alive[-1])                 # nothing more to drop: the same tokens, the same layout
            rec.layouts.append(layout)
            return hidden
        if rec.layouts[scored_layout] is not layout:
            raise RuntimeError(f"{stage.plugin.name}: scores were taken on a sequence that changed before the drop")
        plugin = stage.plugin
        grouping = _grouping(plugin)
        orig, visual, rows, image, counts = self._visual_entries(rec, layout, grouping)   # gathers use rows
        images = len(counts)

        def at_visual(t):
            return t.gather(1, orig).flatten().index_select(0, rows)
        if stage.step == 0:            # every stage's counts at the method's entry, on the host and on the device
            host = [plugin.stage_counts(n, stage.steps) for n in counts]
            rec.stage_keep[id(plugin)] = host, torch.tensor(host, device=hidden.device).view(images, stage.steps)
        host, device_counts = rec.stage_keep[id(plugin)]
        k = device_counts[:, stage.step]
        text = layout.mask & ~rec.visual.gather(1, orig)
        signals = Signals(tokens=hidden, visual=visual, image=image, positions=layout.orig, text=text,
                          state=rec.plugin_state.setdefault(id(plugin), {}), visual_rows=rows, counts=counts,
                          budgets=[h[stage.step] for h in host], **taken)
        if "patches" in plugin.needs:         # each token's frame and its place in the frame (same patch, new frame)
            signals.frame, signals.patch = at_visual(rec.frame_of), at_visual(rec.patch_of)
        if "final_norm" in plugin.needs:
            signals.normed = self.adapter.language_model.norm(hidden)
        keep = layout.mask & ~visual
        kept, values = plugin.drop(signals, k)
        keep.view(-1)[rows] = kept
        if values is not None:              # the survivors take in the dropped tokens (the dropped rows go below)
            hidden = hidden.flatten(0, 1).index_copy(0, rows, values.to(hidden.dtype)).view_as(hidden)
        length = rec.visual.shape[1]
        alive = torch.zeros(keep.shape[0], length + 1, dtype=torch.bool, device=keep.device)
        alive.scatter_(1, layout.orig.masked_fill(~layout.mask, length), keep)      # padding lands in the spare column
        rec.alive.append(alive[:, :length] & rec.visual)
        next_grouping, entry_counts = self._next_grouping(index), None
        if next_grouping is not None:     # the survivors per image or frame come back with the new width
            next_of, groups = self._groups(rec, next_grouping)
            group = image if next_grouping == grouping else at_visual(next_of)
            entry_counts = next_grouping, group_counts(torch.where(kept, group, groups), groups + 1)[:groups]
        new = layout.compact(keep, entry_counts)
        rec.layouts.append(new)               # nothing dropped: the same layout, so the same kwargs
        return hidden if new is layout else gather_tokens(hidden, new.src, new.mask)


def _after_last(visual: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the slots of ``mask`` after each row's last ``visual`` one."""
    slots = torch.arange(visual.shape[1], device=visual.device)
    return mask & (slots > torch.where(visual, slots, -1).amax(dim=1, keepdim=True))


def _grouping(plugin: Plugin) -> str:
    """What a stage of ``plugin`` counts its budgets by: each frame, or each image (a video is one)."""
    return "frame" if plugin.per_frame else "image"
