from .base import AbstractAdjoint as AbstractAdjoint
from .implicit import ImplicitAdjoint as ImplicitAdjoint
from .phantom import PhantomAdjoint as PhantomAdjoint
from .reversible import ReversibleAdjoint as ReversibleAdjoint
from .unrolled import CheckpointAdjoint as CheckpointAdjoint, UnrolledAdjoint as UnrolledAdjoint
