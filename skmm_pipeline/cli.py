"""The ``skmm`` command line: run the demo, select from arrays, list subset versions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_demo(args) -> int:
    from skmm_pipeline.demo import format_report, run_demo

    root = Path(args.root).resolve()
    record = run_demo(root, budget=args.budget, seed=args.seed, n_shards=args.shards)
    print(format_report(record))
    db = record["mlflow_tracking_uri"]
    print(
        "\nOpen the UIs:\n"
        f"  Dagster: DAGSTER_HOME={root}/dagster_home .venv/bin/dagster dev -m skmm_pipeline.definitions\n"
        f"  MLflow:  .venv/bin/mlflow ui --backend-store-uri {db} --port 5000"
    )
    return 0


def _cmd_select(args) -> int:
    import numpy as np

    from skmm_pipeline.core.selection import select

    X = np.load(args.input, allow_pickle=False)
    labels = np.load(args.labels, allow_pickle=False) if args.labels else None
    result = select(args.method, X, args.n, seed=args.seed, labels=labels)
    out = Path(args.output)
    np.save(out, result.indices)
    sidecar = out.with_suffix(".json")
    sidecar.write_text(json.dumps({"method": result.method, "n": args.n, "seed": args.seed, **result.diagnostics}, indent=2, default=float))
    print(f"wrote {len(result.indices)} indices to {out} and diagnostics to {sidecar}")
    return 0


def _cmd_versions_list(args) -> int:
    from skmm_pipeline.versioning.dvc_store import SubsetStore

    versions = SubsetStore(str(Path(args.repo).resolve())).list_versions()
    if not versions:
        print("no subset versions yet")
        return 0
    for v in versions:
        print(f"{v.tag}  {v.created}  method={v.meta.get('method')}  n={v.meta.get('n')}  shards={','.join(v.meta.get('shards', []))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="skmm", description="Sketchy Moment Matching data selection.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the whole pipeline on the embedded digits scenario")
    d.add_argument("--root", default=".", help="project root (DVC repo, workspace); default: current directory")
    d.add_argument("--budget", type=int, default=40, help="number of samples to select (default 40)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--shards", type=int, default=3, help="number of shards the pool arrives in")
    d.set_defaults(func=_cmd_demo)

    s = sub.add_parser("select", help="select n rows of a .npy array (gradients, sketches or features)")
    s.add_argument("--input", required=True)
    s.add_argument("--n", type=int, required=True)
    s.add_argument("--method", default="skmm")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--labels", default=None)
    s.add_argument("--output", required=True)
    s.set_defaults(func=_cmd_select)

    v = sub.add_parser("versions", help="subset versions recorded in a DVC repository")
    vsub = v.add_subparsers(dest="versions_command", required=True)
    vl = vsub.add_parser("list", help="list subset versions")
    vl.add_argument("--repo", default=".")
    vl.set_defaults(func=_cmd_versions_list)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:  # one clear line for the user; the traceback is noise for input errors
        from skmm_pipeline.core.validation import InputError
        from skmm_pipeline.data.shards import ShardError
        from skmm_pipeline.demo import SetupError

        known = (InputError, ShardError, SetupError, FileNotFoundError)
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
