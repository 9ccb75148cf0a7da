"""The reversible backward pass under `jax.vmap` walks the whole batch back in one loop
(`ReversibleAdjoint(vmap_backward="batch")`): `fn` is evaluated once per half-step as the
VJP of the batched function, so the cotangents of shared parameters are summed over the
batch as they arrive instead of being carried once per example, while each example still
stops, reverses and is checked on its own. That sum is what the gradient of a loss summed
over the vmapped solves needs (`grad` outside `vmap`), and what per-example gradients
(`vmap` of `grad`) must not get: there the default, `"per_example"`, is right.

References: the float64 unrolled gradient (autodiff through the stored loop, everything
in float64), each example solved alone, and the per-example rule
(`vmap_backward="per_example"`, the batched per-example loop this replaces).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import revdeq_jax as rdeq

from .helpers import float64_unrolled, ReportRecorder, tree_rel_error
from .unseen_blocks import perturbed_in_vjp, ULP_SHIFTS


GRAD_BOUND = 1e-5  # against the float64 unrolled reference


def _batch_rule(**kwargs) -> rdeq.ReversibleAdjoint:
    return rdeq.ReversibleAdjoint(vmap_backward="batch", **kwargs)


# --- blocks written for these tests --------------------------------------------------------


class LNGeluMLP(eqx.Module):
    """`LN(z + W2 gelu(W1 (z + x)) + c)` on a vector, LayerNorm with learned gain."""

    w1: jax.Array
    w2: jax.Array
    c: jax.Array
    gain: jax.Array

    def __init__(self, width, *, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.w1 = jax.random.normal(k1, (3 * width, width)) / np.sqrt(width)
        self.w2 = jax.random.normal(k2, (width, 3 * width)) / np.sqrt(3 * width) / 2
        self.c = 0.1 * jax.random.normal(k3, (width,))
        self.gain = jnp.full(width, 0.9)

    def __call__(self, z, x):
        h = z + self.w2 @ jax.nn.gelu(self.w1 @ (z + x)) + self.c
        h = h - h.mean()
        return self.gain * h * jax.lax.rsqrt(jnp.mean(h**2) + 1e-5)


class TwoHeadAttention(eqx.Module):
    """Pre-norm two-head (non-causal) attention with a tanh output, on (seq, width):
    `tanh(u + concat_h(softmax(q_h k_h^T) v_h) W_o)`, `u = RMS(z) + x`."""

    wqkv: jax.Array
    wo: jax.Array

    def __init__(self, width, *, key):
        k1, k2 = jax.random.split(key)
        self.wqkv = jax.random.normal(k1, (width, 3 * width)) / np.sqrt(width)
        self.wo = jax.random.normal(k2, (width, width)) / np.sqrt(width) / 2

    def __call__(self, z, x):
        u = z * jax.lax.rsqrt(jnp.mean(z**2, -1, keepdims=True) + 1e-6) + x
        n, width = u.shape
        q, k, v = jnp.split(u @ self.wqkv, 3, axis=-1)
        heads = lambda t: t.reshape(n, 2, width // 2).transpose(1, 0, 2)
        q, k, v = heads(q), heads(k), heads(v)
        att = jax.nn.softmax(q @ k.transpose(0, 2, 1) / np.sqrt(width // 2), -1)
        out = (att @ v).transpose(1, 0, 2).reshape(n, width)
        return jnp.tanh(u + out @ self.wo)


class DepthwiseConvGN(eqx.Module):
    """A depthwise-separable conv block on CHW: `GN(z + W_p * relu(W_d * (z + x)))`, the
    pointwise conv scaled down so that the block contracts."""

    depthwise: eqx.nn.Conv2d
    pointwise: eqx.nn.Conv2d
    norm: eqx.nn.GroupNorm

    def __init__(self, channels, *, key):
        k1, k2 = jax.random.split(key)
        self.depthwise = eqx.nn.Conv2d(channels, channels, 3, padding=1, groups=channels, key=k1)
        self.pointwise = eqx.nn.Conv2d(channels, channels, 1, key=k2)
        self.norm = eqx.nn.GroupNorm(2, channels)

    def __call__(self, z, x):
        return self.norm(z + 0.5 * self.pointwise(jax.nn.relu(self.depthwise(z + x))))


class ScaledTanh(eqx.Module):
    """`tanh(W z + x)`: saturates, and so contracts faster, for larger inputs."""

    w: jax.Array

    def __init__(self, width, *, key):
        self.w = 0.9 * jax.random.normal(key, (width, width)) / np.sqrt(width)

    def __call__(self, z, x):
        return jnp.tanh(self.w @ z + x)


def _block(name, key):
    kb, kx = jax.random.split(key)
    if name == "mlp":
        return LNGeluMLP(12, key=kb), jax.random.normal(kx, (4, 12))
    if name == "attention":
        return TwoHeadAttention(8, key=kb), jax.random.normal(kx, (3, 5, 8))
    if name == "conv":
        return DepthwiseConvGN(4, key=kb), jax.random.normal(kx, (3, 4, 5, 5))
    raise ValueError(name)


# --- harness ---------------------------------------------------------------------------------


def _weights(values):
    return jnp.cos(jnp.arange(values.size, dtype=values.dtype)).reshape(values.shape)


def _grads(block, xs, solver, adjoint, steps, *, tol=0.0, mode="vmap", wrap=lambda f: f):
    """`(grads w.r.t. (params, xs, z0s), num_steps)` of a scalar loss of the fixed points
    of the batch `xs`, solved per example under `jax.vmap` (`mode="vmap"`), under two
    nested `vmap`s (`"nested-vmap"`, the batch split 1 x B), inside `jax.checkpoint`
    (`"checkpoint"`), or one example at a time (`"alone"`)."""
    params, static = eqx.partition(block, eqx.is_inexact_array)
    z0s = 0.1 * jnp.sin(xs)

    def loss(params, xs, z0s):
        layer = wrap(eqx.combine(params, static))

        def solve(x, z0):
            sol = rdeq.fixed_point(
                layer, z0, x, solver=solver, adjoint=adjoint, max_steps=steps, tol=tol
            )
            return sol.value, sol.num_steps

        if mode == "alone":
            outs = [solve(x, z0) for x, z0 in zip(xs, z0s)]
            values = jnp.stack([v for v, _ in outs])
            num_steps = jnp.stack([n for _, n in outs])
        elif mode == "nested-vmap":
            values, num_steps = jax.vmap(jax.vmap(solve))(xs[None], z0s[None])
            values, num_steps = values[0], num_steps[0]
        elif mode == "checkpoint":
            values, num_steps = jax.vmap(jax.checkpoint(solve))(xs, z0s)
        else:
            values, num_steps = jax.vmap(solve)(xs, z0s)
        return jnp.sum(jnp.sin(values) * _weights(values)), num_steps

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
    return grad(params, xs, z0s)


def _reference(block, xs, beta, steps):
    return float64_unrolled(lambda *a: _grads(*a)[0], block, xs, beta, steps)


def _exact(beta):
    return rdeq.Reversible(beta, state_dtype="exact")


# --- (a) the gradient is the unrolled gradient ------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "attention", "conv"])
@pytest.mark.parametrize("beta", [0.5, 0.8])
def test_equals_float64_unrolled_reference(name, beta, getkey):
    block, xs = _block(name, getkey())
    recorder = ReportRecorder()
    adjoint = _batch_rule(report=recorder)
    g, num_steps = _grads(block, xs, _exact(beta), adjoint, 16)
    assert np.all(np.asarray(num_steps) == 16)
    report = recorder.stacked()
    # Checked per example, and every one rebuilt its initial state to the bit.
    assert report["abs"].shape == (len(xs),)
    assert np.all(report["abs"] == 0.0) and not np.any(report["mismatch"]), report
    err = tree_rel_error(g, _reference(block, xs, beta, 16))
    assert err <= GRAD_BOUND, err


# --- (b) per-example stopping -------------------------------------------------------------


def _stopping_batch(key):
    """A batch whose examples converge at different speeds: larger inputs saturate the
    tanh, which then contracts faster."""
    kb, kx = jax.random.split(key)
    block = ScaledTanh(10, key=kb)
    scales = jnp.array([0.05, 0.3, 1.0, 3.0, 8.0])
    return block, scales[:, None] * jax.random.normal(kx, (5, 10))


# beta 0.9 (3 digits of radix 640 a word): a stopped example keeps taking steps in the
# batched forward loop, and a digit *added* (not set) there each time would overflow its
# word and corrupt the steps it holds.
@pytest.mark.parametrize("beta", [0.5, 0.8, 0.9])
def test_per_example_stopping_matches_each_alone(beta, getkey):
    block, xs = _stopping_batch(getkey())
    recorder = ReportRecorder()
    adjoint = _batch_rule(report=recorder)
    g, num_steps = _grads(block, xs, _exact(beta), adjoint, 40, tol=1e-3)
    num_steps = np.asarray(num_steps)
    assert len(set(num_steps.tolist())) >= 3, num_steps  # they really stop apart
    assert np.all(num_steps < 40), num_steps
    assert np.all(recorder.stacked()["abs"] == 0.0)
    alone, alone_steps = _grads(block, xs, _exact(beta), _batch_rule(), 40, tol=1e-3,
                                mode="alone")  # fmt: skip
    np.testing.assert_array_equal(num_steps, np.asarray(alone_steps))
    # Per-example cotangents (of x and z0) example by example, and the shared
    # parameters' (the sum over the batch, in another order) as a whole. The batched and
    # the lone forward passes evaluate `fn` in different programs, whose float32 values
    # may differ by an ulp, and the lattice (1/4 or 1/8 ulp) keeps that difference: two
    # exact gradients of slightly different forward passes, measured 1e-6 - 2.2e-6 apart.
    # A digit lost or misplaced in the bookkeeping breaks reversal (O(1), and `abs` above).
    for i in range(len(xs)):
        assert tree_rel_error((g[1][i], g[2][i]), (alone[1][i], alone[2][i])) <= 1e-5
    assert tree_rel_error(g[0], alone[0]) <= 1e-5
    # And the same as the per-example rule on the very same vmapped program.
    old, _ = _grads(
        block, xs, _exact(beta), rdeq.ReversibleAdjoint(vmap_backward="per_example"), 40, tol=1e-3
    )
    assert tree_rel_error(g, old) <= 1e-6


@pytest.mark.parametrize("mode", ["nested-vmap", "checkpoint"])
def test_nested_vmap_and_checkpoint(mode, getkey):
    block, xs = _stopping_batch(getkey())
    recorder = ReportRecorder()
    g, num_steps = _grads(
        block, xs, _exact(0.8), _batch_rule(report=recorder), 40, tol=1e-3, mode=mode
    )
    assert len(set(np.asarray(num_steps).tolist())) >= 3
    assert np.all(recorder.stacked()["abs"] == 0.0)
    ref, ref_steps = _grads(block, xs, _exact(0.8), _batch_rule(), 40, tol=1e-3)
    np.testing.assert_array_equal(np.asarray(num_steps), np.asarray(ref_steps))
    assert tree_rel_error(g, ref) <= 1e-6


def test_shared_args_and_per_example_parameters(getkey):
    """A shared array in `args` gets one summed cotangent; parameters batched along with
    the examples (one layer per example) keep one cotangent each. Both as the
    per-example rule gives them."""
    block, xs = _stopping_batch(getkey())
    shift = 0.1 * jnp.arange(10.0)
    blocks = jax.vmap(lambda s: eqx.tree_at(lambda b: b.w, block, block.w * s))(
        jnp.linspace(0.5, 1.0, len(xs))
    )

    def grads(vmap_backward):
        adjoint = rdeq.ReversibleAdjoint(vmap_backward=vmap_backward)

        def loss(blocks, shift, xs):
            def solve(layer, x):
                sol = rdeq.fixed_point(
                    lambda z, a: layer(z, a[0] + a[1]), jnp.zeros_like(x), (x, shift),
                    solver=_exact(0.5), adjoint=adjoint, max_steps=30, tol=1e-3,
                )  # fmt: skip
                return sol.value, sol.num_steps

            values, num_steps = jax.vmap(solve)(blocks, xs)
            return jnp.sum(jnp.sin(values) * _weights(values)), num_steps

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(blocks, shift, xs)

    g, num_steps = grads("batch")
    assert len(set(np.asarray(num_steps).tolist())) >= 3
    assert g[0].w.shape == blocks.w.shape and g[1].shape == shift.shape
    old, _ = grads("per_example")
    assert tree_rel_error(g, old) <= 1e-6


# --- (c) faults are still tolerated or caught --------------------------------------------------


@pytest.mark.parametrize("shift", ULP_SHIFTS)
def test_reevaluation_off_by_ulps_is_absorbed(shift, getkey):
    """The batched re-evaluation inside `jax.vjp` 1 to 4 ulps off: reversal stays exact,
    with examples stopping at different steps."""
    block, xs = _stopping_batch(getkey())
    wrap = lambda f: perturbed_in_vjp(f, shift)
    recorder = ReportRecorder()
    g, num_steps = _grads(
        block, xs, _exact(0.8), _batch_rule(report=recorder), 40, tol=1e-3, wrap=wrap
    )
    assert len(set(np.asarray(num_steps).tolist())) >= 3
    report = recorder.stacked()
    assert np.all(report["abs"] == 0.0) and np.all(report["drift"] < 8.0), report
    assert np.any(report["drift"] >= 1.0)  # the perturbation is really there
    clean, _ = _grads(block, xs, _exact(0.8), _batch_rule(), 40, tol=1e-3)
    assert tree_rel_error(g, clean) <= 1e-6


def _faulty(adjoint, xs, block, only_first=False):
    if only_first:  # only the first example's outputs reach 0.99999
        shifts = lambda out: jnp.where(jnp.max(jnp.abs(out)) > 0.99999, 40, 0)
    else:
        shifts = lambda out: jnp.full(out.shape, 40, jnp.int32)
    wrap = lambda f: perturbed_in_vjp(f, lambda out: shifts(out).astype(jnp.int32))
    return _grads(block, xs, _exact(0.8), adjoint, 16, wrap=wrap)


def test_beyond_tolerance_is_caught_per_example(getkey):
    block, xs = _stopping_batch(getkey())
    with pytest.raises(Exception, match="did not rebuild the initial state"):
        jax.block_until_ready(_faulty(_batch_rule(), xs, block))
        jax.effects_barrier()  # a host-callback error surfaces here at the latest
    # Only the first example saturates the tanh to within 1e-5 of 1, and only its
    # re-evaluation is then 40 ulps off.
    xs = (0.5 * jax.random.normal(getkey(), xs.shape)).at[0].add(20.0)
    recorder = ReportRecorder()
    _faulty(_batch_rule(on_mismatch="ignore", report=recorder), xs, block, True)
    assert recorder.stacked()["mismatch"].tolist() == [True] + [False] * (len(xs) - 1)


# --- (d) memory --------------------------------------------------------------------------------


def _train_step_temp_bytes(rule, *, batch=32, seq=8, width=128, steps=8):
    """Compiled temporary memory of a jitted gradient of a batch of solves of an attention
    block (66K parameters): per-example solves under `vmap` with `rule`, or (`rule =
    "batched-fn"`) one solve of the batch through `eqx.filter_vmap(layer)`."""
    from .unseen_blocks import CausalAttentionLN

    block = CausalAttentionLN(width, key=jax.random.key(0))
    params, static = eqx.partition(block, eqx.is_inexact_array)
    xs = jax.ShapeDtypeStruct((batch, seq, width), jnp.float32)

    def loss(params, xs):
        layer = eqx.combine(params, static)
        if rule == "batched-fn":
            sol = rdeq.fixed_point(eqx.filter_vmap(layer), jnp.zeros_like(xs), xs, max_steps=steps)
            values = sol.value
        else:
            adjoint = rdeq.ReversibleAdjoint(vmap_backward=rule)
            values = jax.vmap(
                lambda x: (
                    rdeq.fixed_point(
                        layer, jnp.zeros_like(x), x, adjoint=adjoint, max_steps=steps
                    ).value
                )
            )(xs)
        return jnp.sum(values**2)

    compiled = jax.jit(jax.grad(loss)).lower(params, xs).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_compiled_memory_matches_a_batched_fn():
    """One cotangent of the shared parameters, not one per example: the vmapped gradient
    needs about what the batched-fn solve does. Measured (jax 0.10.2, CPU): per-example
    rule 21,922,784 B, batch rule 3,572,304 B, batched fn 3,570,520 B (ratio 1.0005)."""
    new = _train_step_temp_bytes("batch")
    batched_fn = _train_step_temp_bytes("batched-fn")
    old = _train_step_temp_bytes("per_example")
    assert new <= 1.15 * batched_fn, (new, batched_fn)
    assert old >= 4 * new, (old, new)  # the per-example rule carries 32 copies


def test_vmap_backward_option_is_checked():
    # A TypeError from the annotations' runtime check under the tests, else a ValueError.
    with pytest.raises((ValueError, TypeError), match="vmap_backward"):
        rdeq.ReversibleAdjoint(vmap_backward="batched")


def test_per_example_gradients_need_the_per_example_rule(getkey):
    """`jax.vmap(jax.grad(loss))`: one gradient per example, also w.r.t. the parameters the
    batch shares. The default (`"per_example"`) gives each example its own, equal to the
    example differentiated alone. The batch rule sums the shared cotangents over the
    batch, which is what a `grad` of a summed loss needs; here it hands every example the
    batch's sum (the documented reason it is not the default)."""
    block, xs = _stopping_batch(getkey())
    params, static = eqx.partition(block, eqx.is_inexact_array)

    def per_example(adjoint):
        def loss(params, x):
            sol = rdeq.fixed_point(
                eqx.combine(params, static), jnp.zeros_like(x), x,
                solver=_exact(0.8), adjoint=adjoint, max_steps=40, tol=1e-3,
            )  # fmt: skip
            return jnp.sum(jnp.sin(sol.value))

        return jax.grad(loss), jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))

    assert rdeq.ReversibleAdjoint().vmap_backward == "per_example"
    grad, vmapped = per_example(rdeq.ReversibleAdjoint())
    got = vmapped(params, xs)
    alone = [jax.jit(grad)(params, x) for x in xs]
    for i, want in enumerate(alone):
        assert tree_rel_error(jax.tree.map(lambda g: g[i], got), want) <= 1e-5
    _, summed = per_example(_batch_rule())
    total = jax.tree.map(lambda *g: sum(g), *alone)
    for i in range(len(xs)):
        assert tree_rel_error(jax.tree.map(lambda g: g[i], summed(params, xs)), total) <= 1e-5
