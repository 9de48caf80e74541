"""Batches from DataLoader workers to the main process through reused shared memory.

A fresh shared-memory block per batch costs a page fault per 4 KiB page when the worker first
writes it (and again when the main process first reads it): for a batch of a few MB that is more
than assembling the batch. So each worker of a :class:`~lattice.data.parquet.LatticeDataLoader`
keeps a small ring of shared-memory slots: it assembles a batch straight into a free slot and sends
a :class:`RingBatch` (the slot, by file descriptor, mapped once on the receiving side, and where
each tensor lies in it). The main process copies the batch out of the slot into memory of its own
(one copy per block, into memory its allocator reuses, or pinned memory) and hands the slot back
through a pipe. When no slot is free the worker falls back to a fresh block, so it never waits.

Only :class:`LatticeDataLoader` sets this up, and it turns every :class:`RingBatch` into a
:class:`Batch` before anyone sees it; a plain DataLoader over the dataset gets ordinary
shared-memory batches.
"""
from __future__ import annotations

import itertools
import os
import threading
from dataclasses import fields
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from lattice.batch import Batch
from lattice.sparse import KeyedJaggedTensor

__all__ = ["WorkerRing", "RingBatch", "open_rings", "close_rings"]

_GRAIN = 1 << 20  # slot sizes are multiples of this
_TOKENS = itertools.count()
_MAIN: Dict[Tuple[int, int], "_MainSide"] = {}  # token -> the main process's side of one epoch's rings


class _MainSide:
    def __init__(self, send, recv) -> None:
        self.send = send  # per worker: the pipe end slots go back through
        self.recv = recv  # (the workers' ends, closed after the epoch)
        self.keep: Dict[Tuple[int, int], torch.UntypedStorage] = {}  # slots stay mapped for the epoch
        self.lock = threading.Lock()


def open_rings(num_workers: int, context=None) -> Tuple[Tuple[int, int], List[Any]]:
    """Main process, before the workers start: a token and each worker's receiving pipe end."""
    import multiprocessing

    ctx = context or multiprocessing
    pipes = [ctx.Pipe(duplex=False) for _ in range(num_workers)]
    token = (os.getpid(), next(_TOKENS))
    _MAIN[token] = _MainSide([s for _, s in pipes], [r for r, _ in pipes])
    return token, [r for r, _ in pipes]


def close_rings(token) -> None:
    """Main process, after the epoch: unmap the slots, close the pipes."""
    side = _MAIN.pop(token, None)
    if side is None:
        return
    side.keep.clear()
    for conn in side.send + side.recv:
        try:
            conn.close()
        except OSError:
            pass


class WorkerRing:
    """A worker's slots (at most ``slots``), each reused once the main process has copied its batch out."""

    def __init__(self, token, worker: int, conn, slots: int) -> None:
        self.token, self.worker, self.conn, self.max = token, worker, conn, max(1, int(slots))
        self.slots: List[torch.UntypedStorage] = []
        self.busy: List[bool] = []
        self.last: Optional[Tuple[int, int, int]] = None  # (slot, rowwise bytes, used bytes) of the last batch

    def _collect(self) -> None:
        try:
            while self.conn.poll():
                self.busy[int.from_bytes(self.conn.recv_bytes(), "little")] = False
        except (EOFError, OSError):
            pass

    def acquire(self, rowwise: int, total: int) -> Optional[torch.UntypedStorage]:
        """A free slot of at least ``total`` bytes (``rowwise`` of them the per-row block), or ``None``."""
        self._collect()
        free = [i for i, b in enumerate(self.busy) if not b]
        pick = next((i for i in free if self.slots[i].nbytes() >= total), None)
        if pick is None:
            if free:
                pick = free[0]  # too small: replace it
            elif len(self.slots) < self.max:
                pick = len(self.slots)
                self.slots.append(None)
                self.busy.append(False)
            else:
                return None
            size = -(-(total + total // 4) // _GRAIN) * _GRAIN
            self.slots[pick] = torch.UntypedStorage._new_shared(size)
        self.busy[pick] = True
        self.last = (pick, rowwise, total)
        return self.slots[pick]

    def wrap(self, batch: Batch) -> Any:
        """What to send for ``batch``: a :class:`RingBatch` when it was assembled into a slot."""
        last, self.last = self.last, None
        if last is None:
            return batch
        slot, rowwise, used = last
        return RingBatch.of(batch, self.token, self.worker, slot, self.slots[slot], rowwise, used)


def _ref(t: Optional[torch.Tensor], ptr: int, end: int):
    if t is None:
        return None
    p = t.data_ptr()
    if ptr <= p < end and t.is_contiguous():
        return ("s", p - ptr, tuple(t.shape), t.dtype)
    return ("x", t)


class RingBatch:
    """A :class:`Batch` lying in a worker's ring slot, as sent to the main process."""

    def __init__(self, token, worker: int, slot: int, storage, rowwise: int, used: int, layout: Dict[str, Any]):
        self.token, self.worker, self.slot, self.storage = token, worker, slot, storage
        self.rowwise, self.used, self.layout = rowwise, used, layout

    @staticmethod
    def of(batch: Batch, token, worker: int, slot: int, storage, rowwise: int, used: int) -> "RingBatch":
        ptr = storage.data_ptr()
        end = ptr + used
        layout: Dict[str, Any] = {}
        for f in fields(batch):
            v = getattr(batch, f.name)
            if isinstance(v, KeyedJaggedTensor):
                layout[f.name] = ("kjt", v.keys(), v.stride(), v.length_per_key(), _ref(v.values(), ptr, end),
                                  _ref(v.lengths(), ptr, end), _ref(v.offsets(), ptr, end),
                                  _ref(v.weights_or_none(), ptr, end))
            else:
                layout[f.name] = _ref(v, ptr, end)
        return RingBatch(token, worker, slot, storage, rowwise, used, layout)

    def __reduce__(self):
        return (RingBatch, (self.token, self.worker, self.slot, self.storage, self.rowwise, self.used, self.layout))

    def materialize(self, pin: bool = False) -> Batch:
        """Main process: the batch copied out of the slot (into pinned memory with ``pin``); the slot
        goes back to the worker."""
        side = _MAIN.get(self.token)
        src = torch.empty(0, dtype=torch.uint8).set_(self.storage).numpy()
        blocks = []
        for a, b in ((0, self.rowwise), (self.rowwise, self.used)):
            if pin:
                dst_t = torch.empty(b - a, dtype=torch.uint8, pin_memory=True)
                dst = dst_t.numpy()
            else:  # numpy's allocator reuses freed blocks (fresh pages are expensive on some hosts)
                dst = np.empty(b - a, dtype=np.uint8)
                dst_t = torch.from_numpy(dst)
            np.copyto(dst, src[a:b])
            blocks.append((dst_t, {}))
        if side is not None:
            with side.lock:
                side.keep[(self.worker, self.slot)] = self.storage
                try:
                    side.send[self.worker].send_bytes(self.slot.to_bytes(4, "little"))
                except (OSError, ValueError):
                    pass  # the worker is gone (end of epoch)

        def tensor(ref):
            if ref is None:
                return None
            if ref[0] == "x":
                return ref[1].pin_memory() if pin else ref[1]
            _, off, shape, dtype = ref
            base, typed = blocks[0] if off < self.rowwise else blocks[1]
            off = off if off < self.rowwise else off - self.rowwise
            tb = typed.get(dtype)
            if tb is None:
                tb = typed[dtype] = base.view(dtype)
            item = tb.element_size()
            strides, st = [], 1
            for d in reversed(shape):
                strides.append(st)
                st *= d
            return tb.as_strided(shape, strides[::-1], off // item)

        out = {}
        for name, ref in self.layout.items():
            if ref is not None and ref[0] == "kjt":
                _, keys, stride, lpk, values, lengths, offsets, weights = ref
                opk = [0]
                for n in lpk:
                    opk.append(opk[-1] + n)
                out[name] = KeyedJaggedTensor(keys, tensor(values), weights=tensor(weights), lengths=tensor(lengths),
                                              offsets=tensor(offsets), stride=stride, length_per_key=list(lpk),
                                              offset_per_key=opk, validate=False)
            else:
                out[name] = tensor(ref)
        return Batch(**out)

    def pin_memory(self) -> Batch:
        """The DataLoader's pin-memory thread: copy straight into pinned memory."""
        return self.materialize(pin=True)
