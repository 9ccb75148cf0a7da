"""Equinox building blocks for deep equilibrium models."""

from ._conv import ConvResidualLayer as ConvResidualLayer
from ._deq import DEQ as DEQ
from ._dropout import VariationalDropout as VariationalDropout
from ._implicit_resnet import (
    ImplicitResNet as ImplicitResNet,
    PreActDownsample as PreActDownsample,
    SingleScaleDEQ as SingleScaleDEQ,
)
from ._transformer import (
    CausalSelfAttention as CausalSelfAttention,
    EquilibriumTransformerLayer as EquilibriumTransformerLayer,
    TransformerMLP as TransformerMLP,
)
from ._weight_norm import (
    apply_weight_norm as apply_weight_norm,
    fold_weight_norm as fold_weight_norm,
    WeightNorm as WeightNorm,
)
