"""The convolutional residual equilibrium function of the RevDEQ paper (eq. 8)."""

import equinox as eqx
import jax
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray


def default_groups(channels: int) -> int:
    """GroupNorm groups for `channels`: one group per 16 channels (at least one)."""
    return max(1, channels // 16)


class ConvResidualLayer(eqx.Module):
    r"""Equilibrium function for images (RevDEQ paper, eq. 8):

    $f(z, x) = \mathrm{GN}\big(\mathrm{ReLU}(z + \mathrm{GN}(x + W_2 * \mathrm{ReLU}(\mathrm{GN}(W_1 * z))))\big)$

    where $W_1$ is a 3x3 convolution from `channels` to `width * channels`, $W_2$ a 3x3
    convolution back to `channels` (both 'same' padding, no bias), and GN is GroupNorm.
    Wrap it in `revdeq_jax.nn.DEQ` to get a RevDEQ block: `DEQ(ConvResidualLayer(64, 2, key=k))`.

    Acts on one image `(channels, height, width)`; `jax.vmap` it over a batch. The state `z`
    may be kept in a wider dtype than the weights (mixed precision): `z` and `x` are cast to
    the weights' dtype for the convolutions, and the result is cast back to `z`'s dtype.
    """  # noqa: E501

    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    norm1: eqx.nn.GroupNorm
    norm2: eqx.nn.GroupNorm
    norm3: eqx.nn.GroupNorm
    channels: int = eqx.field(static=True)
    width: int = eqx.field(static=True)

    def __init__(
        self,
        channels: int,
        width: int = 2,
        *,
        groups: int | None = None,
        dtype=None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `channels`: channels of `z` and `x`.
        - `width`: width expansion of the hidden convolution (`width * channels` channels).
        - `groups`: GroupNorm groups for the `channels`-wide norms (default `channels // 16`,
          at least 1); the hidden norm uses `width * groups`.
        - `dtype`: parameter dtype (default: JAX's default float).
        - `key`: PRNG key for the convolution weights.
        """
        if channels < 1 or width < 1:
            raise ValueError(
                f"`channels` and `width` must be positive, got channels={channels}, width={width}."
            )
        groups = default_groups(channels) if groups is None else groups
        if channels % groups:
            raise ValueError(f"`groups`={groups} must divide `channels`={channels}.")
        k1, k2 = jr.split(key)
        hidden = width * channels
        self.conv1 = eqx.nn.Conv2d(
            channels, hidden, 3, padding=1, use_bias=False, dtype=dtype, key=k1
        )
        self.conv2 = eqx.nn.Conv2d(
            hidden, channels, 3, padding=1, use_bias=False, dtype=dtype, key=k2
        )
        self.norm1 = eqx.nn.GroupNorm(width * groups, hidden, dtype=dtype)
        self.norm2 = eqx.nn.GroupNorm(groups, channels, dtype=dtype)
        self.norm3 = eqx.nn.GroupNorm(groups, channels, dtype=dtype)
        self.channels = channels
        self.width = width

    def __call__(
        self,
        z: Float[Array, "channels height width"],
        x: Float[Array, "channels height width"],
    ) -> Float[Array, "channels height width"]:
        dtype = self.conv1.weight.dtype
        z_in = z.astype(dtype)
        h = jax.nn.relu(self.norm1(self.conv1(z_in)))
        out = self.norm3(jax.nn.relu(z_in + self.norm2(x.astype(dtype) + self.conv2(h))))
        return out.astype(z.dtype)
