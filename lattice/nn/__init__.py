"""Building blocks: norms, (per-domain) linears, fusion blocks (Wukong/DHEN), the extended context store,
the fused embedding-bag collection, multi-task Zipper heads, conditional (ESMM) tasks, feature processors,
sequence blocks and the wide path."""
from lattice.nn.embedding import EmbeddingBagCollection, EmbeddingTableConfig, NormalInit, UniformInit
from lattice.nn.attention import PMA, InterleavedCrossAttention, JaggedMultiheadAttention, RotaryEmbedding, apply_rope, positions_from_offsets, rope_table
from lattice.nn.conditional import ConditionalTasks, compose_logits
from lattice.nn.context import ExtendedContextStore
from lattice.nn.fusion import DWFB, CrossNetBlock, DotProductBlock, FMBlock, FusionBlock, LinearCompressBlock
from lattice.nn.heads import HeadOutput, MultiTaskHeads
from lattice.nn.linear import MLP, DomainLinear, make_activation
from lattice.nn.match import HistoryMatch, match_pairs
from lattice.nn.norms import RMSNorm, RunningStandardize, SwishRMSNorm, make_norm
from lattice.nn.processors import (
    DenseProcessor,
    EmbeddingTables,
    FeatureProcessor,
    JaggedTokens,
    ProcessedFeatures,
    SequenceProcessor,
    SparseProcessor,
)
from lattice.nn.sequence import PersonalizedFFN, SelfGate, SequenceBlock, SequenceSummary
from lattice.nn.wide import WidePath

__all__ = [
    "EmbeddingBagCollection",
    "EmbeddingTableConfig",
    "NormalInit",
    "UniformInit",
    "JaggedMultiheadAttention",
    "InterleavedCrossAttention",
    "PMA",
    "apply_rope",
    "RMSNorm",
    "RunningStandardize",
    "SwishRMSNorm",
    "make_norm",
    "DomainLinear",
    "MLP",
    "make_activation",
    "FMBlock",
    "LinearCompressBlock",
    "DotProductBlock",
    "CrossNetBlock",
    "FusionBlock",
    "DWFB",
    "ExtendedContextStore",
    "HeadOutput",
    "ConditionalTasks",
    "compose_logits",
    "MultiTaskHeads",
    "JaggedTokens",
    "ProcessedFeatures",
    "EmbeddingTables",
    "DenseProcessor",
    "SparseProcessor",
    "SequenceProcessor",
    "FeatureProcessor",
    "HistoryMatch",
    "match_pairs",
    "SelfGate",
    "PersonalizedFFN",
    "SequenceSummary",
    "SequenceBlock",
    "WidePath",
]
