"""`jacobian_penalty` against the exact Frobenius norm of small Jacobians.

The reference is built with `jax.jacfwd` on the flattened state: $J$ ($d \\times d$), the
exact value $\\|J\\|_F^2 / d$ and, with $A = J J^\\top$, the variance of one probe,
$2(\\|A\\|_F^2 - \\sum_i A_{ii}^2)/d^2$ (Rademacher) or $2\\|A\\|_F^2/d^2$ (Gaussian).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import revdeq_jax as rdeq
from revdeq_jax._jacobian_penalty import hutchinson

from .helpers import cast_floats, MLPBlock, tree_rel_error


class TanhMLP(eqx.Module):
    """f(z, x) = W2 tanh(W1 z + x) + b."""

    w1: jax.Array
    w2: jax.Array
    b: jax.Array

    def __init__(self, dim, *, key):
        k1, k2, k3 = jr.split(key, 3)
        self.w1 = jr.normal(k1, (dim, dim)) / jnp.sqrt(dim)
        self.w2 = jr.normal(k2, (dim, dim)) / jnp.sqrt(dim)
        self.b = 0.1 * jr.normal(k3, (dim,))

    def __call__(self, z, x):
        return self.w2 @ jnp.tanh(self.w1 @ z + x) + self.b


class PyTreeLayer(eqx.Module):
    """A state `{"h": (5,), "c": (2, 3)}` whose parts feed each other."""

    a: jax.Array
    b: jax.Array
    c: jax.Array

    def __init__(self, *, key):
        k1, k2, k3 = jr.split(key, 3)
        self.a = jr.normal(k1, (5, 5)) / jnp.sqrt(5)
        self.b = jr.normal(k2, (5, 6)) / jnp.sqrt(6)
        self.c = jr.normal(k3, (6, 5)) / jnp.sqrt(5)

    def __call__(self, z, x):
        h, c = z["h"], z["c"]
        h_new = jnp.tanh(self.a @ h + self.b @ c.reshape(-1) + x)
        c_new = jnp.sin(self.c @ h).reshape(2, 3) + 0.5 * c
        return {"h": h_new, "c": c_new}


class ConvLayer(eqx.Module):
    """f(z, x) = tanh(conv3x3(z) + x) on a (3, 5, 5) image."""

    conv: eqx.nn.Conv2d

    def __init__(self, *, key):
        self.conv = eqx.nn.Conv2d(3, 3, 3, padding=1, key=key)

    def __call__(self, z, x):
        return jnp.tanh(self.conv(z) + x)


def make_layer(name, key, dtype):
    """A layer, a state `z` and input `x`, all floating arrays in `dtype`."""
    kl, kz, kx = jr.split(key, 3)
    if name == "mlp":
        layer, z, x = TanhMLP(12, key=kl), jr.normal(kz, (12,)), jr.normal(kx, (12,))
    elif name == "pytree":
        layer = PyTreeLayer(key=kl)
        z = {"h": jr.normal(kz, (5,)), "c": jr.normal(jr.fold_in(kz, 1), (2, 3))}
        x = jr.normal(kx, (5,))
    elif name == "conv":
        layer, z, x = ConvLayer(key=kl), jr.normal(kz, (3, 5, 5)), jr.normal(kx, (3, 5, 5))
    else:
        raise ValueError(name)
    return cast_floats(layer, dtype), cast_floats(z, dtype), cast_floats(x, dtype)


def exact_jacobian(fn, z, args):
    """The d x d Jacobian of the flattened map, in float64."""
    fn, z, args = cast_floats((fn, z, args), jnp.float64)
    flat, unravel = ravel_pytree(z)
    return jax.jacfwd(lambda v: ravel_pytree(fn(unravel(v), args))[0])(flat)


def exact_penalty(fn, z, args):
    """||J||_F^2 / d, differentiable in fn's arrays, z and args."""
    jac = exact_jacobian(fn, z, args)
    return jnp.sum(jnp.square(jac)) / jac.shape[0]


def one_probe_variance(jac, probe):
    d = jac.shape[0]
    a = jac @ jac.T
    frob = jnp.sum(jnp.square(a))
    if probe == "rademacher":
        frob = frob - jnp.sum(jnp.square(jnp.diag(a)))
    return float(2 * frob / d**2)


def estimates(layer, z, x, keys, *, probe, num_probes=1):
    fn = jax.jit(
        jax.vmap(
            lambda k: rdeq.jacobian_penalty(layer, z, x, key=k, num_probes=num_probes, probe=probe)
        )
    )
    return fn(keys)


LAYERS = ["mlp", "pytree", "conv"]
PROBES = ["rademacher", "gaussian"]
DTYPES = [jnp.float32, jnp.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("probe", PROBES)
@pytest.mark.parametrize("name", LAYERS)
def test_mean_over_seeds_within_2_percent(x64, name, probe, dtype):
    layer, z, x = make_layer(name, jr.key(0), dtype)
    jac = exact_jacobian(layer, z, x)
    exact = float(jnp.sum(jnp.square(jac)) / jac.shape[0])
    # enough seeds that five standard errors of the mean fit inside the 2% band
    var = one_probe_variance(jac, probe)
    n = int(np.ceil(var * (5 / (0.02 * exact)) ** 2 * 1.25))
    assert n <= 2**17
    est = estimates(layer, z, x, jr.split(jr.key(1), n), probe=probe)
    assert est.dtype == dtype
    assert abs(np.mean(np.asarray(est, np.float64)) - exact) < 0.02 * exact


@pytest.mark.parametrize("probe", PROBES)
@pytest.mark.parametrize("name", LAYERS)
def test_variance_matches_formula(x64, name, probe):
    """The empirical variance of one-probe estimates equals the stated formula, within five
    standard errors of a sample variance, $\\sqrt{(\\mu_4/\\sigma^4 - 1)/n}$ relative."""
    layer, z, x = make_layer(name, jr.key(2), jnp.float64)
    jac = exact_jacobian(layer, z, x)
    var = one_probe_variance(jac, probe)
    n = 16384
    est = np.asarray(estimates(layer, z, x, jr.split(jr.key(3), n), probe=probe))
    centred = est - est.mean()
    s2 = np.mean(centred**2)
    kurtosis = np.mean(centred**4) / s2**2
    rel_se = np.sqrt((kurtosis - 1) / n)
    assert abs(s2 / var - 1) < 5 * rel_se
    assert 5 * rel_se < 0.3  # the band is narrow enough to catch a wrong formula


def test_rademacher_variance_below_gaussian(x64):
    for name in LAYERS:
        layer, z, x = make_layer(name, jr.key(4), jnp.float64)
        jac = exact_jacobian(layer, z, x)
        assert one_probe_variance(jac, "rademacher") < one_probe_variance(jac, "gaussian")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("probe", PROBES)
@pytest.mark.parametrize("name", LAYERS)
def test_single_estimates_within_5_sigma(x64, name, probe, dtype):
    """Each of 20 fixed-seed estimates with m = 16 probes lies within $5\\sigma$,
    $\\sigma^2 = \\mathrm{Var}_1 / m$; and the estimates are not all the same."""
    layer, z, x = make_layer(name, jr.key(5), dtype)
    jac = exact_jacobian(layer, z, x)
    exact = float(jnp.sum(jnp.square(jac)) / jac.shape[0])
    m = 16
    sigma = np.sqrt(one_probe_variance(jac, probe) / m)
    est = estimates(layer, z, x, jr.split(jr.key(6), 20), probe=probe, num_probes=m)
    est = np.asarray(est, np.float64)
    assert np.all(np.abs(est - exact) < 5 * sigma)
    assert np.std(est) > 0.1 * sigma


@pytest.mark.parametrize("name", LAYERS)
def test_fixed_probes_exact(x64, name, getkey):
    r"""With the probes fixed the estimate is $\frac{1}{md}\sum_k v_k^\top A v_k$ exactly, in
    value and in gradient (so its expectation over $\mathbb{E}[vv^\top] = I$ is exact)."""
    layer, z, x = make_layer(name, getkey(), jnp.float64)
    m = 3
    probes = jax.tree.map(lambda a: jr.normal(getkey(), (m, *a.shape), a.dtype), z)
    flat_probes = jax.vmap(lambda p: ravel_pytree(p)[0])(probes)

    def reference(layer, z, x):
        jac = exact_jacobian(layer, z, x)
        vj = flat_probes @ jac
        return jnp.sum(jnp.square(vj)) / (m * jac.shape[0])

    value = hutchinson(layer, z, x, probes)
    assert np.isclose(value, reference(layer, z, x), rtol=1e-12, atol=0)
    grads = eqx.filter_jit(eqx.filter_grad(lambda p: hutchinson(*p, probes)))((layer, z, x))
    ref_grads = eqx.filter_jit(eqx.filter_grad(lambda p: reference(*p)))((layer, z, x))
    assert tree_rel_error(grads, ref_grads) < 1e-10


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", LAYERS)
def test_gradient_unbiased(x64, name, dtype):
    """Gradients w.r.t. parameters, `z` and `x` with many probes match the gradient of the
    exact $\\|J\\|_F^2/d$ within 3% (relative 2-norm, per leaf). The Monte Carlo error is
    about 1% with these probe counts (measured over seeds), so a bias of a few % fails."""
    layer, z, x = make_layer(name, jr.key(7), dtype)
    num_probes = 2**15 if name == "conv" else 2**17
    grads = eqx.filter_jit(
        eqx.filter_grad(lambda p: rdeq.jacobian_penalty(*p, key=jr.key(8), num_probes=num_probes))
    )((layer, z, x))
    ref = eqx.filter_grad(lambda p: exact_penalty(*p))(cast_floats((layer, z, x), jnp.float64))
    assert jax.tree.structure(grads) == jax.tree.structure(ref)
    for g in jax.tree.leaves(grads):
        assert g.dtype == dtype
    assert tree_rel_error(grads, ref) < 0.03


def test_under_vmap_and_jit(getkey):
    layer, _, _ = make_layer("mlp", getkey(), jnp.float32)
    zs = jr.normal(getkey(), (3, 12))
    xs = jr.normal(getkey(), (3, 12))
    keys = jr.split(getkey(), 3)

    def one(z, x, k):
        return rdeq.jacobian_penalty(layer, z, x, key=k, num_probes=2)

    batched = jax.jit(jax.vmap(one))(zs, xs, keys)
    looped = jnp.stack([jax.jit(one)(zs[i], xs[i], keys[i]) for i in range(3)])
    eager = one(zs[0], xs[0], keys[0])
    np.testing.assert_allclose(eager, looped[0], rtol=1e-6)
    assert batched.shape == (3,)
    np.testing.assert_allclose(batched, looped, rtol=1e-5)
    # a single key shared by the batch is fine too (the same probes for every example)
    shared = jax.vmap(one, in_axes=(0, 0, None))(zs, xs, keys[0])
    np.testing.assert_allclose(shared[1], one(zs[1], xs[1], keys[0]), rtol=1e-5)


def test_deq_gradient_through_the_solve(x64, getkey):
    """As a loss term on a DEQ's fixed point: the gradient through $z^*$ with the reversible
    adjoint equals the unrolled one; `stop_gradient(z)` gives the paper's variant."""
    layer = MLPBlock(8, key=getkey(), dtype=jnp.float64)
    x = jr.normal(getkey(), (8,), jnp.float64)
    key = getkey()

    def loss(layer, adjoint, stop):
        deq = rdeq.DEQ(layer, solver=rdeq.Reversible(0.5), adjoint=adjoint, max_steps=5, tol=0.0)
        z = deq(x)
        z = jax.lax.stop_gradient(z) if stop else z
        return jnp.sum(z**2) + rdeq.jacobian_penalty(deq.layer, z, x, key=key, num_probes=2)

    grad = eqx.filter_jit(eqx.filter_grad(loss))
    rev = grad(layer, rdeq.ReversibleAdjoint(), False)
    unrolled = grad(layer, rdeq.UnrolledAdjoint(), False)
    assert tree_rel_error(rev, unrolled) < 1e-10
    detached = grad(layer, rdeq.ReversibleAdjoint(), True)
    assert tree_rel_error(detached, rev) > 1e-3
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(detached))


def test_bfloat16_layer_sums_in_float32(getkey):
    layer, z, x = make_layer("mlp", getkey(), jnp.bfloat16)
    out = rdeq.jacobian_penalty(layer, z, x, key=getkey(), num_probes=4)
    assert out.dtype == jnp.float32
    assert jnp.isfinite(out)


def test_errors(getkey):
    layer, z, x = make_layer("mlp", getkey(), jnp.float32)
    key = getkey()
    with pytest.raises(TypeError, match=r"`jacobian_penalty\(deq.layer, z, x, key=key\)`"):
        rdeq.jacobian_penalty(rdeq.DEQ(layer), z, x, key=key)
    with pytest.raises(ValueError, match="`num_probes=0` must be at least 1"):
        rdeq.jacobian_penalty(layer, z, x, key=key, num_probes=0)
    # (under the test suite's jaxtyping hook the annotation check answers first)
    with pytest.raises(TypeError, match="num_probes"):
        rdeq.jacobian_penalty(layer, z, x, key=key, num_probes=2.0)
    with pytest.raises((TypeError, ValueError), match=r"(?s)probe.*'rademacher'"):
        rdeq.jacobian_penalty(layer, z, x, key=key, probe="normal")
    with pytest.raises(ValueError, match="shapes and dtypes of `z`"):
        rdeq.jacobian_penalty(lambda z, x: z[:3], z, x, key=key)
    with pytest.raises(ValueError, match="same PyTree structure"):
        rdeq.jacobian_penalty(lambda z, x: (z, z), z, x, key=key)
    with pytest.raises(ValueError, match="real floating arrays"):
        rdeq.jacobian_penalty(lambda z, x: z, jnp.arange(3), None, key=key)
