"""Jagged (ragged) tensors: :class:`JaggedTensor` and :class:`KeyedJaggedTensor`.

Field names, method names and memory layout follow TorchRec, so code and intuition carry over:

- A :class:`JaggedTensor` holds ``R`` variable-length rows ("bags") packed along dim 0 of ``values``
  ``[N, *D]``, with ``lengths [R]`` (row sizes) or ``offsets [R + 1]`` (row starts, ``offsets[0] == 0``,
  ``offsets[R] == N``) and optional per-value ``weights [N]``. Row ``r`` is
  ``values[offsets[r] : offsets[r + 1]]``.
- A :class:`KeyedJaggedTensor` holds ``K`` keys (features) for a batch of ``B = stride`` samples in
  **key-major** order: ``lengths [K * B]``, ``offsets [K * B + 1]``, and the values of key ``k`` (index
  ``i`` in ``keys``) for sample ``b`` live in ``values[offsets[i * B + b] : offsets[i * B + b + 1]]``.
  This is the layout ``torch.ops.lattice.jagged_embedding_pool`` consumes.

Either ``lengths`` or ``offsets`` may be given; the other is derived on first use and cached.
lengths/offsets keep the integer dtype they were given in (int64 when derived from nothing).

Construction validates by default (vectorized torch ops, errors naming the field, the position and the
bad value); pass ``validate=False`` on hot paths where the producer already guarantees the invariants.
Under ``torch.compile`` only the static (shape/dtype) checks run.

Optional interop with TorchRec: :func:`to_torchrec` / :func:`from_torchrec` (TorchRec is imported
lazily and is not a dependency).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor

__all__ = [
    "JaggedTensor",
    "KeyedJaggedTensor",
    "jt_is_equal",
    "kjt_is_equal",
    "to_torchrec",
    "from_torchrec",
    "jagged_row_ids",
    "jagged_positions",
]

_INDEX_DTYPES = (torch.int32, torch.int64)
Device = Union[str, torch.device, int]


# --------------------------------------------------------------------------------------------------
# helpers (vectorized; no Python loops over rows)
# --------------------------------------------------------------------------------------------------
def _lengths_to_offsets(lengths: Tensor) -> Tensor:
    """``lengths [R]`` -> ``offsets [R + 1]`` (exclusive cumsum with a leading 0), dtype preserved."""
    return F.pad(torch.cumsum(lengths, 0, dtype=lengths.dtype), (1, 0))


def jagged_row_ids(lengths: Tensor, total: int) -> Tensor:
    """``[total]`` row index of every value of a jagged tensor with row ``lengths [R]`` (summing to
    ``total``, passed so no device sync is needed)."""
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths, output_size=total)


def jagged_positions(offsets: Tensor, total: int) -> Tensor:
    """``[total]`` position of every value within its row, for row starts ``offsets [R + 1]``."""
    starts = torch.repeat_interleave(offsets[:-1], _offsets_to_lengths(offsets), output_size=total)
    return torch.arange(total, device=offsets.device) - starts


def _offsets_to_lengths(offsets: Tensor) -> Tensor:
    """``offsets [R + 1]`` -> ``lengths [R]``, dtype preserved."""
    return offsets[1:] - offsets[:-1]


def _gather_rows(
    values: Tensor,
    weights: Optional[Tensor],
    offsets: Tensor,
    lengths: Tensor,
    rows: Tensor,
) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """Gather jagged rows ``rows [R']`` (repeats allowed) into a new packed layout.

    Returns ``(values [N', *D], weights [N'] | None, lengths [R'])`` where row ``j`` of the result is row
    ``rows[j]`` of the input. Built from one ``repeat_interleave`` + ``arange``: the source position of
    output element ``p`` in new row ``j`` is ``offsets[rows[j]] + (p - new_offsets[j])``.
    """
    rows = rows.to(device=lengths.device, dtype=torch.int64)
    new_lengths = lengths.index_select(0, rows)
    starts = offsets.index_select(0, rows).to(torch.int64)
    new_lengths64 = new_lengths.to(torch.int64)
    new_starts = torch.cumsum(new_lengths64, 0) - new_lengths64
    total = int(new_lengths64.sum()) if rows.numel() else 0
    shift = torch.repeat_interleave(starts - new_starts, new_lengths64, output_size=total)
    index = torch.arange(total, device=values.device, dtype=torch.int64) + shift
    new_values = values.index_select(0, index)
    new_weights = None if weights is None else weights.index_select(0, index)
    return new_values, new_weights, new_lengths


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - very old torch
        return False


def _first_true(mask: Tensor) -> int:
    return int(mask.nonzero()[0, 0])


def _check_tensor(x, name: str, owner: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(x).__name__}")


def _check_index_tensor(x: Tensor, name: str, owner: str) -> None:
    _check_tensor(x, name, owner)
    if x.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{owner}: {name} must be int32 or int64, got {x.dtype}")
    if x.dim() != 1:
        raise ValueError(f"{owner}: {name} must be 1-D, got shape {tuple(x.shape)}")


def _validate_jagged(
    owner: str,
    values: Tensor,
    lengths: Optional[Tensor],
    offsets: Optional[Tensor],
    weights: Optional[Tensor],
    describe_row=None,
) -> None:
    """Check the packed layout; raise ``TypeError``/``ValueError`` naming the field, position and value.

    ``describe_row(r) -> str`` turns a row position into words (e.g. key and sample for a KJT).
    """
    describe_row = describe_row or (lambda r: f"row {r}")
    _check_tensor(values, "values", owner)
    if values.dim() < 1:
        raise ValueError(f"{owner}: values must have at least 1 dimension, got a 0-d tensor")
    n = values.size(0)
    device = values.device
    if lengths is None and offsets is None:
        raise ValueError(f"{owner}: one of lengths or offsets is required")
    for name, t in (("lengths", lengths), ("offsets", offsets)):
        if t is not None:
            _check_index_tensor(t, name, owner)
            if t.device != device:
                raise ValueError(f"{owner}: {name} is on {t.device} but values is on {device}")
    if weights is not None:
        _check_tensor(weights, "weights", owner)
        if not weights.is_floating_point():
            raise TypeError(f"{owner}: weights must be a floating-point tensor, got {weights.dtype}")
        if weights.dim() != 1 or weights.size(0) != n:
            raise ValueError(
                f"{owner}: weights must have shape [{n}] (one per value), got {tuple(weights.shape)}"
            )
        if weights.device != device:
            raise ValueError(f"{owner}: weights is on {weights.device} but values is on {device}")
    if offsets is not None and offsets.numel() < 1:
        raise ValueError(f"{owner}: offsets must have at least one element (offsets[0] == 0)")
    if lengths is not None and offsets is not None and offsets.numel() != lengths.numel() + 1:
        raise ValueError(
            f"{owner}: len(offsets) must be len(lengths) + 1 = {lengths.numel() + 1}, "
            f"got {offsets.numel()}"
        )
    if _is_compiling():
        return  # data-dependent checks below would break the graph

    if lengths is not None and lengths.numel():
        neg = lengths < 0
        if bool(neg.any()):
            r = _first_true(neg)
            raise ValueError(
                f"{owner}: lengths[{r}] = {int(lengths[r])} is negative ({describe_row(r)})"
            )
        total = int(lengths.sum(dtype=torch.int64))
        if total != n:
            raise ValueError(
                f"{owner}: sum(lengths) = {total} does not match the number of values ({n})"
            )
    elif lengths is not None and n != 0:
        raise ValueError(f"{owner}: lengths is empty but values has {n} rows")
    if offsets is not None:
        first, last = int(offsets[0]), int(offsets[-1])
        if first != 0:
            raise ValueError(f"{owner}: offsets[0] must be 0, got {first}")
        dec = offsets[1:] < offsets[:-1]
        if dec.numel() and bool(dec.any()):
            r = _first_true(dec)
            raise ValueError(
                f"{owner}: offsets decrease at position {r + 1}: offsets[{r}] = {int(offsets[r])} > "
                f"offsets[{r + 1}] = {int(offsets[r + 1])} ({describe_row(r)})"
            )
        if last != n:
            raise ValueError(
                f"{owner}: offsets[-1] = {last} does not match the number of values ({n})"
            )
    if lengths is not None and offsets is not None:
        bad = _offsets_to_lengths(offsets) != lengths
        if bad.numel() and bool(bad.any()):
            r = _first_true(bad)
            raise ValueError(
                f"{owner}: lengths and offsets disagree at {describe_row(r)}: lengths[{r}] = "
                f"{int(lengths[r])} but offsets[{r + 1}] - offsets[{r}] = "
                f"{int(offsets[r + 1] - offsets[r])}"
            )


def _tensor_summary(t: Optional[Tensor]) -> str:
    if t is None:
        return "None"
    if t.numel() <= 16:
        return f"{t.tolist()}"
    return f"Tensor(shape={list(t.shape)}, dtype={t.dtype})"


# --------------------------------------------------------------------------------------------------
# JaggedTensor
# --------------------------------------------------------------------------------------------------
class JaggedTensor:
    """``R`` variable-length rows packed along dim 0.

    Args:
        values: ``[N, *D]`` the rows' elements, concatenated (usually ``[N]`` ids or ``[N, D]`` tokens).
        lengths: ``[R]`` int32/int64 row sizes.
        offsets: ``[R + 1]`` int32/int64 row starts; ``offsets[0] == 0``, ``offsets[-1] == N``.
        weights: ``[N]`` optional floating-point per-value weights.
        validate: check the invariants (vectorized; costs a host sync on GPU).

    Note: the positional order is ``(values, lengths, offsets, weights)`` (TorchRec's is
    ``(values, weights, lengths, offsets)``); pass keywords when in doubt.
    """

    def __init__(
        self,
        values: Tensor,
        lengths: Optional[Tensor] = None,
        offsets: Optional[Tensor] = None,
        weights: Optional[Tensor] = None,
        *,
        validate: bool = True,
    ) -> None:
        if validate:
            _validate_jagged("JaggedTensor", values, lengths, offsets, weights)
        elif lengths is None and offsets is None:
            raise ValueError("JaggedTensor: one of lengths or offsets is required")
        self._values = values
        self._lengths = lengths
        self._offsets = offsets
        self._weights = weights

    # ---- construction -----------------------------------------------------------------------
    @staticmethod
    def empty(
        is_weighted: bool = False,
        device: Optional[Device] = None,
        values_dtype: Optional[torch.dtype] = None,
        weights_dtype: Optional[torch.dtype] = None,
        lengths_dtype: torch.dtype = torch.int64,
    ) -> "JaggedTensor":
        """A JaggedTensor with zero rows and zero values."""
        values = torch.empty(0, dtype=values_dtype or torch.int64, device=device)
        weights = (
            torch.empty(0, dtype=weights_dtype or torch.float32, device=device) if is_weighted else None
        )
        lengths = torch.empty(0, dtype=lengths_dtype, device=device)
        return JaggedTensor(values, lengths=lengths, weights=weights, validate=False)

    @staticmethod
    def from_dense(
        values: Sequence[Tensor], weights: Optional[Sequence[Tensor]] = None
    ) -> "JaggedTensor":
        """From a list of ``R`` tensors ``[n_r, *D]`` (one per row; ``n_r`` may be 0).

        ``weights``, if given, is a matching list of ``[n_r]`` tensors. lengths are int64.
        """
        values = list(values)
        if not values:
            raise ValueError("JaggedTensor.from_dense: values is an empty list; use JaggedTensor.empty()")
        lengths = torch.tensor([v.size(0) for v in values], dtype=torch.int64, device=values[0].device)
        w = None
        if weights is not None:
            weights = list(weights)
            if len(weights) != len(values):
                raise ValueError(
                    f"JaggedTensor.from_dense: got {len(weights)} weight tensors for {len(values)} rows"
                )
            w = torch.cat(weights)
        return JaggedTensor(torch.cat(values), lengths=lengths, weights=w)

    @staticmethod
    def from_padded_dense(
        values: Tensor, lengths: Tensor, weights: Optional[Tensor] = None, *, validate: bool = True
    ) -> "JaggedTensor":
        """From padded ``values [R, L, *D]`` keeping the first ``lengths[r]`` entries of row ``r``.

        ``lengths [R]`` int32/int64 with ``0 <= lengths[r] <= L``; ``weights [R, L]`` optional.
        (TorchRec calls this ``from_dense_lengths``.)
        """
        owner = "JaggedTensor.from_padded_dense"
        _check_tensor(values, "values", owner)
        _check_index_tensor(lengths, "lengths", owner)
        if values.dim() < 2 or values.size(0) != lengths.numel():
            raise ValueError(
                f"{owner}: values must be [R, L, *D] with R = len(lengths) = {lengths.numel()}, "
                f"got shape {tuple(values.shape)}"
            )
        if weights is not None and tuple(weights.shape) != tuple(values.shape[:2]):
            raise ValueError(
                f"{owner}: weights must have shape {tuple(values.shape[:2])}, got {tuple(weights.shape)}"
            )
        max_len = values.size(1)
        if validate and not _is_compiling() and lengths.numel():
            bad = (lengths < 0) | (lengths > max_len)
            if bool(bad.any()):
                r = _first_true(bad)
                raise ValueError(f"{owner}: lengths[{r}] = {int(lengths[r])} is outside [0, {max_len}]")
        mask = torch.arange(max_len, device=values.device) < lengths.unsqueeze(1)
        return JaggedTensor(
            values[mask],
            lengths=lengths,
            weights=None if weights is None else weights[mask],
            validate=False,
        )

    from_dense_lengths = from_padded_dense  # TorchRec's name

    # ---- accessors --------------------------------------------------------------------------
    def values(self) -> Tensor:
        """``[N, *D]``."""
        return self._values

    def weights(self) -> Tensor:
        """``[N]``; raises if the tensor is unweighted (see :meth:`weights_or_none`)."""
        if self._weights is None:
            raise ValueError("JaggedTensor has no weights; use weights_or_none()")
        return self._weights

    def weights_or_none(self) -> Optional[Tensor]:
        return self._weights

    def lengths(self) -> Tensor:
        """``[R]`` (derived from offsets on first use, then cached)."""
        if self._lengths is None:
            self._lengths = _offsets_to_lengths(self._offsets)
        return self._lengths

    def lengths_or_none(self) -> Optional[Tensor]:
        return self._lengths

    def offsets(self) -> Tensor:
        """``[R + 1]`` (derived from lengths on first use, then cached)."""
        if self._offsets is None:
            self._offsets = _lengths_to_offsets(self._lengths)
        return self._offsets

    def offsets_or_none(self) -> Optional[Tensor]:
        return self._offsets

    def num_rows(self) -> int:
        """``R`` (from shapes only; no sync)."""
        if self._lengths is not None:
            return self._lengths.numel()
        return self._offsets.numel() - 1

    def __len__(self) -> int:
        return self.num_rows()

    def device(self) -> torch.device:
        return self._values.device

    # ---- conversions ------------------------------------------------------------------------
    def _padded_index(self, desired_length: Optional[int]) -> Tuple[int, Tensor, Tensor, Tensor]:
        lengths = self.lengths().to(torch.int64)
        n_rows = lengths.numel()
        if desired_length is None:
            desired_length = int(lengths.max()) if n_rows else 0
        if desired_length < 0:
            raise ValueError(f"desired_length must be >= 0, got {desired_length}")
        n = self._values.size(0)
        row = jagged_row_ids(lengths, n)
        pos = torch.arange(n, device=lengths.device) - self.offsets().to(torch.int64)[row]
        keep = pos < desired_length
        return desired_length, row, pos, keep

    def to_padded_dense(
        self, desired_length: Optional[int] = None, padding_value: float = 0
    ) -> Tensor:
        """``[R, L, *D]`` with ``L = desired_length`` or the longest row; longer rows keep their first
        ``L`` entries, shorter ones are filled with ``padding_value``."""
        length, row, pos, keep = self._padded_index(desired_length)
        v = self._values
        out = v.new_full((self.num_rows(), length) + tuple(v.shape[1:]), padding_value)
        out[row[keep], pos[keep]] = v[keep]
        return out

    def to_padded_dense_weights(
        self, desired_length: Optional[int] = None, padding_value: float = 0.0
    ) -> Optional[Tensor]:
        """``[R, L]`` padded weights, or ``None`` when unweighted."""
        if self._weights is None:
            return None
        length, row, pos, keep = self._padded_index(desired_length)
        out = self._weights.new_full((self.num_rows(), length), padding_value)
        out[row[keep], pos[keep]] = self._weights[keep]
        return out

    def to_dense(self) -> List[Tensor]:
        """List of ``R`` tensors ``[n_r, *D]`` (views into values)."""
        return list(torch.split(self._values, self.lengths().tolist()))

    def to_dense_weights(self) -> Optional[List[Tensor]]:
        """List of ``R`` tensors ``[n_r]``, or ``None`` when unweighted."""
        if self._weights is None:
            return None
        return list(torch.split(self._weights, self.lengths().tolist()))

    def select_samples(self, indices: Tensor) -> "JaggedTensor":
        """Rows ``indices [R']`` (int, repeats allowed, each in ``[0, R)``) as a new JaggedTensor."""
        _check_rows_index(indices, self.num_rows(), "JaggedTensor.select_samples")
        values, weights, lengths = _gather_rows(
            self._values, self._weights, self.offsets(), self.lengths(), indices
        )
        return JaggedTensor(values, lengths=lengths, weights=weights, validate=False)

    # ---- device movement --------------------------------------------------------------------
    def _map(self, fn) -> "JaggedTensor":
        return JaggedTensor(
            fn(self._values),
            lengths=None if self._lengths is None else fn(self._lengths),
            offsets=None if self._offsets is None else fn(self._offsets),
            weights=None if self._weights is None else fn(self._weights),
            validate=False,
        )

    def to(self, device: Device, non_blocking: bool = False) -> "JaggedTensor":
        return self._map(lambda t: t.to(device=device, non_blocking=non_blocking))

    def cpu(self) -> "JaggedTensor":
        return self.to("cpu")

    def pin_memory(self) -> "JaggedTensor":
        """Copy into page-locked memory (needs an accelerator; raises ``RuntimeError`` without one)."""
        return self._map(lambda t: t.pin_memory())

    def record_stream(self, stream) -> None:
        for t in (self._values, self._lengths, self._offsets, self._weights):
            if t is not None:
                t.record_stream(stream)

    def __repr__(self) -> str:
        return (
            f"JaggedTensor(values={_tensor_summary(self._values)}, lengths={_tensor_summary(self.lengths())}"
            + (f", weights={_tensor_summary(self._weights)}" if self._weights is not None else "")
            + f", device={self.device()})"
        )


def _check_rows_index(indices: Tensor, n_rows: int, owner: str) -> None:
    _check_tensor(indices, "indices", owner)
    if indices.dtype not in _INDEX_DTYPES or indices.dim() != 1:
        raise TypeError(
            f"{owner}: indices must be a 1-D int32/int64 tensor, got {indices.dtype} of shape "
            f"{tuple(indices.shape)}"
        )
    if not _is_compiling() and indices.numel():
        bad = (indices < 0) | (indices >= n_rows)
        if bool(bad.any()):
            p = _first_true(bad)
            raise ValueError(f"{owner}: indices[{p}] = {int(indices[p])} is outside [0, {n_rows})")


# --------------------------------------------------------------------------------------------------
# KeyedJaggedTensor
# --------------------------------------------------------------------------------------------------
class KeyedJaggedTensor:
    """``K`` keys x ``B`` samples of jagged values, key-major.

    Args:
        keys: ``K`` distinct feature names.
        values: ``[N, *D]`` (usually ``[N]`` int ids), all keys' bags concatenated key-major.
        weights: ``[N]`` optional floating-point per-value weights.
        lengths: ``[K * B]`` int32/int64; ``lengths[i * B + b]`` is the bag size of key ``i``, sample ``b``.
        offsets: ``[K * B + 1]`` int32/int64 bag starts (either lengths or offsets is required).
        stride: ``B``; inferred as ``len(lengths) // K`` when omitted (``0`` when there are no keys).
        length_per_key / offset_per_key: optional precomputed ``[K]`` / ``[K + 1]`` Python ints, which
            save a host sync later.
        validate: check the invariants (vectorized; costs a host sync on GPU).
    """

    def __init__(
        self,
        keys: Sequence[str],
        values: Tensor,
        weights: Optional[Tensor] = None,
        lengths: Optional[Tensor] = None,
        offsets: Optional[Tensor] = None,
        stride: Optional[int] = None,
        length_per_key: Optional[List[int]] = None,
        offset_per_key: Optional[List[int]] = None,
        *,
        validate: bool = True,
    ) -> None:
        owner = "KeyedJaggedTensor"
        keys = list(keys)
        if lengths is None and offsets is None:
            raise ValueError(f"{owner}: one of lengths or offsets is required")
        n_bags = lengths.numel() if lengths is not None else offsets.numel() - 1
        n_keys = len(keys)
        if validate:
            bad = [k for k in keys if not isinstance(k, str)]
            if bad:
                raise TypeError(f"{owner}: keys must be strings, got {bad[0]!r}")
            if len(set(keys)) != n_keys:
                seen = set()
                dup = next(k for k in keys if k in seen or seen.add(k))
                raise ValueError(f"{owner}: duplicate key {dup!r} in keys")
        if stride is None:
            if n_keys == 0:
                stride = 0
            elif n_bags % n_keys:
                raise ValueError(
                    f"{owner}: len(lengths) = {n_bags} is not divisible by the number of keys ({n_keys})"
                )
            else:
                stride = n_bags // n_keys
        else:
            # A SymInt (a dynamic batch size under torch.export) stays symbolic; int() would specialize it.
            stride = stride if isinstance(stride, torch.SymInt) else int(stride)
            if stride < 0:
                raise ValueError(f"{owner}: stride must be >= 0, got {stride}")
            if n_bags != n_keys * stride:
                raise ValueError(
                    f"{owner}: len(lengths) = {n_bags} does not equal number of keys ({n_keys}) "
                    f"x stride ({stride}) = {n_keys * stride}"
                )
        if validate:
            B = stride

            def describe(r: int) -> str:
                return f"key {keys[r // B]!r}, sample {r % B}"

            _validate_jagged(owner, values, lengths, offsets, weights, describe)
            for name, given, size in (
                ("length_per_key", length_per_key, n_keys),
                ("offset_per_key", offset_per_key, n_keys + 1),
            ):
                if given is not None and len(given) != size:
                    raise ValueError(f"{owner}: {name} must have {size} entries, got {len(given)}")

        self._keys = keys
        self._values = values
        self._weights = weights
        self._lengths = lengths
        self._offsets = offsets
        self._stride = stride
        self._length_per_key = None if length_per_key is None else list(length_per_key)
        self._offset_per_key = None if offset_per_key is None else list(offset_per_key)
        self._index_per_key: Optional[Dict[str, int]] = None
        if validate and not _is_compiling() and (
            length_per_key is not None or offset_per_key is not None
        ):
            lpk_t = self._length_per_key_tensor()
            if length_per_key is not None and lpk_t.tolist() != self._length_per_key:
                raise ValueError(
                    f"{owner}: length_per_key = {self._length_per_key} does not match the lengths "
                    f"({lpk_t.tolist()})"
                )
            if offset_per_key is not None:
                expect = [0] + torch.cumsum(lpk_t, 0).tolist()
                if expect != self._offset_per_key:
                    raise ValueError(
                        f"{owner}: offset_per_key = {self._offset_per_key} does not match the lengths "
                        f"({expect})"
                    )

    # ---- construction -----------------------------------------------------------------------
    @staticmethod
    def from_lengths_sync(
        keys: Sequence[str],
        values: Tensor,
        lengths: Tensor,
        weights: Optional[Tensor] = None,
        stride: Optional[int] = None,
        *,
        validate: bool = True,
    ) -> "KeyedJaggedTensor":
        """Construct from lengths and compute ``length_per_key``/``offset_per_key`` now (one sync)."""
        kjt = KeyedJaggedTensor(keys, values, weights=weights, lengths=lengths, stride=stride,
                                validate=validate)
        kjt.sync()
        return kjt

    @staticmethod
    def from_offsets_sync(
        keys: Sequence[str],
        values: Tensor,
        offsets: Tensor,
        weights: Optional[Tensor] = None,
        stride: Optional[int] = None,
        *,
        validate: bool = True,
    ) -> "KeyedJaggedTensor":
        """Construct from offsets and compute ``length_per_key``/``offset_per_key`` now (one sync)."""
        kjt = KeyedJaggedTensor(keys, values, weights=weights, offsets=offsets, stride=stride,
                                validate=validate)
        kjt.sync()
        return kjt

    @staticmethod
    def from_jt_dict(jt_dict: Dict[str, JaggedTensor]) -> "KeyedJaggedTensor":
        """From ``{key: JaggedTensor [B rows]}``; every JaggedTensor must have the same number of rows
        and all or none of them weights."""
        if not jt_dict:
            raise ValueError("KeyedJaggedTensor.from_jt_dict: empty dict; use KeyedJaggedTensor.empty()")
        keys = list(jt_dict)
        jts = list(jt_dict.values())
        rows = {jt.num_rows() for jt in jts}
        if len(rows) != 1:
            raise ValueError(
                f"KeyedJaggedTensor.from_jt_dict: JaggedTensors have different numbers of rows "
                f"{[jt.num_rows() for jt in jts]}"
            )
        weighted = {jt.weights_or_none() is not None for jt in jts}
        if len(weighted) != 1:
            raise ValueError("KeyedJaggedTensor.from_jt_dict: either all JaggedTensors or none are weighted")
        weights = torch.cat([jt.weights() for jt in jts]) if weighted.pop() else None
        return KeyedJaggedTensor(
            keys,
            torch.cat([jt.values() for jt in jts]),
            weights=weights,
            lengths=torch.cat([jt.lengths() for jt in jts]),
            stride=rows.pop(),
        )

    @staticmethod
    def empty(
        is_weighted: bool = False,
        device: Optional[Device] = None,
        values_dtype: Optional[torch.dtype] = None,
        weights_dtype: Optional[torch.dtype] = None,
        lengths_dtype: torch.dtype = torch.int64,
    ) -> "KeyedJaggedTensor":
        """No keys, stride 0, no values."""
        values = torch.empty(0, dtype=values_dtype or torch.int64, device=device)
        weights = (
            torch.empty(0, dtype=weights_dtype or torch.float32, device=device) if is_weighted else None
        )
        return KeyedJaggedTensor(
            [], values, weights=weights, lengths=torch.empty(0, dtype=lengths_dtype, device=device),
            stride=0, length_per_key=[], offset_per_key=[0], validate=False,
        )

    @staticmethod
    def concat(kjt_list: Sequence["KeyedJaggedTensor"]) -> "KeyedJaggedTensor":
        """Concatenate along keys: ``keys = kjt_list[0].keys() + kjt_list[1].keys() + ...``.

        All inputs need the same stride and must be all weighted or all unweighted; keys must stay unique.
        """
        kjts = list(kjt_list)
        owner = "KeyedJaggedTensor.concat"
        if not kjts:
            raise ValueError(f"{owner}: needs at least one KeyedJaggedTensor")
        if len(kjts) == 1:
            return kjts[0]
        strides = [k.stride() for k in kjts]
        if any(s != strides[0] for s in strides[1:]):  # no set(): a SymInt stride is unhashable
            raise ValueError(f"{owner}: all inputs must have the same stride, got {strides}")
        weighted = [k.weights_or_none() is not None for k in kjts]
        if len(set(weighted)) != 1:
            raise ValueError(f"{owner}: inputs must be all weighted or all unweighted, got {weighted}")
        keys = [key for k in kjts for key in k.keys()]
        lpk = None
        if all(k._length_per_key is not None for k in kjts):
            lpk = [n for k in kjts for n in k._length_per_key]
        out = KeyedJaggedTensor(
            keys,
            torch.cat([k.values() for k in kjts]),
            weights=torch.cat([k.weights() for k in kjts]) if weighted[0] else None,
            lengths=torch.cat([k.lengths() for k in kjts]),
            stride=strides[0],
            validate=False,
        )
        if len(set(keys)) != len(keys):
            seen = set()
            dup = next(k for k in keys if k in seen or seen.add(k))
            raise ValueError(f"{owner}: key {dup!r} appears in more than one input")
        out._length_per_key = lpk
        return out

    # ---- accessors --------------------------------------------------------------------------
    def keys(self) -> List[str]:
        return self._keys

    def values(self) -> Tensor:
        """``[N, *D]``."""
        return self._values

    def weights(self) -> Tensor:
        """``[N]``; raises if unweighted (see :meth:`weights_or_none`)."""
        if self._weights is None:
            raise ValueError("KeyedJaggedTensor has no weights; use weights_or_none()")
        return self._weights

    def weights_or_none(self) -> Optional[Tensor]:
        return self._weights

    def lengths(self) -> Tensor:
        """``[K * B]`` key-major (derived from offsets on first use, then cached)."""
        if self._lengths is None:
            self._lengths = _offsets_to_lengths(self._offsets)
        return self._lengths

    def lengths_or_none(self) -> Optional[Tensor]:
        return self._lengths

    def offsets(self) -> Tensor:
        """``[K * B + 1]`` key-major (derived from lengths on first use, then cached)."""
        if self._offsets is None:
            self._offsets = _lengths_to_offsets(self._lengths)
        return self._offsets

    def offsets_or_none(self) -> Optional[Tensor]:
        return self._offsets

    def stride(self) -> int:
        """``B``, the batch size."""
        return self._stride

    def device(self) -> torch.device:
        return self._values.device

    def _length_per_key_tensor(self) -> Tensor:
        """``[K]`` int64 number of values per key (a device tensor, no sync)."""
        return self.lengths().view(len(self._keys), self._stride).sum(1, dtype=torch.int64)

    def sync(self) -> "KeyedJaggedTensor":
        """Compute and cache ``length_per_key``/``offset_per_key`` (one host sync)."""
        self.length_per_key()
        self.offset_per_key()
        return self

    def length_per_key(self) -> List[int]:
        """``[K]`` number of values of each key (Python ints, cached)."""
        if self._length_per_key is None:
            counts = self._length_per_key_tensor()
            # Compiled: one .item() per key. Dynamo traces .tolist() into nodes that AOTAutograd's cache refuses
            # ("Unsupported call_method target getitem"), so every run would recompile the graph from scratch.
            self._length_per_key = [n.item() for n in counts.unbind(0)] if _is_compiling() else counts.tolist()
        return self._length_per_key

    def offset_per_key(self) -> List[int]:
        """``[K + 1]`` start of each key's values in ``values`` (Python ints, cached)."""
        if self._offset_per_key is None:
            out = [0]
            for n in self.length_per_key():  # over keys, not rows
                out.append(out[-1] + n)
            self._offset_per_key = out
        return self._offset_per_key

    def offset_per_key_or_none(self) -> Optional[List[int]]:
        """:meth:`offset_per_key` when it needs no host sync (given, or derived from a given
        ``length_per_key``, as the data loader's batches carry them), else ``None``."""
        if self._offset_per_key is None and self._length_per_key is None:
            return None
        return self.offset_per_key()

    def index_per_key(self) -> Dict[str, int]:
        """``{key: position in keys}``."""
        if self._index_per_key is None:
            self._index_per_key = {k: i for i, k in enumerate(self._keys)}
        return self._index_per_key

    def __contains__(self, key: str) -> bool:
        return key in self.index_per_key()

    # ---- per-key views ----------------------------------------------------------------------
    def _jt(self, i: int) -> JaggedTensor:
        B = self._stride
        opk = self.offset_per_key()
        start, end = opk[i], opk[i + 1]
        offsets = None
        if self._offsets is not None:
            offsets = self._offsets[i * B : (i + 1) * B + 1] - self._offsets[i * B]
        return JaggedTensor(
            self._values[start:end],
            lengths=self.lengths()[i * B : (i + 1) * B],
            offsets=offsets,
            weights=None if self._weights is None else self._weights[start:end],
            validate=False,
        )

    def __getitem__(self, key: str) -> JaggedTensor:
        """The JaggedTensor ``[B rows]`` of one key."""
        idx = self.index_per_key().get(key)
        if idx is None:
            raise KeyError(f"KeyedJaggedTensor has no key {key!r}; keys are {self._keys}")
        return self._jt(idx)

    def to_dict(self) -> Dict[str, JaggedTensor]:
        """``{key: JaggedTensor [B rows]}`` in key order."""
        return {k: self._jt(i) for i, k in enumerate(self._keys)}

    def split(self, segments: Sequence[int]) -> List["KeyedJaggedTensor"]:
        """Split the keys into consecutive groups of ``segments[j]`` keys (``sum(segments) == K``).

        Each piece keeps the stride; values are slices (views) of this tensor's values.
        """
        segments = [int(s) for s in segments]
        if any(s < 0 for s in segments) or sum(segments) != len(self._keys):
            raise ValueError(
                f"KeyedJaggedTensor.split: segments {segments} must be >= 0 and sum to the number of "
                f"keys ({len(self._keys)})"
            )
        B = self._stride
        opk = self.offset_per_key()
        lpk = self.length_per_key()
        lengths = self.lengths()
        out, k0 = [], 0
        for s in segments:  # over key groups, not rows
            k1 = k0 + s
            v0, v1 = opk[k0], opk[k1]
            offsets = None
            if self._offsets is not None:
                offsets = self._offsets[k0 * B : k1 * B + 1] - self._offsets[k0 * B]
            out.append(
                KeyedJaggedTensor(
                    self._keys[k0:k1],
                    self._values[v0:v1],
                    weights=None if self._weights is None else self._weights[v0:v1],
                    lengths=lengths[k0 * B : k1 * B],
                    offsets=offsets,
                    stride=B,
                    length_per_key=lpk[k0:k1],
                    offset_per_key=[o - v0 for o in opk[k0 : k1 + 1]],
                    validate=False,
                )
            )
            k0 = k1
        return out

    def permute(
        self, indices: Sequence[int], indices_tensor: Optional[Tensor] = None
    ) -> "KeyedJaggedTensor":
        """Reorder keys: key ``j`` of the result is key ``indices[j]`` of this one.

        Repeats and subsets are allowed (a repeated key appears twice, which ``__getitem__`` then
        resolves to the first). Each key's values are one contiguous segment, so the values are one
        ``torch.cat`` of K' slices and the lengths one row gather of the ``[K, B]`` lengths view.
        """
        indices = [int(i) for i in indices]
        K, B = len(self._keys), self._stride
        bad = [i for i in indices if not 0 <= i < K]
        if bad:
            raise ValueError(f"KeyedJaggedTensor.permute: index {bad[0]} is outside [0, {K})")
        device = self._values.device
        if indices_tensor is None:
            indices_tensor = torch.tensor(indices, dtype=torch.int64, device=device)
        indices_tensor = indices_tensor.to(device=device, dtype=torch.int64)
        lengths = self.lengths().view(K, B).index_select(0, indices_tensor).reshape(-1)
        opk = self.offset_per_key()
        lpk = self.length_per_key()

        def gather(t: Tensor) -> Tensor:
            if not indices:
                return t[:0]
            return torch.cat([t[opk[i] : opk[i + 1]] for i in indices])  # over keys, not rows

        return KeyedJaggedTensor(
            [self._keys[i] for i in indices],
            gather(self._values),
            weights=None if self._weights is None else gather(self._weights),
            lengths=lengths,
            stride=B,
            length_per_key=[lpk[i] for i in indices],
            validate=False,
        )

    def select_samples(self, indices: Tensor) -> "KeyedJaggedTensor":
        """Take samples ``indices [B']`` (int, repeats allowed, each in ``[0, B)``) across all keys.

        The result has stride ``B'``; sample ``j`` of every key is sample ``indices[j]`` of this one.
        Used to subsample or shuffle a batch (e.g. permutation importance).
        """
        _check_rows_index(indices, self._stride, "KeyedJaggedTensor.select_samples")
        K, B = len(self._keys), self._stride
        device = self._values.device
        rows = (torch.arange(K, device=device).unsqueeze(1) * B
                + indices.to(device=device, dtype=torch.int64).unsqueeze(0)).reshape(-1)
        values, weights, lengths = _gather_rows(
            self._values, self._weights, self.offsets(), self.lengths(), rows
        )
        return KeyedJaggedTensor(
            self._keys, values, weights=weights, lengths=lengths, stride=indices.numel(),
            validate=False,
        )

    # ---- device movement --------------------------------------------------------------------
    def _map(self, fn) -> "KeyedJaggedTensor":
        out = KeyedJaggedTensor(
            self._keys,
            fn(self._values),
            weights=None if self._weights is None else fn(self._weights),
            lengths=None if self._lengths is None else fn(self._lengths),
            offsets=None if self._offsets is None else fn(self._offsets),
            stride=self._stride,
            length_per_key=self._length_per_key,
            offset_per_key=self._offset_per_key,
            validate=False,
        )
        return out

    def to(self, device: Device, non_blocking: bool = False) -> "KeyedJaggedTensor":
        return self._map(lambda t: t.to(device=device, non_blocking=non_blocking))

    def cpu(self) -> "KeyedJaggedTensor":
        return self.to("cpu")

    def pin_memory(self) -> "KeyedJaggedTensor":
        """Copy into page-locked memory (needs an accelerator; raises ``RuntimeError`` without one)."""
        return self._map(lambda t: t.pin_memory())

    def record_stream(self, stream) -> None:
        for t in (self._values, self._weights, self._lengths, self._offsets):
            if t is not None:
                t.record_stream(stream)

    def __repr__(self) -> str:
        if self._values.numel() <= 64 and len(self._keys) <= 16:
            body = ", ".join(
                f"{k!r}: {[t.tolist() for t in jt.to_dense()]}"
                for k, jt in self.to_dict().items()
            )
            body = "{" + body + "}"
        else:
            body = f"values={_tensor_summary(self._values)}"
        return (
            f"KeyedJaggedTensor(keys={self._keys}, stride={self._stride}, {body}"
            + (", weighted" if self._weights is not None else "")
            + f", device={self.device()})"
        )


# --------------------------------------------------------------------------------------------------
# equality helpers (tests) and pytree registration (torch.export / FSDP input casting)
# --------------------------------------------------------------------------------------------------
def _opt_equal(a: Optional[Tensor], b: Optional[Tensor]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and torch.equal(a, b)


def jt_is_equal(a: JaggedTensor, b: JaggedTensor) -> bool:
    """Same rows, same values and weights (exact), same dtypes."""
    return (
        _opt_equal(a.lengths(), b.lengths())
        and _opt_equal(a.values(), b.values())
        and _opt_equal(a.weights_or_none(), b.weights_or_none())
    )


def kjt_is_equal(a: KeyedJaggedTensor, b: KeyedJaggedTensor) -> bool:
    """Same keys, stride, lengths, values and weights (exact), same dtypes."""
    return (
        a.keys() == b.keys()
        and a.stride() == b.stride()
        and _opt_equal(a.lengths(), b.lengths())
        and _opt_equal(a.values(), b.values())
        and _opt_equal(a.weights_or_none(), b.weights_or_none())
    )


_JT_FIELDS = ("values", "lengths", "offsets", "weights")
_KJT_FIELDS = ("values", "weights", "lengths", "offsets")


def _jt_flatten_with_keys(jt: JaggedTensor):
    children = [jt.values(), jt.lengths(), jt.offsets(), jt.weights_or_none()]
    return [(pytree.GetAttrKey(name), c) for name, c in zip(_JT_FIELDS, children)], None


def _jt_flatten(jt: JaggedTensor):
    children, context = _jt_flatten_with_keys(jt)
    return [c for _, c in children], context


def _jt_unflatten(children, context) -> JaggedTensor:
    values, lengths, offsets, weights = children
    return JaggedTensor(values, lengths=lengths, offsets=offsets, weights=weights, validate=False)


def _kjt_flatten_with_keys(kjt: KeyedJaggedTensor):
    # The stride stays out of the context when there are keys (it is len(lengths) // K): a context is
    # static in torch.export, and a dynamic batch size must not be baked into the input spec.
    children = [kjt.values(), kjt.weights_or_none(), kjt.lengths(), kjt.offsets()]
    context = (tuple(kjt.keys()), None if kjt.keys() else kjt.stride())
    return [(pytree.GetAttrKey(name), c) for name, c in zip(_KJT_FIELDS, children)], context


def _kjt_flatten(kjt: KeyedJaggedTensor):
    children, context = _kjt_flatten_with_keys(kjt)
    return [c for _, c in children], context


def _kjt_unflatten(children, context) -> KeyedJaggedTensor:
    values, weights, lengths, offsets = children
    keys, stride = context
    return KeyedJaggedTensor(list(keys), values, weights=weights, lengths=lengths, offsets=offsets,
                             stride=stride, validate=False)


def _kjt_context_to_dumpable(context) -> list:
    keys, stride = context
    return [list(keys), stride]


def _kjt_context_from_dumpable(dumpable) -> tuple:
    keys, stride = dumpable
    return tuple(keys), stride


pytree.register_pytree_node(
    JaggedTensor, _jt_flatten, _jt_unflatten, serialized_type_name="lattice.sparse.JaggedTensor",
    flatten_with_keys_fn=_jt_flatten_with_keys,
)
pytree.register_pytree_node(
    KeyedJaggedTensor, _kjt_flatten, _kjt_unflatten,
    serialized_type_name="lattice.sparse.KeyedJaggedTensor",
    flatten_with_keys_fn=_kjt_flatten_with_keys,
    to_dumpable_context=_kjt_context_to_dumpable,
    from_dumpable_context=_kjt_context_from_dumpable,
)


# --------------------------------------------------------------------------------------------------
# TorchRec interop (optional; torchrec is imported lazily)
# --------------------------------------------------------------------------------------------------
def _import_torchrec_sparse():
    try:
        from torchrec.sparse import jagged_tensor as trj  # type: ignore[import-not-found]
    except Exception as e:  # ImportError, or a torchrec/fbgemm build that fails to load
        raise ImportError(
            "lattice.sparse.to_torchrec/from_torchrec need TorchRec, which could not be imported "
            f"({type(e).__name__}: {e}). Install a torchrec build matching your torch "
            "(pip install torchrec); lattice itself does not depend on it."
        ) from e
    return trj


def to_torchrec(x: Union[JaggedTensor, KeyedJaggedTensor]):
    """Convert to ``torchrec.JaggedTensor`` / ``torchrec.KeyedJaggedTensor`` (shares storage)."""
    trj = _import_torchrec_sparse()
    if isinstance(x, KeyedJaggedTensor):
        return trj.KeyedJaggedTensor(
            keys=x.keys(), values=x.values(), weights=x.weights_or_none(), lengths=x.lengths(),
            offsets=x.offsets(), stride=x.stride(),
        )
    if isinstance(x, JaggedTensor):
        return trj.JaggedTensor(
            values=x.values(), weights=x.weights_or_none(), lengths=x.lengths(), offsets=x.offsets()
        )
    raise TypeError(f"to_torchrec: expected a lattice JaggedTensor or KeyedJaggedTensor, got {type(x)}")


def from_torchrec(x, *, validate: bool = True) -> Union[JaggedTensor, KeyedJaggedTensor]:
    """Convert a ``torchrec.JaggedTensor`` / ``torchrec.KeyedJaggedTensor`` (shares storage)."""
    trj = _import_torchrec_sparse()
    if isinstance(x, trj.KeyedJaggedTensor):
        return KeyedJaggedTensor(
            x.keys(), x.values(), weights=x.weights_or_none(), lengths=x.lengths(),
            offsets=x.offsets(), stride=x.stride(), validate=validate,
        )
    if isinstance(x, trj.JaggedTensor):
        return JaggedTensor(
            x.values(), lengths=x.lengths(), offsets=x.offsets(), weights=x.weights_or_none(),
            validate=validate,
        )
    raise TypeError(f"from_torchrec: expected a torchrec JaggedTensor or KeyedJaggedTensor, got {type(x)}")
