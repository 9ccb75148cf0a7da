r"""Two-float ("double-float") arithmetic: about 48 significant bits from float32 pairs.

A value is held unevaluated as $x = x_{hi} + x_{lo}$ with $|x_{lo}| \le \tfrac12
\mathrm{ulp}(x_{hi})$. Sums and products are built from error-free transformations:
TwoSum (Knuth) gives $a + b = s + e$ exactly, and TwoProduct, by splitting into 12-bit
halves (Dekker), gives $a b = p + e$ to ~48 bits, using only float32 adds and
multiplies, so it runs on every backend without 64-bit types. Used by
`Reversible(state_dtype="float32x2")`.

The error-free transformations rely on IEEE round-to-nearest. XLA does not re-associate,
but its code generators contract `a * b - c` into a fused multiply-add, which breaks the
textbook TwoProduct (it assumes the product `p = a * b` is rounded where it is used;
measured: two-float products were only float32-accurate under `jit`, exact op by op,
and `lax.optimization_barrier` is removed before fusion). So products are formed only
from 12-bit halves (split by masking the significand), whose products are exact: an FMA
then has nothing to change.

??? cite "References"

    ```bibtex
    @article{dekker1971floating,
        title={A floating-point technique for extending the available precision},
        author={Dekker, Theodorus J.},
        journal={Numerische Mathematik}, volume={18}, pages={224--242}, year={1971}
    }
    ```
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float


class TwoFloat(eqx.Module):
    """An unevaluated float32 pair `hi + lo`."""

    hi: Float[Array, "*shape"]
    lo: Float[Array, "*shape"]


def _const(c: float) -> tuple[np.float32, np.float32]:
    """A Python float as a float32 pair (exact for the 48 leading bits)."""
    hi = np.float32(c)
    lo = np.float32(c - float(hi))
    return hi, lo


def two_sum(a: ArrayLike, b: ArrayLike) -> tuple[Array, Array]:
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e


def fast_two_sum(a: ArrayLike, b: ArrayLike) -> tuple[Array, Array]:
    """TwoSum when |a| >= |b| (or a == 0)."""
    s = a + b
    e = b - (s - a)
    return s, e


def _split(a: ArrayLike) -> tuple[Array, Array]:
    """`a = hi + lo` with each half holding at most 12 significant bits.

    Done by masking the low 12 bits of the significand rather than with Dekker's
    `(2^12 + 1) * a` trick, whose intermediate product XLA may contract into an FMA.
    """
    a = jnp.asarray(a, jnp.float32)
    bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
    hi = jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFF000), jnp.float32)
    return hi, a - hi


def two_prod(a: ArrayLike, b: ArrayLike) -> tuple[Array, Array]:
    """`a * b = p + e` to about 48 bits, from four exact 12-bit-by-12-bit products.

    Every product here is exact, so whether or not the compiler fuses it into an FMA
    cannot change the result.
    """
    ah, al = _split(a)
    bh, bl = _split(b)
    mid, mid_err = two_sum(ah * bl, al * bh)
    p, e = two_sum(ah * bh, mid)
    e = e + (mid_err + al * bl)
    return fast_two_sum(p, e)


def from_float(x: Array) -> TwoFloat:
    x = x.astype(jnp.float32)
    return TwoFloat(x, jnp.zeros_like(x))


def to_float(x: TwoFloat, dtype) -> Array:
    return (x.hi + x.lo).astype(dtype)


def add(x: TwoFloat, y: TwoFloat) -> TwoFloat:
    s, e = two_sum(x.hi, y.hi)
    t, f = two_sum(x.lo, y.lo)
    e = e + t
    s, e = fast_two_sum(s, e)
    e = e + f
    s, e = fast_two_sum(s, e)
    return TwoFloat(s, e)


def neg(x: TwoFloat) -> TwoFloat:
    return TwoFloat(-x.hi, -x.lo)


def scale(c: float, x: TwoFloat) -> TwoFloat:
    """`c * x` for a Python float `c`, itself taken as a float32 pair."""
    ch, cl = _const(c)
    p, e = two_prod(ch, x.hi)
    e = e + (ch * x.lo + cl * x.hi)
    return TwoFloat(*fast_two_sum(p, e))


def scale_float(c: float, x: Array) -> TwoFloat:
    """`c * x` for a Python float `c` and a plain float32 array `x`."""
    ch, cl = _const(c)
    x = x.astype(jnp.float32)
    p, e = two_prod(ch, x)
    e = e + cl * x
    return TwoFloat(*fast_two_sum(p, e))


def divide(x: TwoFloat, c: float) -> TwoFloat:
    """`x / c` for a Python float `c` (one Newton-style correction)."""
    ch, cl = _const(c)
    q1 = x.hi / ch
    p, e = two_prod(q1, ch)
    e = e + q1 * cl
    r = ((x.hi - p) - e) + x.lo
    q2 = r / ch
    return TwoFloat(*fast_two_sum(q1, q2))


def sub_float(x: TwoFloat, y: Array) -> Array:
    """`x - y` for a plain array `y`, rounded to float32 (for measuring deviations)."""
    d, e = two_sum(x.hi, y.astype(jnp.float32))
    return d + (e + x.lo)
