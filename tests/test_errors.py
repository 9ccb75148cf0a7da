"""Every misuse fails at trace time with a message that says what to change."""

import jax
import jax.numpy as jnp
import pytest

import revdeq_jax as rdeq
from revdeq_jax._fixed_point import check_options


fn = lambda z, x: jnp.tanh(z + x)
z0 = jnp.zeros(3)
x = jnp.ones(3)


@pytest.mark.parametrize("beta", [0.0, -0.5, 1.0, 2.0, 2.5])
def test_beta_out_of_range(beta):
    with pytest.raises(ValueError, match="must lie in \\(0, 2\\) and not be 1"):
        rdeq.Reversible(beta=beta)


def test_beta_one_explains_division():
    with pytest.raises(ValueError, match="divides by `1 - beta`"):
        rdeq.Reversible(beta=1.0)


@pytest.mark.parametrize("max_steps", [0, -3])
def test_max_steps_below_one(max_steps):
    with pytest.raises(ValueError, match="`max_steps=.*` must be at least 1"):
        rdeq.fixed_point(fn, z0, x, max_steps=max_steps)
    with pytest.raises(ValueError, match="must be at least 1"):
        rdeq.DEQ(fn, max_steps=max_steps)


# Under the test suite's jaxtyping import hook, annotated type errors are caught by the
# hook before the library's own check, so the library's messages are tested directly.


def test_max_steps_not_int():
    with pytest.raises(TypeError, match="`max_steps` must be a Python int"):
        check_options(rdeq.Reversible(), rdeq.ReversibleAdjoint(), 4.0, 1e-3)
    with pytest.raises(TypeError):
        rdeq.fixed_point(fn, z0, x, max_steps=4.0)


def test_negative_tol():
    with pytest.raises(ValueError, match="`tol=-0.1` must be >= 0"):
        rdeq.fixed_point(fn, z0, x, tol=-0.1)


def test_wrong_structure():
    with pytest.raises(ValueError, match="same PyTree structure as `z0`"):
        rdeq.fixed_point(lambda z, x: (z, z), z0, x)


def test_wrong_shape():
    with pytest.raises(ValueError, match=r"`z0` is float32\[3\] and `fn` returned float32\[2\]"):
        rdeq.fixed_point(lambda z, x: z[:2], z0, x)


def test_wrong_dtype():
    with pytest.raises(ValueError, match=r"`z0` is float32\[3\] and `fn` returned float16\[3\]"):
        rdeq.fixed_point(lambda z, x: z.astype(jnp.float16), z0, x)


def test_integer_z0():
    with pytest.raises(ValueError, match="`z0` must hold real floating arrays"):
        rdeq.fixed_point(lambda z, x: z, jnp.zeros(3, jnp.int32), x)


@pytest.mark.parametrize(
    "solver", [rdeq.Picard(), rdeq.Anderson(), rdeq.Relaxed(0.5), rdeq.Broyden()]
)
def test_reversible_adjoint_needs_reversible_solver(solver):
    with pytest.raises(
        ValueError, match="can only differentiate a reversible solver.*Use `solver=Reversible"
    ):
        rdeq.fixed_point(fn, z0, x, solver=solver, adjoint=rdeq.ReversibleAdjoint())
    with pytest.raises(ValueError, match="can only differentiate a reversible solver"):
        rdeq.DEQ(fn, solver=solver, adjoint=rdeq.ReversibleAdjoint())
    # Without an explicit adjoint, a non-reversible solver gets the implicit one.
    assert rdeq.DEQ(fn, solver=solver).adjoint == rdeq.ImplicitAdjoint()
    assert rdeq.fixed_point(fn, z0, x, solver=solver).value.shape == z0.shape


def test_state_dtype_not_a_float():
    with pytest.raises(ValueError, match="must be a real floating dtype"):
        rdeq.Reversible(0.5, state_dtype=jnp.int32)
    with pytest.raises(ValueError, match="is not a known state"):
        rdeq.Reversible(0.5, state_dtype="float6four")


def test_state_dtype_narrower_than_z0(x64):
    with pytest.raises(ValueError, match="narrower than the dtype float64 of `z0`"):
        rdeq.fixed_point(
            fn,
            jnp.zeros(3, jnp.float64),
            jnp.ones(3, jnp.float64),
            solver=rdeq.Reversible(0.5, state_dtype=jnp.float32),
        )


def test_not_a_solver_or_adjoint():
    with pytest.raises(TypeError, match="`solver` must be a revdeq_jax solver"):
        check_options("reversible", rdeq.ReversibleAdjoint(), 4, 1e-3)
    with pytest.raises(TypeError, match="`adjoint` must be a revdeq_jax adjoint"):
        check_options(rdeq.Reversible(), "reversible", 4, 1e-3)
    with pytest.raises(TypeError):
        rdeq.fixed_point(fn, z0, x, solver="reversible")


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_step'"):
        rdeq.fixed_point(fn, z0, x, max_step=3)
    with pytest.raises(TypeError):
        rdeq.Reversible(betta=0.5)


def test_other_constructor_checks():
    with pytest.raises(ValueError, match="memory `m` must be an int >= 1"):
        rdeq.Anderson(m=0)
    with pytest.raises(ValueError, match="must be an int >= 1"):
        rdeq.PhantomAdjoint(steps=0)
    with pytest.raises(ValueError, match="must lie in \\(0, 1\\]"):
        rdeq.PhantomAdjoint(damping=0.0)
    with pytest.raises(ValueError, match="must be an int >= 1"):
        rdeq.ImplicitAdjoint(max_steps=0)


def test_nonfinite_is_reported_per_example_and_thrown_on_request():
    f = lambda z, x: jnp.log(x) + 0.5 * z  # log of a negative input is NaN

    def solve(x, throw):
        return rdeq.fixed_point(
            f,
            jnp.zeros(2),
            x,
            solver=rdeq.Picard(),
            adjoint=rdeq.UnrolledAdjoint(),
            max_steps=50,
            tol=1e-5,
            throw=throw,
        )

    xs = jnp.array([[1.0, 2.0], [-1.0, 2.0], [3.0, 1.0]])
    sols = jax.vmap(lambda x: solve(x, False))(xs)
    assert list(sols.result == rdeq.RESULTS.successful) == [True, False, True]
    assert list(sols.result == rdeq.RESULTS.nonfinite) == [False, True, False]
    # The good examples are untouched by the bad one.
    assert jnp.all(jnp.isfinite(sols.value[jnp.array([0, 2])]))
    assert int(sols.num_steps[1]) == 0
    with pytest.raises(Exception, match="non-finite value"):
        jax.block_until_ready(jax.vmap(lambda x: solve(x, True))(xs))
    # throw=True does not raise on a good batch.
    jax.block_until_ready(jax.vmap(lambda x: solve(x, True))(xs[jnp.array([0, 2])]))


def test_max_steps_reached_is_reported_not_thrown():
    sol = rdeq.fixed_point(fn, z0, x, max_steps=1, tol=1e-9, throw=True)
    assert sol.result == rdeq.RESULTS.max_steps_reached
    assert not sol.converged
    sol = rdeq.fixed_point(fn, z0, x, max_steps=1, tol=0.0)
    assert sol.result == rdeq.RESULTS.successful  # tol=0 asks for exactly max_steps
    assert int(sol.num_steps) == 1
