"""Classic fixed-point problems, written here, with references computed without the library.

Each problem is `z = f(z, args)` on a flat vector of `DIM` elements; `with_structure`
re-expresses it on any PyTree state holding `DIM` elements, so every problem can be
solved with every state structure. `args` is a tuple of floating arrays (everything
gradients are taken with respect to), built in the dtype asked for.

References: `newton` solves $f(z) - z = 0$ by Newton's method on the flattened Jacobian
(`jax.jacfwd`) in float64; `ift_grad` is the implicit-function-theorem gradient at that
solution, $\\bar\\theta = \\partial_\\theta f^\\top (I - J_z f)^{-\\top} \\bar z$, solved with
`jnp.linalg.solve`. Neither uses any solver of the library.
"""

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np


DIM = 6


@dataclasses.dataclass(frozen=True)
class Problem:
    name: str
    fn: Callable  # fn(z: (DIM,), args) -> (DIM,)
    make_args: Callable  # dtype -> tuple of arrays
    z0: tuple[float, ...]  # initial guess (not the fixed point)
    k: float  # a bound on the contraction constant near the fixed point (for error bounds)
    zero: bool = False  # the fixed point is 0

    def args(self, dtype):
        return tuple(jnp.asarray(a, dtype) for a in self.make_args())

    def start(self, dtype):
        return jnp.asarray(self.z0, dtype)


def _rng_matrix(seed, shape, norm):
    """A fixed random matrix with spectral norm `norm`."""
    a = np.random.default_rng(seed).standard_normal(shape)
    return a * (norm / np.linalg.norm(a, 2))


def _linear(z, args):
    (a,) = args
    return a @ z


def _cos(z, args):
    (a,) = args
    return a * jnp.cos(z)


def _exp(z, args):
    (a,) = args
    return jnp.exp(-a * z)


def _mlp(z, args):
    w1, b, w2 = args
    return w2 @ jnp.tanh(w1 @ z + b)


# A stiff linear system y' = L y, L symmetric with eigenvalues -1 .. -100 (stiffness
# ratio 100), one implicit-midpoint step of size h in y-space:
#   y1 = y0 + h/2 L (y0 + y1),
# whose fixed-point iteration contracts with constant h/2 * 100 = 0.9.
_Q = np.linalg.qr(np.random.default_rng(3).standard_normal((DIM, DIM)))[0]
_L = _Q @ np.diag(-np.geomspace(1.0, 100.0, DIM)) @ _Q.T
_H = 0.018


def _stiff_linear(z, args):
    lam, y0 = args
    return y0 + 0.5 * _H * (lam @ (y0 + z))


# Two copies of the Robertson chemical kinetics ODE (rates k1 = 0.04, k2 = 3e7, k3 = 1e4),
# at the reference states of Hairer & Wanner at t = 0.4 and t = 40 (on the slow
# manifold, stiffness ~2e3 and ~3e3). One implicit-midpoint step in k-space,
#   k = f(y0 + h/2 k),
# whose fixed point k = y' is small (1e-2 .. 1e-8): near 0. With h = 3e-4 the
# iteration contracts with constant ~0.5.
_ROB_Y0 = (0.9851721, 3.386395e-5, 0.01479409, 0.7158271, 9.185535e-6, 0.2841637)
_ROB_H = 3e-4


def _robertson_rhs(y, rates):
    k1, k2, k3 = rates[0], rates[1], rates[2]
    y1, y2, y3 = y[0], y[1], y[2]
    return jnp.stack([-k1 * y1 + k3 * y2 * y3, k1 * y1 - k3 * y2 * y3 - k2 * y2**2, k2 * y2**2])


def _robertson(z, args):
    rates, y0 = args
    y = y0 + 0.5 * _ROB_H * z
    return jnp.concatenate([_robertson_rhs(y[:3], rates), _robertson_rhs(y[3:], rates)])


PROBLEMS = {
    p.name: p
    for p in [
        Problem(
            "linear0",
            _linear,
            lambda: (_rng_matrix(0, (DIM, DIM), 0.5),),
            (1.0, -2.0, 0.5, 0.25, -1.0, 2.0),
            k=0.5,
            zero=True,
        ),
        Problem("cos", _cos, lambda: (np.linspace(0.5, 1.0, DIM),), (0.0,) * DIM, k=0.7),
        Problem("exp", _exp, lambda: (np.linspace(0.5, 1.5, DIM),), (0.0,) * DIM, k=0.75),
        Problem(
            "mlp",
            _mlp,
            lambda: (
                _rng_matrix(1, (8, DIM), 1.0),
                np.linspace(-1.0, 1.0, 8),
                _rng_matrix(2, (DIM, 8), 0.8),
            ),
            (0.0,) * DIM,
            k=0.8,
        ),
        Problem("stiff_linear", _stiff_linear, lambda: (_L, np.ones(DIM)), (0.0,) * DIM, k=0.9),
        Problem(
            "robertson",
            _robertson,
            lambda: (np.array([0.04, 3e7, 1e4]), np.array(_ROB_Y0)),
            (0.0,) * DIM,
            k=0.9,  # ~0.5 spectrally; the Jacobian is far from normal
        ),
    ]
}


def newton(problem: Problem) -> np.ndarray:
    """The fixed point in float64, by Newton's method (independent of the library)."""
    with jax.enable_x64(True):
        args = problem.args(jnp.float64)
        z = problem.start(jnp.float64)
        g = lambda z: problem.fn(z, args) - z
        for _ in range(40):
            z = z - jnp.linalg.solve(jax.jacfwd(g)(z), g(z))
        assert float(jnp.max(jnp.abs(g(z)))) <= 1e-15 * max(1.0, float(jnp.max(jnp.abs(z))))
        return np.asarray(z)


def ift_grad(problem: Problem, z_bar: np.ndarray) -> tuple[np.ndarray, ...]:
    r"""$\partial_\theta f^\top (I - J_z f)^{-\top} \bar z$ at the float64 fixed point."""
    z = newton(problem)
    with jax.enable_x64(True):
        args = problem.args(jnp.float64)
        jac = jax.jacfwd(problem.fn)(jnp.asarray(z), args)
        w = jnp.linalg.solve((jnp.eye(DIM) - jac).T, jnp.asarray(z_bar, jnp.float64))
        (args_bar,) = jax.vjp(lambda a: problem.fn(jnp.asarray(z), a), args)[1](w)
        return tuple(np.asarray(a) for a in args_bar)


# --- state structures ------------------------------------------------------------------

# Shapes of the leaves of each structure, in leaf order; every one holds DIM elements.
STRUCTURES = {
    "array": lambda v: v,
    "tuple": lambda v: (v[:2], v[2:]),
    "dict0d": lambda v: {"a": v[0], "b": {"c": v[1], "d": v[2:]}},
    "shapes": lambda v: {"m": v[:4].reshape(2, 2), "v": v[4:].reshape(2, 1)},
}


def split_like(v, template: Callable):
    """The flat vector `v` arranged as `template(v)`."""
    return template(v)


def flatten(tree) -> jax.Array:
    return jnp.concatenate([jnp.ravel(x) for x in jtu.tree_leaves(tree)])


def with_structure(problem: Problem, template: Callable) -> Callable:
    """`problem.fn` on states shaped like `template(flat)`."""

    def fn(z, args):
        return template(problem.fn(flatten(z), args))

    return fn


def structure_from_shapes(shapes, nesting: str) -> Callable:
    """A template laying a flat vector out as leaves of `shapes` (whose sizes sum to
    DIM), nested as `nesting` (`"tuple"`, `"list"` or `"dict"`), for property tests."""
    sizes = [math.prod(s) for s in shapes]
    assert sum(sizes) == DIM
    offsets = np.cumsum([0, *sizes])

    def template(v):
        leaves = [v[o : o + n].reshape(s) for o, n, s in zip(offsets, sizes, shapes)]
        if nesting == "tuple":
            return tuple(leaves)
        if nesting == "list":
            return [leaves[0], tuple(leaves[1:])]
        return {f"k{i}": {"x": leaf} for i, leaf in enumerate(leaves)}

    return template
