"""`jacobian_penalty`: a Hutchinson estimate of $\\|J_f(z)\\|_F^2$ for Jacobian regularisation."""

import numbers
from typing import Literal

import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ._custom_types import Args, Fn, Z
from ._misc import check_self_map
from .nn._deq import DEQ


_PROBES = ("rademacher", "gaussian")


def jacobian_penalty(
    fn: Fn,
    z: Z,
    args: Args = None,
    *,
    key: PRNGKeyArray,
    num_probes: int = 1,
    probe: Literal["rademacher", "gaussian"] = "rademacher",
) -> Float[Array, ""]:
    r"""Jacobian regularisation: an unbiased estimate of $\|J_f(z)\|_F^2 / d$.

    Here $J_f(z) = \partial f(z, \text{args}) / \partial z$ is the Jacobian of `fn` in its
    first argument, $d$ the number of elements of `z` (over all leaves of a PyTree state),
    and $\|\cdot\|_F$ the Frobenius norm over all leaves. Evaluated at the fixed point
    $z^*$ of a DEQ and added to the loss with a small weight, it keeps the layer from
    drifting towards instability during training: fewer solver steps for the same residual,
    and the forward and backward problems stay well conditioned (Bai, Koltun & Kolter,
    2021).

    It uses Hutchinson's estimator with vector-Jacobian products: for a probe $v$ with
    $\mathbb{E}[v v^\top] = I$ (drawn in the output space of $f$),
    $\mathbb{E}\,\|v^\top J\|^2 = \operatorname{tr}(J J^\top) = \|J\|_F^2$. One `jax.vjp`
    of `fn` at `z` is reused for all `num_probes` probes (vectorised with `jax.vmap`), so
    the cost is one forward and `num_probes` backward passes of `fn`, and differentiating
    the penalty costs about twice that again. The returned value is

    $\frac{1}{m d} \sum_{k=1}^{m} \|v_k^\top J_f(z)\|^2$

    with $m$ = `num_probes`, the normalisation of the paper's `jac_loss_estimate`
    (its division by the batch size too comes from taking the mean over a batch: see
    below). Its variance, with $A = J J^\top$, is

    - Rademacher probes ($v_i = \pm 1$, the default):
      $\frac{2}{m d^2}\big(\|A\|_F^2 - \sum_i A_{ii}^2\big)$;
    - Gaussian probes ($v \sim \mathcal{N}(0, I)$, as in the paper's code):
      $\frac{2}{m d^2}\|A\|_F^2$.

    Rademacher probes are never worse and are the default: they remove the contribution of
    the diagonal of $J J^\top$, whose entries (the squared norms of the rows of $J$) are
    all positive and dominate for the near-diagonal Jacobians of residual-style layers.
    Both estimate the same quantity, so `jac_reg` weights tuned with either carry over.

    **Arguments:**

    - `fn`: the equilibrium function, called as `fn(z, args)`; returns a PyTree with the
      structure, shapes and dtypes of `z`. For a [`revdeq_jax.DEQ`][] `deq`, pass
      `deq.layer`.
    - `z`: where to take the Jacobian, usually the fixed point `sol.value`. Any PyTree of
      floating arrays.
    - `args`: the other arguments of `fn`, e.g. the input injection $x$.
    - `key`: PRNG key for the probes (keyword only).
    - `num_probes`: the number of probe vectors $m$; the variance falls as $1/m$.
    - `probe`: `"rademacher"` (default) or `"gaussian"`.

    **Returns:** a scalar, in the wider of float32 and the dtype of `z` (squares are summed
    in at least float32, also for bfloat16 layers).

    Differentiable with respect to the arrays `fn` holds (its parameters), `args` and `z`.
    Whether gradients should also flow into $z^*$ is a modelling choice: the paper's code
    takes $z^*$ from a solve without gradients, so the penalty acts on the parameters only
    through $f$ at fixed $z^*$. Pass `jax.lax.stop_gradient(z)` to reproduce that; pass
    `sol.value` itself to also differentiate through the solve (with
    [`revdeq_jax.ReversibleAdjoint`][] this adds the penalty's cotangent of $z^*$ to the
    loss's, at no extra backward pass).

    Acts on one example, like [`revdeq_jax.DEQ`][]. For a batch, `jax.vmap` it with one key
    per example and take the mean:

    ```python
    z, sol = deq(x, return_solution=True)      # inside a vmapped per-example loss
    loss = task_loss + jac_reg * rdeq.jacobian_penalty(deq.layer, z, x, key=key)
    ```

    ??? cite "References"

        ```bibtex
        @inproceedings{bai2021stabilizing,
            title={Stabilizing Equilibrium Models by {J}acobian Regularization},
            author={Bai, Shaojie and Koltun, Vladlen and Kolter, J. Zico},
            booktitle={Proceedings of the 38th International Conference on Machine
                       Learning},
            series={Proceedings of Machine Learning Research},
            volume={139},
            pages={554--565},
            year={2021},
        }

        @article{hutchinson1989stochastic,
            title={A Stochastic Estimator of the Trace of the Influence Matrix for
                   {L}aplacian Smoothing Splines},
            author={Hutchinson, M. F.},
            journal={Communications in Statistics - Simulation and Computation},
            volume={18},
            number={3},
            pages={1059--1076},
            year={1989},
        }
        ```
    """
    if isinstance(fn, DEQ):
        raise TypeError(
            "`jacobian_penalty` takes the equilibrium function, not the `DEQ` wrapping it: "
            "call it as `jacobian_penalty(deq.layer, z, x, key=key)`."
        )
    if isinstance(num_probes, bool) or not isinstance(num_probes, numbers.Integral):
        raise TypeError(f"`num_probes` must be a Python int, got {type(num_probes).__name__}.")
    if num_probes < 1:
        raise ValueError(f"`num_probes={num_probes}` must be at least 1.")
    if probe not in _PROBES:
        raise ValueError(f"`probe` must be one of {_PROBES}, got {probe!r}.")
    z = jtu.tree_map(jnp.asarray, z)
    check_self_map(fn, z, args, name="z", empty="there is no Jacobian to regularise.")
    probes = _draw_probes(key, z, num_probes, probe)
    return hutchinson(fn, z, args, probes)


def hutchinson(fn: Fn, z: Z, args: Args, probes: PyTree) -> Float[Array, ""]:
    r"""$\frac{1}{m d}\sum_k \|v_k^\top J_f(z)\|^2$ for given probes $v_k$: a PyTree like
    `z` whose leaves have a leading axis of size $m$."""
    _, pullback = jax.vjp(lambda _z: fn(_z, args), z)
    (vjps,) = jax.vmap(pullback)(probes)
    leaves = jtu.tree_leaves(vjps)
    dtype = jnp.result_type(jnp.float32, *leaves)
    total = sum(jnp.sum(jnp.square(leaf.astype(dtype))) for leaf in leaves)
    num_probes = leaves[0].shape[0]
    dim = sum(leaf.size for leaf in jtu.tree_leaves(z))
    return total / jnp.asarray(num_probes * dim, dtype)


def _draw_probes(key: PRNGKeyArray, z: Z, num_probes: int, probe: str) -> PyTree:
    """`num_probes` probe vectors shaped like `z` (stacked on a leading axis), independent
    entries with mean 0 and variance 1, in the dtype of each leaf."""
    leaves, treedef = jtu.tree_flatten(z)
    keys = jr.split(key, len(leaves))
    out = []
    for k, leaf in zip(keys, leaves):
        shape = (num_probes, *leaf.shape)
        if probe == "rademacher":
            out.append(jr.rademacher(k, shape, dtype=leaf.dtype))
        else:
            # drawn in at least float32 then rounded, so a bfloat16 probe still has the
            # right distribution up to rounding
            wide = jnp.promote_types(leaf.dtype, jnp.float32)
            out.append(jr.normal(k, shape, dtype=wide).astype(leaf.dtype))
    return jtu.tree_unflatten(treedef, out)
