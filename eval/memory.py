"""Peak memory of a call on any device: CUDA's allocator statistics where there are some, else the tensors themselves.

A CPU has no allocator statistics, so ``TensorPeak`` watches every operator's outputs (a ``TorchDispatchMode``): a
storage that no input of the operator holds is a new allocation, counted until it is freed. The peak is the most
bytes held at once by tensors created inside the call, so weights and inputs made before it are left out, as
``peak_bytes`` leaves them out on CUDA. Buffers a kernel allocates and frees inside itself are not operator outputs
and are not seen (CUDA counts them); the watch also slows every operator, so it runs apart from any timing.
"""
from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorPeak(TorchDispatchMode):
    """``with TensorPeak() as watch: ...`` then ``watch.peak``: the most bytes held at once by storages created
    inside the block."""

    def __init__(self):
        super().__init__()
        self.held: dict[int, tuple[StorageWeakRef, int]] = {}       # data pointer -> (storage, bytes)
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in inputs or storage.nbytes() == 0:
                continue                                    # a view or an in-place result
            if key in self.held and not self.held[key][0].expired():
                continue                                    # counted already
            self._release_freed()                           # this address may be a freed storage's
            self.held[key] = (StorageWeakRef(storage), storage.nbytes())
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        return out

    def _release_freed(self):
        for key in [k for k, (ref, _) in self.held.items() if ref.expired()]:
            self.live -= self.held.pop(key)[1]


def peak_bytes(fn, device: torch.device | str) -> int:
    """The most bytes allocated at once while ``fn()`` runs, above what was allocated before it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with TensorPeak() as watch:
        fn()
    return watch.peak
