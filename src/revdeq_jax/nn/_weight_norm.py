"""Weight normalisation for the layers inside an equilibrium function."""

from typing import Any, Generic, TypeVar

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree


_Layer = TypeVar("_Layer")

DEFAULT_TYPES: tuple[type, ...] = (eqx.nn.Linear, eqx.nn.Conv, eqx.nn.ConvTranspose)


def _norm_except(v: Array, axis: int | None) -> Array:
    """$\\|v\\|$ over every axis but `axis` (kept as size-1 axes), in at least float32.

    Zero slices give 0 with finite gradients (the usual double `where`), instead of the
    NaN that differentiating `sqrt` at 0 gives."""
    dtype = jnp.promote_types(v.dtype, jnp.float32)
    axes = tuple(a for a in range(v.ndim) if a != axis)
    sq = jnp.sum(jnp.square(v.astype(dtype)), axis=axes, keepdims=True)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1)), 0)


class WeightNorm(eqx.Module, Generic[_Layer]):
    r"""Weight normalisation of one weight of a layer (Salimans & Kingma, 2016).

    Trains a direction $v$ and a magnitude $g$ in place of the weight $w$ and uses

    $w = g\,\frac{v}{\|v\|}$

    at call time, where the norm is over every axis but `axis` (the output axis: rows of
    an `eqx.nn.Linear` weight, output channels of an `eqx.nn.Conv2d` kernel), so $g$ holds
    one scale per output. $v$ stays in the wrapped layer under `weight_name`, and $g$ is
    initialised to $\|v\|$, so a freshly wrapped layer computes exactly what it did
    before. The DEQ transformer (Bai, Kolter & Koltun, 2019) and the multiscale DEQ (Bai,
    Koltun & Kolter, 2020) weight-normalise every linear and convolutional layer of their
    equilibrium function: it bounds how fast the layer's Lipschitz constant can move, which
    keeps the fixed-point problem solvable as training proceeds.
    [`revdeq_jax.nn.apply_weight_norm`][] wraps every such layer of a model at once.

    ```python
    linear = rdeq.nn.WeightNorm(eqx.nn.Linear(64, 64, key=key))
    y = linear(x)                     # as eqx.nn.Linear, with w = g v / ||v||
    linear.weight                     # the normalised weight w
    linear.g, linear.v                # the trained magnitude and direction
    ```

    Compared with `eqx.nn.WeightNorm`, which computes the same reparameterisation, this
    wrapper forwards every argument of the call (`layer(*args, **kwargs)`, so it also
    wraps layers taking several arguments, or a whole equilibrium function `f(z, x)`),
    exposes the normalised weight as `.weight` (blocks that read `self.conv.weight.dtype`,
    such as [`revdeq_jax.nn.ConvResidualLayer`][], keep working), computes the norm in at
    least float32 for low-precision weights, and gives a zero slice of $v$ a zero weight
    with zero (not NaN) gradients. To zero-initialise a weight-normalised layer, set `g` to
    zero, not `v`.

    ??? cite "References"

        ```bibtex
        @inproceedings{salimans2016weight,
            title={Weight Normalization: A Simple Reparameterization to Accelerate
                   Training of Deep Neural Networks},
            author={Salimans, Tim and Kingma, Durk P.},
            booktitle={Advances in Neural Information Processing Systems},
            volume={29},
            year={2016},
        }

        @inproceedings{bai2019deep,
            title={Deep Equilibrium Models},
            author={Bai, Shaojie and Kolter, J. Zico and Koltun, Vladlen},
            booktitle={Advances in Neural Information Processing Systems},
            volume={32},
            year={2019},
        }
        ```
    """

    layer: _Layer
    g: Array
    weight_name: str = eqx.field(static=True)
    axis: int | None = eqx.field(static=True)

    def __init__(self, layer: _Layer, weight_name: str = "weight", axis: int | None = 0):
        """**Arguments:**

        - `layer`: the layer to wrap, e.g. an `eqx.nn.Linear` or `eqx.nn.Conv2d`; any
          callable Module holding the weight as an attribute.
        - `weight_name`: the attribute of `layer` holding the weight (a floating array).
        - `axis`: the output axis, excluded from the norm (`0` for Equinox's `Linear`,
          `Conv` and `ConvTranspose`, whose weights are shaped `(out, in, ...)`). `None`
          normalises the whole weight by one norm, with a scalar $g$.
        """
        if not hasattr(layer, weight_name):
            raise ValueError(
                f"`layer` ({type(layer).__name__}) has no attribute `{weight_name}`: pass "
                "`weight_name=` naming the weight array to normalise."
            )
        v = getattr(layer, weight_name)
        if not eqx.is_inexact_array(v) or v.ndim == 0:
            raise TypeError(
                f"`{type(layer).__name__}.{weight_name}` must be a floating array with at "
                f"least one axis to be weight-normalised, got {v!r}."
            )
        if axis is not None:
            if isinstance(axis, bool) or not isinstance(axis, int):
                raise TypeError(f"`axis` must be an int or None, got {axis!r}.")
            if not -v.ndim <= axis < v.ndim:
                raise ValueError(
                    f"`axis={axis}` is out of range for `{weight_name}` of shape "
                    f"{tuple(v.shape)}; use the output axis (0 for Equinox's Linear and Conv)."
                )
            axis = axis % v.ndim
        self.layer = layer
        self.weight_name = weight_name
        self.axis = axis
        self.g = _norm_except(v, axis).astype(v.dtype)

    @property
    def v(self) -> Array:
        """The direction $v$: the wrapped layer's own (unnormalised) weight."""
        return getattr(self.layer, self.weight_name)

    @property
    def weight(self) -> Array:
        r"""The normalised weight $w = g\,v/\|v\|$, in the dtype of $v$."""
        v = self.v
        norm = _norm_except(v, self.axis)
        scale = jnp.where(norm > 0, self.g.astype(norm.dtype) / jnp.where(norm > 0, norm, 1), 0)
        return (v.astype(norm.dtype) * scale).astype(v.dtype)

    def normalised(self) -> _Layer:
        """The wrapped layer with its weight replaced by $w$ (differentiable in $g$, $v$)."""
        return eqx.tree_at(lambda l: getattr(l, self.weight_name), self.layer, self.weight)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calls the wrapped layer, with the normalised weight, on the same arguments."""
        return self.normalised()(*args, **kwargs)


def _is_wrapped(x: Any) -> bool:
    return isinstance(x, WeightNorm)


def apply_weight_norm(
    tree: PyTree,
    types: tuple[type, ...] = DEFAULT_TYPES,
    *,
    weight_name: str = "weight",
    axis: int | None = 0,
) -> PyTree:
    """Wraps every layer of the given types inside `tree` in a [`revdeq_jax.nn.WeightNorm`][].

    ```python
    layer = rdeq.nn.apply_weight_norm(rdeq.nn.ConvResidualLayer(64, 2, key=key))
    deq = rdeq.DEQ(layer)           # trains g and v of both convolutions
    ```

    **Arguments:**

    - `tree`: any PyTree of Modules: an equilibrium function, a `DEQ`, a whole model.
    - `types`: the layer types to wrap; by default `eqx.nn.Linear`, `eqx.nn.Conv` (which
      covers `Conv1d`/`Conv2d`/`Conv3d`) and `eqx.nn.ConvTranspose`, wherever they are
      nested (e.g. the projections inside `eqx.nn.MultiheadAttention`). Other layers
      (norms, embeddings) are left alone.
    - `weight_name`, `axis`: as for `WeightNorm`.

    **Returns:** `tree` with those layers wrapped; layers already inside a `WeightNorm` are
    left as they are, so applying it twice changes nothing.
    """
    types = tuple(types)

    def _wrap(x):
        if isinstance(x, types) and not _is_wrapped(x):
            return WeightNorm(x, weight_name=weight_name, axis=axis)
        return x

    return jtu.tree_map(_wrap, tree, is_leaf=lambda x: _is_wrapped(x) or isinstance(x, types))


def fold_weight_norm(tree: PyTree) -> PyTree:
    r"""Replaces every [`revdeq_jax.nn.WeightNorm`][] in `tree` by its layer holding the
    normalised weight $w = g\,v/\|v\|$.

    Differentiable: gradients with respect to the result's weights flow back to $g$ and
    $v$. Inside a DEQ the wrapped layers recompute $w$ at every evaluation of the
    equilibrium function (cheap next to the layer itself, but $2N$ times per solve with
    the reversible solver, and again in the backward pass); folding once at the start of
    the forward pass computes it once, as the DEQ transformer's `reset` does:

    ```python
    def loss(model, x, y):
        model = rdeq.nn.fold_weight_norm(model)   # w from (g, v), once per step
        return cross_entropy(model(x), y)         # gradients still reach g and v
    ```

    Also what to apply before exporting a trained model.
    """

    def _fold(x):
        return fold_weight_norm(x.normalised()) if _is_wrapped(x) else x

    return jtu.tree_map(_fold, tree, is_leaf=_is_wrapped)
