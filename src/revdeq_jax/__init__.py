"""Reversible Deep Equilibrium Models in JAX and Equinox.

Exact gradients through fixed-point solves, in memory that does not grow with depth.
"""

import importlib.metadata

from . import nn as nn
from ._adjoint import (
    AbstractAdjoint as AbstractAdjoint,
    CheckpointAdjoint as CheckpointAdjoint,
    ImplicitAdjoint as ImplicitAdjoint,
    PhantomAdjoint as PhantomAdjoint,
    ReversibleAdjoint as ReversibleAdjoint,
    UnrolledAdjoint as UnrolledAdjoint,
)
from ._fixed_point import (
    fixed_point as fixed_point,
    reconstruction_error as reconstruction_error,
)
from ._jacobian_penalty import jacobian_penalty as jacobian_penalty
from ._solution import RESULTS as RESULTS, Solution as Solution
from ._solver import (
    AbstractReversibleSolver as AbstractReversibleSolver,
    AbstractSolver as AbstractSolver,
    Anderson as Anderson,
    Broyden as Broyden,
    Picard as Picard,
    Relaxed as Relaxed,
    Reversible as Reversible,
)
from ._state import (
    AbstractState as AbstractState,
    AutoState as AutoState,
    ExactState as ExactState,
    FloatState as FloatState,
    TwoFloatState as TwoFloatState,
)
from .nn import DEQ as DEQ


__version__ = importlib.metadata.version("revdeq_jax")
