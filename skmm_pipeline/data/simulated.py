"""A simulated pool of sketch rows for scale runs, written shard by shard into memory-mapped sketch files.

Rows are drawn from 64 Gaussian clusters in m dimensions (centres with norms falling geometrically from
4 to 0.25, cluster sizes Zipf(1.6)-skewed, noise 0.3), in chunks, so a shard of any size is written with
bounded memory. Each shard has its own random stream (``seed``, ``index``), so shards are written
independently (on any worker, in any order) and the pool is the same whoever writes it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from skmm_pipeline.core.sketch_io import SketchShardWriter
from skmm_pipeline.core.validation import check_int

CLUSTERS = 64
CHUNK = 1 << 15


def simulated_centres(m: int, seed: int = 0) -> np.ndarray:
    """The clusters' centres, ``CLUSTERS x m`` float32, norms falling from 4 to 0.25."""
    rng = np.random.default_rng(seed)
    scale = np.geomspace(4, 0.25, CLUSTERS)[:, None].astype(np.float32)
    return rng.normal(size=(CLUSTERS, check_int(m, "m", minimum=1))).astype(np.float32) * scale


def shard_sizes(rows: int, shards: int) -> list[int]:
    """Rows per shard, as ``np.array_split`` cuts ``rows`` into ``shards``."""
    rows, shards = check_int(rows, "rows", minimum=1), check_int(shards, "shards", minimum=1, maximum=rows)
    return [rows // shards + (i < rows % shards) for i in range(shards)]


def write_simulated_shard(path, name: str, rows: int, m: int, *, index: int = 0, seed: int = 0) -> dict:
    """Write shard ``index`` of the simulated pool (``rows x m``, ids ``<name>/<row>``) to the sketch file
    ``path``; returns its record (``path``, ``data_version``, ``rows``) as ``gradient_sketch`` gives it."""
    rows = check_int(rows, "rows", minimum=1)
    centres = simulated_centres(m, seed)
    rng = np.random.default_rng([seed, check_int(index, "index", minimum=0)])
    with SketchShardWriter(path, {"seed": seed, "m": m}, [f"{name}/{r}" for r in range(rows)], m) as w:
        for lo in range(0, rows, CHUNK):
            k = min(CHUNK, rows - lo)
            label = rng.zipf(1.6, size=k) % CLUSTERS
            w.rows[lo : lo + k] = centres[label] + 0.3 * rng.standard_normal((k, m), dtype=np.float32)
    return {"path": str(Path(path)), "data_version": f"sim-{seed}-{index}", "rows": rows}
