"""Multi-task prediction heads with Lattice Zipper windows.

One small MLP per task; a task with attribution windows (e.g. a conversion under 90 min / 1 day /
7 days) gets one MLP per window. During training each sample's label was computed under one assigned
window (``batch.label_window``), so its loss must reach only that window's head; serving, evaluation and
prediction use the longest window (the "oracle" window, closest to the true label).

All heads run as one batched einsum over stacked weights (no loop over heads or samples).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lattice.nn.linear import make_activation, resolve_domain_groups

__all__ = ["HeadOutput", "MultiTaskHeads"]


@dataclass
class HeadOutput:
    """What :class:`MultiTaskHeads` returns.

    Attributes:
        logits: ``[B, T]`` serving logits, task order of the schema: for a windowed task the
            longest-window head. For a regression task the raw prediction.
        train_logits: ``[B, T]`` routed logits for the loss: for a windowed task the head of the
            window in ``label_window[b, t]`` (the longest one where it is ``-1``); equal to ``logits``
            for tasks without windows and when no ``label_window`` was given.
        window_logits: task name -> ``[B, W]`` logits of all of that task's window heads (windowed
            tasks only), window order of the task spec.
        serving_hidden: ``[B, T, h]`` the last hidden activation of each task's serving head (what its
            output layer reads; e.g. for a distillation head that shares the serving heads' hidden
            layers); ``None`` for linear heads.
    """

    logits: Tensor
    train_logits: Tensor
    window_logits: dict[str, Tensor] = field(default_factory=dict)
    serving_hidden: Tensor | None = None


def _task_windows(task: Any) -> list[Any]:
    windows = getattr(task, "windows", None)
    return list(windows) if windows else []


class MultiTaskHeads(nn.Module):
    """One MLP per (task, window), evaluated together, with Zipper routing.

    Args:
        in_dim: input width.
        tasks: the schema's task specs (``name`` and optional ``windows``, each with ``seconds``).
        hidden_dims: hidden sizes of every head MLP (may be empty: a linear head).
        activation: hidden activation (see :func:`~lattice.nn.make_activation`).
        bias: biases in the heads. On by default: the output bias carries each task's base rate.
        dropout: dropout on the hidden activations.
        num_domains, domain_groups: per-domain heads (one copy per domain group). Heads are small, so
            every group's head runs on every row and each row keeps its own (static shapes).

    Shape: ``x [B, in_dim]`` (shared input) or ``[B, T, in_dim]`` (one input per task, e.g. MMoE towers);
    ``label_window [B, T]`` int64 or ``None``; ``domain [B]`` when per-domain. Returns :class:`HeadOutput`.
    """

    def __init__(
        self,
        in_dim: int,
        tasks: Sequence[Any],
        hidden_dims: Sequence[int] = (64,),
        activation: str = "silu",
        bias: bool = True,
        dropout: float = 0.0,
        num_domains: int = 1,
        domain_groups: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("MultiTaskHeads needs at least one task")
        self.in_dim = in_dim
        self.task_names = [t.name for t in tasks]
        self.num_tasks = len(tasks)
        head_task, offsets, num_windows, longest = [], [], [], []
        self.windowed: dict[str, tuple[int, int]] = {}
        for t, task in enumerate(tasks):
            windows = _task_windows(task)
            offsets.append(len(head_task))
            n = max(1, len(windows))
            head_task += [t] * n
            num_windows.append(len(windows))
            if windows:
                seconds = [float(w.seconds) for w in windows]
                longest.append(max(range(n), key=lambda i: seconds[i]))
                self.windowed[task.name] = (offsets[-1], n)
            else:
                longest.append(0)
        self.num_heads = len(head_task)
        self.register_buffer("head_task", torch.tensor(head_task, dtype=torch.long), persistent=False)
        self.register_buffer("head_offset", torch.tensor(offsets, dtype=torch.long), persistent=False)
        self.register_buffer("num_windows", torch.tensor(num_windows, dtype=torch.long), persistent=False)
        self.register_buffer(
            "serving_head", torch.tensor([o + l for o, l in zip(offsets, longest)], dtype=torch.long), persistent=False
        )
        self.register_buffer("longest_window", torch.tensor(longest, dtype=torch.long), persistent=False)
        groups = resolve_domain_groups(num_domains, domain_groups)
        self.num_groups = max(groups) + 1
        self.register_buffer("group_of_domain", torch.tensor(groups, dtype=torch.long), persistent=False)

        dims = [in_dim, *hidden_dims, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(dims[:-1], dims[1:]):
            w = nn.Parameter(torch.empty(self.num_groups, self.num_heads, a, b))
            bound = 1.0 / math.sqrt(a)
            nn.init.uniform_(w, -bound, bound)
            self.weights.append(w)
            if bias:
                bb = nn.Parameter(torch.empty(self.num_groups, self.num_heads, b))
                nn.init.uniform_(bb, -bound, bound)
                self.biases.append(bb)
        self.has_bias = bias
        self.act = make_activation(activation)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.hidden_dims = list(hidden_dims)

    def forward(self, x: Tensor, label_window: Tensor | None = None, domain: Tensor | None = None) -> HeadOutput:
        if x.dim() == 2:
            h = x.unsqueeze(1).expand(-1, self.num_heads, -1)
        elif x.dim() == 3 and x.shape[1] == self.num_tasks:
            h = x.index_select(1, self.head_task)
        else:
            raise ValueError(f"heads take [B, {self.in_dim}] or [B, {self.num_tasks}, {self.in_dim}], got {tuple(x.shape)}")
        group = None
        if self.num_groups > 1:
            if domain is None:
                raise ValueError("per-domain heads need the batch's domain tensor")
            group = self.group_of_domain[domain]
        n_layers = len(self.weights)
        hidden = None
        for i in range(n_layers):
            if i == n_layers - 1 and n_layers > 1:
                hidden = h
            h = self._layer(h, i, group)
            if i < n_layers - 1:
                h = self.dropout(self.act(h))
        all_logits = h.squeeze(-1)  # [B, H]
        logits = all_logits.index_select(1, self.serving_head)
        train_logits = logits if label_window is None else self._route(all_logits, label_window)
        window_logits = {name: all_logits[:, o : o + n] for name, (o, n) in self.windowed.items()}
        serving_hidden = None if hidden is None else hidden.index_select(1, self.serving_head)
        return HeadOutput(logits=logits, train_logits=train_logits, window_logits=window_logits,
                          serving_hidden=serving_hidden)

    def _layer(self, h: Tensor, i: int, group: Tensor | None) -> Tensor:
        w = self.weights[i]
        if group is None:
            out = torch.einsum("bhi,hio->bho", h, w[0])
            if self.has_bias:
                out = out + self.biases[i][0]
            return out
        out_all = torch.einsum("bhi,ghio->bgho", h, w)
        idx = group.view(-1, 1, 1, 1).expand(-1, 1, out_all.shape[2], out_all.shape[3])
        out = out_all.gather(1, idx).squeeze(1)
        if self.has_bias:
            out = out + self.biases[i][group]
        return out

    def _route(self, all_logits: Tensor, label_window: Tensor) -> Tensor:
        if label_window.shape != (all_logits.shape[0], self.num_tasks):
            raise ValueError(
                f"label_window must be [B, T] = [{all_logits.shape[0]}, {self.num_tasks}], got {tuple(label_window.shape)}"
            )
        lw = label_window.long()
        windowed = self.num_windows > 0  # [T]
        if not torch.compiler.is_compiling():
            bad = windowed & (lw >= self.num_windows)
            if bool(bad.any()):
                b, t = (int(v) for v in bad.nonzero()[0])
                raise ValueError(
                    f"label_window[{b}, {t}] = {int(lw[b, t])} but task {self.task_names[t]!r} has "
                    f"{int(self.num_windows[t])} windows"
                )
        window = torch.where(windowed & (lw >= 0), lw, self.longest_window)
        index = self.head_offset + window  # [B, T]
        return all_logits.gather(1, index)

    def flops(self) -> float:
        dims = [self.in_dim, *self.hidden_dims, 1]
        return float(sum(2 * a * b for a, b in zip(dims[:-1], dims[1:])) * self.num_heads)
