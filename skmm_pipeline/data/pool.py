"""The registered pool across its shards: re-reading a validated shard, joining the shard sketches,
the images' spatial-structure scores (cached by content hash), and per-shard / per-class counts of a
selection. Sample ids are ``<shard>/<row>`` throughout.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from skmm_pipeline.core.atomic import atomic_write_bytes
from skmm_pipeline.core.errors import SketchMismatchError
from skmm_pipeline.core.hashing import fingerprint_of
from skmm_pipeline.core.outliers import lacks_structure, spatial_structure
from skmm_pipeline.core.selection import method_options
from skmm_pipeline.core.sketch_io import canonical_identity, load_sketch_shards, read_sketch_shard
from skmm_pipeline.core.validation import InputError
from skmm_pipeline.data.shards import Shard, ShardError, file_sha256, file_signature, read_shard


def read_unchanged_shard(record: dict) -> Shard:
    """The shard ``raw_shard`` validated, without a second pass over its pixels when the file is unchanged
    since (same :func:`~skmm_pipeline.data.shards.file_signature`); a rewritten file is refused."""
    path = Path(record["path"])
    if not path.is_file():
        raise ShardError(f"shard {record['name']!r} is gone from {path} since raw_shard validated it")
    if record.get("signature") is None:  # a record from before signatures: verify again
        return read_shard(path)
    if file_signature(path) != record["signature"]:
        raise ShardError(f"shard {record['name']!r} at {path} changed after raw_shard validated it: "
                         "materialize raw_shard for this partition again")
    return read_shard(path, verify=False)


def load_sketches(records: dict[str, dict]) -> tuple[np.ndarray, list[str], dict]:
    """Join per-shard sketches in shard-name order; refuse sketches made with different identities."""
    if not records:
        raise ShardError("no shard sketches to select from: register and sketch at least one shard")
    names = sorted(records)
    try:
        return load_sketch_shards([records[name]["path"] for name in names])
    except InputError as exc:
        raise SketchMismatchError(f"{exc} (shards: {names}); re-materialize gradient_sketch for all shards with the "
                         "current settings") from None


def sketch_identities(records: Mapping[str, dict]) -> dict[str, dict]:
    """Shard name -> the identity stored in its sketch file, in shard-name order."""
    return {name: read_sketch_shard(rec["path"]).identity for name, rec in sorted(records.items())}


def single_identity(identities: Mapping[str, dict], expected: dict) -> tuple[bool, int]:
    """``(passed, distinct)``: do all ``identities`` agree, and with ``expected`` (canonicalised)?"""
    distinct = {json.dumps(i, sort_keys=True) for i in identities.values()}
    passed = len(distinct) == 1 and identities[next(iter(identities))] == canonical_identity(expected)
    return passed, len(distinct)


def structure_scores(cache_dir: Path, shard_path: Path, name: str, sha: str, images: np.ndarray | None = None) -> np.ndarray:
    """Per-image spatial-structure scores (core.outliers.spatial_structure) of shard ``name`` with content
    hash ``sha``, cached as ``cache_dir/<sha>.npy``; computed from ``images`` or the shard file at ``shard_path``."""
    path = Path(cache_dir) / f"{sha}.npy"
    if path.is_file():
        try:
            scores = np.load(path, allow_pickle=False)
            if scores.ndim == 1 and scores.dtype == np.float64:
                return scores
        except (OSError, ValueError, EOFError):
            pass  # an unreadable cache entry is recomputed
    if images is None:
        if not shard_path.is_file() or file_sha256(shard_path) != sha:
            raise ShardError(f"shard {name!r} has changed or is gone since it was sketched (content hash {sha[:12]}); "
                             "re-materialize raw_shard and gradient_sketch for it")
        images = read_shard(shard_path).images
    scores = spatial_structure(images)
    buf = io.BytesIO()
    np.save(buf, scores)
    atomic_write_bytes(path, buf.getvalue(), fault="raw_shard_write")
    return scores


def unstructured_rows(cache_dir: Path, shards: Mapping[str, tuple[Path, str]], rows: int, threshold: float) -> np.ndarray:
    """The input check of the outlier guard over the whole pool (``shards``: name -> (shard path, content
    hash)), in shard-name order, the row order of :func:`load_sketches`."""
    scores = np.concatenate([structure_scores(cache_dir, shards[name][0], name, shards[name][1])
                             for name in sorted(shards)])
    if scores.shape != (rows,):
        raise ShardError(f"structure scores cover {scores.size} images but the sketches have {rows} rows; "
                         "re-materialize raw_shard and gradient_sketch for all shards")
    return lacks_structure(scores, threshold)


def picked_per_shard(sample_ids: Iterable[str], shards: Iterable[str]) -> dict[str, int]:
    """How many of ``sample_ids`` come from each of ``shards``."""
    chosen = list(sample_ids)
    return {s: sum(1 for c in chosen if c.split("/")[0] == s) for s in shards}


def unknown_ids(sample_ids: Iterable[str], registered: set[str], shard_rows: Mapping[str, int]) -> list[str]:
    """The ids that are not a row of a registered shard (``shard_rows``: shard -> its number of rows)."""
    bad = []
    for sid in sample_ids:
        shard, _, row = sid.partition("/")
        if shard not in registered or shard not in shard_rows or not row.isdigit() or int(row) >= shard_rows[shard]:
            bad.append(sid)
    return bad


def class_counts(sample_ids: Iterable[str], shard_paths: Mapping[str, Path]) -> tuple[dict[int, int], dict[int, int], str | None]:
    """``(pool_counts, subset_counts, note)``: per-class counts of the pool's shards (``shard_paths``: name ->
    file) and of the ``sample_ids`` among them; ``note`` says why there are none (unlabelled or regression
    shards), else ``None``."""
    chosen: dict[str, list[int]] = {}
    for sid in sample_ids:
        shard, _, row = sid.partition("/")
        chosen.setdefault(shard, []).append(int(row))
    pool_counts: dict[int, int] = {}
    subset_counts: dict[int, int] = {}
    for shard, path in shard_paths.items():
        data = read_shard(Path(path))
        labels = data.labels
        if labels is None:
            note = ("regression pool (targets): no class report" if data.task == "regression"
                    else "unlabelled pool: no class report")
            return {}, {}, note
        for c, k in zip(*np.unique(labels, return_counts=True)):
            pool_counts[int(c)] = pool_counts.get(int(c), 0) + int(k)
        for c in labels[chosen.get(shard, [])]:
            subset_counts[int(c)] = subset_counts.get(int(c), 0) + 1
    return pool_counts, subset_counts, None


def reference_rows(validation_sketch: dict, identity: dict, method: str):
    """The validation split's sketch rows when the selection matches the validation moment (else ``None``:
    settings.reference 'pool', or a method without a reference option); refused when they were made
    with another sketch identity than the pool's."""
    if validation_sketch.get("reference") != "validation" or "reference" not in method_options(method):
        return None
    try:
        return read_sketch_shard(validation_sketch["path"], identity).rows
    except InputError as exc:
        raise SketchMismatchError(f"the validation sketch does not match the pool's sketches ({exc}): "
                                  "re-materialize gradient_sketch for all shards and validation_sketch with the "
                                  "same settings") from None


def selection_record(sketches: Mapping[str, Mapping], sample_ids: list[str], *, method: str, budget: int, seed: int,
                     pool_size: int, identity: dict, diagnostics: dict, reference: str, mode: str, **extra) -> dict:
    """What ``skmm_selection`` records, in either mode: the picks with equal weights and what they were
    chosen from (each shard's content hash and rows, the fingerprint of the shard sketches), plus ``extra``."""
    return {
        "method": method,
        "budget": budget,
        "seed": seed,
        "pool_size": pool_size,
        "sample_ids": sample_ids,
        "weights": [1.0 / len(sample_ids)] * len(sample_ids),
        "sketch_identity": identity,
        "shards": {name: rec["shard_sha256"] for name, rec in sorted(sketches.items())},
        "shard_rows": {name: rec["rows"] for name, rec in sorted(sketches.items())},
        "sketch_fingerprint": fingerprint_of({name: rec["data_version"] for name, rec in sketches.items()}),
        "reference": reference,
        "diagnostics": diagnostics,
        "selection_mode": mode,
        **extra,
    }
