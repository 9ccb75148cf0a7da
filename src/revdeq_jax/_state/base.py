"""Abstract state arithmetic: how a reversible solver holds and updates its coupled state."""

import abc
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Float, PyTree


class AbstractState(eqx.Module):
    r"""How [`revdeq_jax.Reversible`][] holds its coupled state $(y, z)$ and does its own
    arithmetic, separately from the precision `fn` runs in.

    The solver needs exactly two operations on each leaf of the state, the update and its
    inverse,

    $x' = (1 - \beta)\, x + \beta f$, $\quad x = (x' - \beta f) / (1 - \beta)$,

    plus the conversions into and out of the state (`encode`, `decode`) and a measure of
    how far a reconstruction lies from the known initial state (`deviation`,
    `mismatch`). A concrete state is a strategy object passed as
    `Reversible(beta, state_dtype=...)`:

    - [`revdeq_jax.FloatState`][]: a floating dtype (the dtype of `z0`, or a wider one);
    - [`revdeq_jax.TwoFloatState`][]: float32 pairs, about 48 bits, no 64-bit types;
    - [`revdeq_jax.ExactState`][]: fixed-point integers with an information buffer, whose
      inverse is exact to the bit;
    - [`revdeq_jax.AutoState`][]: the exact state where it applies, else the dtype of `z0`.

    All methods act on one leaf of the state; `is_leaf` tells tree maps where a leaf of
    a structured state (a two-float pair, an exact integer state) stops.
    """

    differentiable: eqx.AbstractClassVar[bool]
    """Whether autodiff through `update` gives the derivative of the iteration (false for
    integer arithmetic, whose derivative is zero)."""

    def resolve(
        self, z0: PyTree[Array], beta: float, max_steps: int, differentiable: bool = False
    ) -> "AbstractState":
        """This state made concrete for an initial state `z0`, relaxation `beta` and step
        budget `max_steps`; raises at trace time if it cannot hold `z0`. `differentiable`
        says the adjoint will differentiate through `update` with autodiff.

        Called once, by [`revdeq_jax.fixed_point`][], before the forward and backward
        passes: both then use the object it returns. The default checks and returns
        `self`.
        """
        del beta, max_steps, differentiable
        self.check(z0)
        return self

    def check(self, z0: PyTree[Array]) -> None:
        """Raises at trace time if this state cannot hold `z0` without losing precision."""
        del z0

    def check_beta(self, beta: float) -> None:
        """Raises at construction time if this state cannot use `beta`."""
        del beta

    def scope(self) -> contextlib.AbstractContextManager:
        """A context in which the state's own arithmetic runs (64-bit types, if needed)."""
        return contextlib.nullcontext()

    def is_leaf(self, x: Any) -> bool:
        """Whether `x` is one leaf of this state (for `jax.tree.map(..., is_leaf=...)`)."""
        del x
        return False

    def append_only(self, x: Any) -> PyTree[bool]:
        """Which parts of the leaf `x` (a tree of bools shaped like it) a step only writes
        at positions the solve has not used yet, overwriting what is there: a step taken
        after the solve stopped changes nothing anything reads, so a batched loop may let
        finished examples write them instead of masking (copying) them. The default:
        none."""
        return jtu.tree_map(lambda _: False, x)

    @abc.abstractmethod
    def encode(self, z0: Array) -> Any:
        """One leaf of `z0` as held by the state."""

    @abc.abstractmethod
    def decode(self, x: Any, dtype: Any) -> Array:
        """One leaf of the state as an array of `dtype` (what `fn` is evaluated at)."""

    @abc.abstractmethod
    def update(self, x: Any, f: Array, beta: float) -> Any:
        r"""$(1 - \beta) x + \beta f$ for one leaf; `f` is in the dtype `fn` returns."""

    @abc.abstractmethod
    def invert(self, x: Any, f: Array, beta: float) -> Any:
        r"""Undoes `update(_, f, beta)`: $(x - \beta f) / (1 - \beta)$."""

    @abc.abstractmethod
    def deviation(self, x: Any, z0: Array) -> Float[Array, "*shape"]:
        """`x - z0` elementwise as floats: how far a reconstruction lies from `z0`."""

    @abc.abstractmethod
    def mismatch(self, x: Any, z0: Array, rtol: float | None) -> Bool[Array, ""]:
        """Whether the reconstruction `x` of the leaf `z0` is too far from it for the
        reversible gradient to be trusted (`rtol=None`: this state's own threshold)."""

    def mismatch_advice(self, drift: float) -> str:
        """What to change when a reconstruction with this state did not match `z0`;
        `drift` is the largest re-evaluation drift the backward pass measured (see
        `ReversibleAdjoint(report=...)`)."""
        del drift
        return (
            "The floating state's reconstruction drifted: use `state_dtype='exact'` (or "
            "'auto'), fewer steps, or a `beta` nearer 0.5."
        )

    def cotangent_dtype(self, dtype: Any) -> Any:
        """The dtype the backward pass accumulates the state's cotangents in."""
        return jnp.promote_types(dtype, jnp.float32)


FLOAT_MISMATCH_RTOL = 1e-3
"""Relative deviation of a floating state's reconstructed `z0` above which the backward
pass reports a mismatch: the reconstruction has come apart (floating states never
reconstruct exactly, and the first iterates weigh least in the gradient)."""


def x64_enabled() -> bool:
    """Whether 64-bit types are currently enabled (globally or by a scope)."""
    return bool(jax.config.read("jax_enable_x64"))


@contextlib.contextmanager
def x64_scope() -> Iterator[None]:
    """Enables 64-bit types for the enclosed code, without touching the global setting."""
    if x64_enabled():
        yield
    else:
        with jax.enable_x64(True):
            yield


def deviation_size(dev: Array, z0: Array) -> tuple[Array, Array]:
    """`max|dev|` and `max|dev| / max(max|z0|, 1)` as float32 scalars (inf if `dev` is not
    finite)."""
    finite = jnp.all(jnp.isfinite(dev))
    # XLA's max-reduction may drop NaNs (measured on CPU for >= 4096 elements), so a
    # non-finite deviation is flagged explicitly.
    err = jnp.where(finite, jnp.max(jnp.abs(dev), initial=0.0), jnp.inf).astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(z0), initial=0.0).astype(jnp.float32), 1.0)
    return err, err / scale


def refuse_wide_z0(z0: PyTree[Array], why: Callable[[Any], str]) -> None:
    """Raises `ValueError(why(dtype))` for the first leaf of `z0` wider than 32 bits: the
    states that hold about 32 (exact) or 48 (float32x2) bits would round it."""
    for leaf in jtu.tree_leaves(z0):
        if jnp.finfo(leaf.dtype).bits > 32:
            raise ValueError(why(leaf.dtype))
