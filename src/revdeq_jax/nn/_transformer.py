"""The equilibrium transformer layer of the RevDEQ paper (eq. 7) and its parts."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, DTypeLike, Float, PRNGKeyArray

from ._dropout import VariationalDropout


def _cast_floats(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree)


class CausalSelfAttention(eqx.Module):
    """Multi-head self-attention over one sequence `(seq, dim)` with a causal mask:
    position `t` attends to positions `<= t` only."""

    qkv: eqx.nn.Linear
    out: eqx.nn.Linear
    num_heads: int = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        key: PRNGKeyArray,
        dtype: DTypeLike | None = None,
    ):
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        k1, k2 = jax.random.split(key)
        self.qkv = eqx.nn.Linear(dim, 3 * dim, key=k1, dtype=dtype)
        self.out = eqx.nn.Linear(dim, dim, key=k2, dtype=dtype)
        self.num_heads = num_heads

    def __call__(self, x: Float[Array, "seq dim"]) -> Float[Array, "seq dim"]:
        seq, dim = x.shape
        head_dim = dim // self.num_heads
        q, k, v = jnp.split(jax.vmap(self.qkv)(x), 3, axis=-1)
        q, k, v = (a.reshape(seq, self.num_heads, head_dim) for a in (q, k, v))
        scores = jnp.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim)
        causal = jnp.tril(jnp.ones((1, seq, seq), dtype=bool))
        # softmax in at least float32, also when the layer runs in bfloat16
        scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        heads = jnp.einsum("hqk,khd->qhd", weights, v).reshape(seq, dim)
        return jax.vmap(self.out)(heads)


class TransformerMLP(eqx.Module):
    """Two-layer GELU MLP applied at each position: `dim -> hidden -> dim`."""

    fc: eqx.nn.Linear
    proj: eqx.nn.Linear

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        key: PRNGKeyArray,
        dtype: DTypeLike | None = None,
    ):
        k1, k2 = jax.random.split(key)
        self.fc = eqx.nn.Linear(dim, hidden, key=k1, dtype=dtype)
        self.proj = eqx.nn.Linear(hidden, dim, key=k2, dtype=dtype)

    def __call__(self, x: Float[Array, "seq dim"]) -> Float[Array, "seq dim"]:
        return jax.vmap(lambda v: self.proj(jax.nn.gelu(self.fc(v))))(x)


class EquilibriumTransformerLayer(eqx.Module):
    """The equilibrium function `f(z, x)` of the RevDEQ language model (paper eq. 7):

        u = z + x
        h = LN(u + Attn(u))          # causal multi-head self-attention
        f(z, x) = LN(h + MLP(h))     # GELU MLP, hidden size mlp_ratio * dim

    acting on ONE sequence: `z, x` of shape `(seq, dim)` (vmap over the batch). This is the
    post-LN transformer block applied to `z + x`; `block(u)` is that block alone, which is
    what an explicit (non-equilibrium) transformer stacks.

    The second argument is either the input injection `x`, or a pair `(x, dropout_mask)`
    with a mask from `dropout_mask(...)`: variational dropout, sampled once per forward pass
    outside the solver (row 0 multiplies the attention output, row 1 the MLP output; each
    row is shared by all positions). The pair form plugs straight into `rdeq.DEQ`:

    ```python
    layer = EquilibriumTransformerLayer(dim, num_heads=8, key=key)
    deq = rdeq.DEQ(layer, solver=rdeq.Reversible(beta=0.5), adjoint=rdeq.ReversibleAdjoint())
    mask = layer.dropout_mask(p=0.1, key=dropout_key)
    z = deq((x, mask), jnp.zeros_like(x))
    ```

    `compute_dtype` (e.g. `jnp.bfloat16`) runs the layer in that precision (parameters and
    inputs cast on entry; LayerNorm statistics and the softmax in float32) and returns the
    result in the dtype of `z`, as a fixed-point function must.
    """

    attention: CausalSelfAttention
    ln_attention: eqx.nn.LayerNorm
    mlp: TransformerMLP
    ln_mlp: eqx.nn.LayerNorm
    compute_dtype: DTypeLike | None = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        mlp_ratio: int = 4,
        *,
        key: PRNGKeyArray,
        dtype: DTypeLike | None = None,
        compute_dtype: DTypeLike | None = None,
    ):
        k1, k2 = jax.random.split(key)
        self.attention = CausalSelfAttention(dim, num_heads, key=k1, dtype=dtype)
        self.ln_attention = eqx.nn.LayerNorm(dim, dtype=dtype)
        self.mlp = TransformerMLP(dim, mlp_ratio * dim, key=k2, dtype=dtype)
        self.ln_mlp = eqx.nn.LayerNorm(dim, dtype=dtype)
        self.compute_dtype = compute_dtype

    @property
    def dim(self) -> int:
        return self.ln_attention.shape[0]

    def dropout_mask(
        self, p: float, *, key: PRNGKeyArray | None = None, inference: bool = False
    ) -> Float[Array, "2 dim"]:
        """One variational dropout mask for a forward pass (all ones if `inference` or p=0)."""
        return VariationalDropout(p).mask((2, self.dim), key=key, inference=inference)

    def block(
        self,
        u: Float[Array, "seq dim"],
        dropout_mask: Float[Array, "2 dim"] | None = None,
    ) -> Float[Array, "seq dim"]:
        """The post-LN transformer block `LN(h + MLP(h))`, `h = LN(u + Attn(u))`."""
        out_dtype = u.dtype
        layer = self
        if self.compute_dtype is not None:
            layer = _cast_floats(self, self.compute_dtype)
            u = u.astype(self.compute_dtype)
        attn_out = layer.attention(u)
        if dropout_mask is not None:
            attn_out = attn_out * dropout_mask[None, 0].astype(attn_out.dtype)
        h = jax.vmap(layer.ln_attention)(u + attn_out)
        mlp_out = layer.mlp(h)
        if dropout_mask is not None:
            mlp_out = mlp_out * dropout_mask[None, 1].astype(mlp_out.dtype)
        out = jax.vmap(layer.ln_mlp)(h + mlp_out)
        return out.astype(out_dtype)

    def __call__(
        self,
        z: Float[Array, "seq dim"],
        x: Float[Array, "seq dim"] | tuple[Float[Array, "seq dim"], Float[Array, "2 dim"]],
    ) -> Float[Array, "seq dim"]:
        x, dropout_mask = x if isinstance(x, tuple) else (x, None)
        return self.block(z + x.astype(z.dtype), dropout_mask)
