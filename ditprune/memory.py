"""Measured memory: the bytes of live tensors while real code runs, by kind.

:class:`LiveBytes` is a ``TorchDispatchMode``: every tensor a torch op creates while it is on is
counted by its storage until Python frees that storage (a weak reference's callback), on any
device, so it measures on the CPU what ``torch.cuda.max_memory_allocated`` measures on a GPU
(without the caching allocator's rounding). Tensors that existed before (the model's weights)
are counted with :meth:`LiveBytes.hold`. Code marks what it allocates with :func:`region`
(``"statistics"``, ``"masks"``, ``"workspace"``, ``"captured inputs"``, ``"backup"``); anything else
is ``"forward"``. The peak is recorded with its breakdown by kind at that moment.

It does not see memory outside torch's tensors (numpy arrays, the Python heap, the CUDA context),
and a storage created under ``torch._C._DisableTorchDispatch`` is not counted.
"""

from __future__ import annotations

import contextvars
import ctypes
import functools
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary, weakref

__all__ = ["LiveBytes", "measuring", "region", "mark", "release", "KINDS"]

KINDS = ("weights", "masks", "statistics", "workspace", "captured inputs", "backup", "forward")
_KIND: contextvars.ContextVar[str] = contextvars.ContextVar("ditprune_memory_kind", default="forward")
_ACTIVE: list["LiveBytes"] = []


@contextmanager
def region(kind: str) -> Iterator[None]:
    """Tensors created inside are counted as ``kind`` by an active :class:`LiveBytes`."""
    token = _KIND.set(kind)
    try:
        yield
    finally:
        _KIND.reset(token)


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release() -> None:
    """Give freed host memory back to the system (glibc's ``malloc_trim``; elsewhere nothing).
    glibc raises its mmap threshold after a large free, so the next layer-sized temporaries come
    from the heap and stay resident after they are freed: on a 1 GB bf16 transformer that doubled
    the resident set a prune adds. Called once per layer, on the CPU."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def mark(obj, kind: str) -> None:
    """Count the tensors in ``obj`` (any nesting of tuples, lists, dicts) as ``kind`` from now on,
    in every active :class:`LiveBytes` (e.g. a block's inputs, made by the forward, once kept)."""
    if not _ACTIVE:
        return
    tensors = [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]
    for mode in _ACTIVE:
        for t in tensors:
            mode._retag(t, kind)


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes() as mem: run()``; then ``mem.peak`` (bytes), ``mem.peak_by_kind`` (the
    kinds at that moment), ``mem.max_by_kind`` (each kind's own peak), ``mem.live`` (bytes still held). Per device: ``device=None`` counts every device."""

    def __init__(self, device: str | torch.device | None = None) -> None:
        super().__init__()
        self.device = torch.device(device) if device is not None else None
        self._seen = WeakIdKeyDictionary()
        self.by_kind = dict.fromkeys(KINDS, 0)
        self.peak = 0
        self.peak_by_kind = dict(self.by_kind)  # the kinds at the moment of the peak
        self.max_by_kind = dict(self.by_kind)  # each kind's own peak (at different moments)

    @property
    def live(self) -> int:
        return sum(self.by_kind.values())

    def hold(self, tensors: Iterable[torch.Tensor], kind: str = "weights") -> None:
        """Count tensors that existed before the mode started (e.g. ``model.parameters()``)."""
        for t in tensors:
            self._track(t, kind)
        self._update_peak()

    def _track(self, t: torch.Tensor, kind: str) -> None:
        if self.device is not None and t.device.type != self.device.type:
            return
        try:
            st = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # tensor subclasses without one storage
            return
        if st in self._seen or st.nbytes() == 0:
            return
        record = [kind, st.nbytes()]
        self.by_kind[kind] = self.by_kind.get(kind, 0) + record[1]

        def gone(_ref, record=record):
            self.by_kind[record[0]] -= record[1]

        self._seen[st] = (record, weakref.ref(st, gone))

    def _retag(self, t: torch.Tensor, kind: str) -> None:
        entry = self._seen.get(t.untyped_storage())
        if entry is None:
            return self._track(t, kind)
        record = entry[0]
        self.by_kind[record[0]] -= record[1]
        self.by_kind[kind] = self.by_kind.get(kind, 0) + record[1]
        record[0] = kind

    def __enter__(self):
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        return super().__exit__(*exc)

    def _update_peak(self) -> None:
        for k, v in self.by_kind.items():
            if v > self.max_by_kind.get(k, 0):
                self.max_by_kind[k] = v
        live = self.live
        if live > self.peak:
            self.peak = live
            self.peak_by_kind = dict(self.by_kind)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kind = _KIND.get()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, kind)
        self._update_peak()
        return out


@contextmanager
def measuring(device: str | torch.device, hold: Iterable[torch.Tensor] = ()) -> Iterator[LiveBytes]:
    """``with measuring(device, model.parameters()) as mem: run()``: a :class:`LiveBytes` on
    ``device`` holding ``hold``; on a GPU, ``mem.cuda_peak`` is then the allocator's peak above
    what was allocated before (None elsewhere)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with LiveBytes(device) as mem:
        mem.hold(hold)
        yield mem
        if cuda:
            torch.cuda.synchronize(device)
    mem.cuda_peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
