"""Sketch shards on disk: float32 rows with a small manifest, refused when their identity differs.

A shard ``<stem>`` is three files written side by side:

``<stem>.rows.npy``   N x m float32 (``np.load(..., mmap_mode="r")`` reads it without loading it)
``<stem>.ids.npy``    N sample ids (unicode, no pickle)
``<stem>.json``       the manifest: format, the sketch identity, N, m, dtype and SHA-256 of both arrays

The manifest is written last and atomically, so a shard without one is incomplete and never read.
:class:`SketchShardWriter` streams rows into a memory-mapped file (memory independent of N);
:func:`load_sketch_shards` joins shards only if every identity equals the expected one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from skmm_pipeline.core.atomic import atomic_open, atomic_write_text, commit, temp_path
from skmm_pipeline.core.errors import SketchMismatchError
from skmm_pipeline.core.validation import InputError, check_int

FORMAT = "skmm-sketch-shard"
FORMAT_VERSION = 1


def canonical_identity(identity: dict) -> dict:
    """The identity as it reads back from JSON (tuples become lists, keys sorted)."""
    try:
        return json.loads(json.dumps(identity, sort_keys=True))
    except TypeError as exc:
        raise InputError(f"a sketch identity must be JSON-serialisable: {exc}") from None


def identity_hash(identity: dict) -> str:
    """A short stable hash of an identity (for directory names)."""
    return hashlib.sha256(json.dumps(canonical_identity(identity), sort_keys=True).encode()).hexdigest()[:16]


def check_identity(found: dict, expected: dict, where: str = "sketch") -> None:
    """Raise :class:`SketchMismatchError` naming every differing field."""
    found, expected = canonical_identity(found), canonical_identity(expected)
    if found == expected:
        return
    keys = sorted(set(found) | set(expected))
    diffs = [f"{k}: {found.get(k, '<missing>')!r} != expected {expected.get(k, '<missing>')!r}"
             for k in keys if found.get(k) != expected.get(k)]
    raise SketchMismatchError(f"{where} was made with a different sketch identity ({'; '.join(diffs)}): "
                              "re-sketch it with the current settings; sketches are never mixed")


def _stem(path) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix == ".json" else p


def _files(stem: Path) -> tuple[Path, Path, Path]:
    return stem.with_name(stem.name + ".rows.npy"), stem.with_name(stem.name + ".ids.npy"), stem.with_name(stem.name + ".json")


def _sha256_rows(rows: np.ndarray, chunk: int = 1 << 16) -> str:
    h = hashlib.sha256()
    for s in range(0, len(rows), chunk):
        h.update(np.ascontiguousarray(rows[s : s + chunk]).tobytes())
    return h.hexdigest()


def _ids_array(ids: Sequence) -> np.ndarray:
    arr = np.asarray([str(i) for i in ids])
    if arr.ndim != 1:
        raise InputError("sample ids must be a flat sequence")
    return arr.astype(str) if arr.size else np.zeros(0, dtype="<U1")


class _WriterLock:
    """An exclusive lock on the shard's writer (``.<stem>.lock``), held until commit or abort. The lock
    dies with its process, so whoever holds it knows every temporary file of the shard is an orphan; a
    second live writer of the same shard is refused. The file is removed on release (the ``gpu`` pool
    already keeps two runs from sketching one shard at once; the lock covers a crashed one)."""

    def __init__(self, stem: Path):
        stem.parent.mkdir(parents=True, exist_ok=True)
        self.path = stem.with_name(f".{stem.name}.lock")
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.close()
            raise InputError(f"sketch shard {stem.name!r} is being written by another process") from None

    def release(self) -> None:
        if not self.fh.closed:
            self.path.unlink(missing_ok=True)
            self.fh.close()


def _remove_orphans(stem: Path) -> int:
    """Delete the temporary files a killed writer of this shard left (``.<stem>.*.tmp``); their count."""
    orphans = [p for p in stem.parent.glob(f".{stem.name}.*.tmp") if p.is_file()]
    for p in orphans:
        p.unlink(missing_ok=True)
    return len(orphans)


class SketchShardWriter:
    """Stream N x m rows into ``<stem>.rows.npy`` and commit the shard with its manifest.

    >>> with SketchShardWriter(stem, identity, ids, sketch_dim=m) as w:   # doctest: +SKIP
    ...     sketcher.sketch(inputs, sample_ids=ids, out=w.rows)
    """

    def __init__(self, path, identity: dict, ids: Sequence, sketch_dim: int):
        sketch_dim = check_int(sketch_dim, "sketch_dim", minimum=1)
        self.stem = _stem(path)
        self.identity = canonical_identity(identity)
        self.ids = _ids_array(ids)
        if len(self.ids) == 0:
            raise InputError("a sketch shard needs at least one sample")
        if len(set(self.ids.tolist())) != len(self.ids):
            raise InputError("sample ids within a shard must be unique")
        self._lock = _WriterLock(self.stem)
        try:
            self.orphans_removed = _remove_orphans(self.stem)
            self._tmp_rows = temp_path(self.stem, "rows.")
            self.rows = np.lib.format.open_memmap(self._tmp_rows, mode="w+", dtype=np.float32,
                                                  shape=(len(self.ids), sketch_dim))
        except BaseException:
            self._lock.release()
            raise
        self._done = False

    def commit(self) -> Path:
        """Check the rows, move the files into place and write the manifest (last). Returns its path."""
        rows_path, ids_path, manifest_path = _files(self.stem)
        n, m = self.rows.shape
        self.rows.flush()
        sha_rows = _sha256_rows(self.rows)
        for s in range(0, len(self.rows), 1 << 16):
            if not np.isfinite(self.rows[s : s + (1 << 16)]).all():
                raise InputError("refusing to write a sketch with non-finite rows")
        del self.rows
        manifest_path.unlink(missing_ok=True)  # the old shard (if any) is incomplete from here on
        commit(self._tmp_rows, rows_path)
        with atomic_open(ids_path) as fh:
            np.save(fh, self.ids, allow_pickle=False)
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION, "identity": self.identity, "rows": n, "sketch_dim": m,
            "dtype": "float32", "rows_file": rows_path.name, "ids_file": ids_path.name, "rows_sha256": sha_rows,
            "ids_sha256": hashlib.sha256(self.ids.tobytes()).hexdigest(),
        }
        atomic_write_text(manifest_path, json.dumps(manifest, sort_keys=True, indent=1))
        self._done = True
        self._lock.release()
        return manifest_path

    def abort(self) -> None:
        if not self._done:
            if hasattr(self, "rows"):
                del self.rows
            self._tmp_rows.unlink(missing_ok=True)
            self._done = True
            self._lock.release()

    def __enter__(self) -> "SketchShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.commit()
        except BaseException:
            self.abort()
            raise


def save_sketch_shard(path, rows: np.ndarray, ids: Sequence, identity: dict) -> Path:
    """Write an in-memory N x m sketch as a shard; returns the manifest path."""
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[0] != len(ids):
        raise InputError(f"rows must be N x m with one row per id, got {rows.shape} for {len(ids)} ids")
    with SketchShardWriter(path, identity, ids, rows.shape[1]) as w:
        w.rows[:] = rows
    return _files(_stem(path))[2]


@dataclass
class SketchShard:
    rows: np.ndarray  # N x m float32 (read-only memory map unless loaded)
    ids: np.ndarray
    identity: dict
    manifest: dict
    path: Path


def read_sketch_shard(path, expected_identity: dict | None = None, mmap: bool = True, verify: bool = False) -> SketchShard:
    """Open a shard; refuse it if incomplete, malformed or (when given) of a different identity."""
    rows_path, ids_path, manifest_path = _files(_stem(path))
    if not manifest_path.is_file():
        raise InputError(f"no complete sketch shard at {_stem(path)} (manifest {manifest_path.name} missing)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable sketch manifest {manifest_path}: {exc}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise InputError(f"{manifest_path} is not a {FORMAT} v{FORMAT_VERSION} manifest")
    if expected_identity is not None:
        check_identity(manifest["identity"], expected_identity, where=f"sketch shard {_stem(path).name!r}")
    try:
        rows = np.load(rows_path, mmap_mode="r" if mmap else None, allow_pickle=False)
        ids = np.load(ids_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable sketch shard {_stem(path)}: {exc}") from None
    if rows.dtype != np.float32 or rows.shape != (manifest["rows"], manifest["sketch_dim"]) or ids.shape != (manifest["rows"],):
        raise InputError(f"sketch shard {_stem(path)} does not match its manifest (shape or dtype)")
    if verify and (_sha256_rows(rows) != manifest["rows_sha256"]
                   or hashlib.sha256(ids.astype(str).tobytes()).hexdigest() != manifest["ids_sha256"]):
        raise InputError(f"sketch shard {_stem(path)} is corrupted (checksum mismatch)")
    return SketchShard(rows, ids, manifest["identity"], manifest, _stem(path))


def load_sketch_shards(paths: Sequence, expected_identity: dict | None = None, verify: bool = False) -> tuple[np.ndarray, list[str], dict]:
    """Join shards in the given order into one N x m array; every identity must equal the expected one
    (by default the first shard's). Sample ids must be unique across shards."""
    if not paths:
        raise InputError("no sketch shards given")
    blocks, ids = [], []
    identity = None if expected_identity is None else canonical_identity(expected_identity)
    for p in paths:
        shard = read_sketch_shard(p, identity, verify=verify)
        identity = identity or shard.identity
        blocks.append(np.asarray(shard.rows))
        ids.extend(shard.ids.tolist())
    if len(set(ids)) != len(ids):
        raise InputError("the same sample id appears in more than one sketch shard")
    return np.concatenate(blocks), ids, identity
