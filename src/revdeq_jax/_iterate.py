"""The one loop that drives every solver, its stopping test, and the loops an adjoint may
run it with.

`iterate` is the primal computation. It is written once; an adjoint decides how it is
run and differentiated by handing it a `while_loop`: `lax_while_loop` (not
reverse-differentiable, constant memory), `unrolled_while_loop` (a masked `lax.scan`
that reverse-mode autodiff stores step by step) or `checkpointed_while_loop` (Equinox's
online recursive checkpointing).
"""

import functools as ft
import math
import numbers
from collections.abc import Callable
from typing import Any, TypeAlias

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.custom_batching
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._custom_types import Args, Fn, Z
from ._misc import residual_norm, tree_rms
from ._solver.base import AbstractSolver


Inputs: TypeAlias = tuple[Fn, Args, Z]  # (fn, args, z0): what gradients flow to
WhileLoop: TypeAlias = Callable[..., Any]  # (cond, body, init, *, max_steps, append_only) -> carry


def lax_while_loop(cond, body, init, *, max_steps: int, append_only=None):
    """`lax.while_loop`: stops as soon as `cond` fails; forward-mode autodiff only."""
    del max_steps, append_only
    return jax.lax.while_loop(cond, body, init)


def in_place_while_loop(cond, body, init, *, max_steps: int, append_only=None):
    """`lax_while_loop`, with a `vmap` rule that leaves the carry's `append_only` leaves
    unmasked.

    `vmap` batches a `lax.while_loop` whose stopping test differs between examples as
    one loop that runs while any example runs, keeping the stopped examples' carry with a
    `select(active, body(carry), carry)` on *every* leaf; each select needs the old and
    the new leaf at once, so XLA copies the leaf every step instead of updating it in
    place. For a leaf that grows with the number of steps (an exact state's information
    buffer) that copy is as large as the buffer. Leaves marked in `append_only` (a tree
    of bools shaped like `init`, see `AbstractSolver.append_only`) are written only at
    positions a solve has not used, so the stopped examples may take the step: this
    rule takes `body(carry)` for them unmasked, and they are updated in place. Every
    other leaf is masked as `vmap` would.
    """
    del max_steps
    if append_only is None or not any(jtu.tree_leaves(append_only)):
        return jax.lax.while_loop(cond, body, init)
    # Inside `shard_map`, `vmap` masks every leaf by a per-device `active`, so all of them
    # vary over the mesh in the batched loop: make them so before `cond` and `body` are
    # traced for it (their closure-converted jaxprs keep the varying axes they saw).
    init = _cast_varying(init, varying_axes(init))
    # `custom_vmap` needs every batched value as an operand: closed-over tracers (the
    # parameters, `args`) become the closure-converted functions' array leaves.
    cond = eqx.filter_closure_convert(cond, init)
    body = eqx.filter_closure_convert(body, init)
    dynamic, static = eqx.partition((cond, body, init), eqx.is_array)
    loop = jax.custom_batching.custom_vmap(ft.partial(_while_loop_dynamic, static))
    # `vmap` may call the rule after the caller's 64-bit scope (the solver's, see
    # `AbstractSolver.scope`) has closed: the rule re-enters the setting of the call.
    x64 = bool(jax.config.read("jax_enable_x64"))
    loop.def_vmap(ft.partial(_in_place_vmap_rule, static, append_only, x64))
    return loop(dynamic)


def _while_loop_dynamic(static, dynamic):
    cond, body, init = eqx.combine(dynamic, static)
    return jax.lax.while_loop(lambda c: cond(c), lambda c: body(c), init)


def _in_place_vmap_rule(static, append_only, x64, axis_size, in_batched, dynamic):
    """The `vmap` rule of `in_place_while_loop`: one loop while any example is active."""
    with jax.enable_x64(x64):
        return _in_place_batched_loop(static, append_only, axis_size, in_batched, dynamic)


def _in_place_batched_loop(static, append_only, axis_size, in_batched, dynamic):
    (batched,) = in_batched
    cond_batched, body_batched, init_batched = batched
    init = jtu.tree_map(
        lambda x, b: x if b else jnp.broadcast_to(x, (axis_size, *x.shape)),
        dynamic[2],
        init_batched,
    )
    cond, body, _ = eqx.combine(dynamic, static)
    _, _, init_static = static

    def _vmapped(f, f_batched):
        f_dynamic, f_static = eqx.partition(f, eqx.is_array)
        axes = jtu.tree_map(lambda b: 0 if b else None, f_batched)

        def _one(f_dynamic, carry):
            return eqx.combine(f_dynamic, f_static)(eqx.combine(carry, init_static))

        return jax.vmap(_one, in_axes=(axes, 0))

    active_of = ft.partial(_vmapped(cond, cond_batched), eqx.filter(cond, eqx.is_array))
    step_of = ft.partial(_vmapped(body, body_batched), eqx.filter(body, eqx.is_array))
    keep = jtu.tree_leaves(append_only)

    def _body(carry):
        active = active_of(carry)
        new = eqx.filter(step_of(carry), eqx.is_array)
        new_leaves, treedef = jtu.tree_flatten(new)
        old_leaves = jtu.tree_leaves(carry)
        out = [
            n if k else jnp.where(active.reshape(active.shape + (1,) * (n.ndim - 1)), n, o)
            for n, o, k in zip(new_leaves, old_leaves, keep, strict=True)
        ]
        return jtu.tree_unflatten(treedef, out)

    # Masking by a per-device `active` makes even the step counter vary over the mesh.
    init = match_varying(_body, init, dynamic)
    out = jax.lax.while_loop(lambda c: jnp.any(active_of(c)), _body, init)
    return out, jtu.tree_map(lambda _: True, out)


def _varying(x) -> frozenset:
    """The mesh axes over which `x` (an array, tracer or `ShapeDtypeStruct`) varies inside
    `jax.shard_map`; empty elsewhere."""
    t = x if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x)
    manual = getattr(t, "manual_axis_type", None)
    return frozenset(manual.varying) if manual is not None else frozenset()


def _arrays(tree: PyTree) -> list:
    return [x for x in jtu.tree_leaves(tree) if eqx.is_array(x)]


def varying_axes(tree: PyTree) -> frozenset:
    """The `shard_map` mesh axes over which any array leaf of `tree` varies."""
    return frozenset().union(*map(_varying, _arrays(tree)))


def refuse_shared_parameters(fn: PyTree, args: PyTree, axes: frozenset) -> None:
    """Raises if, inside `jax.shard_map` (`axes` the mesh axes the solve's state varies
    over), `fn` or `args` holds a floating array the devices share.

    A backward pass that walks the solve back step by step differentiates `fn` with
    respect to it in every step. For a shared array JAX sums that cotangent over the
    devices (a collective) right there, inside the loop; per-device solves take different
    numbers of steps, so the devices would wait for each other forever.
    """
    if not axes:
        return
    shared = [
        (jtu.keystr(path), sorted(axes - _varying(x)))
        for path, x in jtu.tree_flatten_with_path((fn, args))[0]
        if eqx.is_inexact_array(x) and axes - _varying(x)
    ]
    if shared:
        names = ", ".join(f"{p} (shared over {a})" for p, a in shared[:4])
        more = f" and {len(shared) - 4} more" if len(shared) > 4 else ""
        axis = sorted(axes)[0]
        raise ValueError(
            "A reversible backward pass inside `jax.shard_map` differentiates `fn` step by "
            "step with respect to arrays the devices share, which would sum their "
            "cotangents over the devices inside its loop; the devices' solves stop after "
            "different numbers of steps, so they would deadlock. Shared: "
            f"{names}{more} (as `(fn, args)` leaves; `fn` closure-converted, so `[0]` "
            "lists the arrays it holds or closes over). Mark them per-device before the "
            f"solve, e.g. `params = jax.lax.pcast(params, {axis!r}, to='varying')` inside "
            "the `shard_map`: the gradient still comes out summed over the devices, once. "
            "Or use `jax.shard_map(..., check_vma=False)`."
        )


def _cast_varying(tree: PyTree, axes: frozenset) -> PyTree:
    """Every array leaf of `tree` marked varying over `axes` (a no-op on the data)."""

    def cast(x):
        missing = axes - _varying(x) if eqx.is_array(x) else frozenset()
        return jax.lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x

    return jtu.tree_map(cast, tree)


def match_varying(body: Callable[[PyTree], PyTree], init: PyTree, *inputs: PyTree) -> PyTree:
    """`init`, with every leaf marked varying over the `shard_map` mesh axes its `body`
    output varies over.

    A loop carry's leaves created from constants (an exact state's buffer, Anderson's
    history, the step counter) are the same on every device, while `body` makes them
    depend on per-device data: inside `jax.shard_map`, `lax.while_loop` and `lax.scan`
    need the carry's types, varying axes included, equal in and out. Casting the
    initial values (a no-op on the data) makes them so. Outside `shard_map`, or when no
    leaf of `inputs` or `init` varies, `init` is returned as it is, untraced.
    """
    if not any(_varying(x) for x in _arrays((init, inputs))):
        return init
    for _ in range(len(jtu.tree_leaves(init)) + 1):  # each round marks at least one leaf
        out = jax.eval_shape(body, init)
        missing = jtu.tree_map(lambda x, o: _varying(o) - _varying(x), init, out)
        if not any(jtu.tree_leaves(missing, is_leaf=lambda m: isinstance(m, frozenset))):
            return init
        init = jtu.tree_map(
            lambda x, m: jax.lax.pcast(x, tuple(sorted(m)), to="varying") if m else x,
            init,
            missing,
            is_leaf=lambda m: isinstance(m, frozenset),
        )
    return init


def unrolled_while_loop(cond, body, init, *, max_steps: int, append_only=None):
    """A `lax.scan` over `max_steps` steps, those after `cond` fails masked out: the
    value of `lax_while_loop`, and reverse-mode autodiff stores every step."""
    del append_only

    def _step(carry, _):
        active = cond(carry)
        new = body(carry)
        return jtu.tree_map(lambda a, b: jnp.where(active, a, b), new, carry), None

    out, _ = jax.lax.scan(_step, init, None, length=max_steps)
    return out


def checkpointed_while_loop(cond, body, init, *, max_steps: int, append_only=None):
    """Equinox's checkpointed while loop: reverse-differentiable in O(log max_steps)
    memory, recomputing steps on the backward pass."""
    del append_only
    return eqxi.while_loop(cond, body, init, max_steps=max_steps, kind="checkpointed")


def check_tolerances(
    rtol: object,  # anything: this is the check that they are floats
    atol: object,
    tol: object,
    *,
    default_rtol: float,
    owner: str,
) -> tuple[float, float]:
    """Trace-time checks of the tolerances of `owner` (e.g. `"fixed_point"`), and the
    `(rtol, atol)` they resolve to.

    `tol` is an alias of `rtol` (the name the paper and the first versions of this
    library use); giving both is an error. `atol=None` means 0.
    """
    if tol is not None and rtol is not None:
        raise TypeError(
            f"`{owner}` got both `tol={tol}` and `rtol={rtol}`: `tol` is another name for "
            "the relative tolerance `rtol`. Pass only one of them."
        )
    rtol_name = "tol" if tol is not None else "rtol"
    rtol = tol if tol is not None else (default_rtol if rtol is None else rtol)
    atol = 0.0 if atol is None else atol
    for name, value in ((rtol_name, rtol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"`{owner}(..., {name}=...)` must be a Python float, got "
                f"{type(value).__name__}. Tolerances are static: to change them without "
                "recompiling is not supported."
            )
        if not (0 <= value < math.inf):
            raise ValueError(
                f"`{name}={value}` must be >= 0 and finite. `{owner}` stops once "
                "||f(z) - z|| <= atol + rtol * ||f(z)|| (RMS norms); `rtol=0, atol=0` "
                "runs exactly `max_steps` steps."
            )
    return float(rtol), float(atol)


def has_stopping_test(rtol: float, atol: float) -> bool:
    """Whether the loop may stop early: `rtol = atol = 0` asks for exactly `max_steps`
    steps (a fixed compute budget, as DEQs are often trained)."""
    return rtol > 0 or atol > 0


def stopping_test(
    z: PyTree, fz: PyTree, rtol: float, atol: float
) -> tuple[Bool[Array, ""], Float[Array, ""], Float[Array, ""], Bool[Array, ""]]:
    r"""The stopping test of every solver, written once.

    The iterate $z$ has converged when

    $\|f(z) - z\|_\mathrm{rms} \le \mathrm{atol} + \mathrm{rtol}\,\|f(z)\|_\mathrm{rms}$,

    with $\|v\|_\mathrm{rms} = \|v\|_2/\sqrt{n}$ over all $n$ elements of the PyTree
    (so `atol` is a per-element size, whatever the size of the state, and `rtol` bounds
    the familiar relative residual $\|f(z) - z\|_2 / \|f(z)\|_2$). `atol` is what
    stops a solve whose fixed point is at or near 0, where the relative residual does not
    decrease as $z$ converges. With `rtol = atol = 0` it never passes.

    **Returns:** `(converged, abs_residual, rel_residual, finite)`, where the relative
    residual is 0 when $f(z) = z = 0$ and `finite` says whether both $z$ and $f(z)$ are.
    """
    # Statistics, not differentiated (the norm's derivative at 0 is infinite).
    z, fz = jax.lax.stop_gradient((z, fz))
    diff = residual_norm(z, fz)
    size = tree_rms(fz)
    rel = diff / jnp.maximum(size, jnp.finfo(size.dtype).tiny)
    finite = jnp.isfinite(diff) & jnp.isfinite(size)
    if has_stopping_test(rtol, atol):
        converged = finite & (diff <= atol + rtol * size)
    else:
        converged = jnp.zeros((), bool)
    return converged, diff, rel, finite


class LoopResult(eqx.Module):
    """What a run of the loop produced, before it is dressed up as a `Solution`."""

    value: PyTree
    num_steps: Int[Array, ""]
    residual: Float[Array, ""]  # relative: ||f(z) - z|| / ||f(z)||
    abs_residual: Float[Array, ""]  # ||f(z) - z||_rms
    converged: Bool[Array, ""]
    finite: Bool[Array, ""]
    nfe: Int[Array, ""]
    state: Any = None  # the final solver state; dropped before leaving custom VJPs


Primal: TypeAlias = Callable[[Inputs, WhileLoop], LoopResult]
"""`primal(inputs, while_loop)`: `iterate` with the solver and tolerances bound, what an
adjoint is handed to run."""


def iterate(
    inputs: Inputs,
    while_loop: WhileLoop,
    *,
    solver: AbstractSolver,
    max_steps: int,
    rtol: float,
    atol: float,
    step_budget: Int[Array, ""] | None = None,
) -> LoopResult:
    """Runs `solver` from `z0` until `stopping_test` passes, a non-finite value appears,
    or `max_steps` steps are taken (or `step_budget` steps, when given).

    `inputs = (fn, args, z0)`; `solver` must already be prepared
    (`solver.prepare(z0, max_steps)`). `max_steps` is the static ceiling that sizes the
    loop (the length of the unrolled scan, the checkpointing schedule); `step_budget`, an
    int32 scalar already clamped to `[0, max_steps]` (see `check_step_budget`), is a
    runtime limit below it: changing its value does not change the compiled program.
    """
    fn, args, z0 = inputs
    with solver.scope():
        state0 = solver.init(fn, z0, args)

        def _test(state):
            return stopping_test(*solver.current(state), rtol, atol)

        limit = max_steps if step_budget is None else step_budget

        def _cond(carry):
            n, state = carry
            converged, _, _, finite = _test(state)
            return (n < limit) & finite & ~converged

        def _body(carry):
            n, state = carry
            return n + 1, solver.step(fn, state, args)

        init = match_varying(_body, (jnp.zeros((), jnp.int32), state0), inputs)
        append_only = (False, solver.append_only(state0))
        n, state = while_loop(_cond, _body, init, max_steps=max_steps, append_only=append_only)
        converged, diff, rel, finite = _test(state)
        value, _ = solver.current(state)
        return LoopResult(
            value=value,
            num_steps=n,
            residual=rel.astype(jnp.float32),
            abs_residual=diff.astype(jnp.float32),
            converged=converged,
            finite=finite,
            nfe=(1 + solver.nfe_per_step * n).astype(jnp.int32),
            state=state,
        )


class BoundIterate(eqx.Module):
    """`iterate` with everything but `(inputs, while_loop)` bound: the `primal` an adjoint
    is handed and runs as `primal(inputs, while_loop)`.

    A Module rather than a `functools.partial` so that the runtime `step_budget` is an
    array *leaf*: Equinox's custom-VJP wrappers pass it through as a non-differentiable
    dynamic input (it is an integer array), so a new value of the budget is a new input
    of the same compiled program, never a new static argument or a closed-over tracer.
    """

    solver: AbstractSolver
    max_steps: int = eqx.field(static=True)
    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    step_budget: Int[Array, ""] | None = None

    def __call__(self, inputs: Inputs, while_loop: WhileLoop) -> LoopResult:
        return iterate(
            inputs,
            while_loop,
            solver=self.solver,
            max_steps=self.max_steps,
            rtol=self.rtol,
            atol=self.atol,
            step_budget=self.step_budget,
        )
