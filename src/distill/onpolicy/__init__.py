"""On-policy distillation for language models: where the prefixes come from, as a recipe `source`
independent of the objective (student rollouts with GKD mixing and an entropy-gated length curriculum,
OPSD, SODA, MixSD), the policy-gradient form of reverse KL, TSD-KD's indirect loss, and the
gradient-alignment diagnostic (`distill diagnose alignment`). See docs/onpolicy.md."""
