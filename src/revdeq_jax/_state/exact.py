r"""Bit-exact reversible arithmetic: a fixed-point state, an information buffer, and a
lattice that snaps the backward pass's re-evaluations onto the forward's values.

Reversing `y' = (1 - beta) y + beta f` in floating point divides by `1 - beta` and so
multiplies every rounding error of the forward step by `1 / |1 - beta|`: at depth the
reconstruction, and with it the gradient, is lost whatever the precision. Following
Maclaurin, Duvenaud & Adams (2015), the step is made *exactly* invertible instead:

- the state is a fixed-point integer, $Y = y \cdot 2^F$ in int64;
- `beta` is a ratio of small integers $a / b$ (with $c = b - a$), so the update is integer
  arithmetic, $T = c\,Y + a\,Q$, followed by one division $Y' = \lfloor T / b \rfloor$
  whose remainder $r = T - b Y' \in [0, b)$ is the only information the step destroys;
- that remainder is pushed onto a per-element *information buffer* of digits packed into
  uint32 words, so the inverse, $Y = (b Y' + r - a\,Q) / c$, is exact division.

This is exact only if the backward pass uses the very integer $Q$ the forward pass
added. But $Q$ comes from $f$, which the backward pass evaluates again in a separately
compiled program (inside `jax.vjp`, under other fusions, batched by `vmap`, on a GPU with
another reduction order), and nothing in XLA promises the same bits: one unit of $Q$ off
shifts the reconstruction by $a/c$ units, which then grows by about $b/c$ per step. So
$Q$ is made recoverable from an *approximate* re-evaluation:

- **A lattice.** $f$ is rounded to a lattice of spacing $U = 2^{u}$, $2^k$ ulps (of `fn`'s
  dtype) at the leaf's largest magnitude: $u = \lfloor \log_2 \max|f| \rfloor - p + k$ for
  a dtype with $p$ mantissa bits (and $u \ge -F$). The lattice index is
  $L = \mathrm{round}(f / U)$ and $Q = L \cdot 2^{u + F}$. The exponent $u$ of every
  evaluation is stored (one int32 per leaf per step).
- **Guard bits.** The low $m$ bits $g = L \bmod 2^m$ are stored with the remainder, as one
  digit of radix $b \cdot 2^m$. The backward pass computes $X' = f' / U$ from its
  re-evaluation $f'$ and takes the integer $\equiv g \pmod{2^m}$ nearest to it, which is
  $L$ whenever $|X' - L| < 2^{m-1}$: that is, whenever every element of the
  re-evaluation lies within $(2^{m-1} - \tfrac12)\,U$ of the forward's value.

- **Refinement.** A digit of radix $b \cdot 2^m$ rarely fills its share of a word (at
  `beta = 0.8`, three digits of radix 320 take 25 of 32 bits). The $e$ largest number of
  guard bits more that keeps the same digits per word is spent on a lattice $2^e$ times
  finer: $(k, m) \to (k - e, m + e)$, the same tolerance (slightly more) and the same
  buffer, $2^e$ times less rounding. $e = 1, 2, 1$ at `beta` = 0.5, 0.8, 0.9.

With the defaults ($k = 0$, $m = 6$, refined) the lattice is $2^{-e}$ ulps (of `fn`'s
dtype) of the largest element's binade, `fn`'s output is rounded to within half of that,
and reversal is **exact to the bit whenever the re-evaluation is within 31.5 ulps** (of
that binade; 31.75 to 31.875 after refinement) of the forward's value, element by
element. The rounding is the price: it applies to every element of the leaf at the
resolution of its largest, which for the leaf's small elements can be coarser than
`fn`'s own rounding (`benchmarks/results/precision.md` gives measured gradient errors).
For the same tolerance, each guard bit more halves the rounding. A re-evaluation further
off is not silently absorbed: the reconstruction of `z0` then misses (with overwhelming
probability), which
[`revdeq_jax.ReversibleAdjoint`][] checks on every backward pass.

The guard bits are the information-theoretic price of the tolerance: recovering a
lattice index from an estimate that may be off by $\pm T$ lattice units needs
$\log_2(2T + 1)$ bits per element, whatever the encoding; only a smaller tolerance or a
coarser lattice (more rounding) makes the buffer smaller.

**Memory.** Per element, the state takes 2 x 64 bits, and each step pushes one digit of
radix $b \cdot 2^m$ for each of $y$ and $z$, packed $d = \lfloor 32 / \log_2(b 2^m)
\rfloor$ to a uint32 word: $2 \cdot 32 / d$ bits per element per step (16, 21.3 and
21.3 for `beta` = 0.5, 0.8, 0.9 with $m = 6$), sized by `max_steps`, each word filled
least significant digit first. The backward pass only reads the buffer (a step's digit is
found from its index), so the reversed loop never writes it back. The buffer grows
with `max_steps`; it is still far below storing the iterates (2 x 32 bits per element
per step for a float32 `fn`).

The state has an *absolute* resolution of $2^{-F}$ and a range of
$|x| < 2^{62 - F} / (|c| + a)$ (about 4e8 for the default $F = 32$ and `beta = 0.9`); a
value outside it marks the element non-finite, as an overflowing float would.

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

import contextlib
import dataclasses
import fractions
import math
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PyTree, UInt32

from .base import AbstractState, refuse_wide_z0, x64_scope


MAX_DENOMINATOR = 1 << 16
MAX_GUARD_BITS = 16  # a digit, remainder and guard bits, must fit a uint32: b * 2**m <= 2**32
_BAD = jnp.iinfo(jnp.int64).min  # marks an element that left the representable range
_SNAP_FRACTION_BITS = 16  # fractional bits of the re-evaluation's lattice coordinate


def _digits_per_word(radix: int) -> int:
    """How many digits of `radix` one uint32 word holds."""
    d = max(1, int(32 / math.log2(radix)))
    while radix ** (d + 1) <= 2**32:
        d += 1
    while radix**d > 2**32:
        d -= 1
    return d


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
    """One leaf of the exact state."""

    value: Int[Array, "*shape"]  # int64, units of 2**-F; `_BAD` marks overflow
    words: UInt32[Array, " num_words *shape"]  # digits (remainder, guard bits) per step
    shifts: Int[Array, " capacity"]  # lattice exponent u of each pushed f
    count: Int[Array, ""]  # digits pushed so far (= steps taken)
    drift: Float[Array, ""]  # largest |f' - f| met when popping, in ulps of max|f|


def _mantissa_bits(dtype: Any) -> int:
    return int(jnp.finfo(dtype).nmant)


def _float_parts(f: Array) -> tuple[Array, Array, Array, Array]:
    """`f` (at most 32-bit) as `(negative, M, e, finite)` with `|f| = M * 2**e` exactly."""
    bits = jax.lax.bitcast_convert_type(f.astype(jnp.float32), jnp.int32)
    field = (bits >> 23) & 0xFF
    mantissa = (bits & 0x7FFFFF).astype(jnp.int64)
    m = jnp.where(field > 0, mantissa | 0x800000, mantissa)
    e = (jnp.maximum(field, 1) - 150).astype(jnp.int64)
    return bits < 0, m, e, field != 0xFF


def _to_grid(negative: Array, m: Array, e: Array, g: Array) -> tuple[Array, Array]:
    """`round(±m * 2**(e - g))` as int64 (half away from zero), and whether it fit."""
    d = e - g
    left = m << jnp.clip(d, 0, 38)  # m < 2**24: no overflow for d <= 38
    s = jnp.clip(-d, 1, 40)
    right = (m + (jnp.int64(1) << (s - 1))) >> s
    mag = jnp.where(d >= 0, left, right)
    return jnp.where(negative, -mag, mag), d <= 38


class ExactState(AbstractState):
    r"""The bit-exact reversible state: `Reversible(beta, state_dtype="exact")`.

    The coupled state is held as fixed-point int64 with `fraction_bits` fractional bits,
    `beta` as a ratio $a / b$, and every bit a step shifts out is kept in an information
    buffer, so the inverse step is exact integer arithmetic. `fn`'s output is rounded to
    a lattice of $2^k$ ulps (at the leaf's largest magnitude) and $m$ guard bits of it
    are stored, so that the backward pass snaps its re-evaluation of `fn` back onto the
    value the forward pass used: **reversal is exact to the bit whenever every element of
    the re-evaluation lies within $(2^{m-1} - \frac12) \cdot 2^k$ ulps of the forward's
    value** (at least 31.5 ulps with the defaults), whatever XLA does to `fn` in the
    backward program. The reversible gradient then *equals* the unrolled gradient of the
    forward pass, at any depth. See the module documentation of `revdeq_jax._state.exact`
    for the derivation.

    Needs `beta = a / b` with integers `b <= 65536` (0.5, 0.8, 0.9, 7/8, ... all qualify)
    and a `z0` of at most 32-bit floats (a float64 `z0` would be rounded to the
    $2^{-F}$ grid: use `state_dtype=None` there). Uses 64-bit integers, switched on only
    for the solver's own arithmetic; no 64-bit floats.

    **Memory:** 2 x 64 bits per element for the state, $2 \cdot 32 / \lfloor 32 /
    \log_2(b\,2^m) \rfloor$ buffer bits per element per step (16, 21.3 and 21.3 for
    `beta` = 0.5, 0.8, 0.9 with the defaults), sized by `max_steps`, and one int32 per leaf
    per step.

    **Arguments:**

    - `fraction_bits`: $F$. Values are resolved to $2^{-F}$ (absolute) and must stay below
      $2^{62-F} / (|b - a| + a)$ in magnitude (about 4e8 for 32 and `beta = 0.9`).
    - `lattice_bits`: $k$, the lattice spacing is $2^k$ ulps of `fn`'s dtype at the leaf's
      largest magnitude, so `fn`'s output is rounded to within $2^{k-1}$ of them.
      Negative values make it finer than `fn`'s own ulp there (the leaf's smaller
      elements are then rounded less).
    - `guard_bits`: $m$, bits of the lattice index stored per evaluation. Each one more
      doubles the tolerance for the same rounding (or halves the rounding for the same
      tolerance) and costs one bit per element per evaluation. `0` switches the lattice
      off (`fn`'s output is rounded to the $2^{-F}$ grid, and nothing is stored): exact
      only if the backward pass's re-evaluation of `fn` returns the forward's bits, which
      XLA does not promise; for measuring what the lattice costs.
    - `refine`: spend the guard bits the buffer's packing would leave unused on a finer
      lattice, $(k, m) \to (k - e, m + e)$ for the largest $e$ that packs as many digits
      per word ($e = 1, 2, 1$ at `beta` = 0.5, 0.8, 0.9 with $m = 6$): same buffer, same
      tolerance, $2^e$ times less rounding. `bits_in_use(beta)` gives the result.
    """

    fraction_bits: int = eqx.field(default=32, static=True)
    lattice_bits: int = eqx.field(default=0, static=True)
    guard_bits: int = eqx.field(default=6, static=True)
    refine: bool = eqx.field(default=True, static=True)
    capacity: int | None = eqx.field(default=None, static=True, repr=False)
    ratio: tuple[int, int] | None = eqx.field(default=None, static=True, repr=False)

    differentiable: ClassVar[bool] = False

    def __check_init__(self):
        def _int_in(x, lo, hi):
            return not isinstance(x, bool) and isinstance(x, int) and lo <= x <= hi

        if not _int_in(self.fraction_bits, 8, 52):
            raise ValueError(
                f"`ExactState(fraction_bits={self.fraction_bits!r})` must be an int in "
                "[8, 52]: the resolution is 2**-fraction_bits and the range 2**(62 - "
                "fraction_bits) / denominator."
            )
        if not _int_in(self.lattice_bits, -MAX_GUARD_BITS, MAX_GUARD_BITS):
            raise ValueError(
                f"`ExactState(lattice_bits={self.lattice_bits!r})` must be an int in "
                f"[{-MAX_GUARD_BITS}, {MAX_GUARD_BITS}]: `fn`'s output is rounded to "
                "2**lattice_bits ulps."
            )
        if not _int_in(self.guard_bits, 0, MAX_GUARD_BITS):
            raise ValueError(
                f"`ExactState(guard_bits={self.guard_bits!r})` must be an int in "
                f"[0, {MAX_GUARD_BITS}]."
            )
        if not isinstance(self.refine, bool):
            raise ValueError(f"`ExactState(refine={self.refine!r})` must be a bool.")

    # --- configuration -------------------------------------------------------------------

    def check_beta(self, beta: float) -> None:
        rational_beta(beta)

    def check(self, z0: PyTree[Array]) -> None:
        refuse_wide_z0(
            z0,
            lambda dtype: (
                f"`state_dtype='exact'` holds a fixed-point grid of 2**-"
                f"{self.fraction_bits}, coarser than the {dtype} `z0`: it would round the "
                'model\'s state. Use `state_dtype=None` (a float64 state) or `"auto"` for a '
                "float64 model."
            ),
        )

    def resolve(
        self, z0: PyTree[Array], beta: float, max_steps: int, differentiable: bool = False
    ) -> "ExactState":
        del differentiable  # the adjoint says whether it can use integer arithmetic
        self.check(z0)
        self.check_beta(beta)
        return dataclasses.replace(self, capacity=max_steps, ratio=rational_beta(beta))

    def scope(self) -> contextlib.AbstractContextManager:
        return x64_scope()

    def is_leaf(self, x: Any) -> bool:
        return isinstance(x, Exact)

    def append_only(self, x: Exact) -> PyTree[bool]:
        # A step writes the digit and the exponent of step `count` (replacing what is
        # there) and nothing below it; the backward pass reads steps < `count` only.
        flags = jax.tree_util.tree_map(lambda _: False, x)
        return eqx.tree_at(lambda e: (e.words, e.shifts), flags, (True, True))

    def bits_in_use(self, beta: float | None = None) -> tuple[int, int]:
        """`(lattice_bits, guard_bits)` as used at this `beta` (by default the resolved
        one; without either, the nominal ones): with `refine`, the nominal ones refined by
        the bits the buffer's packing would otherwise leave unused."""
        if beta is not None:
            return self._bits(rational_beta(beta)[1])
        if self.ratio is not None:
            return self._bits(self.ratio[1])
        return self.lattice_bits, self.guard_bits

    def tolerance_ulps(self, beta: float | None = None) -> float:
        r"""The guaranteed tolerance: reversal is exact whenever every element of a
        re-evaluation of `fn` lies (strictly) within this many ulps (of `fn`'s dtype, at the
        binade of the leaf's largest magnitude) of the forward's value. At the given (or
        resolved) `beta`, with `refine`, this is slightly more than the nominal
        $(2^{m-1} - \frac12) \cdot 2^k$ (31.75 rather than 31.5 at `beta = 0.9`)."""
        k, m = self.bits_in_use(beta)
        if m == 0:
            return 0.0
        return (2 ** (m - 1) - 0.5) * 2.0**k

    def rounding_ulps(self, beta: float | None = None) -> float:
        """The largest rounding of `fn`'s output by the lattice, in ulps (of `fn`'s dtype, at
        the binade of the leaf's largest magnitude): half the lattice spacing, or 0 without a
        lattice (`fn` is then rounded to the state's grid only)."""
        k, m = self.bits_in_use(beta)
        return 0.0 if m == 0 else 2.0 ** (k - 1)

    def mismatch_advice(self, drift: float) -> str:
        m, k = self.guard_bits, self.lattice_bits
        if m == 0:
            return (
                "This exact state has no lattice (`guard_bits=0`): it is exact only if "
                "the backward pass re-evaluates `fn` to the same bits. Use the default "
                "`ExactState()` (guard bits 6)."
            )
        wider = dataclasses.replace(self, guard_bits=min(m + 2, MAX_GUARD_BITS))
        if self.ratio is None:
            cost = f"for {wider.guard_bits - m} more buffer bits per element per evaluation"
        else:
            b = self.ratio[1]
            bits = 2 * 32 / self._digits_per_word(b)
            more = 2 * 32 / wider._digits_per_word(b) - bits
            cost = (
                f"for {more:.3g} more buffer bits per element per step (this one takes {bits:.3g})"
                if more > 0
                else f"at the same buffer size ({bits:.3g} bits per element per step)"
            )
        return (
            f"The backward pass re-evaluated `fn` up to {drift:.3g} ulps away from the "
            f"forward's values, where this state (`guard_bits={m}, lattice_bits={k}`) "
            f"tolerates {self.tolerance_ulps():g} ulps (beyond it the measured drift "
            "saturates, so the real one may be larger). Wide reductions in `fn` (layers of "
            "hundreds of units, evaluated per example under `vmap`) re-associate sums "
            f"differently in the backward program. `ExactState(guard_bits={wider.guard_bits})`"
            f" tolerates {wider.tolerance_ulps():g} ulps {cost}; or evaluate `fn` on the "
            "whole batch."
        )

    def digits_per_word(self, beta: float) -> int:
        """How many steps' digits (remainder and guard bits) one uint32 word holds."""
        return self._digits_per_word(rational_beta(beta)[1])

    def buffer_bits_per_step(self, beta: float) -> float:
        """Buffer bits per state element per step, for `y` and `z` together."""
        return 2 * 32 / self.digits_per_word(beta)

    # --- integer arithmetic (64-bit types must be on: see `scope`) -----------------------

    def _ratio(self) -> tuple[int, int, int]:
        if self.ratio is None or self.capacity is None:
            raise ValueError(
                "An exact reversible state needs `beta` and the number of steps (to size "
                "its buffer); run the solver through `fixed_point` or `DEQ` (which call "
                "`solver.prepare(z0, max_steps)`), or call that yourself first."
            )
        a, b = self.ratio
        return a, b, b - a

    def _bits(self, b: int) -> tuple[int, int]:
        """`(k, m)` in use at denominator `b`. A digit of radix `b * 2**m` often leaves
        bits of its uint32 word unused (at `beta = 0.8`, three digits of radix 320 fill 25
        of 32 bits); with `refine`, `e` more guard bits that keep the same number of digits
        per word go to a lattice `2**e` times finer: the same tolerance, the same buffer,
        `2**e` times less rounding of `fn`."""
        k, m = self.lattice_bits, self.guard_bits
        if not self.refine or m == 0:
            return k, m
        d = _digits_per_word(b << m)
        e = 0
        while m + e < MAX_GUARD_BITS and _digits_per_word(b << (m + e + 1)) == d:
            e += 1
        return k - e, m + e

    def _radix(self, b: int) -> int:
        return b << self._bits(b)[1]

    def _digits_per_word(self, b: int) -> int:
        return _digits_per_word(self._radix(b))

    def _position(self, count: Array, b: int) -> tuple[Array, Array]:
        """Where the digit of step `count` lives: its word, and its place value there
        (`radix**j` for the `j`-th digit of the word, least significant first)."""
        d = self._digits_per_word(b)
        places = jnp.asarray([self._radix(b) ** j for j in range(d)], jnp.uint32)
        return count // d, places[count % d]

    def _limit(self) -> int:
        """Largest magnitude (units of 2**-F) whose update cannot overflow int64."""
        a, _, c = self._ratio()
        return (1 << 62) // (abs(c) + a)

    def _bad(self, v: Array) -> Array:
        return (v == _BAD) | (jnp.abs(v) > self._limit())

    def _lattice_exponent(self, f: Array, b: int) -> Array:
        """`u`: the lattice spacing is `2**u`, 2**k ulps of `f`'s dtype at `max|f|`."""
        k, m = self._bits(b)
        if m == 0:  # no lattice: the state's own grid
            return jnp.full((), -self.fraction_bits, jnp.int32)
        magnitude = jnp.where(jnp.isfinite(f), jnp.abs(f.astype(jnp.float32)), jnp.float32(0))
        top = jnp.max(magnitude, initial=jnp.float32(0))
        field = (jax.lax.bitcast_convert_type(top, jnp.int32) >> 23) & 0xFF
        ulp32 = jnp.maximum(field, 1) - 150  # exponent of a float32 ulp at max|f|
        u = ulp32 + (23 - _mantissa_bits(f.dtype)) + k
        return jnp.maximum(u, -self.fraction_bits).astype(jnp.int32)

    def _quantize(self, z0: Array) -> Array:
        """`round(z0 * 2**F)`, or `_BAD` where non-finite or out of range."""
        negative, m, e, finite = _float_parts(z0)
        value, fits = _to_grid(negative, m, e, jnp.int64(-self.fraction_bits))
        return jnp.where(finite & fits & (jnp.abs(value) <= self._limit()), value, _BAD)

    def encode(self, z0: Array) -> Exact:
        _, b, _ = self._ratio()
        num_words = -(-self.capacity // self._digits_per_word(b))
        return Exact(
            value=self._quantize(z0),
            words=jnp.zeros((num_words, *z0.shape), jnp.uint32),
            shifts=jnp.zeros((self.capacity,), jnp.int32),
            count=jnp.zeros((), jnp.int32),
            drift=jnp.zeros((), jnp.float32),
        )

    def decode(self, x: Exact, dtype: Any) -> Array:
        v = x.value.astype(jnp.float32) * jnp.float32(2.0**-self.fraction_bits)
        return jnp.where(x.value == _BAD, jnp.float32(jnp.nan), v).astype(dtype)

    def update(self, x: Exact, f: Array, beta: float) -> Exact:
        del beta  # held exactly as `self.ratio`
        a, b, c = self._ratio()
        _, m = self._bits(b)
        negative, mant, e, finite = _float_parts(f)
        u = self._lattice_exponent(f, b)
        lattice, _ = _to_grid(negative, mant, e, u.astype(jnp.int64))  # right shifts only
        q = lattice << (u + self.fraction_bits).astype(jnp.int64)
        limit = float(self._limit() >> 1) * 2.0**-self.fraction_bits
        in_range = jnp.abs(f.astype(jnp.float32)) < limit
        full = x.count >= self.capacity  # only when driven by hand past `max_steps`
        bad = self._bad(x.value) | ~finite | ~in_range | full
        t = c * jnp.where(bad, 0, x.value) + a * jnp.where(bad, 0, q)
        value = jnp.floor_divide(t, b)
        remainder = t - b * value
        guard = lattice & ((1 << m) - 1)
        digit = (remainder + b * guard).astype(jnp.uint32)
        idx, place = self._position(x.count, b)
        # The digit of step `count` *replaces* what its place holds (0, unless a batched
        # loop ran this step for an example that had already stopped: see
        # `append_only`); the digits below it, the steps taken, are kept.
        old = x.words[idx]
        stale = (old // place) % jnp.uint32(self._radix(b))
        word = old + (digit - stale) * place  # digits < radix, radix**d <= 2**32: no overflow
        return Exact(
            value=jnp.where(bad, _BAD, value),
            words=x.words.at[idx].set(word, mode="drop"),
            shifts=x.shifts.at[x.count].set(u, mode="drop"),
            count=x.count + 1,
            drift=x.drift,
        )

    def invert(self, x: Exact, f: Array, beta: float) -> Exact:
        del beta
        a, b, c = self._ratio()
        k, m = self._bits(b)
        g_bits = _SNAP_FRACTION_BITS if m else 0
        count = x.count - 1
        idx, place = self._position(count, b)
        # Read only: the buffer is never written on the way back, so the backward loop
        # carries it unchanged (no copy of it per step).
        digit = ((x.words[idx] // place) % jnp.uint32(self._radix(b))).astype(jnp.int64)
        remainder, guard = digit % b, digit // b
        u = x.shifts[count].astype(jnp.int64)
        # The re-evaluation's lattice coordinate, with `g_bits` fractional bits, snapped to
        # the nearest integer whose low `m` bits are the stored guard.
        negative, mant, e, finite = _float_parts(f)
        coord, fits = _to_grid(negative, mant, e, u - g_bits)
        if m == 0:  # no lattice: the re-evaluation is used as it is
            lattice = coord
        else:
            offset = coord - (guard << g_bits) + (jnp.int64(1) << (m + g_bits - 1))
            lattice = guard + ((offset >> (m + g_bits)) << m)
        miss = jnp.abs(coord - (lattice << g_bits)).astype(jnp.float32) * 2.0 ** (k - g_bits)
        drift = jnp.maximum(x.drift, jnp.max(jnp.where(finite, miss, jnp.float32(jnp.inf))))
        q = lattice << (u + self.fraction_bits)
        bad = self._bad(x.value) | ~finite | ~fits
        t = b * jnp.where(bad, 0, x.value) + remainder - a * jnp.where(bad, 0, q)
        value = t // c  # exact: t = c * y_prev by construction
        return Exact(
            value=jnp.where(bad, _BAD, value),
            words=x.words,
            shifts=x.shifts,
            count=count,
            drift=drift,
        )

    def deviation(self, x: Exact, z0: Array) -> Float[Array, "*shape"]:
        ref = self._quantize(z0)
        d = (x.value - ref).astype(jnp.float32) * jnp.float32(2.0**-self.fraction_bits)
        return jnp.where((x.value == _BAD) | (ref == _BAD), jnp.float32(jnp.inf), d)

    def mismatch(self, x: Exact, z0: Array, rtol: float | None) -> Bool[Array, ""]:
        del rtol  # exact: any difference at all is a mismatch
        ref = self._quantize(z0)
        return jnp.any(x.value != ref) | jnp.any(x.value == _BAD)
