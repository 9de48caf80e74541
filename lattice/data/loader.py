"""The loader: a ``DataLoader`` over a :class:`~lattice.data.dataset.ParquetBatchDataset` that knows its
epoch and position (for resuming mid-epoch), and moves batches from its workers through reused
shared memory (:mod:`lattice.data.transfer`): fresh shared memory per batch would cost a page fault
per page.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from torch.utils.data import DataLoader

from lattice.batch import Batch
from lattice.data.dataset import ParquetBatchDataset
from lattice.data.transfer import RingBatch, RingSender, close_rings, open_rings

__all__ = ["LatticeDataLoader", "identity_collate"]


def identity_collate(batch: Batch) -> Batch:
    """The reader already yields whole :class:`Batch` es."""
    return batch


class LatticeDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ParquetBatchDataset` that knows its epoch and position.

    - Each ``iter()`` reads the next epoch (reshuffled); :meth:`set_epoch` picks one explicitly.
    - ``len()`` is this rank's batch count, so Lightning knows the epoch length.
    - :meth:`state_dict` / :meth:`load_state_dict` save and restore ``(epoch, batches consumed)``;
      Lightning calls them for mid-epoch checkpoints, and the next ``iter()`` continues where the
      saved run stopped (every remaining row exactly once). The state is the same on every rank, as
      DDP ranks step in lockstep.

    ``persistent_workers`` is not supported: the epoch and position travel to the workers with the
    dataset at the start of each epoch.

    ``ring_slots``: shared-memory slots per worker that batches are handed over in and reused
    (default ``prefetch_factor + 2``; 0: a fresh shared-memory block per batch, as a plain DataLoader).
    Each epoch the workers' collate function is a :class:`~lattice.data.transfer.RingSender`, which
    copies a batch into a free slot; the dataset never knows.
    """

    def __init__(self, dataset: ParquetBatchDataset, num_workers: int = 0, pin_memory: bool = False,
                 timeout: float = 0, prefetch_factor: Optional[int] = None, multiprocessing_context=None,
                 ring_slots: Optional[int] = None, **kwargs: Any) -> None:
        if kwargs.get("persistent_workers"):
            raise ValueError("LatticeDataLoader does not support persistent_workers (the epoch and resume "
                             "position are sent to fresh workers each epoch)")
        kwargs.pop("persistent_workers", None)
        # Lightning re-instantiates loaders (e.g. for predict) passing these back with neutral values;
        # only a real setting is an error.
        neutral = {"batch_size": (None,), "shuffle": (None, False), "sampler": (None,), "batch_sampler": (None,),
                   "collate_fn": (None, identity_collate), "drop_last": (False,)}
        for bad, allowed in neutral.items():
            if bad in kwargs:
                value = kwargs.pop(bad)
                if not any(value is a for a in allowed):
                    raise ValueError(f"LatticeDataLoader: {bad} is set on the dataset, not the loader (got {value!r})")
        if not isinstance(dataset, ParquetBatchDataset):
            raise TypeError(f"LatticeDataLoader needs a ParquetBatchDataset, got {type(dataset).__name__}")
        dataset.num_workers = num_workers
        extra = {}
        if num_workers > 0:
            extra["prefetch_factor"] = prefetch_factor or 2
            extra["multiprocessing_context"] = multiprocessing_context
        super().__init__(dataset, batch_size=None, collate_fn=identity_collate, num_workers=num_workers,
                         pin_memory=pin_memory, timeout=timeout, **extra, **kwargs)
        self._next_epoch = 0
        self._next_skip = 0
        # batches in flight per worker: prefetch_factor queued + one being consumed + one being built
        self.ring_slots = (int(prefetch_factor or 2) + 2) if ring_slots is None else int(ring_slots)
        self._epoch: Optional[int] = None
        self._consumed = 0

    def __len__(self) -> int:
        return self.dataset.num_batches(self.num_workers)

    @property
    def epoch(self) -> int:
        """The epoch being read (or the next one, before the first ``iter()``)."""
        return self._next_epoch if self._epoch is None else self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Read ``epoch`` on the next ``iter()`` (from its start unless a loaded state says otherwise)."""
        if int(epoch) != self._next_epoch:
            self._next_skip = 0
        self._next_epoch = int(epoch)

    def __iter__(self):
        self.dataset.plan  # noqa: B018  (plan once here, not in every worker)
        epoch, skip = self._next_epoch, self._next_skip
        self.dataset.set_epoch(epoch, skip)
        self._epoch, self._consumed = epoch, skip
        self._next_epoch, self._next_skip = epoch + 1, 0
        token = None
        if self.num_workers > 0 and self.ring_slots > 0:  # workers hand batches over in reused shared memory
            token, conns = open_rings(self.num_workers, self.multiprocessing_context)
            self.collate_fn = RingSender(token, conns, self.ring_slots)  # the workers take it as they start
        try:
            it = super().__iter__()
        except BaseException:
            if token is not None:
                close_rings(token)
            raise
        finally:
            self.collate_fn = identity_collate
        return self._counting(it, token)

    def _counting(self, it, token=None):
        try:
            for batch in it:
                if isinstance(batch, RingBatch):
                    batch = batch.materialize()
                self._consumed += 1
                yield batch
        finally:
            if token is not None:
                close_rings(token)

    def _layout(self) -> Dict[str, Any]:
        rank, world = self.dataset.rank_world()
        return {
            "world_size": world,
            "num_workers": self.num_workers,
            "batch_size": self.dataset.batch_size,
            "rows": self.dataset.num_rows,
            "shuffle": self.dataset.shuffle,
            "seed": self.dataset.seed,
            "schema": self.dataset.schema.fingerprint(),
        }

    def state_dict(self) -> Dict[str, Any]:
        if self._epoch is None:
            epoch, batches = self._next_epoch, self._next_skip
        elif self._consumed >= len(self):
            epoch, batches = self._epoch + 1, 0
        else:
            epoch, batches = self._epoch, self._consumed
        return {"epoch": epoch, "batches": batches, "layout": self._layout()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        layout = state.get("layout")
        if layout is not None:
            mine = self._layout()
            diff = {k: (layout.get(k), v) for k, v in mine.items() if layout.get(k) != v}
            if diff and int(state.get("batches", 0)) > 0:
                detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
                raise ValueError(f"cannot resume the data position mid-epoch: the reader layout changed ({detail}); "
                                 f"resume with the same data, world size, workers, batch size and seed")
        self._next_epoch = int(state["epoch"])
        self._next_skip = int(state.get("batches", 0))
        self._epoch = None
