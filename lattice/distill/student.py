"""Student-side pieces around a lattice network: the student adapter, a tap on the backbone (the heads'
input, extra input tokens), and room for extra input tokens in an existing network class.

A lattice network (:class:`lattice.models.LatticeModel`) runs ``processor(batch) -> features``,
``encode(features, batch) -> (head_input, representation)`` and ``heads(head_input, ...)``.
:class:`BackboneTap` hooks into the first and last step without changing the network's own forward:
it appends extra tokens (the KTAP teacher token) to ``features.tokens`` and captures ``head_input``, the
backbone output that the serving heads read and the auxiliary distillation head shares.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from lattice.dotted import import_dotted

__all__ = ["StudentAdapter", "BackboneTap", "TeacherTokenNetwork", "with_token_slots"]


class StudentAdapter(nn.Module):
    """ExFM's student adapter: a small MLP that maps the teacher's logits to corrected logits.

    Trained on the true labels only; its detached output is the target the distillation head learns,
    so a stale or biased teacher is corrected before the student imitates it. Residual and
    zero-initialized: ``adapted = teacher + MLP(teacher)`` starts as the identity (a fresh adapter
    passes the teacher through unchanged).

    Args:
        num_tasks: T (the MLP reads every task's teacher logit, so it can use cross-task signal).
        hidden_dims: hidden sizes.

    Shape: ``teacher_logits [B, T]`` (non-finite entries are read as 0) -> ``[B, T]``.
    """

    def __init__(self, num_tasks: int, hidden_dims: Sequence[int] = (16,)) -> None:
        super().__init__()
        if num_tasks <= 0:
            raise ValueError(f"num_tasks must be > 0, got {num_tasks}")
        self.num_tasks = num_tasks
        layers: list[nn.Module] = []
        width = num_tasks
        for h in hidden_dims:
            layers += [nn.Linear(width, int(h)), nn.SiLU()]
            width = int(h)
        last = nn.Linear(width, num_tasks)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.mlp = nn.Sequential(*layers)

    def forward(self, teacher_logits: Tensor) -> Tensor:
        if teacher_logits.dim() != 2 or teacher_logits.shape[1] != self.num_tasks:
            raise ValueError(f"teacher_logits must be [B, {self.num_tasks}], got {tuple(teacher_logits.shape)}")
        x = teacher_logits.float()
        x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
        return x + self.mlp(x)


class BackboneTap:
    """Hooks on a lattice network: appends extra tokens after its processor and captures its heads' input.

    ``tap(batch, extra_tokens=None) -> (output, head_input)`` runs ``network(batch)`` unchanged except that
    ``extra_tokens [B, k, d]`` are concatenated to the processor's non-sequence ``tokens [B, n, d]`` (the
    network must have been built for ``n + k`` tokens, see :func:`with_token_slots`), and returns the
    network's output and the tensor its ``heads`` module was called with (``[B, R]`` or ``[B, T, R]``).
    A network without a ``heads`` module gives its ``output.representation`` instead. With
    ``capture_hidden``, after a call ``tap.head_hidden`` holds the heads' ``serving_hidden`` (``[B, T, h]``,
    the serving heads' last hidden activation; ``None`` for linear heads or heads that do not report it)
    until the caller clears it or the next call.

    Not an ``nn.Module``: it owns no parameters; the hooks hold a reference to it.
    """

    def __init__(self, network: nn.Module, capture_hidden: bool = False) -> None:
        self.network = network
        self._tokens: Tensor | None = None
        self._head_input: Tensor | None = None
        self._heads_called = False
        self.head_hidden: Tensor | None = None
        heads = getattr(network, "heads", None)
        self.has_heads = isinstance(heads, nn.Module)
        processor = getattr(network, "processor", None)
        self.has_processor = isinstance(processor, nn.Module)
        self._handles = []
        if self.has_heads:
            self._handles.append(heads.register_forward_pre_hook(self._capture))
            if capture_hidden:
                self._handles.append(heads.register_forward_hook(self._capture_hidden))
        if self.has_processor:
            self._handles.append(processor.register_forward_hook(self._append))

    def _capture(self, module, args):
        if args:
            self._head_input = args[0]
            self._heads_called = True

    def _capture_hidden(self, module, args, output):
        self.head_hidden = getattr(output, "serving_hidden", None)

    def _append(self, module, args, features):
        if self._tokens is None:
            return None
        tokens = features.tokens
        extra = self._tokens.to(dtype=tokens.dtype)
        if extra.dim() != 3 or extra.shape[0] != tokens.shape[0] or extra.shape[2] != tokens.shape[2]:
            raise ValueError(f"extra tokens must be [B={tokens.shape[0]}, k, d={tokens.shape[2]}], got {tuple(extra.shape)}")
        return dataclasses.replace(features, tokens=torch.cat([tokens, extra], dim=1))

    def __call__(self, batch: Any, extra_tokens: Tensor | None = None):
        if extra_tokens is not None and not self.has_processor:
            raise ValueError(f"{type(self.network).__name__} has no `processor` module to append extra tokens to")
        self._tokens, self._head_input, self._heads_called = extra_tokens, None, False
        self.head_hidden = None
        try:
            output = self.network(batch)
            head_input = self._head_input if self._heads_called else getattr(output, "representation", None)
        finally:
            self._tokens, self._head_input = None, None
        return output, head_input

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


_SLOT_CLASSES: dict[tuple[type, int], type] = {}


def with_token_slots(network_class: type, num_tokens: int) -> type:
    """A subclass of ``network_class`` (a :class:`lattice.models.LatticeModel`) whose trunk is built for
    ``num_tokens`` more non-sequence tokens than its processor makes; :class:`BackboneTap` supplies them.

    Works by cooperative inheritance: the returned class puts a mixin between ``network_class`` and
    ``LatticeModel`` that raises ``processor.num_tokens`` right after the processor is built, before the
    subclass sizes its trunk from it. Same ``__init__`` signature and state-dict keys as ``network_class``.
    """
    from lattice.models.base import LatticeModel

    if not (isinstance(network_class, type) and issubclass(network_class, LatticeModel)):
        raise TypeError(f"with_token_slots needs a LatticeModel subclass, got {network_class!r}")
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if num_tokens == 0:
        return network_class
    key = (network_class, num_tokens)
    if key not in _SLOT_CLASSES:

        class _TokenSlots(LatticeModel):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.processor.num_tokens += num_tokens

        name = f"{network_class.__name__}With{num_tokens}TokenSlots"
        # Named in this module so instances pickle (e.g. for spawned processes); see __getattr__ below.
        _SLOT_CLASSES[key] = type(
            name, (network_class, _TokenSlots),
            {"__module__": __name__, "__qualname__": name, "extra_token_slots": num_tokens},
        )
    return _SLOT_CLASSES[key]


def __getattr__(name: str):
    """Resolves ``<Network>With<k>TokenSlots`` (a :func:`with_token_slots` class of a
    ``lattice.models`` network) by name, so pickles of such networks load in a fresh process."""
    match = re.fullmatch(r"(\w+)With(\d+)TokenSlots", name)
    if match:
        import lattice.models as models

        base = getattr(models, match.group(1), None)
        if isinstance(base, type):
            return with_token_slots(base, int(match.group(2)))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class TeacherTokenNetwork(nn.Module):
    """A lattice network built with room for extra input tokens (the KTAP teacher token), for YAML::

        network:
          class_path: lattice.distill.TeacherTokenNetwork
          init_args:
            network_class: lattice.models.LatticeNetwork
            network_args: {dim: 16, num_layers: 1}
            num_tokens: 1

    Args:
        schema: the data schema (the CLI links it in).
        network_class: dotted path of a :class:`lattice.models.LatticeModel` subclass.
        network_args: its other ``__init__`` arguments.
        num_tokens: extra non-sequence tokens the trunk is sized for.

    ``forward(batch)`` is the inner network's; the extra tokens come from a :class:`BackboneTap` (a
    forward without them runs with ``n`` tokens, which a trunk sized for ``n + k`` rejects).
    ``schema``, ``processor``, ``heads``, ``encode``, ``flops_per_sample`` and ``num_parameters`` are the
    inner network's.
    """

    def __init__(
        self,
        schema: Any,
        network_class: str = "lattice.models.LatticeNetwork",
        network_args: dict[str, Any] | None = None,
        num_tokens: int = 1,
    ) -> None:
        super().__init__()
        cls = with_token_slots(import_dotted(network_class, "network_class"), num_tokens)
        self.network = cls(schema, **dict(network_args or {}))
        self.num_extra_tokens = num_tokens

    @property
    def schema(self):
        return self.network.schema

    @property
    def processor(self) -> nn.Module:
        return self.network.processor

    @property
    def heads(self) -> nn.Module:
        return self.network.heads

    @property
    def dim(self) -> int:
        return self.network.dim

    def encode(self, features, batch):
        return self.network.encode(features, batch)

    def forward(self, batch: Any):
        return self.network(batch)

    def flops_per_sample(self, *args, **kwargs) -> float:
        return self.network.flops_per_sample(*args, **kwargs)

    def num_parameters(self, *args, **kwargs) -> int:
        return self.network.num_parameters(*args, **kwargs)
