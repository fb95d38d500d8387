"""Registers the logit losses of `distill.losses` as objectives (stateless ones: a pure function each)."""

from __future__ import annotations

from distill import losses
from distill.objectives.base import FusedDivergence, register_logit_loss

_HINTON = "Distilling the Knowledge in a Neural Network (Hinton et al., 2015)"
_DISTILLM = "DistiLLM: Towards Streamlined Distillation for Large Language Models (Ko et al., ICML 2024)"
_DECOUPLING = (
    "Decoupling KL and Trajectories: A Unified Perspective for SFT, DAgger, Offline RL, and OPD in LLM "
    "Distillation (2025)"
)

register_logit_loss(
    "forward_kl",
    losses.forward_kl,
    paper=_HINTON,
    summary="KL(teacher || student), the true KL (no teacher-entropy offset); mean-seeking",
    topk=True,
    fused=FusedDivergence("forward_kl"),
)
register_logit_loss(
    "reverse_kl",
    losses.reverse_kl,
    paper="MiniLLM: Knowledge Distillation of Large Language Models (Gu et al., ICLR 2024)",
    summary="KL(student || teacher); mode-seeking",
    topk=True,
    fused=FusedDivergence("reverse_kl"),
)
register_logit_loss(
    "hinton_kd",
    losses.hinton_kd,
    paper=_HINTON,
    summary="KL of temperature-softened distributions times T^2",
    topk=True,
    fused=FusedDivergence("forward_kl", times_t_squared=True),
)
register_logit_loss(
    "dkd",
    losses.dkd,
    paper="Decoupled Knowledge Distillation (Zhao et al., CVPR 2022)",
    summary="alpha TCKD + beta NCKD: target-class and non-target-class KD, decoupled",
    needs_labels=True,
)
register_logit_loss(
    "dist_kd",
    losses.dist_kd,
    paper="Knowledge Distillation from A Stronger Teacher (Huang et al., NeurIPS 2022)",
    summary="DIST: 1 - Pearson correlation of probabilities within rows and within classes",
)
register_logit_loss(
    "total_variation",
    losses.total_variation,
    paper="f-Divergence Minimization for Sequence-Level Knowledge Distillation (Wen et al., ACL 2023)",
    summary="total variation distance 1/2 sum |P - Q|",
    topk=True,
    fused=FusedDivergence("tvd"),
)
register_logit_loss(
    "generalized_jsd",
    losses.generalized_jsd,
    paper=(
        "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes "
        "(Agarwal et al., ICLR 2024)"
    ),
    summary="generalised JSD(beta), TRL convention (0: forward KL, 1: reverse KL); normalized is continuous",
    topk=True,
    fused=FusedDivergence("jsd"),
)
register_logit_loss(
    "skew_forward_kl",
    losses.skew_forward_kl,
    paper=_DISTILLM,
    summary="KL(P || alpha P + (1 - alpha) Q)",
    topk=True,
    fused=FusedDivergence("skew_forward_kl"),
)
register_logit_loss(
    "skew_reverse_kl",
    losses.skew_reverse_kl,
    paper=_DISTILLM,
    summary="KL(Q || alpha Q + (1 - alpha) P)",
    topk=True,
    fused=FusedDivergence("skew_reverse_kl"),
)
register_logit_loss(
    "kl_mixing",
    losses.kl_mixing,
    paper=_DECOUPLING,
    summary="w forward KL + (1 - w) reverse KL, optionally minus an entropy bonus on the student",
)
register_logit_loss(
    "pld",
    losses.pld,
    paper="PLD: A Choice-Theoretic List-Wise Knowledge Distillation (Bassam et al., NeurIPS 2025)",
    summary="Plackett-Luce list-wise loss: true label first, then teacher order, teacher-confidence weighted",
    needs_labels=True,
)
register_logit_loss(
    "sinkhorn_kd",
    losses.sinkhorn_kd,
    paper="Sinkhorn Distance Minimization for Knowledge Distillation (Cui et al., LREC-COLING 2024)",
    summary="batch-wise entropic optimal transport (log-domain Sinkhorn) between predictions",
)
register_logit_loss(
    "dbild",
    losses.dbild,
    paper="Switch-KD: Visual-Switch Knowledge Distillation for Vision-Language Models (Sun et al., 2026)",
    summary="dynamic bi-directional logits difference: adaptive top-k pairwise differences, reverse KL",
)
