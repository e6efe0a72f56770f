"""Composable selection for pools beyond one machine (see docs/scaling-out.md).

:mod:`.moments`: each shard's sketched second moment (count, ``sum g g^T``, ``sum g``) streamed from
its sketch file, the pool's as their sum (refused across sketch identities), and how far it moves.
:mod:`.candidates`: each shard's ``c n`` candidates chosen against the pool's moment, the merge that
selects ``n`` from their union with the same target, and when old candidates may be reused.
"""

from skmm_pipeline.core.composable.candidates import (
    DEFAULT_C,
    DEFAULT_RULE,
    DEFAULT_TOLERANCE,
    RULES,
    CandidateSet,
    MergeResult,
    composable_select,
    merge_candidates,
    per_shard,
    shard_candidates,
    shard_seed,
)
from skmm_pipeline.core.composable.moments import (
    ShardMoment,
    moment_drift,
    pool_moment,
    shard_moment,
    shard_moment_from_file,
)

__all__ = [
    "DEFAULT_C",
    "DEFAULT_RULE",
    "DEFAULT_TOLERANCE",
    "RULES",
    "CandidateSet",
    "MergeResult",
    "ShardMoment",
    "composable_select",
    "merge_candidates",
    "moment_drift",
    "per_shard",
    "pool_moment",
    "shard_candidates",
    "shard_moment",
    "shard_moment_from_file",
    "shard_seed",
]
