"""Outcome of a fixed-point solve."""

import equinox as eqx
from jaxtyping import Array, Bool, Float, Int, PyTree


class RESULTS(eqx.Enumeration):
    """Result codes of [`revdeq_jax.fixed_point`][]; each carries its message."""

    successful = ""
    max_steps_reached = (
        "The fixed-point solver reached `max_steps` before the relative residual fell "
        "below `tol`. Increase `max_steps`, loosen `tol`, or lower the relaxation."
    )
    nonfinite = (
        "The fixed-point iteration produced a non-finite value (NaN or inf). A common "
        "cause is an `fn` that is not contractive; try a smaller `beta`."
    )


def classify(converged: Bool[Array, ""], finite: Bool[Array, ""], tol: float) -> RESULTS:
    """Result code from the final convergence and finiteness flags.

    With `tol == 0` the user asked for exactly `max_steps` steps, so running out of steps
    is success rather than failure.
    """
    ok = converged | (tol == 0)
    result = RESULTS.where(ok, RESULTS.successful, RESULTS.max_steps_reached)
    return RESULTS.where(finite, result, RESULTS.nonfinite)


class Solution(eqx.Module):
    """The fixed point found by [`revdeq_jax.fixed_point`][] and how it was found.

    Under `jax.vmap` every field is per example: one sample that fails does not change
    the values reported for the others.

    **Attributes:**

    - `value`: the approximate fixed point, a PyTree like `z0`.
    - `num_steps`: number of solver steps taken.
    - `residual`: relative residual $\\|f(z) - z\\| / \\|f(z)\\|$ at `value`.
    - `nfe`: number of evaluations of `fn` in the forward solve (the one evaluation at
      `z0` included).
    - `result`: a [`revdeq_jax.RESULTS`][] code: `successful`, `max_steps_reached` or
      `nonfinite`.
    - `max_steps`: the step budget.
    """

    value: PyTree[Array]
    num_steps: Int[Array, ""]
    residual: Float[Array, ""]
    nfe: Int[Array, ""]
    result: RESULTS
    max_steps: int = eqx.field(static=True)

    @property
    def converged(self) -> Bool[Array, ""]:
        """Whether `result` is `successful`."""
        return self.result == RESULTS.successful
