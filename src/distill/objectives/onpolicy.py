"""The on-policy objectives live in `distill.onpolicy` (with their sources); importing them here registers
them with every other objective."""

from __future__ import annotations

import distill.onpolicy.objectives  # noqa: F401  (registers reverse_kl_pg, tsd_indirect, soda, opsd)
