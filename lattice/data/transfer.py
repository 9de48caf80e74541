"""Batches from DataLoader workers to the main process through reused shared memory.

A fresh shared-memory block per batch costs a page fault per 4 KiB page when the worker first
writes it (and again when the main process first reads it): for a batch of a few MB that is more
than assembling the batch. So each worker of a :class:`~lattice.data.loader.LatticeDataLoader`
keeps a small ring of shared-memory slots. The dataset builds a batch in the worker's own memory
(which its allocator reuses); :class:`RingSender`, the loader's collate function in the worker,
copies the batch's memory blocks into a free slot and sends a :class:`RingBatch` (the slot, by file
descriptor, mapped once on the receiving side, and where each tensor lies in it). The main process
copies each block out of the slot into memory of its own (memory its allocator reuses, or pinned
memory) and hands the slot back through a pipe. When no slot is free the worker sends the batch
itself (the DataLoader moves it through fresh shared memory), so it never waits.

Only :class:`LatticeDataLoader` sets this up, and it turns every :class:`RingBatch` into a
:class:`Batch` before anyone sees it; the dataset and the builder know nothing of it.
"""
from __future__ import annotations

import itertools
import os
import threading
from dataclasses import fields
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import get_worker_info

from lattice.batch import Batch
from lattice.sparse import KeyedJaggedTensor

__all__ = ["RingSender", "WorkerRing", "RingBatch", "open_rings", "close_rings"]

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

    def _collect(self) -> None:
        try:
            while self.conn.poll():
                self.busy[int.from_bytes(self.conn.recv_bytes(), "little")] = False
        except (EOFError, OSError):
            pass

    def acquire(self, total: int) -> Optional[int]:
        """The index of a free slot of at least ``total`` bytes, now busy, or ``None``."""
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
        return pick

    def send(self, batch: Batch) -> Union["RingBatch", Batch]:
        """``batch``'s memory blocks copied into a free slot, as a :class:`RingBatch`; ``batch`` itself
        when no slot is free."""
        tensors = _tensors(batch)
        blocks: Dict[int, Tuple[torch.UntypedStorage, int]] = {}  # storage pointer -> (storage, offset in slot)
        total = 0
        for tensor in tensors.values():
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in blocks:
                blocks[storage.data_ptr()] = (storage, total)
                total += -(-storage.nbytes() // 64) * 64
        slot = self.acquire(total)
        if slot is None:
            return batch
        dst = _bytes(self.slots[slot])
        for storage, off in blocks.values():
            np.copyto(dst[off: off + storage.nbytes()], _bytes(storage))
        spans = [(off, storage.nbytes()) for storage, off in blocks.values()]
        index = {ptr: i for i, ptr in enumerate(blocks)}
        refs = {name: (index[t.untyped_storage().data_ptr()], t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
                for name, t in tensors.items()}
        return RingBatch(self.token, self.worker, slot, self.slots[slot], spans, _structure(batch), refs)


class RingSender:
    """The collate function of a :class:`LatticeDataLoader` 's workers for one epoch: sends each batch
    through the worker's :class:`WorkerRing` (made in the worker, on its first batch)."""

    def __init__(self, token, conns: List[Any], slots: int) -> None:
        self.token, self.conns, self.slots = token, conns, slots
        self.ring: Optional[WorkerRing] = None

    def __call__(self, batch: Batch) -> Union["RingBatch", Batch]:
        if self.ring is None:
            worker = get_worker_info().id
            self.ring = WorkerRing(self.token, worker, self.conns[worker], self.slots)
        return self.ring.send(batch)


def _bytes(storage: torch.UntypedStorage) -> np.ndarray:
    return torch.empty(0, dtype=torch.uint8).set_(storage).numpy()


def _tensors(batch: Batch) -> Dict[Tuple[str, str], torch.Tensor]:
    """Every tensor of ``batch``, keyed ``(field, part)`` (``part`` ``""`` for a plain tensor field)."""
    out = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, KeyedJaggedTensor):
            for part in _KJT_PARTS:
                t = getattr(v, part)()
                if t is not None:
                    out[(f.name, part)] = t
        elif isinstance(v, torch.Tensor):
            out[(f.name, "")] = v
    return out


_KJT_PARTS = ("values", "lengths", "offsets", "weights_or_none")


def _structure(batch: Batch) -> Dict[str, Any]:
    """The fields that are not tensors, and each KeyedJaggedTensor's keys and per-key lengths."""
    out: Dict[str, Any] = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, KeyedJaggedTensor):
            out[f.name] = ("kjt", v.keys(), v.stride(), v.length_per_key())
        elif not isinstance(v, torch.Tensor):
            out[f.name] = ("value", v)
    return out


class RingBatch:
    """A :class:`Batch` lying in a worker's ring slot, as sent to the main process: the slot, the
    ``(offset, bytes)`` span of each memory block in it, and where each tensor lies in its block."""

    def __init__(self, token, worker: int, slot: int, storage, spans: List[Tuple[int, int]],
                 structure: Dict[str, Any], refs: Dict[Tuple[str, str], tuple]) -> None:
        self.token, self.worker, self.slot, self.storage = token, worker, slot, storage
        self.spans, self.structure, self.refs = spans, structure, refs

    def __reduce__(self):
        return (RingBatch, (self.token, self.worker, self.slot, self.storage, self.spans, self.structure, self.refs))

    def materialize(self, pin: bool = False) -> Batch:
        """Main process: the batch copied out of the slot (into pinned memory with ``pin``), one copy
        per block; the slot goes back to the worker."""
        side = _MAIN.get(self.token)
        src = _bytes(self.storage)
        blocks = []
        for off, size in self.spans:
            if pin:
                dst_t = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            else:  # numpy's allocator reuses freed blocks (fresh pages are expensive on some hosts)
                dst_t = torch.from_numpy(np.empty(size, dtype=np.uint8))
            np.copyto(dst_t.numpy(), src[off: off + size])
            blocks.append(dst_t.untyped_storage())
        if side is not None:
            with side.lock:
                side.keep[(self.worker, self.slot)] = self.storage
                try:
                    side.send[self.worker].send_bytes(self.slot.to_bytes(4, "little"))
                except (OSError, ValueError):
                    pass  # the worker is gone (end of epoch)
        tensors = {key: torch.empty(0, dtype=dtype).set_(blocks[b], offset, shape, stride)
                   for key, (b, offset, shape, stride, dtype) in self.refs.items()}
        out: Dict[str, Any] = {}
        for name, what in self.structure.items():
            if what[0] == "value":
                out[name] = what[1]
                continue
            _, keys, stride, lpk = what
            opk = [0]
            for n in lpk:
                opk.append(opk[-1] + n)
            part = {p: tensors.get((name, p)) for p in _KJT_PARTS}
            out[name] = KeyedJaggedTensor(keys, part["values"], weights=part["weights_or_none"],
                                          lengths=part["lengths"], offsets=part["offsets"], stride=stride,
                                          length_per_key=list(lpk), offset_per_key=opk, validate=False)
        for (name, part), t in tensors.items():
            if part == "":
                out[name] = t
        return Batch(**out)

    def pin_memory(self) -> Batch:
        """The DataLoader's pin-memory thread: copy straight into pinned memory."""
        return self.materialize(pin=True)
