"""What the analyses offer the ``vitlens`` command line and report, declared without importing them.

This module is imported by ``vitlens --help``, so it imports neither torch nor the analyses: each command
names its arguments here and its ``"module:function"`` target, which is imported only when it runs
(see :mod:`vitlens.registry`). One block per analysis module.
"""
from __future__ import annotations

from vitlens import registry

# --- class_embedding -------------------------------------------------------------------------------------
registry.reducer("class_rank", "analyses.class_embedding:ClassRankReducer")
