"""Type aliases used across the library."""

from collections.abc import Callable
from typing import Any, TypeAlias, TypeVar

from jaxtyping import Array, ArrayLike, Bool, Float, Int, PyTree


Z = TypeVar("Z")
Args: TypeAlias = PyTree[Any]
Fn: TypeAlias = Callable[[Z, Args], Z]
SolverState = TypeVar("SolverState")

Scalar: TypeAlias = Float[Array, ""]
IntScalar: TypeAlias = Int[Array, ""]
BoolScalar: TypeAlias = Bool[Array, ""]
RealScalarLike: TypeAlias = float | int | Float[ArrayLike, ""]
StepBudget: TypeAlias = int | Int[ArrayLike, ""]  # a runtime limit on the solver's steps

__all__ = [
    "Args",
    "BoolScalar",
    "Fn",
    "IntScalar",
    "RealScalarLike",
    "Scalar",
    "SolverState",
    "StepBudget",
    "Z",
]
