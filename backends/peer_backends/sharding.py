"""The column layout of sharded expert tables, shared by the torch and JAX backends.

Every device holds all N rows of each expert table for its slice of the columns (README
"Sharded expert tables"): the tables dotted with x have their partial dots summed over the
devices in one all-reduce, the table summed into the output yields the output's own slice of
features. Framework-free: the backends' ``parallel`` modules place the tables as these say.
"""

from __future__ import annotations

from peer_ref.config import PEERConfig

# The table whose selected rows are summed into the output (SPEC §3.11).
OUTPUT_TABLES = ("experts.up",)


def dot_tables(cfg: PEERConfig) -> tuple[str, ...]:
    """The tables dotted with x: ``experts.down``, and ``experts.gate`` for GLU experts (SPEC §3.10)."""
    return ("experts.down", "experts.gate") if cfg.expert_glu else ("experts.down",)


def column_tables(cfg: PEERConfig) -> tuple[str, ...]:
    """Every table sharded by columns for ``cfg``; every other parameter is replicated."""
    return dot_tables(cfg) + OUTPUT_TABLES
