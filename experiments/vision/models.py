"""CIFAR-10 models: RevDEQ (library) and the baselines, behind one calling convention.

Every model here acts on one image `(3, 32, 32)` and is called as

    logits, state, stats = model(x, state, key=key)

with `state` an `eqx.nn.State` (BatchNorm statistics; empty for models without BatchNorm) and
`stats` a dict of per-example solver statistics (`nfe` etc.; empty for explicit models). The
train step vmaps it with `axis_name="batch"`.

Models (`Config.model`):

* `implicit-resnet`: `revdeq_jax.nn.ImplicitResNet`, the multi-scale RevDEQ model. With
  `solver="anderson"|"broyden"` and `adjoint="implicit"` it is the classic-DEQ (IFT) baseline
  on the same architecture.
* `single-scale`: `revdeq_jax.nn.SingleScaleDEQ`.
* `resnet18`: explicit CIFAR ResNet-18 (3x3 stem, no max-pool; `resnet_width` = 64 gives the
  standard 11.2M parameters, 8 about 175K).
* `node` / `anode`: (augmented) Neural ODE classifier after Dupont et al. 2019, with `diffrax`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TYPE_CHECKING, TypeAlias

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from experiments.common.solvers import make_adjoint, make_solver
from revdeq_jax.nn import ImplicitResNet, SingleScaleDEQ


if TYPE_CHECKING:
    from .configs import Config


# ----------------------------------------------------------------------------------------
# Explicit ResNet-18 (CIFAR variant)
# ----------------------------------------------------------------------------------------


Image: TypeAlias = Float[Array, "3 h w"]
Key: TypeAlias = PRNGKeyArray
Output: TypeAlias = tuple[Float[Array, " classes"], eqx.nn.State, dict[str, Array]]
"""`(logits, state, stats)`, the calling convention of every model here and of the
library's `ImplicitResNet`."""


class BasicBlock(eqx.Module):
    """`ReLU(BN(conv3x3(ReLU(BN(conv3x3_s(x))))) + shortcut(x))`, shortcut a strided 1x1
    conv + BN when the shape changes (He et al. 2016)."""

    conv1: eqx.nn.Conv2d
    norm1: eqx.nn.BatchNorm
    conv2: eqx.nn.Conv2d
    norm2: eqx.nn.BatchNorm
    shortcut: eqx.nn.Conv2d | None
    shortcut_norm: eqx.nn.BatchNorm | None

    def __init__(self, c_in: int, c_out: int, stride: int, *, momentum: float, key):
        k1, k2, k3 = jr.split(key, 3)
        bn = lambda c: eqx.nn.BatchNorm(c, "batch", momentum=momentum, mode="batch")
        self.conv1 = eqx.nn.Conv2d(c_in, c_out, 3, stride, padding=1, use_bias=False, key=k1)
        self.norm1 = bn(c_out)
        self.conv2 = eqx.nn.Conv2d(c_out, c_out, 3, padding=1, use_bias=False, key=k2)
        self.norm2 = bn(c_out)
        if stride != 1 or c_in != c_out:
            self.shortcut = eqx.nn.Conv2d(c_in, c_out, 1, stride, use_bias=False, key=k3)
            self.shortcut_norm = bn(c_out)
        else:
            self.shortcut = self.shortcut_norm = None

    def __call__(self, x, state):
        h, state = self.norm1(self.conv1(x), state)
        h, state = self.norm2(self.conv2(jax.nn.relu(h)), state)
        if self.shortcut is not None:
            assert self.shortcut_norm is not None
            x, state = self.shortcut_norm(self.shortcut(x), state)
        return jax.nn.relu(h + x), state


class ResNet18(eqx.Module):
    """Explicit ResNet-18 for 32x32 inputs: 3x3 stem, four stages of two `BasicBlock`s with
    widths `w, 2w, 4w, 8w` (strides 1, 2, 2, 2), global average pool, linear head."""

    stem: eqx.nn.Conv2d
    stem_norm: eqx.nn.BatchNorm
    blocks: tuple[BasicBlock, ...]
    head: eqx.nn.Linear

    def __init__(
        self,
        width: int = 64,
        *,
        blocks_per_stage: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        momentum: float = 0.9,
        key: PRNGKeyArray,
    ):
        k_stem, k_head, k_blocks = jr.split(key, 3)
        self.stem = eqx.nn.Conv2d(3, width, 3, padding=1, use_bias=False, key=k_stem)
        self.stem_norm = eqx.nn.BatchNorm(width, "batch", momentum=momentum, mode="batch")
        specs, c_in = [], width
        for i, n in enumerate(blocks_per_stage):
            c_out = width * 2**i
            for j in range(n):
                specs.append((c_in, c_out, 2 if (j == 0 and i > 0) else 1))
                c_in = c_out
        keys = jr.split(k_blocks, len(specs))
        self.blocks = tuple(
            BasicBlock(a, b, s, momentum=momentum, key=k) for (a, b, s), k in zip(specs, keys)
        )
        self.head = eqx.nn.Linear(c_in, num_classes, key=k_head)

    def __call__(self, x: Image, state: eqx.nn.State, *, key: Key | None = None) -> Output:
        del key
        h, state = self.stem_norm(self.stem(x), state)
        h = jax.nn.relu(h)
        for block in self.blocks:
            h, state = block(h, state)
        return self.head(jnp.mean(h, axis=(1, 2))), state, {}


# ----------------------------------------------------------------------------------------
# (Augmented) Neural ODE classifier
# ----------------------------------------------------------------------------------------


class ConvVectorField(eqx.Module):
    """`dh/dt = conv1x1(ReLU(conv3x3(ReLU(conv1x1([h, t])))))`: the convolutional ODE
    function of Dupont et al. (2019), time given as an extra constant channel."""

    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    conv3: eqx.nn.Conv2d

    def __init__(self, channels: int, hidden: int, *, key):
        k1, k2, k3 = jr.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(channels + 1, hidden, 1, key=k1)
        self.conv2 = eqx.nn.Conv2d(hidden, hidden, 3, padding=1, key=k2)
        self.conv3 = eqx.nn.Conv2d(hidden, channels, 1, key=k3)

    def __call__(self, t, h, args):
        del args
        tt = jnp.broadcast_to(jnp.asarray(t, h.dtype), (1, *h.shape[1:]))
        h = jax.nn.relu(self.conv1(jnp.concatenate([h, tt])))
        h = jax.nn.relu(self.conv2(h))
        return self.conv3(h)


# Vector-field evaluations per step (FSAL Runge-Kutta methods reuse their last stage).
_ODE_SOLVERS: dict[str, tuple[type, int]] = {
    "euler": (diffrax.Euler, 1),
    "heun": (diffrax.Heun, 2),
    "tsit5": (diffrax.Tsit5, 6),
    "dopri5": (diffrax.Dopri5, 6),
}


class NeuralODEClassifier(eqx.Module):
    """Neural ODE image classifier (Chen et al. 2018); with `augment > 0` zero channels are
    appended to the image first: the augmented Neural ODE of Dupont et al. (2019).

    `h(0) = [x, 0_augment]`, `h(1)` from `diffrax.diffeqsolve`, then a linear layer on the
    flattened `h(1)`. `steps > 0`: fixed step `1/steps`; `steps = 0`: adaptive steps with a PID
    controller at `rtol`/`atol`. Reported NFE is `evaluations-per-step * num_steps + 1`.
    """

    field: ConvVectorField
    head: eqx.nn.Linear
    augment: int = eqx.field(static=True)
    solver: str = eqx.field(static=True)
    steps: int = eqx.field(static=True)
    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)

    def __init__(
        self,
        augment: int = 10,
        hidden: int = 64,
        *,
        solver: str = "tsit5",
        steps: int = 0,
        rtol: float = 1e-3,
        atol: float = 1e-3,
        max_steps: int = 64,
        num_classes: int = 10,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        key: PRNGKeyArray,
    ):
        if solver not in _ODE_SOLVERS:
            raise ValueError(
                f"unknown ODE `solver`={solver!r}; choose from {sorted(_ODE_SOLVERS)}."
            )
        k1, k2 = jr.split(key)
        c, h, w = image_shape
        self.field = ConvVectorField(c + augment, hidden, key=k1)
        self.head = eqx.nn.Linear((c + augment) * h * w, num_classes, key=k2)
        self.augment, self.solver, self.steps = augment, solver, steps
        self.rtol, self.atol, self.max_steps = rtol, atol, max_steps

    def __call__(self, x: Image, state: eqx.nn.State, *, key: Key | None = None) -> Output:
        del key
        h0 = jnp.concatenate([x, jnp.zeros((self.augment, *x.shape[1:]), x.dtype)])
        solver_cls, evals = _ODE_SOLVERS[self.solver]
        if self.steps > 0:
            controller, dt0 = diffrax.ConstantStepSize(), 1.0 / self.steps
        else:
            controller, dt0 = (
                diffrax.PIDController(rtol=self.rtol, atol=self.atol),
                None,
            )
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(self.field),
            solver_cls(),
            t0=0.0,
            t1=1.0,
            dt0=dt0,
            y0=h0,
            stepsize_controller=controller,
            max_steps=max(self.max_steps, self.steps),
            throw=False,
        )
        assert sol.ys is not None
        logits = self.head(sol.ys[-1].reshape(-1))
        num_steps = jnp.asarray(sol.stats["num_steps"], jnp.int32)
        return logits, state, {"nfe": evals * num_steps + 1, "steps": num_steps}


# ----------------------------------------------------------------------------------------
# From config strings to objects
# ----------------------------------------------------------------------------------------


def build_model(config: Config, key: PRNGKeyArray, *, adjoint: Any = None) -> tuple[Any, Any]:
    """`(model, state)` for `config` (state: `eqx.nn.State`). `adjoint` overrides the
    config's gradient strategy (used by the gradient-exactness test)."""
    if config.model in ("implicit-resnet", "single-scale"):
        solver = make_solver(config)
        adjoint = make_adjoint(config) if adjoint is None else adjoint
        if config.model == "implicit-resnet":
            return eqx.nn.make_with_state(ImplicitResNet)(
                config.channels,
                config.width,
                config.max_steps,
                solver=solver,
                adjoint=adjoint,
                tol=config.tol,
                bn_momentum=config.bn_momentum,
                deq_residual=config.deq_residual,
                key=key,
            )
        return eqx.nn.make_with_state(SingleScaleDEQ)(
            config.channels[0],
            config.width[0],
            config.max_steps[0],
            solver=solver,
            adjoint=adjoint,
            tol=config.tol,
            key=key,
        )
    if config.model == "resnet18":
        return eqx.nn.make_with_state(ResNet18)(
            config.resnet_width, momentum=config.bn_momentum, key=key
        )
    if config.model in ("node", "anode"):
        return eqx.nn.make_with_state(NeuralODEClassifier)(
            config.ode_augment if config.model == "anode" else 0,
            config.ode_hidden,
            solver=config.ode_solver,
            steps=config.ode_steps,
            key=key,
        )
    raise ValueError(
        f"unknown `model`={config.model!r}; choose from implicit-resnet, single-scale, "
        "resnet18, node, anode."
    )


def to_dtype(tree: Any, dtype: Any) -> Any:
    """Cast every floating array leaf of `tree` (a model or a state) to `dtype`."""
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree)
