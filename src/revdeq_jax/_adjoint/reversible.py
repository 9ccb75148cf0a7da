"""Exact gradients in constant memory by reversing the reversible solver (Algorithm 1)."""

import functools as ft
import warnings
from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.custom_batching
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array

from .._iterate import (
    in_place_while_loop,
    Inputs,
    LoopResult,
    match_varying,
    Primal,
    refuse_shared_parameters,
    varying_axes,
)
from .._misc import materialise, tree_add, tree_cast_like, zeros_like_inexact
from .._solver.base import AbstractReversibleSolver, AbstractSolver, BackwardBatch, ReverseCarry
from .base import AbstractAdjoint


_POLICIES = ("raise", "warn", "ignore")
_VMAP_BACKWARDS = ("batch", "per_example")

MISMATCH_MESSAGE = (
    "The reversible backward pass did not rebuild the initial state `z0` it started from, "
    "so the gradient it computed is not the gradient of the forward pass."
)
_GENERIC_ADVICE = (
    "With `state_dtype='exact'` the backward pass's re-evaluation of `fn` differed from "
    "the forward's by more than the state's tolerance (see `ExactState`: raise "
    "`guard_bits`); with a floating state the reconstruction drifted (use "
    "`state_dtype='exact'`, fewer steps, or a smaller `beta`)."
)
_OTHER_WAYS = (
    "Or use another adjoint (`UnrolledAdjoint()`, `CheckpointAdjoint()`); "
    "`ReversibleAdjoint(on_mismatch='warn' | 'ignore')` lets the gradient through."
)


class ReversibleAdjoint(AbstractAdjoint):
    r"""Exact backpropagation through [`revdeq_jax.Reversible`][], in O(1) memory in the
    iterates.

    The forward pass is a `lax.while_loop` that stores nothing but the final coupled
    state $(y_N, z_N)$. The backward pass is a second `lax.while_loop` that walks the
    iteration backwards: each step rebuilds $(y_n, z_n)$ from $(y_{n+1}, z_{n+1})$ with the
    closed-form inverse and applies exactly the rules reverse-mode autodiff would apply to
    the stored graph (Algorithm 1 of the paper). Each evaluation of $f$ on the backward pass
    is a single `vjp`, whose primal output drives the reconstruction and whose pullback
    gives the cotangents, so a backward step costs 2 forward and 2 backward evaluations.

    How exact the rebuilt iterates are is decided by the solver's state (see
    [`revdeq_jax.Reversible`][]): with [`revdeq_jax.ExactState`][] they are rebuilt to the
    bit, and the gradient *equals* the unrolled gradient of the forward pass, at any
    depth, as long as re-evaluating `fn` stays within the state's tolerance; floating
    states drift geometrically with depth. (The exact state's information buffer grows
    with `max_steps`, by a few bits per element per step.)

    **The reconstruction is checked on every backward pass.** The initial state $z_0$ is
    known, so at the end of the reversed loop the rebuilt $(y_0, z_0)$ is compared with it,
    at no extra evaluation. A mismatch (any difference at all for the exact state; for
    floating states, which never reconstruct exactly, a relative deviation above `1e-3`,
    or above `mismatch_rtol`) means the gradient is
    not the gradient of the forward pass, and `on_mismatch` decides what happens (per
    example under `vmap`).

    Cotangents are returned for every floating array closed over by `fn` (its parameters),
    for `args` and for `z0`. Only reversible solvers are accepted.

    **Arguments:**

    - `on_mismatch`: `"raise"` (the default: the computation fails at run time with the
      reason, so a wrong gradient never passes silently), `"warn"` (a Python warning from
      the host, the gradient is returned), or `"ignore"`. Both are a host callback on two
      scalars per backward pass.
    - `mismatch_rtol`: for floating states, the relative deviation of the reconstruction
      (over $\max(\max|z_0|, 1)$) above which it counts as a mismatch; `None` uses the
      state's own threshold. The exact state ignores it.
    - `report`: optional hook, called (through `jax.debug.callback`, so it also works
      under `jit`) after every backward pass with a dict of scalars measured on that very
      pass: `"abs"`, the largest deviation of the rebuilt $(y_0, z_0)$ from the true
      initial state; `"rel"`, that over $\max(\max|z_0|, 1)$; `"drift"`, for the exact
      state the largest distance of a re-evaluation of `fn` from the value it was
      snapped back to, in ulps of `fn`'s dtype at the leaf's largest binade (exactness is
      guaranteed below the state's `tolerance_ulps()`, at least 31.5 with the defaults; a
      re-evaluation that repeats the forward's bits still shows up to half the lattice
      spacing, and past the tolerance the measure saturates at about 32 ulps with the
      defaults, see [`revdeq_jax.ExactState`][]; 0 elsewhere); and `"mismatch"` (per
      example under `vmap`).
    - `vmap_backward`: what the backward pass does when per-example solves are
      `jax.vmap`ped. `"per_example"` (the default) lets `vmap` batch the per-example
      loop, which then carries one cotangent of every shared parameter per example
      (memory batch × parameters); right under every composition of transformations.
      `"batch"` walks the whole batch back in one loop, evaluating `fn` once per
      half-step as the VJP of the batched function, so the cotangents of the leaves the
      batch shares (the parameters) are *summed over the batch* as they arrive and the
      loop carries one copy of them, as for a batched `fn`; each example still stops,
      reconstructs and is checked on its own. Use it when the gradient is taken of a
      loss summed (or averaged) over the vmapped solves, `jax.grad(lambda p:
      jnp.mean(jax.vmap(solve)(p, xs)))`, as in every training step. **Not** for
      per-example gradients, `jax.vmap(jax.grad(...))`: each example would get the
      batch's summed parameter cotangent (a `vmap` rule cannot tell the two apart). See
      the batching guide.

    The method and its reference: [`revdeq_jax.Reversible`][].
    """

    on_mismatch: Literal["raise", "warn", "ignore"] = eqx.field(default="raise", static=True)
    mismatch_rtol: float | None = eqx.field(default=None, static=True)
    report: Callable[[dict[str, Array]], None] | None = eqx.field(default=None, static=True)
    vmap_backward: Literal["batch", "per_example"] = eqx.field(default="per_example", static=True)

    def __check_init__(self):
        if self.vmap_backward not in _VMAP_BACKWARDS:
            raise ValueError(
                f"`ReversibleAdjoint(vmap_backward={self.vmap_backward!r})` must be one of "
                f"{', '.join(repr(p) for p in _VMAP_BACKWARDS)}."
            )
        if self.on_mismatch not in _POLICIES:
            raise ValueError(
                f"`ReversibleAdjoint(on_mismatch={self.on_mismatch!r})` must be one of "
                f"{', '.join(repr(p) for p in _POLICIES)}."
            )
        if self.mismatch_rtol is not None and not self.mismatch_rtol >= 0:
            raise ValueError(
                f"`ReversibleAdjoint(mismatch_rtol={self.mismatch_rtol})` must be None or >= 0."
            )

    def check(self, solver: AbstractSolver) -> None:
        if not isinstance(solver, AbstractReversibleSolver):
            raise ValueError(
                f"`ReversibleAdjoint` can only differentiate a reversible solver, but got "
                f"`solver={type(solver).__name__}(...)`. Use `solver=Reversible(beta)`, or "
                "pick another adjoint for this solver: `ImplicitAdjoint()` (classic DEQ "
                "gradient), `UnrolledAdjoint()` or `CheckpointAdjoint()` (exact, memory "
                "grows with steps)."
            )

    def apply(self, primal: Primal, inputs: Inputs, solver: AbstractSolver) -> LoopResult:
        self.check(solver)
        out = _reversible_solve(inputs, primal, solver, self)
        return eqx.tree_at(lambda r: r.residual, out, jax.lax.stop_gradient(out.residual))


@eqx.filter_custom_vjp
def _reversible_solve(inputs, primal, solver, adjoint):
    del solver, adjoint
    return eqx.tree_at(lambda r: r.state, primal(inputs, in_place_while_loop), None)


@_reversible_solve.def_fwd
def _reversible_solve_fwd(perturbed, inputs, primal, solver, adjoint):
    del perturbed, adjoint
    out = primal(inputs, in_place_while_loop)
    y, z = solver.coupled(out.state)
    return eqx.tree_at(lambda r: r.state, out, None), (y, z, out.num_steps)


@_reversible_solve.def_bwd
def _reversible_solve_bwd(residuals, grad_out, perturbed, inputs, primal, solver, adjoint):
    del perturbed, primal
    y_n, z_n, num_steps = residuals
    fn, args, z0 = inputs
    value_bar = materialise(grad_out.value, z0)
    del grad_out, residuals  # the residual's cotangent is ignored: it is a statistic
    refuse_shared_parameters(fn, args, varying_axes((y_n, z_n, value_bar)))
    with solver.scope():
        y_0, z_0, z0_bar, fn_bar, args_bar = reverse_loop(
            solver,
            fn,
            args,
            z0,
            y_n,
            z_n,
            num_steps,
            value_bar,
            vmap_backward=adjoint.vmap_backward,
        )
        check = solver.reconstruction(y_0, z_0, z0, adjoint.mismatch_rtol)
    if adjoint.report is not None:
        jax.debug.callback(adjoint.report, check)
    if adjoint.on_mismatch != "ignore":
        # A host callback on the two scalars rather than `eqx.error_if` (a `lax.cond`
        # around the gradients): under SPMD the partitioner moved the batch all-reduce of
        # the gradients into that conditional, and the devices deadlocked (measured on 4
        # CPU devices, data-parallel vision step).
        policy = _raise_on_mismatch if adjoint.on_mismatch == "raise" else _warn_on_mismatch
        advice = getattr(solver, "state_dtype", None)
        advice = ft.partial(policy, advice=None if advice is None else advice.mismatch_advice)
        jax.debug.callback(advice, check["mismatch"], check["rel"], check["drift"])
    return fn_bar, args_bar, z0_bar


def _describe(mismatch, rel, drift, advice) -> str:
    mismatch = np.asarray(mismatch)
    rel = np.max(np.where(mismatch, np.asarray(rel), 0))
    drift = float(np.max(np.where(mismatch, np.asarray(drift), 0)))
    specific = _GENERIC_ADVICE if advice is None else advice(drift)
    return (
        f"{MISMATCH_MESSAGE} {specific} {_OTHER_WAYS} (relative deviation of the "
        f"reconstruction: {rel:.3g}; {int(np.sum(mismatch))} of {mismatch.size} solves)"
    )


class ReconstructionMismatchError(RuntimeError):
    """Raised (through the runtime) when a reversible backward pass did not rebuild the
    initial state, under `ReversibleAdjoint(on_mismatch="raise")`."""


def _raise_on_mismatch(mismatch, rel, drift, *, advice) -> None:
    if np.any(np.asarray(mismatch)):
        raise ReconstructionMismatchError(_describe(mismatch, rel, drift, advice))


def _warn_on_mismatch(mismatch, rel, drift, *, advice) -> None:
    if np.any(np.asarray(mismatch)):
        warnings.warn(_describe(mismatch, rel, drift, advice), RuntimeWarning, stacklevel=2)


def reverse_loop(
    solver, fn, args, z0, y_n, z_n, num_steps, value_bar, *, vmap_backward="per_example"
):
    """Algorithm 1: walks `num_steps` steps back from `(y_n, z_n)`, inside the solver's
    scope.

    Returns the reconstructed `(y_0, z_0)`, the cotangent of `z0` (cast to its dtype) and
    the accumulated cotangents of `fn` and `args`.

    Under `jax.vmap` (the backward pass of per-example solves), `vmap_backward="batch"`
    walks the whole batch back in one loop (`_batched_reverse_loop`, through a
    `custom_vmap` rule) instead of letting `vmap` batch the per-example loop
    (`"per_example"`), which carries one cotangent of every shared parameter per example.
    The rule returns the shared leaves' cotangents summed over the batch, not per
    example: it departs from what `vmap` of the loop would give, which is right only
    when the caller sums them anyway (a `grad` taken outside the `vmap`).
    """
    operands = (solver, fn, args, z0, y_n, z_n, num_steps, value_bar)
    if vmap_backward == "per_example":  # the plain loop, batched as `vmap` batches it
        return _reverse_loop(*operands)
    dynamic, static = eqx.partition(operands, eqx.is_array)
    loop = jax.custom_batching.custom_vmap(ft.partial(_reverse_loop_dynamic, static))
    loop.def_vmap(ft.partial(_reverse_loop_vmap_rule, static))
    return loop(dynamic)


def _reverse_loop_dynamic(static, dynamic):
    return _reverse_loop(*eqx.combine(dynamic, static))


def _reverse_loop(solver, fn, args, z0, y_n, z_n, num_steps, value_bar):
    """One solve walked back: `reverse_loop` unbatched."""
    y_bar, z_bar = solver.init_cotangents(value_bar, y_n)
    carry = ReverseCarry(y_n, z_n, y_bar, z_bar, (zeros_like_inexact(fn), zeros_like_inexact(args)))
    return _walk_back(solver, fn, args, z0, carry, num_steps)


def _walk_back(solver, fn, args, z0, carry, num_steps, batch_axes=None):
    """Algorithm 1's loop: undoes `num_steps` steps from `carry`. With `batch_axes =
    (fn_axes, args_axes)`, a batch of solves with per-example `num_steps` (see
    `BackwardBatch`).

    **Returns:** `(y_0, z_0, z0_bar, fn_bar, args_bar)`.
    """

    def _body(loop_carry):
        n, carry = loop_carry
        batch = None if batch_axes is None else BackwardBatch(*batch_axes, active=n > 0)
        carry = solver.backward_step(fn, args, carry, z0, batch=batch)
        return jnp.maximum(n - 1, 0), carry

    init = match_varying(_body, (num_steps, carry), fn, args, z0)
    _, carry = jax.lax.while_loop(lambda c: jnp.any(c[0] > 0), _body, init)
    # y_0 = z_0 = z0, so both cotangents flow into the initial guess.
    z0_bar = tree_cast_like(tree_add(carry.z_bar, carry.y_bar), z0)
    return carry.y, carry.z, z0_bar, *carry.params_bar


def _reverse_loop_vmap_rule(static, axis_size, in_batched, dynamic):
    """The `custom_vmap` rule of `reverse_loop`: `in_batched` says which leaves of
    `dynamic` carry a leading batch axis (of size `axis_size`)."""
    (batched,) = in_batched
    solver = eqx.combine(dynamic, static)[0]
    with solver.scope():  # the rule may run outside the backward pass's own scope
        if any(jtu.tree_leaves(batched[0])):
            # A solver holding per-example arrays: one loop per example, batched by `vmap`.
            axes = jtu.tree_map(lambda b: 0 if b else None, batched)
            out = jax.vmap(ft.partial(_reverse_loop_dynamic, static), in_axes=(axes,))(dynamic)
            return out, jtu.tree_map(lambda _: True, out)
        return _batched_reverse_loop(static, axis_size, batched, dynamic)


def _batched_reverse_loop(static, axis_size, batched, dynamic):
    """`reverse_loop` for a batch of solves at once: one `while_loop` that runs while any
    example has steps left, evaluating `fn` once per half-step on the whole batch, as the
    VJP of the batched function. Cotangents of the leaves the batch shares (the
    parameters) come out summed over the batch, so the loop carries one copy of them, as
    the backward pass of a batched `fn` would; per-example leaves (e.g. the input
    injection) keep their batch axis. Each example moves only while it has steps left
    (masks), so its state, cotangents and reconstruction are those of its own solve."""

    def _broadcast(tree, tree_batched):
        return jtu.tree_map(
            lambda x, b: x if b else jnp.broadcast_to(x, (axis_size, *x.shape)),
            tree,
            tree_batched,
        )

    # Every per-example quantity gets the batch axis; `fn` and `args` keep theirs as given.
    dynamic = (*dynamic[:3], *map(_broadcast, dynamic[3:], batched[3:]))
    solver, fn, args, z0, y_n, z_n, num_steps, value_bar = eqx.combine(dynamic, static)
    fn_axes, args_axes = (jtu.tree_map(lambda b: 0 if b else None, t) for t in batched[1:3])
    y_bar, z_bar = jax.vmap(solver.init_cotangents)(value_bar, y_n)
    carry = ReverseCarry(y_n, z_n, y_bar, z_bar, (zeros_like_inexact(fn), zeros_like_inexact(args)))
    y_0, z_0, z0_bar, fn_bar, args_bar = _walk_back(
        solver, fn, args, z0, carry, num_steps, (fn_axes, args_axes)
    )
    out = (y_0, z_0, z0_bar, fn_bar, args_bar)

    def _is_batched(axes, ct):
        return jtu.tree_map(
            lambda axis, c: None if c is None else axis == 0,
            axes,
            ct,
            is_leaf=lambda x: x is None,
        )

    out_batched = (
        *jtu.tree_map(lambda _: True, out[:3]),
        _is_batched(fn_axes, fn_bar),
        _is_batched(args_axes, args_bar),
    )
    return out, out_batched
