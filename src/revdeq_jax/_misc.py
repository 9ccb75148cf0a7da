"""Small PyTree helpers shared by the solvers and adjoints."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree


def tree_cast_like(tree: PyTree, like: PyTree) -> PyTree:
    """Casts each leaf of `tree` to the dtype of the matching leaf of `like`."""
    return jtu.tree_map(lambda x, y: x.astype(y.dtype), tree, like)


def tree_where(pred: Array, true: PyTree, false: PyTree) -> PyTree:
    """Leafwise `jnp.where(pred, true, false)` for a scalar predicate."""
    return jtu.tree_map(lambda t, f: jnp.where(pred, t, f), true, false)


def tree_combine_lin(a: float, x: PyTree, b: float, y: PyTree) -> PyTree:
    """`a * x + b * y`, leafwise, in the dtype of `x`."""
    return jtu.tree_map(lambda u, v: a * u + b * v.astype(u.dtype), x, y)


def tree_sub(x: PyTree, y: PyTree) -> PyTree:
    return jtu.tree_map(lambda u, v: u - v.astype(u.dtype), x, y)


def tree_l2(tree: PyTree) -> Array:
    """Euclidean norm over all leaves, accumulated in at least float32.

    Scaled by the largest magnitude first, so that large (diverging) iterates give a
    large norm rather than an overflow to inf and then NaN ratios.
    """
    leaves = jtu.tree_leaves(tree)
    dtype = jnp.result_type(jnp.float32, *leaves)
    leaves = [x.astype(dtype) for x in leaves]
    scale = jnp.zeros((), dtype)
    for leaf in leaves:
        scale = jnp.maximum(scale, jnp.max(jnp.abs(leaf)))
    safe = jnp.where(jnp.isfinite(scale) & (scale > 0), scale, 1)
    total = jnp.zeros((), dtype)
    for leaf in leaves:
        total = total + jnp.sum(jnp.square(leaf / safe))
    return jnp.where(jnp.isfinite(scale), jnp.sqrt(total) * safe, scale)


def tree_rms(tree: PyTree) -> Array:
    r"""Root mean square over every element of every leaf,
    $\|v\|_\mathrm{rms} = \|v\|_2 / \sqrt{n}$ with $n$ the total number of elements;
    overflow-safe like `tree_l2`."""
    size = sum(jnp.size(x) for x in jtu.tree_leaves(tree))
    norm = tree_l2(tree)
    return norm / jnp.sqrt(jnp.asarray(max(size, 1), norm.dtype))


def residual_norm(z: PyTree, fz: PyTree) -> Array:
    r"""$\|f(z) - z\|_\mathrm{rms}$ over the whole PyTree: the absolute residual."""
    return tree_rms(tree_sub(fz, z))


def zeros_like_inexact(tree: PyTree) -> PyTree:
    """Zeros for each inexact array leaf, `None` for every other leaf."""
    return jtu.tree_map(lambda x: jnp.zeros_like(x) if eqx.is_inexact_array(x) else None, tree)


def materialise(ct: PyTree | None, like: PyTree) -> PyTree:
    """Replaces symbolic-zero (`None`) cotangents with zeros shaped like `like`."""
    if ct is None:
        return jtu.tree_map(jnp.zeros_like, like)
    return jtu.tree_map(
        lambda c, x: jnp.zeros_like(x) if c is None else c,
        ct,
        like,
        is_leaf=lambda c: c is None,
    )


def tree_add_ct(acc: PyTree, new: PyTree) -> PyTree:
    """Adds cotangent trees that may contain `None` (symbolic zero) leaves."""

    def _add(a, b):
        if a is None:
            return b
        if b is None:
            return a
        return a + b.astype(a.dtype)

    return jtu.tree_map(_add, acc, new, is_leaf=lambda x: x is None)


def stop_gradient_inexact(tree: PyTree) -> PyTree:
    return jtu.tree_map(lambda x: jax.lax.stop_gradient(x) if eqx.is_inexact_array(x) else x, tree)


def tree_scale(a: float, tree: PyTree) -> PyTree:
    """`a * tree`, leafwise (a Python scalar keeps each leaf's dtype)."""
    return jtu.tree_map(lambda x: a * x, tree)


def tree_add(x: PyTree, y: PyTree) -> PyTree:
    """`x + y`, leafwise, in the dtype of `x`."""
    return jtu.tree_map(lambda u, v: u + v.astype(u.dtype), x, y)


def check_self_map(fn, z: PyTree, args: PyTree, *, name: str, empty: str) -> None:
    """Trace-time checks that `z` is a PyTree of real floating arrays and that
    `fn(z, args)` returns its structure, shapes and dtypes (a map of the state to itself).

    `name` is what the caller calls `z` (`"z0"`, `"z"`); `empty` ends the message for a
    `z` without array leaves.
    """
    leaves = jtu.tree_leaves(z)
    if not leaves:
        raise ValueError(f"`{name}` has no array leaves: {empty}")
    for leaf in leaves:
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise ValueError(
                f"`{name}` must hold real floating arrays, but has a leaf of dtype "
                f"{leaf.dtype}. Cast it, e.g. `{name}.astype(jnp.float32)`."
            )
    out = eqx.filter_eval_shape(lambda z_, a_: fn(z_, a_), z, args)
    in_struct = jax.eval_shape(lambda: z)
    if jtu.tree_structure(out) != jtu.tree_structure(in_struct):
        raise ValueError(
            f"`fn(z, args)` must return the same PyTree structure as `{name}`, but `{name}` "
            f"is {jtu.tree_structure(in_struct)} and `fn` returned {jtu.tree_structure(out)}."
        )
    for (path, o), i in zip(jtu.tree_leaves_with_path(out), jtu.tree_leaves(in_struct)):
        if o.shape != i.shape or o.dtype != i.dtype:
            raise ValueError(
                f"`fn(z, args)` must return arrays with the shapes and dtypes of `{name}`, "
                f"but at {jtu.keystr(path) or 'the root'} `{name}` is "
                f"{i.dtype}{list(i.shape)} and `fn` returned {o.dtype}{list(o.shape)}."
            )
