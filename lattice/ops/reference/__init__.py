"""Pure-torch reference implementations of every lattice op, used by tests and benchmarks."""
from lattice.ops.reference.pooling import *  # noqa: F401,F403
from lattice.ops.reference.attention import *  # noqa: F401,F403
from lattice.ops.reference.pooling_int8 import *  # noqa: F401,F403
