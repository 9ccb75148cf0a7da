"""Phantom gradients and Jacobian-free backpropagation."""

import equinox as eqx
import jax
import jax.tree_util as jtu

from .._iterate import Inputs, lax_while_loop, LoopResult, Primal
from .._misc import stop_gradient_inexact, tree_combine_lin
from .._solver.base import AbstractSolver
from .base import AbstractAdjoint


class PhantomAdjoint(AbstractAdjoint):
    r"""Phantom gradient: differentiate only a few damped steps taken from the fixed point.

    The solver runs without gradient tracking to $z^*$; then `steps` damped iterations
    $z \leftarrow (1 - \lambda) z + \lambda f(z, x)$ (with $\lambda$ = `damping`) are
    taken from $z^*$ under ordinary autodiff, and their result is the output. With
    `steps=1, damping=1` this is Jacobian-free backpropagation (JFB): the gradient of
    $f(z^*, x)$ with $z^*$ held constant. Cheap (`steps` extra evaluations, memory of
    `steps` layers) and approximate.

    !!! warning

        The gradient is an approximation of the implicit gradient, not the gradient of
        the computation performed; it approaches the implicit gradient as
        `steps` grows (for a contraction). The output is the last phantom iterate, which
        differs from the solver's iterate by one damped step each.

    ??? cite "References"

        ```bibtex
        @inproceedings{geng2021training,
            title={On Training Implicit Models},
            author={Geng, Zhengyang and Zhang, Xin-Yu and Bai, Shaojie and Wang, Yisen
                    and Lin, Zhouchen},
            booktitle={NeurIPS},
            year={2021}
        }
        @inproceedings{fung2022jfb,
            title={JFB: Jacobian-Free Backpropagation for Implicit Networks},
            author={Fung, Samy Wu and Heaton, Howard and Li, Qiuwei and McKenzie, Daniel
                    and Osher, Stanley and Yin, Wotao},
            booktitle={AAAI},
            year={2022}
        }
        ```

    **Arguments:**

    - `steps`: number of differentiated steps (>= 1).
    - `damping`: $\lambda \in (0, 1]$.
    """

    steps: int = 1
    damping: float = 1.0

    def __check_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"`PhantomAdjoint(steps={self.steps!r})` must be an int >= 1.")
        if not 0 < self.damping <= 1:
            raise ValueError(f"`PhantomAdjoint(damping={self.damping})` must lie in (0, 1].")

    def apply(self, primal: Primal, inputs: Inputs, solver: AbstractSolver) -> LoopResult:
        del solver
        out = primal(stop_gradient_inexact(inputs), lax_while_loop)
        fn, args, _ = inputs
        z = jtu.tree_map(jax.lax.stop_gradient, out.value)
        for _ in range(self.steps):
            fz = fn(z, args)
            z = fz if self.damping == 1 else tree_combine_lin(1 - self.damping, z, self.damping, fz)
        # `residual` stays that of the solver's iterate z*, from which the steps start.
        return eqx.tree_at(
            lambda r: (r.value, r.nfe, r.state),
            out,
            (z, out.nfe + self.steps, None),
            is_leaf=lambda x: x is None,
        )
