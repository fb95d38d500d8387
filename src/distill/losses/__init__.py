"""Pure logit distillation losses: functions of tensors, no modules, no state, no I/O.

Every function takes ``(student_logits, teacher_logits, *, mask=None, temperature=..., reduction="mean",
...method parameters)``; see `distill.losses._common` for the shared conventions. This package imports
nothing from the rest of `distill`.
"""

from distill.losses._common import standardize_logits
from distill.losses.adaptive import (
    adakd,
    bdkd,
    hellinger_distance,
    latf_update,
    swing_kd,
    taid,
    taid_update,
    token_selective_kd,
)
from distill.losses.classic import dist_kd, dkd, hinton_kd
from distill.losses.divergences import (
    forward_kl,
    generalized_jsd,
    kl_mixing,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    student_entropy,
    total_variation,
)
from distill.losses.fused_linear import fused_linear_divergence, linear_divergence_reference
from distill.losses.optimal_transport import sinkhorn_kd, sinkhorn_plan
from distill.losses.ranking import dbild, pld
from distill.losses.sparse import SparseTargets, sparse_forward_kl, topk_targets

__all__ = [
    "SparseTargets",
    "adakd",
    "bdkd",
    "dbild",
    "dist_kd",
    "dkd",
    "forward_kl",
    "fused_linear_divergence",
    "generalized_jsd",
    "hellinger_distance",
    "hinton_kd",
    "kl_mixing",
    "latf_update",
    "linear_divergence_reference",
    "pld",
    "reverse_kl",
    "sinkhorn_kd",
    "sinkhorn_plan",
    "skew_forward_kl",
    "skew_reverse_kl",
    "sparse_forward_kl",
    "standardize_logits",
    "student_entropy",
    "swing_kd",
    "taid",
    "taid_update",
    "token_selective_kd",
    "topk_targets",
    "total_variation",
]
