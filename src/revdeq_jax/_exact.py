r"""Bit-exact reversible arithmetic: a fixed-point state and an information buffer.

Reversing `y' = (1 - beta) y + beta f` in floating point divides by `1 - beta` and so
multiplies every rounding error of the forward step by `1 / |1 - beta|`: at depth the
reconstruction, and with it the gradient, is lost whatever the precision. Following
Maclaurin, Duvenaud & Adams (2015), this module makes the step *exactly* invertible
instead:

- the state is a fixed-point integer, $Y = y \cdot 2^F$ in int64;
- `beta` is a ratio of small integers $a / b$, so the update is integer arithmetic,
  $T = (b - a) Y + a\,Q(f)$ with $Q(f) = \mathrm{round}(f \cdot 2^F)$, followed by one
  division $Y' = \lfloor T / b \rfloor$ whose remainder $r = T - b Y' \in [0, b)$ is the
  only information the step destroys;
- that remainder is pushed onto a per-element *information buffer* of base-$b$ digits
  packed into uint32 words ($\lfloor 32 / \log_2 b \rfloor$ digits a word), so the
  inverse, $Y = (b Y' + r - a\,Q(f)) / (b - a)$, is exact division.

Given bit-identical evaluations of `f` on the way back (the same function of the same
bits), reversal rebuilds every state *to the bit*, so the gradient of
[`revdeq_jax.ReversibleAdjoint`][] equals the unrolled gradient of this very forward pass
at any depth. The price is the buffer: $2 \cdot 32 / \lfloor 32 / \log_2 b \rfloor$ bits
per element per step for the pair $(y, z)$ (2 for `beta = 1/2`, 4.9 for `beta = 0.8`, 7.1
for `beta = 0.9`), sized by `max_steps`, plus 2 x 64 bits for the state itself.

The state has an *absolute* resolution of $2^{-F}$ and a range of
$|x| < 2^{62 - F} / (|b - a| + a)$; a value outside it marks the element non-finite, as
an overflowing float would.

??? cite "References"

    ```bibtex
    @inproceedings{maclaurin2015gradient,
        title={Gradient-based Hyperparameter Optimization through Reversible Learning},
        author={Maclaurin, Dougal and Duvenaud, David and Adams, Ryan P.},
        booktitle={International Conference on Machine Learning},
        year={2015}
    }
    ```
"""

import fractions
import math

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, UInt32


MAX_DENOMINATOR = 1 << 16
_BAD = jnp.iinfo(jnp.int64).min  # marks an element that left the representable range


class ExactState(eqx.Module):
    """Selects the bit-exact reversible state: `Reversible(beta, state_dtype=ExactState())`.

    The coupled state is held as fixed-point int64 with `fraction_bits` fractional bits,
    and the bits each step shifts out are kept in a small information buffer, so that
    reversal is exact to the bit at any depth and the reversible gradient *equals* the
    unrolled gradient. `state_dtype="exact"` is shorthand for `ExactState()`.

    Needs `beta = a / b` with integers `b <= 65536` (0.5, 0.8, 0.9, 7/8, ... all qualify).
    Uses 64-bit integers, switched on only for the solver's own arithmetic; no 64-bit
    floats are involved, so it runs anywhere int64 does (natively on CPUs and GPUs,
    emulated on TPUs).

    **Memory:** the state takes 2 x 64 bits per element, and the buffer
    `2 * ceil(max_steps / d)` uint32 words per element, where `d = floor(32 / log2(b))`:
    about 2, 4.9 and 7.1 bits per element per step for `beta` = 0.5, 0.8 and 0.9.

    **Arguments:**

    - `fraction_bits`: $F$, the number of fractional bits. Values are resolved to
      $2^{-F}$ (absolute) and must stay below $2^{62-F} / (|b-a|+a)$ in magnitude
      (about 1e8 for the default 32 and `beta = 0.9`); layers with normalised outputs
      are far inside both limits.
    """

    fraction_bits: int = eqx.field(default=32, static=True)

    def __check_init__(self):
        if (
            isinstance(self.fraction_bits, bool)
            or not isinstance(self.fraction_bits, int)
            or not 8 <= self.fraction_bits <= 52
        ):
            raise ValueError(
                f"`ExactState(fraction_bits={self.fraction_bits!r})` must be an int in "
                "[8, 52]: the resolution is 2**-fraction_bits and the range 2**(62 - "
                "fraction_bits) / denominator."
            )


def rational_beta(beta: float) -> tuple[int, int]:
    """`beta` as an exact ratio `(a, b)` of integers with `b <= 65536`, or an error."""
    frac = fractions.Fraction(beta).limit_denominator(MAX_DENOMINATOR)
    if abs(float(frac) - beta) > 1e-12 * max(1.0, abs(beta)):
        raise ValueError(
            f"`Reversible(beta={beta}, state_dtype='exact')` needs `beta` to be a ratio "
            f"a / b of integers with b <= {MAX_DENOMINATOR}, such as 0.5, 0.8, 0.9 or "
            "7 / 8; the closest is "
            f"{frac.numerator}/{frac.denominator}. Round `beta` to such a ratio."
        )
    return frac.numerator, frac.denominator


class Exact(eqx.Module):
    """One leaf of the exact state: fixed-point value, information buffer, step count."""

    value: Int[Array, "*shape"]  # int64, units of 2**-F; `_BAD` marks overflow
    words: UInt32[Array, " num_words *shape"]  # base-b digits of the shifted-out bits
    count: Int[Array, ""]  # digits pushed so far (= steps taken)


class ExactArithmetic(eqx.Module):
    """The integer arithmetic of one configuration `(beta = a / b, F)`; static only.

    Must be used with 64-bit types enabled (the solver's state scope does this).
    """

    a: int = eqx.field(static=True)
    b: int = eqx.field(static=True)
    fraction_bits: int = eqx.field(static=True)

    @property
    def c(self) -> int:
        """`b - a`: `(1 - beta) = c / b`."""
        return self.b - self.a

    @property
    def digits_per_word(self) -> int:
        d = max(1, int(32 / math.log2(self.b)))
        while self.b ** (d + 1) <= 2**32:
            d += 1
        while self.b**d > 2**32:
            d -= 1
        return d

    @property
    def limit(self) -> int:
        """Largest magnitude (in units of 2**-F) whose update cannot overflow int64."""
        return (1 << 62) // (abs(self.c) + self.a)

    def bits_per_element_step(self) -> float:
        """Buffer bits per element per step, for one of `y` and `z`."""
        return 32 / self.digits_per_word

    def quantize(self, x: Float[Array, "*shape"]) -> Int[Array, "*shape"]:
        """`round(x * 2**F)` as int64, or `_BAD` where non-finite or out of range."""
        scaled = x.astype(jnp.float64) * float(2**self.fraction_bits)
        ok = jnp.abs(scaled) < float(self.limit)  # False for nan and inf too
        q = jnp.round(jnp.where(ok, scaled, 0.0)).astype(jnp.int64)
        return jnp.where(ok, q, _BAD)

    def encode(self, x: Float[Array, "*shape"], num_steps: int) -> Exact:
        num_words = -(-num_steps // self.digits_per_word)
        return Exact(
            value=self.quantize(x),
            words=jnp.zeros((num_words, *x.shape), jnp.uint32),
            count=jnp.zeros((), jnp.int32),
        )

    def decode(self, e: Exact, dtype) -> Array:
        x = e.value.astype(jnp.float64) * float(2.0**-self.fraction_bits)
        return jnp.where(e.value == _BAD, jnp.nan, x).astype(dtype)

    def _bad(self, v: Array) -> Array:
        return (v == _BAD) | (jnp.abs(v) > self.limit)

    def push(self, e: Exact, f: Array) -> Exact:
        """`(1 - beta) e + beta f`, remembering the remainder of the division by `b`."""
        q = self.quantize(f)
        bad = self._bad(e.value) | self._bad(q)
        t = self.c * jnp.where(bad, 0, e.value) + self.a * jnp.where(bad, 0, q)
        value = jnp.floor_divide(t, self.b)
        digit = (t - self.b * value).astype(jnp.uint32)
        idx = e.count // self.digits_per_word
        word = e.words[idx] * jnp.uint32(self.b) + digit
        return Exact(
            value=jnp.where(bad, _BAD, value),
            words=e.words.at[idx].set(word),
            count=e.count + 1,
        )

    def pop(self, e: Exact, f: Array) -> Exact:
        """Undoes `push(_, f)` exactly."""
        count = e.count - 1
        idx = count // self.digits_per_word
        word = e.words[idx]
        digit = (word % jnp.uint32(self.b)).astype(jnp.int64)
        q = self.quantize(f)
        bad = self._bad(e.value) | self._bad(q)
        t = self.b * jnp.where(bad, 0, e.value) + digit - self.a * jnp.where(bad, 0, q)
        value = t // self.c  # exact: t = c * y_prev by construction
        return Exact(
            value=jnp.where(bad, _BAD, value),
            words=e.words.at[idx].set(word // jnp.uint32(self.b)),
            count=count,
        )

    def difference(self, e: Exact, x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        """`e - quantize(x)`, as a float: zero iff `e` holds exactly the encoding of `x`."""
        d = (e.value - self.quantize(x)).astype(jnp.float64) * float(2.0**-self.fraction_bits)
        return jnp.where(e.value == _BAD, jnp.inf, d)
