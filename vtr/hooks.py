"""Timed, removable forward hooks: the base of the language-model engine and of the vision-encoder engine."""
from __future__ import annotations

import time
from contextlib import contextmanager

_watch: list = []      # the context every outermost hook call runs in while ``watch_hooks`` is active


@contextmanager
def watch_hooks(context):
    """Run every vtr hook called inside this block in ``context`` (re-entered per call, never nested): the benchmark
    passes a ``TorchDispatchMode`` that counts the operators the hooks run, and nothing else."""
    _watch.append([context, False])
    try:
        yield context
    finally:
        _watch.pop()


def map_output(output, fn):
    """Apply ``fn`` to every entry of a model output, and to each tensor of its tuples (hidden_states)."""
    for key, value in output.items():
        output[key] = tuple(map(fn, value)) if isinstance(value, tuple) else fn(value)


class HookSet:
    """Forward hooks installed on a model, each timed, all removable at once."""

    def __init__(self):
        self.hooks: list = []
        self.hook_seconds = 0.0

    def _add(self, module, fn, with_kwargs: bool | None = None, post: bool = False, first: bool = False):
        """A forward pre-hook (or, with ``post``, a forward hook) that also adds its host time to ``hook_seconds``
        (what the benchmark reports as selection overhead; on a GPU it counts launch time, not queued kernels);
        ``with_kwargs``: whether it gets the module's keyword arguments (default: pre-hooks do, forward hooks don't);
        ``first``: before the module's other hooks (transformers records hidden states with hooks of its own)."""
        def timed(*args):
            start = time.perf_counter()
            try:
                if not _watch or _watch[-1][1]:
                    return fn(*args)
                watch = _watch[-1]
                watch[1] = True                  # a module the hook calls may have hooks of its own
                try:
                    with watch[0]:
                        return fn(*args)
                finally:
                    watch[1] = False
            finally:
                self.hook_seconds += time.perf_counter() - start
        register = module.register_forward_hook if post else module.register_forward_pre_hook
        self.hooks.append(register(timed, with_kwargs=not post if with_kwargs is None else with_kwargs, prepend=first))

    def remove(self):
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
