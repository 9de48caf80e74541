"""Whole networks: :class:`LatticeNetwork` (the default), :class:`InterFormer`, and the baselines
:class:`SharedBottom`, :class:`MMoE`, :class:`PLE`, :class:`DLRM`, :class:`Wukong`,
:class:`LogisticRegression` — all
:class:`LatticeModel` s: ``forward(batch) -> ModelOutput``, ``flops_per_sample()``, ``num_parameters()``.
"""
from lattice.models.base import LatticeModel, ModelOutput
from lattice.models.baselines import DLRM, MMoE, PLE, LogisticRegression, SharedBottom, Wukong
from lattice.models.interformer import InterFormer
from lattice.models.lattice_network import LatticeNetwork

__all__ = [
    "LatticeModel",
    "ModelOutput",
    "LatticeNetwork",
    "InterFormer",
    "SharedBottom",
    "MMoE",
    "PLE",
    "DLRM",
    "Wukong",
    "LogisticRegression",
]
