"""KTAP-style teacher-embedding cache with a time-to-live, and the projection into a student token.

In production the teacher does not run inside the student's serving path: its representation of a user
is precomputed asynchronously and served from a key-value store, so at request time the student reads
whatever the store holds for that user — possibly stale, possibly nothing. :class:`TeacherEmbeddingCache`
reproduces that during training:

* **Key.** ``user_id`` by default: the teacher's representation is (mostly) a function of the user and
  their history, a store is keyed by user, and one entry serves all of a user's later impressions until
  it expires — so the cache has real hits, misses and staleness. ``example_id`` is available for
  impression-level outputs; every impression is then new, which only mirrors the data-side join.
* **Read, then write.** :meth:`TeacherEmbeddingCache.lookup` returns what the store held *before* this
  batch; the batch's own teacher outputs are written afterwards (:meth:`~TeacherEmbeddingCache.update`),
  as an asynchronous precompute would land after the request it was computed for.
* **TTL.** An entry written at ``t`` serves lookups at ``now`` while ``now - t <= ttl`` (clock units:
  training steps or seconds, the caller's choice); an expired entry is a miss.
* **Miss.** A zero embedding and a hit bit of 0; :class:`TeacherTokenProjection` turns that into the
  learned "missing" token.

Storage sits behind :class:`EmbeddingStore` (batched get/put of ``(embedding, written_at)``), so an
external store — Redis, Memcached, a feature store — plugs in with two methods (see its docstring).
:class:`InProcessEmbeddingStore` (the default) is a fixed-size tensor table; :class:`DictEmbeddingStore`
an unbounded Python dict.
"""
from __future__ import annotations

import abc
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "EmbeddingStore",
    "InProcessEmbeddingStore",
    "DictEmbeddingStore",
    "TeacherEmbeddingCache",
    "TeacherTokenProjection",
]

CacheKey = Literal["user_id", "example_id"]


def _as_keys(keys: Tensor) -> Tensor:
    if keys.dim() != 1:
        raise ValueError(f"keys must be a 1-D int64 tensor [N], got shape {tuple(keys.shape)}")
    if keys.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"keys must be int64 (or int32), got {keys.dtype}")
    return keys.long()


class EmbeddingStore(abc.ABC):
    """A batched key-value store: ``int64 key -> (embedding [E] float32, written_at float64)``.

    Implement :meth:`get` and :meth:`put` to serve the cache from an external store, e.g. with Redis::

        class RedisStore(EmbeddingStore):
            def get(self, keys):
                raw = self.client.mget([f"t:{k}" for k in keys.tolist()])
                found = torch.tensor([r is not None for r in raw], dtype=torch.bool)
                rows = [np.frombuffer(r, np.float64) if r else np.zeros(self.dim + 1) for r in raw]
                arr = torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, self.dim + 1, dtype=torch.float64)
                return arr[:, 1:].float(), arr[:, 0], found
            def put(self, keys, values, written_at):
                rows = torch.cat([written_at[:, None], values.double()], 1).numpy()
                self.client.mset({f"t:{k}": r.tobytes() for k, r in zip(keys.tolist(), rows)})

    TTL checks happen in :class:`TeacherEmbeddingCache` (a store may also expire entries itself).
    """

    dim: int

    @abc.abstractmethod
    def get(self, keys: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``keys [N]`` int64 -> ``(values [N, E] float32, written_at [N] float64, found [N] bool)``, on CPU
        or ``keys``' device; ``values`` and ``written_at`` are arbitrary (zeros) where not found."""

    @abc.abstractmethod
    def put(self, keys: Tensor, values: Tensor, written_at: Tensor) -> None:
        """Writes ``values [N, E]`` with ``written_at [N]`` float64 under ``keys [N]``; where a key occurs
        more than once, its last occurrence wins."""

    def clear(self) -> None:  # pragma: no cover - optional
        raise NotImplementedError(f"{type(self).__name__} does not support clear()")


class InProcessEmbeddingStore(EmbeddingStore):
    """A fixed-size, direct-mapped tensor table (like a hardware cache): key ``k`` lives in slot
    ``hash(k) mod capacity``; writing a key whose slot holds another key evicts that key (counted in
    ``evictions``). A batch is written as its rows would be one by one: the last row mapping to a slot
    lands, and each earlier distinct key it (or another row) pushed out counts as an eviction. Every
    operation is vectorized over the batch; memory is ``capacity × (E + 2)`` words.

    Args:
        dim: E, the embedding width.
        capacity: number of slots (rounded up to a power of two); make it several times the number of
            live keys to keep collisions rare.
        device: where the table lives (``"cpu"``; a GPU run may keep it on the GPU).
    """

    def __init__(self, dim: int, capacity: int = 1 << 16, device: str | torch.device = "cpu") -> None:
        if dim <= 0:
            raise ValueError(f"dim must be > 0, got {dim}")
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        self.dim = int(dim)
        self.bits = max(1, math.ceil(math.log2(capacity)))
        self.capacity = 1 << self.bits
        self.device = torch.device(device)
        self.evictions = 0
        self._allocate()

    def _allocate(self) -> None:
        self.keys = torch.zeros(self.capacity, dtype=torch.long, device=self.device)
        self.valid = torch.zeros(self.capacity, dtype=torch.bool, device=self.device)
        self.values = torch.zeros(self.capacity, self.dim, dtype=torch.float32, device=self.device)
        self.written_at = torch.zeros(self.capacity, dtype=torch.float64, device=self.device)

    def _slot(self, keys: Tensor) -> Tensor:
        # Fibonacci hashing: multiply (wrapping int64), then take the top bits.
        h = keys * -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64
        return (h >> (64 - self.bits)) & (self.capacity - 1)

    def get(self, keys: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        keys = _as_keys(keys).to(self.device)
        slot = self._slot(keys)
        found = self.valid[slot] & (self.keys[slot] == keys)
        values = torch.where(found.unsqueeze(1), self.values[slot], torch.zeros((), device=self.device))
        return values, self.written_at[slot], found

    def put(self, keys: Tensor, values: Tensor, written_at: Tensor) -> None:
        keys = _as_keys(keys).to(self.device)
        if values.shape != (keys.numel(), self.dim):
            raise ValueError(f"values must be [N={keys.numel()}, E={self.dim}], got {tuple(values.shape)}")
        if written_at.shape != keys.shape:
            raise ValueError(f"written_at must be [N={keys.numel()}], got {tuple(written_at.shape)}")
        slot = self._slot(keys)
        keep = self._group_writes(slot, keys)
        slot, keys = slot[keep], keys[keep]
        self.keys[slot] = keys
        self.valid[slot] = True
        self.values[slot] = values.detach().to(self.device, torch.float32)[keep]
        self.written_at[slot] = written_at.to(self.device, torch.float64)[keep]

    def _group_writes(self, slot: Tensor, keys: Tensor) -> Tensor:
        """Writes ``keys`` as one after another would: counts in ``evictions`` every write whose slot's
        previous occupant (the stored key, then the batch's earlier writes there) is another key, and
        returns the rows that land, ascending: the last row of the batch in each slot."""
        order = torch.sort(slot, stable=True).indices  # grouped by slot, batch order kept within a slot
        slot, keys = slot[order], keys[order]
        first = torch.ones_like(slot, dtype=torch.bool)
        first[1:] = slot[1:] != slot[:-1]
        previous = torch.where(first, self.keys[slot], keys.roll(1))
        occupied = torch.where(first, self.valid[slot], torch.ones_like(first))
        self.evictions += int((occupied & (previous != keys)).sum())
        last = torch.ones_like(first)
        last[:-1] = first[1:]
        return torch.sort(order[last]).values

    def clear(self) -> None:
        self.valid.zero_()
        self.evictions = 0

    def __len__(self) -> int:
        return int(self.valid.sum())


class DictEmbeddingStore(EmbeddingStore):
    """An unbounded Python dict (no eviction). Simple and exact; a Python loop per key, so meant for
    small runs, tests, and as the model of an external store."""

    def __init__(self, dim: int) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be > 0, got {dim}")
        self.dim = int(dim)
        self._data: dict[int, tuple[Tensor, float]] = {}

    def get(self, keys: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        keys = _as_keys(keys)
        n = keys.numel()
        values = torch.zeros(n, self.dim)
        written = torch.zeros(n, dtype=torch.float64)
        found = torch.zeros(n, dtype=torch.bool)
        for i, k in enumerate(keys.tolist()):
            entry = self._data.get(k)
            if entry is not None:
                values[i], written[i], found[i] = entry[0], entry[1], True
        return values, written, found

    def put(self, keys: Tensor, values: Tensor, written_at: Tensor) -> None:
        keys = _as_keys(keys)
        if values.shape != (keys.numel(), self.dim):
            raise ValueError(f"values must be [N={keys.numel()}, E={self.dim}], got {tuple(values.shape)}")
        values = values.detach().float().cpu()
        for i, (k, t) in enumerate(zip(keys.tolist(), written_at.tolist())):
            self._data[k] = (values[i].clone(), float(t))

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


class TeacherEmbeddingCache:
    """Teacher embeddings served with a time-to-live, with hit-rate counters. See the module docstring.

    Args:
        dim: E, the teacher embedding width.
        ttl: time-to-live in clock units (``inf``: never expires; 0: only entries written at the same
            instant hit).
        key: which batch id keys the cache: ``"user_id"`` (default) or ``"example_id"``.
        clock: the unit of ``now``/``ttl`` the training module passes: ``"step"`` (the trainer's global
            step — deterministic, reproducible) or ``"wall"`` (seconds, ``time.time()``).
        capacity: slots of the default :class:`InProcessEmbeddingStore`.
        store: any :class:`EmbeddingStore` (``None``: an :class:`InProcessEmbeddingStore`).

    Counters (since the last :meth:`reset_counters`): ``lookups``, ``hits``, ``misses`` (never written,
    or evicted) and ``expired`` (found but older than ``ttl``); ``hit_rate = hits / lookups``.
    """

    def __init__(
        self,
        dim: int,
        ttl: float = math.inf,
        key: CacheKey = "user_id",
        clock: Literal["step", "wall"] = "step",
        capacity: int = 1 << 16,
        store: EmbeddingStore | None = None,
    ) -> None:
        if not ttl >= 0:
            raise ValueError(f"ttl must be >= 0, got {ttl}")
        if key not in ("user_id", "example_id"):
            raise ValueError(f"key must be 'user_id' or 'example_id', got {key!r}")
        if clock not in ("step", "wall"):
            raise ValueError(f"clock must be 'step' or 'wall', got {clock!r}")
        self.dim = int(dim)
        self.ttl = float(ttl)
        self.key = key
        self.clock = clock
        self.store = store if store is not None else InProcessEmbeddingStore(dim, capacity)
        if self.store.dim != self.dim:
            raise ValueError(f"store width {self.store.dim} differs from the cache's dim {self.dim}")
        self.reset_counters()

    def reset_counters(self) -> None:
        self.lookups = self.hits = self.misses = self.expired = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else float("nan")

    def counters(self) -> dict[str, float]:
        return {"lookups": self.lookups, "hits": self.hits, "misses": self.misses, "expired": self.expired,
                "hit_rate": self.hit_rate}

    def keys_of(self, batch: Any) -> Tensor:
        """The batch's ``[B]`` cache keys (``batch.user_id`` or ``batch.example_id``)."""
        keys = getattr(batch, self.key, None)
        if keys is None:
            raise ValueError(f"the cache is keyed by {self.key!r} but the batch has no such field")
        return keys

    def lookup(self, keys: Tensor, now: float) -> tuple[Tensor, Tensor]:
        """``keys [B]`` -> ``(embedding [B, E] float32, hit [B] bool)`` on ``keys``' device; a miss or an
        expired entry gives a zero row and ``hit = False``."""
        device = keys.device
        values, written_at, found = self.store.get(keys)
        values, written_at, found = values.to(device), written_at.to(device), found.to(device)
        fresh = (float(now) - written_at) <= self.ttl
        hit = found & fresh
        values = torch.where(hit.unsqueeze(1), values.float(), torch.zeros((), device=device))
        n, n_hit, n_found = keys.numel(), int(hit.sum()), int(found.sum())
        self.lookups += n
        self.hits += n_hit
        self.expired += n_found - n_hit
        self.misses += n - n_found
        return values, hit

    def update(self, keys: Tensor, embeddings: Tensor, now: float, mask: Tensor | None = None) -> None:
        """Writes ``embeddings [B, E]`` under ``keys [B]`` at time ``now``; rows where ``mask [B]`` is False
        (the teacher did not score them) and rows with non-finite values are skipped."""
        if embeddings.dim() != 2 or embeddings.shape != (keys.numel(), self.dim):
            raise ValueError(f"embeddings must be [B={keys.numel()}, E={self.dim}], got {tuple(embeddings.shape)}")
        ok = torch.isfinite(embeddings).all(dim=1)
        if mask is not None:
            ok = ok & mask.to(device=ok.device, dtype=torch.bool)
        if not bool(ok.all()):
            keys, embeddings = keys[ok], embeddings[ok]
        if keys.numel() == 0:
            return
        written = torch.full((keys.numel(),), float(now), dtype=torch.float64, device=keys.device)
        self.store.put(keys, embeddings.detach().float(), written)


class TeacherTokenProjection(nn.Module):
    """Teacher embedding -> one student feature token.

    ``token = W · [normalize(e) · hit, 1 - hit] + b``: a hit projects the (layer-normalized, so the
    teacher's scale does not matter) embedding; a miss is a zero embedding plus the mask bit, whose
    learned column is the "teacher missing" token.

    Args:
        embedding_dim: E.
        dim: d, the student's token width.
        normalize: layer-normalize the teacher embedding (no affine) before the projection.

    Shape: ``embedding [B, E]``, ``hit [B]`` bool -> ``[B, 1, d]``.
    """

    def __init__(self, embedding_dim: int, dim: int, normalize: bool = True) -> None:
        super().__init__()
        if embedding_dim <= 0 or dim <= 0:
            raise ValueError(f"embedding_dim and dim must be > 0, got {embedding_dim} and {dim}")
        self.embedding_dim = embedding_dim
        self.dim = dim
        self.normalize = normalize
        self.proj = nn.Linear(embedding_dim + 1, dim)

    def forward(self, embedding: Tensor, hit: Tensor) -> Tensor:
        if embedding.dim() != 2 or embedding.shape[1] != self.embedding_dim:
            raise ValueError(f"teacher embedding must be [B, {self.embedding_dim}], got {tuple(embedding.shape)}")
        if hit.shape != embedding.shape[:1]:
            raise ValueError(f"hit must be [B={embedding.shape[0]}], got {tuple(hit.shape)}")
        hit = hit.to(torch.bool)
        x = embedding.float()
        x = torch.where(hit.unsqueeze(1) & torch.isfinite(x), x, torch.zeros((), device=x.device))
        if self.normalize:
            x = F.layer_norm(x, (self.embedding_dim,))
            x = torch.where(hit.unsqueeze(1), x, torch.zeros((), device=x.device))
        missing = (~hit).to(x.dtype).unsqueeze(1)
        return self.proj(torch.cat([x, missing], dim=1)).unsqueeze(1)
