"""Every knob of the CIFAR-10 experiment, and the named configurations.

Pick one with `--config=NAME`, override any field with `--key=value` (dashes read as
underscores: `--data-dir=...`), list them with `--help`. The language experiment names the
same knobs the same way (`train_steps`, `max_steps`, `grad_clip`, `state_dtype`, ...).

Paper settings (RevDEQ paper appendix B.2 and Table 4): Adam with weight decay, batch 64,
random crop + flip, learning rate halved when the training loss, accumulated over 200 steps, has
not improved for 10 such windows (`schedule="plateau"`). The extracted paper text lost the
numeric values of the learning rates, the weight decay, tolerance, beta and the epoch budget;
the values below (lr 1e-3, weight decay 1e-4 (decoupled, AdamW), tol 1e-3, beta 0.8,
100 epochs) are our assumptions, not the paper's.
"""

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class Config:
    # --- model -------------------------------------------------------------------------
    model: Literal["implicit-resnet", "single-scale", "resnet18", "node", "anode"] = (
        "implicit-resnet"  # architecture, see experiments/vision/models.py
    )
    channels: tuple[int, ...] = (32, 32, 32, 32)  # per-scale channels (single-scale: [0])
    width: tuple[int, ...] = (1, 2, 2, 1)  # per-scale width expansion of eq. 8
    bn_momentum: float = 0.9  # BatchNorm running stats: new = m * old + (1 - m) * batch
    # implicit-resnet: False is the paper's design (section 4.2, Figure 2: each scale's RevDEQ
    # output goes straight to the downsampling block, as in MDEQ); True adds each block's
    # input to its output (h + DEQ(h)), this project's earlier, unmarked choice
    deq_residual: bool = False
    resnet_width: int = 64  # ResNet-18 base width (64: 11.2M params; 8: 175K)
    ode_augment: int = 10  # zero channels appended by the augmented Neural ODE
    ode_hidden: int = 64  # hidden channels of the ODE vector field
    ode_solver: Literal["euler", "heun", "tsit5", "dopri5"] = "tsit5"
    ode_steps: int = 0  # fixed ODE steps; 0 = adaptive (rtol = atol = 1e-3)
    # --- fixed-point solver, the same fields as the language experiment -----------------
    solver: Literal["reversible", "relaxed", "picard", "anderson", "broyden"] = "reversible"
    adjoint: Literal["reversible", "unrolled", "checkpoint", "implicit", "phantom"] = "reversible"
    beta: float = 0.8  # relaxation of the reversible / relaxed solver
    max_steps: tuple[int, ...] = (1, 4, 4, 1)  # per-scale solver steps
    tol: float = 1e-3  # relative-residual stopping tolerance
    # reversible state: "auto" (bit-exact integer state for float32), None (as the layer), ...
    state_dtype: Literal["auto", "exact", "float32x2", "float32", "float64"] | None = "auto"
    anderson_m: int = 5  # Anderson history size
    implicit_tol: float = 1e-4  # implicit adjoint: tolerance of the backward linear solve
    implicit_max_steps: int = 20  # implicit adjoint: steps of the backward linear solve
    # --- data --------------------------------------------------------------------------
    data_dir: str | None = None  # CIFAR-10 folder/archive; None: $REVDEQ_CIFAR_DIR, sample, cache
    download: bool = True  # download the official archive when no data_dir is given and none found
    train_size: int = 0  # use the first N training images (0 = all)
    holdout_fraction: float = 0.1  # last part of those held out to validate (and pick best.eqx)
    test_size: int = 0  # report on the first N test images (0 = all)
    augment: bool = True  # random crop (4-pixel padding) + horizontal flip
    # --- optimisation ------------------------------------------------------------------
    batch_size: int = 64
    lr: float = 1e-3  # initial (plateau) or peak (cosine) learning rate
    weight_decay: float = 1e-4  # decoupled (AdamW, paper); value ours; >= 2-D arrays only (ours)
    schedule: Literal["plateau", "cosine", "constant"] = "plateau"  # paper; cosine: to 0 (ours)
    plateau_factor: float = 0.5  # lr multiplier on a plateau
    plateau_patience: int = 10  # windows without improvement before reducing
    plateau_window: int = 200  # steps of training loss averaged into one window
    # plateau: training STOPS once the learning rate has been halved down to min_lr (the
    # paper's rule, appendix B.2: "or if the learning rate drops below" a threshold; the value
    # is lost in our text, 1e-6 is ours)
    min_lr: float = 1e-6
    warmup_steps: int = 0  # cosine: linear warm-up steps
    train_steps: int = 70_300  # optimiser steps: 100 epochs of 703 batches of 64 (45k images)
    grad_clip: float = 0.0  # global gradient-norm clipping (0: off, as the paper: none mentioned)
    # Jacobian regularisation (Bai, Koltun & Kolter 2021): loss += jac_reg * sum over the DEQ
    # blocks of a Hutchinson estimate of ||J_f(z*)||_F^2 / d (z* held constant); 0: off,
    # nothing computed. The DEQ-IFT baseline uses DEQ_IFT_JAC_REG.
    jac_reg: float = 0.0
    jac_reg_probes: int = 1  # probe vectors per image and block
    # --- loop --------------------------------------------------------------------------
    log_every: int = 50  # steps between log lines
    eval_every: int = 1000  # steps between validation runs (and at the end)
    checkpoint_every: int = 1000  # steps between checkpoints (and at the end)
    eval_batch_size: int = 250
    seed: int = 0
    # --- devices -----------------------------------------------------------------------
    sharding: Literal["data", "fsdp"] = "data"  # fsdp: large state arrays split over devices


# Jacobian-regularisation weight of the DEQ-IFT (Anderson/Broyden + implicit gradient)
# baseline: MDEQ on CIFAR-10 in Bai, Koltun & Kolter 2021, from their code (locuslab/deq,
# MDEQ-Vision/experiments/cifar/cls_mdeq_LARGE_reg.yaml: JAC_LOSS_WEIGHT 0.4). That config
# also applies it only on a random 2% of the steps (JAC_LOSS_FREQ 0.02) and stops it after
# epoch 90 (JAC_STOP_EPOCH); here it is applied at every step with a fixed weight.
DEQ_IFT_JAC_REG = 0.4

# Appendix B.2 gives the single-scale and the multi-scale models different initial learning
# rates ("the same as the single-scale description but with an initial learning rate of ..."),
# but both numbers are lost in our text: these are ours, one name each so that the paper's
# values go in one place when found.
LR_MULTI_SCALE = 1e-3  # ours
LR_SINGLE_SCALE = 1e-3  # ours

_PAPER = Config(lr=LR_MULTI_SCALE)  # defaults are the paper's optimisation setup

CONFIGS: dict[str, Config] = {
    # Table 4, RevDEQ (170K): ~171K parameters here.
    "paper-170k": dataclasses.replace(
        _PAPER, channels=(32, 32, 32, 32), width=(1, 2, 2, 1), max_steps=(1, 4, 4, 1)
    ),
    # Table 4, RevDEQ (5M): ~6.3M parameters here (see README on the difference).
    "paper-5m": dataclasses.replace(
        _PAPER,
        channels=(64, 128, 128, 256),
        width=(2, 4, 4, 2),
        max_steps=(1, 4, 4, 1),
    ),
    # Table 4, RevDEQ (10M): ~10.3M parameters here.
    "paper-10m": dataclasses.replace(
        _PAPER,
        channels=(128, 256, 256, 128),
        width=(1, 3, 3, 1),
        max_steps=(4, 4, 4, 4),
    ),
    # Appendix B.2 single-scale model: 64 channels, width 2, 4 steps (8 NFE), ~160K params.
    "single-scale": dataclasses.replace(
        _PAPER,
        model="single-scale",
        channels=(64,),
        width=(2,),
        max_steps=(4,),
        lr=LR_SINGLE_SCALE,
    ),
    # 2-core CPU: a narrow multi-scale RevDEQ (175K params, NFE 16), ~1.4 epochs of the 9k
    # training images of the 10k sample (1k held out), cosine schedule. Minutes on two free cores; longer when the CPU is shared.
    "small": dataclasses.replace(
        _PAPER,
        channels=(8, 16, 32, 64),
        width=(1, 1, 1, 1),
        max_steps=(1, 2, 2, 1),
        train_steps=400,
        batch_size=32,
        lr=3e-3,
        schedule="cosine",
        warmup_steps=20,
        log_every=20,
        eval_every=200,
        checkpoint_every=200,
        test_size=1000,
        eval_batch_size=500,
    ),
    # CPU reproduction of Table 3's multi-scale (small) row (`make reproduce-cifar`,
    # compare.py): the 10k-image sample, every model at ~175K parameters (the paper's 170K
    # category), 2 seeds each, in ~90 minutes on 2 cores. Measured on the shared 2-core machine
    # (load average ~4-5 from another job: about half of it ours), batch 32:
    #   channels [32,32,32,32] (paper-170k):  ~1 image/s: the 32x32 scale at 32 channels
    #   channels [8,16,32,64], width 1, steps [1,2,2,1]: 175K parameters, 23 images/s
    #   (RevDEQ); DEQ-IFT ~10, ResNet-18 (width 8) ~280 (committed small comparison: 13.6 /
    #   6.4 / 279). The widest that comes near the 50 images/s the issue asks (~45 on two
    #   free cores): the per-example solves are the cost, not the parameter count.
    # compare.py sets train_steps from the budget: ~150-300 steps of 64 (1-2 epochs of the
    # 9k training images), enough to leave chance (10%) far behind.
    "repro": dataclasses.replace(
        _PAPER,
        channels=(8, 16, 32, 64),  # ours: see above (Table 4's 170K uses [32,32,32,32])
        width=(1, 1, 1, 1),  # ours (Table 4: [1,2,2,1])
        max_steps=(1, 2, 2, 1),  # ours (Table 4: [1,4,4,1]); NFE 12 by the paper's count
        batch_size=64,  # paper (appendix B.2)
        lr=LR_MULTI_SCALE,
        schedule="plateau",  # paper (appendix B.2)
        plateau_window=10,  # ours: the paper's 200 scaled to a run of ~200 steps, not 70K
        train_steps=200,  # ours: compare.py replaces it by the budget's plan
        log_every=10,
        eval_every=50,  # compare.py: ~4 validations a run (the wall-clock curves)
        checkpoint_every=50,
        test_size=2000,  # ours: 2k of the 5k test images, ~20 s per DEQ run
        eval_batch_size=500,
    ),
    # Seconds: for tests and smoke runs.
    "tiny": dataclasses.replace(
        _PAPER,
        channels=(4, 8),
        width=(1, 1),
        max_steps=(2, 2),
        train_steps=4,
        batch_size=8,
        train_size=64,
        holdout_fraction=0.25,  # 48 to train on, 16 to validate
        test_size=32,
        eval_batch_size=16,
        lr=1e-3,
        schedule="constant",
        log_every=2,
        eval_every=4,
        checkpoint_every=2,
    ),
}
