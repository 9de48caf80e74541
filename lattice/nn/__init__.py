"""Building blocks: embedding collection, processors, norms, attention, Wukong/DHEN, heads."""
from lattice.nn.embedding import EmbeddingBagCollection, EmbeddingTableConfig, NormalInit, UniformInit  # noqa: F401
