"""The hook engine for encoder-only ViTs (timm, open_clip): a method reduces the tokens of some blocks between their
attention and their MLP, as ToMe and EViT do, by forward hooks on the stock modules:

- the block's q/k source (timm: the fused qkv projection, post; open_clip: the attention module, pre): the method
  plans the reduction from the block's own keys or [CLS] attention row;
- the MLP's input norm (pre): the MLP runs on the reduced tokens;
- the MLP branch's output (post): each reduced token is copied back to the tokens it stands for, so the block's
  residual add keeps its shape;
- the block (post): the block's output is reduced by the same plan. The result equals reducing between attention and
  MLP (a slot's MLP output is constant over its tokens, so averaging them returns it);
- for ToMe's proportional attention, the attention (timm, a VLM tower) or block (open_clip) (pre): log(size) as an
  additive attention mask.
"""
from __future__ import annotations

import torch

from vtr.hooks import HookSet
from vtr.kernels import attention_rows
from vtr.plugins.base import EncoderPlugin


class EncoderEngine(HookSet):
    def __init__(self, adapter, plugins: list):
        super().__init__()
        if len(plugins) != 1 or not isinstance(plugins[0], EncoderPlugin):
            names = ", ".join(p.name for p in plugins)
            raise ValueError(f"{type(adapter.model).__name__} is an encoder-only ViT: it takes one encoder method "
                             f"(tome, evit), not {names}")
        if "cls_attention" in plugins[0].needs and not adapter.has_cls:
            raise ValueError(f"{plugins[0].name} needs a [CLS] token; this encoder has none")
        if getattr(plugins[0], "prop_attn", False) and not adapter.takes_bias():
            raise ValueError(f"{plugins[0].name}'s proportional attention adds log(size) to the attention logits, "
                             f"which {adapter.model.config._attn_implementation} cannot take: pass prop_attn=False, "
                             "or load the model with attn_implementation='sdpa'")
        self.adapter, self.plugins, self.plugin = adapter, plugins, plugins[0]
        self.stages = []
        self.sizes: torch.Tensor | None = None       # (B, N) tokens each current token stands for
        self.source: torch.Tensor | None = None      # (B, N0) the current token each input token is in (-1: gone)
        self.steps: list[int] = []                   # tokens removed in each block of this forward pass
        self.counts: list[int] = []                  # tokens after each block
        self.plan = None
        self.tokens_in = 0

    def install(self):
        a = self.adapter
        try:
            self._add(a.blocks[0], self._begin, with_kwargs=False)       # first: later hooks read its state
            for i, block in enumerate(a.blocks):
                module, post = a.qk_source(block)
                self._add(module, self._planner(i), with_kwargs=False, post=post)
                self._add(a.mlp_input(block), self._reduce_input, with_kwargs=False)
                self._add(a.mlp_output(block), self._expand_output, post=True, first=True)
                self._add(block, self._reduce_output, post=True, first=True)    # what hidden_states record
                if getattr(self.plugin, "prop_attn", False):
                    self._add(a.bias_target(block), self._bias(block))
        except Exception:
            self.remove()
            raise

    def _begin(self, module, args):
        x = args[0]
        self.sizes = torch.ones(x.shape[:2], device=x.device)
        self.source = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        self.tokens_in = x.shape[1] - self.adapter.prefix
        self.steps = self.plugin.reductions(len(self.adapter.blocks), x.shape[1] - self.adapter.prefix)
        self.counts, self.plan = [], None

    def _planner(self, i: int):
        block = self.adapter.blocks[i]

        def hook(module, args, output=None):
            if self.steps[i] <= 0:
                return None
            q, k = self.adapter.queries_keys(block, args, output)          # (B, N, H, d)
            prefix = self.adapter.prefix
            if "keys" in self.plugin.needs:
                self.plan = self.plugin.plan(k, prefix, self.steps[i])
            else:
                rows = attention_rows(q[:, :1].transpose(1, 2), k.transpose(1, 2), self.adapter.scale(block))
                self.plan = self.plugin.plan(rows[:, 0, prefix:], prefix, self.steps[i])
            return None
        return hook

    def _reduce_input(self, module, args):
        if self.plan is not None:
            return (self.plan.reduce(args[0], self.sizes)[0], *args[1:])

    def _expand_output(self, module, args, output):
        if self.plan is not None:
            return self.plan.expand(output)

    def _reduce_output(self, module, args, output):
        if self.plan is not None:
            output, self.sizes = self.plan.reduce(output, self.sizes)
            self.source = self.plan.dest.gather(1, self.source.clamp(min=0)).masked_fill(self.source < 0, -1)
            self.plan = None
        self.counts.append(output.shape[1])
        return output

    def _bias(self, block):
        heads = self.adapter.heads(block)

        def hook(module, args, kwargs):
            if self.sizes is None or bool((self.sizes == 1).all()):
                return None
            like = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))
            bias = self.adapter.bias(self.sizes.log(), heads).to(like.dtype)
            name = self.adapter.bias_kwarg
            if kwargs.get(name) is not None:
                bias = bias + kwargs[name]
            kwargs[name] = bias
            return args, kwargs
        return hook

    def kept(self, stage: int = -1):
        raise TypeError(f"{self.plugin.name} reduces tokens inside the encoder (merged or fused, not only kept); "
                        "see stats()")

    def positions(self):
        raise TypeError("positions() maps a language model's output; this is an encoder")

    def stats(self) -> list[dict]:
        if not self.counts:
            raise RuntimeError("no forward pass has run through the patched encoder yet")
        tokens_in = self.tokens_in
        per_block = [n - self.adapter.prefix for n in self.counts]
        stats = {"tokens_in": tokens_in, "tokens_out": per_block[-1], "retention": per_block[-1] / tokens_in,
                 "tokens_per_block": per_block, "block_avg_retention": sum(per_block) / (len(per_block) * tokens_in)}
        return [dict(stats) for _ in range(int(self.sizes.shape[0]))]      # the same for every image
