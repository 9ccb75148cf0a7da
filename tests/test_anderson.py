"""`Anderson` is safeguarded: never NaN on a contraction, and still fast."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import revdeq_jax as rdeq

from .problems import newton, PROBLEMS


slow = pytest.mark.slow


def _solve(problem, dtype, solver, **kw):
    return rdeq.fixed_point(
        problem.fn, problem.start(dtype), problem.args(dtype), solver=solver, **kw
    )


# Run past convergence on a fixed budget (rtol = atol = 0, as DEQs are often run): the
# residuals reach the precision floor (or underflow towards a fixed point at 0) and
# become collinear. Plain Anderson mixing returned NaN here on 5 of the 6 problems in
# float32 (linear0 after 34 steps, mlp 212, stiff_linear 61, robertson 116) and on
# linear0 and mlp in float64.
_CASES = [
    (name, dtype, marks)
    for name in PROBLEMS
    for dtype, marks in [("float32", ()), ("float64", slow)]
]


@pytest.mark.parametrize("name, dtype", [pytest.param(n, d, marks=m) for n, d, m in _CASES])
@pytest.mark.parametrize(
    "solver", [rdeq.Anderson(), pytest.param(rdeq.Anderson(3, 0.5), marks=slow)]
)
def test_no_nan_past_convergence(name, dtype, solver):
    problem = PROBLEMS[name]
    dtype = jnp.dtype(dtype)
    with jax.enable_x64(dtype == jnp.float64):
        sol = _solve(problem, dtype, solver, max_steps=300, rtol=0.0)
        assert sol.result == rdeq.RESULTS.successful
        assert int(sol.num_steps) == 300
        z = np.asarray(sol.value, np.float64)
    ref = newton(problem)
    # Converged to the floor: error a few ulps of the solution's scale, amplified by at
    # most 1 / (1 - k) <= 10 (measured: <= 9e-8 in float32, 2e-16 in float64).
    eps = float(jnp.finfo(dtype).eps)
    assert np.max(np.abs(z - ref)) <= 10 / (1 - problem.k) * eps * max(np.max(np.abs(ref)), 1e-30)


def test_no_nan_at_a_zero_fixed_point_with_the_relative_test(x64):
    """The relative residual never falls on f(z) = A z; plain Anderson mixing met the
    underflow of its residuals after 256 steps and returned NaN. Now it runs out of steps
    at 0 (or stops when the iterate reaches exactly 0)."""
    sol = _solve(PROBLEMS["linear0"], jnp.float64, rdeq.Anderson(), max_steps=400, rtol=1e-8)
    assert sol.result != rdeq.RESULTS.nonfinite
    assert np.max(np.abs(np.asarray(sol.value))) <= 1e-150


@pytest.mark.parametrize("scale", [1e-25, 1.0, 1e25])
def test_scale_invariance(scale):
    """Anderson mixing is invariant under z -> s z (the weights depend on ratios of
    residuals only). Before the least-squares system was normalised, s = 1e-25 in float32
    underflowed its squared residuals and gave NaN."""
    a = jnp.linspace(0.5, 1.0, 6)
    fn = lambda z, s: s * a * jnp.cos(z / s)
    s = jnp.asarray(scale, jnp.float32)
    sol = rdeq.fixed_point(fn, jnp.zeros(6), s, solver=rdeq.Anderson(), max_steps=50, rtol=1e-5)
    ref = rdeq.fixed_point(
        fn, jnp.zeros(6), jnp.float32(1), solver=rdeq.Anderson(), max_steps=50, rtol=1e-5
    )
    assert sol.result == rdeq.RESULTS.successful
    assert abs(int(sol.num_steps) - int(ref.num_steps)) <= 1
    # Both converged to rtol 1e-5 on a contraction with k <= 0.68: relative error <= 4e-5.
    np.testing.assert_allclose(np.asarray(sol.value) / scale, ref.value, rtol=4e-5)


def test_restart_from_the_best_iterate():
    """A non-finite latest residual (or one grown `restart` times over the best) empties
    the memory and takes the relaxed step from the best iterate."""
    solver = rdeq.Anderson(beta=0.5)
    fn = lambda z, _: 0.5 * z
    z0 = jnp.array([1.0, 2.0])
    state = solver.init(fn, z0, None)
    nan = jnp.full(2, jnp.nan)
    bad = eqx.tree_at(lambda s: (s.z, s.fz, s.res), state, (nan, nan, jnp.asarray(jnp.inf)))
    new = solver.step(fn, bad, None)
    assert bool(new.restarted)
    np.testing.assert_allclose(new.z, 0.5 * z0 + 0.5 * fn(z0, None), rtol=1e-7)  # 0.75 z0
    np.testing.assert_allclose(solver.current(new)[0], new.z)  # and it is the new best
    grown = eqx.tree_at(lambda s: (s.z, s.fz, s.res), state, (100 * z0, 50 * z0, 50 * state.res))
    assert bool(solver.step(fn, grown, None).restarted)
    assert not bool(solver.step(fn, state, None).restarted)


def test_still_accelerates(x64):
    """The safeguards leave Anderson's acceleration intact: on the stiff implicit-midpoint
    step (contraction 0.9) Picard takes 143 steps to rtol 1e-8, Anderson 12 (measured)."""
    problem = PROBLEMS["stiff_linear"]
    picard = _solve(problem, jnp.float64, rdeq.Picard(), max_steps=500, rtol=1e-8)
    anderson = _solve(problem, jnp.float64, rdeq.Anderson(), max_steps=500, rtol=1e-8)
    assert anderson.result == picard.result == rdeq.RESULTS.successful
    assert 4 * int(anderson.num_steps) <= int(picard.num_steps)
    np.testing.assert_allclose(anderson.value, newton(problem), rtol=1e-7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(m=0), "memory `m` must be an int >= 1"),
        (dict(beta=0.0), "must lie in \\(0, 1\\]"),
        (dict(ridge=-1.0), "must be >= 0 and finite"),
        (dict(restart=1.0), "must be > 1"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rdeq.Anderson(**kwargs)


def test_unrolled_gradient_finite_at_a_zero_fixed_point(x64):
    """Autodiff through Anderson run to a fixed point at 0: the chain rule through the
    residuals' normalisation g / max|g| formed g / max|g|**2, which overflows as g
    underflows (NaN gradient after 300 steps). The weights do not depend on the scale,
    so it carries no gradient; the gradient is then that of A^N z0 ~ 0."""
    problem = PROBLEMS["linear0"]

    def loss(args):
        sol = rdeq.fixed_point(
            problem.fn,
            problem.start(jnp.float64),
            args,
            solver=rdeq.Anderson(),
            adjoint=rdeq.UnrolledAdjoint(),
            max_steps=300,
            rtol=0.0,
        )
        return jnp.sum(jnp.sin(sol.value))

    (grad,) = jax.grad(loss)(problem.args(jnp.float64))
    assert np.all(np.isfinite(grad))
    assert np.max(np.abs(grad)) <= 1e-100
