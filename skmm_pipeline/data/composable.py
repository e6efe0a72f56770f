"""Composable selection over the pool's sketch files: each shard's moment and candidates cached on disk
(keyed by the shard's sketch version), the pool's moment summed from them, and the merge.

Layout under the cache folder (one per sketch identity)::

    moments/<shard>-<sketch version>.npz      count, sum g g^T, sum g, the identity (JSON)
    candidates/<shard>-<sketch version>.npz   rows, scores, the moment they were chosen against, settings

A shard's moment never changes with its sketch version. Its candidates are reused while they were chosen
with the same settings against a moment within ``tolerance`` of the pool's current one
(:meth:`CandidateSet.reusable`); otherwise they are recomputed. ``records`` are ``gradient_sketch``'s: shard
name -> ``{"path": sketch stem, "data_version": ..., ...}``; sample ids are ``<shard>/<row>``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Mapping

import numpy as np

from skmm_pipeline.core import defaults
from skmm_pipeline.core.atomic import atomic_save_npz
from skmm_pipeline.core.composable import (
    DEFAULT_C,
    DEFAULT_RULE,
    DEFAULT_TOLERANCE,
    CandidateSet,
    ShardMoment,
    merge_candidates,
    moment_drift,
    pool_moment,
    shard_candidates,
    shard_moment,
    shard_moment_from_file,
    shard_seed,
)
from skmm_pipeline.core.errors import ConfigError, SketchMismatchError
from skmm_pipeline.core.hashing import json_hash
from skmm_pipeline.core.sketch_io import read_sketch_shard
from skmm_pipeline.data.shards import ShardError


def _file(cache: Path, kind: str, name: str, record: Mapping) -> Path:
    return Path(cache) / kind / f"{name}-{record['data_version']}.npz"


def _read(path: Path) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError):
        return None  # missing or unreadable: recomputed


def cached_moment(cache: Path, name: str, record: Mapping) -> tuple[ShardMoment, bool]:
    """The shard's moment from the cache, or streamed from its sketch file and cached; and whether it was computed."""
    path = _file(cache, "moments", name, record)
    got = _read(path)
    if got is not None:
        return ShardMoment(int(got["count"]), got["total"], got["row_sum"], json.loads(str(got["identity"]))), False
    mo = shard_moment_from_file(record["path"])
    atomic_save_npz(path, count=np.int64(mo.count), total=mo.total, row_sum=mo.row_sum, identity=json.dumps(mo.identity))
    return mo, True


def pool_moment_of(cache: Path, records: Mapping[str, Mapping]) -> tuple[ShardMoment, list[str]]:
    """The pool's moment (shards in name order) and the shards whose moment had to be computed."""
    if not records:
        raise ShardError("no shard sketches to select from: register and sketch at least one shard")
    parts, computed = [], []
    for name in sorted(records):
        mo, fresh = cached_moment(cache, name, records[name])
        parts.append(mo)
        if fresh:
            computed.append(name)
    try:
        return pool_moment(parts), computed
    except SketchMismatchError as exc:
        raise SketchMismatchError(f"{exc} (shards: {sorted(records)}); re-materialize gradient_sketch for all shards "
                                  "with the current settings") from None


def _load_candidates(path: Path) -> CandidateSet | None:
    got = _read(path)
    if got is None:
        return None
    meta = json.loads(str(got["meta"]))
    return CandidateSet(got["rows"], got["scores"], meta["rule"], float(meta["c"]), int(meta["n"]), int(meta["seed"]),
                        got["target_sigma"], meta.get("diagnostics", {}))


def cached_candidates(cache: Path, name: str, record: Mapping, target: ShardMoment, n: int, *, c: float = DEFAULT_C,
                      rule: str = DEFAULT_RULE, seed: int = 0, tolerance: float = DEFAULT_TOLERANCE
                      ) -> tuple[CandidateSet, bool]:
    """The shard's candidates against ``target``: reused from the cache while within ``tolerance``, else
    computed (streamed from the memory-mapped sketch) and cached; and whether they were computed."""
    path = _file(cache, "candidates", name, record)
    sseed = shard_seed(seed, name)
    old = _load_candidates(path)
    if old is not None and old.reusable(target, n=n, c=c, rule=rule, seed=sseed, tolerance=tolerance):
        return old, False
    rows = read_sketch_shard(record["path"]).rows
    cs = shard_candidates(rows, target, n, c=c, rule=rule, seed=sseed)
    meta = {"rule": cs.rule, "c": cs.c, "n": cs.n, "seed": cs.seed,
            "diagnostics": {k: v for k, v in cs.diagnostics.items() if isinstance(v, (int, float, str, bool))}}
    atomic_save_npz(path, rows=cs.rows, scores=cs.scores, target_sigma=cs.target_sigma, meta=json.dumps(meta))
    return cs, True


def selection_target(pool: ShardMoment, reference=None) -> ShardMoment:
    """The moment the candidates and the merge match: the pool's, or that of ``reference`` rows (e.g. the
    validation split sketched like the pool), which does not move as shards arrive."""
    return pool if reference is None else shard_moment(reference, pool.identity)


def composable_selection(cache: Path, records: Mapping[str, Mapping], n: int, *, c: float = DEFAULT_C,
                         rule: str = DEFAULT_RULE, seed: int = 0, tolerance: float = DEFAULT_TOLERANCE,
                         reference=None) -> dict:
    """Select ``n`` sample ids from the union of the shards' candidates (computing only what the cache lacks
    or what moved beyond ``tolerance``), matching the pool's moment or ``reference``'s (rows sketched like
    the pool). Returns ``sample_ids``, ``candidate_sets`` (shard -> the set's key), ``recomputed`` /
    ``reused`` shard names and ``diagnostics`` (with seconds per stage)."""
    t0 = time.perf_counter()
    pool, moments_computed = pool_moment_of(cache, records)
    target = selection_target(pool, reference)
    t1 = time.perf_counter()
    sets, recomputed = {}, []
    for name in sorted(records):
        sets[name], fresh = cached_candidates(cache, name, records[name], target, n, c=c, rule=rule, seed=seed,
                                              tolerance=tolerance)
        if fresh:
            recomputed.append(name)
    t2 = time.perf_counter()
    blocks, ids = [], []
    for name in sorted(records):
        rows = np.sort(sets[name].rows)
        blocks.append(np.asarray(read_sketch_shard(records[name]["path"]).rows[rows]))
        ids.extend(f"{name}/{int(r)}" for r in rows)
    union = np.concatenate(blocks)
    del blocks
    merged = merge_candidates(union, target, n, seed=seed)
    t3 = time.perf_counter()
    drift = {name: moment_drift(cs.target_sigma, target.sigma) for name, cs in sets.items()}
    return {
        "sample_ids": [ids[i] for i in merged.indices],
        "candidate_sets": {name: cs.key for name, cs in sets.items()},
        "recomputed": recomputed,
        "reused": sorted(set(records) - set(recomputed)),
        "moments_computed": moments_computed,
        "pool_size": int(pool.count),
        "identity": pool.identity,
        "reference": "pool" if reference is None else "validation",
        "moment_version": json_hash(np.round(target.sigma, 12).ravel().tolist()),
        "diagnostics": {
            **merged.diagnostics, "c": float(c), "rule": rule, "tolerance": float(tolerance),
            "max_candidate_drift": max(drift.values()), "moment_seconds": t1 - t0, "candidate_seconds": t2 - t1,
            "merge_seconds": t3 - t2, "select_seconds": t3 - t0,
        },
    }


MODES = ("global", "composable", "auto")


def resolve_mode(mode: str, rows: int, sketch_dim: int, *, method: str = "skmm", outlier_guard: bool = False) -> str:
    """``"global"`` or ``"composable"`` for ``selection_mode`` (``"auto"``: composable once the joined sketch,
    ``rows x sketch_dim`` float32, exceeds :data:`core.defaults.COMPOSABLE_ABOVE_BYTES`, and the method is
    skmm without the outlier guard, which needs the whole pool)."""
    if mode not in MODES:
        raise ConfigError(f"selection_mode must be one of {list(MODES)}, got {mode!r}")
    if mode == "composable" and (method != "skmm" or outlier_guard):
        raise ConfigError(f"composable selection runs method 'skmm' without the outlier guard (got method {method!r}, "
                          f"outlier_guard={outlier_guard}): set selection_mode to 'global'")
    if mode == "auto":
        big = int(rows) * int(sketch_dim) * 4 > defaults.COMPOSABLE_ABOVE_BYTES
        return "composable" if big and method == "skmm" and not outlier_guard else "global"
    return mode
