"""Outcome of a fixed-point solve."""

import equinox as eqx
from jaxtyping import Array, Bool, Float, Int, PyTree


class RESULTS(eqx.Enumeration):
    """Result codes of [`revdeq_jax.fixed_point`][]; each carries its message."""

    successful = ""
    max_steps_reached = (
        "The fixed-point solver reached `max_steps` before ||f(z) - z|| fell to "
        "`atol + rtol * ||f(z)||` (RMS norms). Increase `max_steps`, loosen `rtol` (alias "
        "`tol`), set an absolute tolerance `atol` (needed when the fixed point is at or "
        "near 0, where the relative residual does not fall), or lower the relaxation."
    )
    nonfinite = (
        "The fixed-point iteration produced a non-finite value (NaN or inf). A common "
        "cause is an `fn` that is not contractive; try a smaller `beta`."
    )


def classify(
    converged: Bool[Array, ""], finite: Bool[Array, ""], has_stopping_test: bool
) -> RESULTS:
    """Result code from the final convergence and finiteness flags.

    Without a stopping test (`rtol = atol = 0`) the user asked for exactly `max_steps`
    steps, so running out of steps is success rather than failure.
    """
    ok = converged | (not has_stopping_test)
    result = RESULTS.where(ok, RESULTS.successful, RESULTS.max_steps_reached)
    return RESULTS.where(finite, result, RESULTS.nonfinite)


class Solution(eqx.Module):
    """The fixed point found by [`revdeq_jax.fixed_point`][] and how it was found.

    Under `jax.vmap` every field is per example: one sample that fails does not change
    the values reported for the others.

    **Attributes:**

    - `value`: the approximate fixed point, a PyTree like `z0`.
    - `num_steps`: number of solver steps taken.
    - `residual`: the relative residual $\\|f(z) - z\\|_2 / \\|f(z)\\|_2$ at `value`
      (over all leaves; 0 when $f(z) = z = 0$), in float32.
    - `abs_residual`: the absolute residual $\\|f(z) - z\\|_\\mathrm{rms}$ at `value`,
      the root mean square over all elements of all leaves, in float32. The solve
      stopped successfully when `abs_residual <= atol + rtol * ||f(z)||_rms`; for a
      contraction with constant $k$ the error $\\|z - z^*\\|_\\mathrm{rms}$ is at most
      `abs_residual / (1 - k)`.
    - `nfe`: number of evaluations of `fn` in the forward solve (the one evaluation at
      `z0` included).
    - `result`: a [`revdeq_jax.RESULTS`][] code: `successful`, `max_steps_reached` or
      `nonfinite`.
    - `max_steps`: the step budget.
    """

    value: PyTree[Array]
    num_steps: Int[Array, ""]
    residual: Float[Array, ""]
    abs_residual: Float[Array, ""]
    nfe: Int[Array, ""]
    result: RESULTS
    max_steps: int = eqx.field(static=True)

    @property
    def converged(self) -> Bool[Array, ""]:
        """Whether `result` is `successful`."""
        return self.result == RESULTS.successful
