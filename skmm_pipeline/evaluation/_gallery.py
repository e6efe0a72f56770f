"""Pictures of samples: the selected subset as an image grid (one row block per class, each tile framed
in its shard's colour and captioned with its id) and a shard's thumbnails (rows set aside by the
outlier guard framed in red). Both return PNG bytes; sample ids are ``<shard>/<row>``."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from skmm_pipeline.core.errors import DataError
from skmm_pipeline.data.shards import read_shard, shard_class_names
from skmm_pipeline.evaluation._report import pyplot, render_png

TILE_INCHES = 0.85  # one tile; ids stay readable at 6 pt under it


def display_image(image: np.ndarray) -> np.ndarray:
    """One ``(C, H, W)`` image scaled to [0, 1] for display: grey ``(H, W)`` for one channel, ``(H, W, 3)``
    for three (other channel counts show the first); a constant image is mid-grey."""
    img = np.asarray(image, dtype=np.float64)
    img = img[0] if img.shape[0] != 3 else np.moveaxis(img, 0, -1)
    lo, hi = float(img.min()), float(img.max())
    return np.full_like(img, 0.5) if hi - lo < 1e-12 else (img - lo) / (hi - lo)


def class_names(shard_paths: Mapping[str, Path]) -> dict[int, str]:
    """Label -> class name, from the first of ``shard_paths`` that names its classes ({} when none does)."""
    for path in shard_paths.values():
        names = shard_class_names(Path(path))
        if names:
            return dict(enumerate(names))
    return {}


def load_samples(sample_ids: Sequence[str], shard_paths: Mapping[str, Path]):
    """``(images, labels, shards)`` of ``sample_ids`` in their order: images ``(n, C, H, W)``, labels
    (``None`` unless every shard is labelled) and each sample's shard name."""
    rows: dict[str, list[int]] = {}
    for sid in sample_ids:
        shard, _, row = sid.partition("/")
        if shard not in shard_paths or not row.isdigit():
            raise DataError(f"sample id {sid!r} is not <shard>/<row> of a known shard ({sorted(shard_paths)[:5]})")
        rows.setdefault(shard, []).append(int(row))
    images, labels = {}, {}
    for shard, wanted in rows.items():
        data = read_shard(Path(shard_paths[shard]), verify=False)
        if max(wanted) >= len(data.images):
            raise DataError(f"shard {shard!r} has {len(data.images)} rows; row {max(wanted)} was asked for")
        images[shard] = np.asarray(data.images[wanted])
        labels[shard] = None if data.labels is None else data.labels[wanted]
    taken = {shard: 0 for shard in rows}
    out_images, out_labels, out_shards = [], [], []
    for sid in sample_ids:
        shard = sid.partition("/")[0]
        out_images.append(images[shard][taken[shard]])
        out_labels.append(None if labels[shard] is None else int(labels[shard][taken[shard]]))
        out_shards.append(shard)
        taken[shard] += 1
    labelled = all(lab is not None for lab in out_labels)
    return np.stack(out_images), (np.array(out_labels) if labelled else None), out_shards


def _blocks(labels: np.ndarray | None, names: Mapping[int, str], count: int) -> list[tuple[str, list[int]]]:
    """Row blocks ``(title, positions)``: one per class in label order, or one block when unlabelled."""
    if labels is None:
        return [("", list(range(count)))]
    return [(f"class {names.get(int(c), int(c))}", np.flatnonzero(labels == c).tolist()) for c in np.unique(labels)]


def subset_grid(sample_ids: Sequence[str], shard_paths: Mapping[str, Path], *, title: str = "",
                columns: int = 10, max_per_class: int = 20) -> bytes:
    """PNG of the selected samples: per class (labelled shards; the shards' own class names) a block of
    rows, at most ``max_per_class`` tiles each (the block title says how many were picked); each tile is
    framed in its shard's colour (legend below) and captioned with its id."""
    if not sample_ids:
        raise DataError("no selected samples to draw")
    images, labels, shards = load_samples(sample_ids, shard_paths)
    names = class_names(shard_paths) if labels is not None else {}
    blocks = _blocks(labels, names, len(sample_ids))
    cols = max(1, min(columns, max(len(p) for _, p in blocks)))
    layout = []  # (title, positions of one grid row)
    for name, positions in blocks:
        shown = positions[:max_per_class]
        head = f"{name}: {len(positions)} picked" + (f", {len(shown)} shown" if len(shown) < len(positions) else "")
        for k in range(0, len(shown), cols):
            layout.append((head if k == 0 else "", shown[k:k + cols]))
    plt = pyplot()
    shard_order = list(dict.fromkeys(sorted(shards)))
    cmap = plt.get_cmap("tab10")
    colour = {s: cmap(k % 10) for k, s in enumerate(shard_order)}
    width = TILE_INCHES * cols + 0.4
    per_line = max(1, min(len(shard_order), int(width / 1.3)))  # legend entries that fit across
    legend_inches = 0.35 + 0.2 * -(-len(shard_order) // per_line)
    height = TILE_INCHES * 1.25 * len(layout) + 0.4 + legend_inches
    fig, axes = plt.subplots(len(layout), cols, squeeze=False, dpi=100, figsize=(width, height))
    for r, (head, positions) in enumerate(layout):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(positions):
                ax.axis("off")
                continue
            k = positions[c]
            ax.imshow(display_image(images[k]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            for side in ax.spines.values():
                side.set_color(colour[shards[k]])
                side.set_linewidth(3)
            ax.set_xlabel(sample_ids[k], fontsize=6, labelpad=1)
        if head:
            axes[r][0].set_title(head, fontsize=9, loc="left", fontweight="bold")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour[s]) for s in shard_order]
    fig.legend(handles, shard_order, loc="lower center", ncol=per_line, fontsize=8, frameon=False,
               title="shard", title_fontsize=8)
    fig.suptitle(title or f"selected subset: {len(sample_ids)} samples", fontsize=11)
    fig.tight_layout(rect=(0, legend_inches / height, 1, 1))
    return render_png(fig, tight=False)


def shard_grid(shard_path: Path, *, marked: np.ndarray | None = None, columns: int = 12,
               max_tiles: int = 48, title: str = "") -> bytes:
    """PNG of a shard's first ``max_tiles`` rows (rows ``marked`` True first, framed in red: set aside by
    the outlier guard), captioned with row and class name."""
    data = read_shard(Path(shard_path), verify=False)
    n = len(data.images)
    marked = np.zeros(n, dtype=bool) if marked is None else np.asarray(marked, dtype=bool)
    if marked.shape != (n,):
        raise DataError(f"marked rows cover {marked.size} images; shard {data.name!r} has {n}")
    order = np.concatenate([np.flatnonzero(marked), np.flatnonzero(~marked)])[:max_tiles]
    names = dict(enumerate(shard_class_names(Path(shard_path)) or ()))
    cols = min(columns, len(order))
    rows = -(-len(order) // cols)
    plt = pyplot()
    fig, axes = plt.subplots(rows, cols, squeeze=False, dpi=100,
                             figsize=(TILE_INCHES * cols + 0.4, TILE_INCHES * 1.2 * rows + 0.5))
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= len(order):
            ax.axis("off")
            continue
        row = int(order[k])
        ax.imshow(display_image(data.images[row]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        label = "" if data.labels is None else f" · {names.get(int(data.labels[row]), int(data.labels[row]))}"
        ax.set_xlabel(f"{row}{label}" + (" set aside" if marked[row] else ""), fontsize=6, labelpad=1,
                      color="red" if marked[row] else "black")
        if marked[row]:
            for side in ax.spines.values():
                side.set_color("red")
                side.set_linewidth(3)
    aside = int(marked.sum())
    fig.suptitle(title or f"shard {data.name}: {len(order)} of {n} rows"
                 + (f", {aside} set aside (red)" if aside else ""), fontsize=10)
    return render_png(fig)
