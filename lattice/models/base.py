"""The shared base of every lattice network: :class:`LatticeModel` and its output, :class:`ModelOutput`.

A network = :class:`~lattice.nn.FeatureProcessor` (Batch -> tokens) + its own trunk (``encode``) +
:class:`~lattice.nn.MultiTaskHeads` (per-task logits with Zipper windows). Every comparison between
networks is therefore like for like: same inputs, same heads, same outputs.

Extension points (no hooks): a network built with ``num_extra_tokens=k`` sizes its trunk for ``k`` more
non-sequence tokens, which a subclass supplies by overriding :meth:`LatticeModel.extra_tokens` or a wrapper
passes as ``forward(batch, extra_tokens=...)`` (e.g. the KTAP teacher token); a wrapper reads the heads'
input and hidden activation from :attr:`ModelOutput.head_input` / :attr:`ModelOutput.head_hidden` (e.g. an
auxiliary distillation head on the same backbone output).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lattice.batch import Batch
from lattice.data.schema import Schema, SchemaLike
from lattice.nn.conditional import ConditionalTasks
from lattice.nn.embedding import EmbeddingBagCollection
from lattice.nn.heads import MultiTaskHeads
from lattice.nn.processors import FeatureProcessor, ProcessedFeatures
from lattice.nn.wide import WidePath

__all__ = ["ModelOutput", "LatticeModel"]


@dataclass
class ModelOutput:
    """What every lattice network returns from ``forward(batch)``.

    Attributes:
        logits: ``[B, T]`` serving logits in the schema's task order (a windowed task's longest-window
            head; a regression task's raw prediction). Use these for eval, predict and serving.
        train_logits: ``[B, T]`` logits routed for the training loss: a windowed task's
            ``batch.label_window[b, t]`` head, so each sample's loss reaches only its assigned window.
        representation: ``[B, R]`` the final shared representation the heads read (for distillation
            and KTAP teacher embeddings), or ``None``.
        window_logits: task name -> ``[B, W]`` every window head of a windowed task.
        head_input: what the heads read, ``[B, R]`` (or ``[B, T, R]``, one per task): the backbone output
            an auxiliary distillation head shares.
        head_hidden: ``[B, T, h]`` the last hidden activation of each task's serving head
            (:attr:`~lattice.nn.HeadOutput.serving_hidden`); ``None`` for linear heads.
    """

    logits: Tensor
    train_logits: Tensor
    representation: Tensor | None = None
    window_logits: dict[str, Tensor] = field(default_factory=dict)
    head_input: Tensor | None = None
    head_hidden: Tensor | None = None


class LatticeModel(nn.Module):
    """Base class: processor + ``encode`` + heads.

    Args:
        schema: the data :class:`~lattice.data.Schema` (the CLI links it in from the data module).
        dim: d, the token width.
        embedding_dim: width of embedding tables whose features give none (default ``dim``).
        dense_tokens: ``None`` = one token per dense feature; k = all dense features into k tokens.
        domain_token: add a learned token for the sample's domain.
        sequence_merge: how several sequence features merge: ``"concat"``, ``"masknet"`` (parallel
            attributes of the same events), or ``"auto"`` (masknet when they share a timestamps column).
        max_positions: learned recency-position table size of sequence events (0 = none).
        time_buckets: log2 time-gap buckets of sequence events (0 = none).
        head_hidden_dims: hidden sizes of every task/window head MLP.
        head_activation: their activation.
        untie_heads: one copy of the heads per domain (group).
        domain_groups: group id of every domain for per-domain untying (default one group per domain).
        embedding_kwargs: extra keyword arguments of every :class:`~lattice.nn.EmbeddingBagCollection`.
        history_match: exact candidate-in-history match tokens and event marks
            (:class:`~lattice.nn.match.HistoryMatch`) for sequences sharing a table with a sparse feature.
        wide: add a wide path (Wide & Deep, Cheng et al. 2016): a per-domain logistic regression
            (:class:`~lattice.nn.WidePath`) over the same features, with its own
            ``wide_dim``-wide tables, whose logits are added to every head's (windows included). It carries
            the additive effects of single features (a dense value's slope, an id's bias) that a normalized
            deep trunk learns slowly; ``representation`` stays the deep trunk's.
        wide_dim: embedding width of the wide path's tables (its per-task id weights are rank ``wide_dim``).
        standardize_dense: standardize every dense feature by its running mean and variance over the
            training rows before it becomes a token (:class:`~lattice.nn.RunningStandardize`; the wide path's
            too). Raw values on different scales (a position 1..10, a log price near 3) otherwise let the
            largest dominate the token products and norms.
        task_parents: child task -> parent task, for tasks that can only be positive after another (a
            conversion after a click): the child is predicted as ``p(parent) * p(child | parent)`` over every
            impression (ESMM; :class:`~lattice.nn.ConditionalTasks`), its heads (and wide path) giving the
            conditional logit. Its label must be over all impressions.
        num_extra_tokens: k, non-sequence tokens beyond the processor's that the trunk is sized for
            (``num_tokens = processor.num_tokens + k``); :meth:`extra_tokens` or ``forward``'s
            ``extra_tokens`` supply them.

    Every argument after ``schema`` is keyword-only. Subclasses pass theirs on by name, build their trunk
    in ``__init__`` over :attr:`num_tokens` tokens, call :meth:`_build_heads` with its output width last
    (the wide path is built there, after everything else, so the deep part initializes the same with it
    on or off), and implement :meth:`encode` and :meth:`trunk_flops`.
    """

    def __init__(
        self,
        schema: SchemaLike,
        *,
        dim: int = 32,
        embedding_dim: int | None = None,
        dense_tokens: int | None = None,
        domain_token: bool = True,
        sequence_merge: Literal["auto", "concat", "masknet"] = "auto",
        max_positions: int = 256,
        time_buckets: int = 32,
        head_hidden_dims: Sequence[int] = (64,),
        head_activation: str = "silu",
        untie_heads: bool = False,
        domain_groups: Sequence[int] | None = None,
        embedding_kwargs: dict[str, Any] | None = None,
        history_match: bool = False,
        wide: bool = False,
        wide_dim: int = 32,
        standardize_dense: bool = False,
        task_parents: dict[str, str] | None = None,
        num_extra_tokens: int = 0,
    ) -> None:
        super().__init__()
        schema = Schema.coerce(schema)
        if not schema.tasks:
            raise ValueError("the schema has no tasks")
        if wide and wide_dim < 1:
            raise ValueError(f"wide_dim must be >= 1, got {wide_dim}")
        if num_extra_tokens < 0:
            raise ValueError(f"num_extra_tokens must be >= 0, got {num_extra_tokens}")
        self.schema = schema
        self.dim = dim
        self.num_domains = max(1, len(schema.domains))
        self.domain_groups = None if domain_groups is None else list(domain_groups)
        self.processor = FeatureProcessor(
            schema,
            dim,
            embedding_dim=embedding_dim,
            dense_tokens=dense_tokens,
            domain_token=domain_token,
            sequence_merge=sequence_merge,
            max_positions=max_positions,
            time_buckets=time_buckets,
            history_match=history_match,
            collection_kwargs=embedding_kwargs,
            standardize_dense=standardize_dense,
        )
        self.num_extra_tokens = num_extra_tokens
        #: non-sequence tokens the trunk reads: the processor's, then ``num_extra_tokens`` extra ones
        self.num_tokens = self.processor.num_tokens + num_extra_tokens
        self._head_args = dict(
            hidden_dims=list(head_hidden_dims),
            activation=head_activation,
            num_domains=self.num_domains if untie_heads else 1,
            domain_groups=self.domain_groups if untie_heads else None,
        )
        self.heads: MultiTaskHeads | None = None
        self.conditional = ConditionalTasks(schema.tasks, task_parents) if task_parents else None
        self._wide_args = dict(
            dim=wide_dim, domain_groups=self.domain_groups, embedding_kwargs=embedding_kwargs,
            history_match=history_match, standardize_dense=standardize_dense,
        ) if wide else None
        self.wide: WidePath | None = None

    # ------------------------------------------------------------------------------ subclass API
    def _build_heads(self, in_dim: int) -> None:
        """Builds the heads over ``in_dim`` features, then the wide path when it is on."""
        self.heads = MultiTaskHeads(in_dim, self.schema.tasks, **self._head_args)
        if self._wide_args is not None:
            self.wide = WidePath(self.schema, **self._wide_args)

    def _untie(self, untied: bool) -> dict[str, Any]:
        """``num_domains``/``domain_groups`` kwargs for a block that is (or is not) untied per domain."""
        if not untied:
            return dict(num_domains=1, domain_groups=None)
        return dict(num_domains=self.num_domains, domain_groups=self.domain_groups)

    def encode(self, features: ProcessedFeatures, batch: Batch) -> tuple[Tensor, Tensor]:
        """Returns ``(head_input, representation)``: head input ``[B, R]`` (or ``[B, T, R]``, one per
        task) and the shared representation ``[B, R']``, from ``features.tokens [B, num_tokens, d]``."""
        raise NotImplementedError

    def extra_tokens(self, features: ProcessedFeatures, batch: Batch) -> Tensor | None:
        """Extension point: the ``[B, num_extra_tokens, d]`` tokens appended to the processor's
        ``features.tokens`` when ``forward`` is given none. The base class has none to give."""
        return None

    def trunk_flops(self, events: float) -> float:
        """FLOPs per sample of everything between the processor and the heads, for ``events``
        sequence events per sample."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ public API
    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.schema.tasks]

    @property
    def domain_names(self) -> list[str]:
        return [d.name for d in self.schema.domains]

    def forward(self, batch: Batch, extra_tokens: Tensor | None = None) -> ModelOutput:
        """``extra_tokens [B, num_extra_tokens, d]``: tokens appended to the processor's (default:
        :meth:`extra_tokens`)."""
        features = self.processor(batch)
        if extra_tokens is None:
            extra_tokens = self.extra_tokens(features, batch)
        features = self._append_tokens(features, extra_tokens)
        head_input, representation = self.encode(features, batch)
        out = self.heads(head_input, batch.label_window, batch.domain)
        logits, train_logits, windows = out.logits, out.train_logits, out.window_logits
        if self.wide is not None:
            wide = self.wide(batch)
            logits, train_logits = logits + wide.logits, train_logits + wide.train_logits
            windows = {name: w + wide.window_logits[name] for name, w in windows.items()}
        if self.conditional is not None:
            logits, train_logits, windows = self.conditional(logits, train_logits, windows)
        return ModelOutput(logits, train_logits, representation, windows, head_input, out.serving_hidden)

    def _append_tokens(self, features: ProcessedFeatures, extra: Tensor | None) -> ProcessedFeatures:
        k = self.num_extra_tokens
        if extra is None:
            if k:
                raise ValueError(
                    f"{type(self).__name__} was built for num_extra_tokens={k} but got none: pass "
                    "forward(batch, extra_tokens=...) or override extra_tokens()"
                )
            return features
        tokens = features.tokens
        if tuple(extra.shape) != (tokens.shape[0], k, tokens.shape[2]):
            raise ValueError(
                f"extra_tokens must be [B={tokens.shape[0]}, num_extra_tokens={k}, d={tokens.shape[2]}], "
                f"got {tuple(extra.shape)}"
            )
        return dataclasses.replace(features, tokens=torch.cat([tokens, extra.to(tokens.dtype)], dim=1))

    def default_sequence_length(self) -> float:
        """Sequence tokens per sample assumed by :meth:`flops_per_sample`
        (:meth:`~lattice.nn.FeatureProcessor.default_sequence_length`)."""
        return self.processor.default_sequence_length()

    def flops_per_sample(self, sequence_length: float | None = None) -> float:
        """Analytic forward FLOPs per sample (2 per multiply-add).

        Counted: every matmul/linear of the processor (projections), the trunk (fusion blocks,
        attention projections, attention scores and weighted sums, FFNs, gates), the heads (every
        window head) and the wide path when it is on. Not counted: embedding-table lookups and pooling
        (memory-bound gathers), norms, activations, element-wise products, softmax, and the extra work of
        the ``"dense"`` dispatch of per-domain layers. ``sequence_length`` is the number of merged sequence tokens
        per sample (default :meth:`default_sequence_length`, the worst case). Backward costs about twice
        this.
        """
        events = self.default_sequence_length() if sequence_length is None else float(sequence_length)
        if not self.processor.has_sequence:
            events = 0.0
        wide = 0.0 if self.wide is None else self.wide.flops(sequence_length)
        return float(self.processor.flops(events) + self.trunk_flops(events) + self.heads.flops() + wide)

    def num_parameters(self, trainable_only: bool = False, include_embeddings: bool = True) -> int:
        """Number of parameters; ``include_embeddings=False`` leaves out the embedding tables."""
        skip: set[int] = set()
        if not include_embeddings:
            for m in self.modules():
                if isinstance(m, EmbeddingBagCollection):
                    skip.update(id(p) for p in m.parameters())
        return sum(
            p.numel()
            for p in self.parameters()
            if id(p) not in skip and (p.requires_grad or not trainable_only)
        )

    def embedding_collections(self) -> list[EmbeddingBagCollection]:
        """The model's embedding collections (e.g. for the fused sparse optimizer)."""
        return [m for m in self.modules() if isinstance(m, EmbeddingBagCollection)]
