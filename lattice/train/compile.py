"""``LatticeModule(compile=...)``: ``torch.compile`` of the network's forward (and so, through AOTAutograd, its
backward), in place.

The network is compiled with :meth:`torch.nn.Module.compile`, which compiles its ``__call__`` and leaves the
module tree alone: ``state_dict`` keys are the same with compile on or off, so checkpoints move freely between
the two. Every batch's tensors have their leading dim (the batch size ``B``, a jagged ``values [N]``, key-major
``offsets [F*B+1]``) marked dynamic before the call, so a batch of another size or other sequence lengths
reuses the compiled graph instead of recompiling.
"""
from __future__ import annotations

from typing import Any, Union

import torch
import torch.utils._pytree as pytree
from torch import nn

__all__ = ["CompileOption", "compile_options", "compile_network", "mark_batch_dynamic", "compiled_graph_count"]

#: ``False`` (eager), ``True`` (inductor, default options) or a dict of ``torch.compile`` keyword arguments.
CompileOption = Union[bool, dict]

_KEYS = ("backend", "mode", "dynamic", "fullgraph", "options")


def compile_options(option: Any) -> dict | None:
    """``None`` for eager, else the ``torch.compile`` keyword arguments of ``option``.

    Raises ``ValueError`` naming ``compile`` for anything but a bool or a dict of the known keys."""
    if option is None or option is False:
        return None
    if option is True:
        return {}
    if not isinstance(option, dict):
        raise ValueError(f"compile must be true, false or a dict of torch.compile options {list(_KEYS)}, got {option!r}")
    unknown = sorted(set(option) - set(_KEYS))
    if unknown:
        raise ValueError(f"compile: unknown torch.compile option(s) {unknown}; known: {list(_KEYS)}")
    if "mode" in option and "options" in option and option["mode"] is not None and option["options"] is not None:
        raise ValueError("compile: give either 'mode' or 'options', not both (torch.compile refuses the pair)")
    return dict(option)


def compile_network(network: nn.Module, option: Any) -> bool:
    """Compiles ``network``'s forward in place per ``option`` (see :func:`compile_options`); returns whether it
    did. Idempotent: a network already compiled is left as it is."""
    kwargs = compile_options(option)
    if kwargs is None:
        return False
    if getattr(network, "_compiled_call_impl", None) is None:
        network.compile(**kwargs)
    return True


def mark_batch_dynamic(batch: Any) -> None:
    """Marks dim 0 of every tensor of ``batch`` (a pytree: Batch, KeyedJaggedTensor...) as possibly dynamic.

    ``maybe_mark_dynamic``: a dim the graph needs static (a size 1, a fixed table count) stays static
    instead of raising."""
    for leaf in pytree.tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            torch._dynamo.maybe_mark_dynamic(leaf, 0)


def compiled_graph_count() -> int:
    """Graphs Dynamo has compiled in this process so far (first compiles and recompiles together): the
    difference over an epoch is its recompile count."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
