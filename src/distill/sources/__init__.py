"""Where a language-model method's training sequences come from, as a recipe `source` independent of the
objective: student rollouts with GKD mixing and an entropy-gated length curriculum (`rollouts`), OPSD's
privileged self-teacher (`opsd`), SODA's teacher / snapshot pairs (`soda`) and MixSD's mixed decoding
(`mixsd`); `plan` builds one per method and seed. Shared parts: prompt-aware batches (`batching`),
privileged contexts (`context`), cost counters (`counting`) and settings from `source.params`
(`settings`). The objectives these sources feed are in `distill.objectives` (`opsd`, `onpolicy`), their
losses in `distill.losses`. See docs/onpolicy.md."""

from distill.sources.plan import ONPOLICY_SOURCES, SeedRun, SourcePlan, check_source, source_settings

__all__ = ["ONPOLICY_SOURCES", "SeedRun", "SourcePlan", "check_source", "source_settings"]
