"""Registers the on-policy objectives (`reverse_kl_pg`, `tsd_indirect`, `soda`, `opsd`) and the `facts` data
set; `distill.objectives.onpolicy` imports this module, so they exist wherever objectives do."""

from __future__ import annotations

from distill.onpolicy import facts, opsd, pg, soda, tsd  # noqa: F401  (registration on import)

facts.register()
