"""Every solver x every adjoint that accepts it x state structure x `z0` constant or
differentiated x float32/float64, on the classic problems of `tests/problems.py`.

What is checked, and against what:

* **Values**: a solve to `rtol`, `atol` lands within the error bound of a contraction
  with constant `k` of the fixed point found by Newton's method in float64:
  $\\|z - z^*\\| \\le (\\mathrm{atol} + \\mathrm{rtol}\\|f(z)\\|)/(1-k)$ (RMS norms), plus
  rounding.
* **`ReversibleAdjoint`, `CheckpointAdjoint`** (exact): the gradient of a fixed budget
  of `N_EXACT` steps (so that the cotangent of `z0` is far from 0 and both sides take
  the same steps) equals that of `UnrolledAdjoint`.
* **`UnrolledAdjoint`** itself, against references that share no code with it: for
  `Picard` and `Relaxed`, the same `N_EXACT` steps written out here and differentiated
  by `jax.grad`; for `Anderson` and `Broyden`, central finite differences of the same
  `N_EXACT`-step solve in float64; for `Reversible`, a run of `MAX_STEPS` steps (to
  the rounding floor, where the unrolled derivative has converged too) against the
  implicit gradient (below).
* **`ImplicitAdjoint`**: at convergence, the implicit-function-theorem gradient at the
  Newton fixed point, solved with `jnp.linalg.solve` on the `jax.jacfwd` Jacobian
  (`problems.ift_grad`); the cotangent of `z0` is exactly 0.
* **`PhantomAdjoint(steps=2, damping=0.8)`**: the gradient of two damped steps taken by
  hand from the Newton fixed point held constant; the cotangent of `z0` is exactly 0.

Gradients are compared as ||g - g_ref||_2 <= tol * (||g_ref||_2 + 1) (the "+ 1" is the
gradient scale, the loss weights being O(1), for references near 0 such as linear0's),
with `tol` in `GTOL`, each just above the largest error measured over every problem and
dtype (one-array state, `z0` differentiated), with the measured value beside it.

The default run takes a slice in which every solver x adjoint pair appears once and the
other axes are cycled through; the full product is marked slow.
"""

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import revdeq_jax as rdeq

from .problems import (
    DIM,
    flatten,
    ift_grad,
    newton,
    Problem,
    PROBLEMS,
    STRUCTURES,
    with_structure,
)


SOLVERS = {
    "Picard": rdeq.Picard(),
    "Relaxed": rdeq.Relaxed(0.8),
    "Anderson": rdeq.Anderson(),
    "Broyden": rdeq.Broyden(),
    "Reversible": rdeq.Reversible(0.5),
}
ADJOINTS = ["reversible", "unrolled", "checkpoint", "implicit", "phantom"]
PAIRS = [(s, a) for s in SOLVERS for a in ADJOINTS if a != "reversible" or s == "Reversible"]
PHANTOM = rdeq.PhantomAdjoint(steps=2, damping=0.8)
N_EXACT = 6
MAX_STEPS = 400  # Reversible(0.5) on stiff_linear (k = 0.9) needs ~260 to rtol 1e-10

# Forward tolerances (atol in the units of z, all O(1) here but linear0's 0 and
# robertson's 1e-8 components), and the backward tolerances of ImplicitAdjoint (in
# units of the cotangent cos(z) * w, O(1)).
TOLS = {"float32": (1e-5, 1e-6), "float64": (1e-10, 1e-12)}
# Gradient comparisons: ||g - g_ref||_2 <= GTOL * (||g_ref||_2 + 1); the "+ 1" is the
# gradient scale (the loss weights are O(1)), for references that are ~0 (linear0).
GTOL = {  # each just above the largest error measured (in brackets)
    # Same arithmetic on both sides, or (ReversibleAdjoint in float32) the exact state
    # against a float64 state [float32 1.5e-7, float64 3.9e-15].
    "exact": {"float32": 1e-6, "float64": 1e-13},
    # Forward and backward solved to rtol 1e-5 / 1e-10, times the conditioning
    # 1 / (1 - k) <= 10, plus float32 rounding of the Jacobian products; worst on
    # robertson, whose rates span 0.04 .. 3e7 [1.1e-4, 1.1e-10].
    "implicit": {"float32": 3e-4, "float64": 1e-9},
    # The solver's iterate against the Newton fixed point [2.4e-6, 1.9e-11].
    "phantom": {"float32": 1e-5, "float64": 1e-10},
    # Unrolled to the floor, where the derivative has converged too [6.4e-7, 2.1e-14].
    "floor": {"float32": 2e-6, "float64": 1e-12},
    # float64 central differences with h = 1e-6 (error ~1e-10); a float32 gradient
    # also differs from the float64 one by its rounding [2.0e-6, 5.4e-10].
    "finite_differences": {"float32": 1e-5, "float64": 2e-9},
}


def at_the_floor(problem: str, solver: str, adjoint: str, dtype: str) -> bool:
    """Cases left out of the matrix, because no exact reference exists for them.

    In float32, Anderson and Broyden reach the rounding floor of robertson within 2 of
    the `N_EXACT` steps. The exact derivative of their updates there is that of
    rounding noise (ratios of rounding-level differences): two exact adjoints of the
    same steps, compiled differently, disagree by O(1) (Anderson: 0.98 relative at 6
    steps, 800 at 4) and Broyden's overflows to NaN (at 3 steps). Their docstrings
    point to `ImplicitAdjoint`, which the matrix checks on this case.
    """
    return (
        problem == "robertson"
        and dtype == "float32"
        and solver in ("Anderson", "Broyden")
        and _mode(solver, adjoint) in ("vs_unrolled", "finite_differences")
    )


def _adjoint(name: str, dtype) -> rdeq.AbstractAdjoint:
    rtol, atol = TOLS[jnp.dtype(dtype).name]
    return {
        "reversible": rdeq.ReversibleAdjoint(),
        "unrolled": rdeq.UnrolledAdjoint(),
        "checkpoint": rdeq.CheckpointAdjoint(),
        "implicit": rdeq.ImplicitAdjoint(rtol=rtol, atol=atol, max_steps=200),
        "phantom": PHANTOM,
    }[name]


def _weights(dtype):
    return jnp.linspace(0.5, 1.5, DIM, dtype=dtype)


def _loss_fn(fn, w, solver, adjoint, **kw):
    def loss(args, z0):
        sol = rdeq.fixed_point(fn, z0, args, solver=solver, adjoint=adjoint, **kw)
        return jnp.sum(jnp.sin(flatten(sol.value)) * w), sol

    return loss


def _grad(loss, args, z0, diff_z0: bool):
    argnums = (0, 1) if diff_z0 else 0
    grads, sol = eqx.filter_jit(jax.grad(loss, argnums=argnums, has_aux=True))(args, z0)
    return (grads if diff_z0 else (grads, None)), sol


def _close(got, ref, tol, what):
    got = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jtu.tree_leaves(got)])
    ref = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jtu.tree_leaves(ref)])
    _within(np.linalg.norm(got - ref) / (np.linalg.norm(ref) + 1), tol, what)


def _within(err: float, tol: float, what: str) -> None:
    assert err <= tol, f"{what}: error {err:.2e} > {tol:.0e}"


def _by_hand(problem: Problem, solver_name: str, args, z0, n: int):
    """`n` steps of Picard / Relaxed(0.8) written out, on the flat state."""
    z = z0
    for _ in range(n):
        fz = problem.fn(z, args)
        z = fz if solver_name == "Picard" else 0.2 * z + 0.8 * fz
    return z


def _mode(solver_name: str, adjoint_name: str) -> str:
    """Which reference a solver x adjoint pair is checked against (see the docstring)."""
    if adjoint_name in ("reversible", "checkpoint"):
        return "vs_unrolled"
    if adjoint_name == "unrolled":
        if solver_name in ("Picard", "Relaxed"):
            return "by_hand"
        # The derivative of Anderson's weights or Broyden's update at the rounding floor
        # is noise (Broyden's overflows to NaN): compare a short budget with finite
        # differences instead. Reversible's linear iteration is differentiated to the
        # floor, where its unrolled gradient is the implicit one.
        return "floor" if solver_name == "Reversible" else "finite_differences"
    return adjoint_name  # "implicit", "phantom"


def run_case(problem_name, solver_name, adjoint_name, structure, diff_z0, dtype_name):
    problem = PROBLEMS[problem_name]
    template = STRUCTURES[structure] if isinstance(structure, str) else structure
    dtype = jnp.dtype(dtype_name)
    rtol, atol = TOLS[dtype_name]
    mode = _mode(solver_name, adjoint_name)
    solver = SOLVERS[solver_name]
    adjoint = _adjoint(adjoint_name, dtype)
    fixed = dict(max_steps=N_EXACT, rtol=0.0, atol=0.0)
    z_star = newton(problem)
    with jax.enable_x64(dtype == jnp.float64):
        fn = with_structure(problem, template)
        args = problem.args(dtype)
        z0 = template(problem.start(dtype))
        w = _weights(dtype)

        # Values, from a solve to the tolerances (for the approximate adjoints also the
        # solve whose gradient is checked).
        loss = _loss_fn(fn, w, solver, adjoint, max_steps=MAX_STEPS, rtol=rtol, atol=atol)
        if mode in ("implicit", "phantom"):
            (g_args, g_z0), sol = _grad(loss, args, z0, diff_z0)
        else:
            sol = eqx.filter_jit(loss)(args, z0)[1]
        assert sol.result == rdeq.RESULTS.successful, sol.result
        assert jtu.tree_structure(sol.value) == jtu.tree_structure(z0)
        for v, z in zip(jtu.tree_leaves(sol.value), jtu.tree_leaves(z0), strict=True):
            assert v.dtype == z.dtype and v.shape == z.shape
        z = np.asarray(flatten(sol.value), np.float64)
        rms = lambda v: np.sqrt(np.mean(np.square(v)))
        bound = (atol + rtol * rms(z_star)) / (1 - problem.k)
        # The exact state rounds to a 2**-32 grid; float rounding of f: a few ulps.
        floor = 2.0**-32 + 8 * float(jnp.finfo(dtype).eps) * np.max(np.abs(z_star))
        assert rms(z - z_star) <= 1.1 * bound + floor, (rms(z - z_star), bound)

        if mode in ("vs_unrolled", "by_hand", "finite_differences"):
            budget_loss = _loss_fn(fn, w, solver, adjoint, **fixed)
            (g_args, g_z0), _ = _grad(budget_loss, args, z0, diff_z0)
        elif mode == "floor":
            budget = dict(max_steps=MAX_STEPS, rtol=0.0, atol=0.0)
            floor_loss = _loss_fn(fn, w, solver, adjoint, **budget)
            (g_args, g_z0), _ = _grad(floor_loss, args, z0, diff_z0)
        if diff_z0:
            assert jtu.tree_structure(g_z0) == jtu.tree_structure(z0)

        if mode == "by_hand":

            def ref_loss(args, z0):
                v = _by_hand(problem, solver_name, args, flatten(z0), N_EXACT)
                return jnp.sum(jnp.sin(v) * w), None

            (r_args, r_z0), _ = _grad(ref_loss, args, z0, diff_z0)
        elif mode == "vs_unrolled":
            ref_solver = solver
            if solver_name == "Reversible" and dtype == jnp.float32:
                # ReversibleAdjoint runs the exact state; the differentiable reference
                # closest to it is a float64 state (test_exactness.py: they agree to
                # 1e-5 with a float32 fn).
                ref_solver = rdeq.Reversible(0.5, state_dtype=jnp.float64)
            ref = _loss_fn(fn, w, ref_solver, rdeq.UnrolledAdjoint(), **fixed)
            (r_args, r_z0), _ = _grad(ref, args, z0, diff_z0)
    if mode in ("by_hand", "vs_unrolled"):
        tol = GTOL["exact"][dtype_name]
        _close(g_args, r_args, tol, "args")
        if diff_z0:
            _close(g_z0, r_z0, tol, "z0")
    elif mode == "finite_differences":
        _check_finite_differences(problem, fn, solver, template, g_args, g_z0, dtype_name)
    else:
        z_bar = np.cos(z_star) * np.linspace(0.5, 1.5, DIM)
        if mode == "phantom":
            r_args = _phantom_grad(problem, z_star)
        else:  # implicit; floor: the unrolled gradient of the run to the floor
            r_args = ift_grad(problem, z_bar)
        _close(g_args, r_args, GTOL[mode][dtype_name], "args")
        if diff_z0 and mode in ("implicit", "phantom"):  # the IFT gradient ignores z0
            assert all(np.all(np.asarray(g) == 0) for g in jtu.tree_leaves(g_z0))


def _phantom_grad(problem: Problem, z_star: np.ndarray):
    """Gradient of `PHANTOM.steps` damped steps from the fixed point held constant."""
    with jax.enable_x64(True):
        w = jnp.linspace(0.5, 1.5, DIM, dtype=jnp.float64)

        def phantom(args):
            v = jnp.asarray(z_star)
            for _ in range(PHANTOM.steps):
                v = (1 - PHANTOM.damping) * v + PHANTOM.damping * problem.fn(v, args)
            return jnp.sum(jnp.sin(v) * w)

        return jax.grad(phantom)(problem.args(jnp.float64))


def _check_finite_differences(problem, fn, solver, template, g_args, g_z0, dtype_name):
    """The directional derivative of the `N_EXACT`-step loss along a fixed direction of
    (args, z0), against central differences of the same solve in float64."""
    with jax.enable_x64(True):
        args = problem.args(jnp.float64)
        z0 = problem.start(jnp.float64)
        w = _weights(jnp.float64)
        rng = np.random.default_rng(0)
        d_args = tuple(rng.standard_normal(np.shape(a)) * np.abs(a) for a in args)
        d_z0 = rng.standard_normal(DIM) if g_z0 is not None else np.zeros(DIM)
        norm = np.sqrt(sum(np.sum(d**2) for d in d_args) + np.sum(d_z0**2))
        loss = _loss_fn(fn, w, solver, rdeq.UnrolledAdjoint(), max_steps=N_EXACT, rtol=0.0)

        @jax.jit
        def at(h):
            a = tuple(x + h * d / norm for x, d in zip(args, d_args))
            return loss(a, template(z0 + h * d_z0 / norm))[0]

        h = 1e-6  # central differences: truncation ~h**2, rounding ~1e-16 / h
        fd = (at(h) - at(-h)) / (2 * h)
    directional = sum(np.sum(np.asarray(g, np.float64) * d / norm) for g, d in zip(g_args, d_args))
    if g_z0 is not None:
        directional += np.sum(np.asarray(flatten(g_z0), np.float64) * d_z0 / norm)
    err = abs(directional - float(fd)) / (abs(float(fd)) + 1)
    _within(err, GTOL["finite_differences"][dtype_name], "finite differences")


# --- the matrix ------------------------------------------------------------------------

_AXES = dict(
    problem=list(PROBLEMS),
    structure=list(STRUCTURES),
    diff_z0=[False, True],
    dtype=["float32", "float64"],
)
FULL = [
    (p, s, a, st_, d0, dt) for (s, a), p, st_, d0, dt in itertools.product(PAIRS, *_AXES.values())
]


def _slice():
    """Every solver x adjoint pair once; the other axes cycled with coprime strides so
    that every value of every axis appears."""
    cases = []
    for i, (s, a) in enumerate(PAIRS):
        cases.append(
            (
                _AXES["problem"][i % 6],
                s,
                a,
                _AXES["structure"][(i // 2) % 4],
                _AXES["diff_z0"][(i // 3) % 2],
                _AXES["dtype"][i % 2],
            )
        )
    return cases


SLICE = _slice()
_ids = lambda c: "-".join([c[0], c[1], c[2], c[3], "dz0" if c[4] else "z0", c[5]])


@pytest.mark.parametrize("case", SLICE, ids=[_ids(c) for c in SLICE])
def test_slice(case):
    assert not at_the_floor(*case[:3], case[5])
    run_case(*case)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", [c for c in FULL if c not in SLICE and not at_the_floor(*c[:3], c[5])], ids=_ids
)
def test_full(case):
    run_case(*case)
