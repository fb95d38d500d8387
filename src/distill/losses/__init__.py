"""Pure distillation losses: functions of tensors, no modules, no state, no I/O.

Logit losses take ``(student_logits, teacher_logits, *, mask=None, temperature=..., reduction="mean",
...method parameters)``; feature and relation losses (`features`: FitNets hints, attention transfer, FSP,
TRG's token losses; `relations`: similarity-preserving, PKT, RKD, CRD) take ``(student, teacher, *,
mask=None, reduction="mean", ...)`` on feature maps, vectors or token sequences. See
`distill.losses._common` (and the `features` / `relations` module notes) for the shared conventions. This
package imports nothing from the rest of `distill`.
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
from distill.losses.features import (
    attention_transfer,
    fsp,
    hint_mse,
    token_contextual,
    token_relation_graph,
)
from distill.losses.fused_linear import fused_linear_divergence, linear_divergence_reference
from distill.losses.optimal_transport import sinkhorn_kd, sinkhorn_plan
from distill.losses.ranking import dbild, pld
from distill.losses.relations import (
    crd_memory_update,
    crd_nce,
    crd_normalizers,
    pkt,
    rkd,
    rkd_angle,
    rkd_distance,
    similarity_preserving,
)
from distill.losses.sparse import SparseTargets, sparse_forward_kl, topk_targets
from distill.losses.transitions import transition_alignment

__all__ = [
    "SparseTargets",
    "adakd",
    "attention_transfer",
    "bdkd",
    "crd_memory_update",
    "crd_nce",
    "crd_normalizers",
    "dbild",
    "dist_kd",
    "dkd",
    "forward_kl",
    "fsp",
    "fused_linear_divergence",
    "generalized_jsd",
    "hellinger_distance",
    "hint_mse",
    "hinton_kd",
    "kl_mixing",
    "latf_update",
    "linear_divergence_reference",
    "pkt",
    "pld",
    "reverse_kl",
    "rkd",
    "rkd_angle",
    "rkd_distance",
    "similarity_preserving",
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
    "token_contextual",
    "token_relation_graph",
    "token_selective_kd",
    "topk_targets",
    "total_variation",
    "transition_alignment",
]
