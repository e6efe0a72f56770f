"""Files a user hands to the command line, and the files it writes back: read with a clear error, never
overwrite an input or an existing result unless asked, check sizes before allocating, write atomically.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skmm_pipeline.core.atomic import atomic_write_bytes
from skmm_pipeline.core.validation import InputError

NUMERIC = "biuf"  # numpy dtype kinds of real numbers (complex is refused)


def read_npy(path, what: str, kinds: str = NUMERIC) -> np.ndarray:
    """A ``.npy`` array (memory-mapped), or an :class:`InputError` naming ``what`` and the problem."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} {p} does not exist")
    if not p.is_file():
        raise InputError(f"{what} {p} is a directory, not a .npy file")
    try:
        arr = np.load(p, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot read {what} {p} as a .npy array of numbers: {reason}") from None
    if not isinstance(arr, np.ndarray):
        arr.close()
        raise InputError(f"{what} {p} is an .npz archive, not a .npy array")
    if arr.dtype.kind not in kinds:
        expected = "integers" if kinds == "iu" else "real numbers"
        raise InputError(f"{what} {p} holds {arr.dtype} values: {expected} expected")
    return arr


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``MemAvailable``), or ``None`` when unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(nbytes: int, what: str) -> None:
    """Refuse up front an allocation that the machine's available memory cannot hold."""
    free = available_memory()
    if free is not None and nbytes > free:
        raise InputError(f"{what} needs {nbytes / 2**30:.1f} GiB of memory and {free / 2**30:.1f} GiB are available")


@dataclass(frozen=True)
class ResultPaths:
    """The files one selection writes: ``<stem>.npy``, ``<stem>.json``, ``<stem>.weights.npy``."""

    indices: Path
    diagnostics: Path
    weights: Path

    @classmethod
    def plan(cls, output, inputs, force: bool = False) -> "ResultPaths":
        """Refuse, before any work: an output that is not a ``.npy`` name, one that would replace an input,
        an existing result unless ``force``, and a missing folder."""
        out = Path(output)
        if out.suffix != ".npy" or not out.stem:
            raise InputError(f"--output must name a .npy file (the diagnostics go beside it as <name>.json), got {out}")
        paths = cls(out, out.with_suffix(".json"), out.with_name(out.stem + ".weights.npy"))
        taken = {Path(p).resolve(): str(p) for p in inputs if p}
        for p in (paths.indices, paths.diagnostics, paths.weights):
            if p.resolve() in taken:
                raise InputError(f"writing {p} would replace the input {taken[p.resolve()]}: choose another --output")
        if not out.parent.is_dir():
            raise InputError(f"--output folder {out.parent} does not exist")
        if not force:
            existing = [str(p) for p in (paths.indices, paths.diagnostics, paths.weights) if p.exists()]
            if existing:
                raise InputError(f"{existing[0]} exists: pass --force to replace it, or choose another --output")
        return paths

    def write(self, indices: np.ndarray, record: dict, weights: np.ndarray | None = None) -> None:
        """Weights and indices, then the diagnostics, each written whole or not at all."""
        if weights is not None:
            atomic_write_bytes(self.weights, _npy_bytes(weights))
            record = {**record, "weights_file": str(self.weights)}
        atomic_write_bytes(self.indices, _npy_bytes(indices))
        atomic_write_bytes(self.diagnostics, json.dumps(record, indent=2).encode())


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr), allow_pickle=False)
    return buf.getvalue()
