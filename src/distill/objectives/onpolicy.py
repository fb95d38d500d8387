"""Registers the on-policy logit losses as objectives: `reverse_kl_pg` (`distill.losses.policy_gradient`),
`tsd_indirect` (`distill.losses.tsd`) and `soda` (`distill.losses.preference`). They are meant for the
on-policy sources of `distill.sources` (student rollouts, SODA's pairs); `opsd`, which holds state, is in
`distill.objectives.opsd`. See docs/onpolicy.md."""

from __future__ import annotations

from distill.losses.policy_gradient import reverse_kl_pg
from distill.losses.preference import soda_loss
from distill.losses.tsd import tsd_indirect
from distill.objectives.base import register_logit_loss

_DECOUPLING = (
    "Decoupling KL and Trajectories: A Unified Perspective for SFT, DAgger, Offline RL, and OPD in LLM "
    "Distillation (2025)"
)
_TSD = "Explain in Your Own Words: Improving Reasoning via Token-Selective Dual Knowledge Distillation (2026)"
_SODA = "SODA: Semi On-Policy Black-Box Distillation for Large Language Models (Chen et al., 2026)"

register_logit_loss(
    "reverse_kl_pg",
    reverse_kl_pg,
    paper=_DECOUPLING,
    summary="reverse KL as REINFORCE with a dense reward log p_T - log q_S (use on student rollouts)",
    needs_labels=True,
)
register_logit_loss(
    "tsd_indirect",
    tsd_indirect,
    paper=_TSD,
    summary="TSD-KD indirect part: ListMLE of the student's top-K tokens re-ranked by the teacher",
)
register_logit_loss(
    "soda",
    soda_loss,
    paper=_SODA,
    summary="SODA: SFT on teacher responses + DPO of them over a static snapshot of the student's outputs",
    needs_labels=True,
)
