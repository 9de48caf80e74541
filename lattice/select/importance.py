"""Per-task permutation importance of every input feature (the first half of Lattice Filter).

For a trained model exposed as ``predict(batch) -> logits [B, T]`` and a validation set (an iterable of
:class:`lattice.data.Batch`), the importance of feature ``f`` for task ``t`` is how much task ``t``'s
LogLoss rises (and its AUC drops) when ``f``'s values are shuffled across the evaluation rows, averaged
over several seeded repeats. Losses are masked by ``label_mask``: a row without a label for ``t`` does
not count for ``t``.

How "across the evaluation rows" is done
----------------------------------------
Batches arrive as a stream, but a permutation must draw from every row. The evaluation set is
therefore **gathered into (CPU) memory up to ``max_rows`` rows** (default 200 000; the stream is cut
there and the result records how many rows were used). The gathered batches are kept as they came
(they are the chunks the model runs on); only the feature being permuted is materialized over all rows
(one dense column, or one key's whole jagged lists), so the extra memory is one feature at a time.

For each (feature, repeat) one permutation ``π`` of the ``N`` rows is drawn from
``numpy.random.default_rng([seed, repeat, feature_index])`` and row ``r`` of every chunk receives row
``π[r]``'s value of that feature; the model then runs once over all chunks. So the model runs
``1 + F × repeats`` times over the set, never per row.

- dense feature ``j``: column ``j`` of ``dense`` *and* of ``dense_mask`` are gathered by ``π`` together.
- sparse key: whole lists move (ids, and per-id weights where present) with one jagged row gather of
  that key only; column of ``sparse_mask`` moves with them.
- sequence key: whole lists move; ``sequence_timestamps`` of the same key move with them.
- sequence key that is one attribute of *parallel* events (several sequence features naming one
  ``timestamps_column``, e.g. ``hist_items`` and ``hist_clusters`` timed by ``hist_ts``; the networks
  fuse them per event and need their lists equally long): ``π`` is drawn among rows with the same
  number of events (a stratified permutation), so row ``r`` gets another row's item list of its own
  length; the timestamps belong to the events, not to the attribute, and stay in place. The number of
  events is still told by the group's other attributes, so no information of this one is kept back.

``within_domain=True`` (the default) draws ``π`` inside each domain (a stratified permutation: rows of
domain ``d`` only receive values from rows of domain ``d``). In a multi-domain set a feature that only
some domains have would otherwise land, with its presence bit, in rows of domains that never have it —
inputs the model never saw in training — and its importance would mix information loss with that
distribution shift. ``within_domain=False`` permutes over all rows.

How sure a figure is
--------------------
Two spreads are reported. ``*_std``: over the repeats, i.e. how much one shuffle of *this* evaluation
set differs from the next. ``delta_logloss_se``: the standard error of the mean rise over the evaluation
rows (each labelled row's loss difference, averaged over the repeats, is one paired observation), i.e.
how much the figure would move on another evaluation set of the same size. The second is the one that
matters for selection: a model that leans on a feature without real signal (say it memorized the ids
of a random feature) gets a rise that is nearly the same for every shuffle of one set -- a tiny std --
but whose sign is that set's luck; only the standard error over rows shows it is indistinguishable from
zero (:meth:`ImportanceResult.significant`).

Regression tasks (``task_kinds[t] == "regression"``) report the rise of the mean squared error in the
``delta_logloss`` slot and NaN for AUC.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from lattice.metrics import masked_auc, masked_task_losses, masked_task_means, regression_flags
from lattice.sparse import JaggedTensor, KeyedJaggedTensor

__all__ = [
    "FeatureRef",
    "ImportanceResult",
    "EvalSet",
    "gather_eval_set",
    "permutation_importance",
    "feature_refs",
    "permutation_indices",
    "parallel_sequence_groups",
    "replace_key",
]

log = logging.getLogger(__name__)

Predict = Callable[[Any], Tensor]


# --------------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureRef:
    """Where a feature lives in a :class:`Batch`: ``kind`` dense (column ``index`` of ``dense``),
    sparse (key ``index`` of ``sparse``) or sequence (key ``index`` of ``sequences``)."""

    name: str
    kind: str
    index: int


def feature_refs(
    batch,
    schema=None,
    dense_names: Optional[Sequence[str]] = None,
    features: Optional[Sequence[str]] = None,
) -> List[FeatureRef]:
    """The features of ``batch`` in schema order (or dense, sparse, sequence order without a schema).

    Dense columns are named by ``schema.dense_features`` or ``dense_names`` (default ``dense_<j>``);
    sparse/sequence features by their KeyedJaggedTensor keys. ``features`` restricts to those names.
    """
    n_dense = int(batch.dense.shape[1])
    if schema is not None:
        dense_names = [f.name for f in schema.dense_features]
    elif dense_names is None:
        dense_names = [f"dense_{j}" for j in range(n_dense)]
    dense_names = list(dense_names)
    if len(dense_names) != n_dense:
        raise ValueError(f"batch has {n_dense} dense columns but {len(dense_names)} dense names were given")
    refs = [FeatureRef(n, "dense", j) for j, n in enumerate(dense_names)]
    refs += [FeatureRef(k, "sparse", i) for i, k in enumerate(batch.sparse.keys())]
    refs += [FeatureRef(k, "sequence", i) for i, k in enumerate(batch.sequences.keys())]
    by_name = {r.name: r for r in refs}
    if len(by_name) != len(refs):
        raise ValueError(f"feature names are not unique: {[r.name for r in refs]}")
    if schema is not None:
        order = [f.name for f in schema.features if f.name in by_name]
        refs = [by_name[n] for n in order] + [r for r in refs if r.name not in set(order)]
    if features is not None:
        missing = [n for n in features if n not in by_name]
        if missing:
            raise KeyError(f"unknown feature(s) {missing}; the batch has {sorted(by_name)}")
        keep = set(features)
        refs = [r for r in refs if r.name in keep]
    return refs


# --------------------------------------------------------------------------------------------------
# spread
# --------------------------------------------------------------------------------------------------
def _row_standard_error(diff_sum: Tensor, mask: Tensor, repeats: int) -> np.ndarray:
    """``[T]`` standard error of the mean of the per-row differences ``diff_sum / repeats`` over each
    task's labelled rows (NaN with fewer than two)."""
    m = mask.to(torch.float64)
    n = m.sum(0)
    d = diff_sum / repeats
    mean = (d * m).sum(0) / n.clamp_min(1)
    var = (((d - mean) ** 2) * m).sum(0) / (n - 1).clamp_min(1)
    return torch.where(n > 1, (var / n.clamp_min(1)).sqrt(), torch.full_like(n, math.nan)).numpy()


# --------------------------------------------------------------------------------------------------
# the in-memory evaluation set
# --------------------------------------------------------------------------------------------------
def _slice_batch(batch, n: int):
    """The first ``n`` rows of a Batch (any dataclass whose tensors are ``[B, ...]`` and KJTs stride B)."""
    idx = torch.arange(n, device=batch.domain.device)
    out = {}
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, KeyedJaggedTensor):
            out[f.name] = v.select_samples(idx)
        elif isinstance(v, Tensor):
            out[f.name] = v[:n]
        else:
            out[f.name] = v
    return dataclasses.replace(batch, **out)


def _key_jagged(chunks: Sequence[Any], field_name: str, key: str) -> JaggedTensor:
    """One key's lists over every row of ``chunks`` (concatenated in row order)."""
    jts = [getattr(c, field_name)[key] for c in chunks]  # over chunks, not rows
    weights = [jt.weights_or_none() for jt in jts]
    w = None if any(x is None for x in weights) else torch.cat(weights)
    return JaggedTensor(
        torch.cat([jt.values() for jt in jts]),
        lengths=torch.cat([jt.lengths().to(torch.int64) for jt in jts]),
        weights=w,
        validate=False,
    )


def replace_key(kjt: KeyedJaggedTensor, i: int, jt: JaggedTensor) -> KeyedJaggedTensor:
    """``kjt`` with key ``i``'s lists replaced by ``jt``'s rows (same stride)."""
    K, B = len(kjt.keys()), kjt.stride()
    lengths = kjt.lengths().view(K, B).clone()
    lengths[i] = jt.lengths().to(lengths.dtype)
    opk = kjt.offset_per_key()
    v = kjt.values()
    values = torch.cat([v[: opk[i]], jt.values().to(v.dtype), v[opk[i + 1] :]])
    weights = None
    if kjt.weights_or_none() is not None:
        w = kjt.weights()
        jw = jt.weights_or_none()
        if jw is None:
            jw = torch.ones(jt.values().shape[0], dtype=w.dtype, device=w.device)
        weights = torch.cat([w[: opk[i]], jw.to(w.dtype), w[opk[i + 1] :]])
    return KeyedJaggedTensor(kjt.keys(), values, weights=weights, lengths=lengths.reshape(-1), stride=B,
                             validate=False)


@dataclass
class EvalSet:
    """Evaluation rows gathered into memory: the chunks (batches as they came, cut at ``max_rows``)
    and the row-aligned columns importance needs.  ``N`` = :attr:`num_rows`."""

    chunks: List[Any]
    starts: List[int]            # chunk c holds rows [starts[c], starts[c + 1])
    dense: Tensor                # [N, Fd]
    dense_mask: Tensor           # [N, Fd]
    sparse_mask: Tensor          # [N, Fs]
    domain: Tensor               # [N]
    labels: Tensor               # [N, T]
    label_mask: Tensor           # [N, T]
    truncated: bool = False      # True when the stream had more rows than max_rows

    @property
    def num_rows(self) -> int:
        return self.starts[-1]


def gather_eval_set(batches: Iterable[Any], max_rows: Optional[int] = 200_000) -> EvalSet:
    """Read ``batches`` (on CPU) until ``max_rows`` rows (``None``: all) and index them by row."""
    chunks: List[Any] = []
    starts = [0]
    truncated = False
    for batch in batches:
        if max_rows is not None and starts[-1] >= max_rows:
            truncated = True
            break
        b = batch.to("cpu") if batch.domain.device.type != "cpu" else batch
        n = b.batch_size
        if max_rows is not None and starts[-1] + n > max_rows:
            b = _slice_batch(b, max_rows - starts[-1])
            n = b.batch_size
            truncated = True
        if n == 0:
            continue
        chunks.append(b)
        starts.append(starts[-1] + n)
        if truncated:
            break
    if not chunks:
        raise ValueError("permutation importance needs at least one evaluation row; the batches were empty")

    def cat(name: str) -> Tensor:
        return torch.cat([getattr(c, name) for c in chunks])

    return EvalSet(
        chunks=chunks, starts=starts, dense=cat("dense"), dense_mask=cat("dense_mask"),
        sparse_mask=cat("sparse_mask"), domain=cat("domain"), labels=cat("labels"),
        label_mask=cat("label_mask"), truncated=truncated,
    )


def permutation_indices(
    domain: np.ndarray, rng: np.random.Generator, within_domain: bool = True, strata: Optional[np.ndarray] = None
) -> np.ndarray:
    """A permutation ``π [N]`` of the rows; with ``within_domain`` each row maps to a row of its domain,
    with ``strata [N]`` each row maps to a row of its stratum (both: of its domain and stratum).

    Vectorized: rows sorted by (group, random key) are matched to rows sorted by (group, index).
    """
    n = domain.shape[0]
    keys = ([domain] if within_domain else []) + ([np.asarray(strata)] if strata is not None else [])
    if not keys:
        return rng.permutation(n)
    random_key = rng.random(n)
    by_group = np.lexsort((np.arange(n), *reversed(keys)))
    shuffled = np.lexsort((random_key, *reversed(keys)))
    perm = np.empty(n, dtype=np.int64)
    perm[by_group] = shuffled
    return perm


def parallel_sequence_groups(ev: "EvalSet", schema=None) -> List[List[str]]:
    """Groups (of two or more) of sequence features that are attributes of the same events.

    With a schema: the sequence features naming one ``timestamps_column`` (``hist_items`` and
    ``hist_clusters`` both timed by ``hist_ts``), which is how the networks decide to fuse them per event.
    Without one: the sequence keys whose lists have equal lengths in every gathered row.
    """
    keys = list(ev.chunks[0].sequences.keys())
    if len(keys) < 2:
        return []
    if schema is not None:
        by_column: Dict[str, List[str]] = {}
        for f in schema.sequence_features:
            if f.name in keys and getattr(f, "timestamps_column", None):
                by_column.setdefault(f.timestamps_column, []).append(f.name)
        return [g for g in by_column.values() if len(g) > 1]
    lengths = torch.cat([c.sequences.lengths().view(len(keys), -1) for c in ev.chunks], 1)  # [K, N]
    groups: List[List[str]] = []
    seen = set()
    for i in range(len(keys)):  # over keys
        if i in seen:
            continue
        group = [j for j in range(i, len(keys)) if j not in seen and torch.equal(lengths[j], lengths[i])]
        seen.update(group)
        if len(group) > 1:
            groups.append([keys[j] for j in group])
    return groups


# --------------------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------------------
def _nanmean(x: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN entry (e.g. a one-class task) stays NaN
        return np.nanmean(x, axis=0)


def _nanstd(x: np.ndarray) -> np.ndarray:
    if x.shape[0] < 2:
        return np.where(np.isnan(x[0]), np.nan, 0.0) if x.shape[0] else np.zeros(x.shape[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanstd(x, axis=0, ddof=1)


# --------------------------------------------------------------------------------------------------
@dataclass
class ImportanceResult:
    """Permutation importance of ``F`` features for ``T`` tasks over ``R`` repeats.

    ``delta_logloss[r, f, t]`` = LogLoss(permuted f) - LogLoss(baseline) (a rise: > 0 = important);
    ``delta_auc[r, f, t]`` = AUC(baseline) - AUC(permuted f) (a drop: > 0 = important).
    ``*_mean``/``*_std`` are over repeats (std with ddof=1; 0 for one repeat).

    ``delta_logloss_se [F, T]`` is the standard error of the mean LogLoss rise over the evaluation
    rows: every labelled row's loss difference (permuted - baseline, averaged over the repeats) is one
    paired observation. It measures how much the figure would move on another evaluation set of the
    same size, which the spread over repeats does not: the repeats reshuffle one fixed set, so a feature
    the model leans on without any real signal (an id it memorized) gets a consistent, non-zero rise
    whose sign is the luck of that set. :meth:`significant` tests against it.
    """

    features: List[str]
    kinds: List[str]
    tasks: List[str]
    baseline_logloss: np.ndarray   # [T]
    baseline_auc: np.ndarray       # [T]
    delta_logloss: np.ndarray      # [R, F, T]
    delta_auc: np.ndarray          # [R, F, T]
    num_rows: int
    truncated: bool = False
    seed: int = 0
    within_domain: bool = True
    seconds: float = 0.0
    labelled_rows: Optional[np.ndarray] = None  # [T]
    delta_logloss_se: Optional[np.ndarray] = None  # [F, T]
    parallel_groups: List[List[str]] = field(default_factory=list)  # permuted within equal-length rows

    @property
    def repeats(self) -> int:
        return int(self.delta_logloss.shape[0])

    @property
    def delta_logloss_mean(self) -> np.ndarray:
        return _nanmean(self.delta_logloss)

    @property
    def delta_logloss_std(self) -> np.ndarray:
        return _nanstd(self.delta_logloss)

    @property
    def delta_auc_mean(self) -> np.ndarray:
        return _nanmean(self.delta_auc)

    @property
    def delta_auc_std(self) -> np.ndarray:
        return _nanstd(self.delta_auc)

    def matrix(self, metric: str = "logloss") -> np.ndarray:
        """The ``[F, T]`` mean importance by ``metric`` (``logloss`` rise or ``auc`` drop)."""
        if metric == "logloss":
            return self.delta_logloss_mean
        if metric == "auc":
            return self.delta_auc_mean
        raise ValueError(f"metric must be 'logloss' or 'auc', got {metric!r}")

    def significant(self, metric: str = "logloss", z: float = 2.0) -> np.ndarray:
        """The ``[F, T]`` mean importance with entries within ``z`` standard errors of zero set to 0.

        A pure-noise feature then scores exactly 0 on every task and is dominated by any feature that
        matters somewhere. The standard error: for ``logloss``, :attr:`delta_logloss_se` (over the
        evaluation rows, which also covers the jitter from one shuffle to the next) where it is known
        and larger than the one over repeats; otherwise, and for ``auc`` (not a per-row mean),
        ``std / sqrt(repeats)`` over the permutation repeats. With neither (one repeat, no row standard
        error) the mean is returned as is.
        """
        mean = self.matrix(metric)
        if z <= 0:
            return mean
        raw = self.delta_logloss if metric == "logloss" else self.delta_auc
        sem = _nanstd(raw) / math.sqrt(self.repeats) if self.repeats >= 2 else None
        if metric == "logloss" and self.delta_logloss_se is not None:
            row_se = np.nan_to_num(self.delta_logloss_se, nan=0.0)
            sem = row_se if sem is None else np.maximum(sem, row_se)
        if sem is None:
            return mean
        return np.where(np.abs(mean) > z * sem, mean, np.where(np.isnan(mean), np.nan, 0.0))

    def feature_index(self, name: str) -> int:
        return self.features.index(name)

    def task_index(self, name: str) -> int:
        return self.tasks.index(name)


# --------------------------------------------------------------------------------------------------
# the computation
# --------------------------------------------------------------------------------------------------
def _permuted_chunk(chunk, ref: FeatureRef, src: Tensor, ev: EvalSet, full: Optional[Tuple[JaggedTensor, ...]]):
    if ref.kind == "dense":
        dense = chunk.dense.clone()
        dmask = chunk.dense_mask.clone()
        dense[:, ref.index] = ev.dense[src, ref.index]
        dmask[:, ref.index] = ev.dense_mask[src, ref.index]
        return dataclasses.replace(chunk, dense=dense, dense_mask=dmask)
    if ref.kind == "sparse":
        smask = chunk.sparse_mask.clone()
        smask[:, ref.index] = ev.sparse_mask[src, ref.index]
        return dataclasses.replace(
            chunk, sparse=replace_key(chunk.sparse, ref.index, full[0].select_samples(src)), sparse_mask=smask
        )
    seq = replace_key(chunk.sequences, ref.index, full[0].select_samples(src))
    ts = chunk.sequence_timestamps
    if ts is not None and full[1] is not None:
        ts = replace_key(ts, ts.keys().index(ref.name), full[1].select_samples(src))
    return dataclasses.replace(chunk, sequences=seq, sequence_timestamps=ts)


def _full_columns(ev: EvalSet, ref: FeatureRef, move_timestamps: bool = True
                  ) -> Optional[Tuple[Optional[JaggedTensor], ...]]:
    if ref.kind == "dense":
        return None
    if ref.kind == "sparse":
        return (_key_jagged(ev.chunks, "sparse", ref.name), None)
    ts = None
    first_ts = ev.chunks[0].sequence_timestamps
    if move_timestamps and first_ts is not None and ref.name in first_ts.keys():
        ts = _key_jagged(ev.chunks, "sequence_timestamps", ref.name)
    return (_key_jagged(ev.chunks, "sequences", ref.name), ts)


def _logits_of(out) -> Tensor:
    """``[B, T]`` logits from what ``predict`` returned: a tensor, an object with ``.logits`` (a lattice
    network's output), a mapping with ``"logits"``, or a tuple/list whose first item is the logits."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out:
        return _logits_of(out[0])
    raise TypeError(f"predict must return logits [B, T] (or an output with .logits), got {type(out).__name__}")


@torch.no_grad()
def _predict_all(predict: Predict, chunks: Iterable[Any], device) -> Tensor:
    outs = []
    for c in chunks:
        if device is not None:
            c = c.to(device)
        out = _logits_of(predict(c))
        outs.append(out.detach().to("cpu", torch.float64))
    return torch.cat(outs)


def permutation_importance(
    predict: Predict,
    batches: Iterable[Any],
    *,
    schema=None,
    dense_names: Optional[Sequence[str]] = None,
    task_names: Optional[Sequence[str]] = None,
    task_kinds: Optional[Sequence[str]] = None,
    features: Optional[Sequence[str]] = None,
    repeats: int = 3,
    seed: int = 0,
    max_rows: Optional[int] = 200_000,
    within_domain: bool = True,
    device=None,
    eval_set: Optional[EvalSet] = None,
    progress: Optional[Callable[[int, int, str], None]] = None,
) -> ImportanceResult:
    """Per-task permutation importance of every feature.

    Args:
        predict: ``predict(batch) -> logits [B, T]`` (a tensor, an output with ``.logits`` such as a
            lattice network's or ``LatticeModule``'s, a mapping with ``"logits"``, or a tuple whose first
            item is one); it is called under ``torch.no_grad()`` and should be in eval mode.
        batches: the evaluation set (an iterable of ``Batch``, e.g. a validation DataLoader); read once,
            up to ``max_rows`` rows, into CPU memory (see the module docstring).
        schema: a ``lattice.data.Schema`` (feature order, dense names, task names and kinds); optional.
        dense_names / task_names / task_kinds: used when no schema is given (defaults ``dense_<j>``,
            ``task_<t>``, all binary).
        features: only these features (default all).
        repeats: permutations per feature (each with its own seed).
        seed: base seed; permutation ``(r, f)`` uses ``default_rng([seed, r, f])``.
        max_rows: cap on evaluation rows held in memory (``None``: no cap).
        within_domain: permute inside each domain (default) or over all rows.
        device: move each chunk there before ``predict`` (default: leave it where ``batches`` put it,
            gathered on CPU).
        eval_set: reuse an :class:`EvalSet` from :func:`gather_eval_set` instead of reading ``batches``.
        progress: called as ``progress(done, total, feature_name)`` after each (feature, repeat).

    Returns:
        :class:`ImportanceResult`.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    t0 = time.perf_counter()
    ev = eval_set if eval_set is not None else gather_eval_set(batches, max_rows=max_rows)
    refs = feature_refs(ev.chunks[0], schema=schema, dense_names=dense_names, features=features)
    all_refs = feature_refs(ev.chunks[0], schema=schema, dense_names=dense_names)
    seed_index = {r.name: i for i, r in enumerate(all_refs)}  # stable seeds whatever subset is asked
    T = int(ev.labels.shape[1])
    if schema is not None:
        task_names = list(schema.task_names)
        task_kinds = [t.kind for t in schema.tasks]
    task_names = list(task_names) if task_names is not None else [f"task_{t}" for t in range(T)]
    task_kinds = list(task_kinds) if task_kinds is not None else ["binary"] * T
    if len(task_names) != T or len(task_kinds) != T:
        raise ValueError(f"labels have {T} tasks but got {len(task_names)} task names / {len(task_kinds)} kinds")
    regression = regression_flags(task_kinds)
    labels, lmask = ev.labels.to(torch.float64), ev.label_mask.to(torch.bool)

    def evaluate(logits: Tensor) -> Tuple[np.ndarray, np.ndarray]:
        if logits.shape != labels.shape:
            raise ValueError(f"predict returned logits of shape {tuple(logits.shape)}; expected {tuple(labels.shape)}")
        return (masked_task_means(logits, labels, lmask, regression).numpy(),
                masked_auc(logits, labels, lmask, regression).numpy())

    def row_losses(logits: Tensor) -> Tensor:
        return masked_task_losses(logits.to(torch.float64), labels, lmask, regression)

    base_logits = _predict_all(predict, ev.chunks, device)
    base_ll, base_auc = evaluate(base_logits)
    base_rows = row_losses(base_logits)
    n_f = len(refs)
    d_ll = np.zeros((repeats, n_f, T))
    se_ll = np.full((n_f, T), np.nan)
    d_auc = np.zeros((repeats, n_f, T))
    domain_np = ev.domain.numpy()
    starts = ev.starts
    groups = parallel_sequence_groups(ev, schema)
    in_group = {name for g in groups for name in g}
    done, total = 0, n_f * repeats
    for fi, ref in enumerate(refs):  # over features
        parallel = ref.kind == "sequence" and ref.name in in_group
        # One attribute of parallel events moves alone, among rows with as many events (the lists of a
        # group must stay equally long); the event times belong to the group and stay in place.
        full = _full_columns(ev, ref, move_timestamps=not parallel)
        strata = full[0].lengths().numpy() if parallel else None
        diff_sum = torch.zeros_like(base_rows)
        for r in range(repeats):  # over repeats
            rng = np.random.default_rng([seed, r, seed_index[ref.name]])
            perm = torch.from_numpy(permutation_indices(domain_np, rng, within_domain, strata=strata))

            def permuted():
                for c, chunk in enumerate(ev.chunks):  # over chunks, not rows
                    yield _permuted_chunk(chunk, ref, perm[starts[c] : starts[c + 1]], ev, full)

            logits = _predict_all(predict, permuted(), device)
            ll, auc = evaluate(logits)
            diff_sum += row_losses(logits) - base_rows
            d_ll[r, fi] = ll - base_ll
            d_auc[r, fi] = base_auc - auc
            done += 1
            if progress is not None:
                progress(done, total, ref.name)
        se_ll[fi] = _row_standard_error(diff_sum, lmask, repeats)
        del full, diff_sum
    return ImportanceResult(
        features=[r.name for r in refs],
        kinds=[r.kind for r in refs],
        tasks=task_names,
        baseline_logloss=base_ll,
        baseline_auc=base_auc,
        delta_logloss=d_ll,
        delta_auc=d_auc,
        num_rows=ev.num_rows,
        truncated=ev.truncated,
        seed=seed,
        within_domain=within_domain,
        seconds=time.perf_counter() - t0,
        labelled_rows=lmask.sum(0).numpy(),
        parallel_groups=groups,
        delta_logloss_se=se_ll,
    )
