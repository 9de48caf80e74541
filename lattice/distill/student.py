"""Student-side pieces around a lattice network: the student adapter, and a network built with room
for the KTAP teacher token, for YAML.

Both rest on :class:`lattice.models.LatticeModel`'s extension points: a network built with
``num_extra_tokens=k`` takes ``forward(batch, extra_tokens=[B, k, d])`` (the teacher token) and reports the
backbone output its heads read as ``output.head_input`` (what the auxiliary distillation head shares).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from lattice.batch import Batch
from lattice.dotted import import_dotted
from lattice.models.base import LatticeModel

__all__ = ["StudentAdapter", "TeacherTokenNetwork"]


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
        num_tokens: extra non-sequence tokens the trunk is sized for (the inner network's
            ``num_extra_tokens``).

    ``forward(batch, extra_tokens=None)`` is the inner network's (``extra_tokens [B, num_tokens, d]``,
    e.g. from :class:`~lattice.distill.TeacherTokenProjection`). ``schema``, ``processor``, ``heads``,
    ``encode``, ``flops_per_sample`` and ``num_parameters`` are the inner network's.
    """

    def __init__(
        self,
        schema: Any,
        network_class: str = "lattice.models.LatticeNetwork",
        network_args: dict[str, Any] | None = None,
        num_tokens: int = 1,
    ) -> None:
        super().__init__()
        cls = import_dotted(network_class, "network_class")
        if not (isinstance(cls, type) and issubclass(cls, LatticeModel)):
            raise TypeError(f"network_class must name a lattice.models.LatticeModel subclass, got {network_class!r}")
        args = dict(network_args or {})
        if "num_extra_tokens" in args:
            raise ValueError("network_args must not set num_extra_tokens: TeacherTokenNetwork's num_tokens sets it")
        self.network = cls(schema, num_extra_tokens=num_tokens, **args)
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

    def encode(self, features, batch: Batch):
        return self.network.encode(features, batch)

    def forward(self, batch: Batch, extra_tokens: Tensor | None = None):
        return self.network(batch, extra_tokens)

    def flops_per_sample(self, *args, **kwargs) -> float:
        return self.network.flops_per_sample(*args, **kwargs)

    def num_parameters(self, *args, **kwargs) -> int:
        return self.network.num_parameters(*args, **kwargs)
