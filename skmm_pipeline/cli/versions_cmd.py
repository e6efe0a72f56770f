"""``skmm versions``: list, show, diff, check out and push the subset versions recorded with DVC."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from skmm_pipeline.core.atomic import atomic_write_bytes
from skmm_pipeline.core.errors import InputError, MetricsUnavailable
from skmm_pipeline.versioning.catalog import SubsetCatalog
from skmm_pipeline.versioning.dvc_store import SubsetStore


def _versions_catalog(args):
    uri = None if args.mlflow == "none" else args.mlflow
    return SubsetCatalog(
        SubsetStore(Path(args.repo).resolve()), tracking_uri=uri,
        key_metric=getattr(args, "metric", "test_accuracy"),
    )


def _versions_with_metrics(catalog, read):
    """``read(catalog)``; if the MLflow store cannot be read, warn and read without metrics."""
    try:
        return read(catalog)
    except MetricsUnavailable as exc:
        print(f"skmm: warning: {exc}; showing no evaluation metrics", file=sys.stderr)
        catalog.tracking_uri = None
        return read(catalog)


def _versions_fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _write_png(path: str, png: bytes, what: str) -> None:
    atomic_write_bytes(Path(path), png)
    print(f"{what} written to {path}", file=sys.stderr)


def run_list(args) -> int:
    catalog = _versions_catalog(args)
    table = _versions_with_metrics(catalog, lambda c: c.versions())
    if args.plot:
        # Imported here: the evaluation package loads torch and matplotlib (about 2 s), which the
        # plain list does not need.
        from skmm_pipeline.evaluation import history_plot  # noqa: PLC0415

        history = _versions_with_metrics(catalog, lambda c: c.history())
        if not history:
            raise InputError("no subset versions yet: nothing to plot")
        _write_png(args.plot, history_plot(history, metric_label=f"{catalog.key_metric} (%)"), "version history plot")
    if args.format == "csv":
        print(table.to_csv(index=False), end="")
        return 0
    if args.format == "json":
        print(table.to_json(orient="records", date_format="iso", indent=2))
        return 0
    if table.empty:
        print("no subset versions yet")
        return 0
    key = catalog.key_metric
    shown = table[["tag", "date", "method", "n", key, "shards", "pushed"]].copy()
    shown["date"] = shown["date"].dt.strftime("%Y-%m-%d %H:%M UTC")
    shown[key] = shown[key].map(_versions_fmt)
    shown["n"] = shown["n"].map(_versions_fmt)
    shown["pushed"] = shown["pushed"].map({True: "yes", False: "no (queued)"})
    print(shown.to_string(index=False))
    if not catalog.store.uses_git():
        print("(not a git repository: versions are recorded by content hash)")
    return 0


def run_show(args) -> int:
    details = _versions_with_metrics(_versions_catalog(args), lambda c: c.show(args.tag))
    v, m = details.version, details.manifest
    where = f"commit {v.commit[:12]}" if v.commit else "no git: recorded by content hash"
    print(f"{v.tag}  created {v.created}  ({where}; data md5 {v.data_md5}; "
          f"pushed {'yes' if v.pushed else 'no (queued)'})")
    print(f"method {m.get('method')}  n {m.get('n')}  budget {m.get('budget')}  seed {m.get('seed')}  "
          f"pool {m.get('pool_size')}  c_S {_versions_fmt(m.get('c_S'))}")
    print(f"model  {m.get('model_id')}")
    print(f"sketch {json.dumps(m.get('sketch_identity'), sort_keys=True)}")
    shards = m.get("shards") or {}
    print("shards " + (", ".join(f"{k} ({str(val)[:12]})" for k, val in shards.items()) or "-"))
    runs = ", ".join(details.mlflow_run_ids) or m.get("mlflow_run_id") or "-"
    print(f"runs   Dagster {m.get('dagster_run_id') or '-'}; MLflow {runs}")
    if not details.metrics.empty:
        metrics = details.metrics.copy()
        metrics["value"] = metrics["value"].map(_versions_fmt)
        print("\nmetrics:\n" + metrics.to_string(index=False))
    subset = details.subset
    limit = len(subset) if args.rows < 0 else args.rows
    if limit:
        print(f"\nsamples ({min(limit, len(subset))} of {len(subset)}):")
        print(subset.head(limit).to_string(index=False))
    print(f"\nrestore with: skmm versions checkout {v.tag}")
    if args.grid:
        # Imported here: the evaluation package loads torch and matplotlib (about 2 s).
        from skmm_pipeline.evaluation import subset_grid  # noqa: PLC0415

        landing = Path(args.landing) if args.landing else Path(args.repo).resolve() / ".skmm" / "landing"
        shards = {name: landing / f"{name}.npz" for name in sorted(set(subset["shard"]))}
        absent = [str(p) for p in shards.values() if not p.is_file()]
        if absent:
            raise InputError(f"shard files of {v.tag} not found: {absent[:3]} (give the folder with --landing)")
        title = f"{v.tag}: {m.get('method')}, n={m.get('n')} of {m.get('pool_size')}"
        _write_png(args.grid, subset_grid(list(subset["sample_id"]), shards, title=title), "subset grid")
    return 0


def run_diff(args) -> int:
    d = _versions_with_metrics(_versions_catalog(args), lambda c: c.diff(args.a, args.b))
    print(f"{d.a} -> {d.b}: {d.n_a} -> {d.n_b} samples, overlap {d.overlap} "
          f"(Jaccard {d.jaccard:.3f}), {len(d.added)} added, {len(d.removed)} removed")
    for key, (old, new) in d.changes.items():
        print(f"changed {key}: {old} -> {new}")
    if not d.metrics.empty:
        metrics = d.metrics.copy()
        for column in ("a", "b", "delta"):
            metrics[column] = metrics[column].map(_versions_fmt)
        if d.a != d.b:
            metrics = metrics.rename(columns={"a": d.a, "b": d.b})
        print("\nmetrics:\n" + metrics.to_string(index=False))
    for label, frame in (("added", d.added), ("removed", d.removed)):
        ids = frame["sample_id"].tolist()
        shown = ids if args.limit < 0 else ids[: args.limit]
        more = f" … (+{len(ids) - len(shown)} more)" if len(shown) < len(ids) else ""
        print(f"\n{label} ({len(ids)}): " + (" ".join(shown) + more if ids else "-"))
    return 0


def run_checkout(args) -> int:
    store = SubsetStore(Path(args.repo).resolve())
    version = store.checkout(args.tag, force=args.force)
    print(f"{store.data_path} restored to {version.tag} (data md5 {version.data_md5}); "
          f"{store.dvc_file.name} points at it. Your branch and git index are unchanged.")
    return 0


def run_push(args) -> int:
    pushed = SubsetStore(Path(args.repo).resolve()).push_pending()
    print(f"pushed {len(pushed)} version(s): {', '.join(pushed)}" if pushed else "nothing to push")
    return 0
