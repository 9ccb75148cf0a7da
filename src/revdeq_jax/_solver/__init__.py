from .anderson import Anderson as Anderson
from .base import (
    AbstractReversibleSolver as AbstractReversibleSolver,
    AbstractSolver as AbstractSolver,
)
from .broyden import Broyden as Broyden
from .relaxed import Picard as Picard, Relaxed as Relaxed
from .reversible import Reversible as Reversible
