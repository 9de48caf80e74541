"""``LatticeModule(compile=...)``: ``torch.compile`` of the network's forward (and so, through AOTAutograd, its
backward), in place.

The network is compiled with :meth:`torch.nn.Module.compile`, which compiles its ``__call__`` and leaves the
module tree alone: ``state_dict`` keys are the same with compile on or off, so checkpoints move freely between
the two. Every batch's tensors have their leading dim (the batch size ``B``, a jagged ``values [N]``, key-major
``offsets [F*B+1]``) marked dynamic before the call, so a batch of another size or other sequence lengths
reuses the compiled graph instead of recompiling. Compiling turns on Dynamo's ``capture_scalar_outputs`` and marks
the KeyedJaggedTensor's host-side sizes dynamic for the process (see :func:`compile_network`).
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

# A KeyedJaggedTensor carries its batch size (``_stride``) and per-key value counts (``_length_per_key``,
# ``_offset_per_key``) as Python ints, which Dynamo would otherwise specialize on: the first batch's values get
# baked into the graph, and the next batch (new counts), then the epoch's short last batch (new B), each recompile
# the whole forward and backward. Regexes (``re.match``) over Dynamo source names, e.g.
# ``L['batch'].sparse._length_per_key[6]``; ``torch.compiler.config.dynamic_sources`` splits entries on commas.
_DYNAMIC_KJT_SOURCES = (r".*\._stride$", r".*\._length_per_key\[\d+\]$", r".*\._offset_per_key\[\d+\]$")


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
    # KeyedJaggedTensor.permute/split read per-key value counts on the host (.tolist()): captured as unbacked
    # symbolic ints instead of a graph break whose resumed graphs specialize on every batch's counts.
    torch._dynamo.config.capture_scalar_outputs = True
    _mark_kjt_sizes_dynamic()
    if getattr(network, "_compiled_call_impl", None) is None:
        network.compile(**kwargs)
    return True


def _mark_kjt_sizes_dynamic() -> None:
    """Adds :data:`_DYNAMIC_KJT_SOURCES` to ``torch.compiler.config.dynamic_sources`` (keeping what the user set
    there, e.g. through ``TORCH_COMPILE_DYNAMIC_SOURCES``)."""
    present = [s for s in torch.compiler.config.dynamic_sources.split(",") if s.strip()]
    missing = [s for s in _DYNAMIC_KJT_SOURCES if s not in present]
    if missing:
        torch.compiler.config.dynamic_sources = ",".join(present + missing)


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
