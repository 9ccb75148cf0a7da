"""The automatic choice of state: exact where it applies, the dtype of `z0` elsewhere."""

from typing import ClassVar

import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .base import AbstractState
from .exact import ExactState, rational_beta
from .floating import FloatState


class AutoState(AbstractState):
    """Picks the state from `z0`, `beta` and the adjoint: `state_dtype="auto"`, the
    default of [`revdeq_jax.Reversible`][].

    [`revdeq_jax.ExactState`][] (bit-exact reversal at any depth) when every leaf of `z0`
    is a float of at most 32 bits, `beta` is a ratio of small integers, and the adjoint
    does not differentiate through the solver's arithmetic (e.g.
    [`revdeq_jax.ReversibleAdjoint`][]); [`revdeq_jax.FloatState`][] in the dtype of `z0`
    otherwise (a float64 model keeps a float64 state, finer than the exact state's
    $2^{-32}$ grid; [`revdeq_jax.UnrolledAdjoint`][] needs differentiable arithmetic).
    The choice is made once, by [`revdeq_jax.fixed_point`][], at trace time.

    **Arguments:**

    - `exact`: the exact state to use where it applies.
    """

    exact: ExactState = ExactState()

    differentiable: ClassVar[bool] = True  # resolves to a floating state when asked to

    def choose(self, z0: PyTree[Array], beta: float, differentiable: bool) -> AbstractState:
        """The state `resolve` picks."""
        narrow = all(jnp.finfo(leaf.dtype).bits <= 32 for leaf in jtu.tree_leaves(z0))
        try:
            rational_beta(beta)
        except ValueError:
            return FloatState()
        return self.exact if narrow and not differentiable else FloatState()

    def resolve(
        self, z0: PyTree[Array], beta: float, max_steps: int, differentiable: bool = False
    ) -> AbstractState:
        state = self.choose(z0, beta, differentiable)
        return state.resolve(z0, beta, max_steps, differentiable)

    def _unresolved(self, *args, **kwargs):
        raise ValueError(
            '`state_dtype="auto"` is resolved from `z0` by `fixed_point`; call '
            "`solver.prepare(z0, max_steps)` first when driving the solver by hand."
        )

    encode = decode = update = invert = deviation = mismatch = _unresolved
