"""transformers' ``flash_attention_2`` code path on a CPU: flash-attn's two entry points replaced by an exact PyTorch
reference, so everything around them runs as on a GPU (unpadding by the 2-D mask, varlen sequences found from
``cu_seqlens`` or from position ids, the decode step's bottom-right causal alignment, the vision towers' varlen
attention). What it cannot check is the CUDA kernel itself, which flash-attn's own tests cover.
"""
from __future__ import annotations

from collections import Counter

import torch
import transformers.modeling_flash_attention_utils as fa_utils

calls = Counter()          # entry point -> times called, so a test can tell the FA2 path really ran


def _attend(q, k, v, scale, causal):
    """One sequence: q (Lq, H, d), k, v (Lk, Hkv, d). Causal masks are aligned bottom-right, as flash-attn >= 2.1
    does: query i sees keys j <= i + Lk - Lq."""
    lq, lk = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    logits = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if causal:
        later = torch.arange(lk) > torch.arange(lq)[:, None] + (lk - lq)
        logits = logits.masked_fill(later.to(q.device), float("-inf"))
    return torch.einsum("hqk,khd->qhd", logits.softmax(-1), v.float()).to(q.dtype)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, deterministic=False):
    """q (total_q, H, d), k, v (total_k, Hkv, d), sequence i at rows cu_seqlens[i]:cu_seqlens[i + 1]."""
    assert dropout_p == 0.0 and tuple(window_size) == (-1, -1) and not softcap
    calls["varlen"] += 1
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return torch.cat([_attend(q[a:b], k[c:e], v[c:e], scale, causal)
                      for a, b, c, e in zip(bq[:-1], bq[1:], bk[:-1], bk[1:])])


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    deterministic=False):
    """q (B, Lq, H, d), k, v (B, Lk, Hkv, d): every sequence of the batch whole."""
    assert dropout_p == 0.0 and tuple(window_size) == (-1, -1) and not softcap
    calls["dense"] += 1
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return torch.stack([_attend(q[b], k[b], v[b], scale, causal) for b in range(q.shape[0])])


def install():
    """Make transformers' flash-attention entry points resolve to the reference (they are looked up lazily and
    cached in these module globals). Models whose config says ``flash_attention_2`` then run the FA2 path."""
    fa_utils._flash_fn, fa_utils._flash_varlen_fn = flash_attn_func, flash_attn_varlen_func
    fa_utils._flash_with_kvcache_fn = None
    fa_utils._pad_fn, fa_utils._unpad_fn = fa_utils._pad_input, fa_utils._unpad_input
    fa_utils._process_flash_kwargs_fn = fa_utils._lazy_define_process_function(flash_attn_varlen_func)
    fa_utils._process_with_kvcache_kwargs_fn = dict
    fa_utils._loaded_implementation = "flash_attention_2"


def to_flash(model):
    """Switch a built model to ``flash_attention_2`` (the loader's check wants flash-attn and CUDA)."""
    install()
    model.config._attn_implementation = "flash_attention_2"
    return model
