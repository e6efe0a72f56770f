"""The ``skmm`` command line: run the demo, select from arrays, list subset versions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_demo(args) -> int:
    from skmm_pipeline.demo import format_report, run_demo

    root = Path(args.root).resolve()
    record = run_demo(root, budget=args.budget, seed=args.seed, n_shards=args.shards, finetune_mode=args.finetune,
                      benchmark=args.benchmark, benchmark_config={"seeds": args.benchmark_seeds})
    print(format_report(record))
    db = record["mlflow_tracking_uri"]
    print(
        "\nOpen the UIs:\n"
        f"  Dagster: DAGSTER_HOME={root}/dagster_home .venv/bin/dagster dev -m skmm_pipeline.definitions\n"
        f"  MLflow:  .venv/bin/mlflow ui --backend-store-uri {db} --port 5000"
    )
    return 0


def _json_safe(value):
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 64 else f"<array shape {value.shape}>"
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


def _parse_option(text: str):
    from skmm_pipeline.core.validation import InputError

    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise InputError(f"--option expects KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.replace("-", "_"), value


def _cmd_select(args) -> int:
    import numpy as np

    from skmm_pipeline.core.selection import as_selection_matrix, select
    from skmm_pipeline.core.validation import InputError
    from skmm_pipeline.file_io import ResultPaths, check_fits, read_npy

    paths = ResultPaths.plan(args.output, (args.input, args.labels, args.images), force=args.force)
    X = read_npy(args.input, "--input")
    input_shape = list(X.shape)
    labels = None if args.labels is None else np.asarray(read_npy(args.labels, "--labels", kinds="iu"))
    options = dict(_parse_option(o) for o in args.option)
    if args.class_balanced:
        options["class_balanced"] = True
    if args.outlier_guard:
        options["outlier_guard"] = True
    sketch_identity = None
    if args.sketch_dim is not None:
        import torch

        from skmm_pipeline.core.sketch import make_sketch

        X = as_selection_matrix(X, "input")  # finite, 2-D: fail with the row number before sketching
        # The N x m sketch, plus one 4,096-row block of the Gaussian map at a time.
        check_fits(4 * args.sketch_dim * (X.shape[0] + min(X.shape[1], 4096)), f"--sketch-dim {args.sketch_dim}")
        sk = make_sketch("gaussian", X.shape[1], args.sketch_dim, args.seed, args.sketch_name)
        out = np.empty((X.shape[0], sk.sketch_dim), dtype=np.float32)
        for lo in range(0, X.shape[0], 4096):
            out[lo : lo + 4096] = sk.apply(torch.as_tensor(np.asarray(X[lo : lo + 4096], dtype=np.float32))).numpy()
        X = out
        sketch_identity = sk.identity.as_dict()
    extra = {}
    if args.images:
        from skmm_pipeline.core.outliers import lacks_structure, spatial_structure

        if not args.outlier_guard:
            raise InputError("--images is used by the input check of --outlier-guard; pass --outlier-guard too")
        images = read_npy(args.images, "--images")
        if images.ndim != 4 or images.shape[0] != input_shape[0]:
            raise InputError(f"--images must be a .npy array of {input_shape[0]} x C x H x W (one image per input "
                             f"row), got {images.shape}")
        extra["exclude"] = lacks_structure(spatial_structure(images))
    result = select(args.method, X, args.n, seed=args.seed, labels=labels, **options, **extra)
    record = {
        "method": result.method,
        "n": args.n,
        "seed": args.seed,
        "input": str(args.input),
        "input_shape": input_shape,
        "options": options,
        "images": None if args.images is None else str(args.images),
        "sketch": sketch_identity,
        **result.diagnostics,
    }
    paths.write(result.indices, _json_safe(record), result.weights)
    print(f"wrote {len(result.indices)} indices to {paths.indices} and diagnostics to {paths.diagnostics}")
    return 0


def _versions_catalog(args):
    from skmm_pipeline.versioning.catalog import SubsetCatalog
    from skmm_pipeline.versioning.dvc_store import SubsetStore

    uri = None if args.mlflow == "none" else args.mlflow
    return SubsetCatalog(
        SubsetStore(Path(args.repo).resolve()), tracking_uri=uri,
        key_metric=getattr(args, "metric", "test_accuracy"),
    )


def _versions_with_metrics(catalog, read):
    """``read(catalog)``; if the MLflow store cannot be read, warn and read without metrics."""
    from skmm_pipeline.versioning.catalog import MetricsUnavailable

    try:
        return read(catalog)
    except MetricsUnavailable as exc:
        print(f"skmm: warning: {exc}; showing no evaluation metrics", file=sys.stderr)
        catalog.tracking_uri = None
        return read(catalog)


def _versions_fmt(value) -> str:
    import math

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cmd_versions_list(args) -> int:
    catalog = _versions_catalog(args)
    table = _versions_with_metrics(catalog, lambda c: c.versions())
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


def _cmd_versions_show(args) -> int:
    import json as _json

    details = _versions_with_metrics(_versions_catalog(args), lambda c: c.show(args.tag))
    v, m = details.version, details.manifest
    where = f"commit {v.commit[:12]}" if v.commit else "no git: recorded by content hash"
    print(f"{v.tag}  created {v.created}  ({where}; data md5 {v.data_md5}; "
          f"pushed {'yes' if v.pushed else 'no (queued)'})")
    print(f"method {m.get('method')}  n {m.get('n')}  budget {m.get('budget')}  seed {m.get('seed')}  "
          f"pool {m.get('pool_size')}  c_S {_versions_fmt(m.get('c_S'))}")
    print(f"model  {m.get('model_id')}")
    print(f"sketch {_json.dumps(m.get('sketch_identity'), sort_keys=True)}")
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
    return 0


def _cmd_versions_diff(args) -> int:
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


def _cmd_versions_checkout(args) -> int:
    from skmm_pipeline.versioning.dvc_store import SubsetStore

    store = SubsetStore(Path(args.repo).resolve())
    version = store.checkout(args.tag, force=args.force)
    print(f"{store.data_path} restored to {version.tag} (data md5 {version.data_md5}); "
          f"{store.dvc_file.name} points at it. Your branch and git index are unchanged.")
    return 0


def _cmd_versions_push(args) -> int:
    from skmm_pipeline.versioning.dvc_store import SubsetStore

    pushed = SubsetStore(Path(args.repo).resolve()).push_pending()
    print(f"pushed {len(pushed)} version(s): {', '.join(pushed)}" if pushed else "nothing to push")
    return 0


def _add_versions_parser(sub) -> None:
    v = sub.add_parser("versions", help="subset versions recorded with DVC (list, show, diff, checkout, push)")
    vsub = v.add_subparsers(dest="versions_command", required=True)

    def command(name, func, help_):
        c = vsub.add_parser(name, help=help_)
        c.add_argument("--repo", default=".", help="repository root (default: current directory)")
        c.set_defaults(func=func)
        return c

    mlflow_help = ("MLflow store to read evaluation metrics from: a URI, 'auto' ($MLFLOW_TRACKING_URI, "
                   "else the project's .skmm/mlflow/mlflow.db if present) or 'none'")
    vl = command("list", _cmd_versions_list, "table of versions: tag, date, method, n, key metric, shards")
    vl.add_argument("--mlflow", default="auto", help=mlflow_help)
    vl.add_argument("--metric", default="test_accuracy",
                    help="key metric: NAME shows NAME/<method> (default test_accuracy); NAME/METHOD as is")
    vl.add_argument("--format", choices=("table", "csv", "json"), default="table")
    vs = command("show", _cmd_versions_show, "one version: manifest, metrics, samples")
    vs.add_argument("tag")
    vs.add_argument("--mlflow", default="auto", help=mlflow_help)
    vs.add_argument("--rows", type=int, default=10, help="samples to print (-1: all)")
    vd = command("diff", _cmd_versions_diff, "added/removed sample ids, overlap and metric deltas from A to B")
    vd.add_argument("a")
    vd.add_argument("b")
    vd.add_argument("--mlflow", default="auto", help=mlflow_help)
    vd.add_argument("--limit", type=int, default=20, help="ids to print per list (-1: all)")
    vc = command("checkout", _cmd_versions_checkout, "restore data/ (and data.dvc) to a version")
    vc.add_argument("tag")
    vc.add_argument("--force", action="store_true", help="discard hand edits in data/")
    command("push", _cmd_versions_push, "push versions whose data has not reached the DVC remote")


def _cmd_shards_add(args) -> int:
    from skmm_pipeline.data.digits import write_new_digits_shard
    from skmm_pipeline.defs.resources import Workspace

    landing = Workspace(root=str(Path(args.root).resolve())).landing
    name = write_new_digits_shard(landing, args.name, args.count, args.seed)
    print(
        f"landed shard {name!r} ({args.count} samples) in {landing}\n"
        "The running `shard_sensor` (dagster dev) registers and sketches it; then run the `reselect` job,\n"
        "or wait for `reselect_schedule`. Without the UI: `make demo` re-selects over all shards."
    )
    return 0


def _cmd_shards_import(args) -> int:
    from skmm_pipeline.data.ingest import ImportRequest, import_dataset
    from skmm_pipeline.defs.resources import Workspace

    ws = Workspace(root=str(Path(args.root).resolve()))
    req = ImportRequest(source=args.source, path=args.path, role=args.role, split=args.split, name=args.name or "",
                        shards=args.shards, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                        seed=args.seed, on_corrupt=args.on_corrupt, overwrite_eval=args.overwrite_eval,
                        path_column=args.path_column, target_column=args.target_column)
    res = import_dataset(req, ws.landing, ws.evaluation, backbone=args.backbone, image_size=args.image_size)
    for name, rows in res.rows.items():
        where = ws.landing if name in res.shards else ws.evaluation
        print(f"wrote {where / (name + '.npz')} ({rows} images)")
    print(f"{res.task}; {res.skipped} unreadable images skipped. The running `shard_sensor` (dagster dev) registers "
          "and sketches new shards; or run the `import_data` job from the UI, which registers them itself.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="skmm", description="Sketchy Moment Matching data selection.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the whole pipeline on the embedded digits scenario")
    d.add_argument("--root", default=".", help="project root (DVC repo, workspace); default: current directory")
    d.add_argument("--budget", type=int, default=40, help="number of samples to select (default 40)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--shards", type=int, default=3, help="number of shards the pool arrives in")
    d.add_argument("--finetune", default="ft1", choices=["ft1", "ft2", "both"],
                   help="evaluation: FT-1 (head on frozen features), FT-2 (last block + head), or both")
    d.add_argument("--benchmark", action=argparse.BooleanOptionalAction, default=True,
                   help="then run the benchmark job (selection_benchmark): every selection method x budgets "
                   "10-160 x seeds, FT-1, label-free and label-using groups, logged to MLflow; about 1-2 minutes "
                   "on 2 CPU cores (default: on)")
    d.add_argument("--benchmark-seeds", type=int, default=5, metavar="K", help="seeds of the benchmark (default 5)")
    d.set_defaults(func=_cmd_demo)

    s = sub.add_parser(
        "select",
        help="select n rows of a .npy array (gradients, sketches or features)",
        description="Select n rows of an N x d .npy array with SkMM or a baseline; writes the indices (.npy) "
        "and a JSON sidecar with the diagnostics (and the relaxed weights for skmm-relaxation).",
    )
    s.add_argument("--input", required=True, help="N x d .npy array")
    s.add_argument("--n", type=int, required=True, help="number of rows to select")
    s.add_argument("--method", default="skmm", help="skmm (default), skmm-relaxation, skmm-v1-reference, skmmv2, "
                   "uniform, leverage, ridge-leverage, adaptive, herding, k-center")
    s.add_argument("--seed", type=int, default=0, help="fixes the sketch and the selection")
    s.add_argument("--sketch-dim", type=int, default=None,
                   help="sketch the input to this many dimensions (seeded Gaussian JL map) before selecting")
    s.add_argument("--sketch-name", default="cli-input", help="parameter name the sketch is derived from")
    s.add_argument("--labels", default=None, help="N labels (.npy), for --class-balanced")
    s.add_argument("--class-balanced", action="store_true", help="split the budget over classes by their sizes")
    s.add_argument("--outlier-guard", action="store_true",
                   help="set aside rows that stick out of the pool (corrupted data) before selecting")
    s.add_argument("--images", default=None,
                   help="the N images (.npy, N x C x H x W) the rows come from: with --outlier-guard, images "
                   "without the pool's spatial structure (noise, salt-and-pepper, blank) are set aside too")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. --option c_S=0.9 --option rounding=pipage (repeatable)")
    s.add_argument("--output", required=True,
                   help="where to write the indices (<name>.npy); diagnostics go to <name>.json and relaxed weights "
                   "to <name>.weights.npy. An input or an existing result is never replaced without --force")
    s.add_argument("--force", action="store_true", help="replace existing result files (never an input)")
    s.set_defaults(func=_cmd_select)

    sh = sub.add_parser("shards", help="land shards: a demo delivery, or a local dataset")
    shsub = sh.add_subparsers(dest="shards_command", required=True)
    sa = shsub.add_parser("add", help="land a new delivery of digits for the demo")
    sa.add_argument("--root", default=".", help="project root; default: current directory")
    sa.add_argument("--name", default=None, help="shard name (default digits-new-<k>)")
    sa.add_argument("--count", type=int, default=100)
    sa.add_argument("--seed", type=int, default=0)
    sa.set_defaults(func=_cmd_shards_add)
    si = shsub.add_parser("import", help="import a local dataset (CIFAR-10, ImageFolder, CSV) as pool shards "
                          "and/or evaluation splits (the import_data job, from the command line)")
    si.add_argument("--root", default=".", help="project root; default: current directory")
    si.add_argument("--source", required=True, choices=["cifar10", "imagefolder", "csv"])
    si.add_argument("--path", required=True, help="the CIFAR-10 folder (or its parent), ImageFolder root, or CSV file")
    si.add_argument("--role", default="pool", choices=["pool", "val", "test"])
    si.add_argument("--split", default="train", choices=["train", "test"], help="cifar10 only")
    si.add_argument("--name", default=None, help="shard name prefix (default: from the path)")
    si.add_argument("--shards", type=int, default=1)
    si.add_argument("--val-fraction", type=float, default=0.0, help="role pool: hold out this share as val.npz")
    si.add_argument("--test-fraction", type=float, default=0.0, help="role pool: hold out this share as test.npz")
    si.add_argument("--seed", type=int, default=0)
    si.add_argument("--on-corrupt", default="skip", choices=["skip", "raise"])
    si.add_argument("--overwrite-eval", action="store_true", help="replace an existing val.npz / test.npz")
    si.add_argument("--backbone", default="small_cnn",
                    help="transform images for this backbone (as settings.backbone; default small_cnn)")
    si.add_argument("--image-size", type=int, default=224, help="input size for torchvision backbones")
    si.add_argument("--path-column", default="path", help="csv only")
    si.add_argument("--target-column", default="target", help="csv only")
    si.set_defaults(func=_cmd_shards_import)

    _add_versions_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:  # one clear line for the user; the traceback is noise for input errors
        from skmm_pipeline.core.validation import InputError
        from skmm_pipeline.data.shards import ShardError
        from skmm_pipeline.data.vision import DataError
        from skmm_pipeline.demo import SetupError

        known = (InputError, ShardError, DataError, SetupError, FileNotFoundError, PermissionError, IsADirectoryError,
                 NotADirectoryError)
        try:
            from skmm_pipeline.versioning.dvc_store import SubsetVersionError

            known += (SubsetVersionError,)
        except ImportError:
            pass
        if isinstance(exc, known):
            print(f"skmm: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
