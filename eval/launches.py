"""What a hook costs on a GPU, counted on any device: the operators it runs and those that wait for the device.

On a GPU a hook's time is mostly kernel launches and syncs: every operator that is not a view launches at least one
kernel, and an operator that reads values back to the host (``.item()``, a copy to the CPU, an output whose shape
depends on the values, such as ``nonzero``) waits until the queue has run dry. ``OpCount`` (a ``TorchDispatchMode``)
counts both on any device, so a CPU run shows what a GPU would pay (CUDA's ``bincount`` reads its input's maximum,
and indexing by a boolean mask runs a ``nonzero``: both count as syncs; so does ``.tolist()``, which on a CPU tensor
never reaches the dispatcher and is counted by a wrapper instead).
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Operators whose output's shape or value on the host needs the device's values: each waits for the device (a
# repeat_interleave told its output size does not).
VALUE_READS = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.equal.default,
    aten.is_nonzero.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.bincount.default, aten.repeat_interleave.Tensor,
}
# Indexing that takes a boolean mask turns it into indices first (a nonzero, which waits for the device).
MASK_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
# What the dispatcher passes through without a kernel.
FREE = {aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default,
        aten.lift_fresh.default}


class OpCount(TorchDispatchMode):
    """``with OpCount() as count: ...`` then ``count.ops`` (operators that launch a kernel: not views, not size
    queries) and ``count.syncs`` (those that wait for the device: value reads and copies from it to the CPU)."""

    def __init__(self):
        super().__init__()
        self.ops = self.syncs = 0
        self._originals = {}

    def __enter__(self):
        # .tolist() and .numpy() of a CPU tensor never reach the dispatcher; on a GPU they are copies to the host,
        # which it sees. So on a CPU they are counted here, where a GPU run would count the copy.
        for name in ("tolist", "numpy"):
            self._originals[name] = torch.Tensor.__dict__.get(name)       # None: inherited from the C base
            setattr(torch.Tensor, name, self._host_read(getattr(torch.Tensor, name)))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def _host_read(self, original):
        def read(tensor, *args, **kwargs):
            if tensor.device.type == "cpu":
                self.ops += 1
                self.syncs += 1
            return original(tensor, *args, **kwargs)
        return read

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in FREE or func.is_view:
            return out
        self.ops += 1
        kwargs = kwargs or {}
        if (func in VALUE_READS and not kwargs.get("output_size")) or _to_host(func, args, kwargs, out) or (
                func in MASK_INDEXING and any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])):
            self.syncs += 1
        return out


def _to_host(func, args, kwargs, out) -> bool:
    """A copy from a device's memory to the CPU's (``.cpu()``, ``.tolist()`` of a GPU tensor)."""
    if func not in (aten._to_copy.default, aten.copy_.default):
        return False
    sources = [t for t in tree_leaves((args[1:] if func is aten.copy_.default else args, kwargs))
               if isinstance(t, torch.Tensor)]
    targets = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    return any(s.device.type != "cpu" for s in sources) and any(t.device.type == "cpu" for t in targets)


def main(argv: list[str] | None = None) -> None:
    """Operators and syncs in vtr's hooks for one prefill, per method, at a video's real token count with small
    widths (launches and syncs depend on the counts, not the widths): ``python -m vtr.eval.launches [--frames 32]
    method ...``. LLaVA-OneVision's video shape (SigLIP at 384 px, 14 x 14 tokens a frame, 28 decoder layers); 32
    frames is the 7B video bench's 6,273 visual tokens."""
    import argparse

    import vtr
    from vtr.eval import bench_video
    from vtr.hooks import watch_hooks

    parser = argparse.ArgumentParser(prog="python -m vtr.eval.launches",
                                     description="operators and syncs in vtr's hooks, one video prefill")
    parser.add_argument("methods", nargs="+")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--retain", type=float, default=0.25)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    shape = dict(bench_video.QUICK_SHAPE, frames=args.frames, image_size=384, layers=28)
    model, inputs = bench_video.video_model(shape), bench_video.video_inputs(shape)
    for method in args.methods:
        with vtr.patch(model, method, retain=args.retain), torch.no_grad():
            model(**inputs, use_cache=True, logits_to_keep=1)         # first calls fill caches the second reuses
            with watch_hooks(OpCount()) as count:
                model(**inputs, use_cache=True, logits_to_keep=1)
        print(f"{method:12s} {count.ops:6d} operators {count.syncs:3d} syncs", flush=True)


if __name__ == "__main__":
    main()
