"""The ``skmm`` command line: run the demo, select from arrays, land shards, list subset versions.

The parser is built here without importing torch, Dagster or MLflow (seconds each); only the module of
the command that runs (``<name>_cmd.py``) is imported, by :func:`main`. That is the one place imports
are deferred, for ``skmm --help`` and ``skmm versions list`` to start fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from skmm_pipeline.core import defaults
from skmm_pipeline.core.errors import SkmmError

# Errors of the user's environment that get one line too (a missing or unreadable file).
FILE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _add_versions_parser(sub) -> None:
    v = sub.add_parser("versions", help="subset versions recorded with DVC (list, show, diff, checkout, push)")
    vsub = v.add_subparsers(dest="versions_command", required=True)

    def command(name, func: str, help_: str):
        c = vsub.add_parser(name, help=help_)
        c.add_argument("--repo", default=".", help="repository root (default: current directory)")
        c.set_defaults(run=func)
        return c

    mlflow_help = ("MLflow store to read evaluation metrics from: a URI, 'auto' ($MLFLOW_TRACKING_URI, "
                   "else the project's .skmm/mlflow/mlflow.db if present) or 'none'")
    vl = command("list", "versions_cmd:run_list", "table of versions: tag, date, method, n, key metric, shards")
    vl.add_argument("--mlflow", default="auto", help=mlflow_help)
    vl.add_argument("--metric", default="test_accuracy",
                    help="key metric: NAME shows NAME/<method> (default test_accuracy); NAME/METHOD as is")
    vl.add_argument("--format", choices=("table", "csv", "json"), default="table")
    vl.add_argument("--plot", metavar="PNG", help="also draw every version's key metric against its uniform "
                    "baseline (with n and pool size) into this PNG file")
    vs = command("show", "versions_cmd:run_show", "one version: manifest, metrics, samples")
    vs.add_argument("tag")
    vs.add_argument("--mlflow", default="auto", help=mlflow_help)
    vs.add_argument("--rows", type=int, default=10, help="samples to print (-1: all)")
    vs.add_argument("--grid", metavar="PNG", help="also draw the version's samples as an image grid into this "
                    "PNG file (needs the shard files in the landing folder)")
    vs.add_argument("--landing", help="folder with the shard files (default: <repo>/.skmm/landing)")
    vd = command("diff", "versions_cmd:run_diff", "added/removed sample ids, overlap and metric deltas from A to B")
    vd.add_argument("a")
    vd.add_argument("b")
    vd.add_argument("--mlflow", default="auto", help=mlflow_help)
    vd.add_argument("--limit", type=int, default=20, help="ids to print per list (-1: all)")
    vc = command("checkout", "versions_cmd:run_checkout", "restore data/ (and data.dvc) to a version")
    vc.add_argument("tag")
    vc.add_argument("--force", action="store_true", help="discard hand edits in data/")
    command("push", "versions_cmd:run_push", "push versions whose data has not reached the DVC remote")



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="skmm", description="Sketchy Moment Matching data selection.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the whole pipeline on the embedded digits scenario")
    d.add_argument("--root", default=".", help="project root (DVC repo, workspace); default: current directory")
    d.add_argument("--budget", type=int, default=defaults.BUDGET,
                   help=f"number of samples to select (default {defaults.BUDGET})")
    d.add_argument("--seed", type=int, default=defaults.SEED)
    d.add_argument("--shards", type=int, default=defaults.DEMO_SHARDS, help="number of shards the pool arrives in")
    d.add_argument("--finetune", default="ft1", choices=["ft1", "ft2", "both"],
                   help="evaluation: FT-1 (head on frozen features), FT-2 (last block + head), or both")
    d.add_argument("--benchmark", action=argparse.BooleanOptionalAction, default=True,
                   help="then run the benchmark job (method_benchmark): every selection method x budgets "
                   "10-160 x seeds, FT-1, label-free and label-using groups, logged to MLflow; about 1-2 minutes "
                   "on 2 CPU cores (default: on)")
    d.add_argument("--benchmark-seeds", type=int, default=defaults.BENCHMARK_SEEDS, metavar="K",
                   help=f"seeds of the benchmark (default {defaults.BENCHMARK_SEEDS})")
    d.set_defaults(run="demo_cmd:run")

    s = sub.add_parser(
        "select",
        help="select n rows of a .npy array (gradients, sketches or features)",
        description="Select n rows of an N x d .npy array with SkMM or a baseline; writes the indices (.npy) "
        "and a JSON sidecar with the diagnostics (and the relaxed weights for skmm-relaxation).",
    )
    s.add_argument("--input", required=True, help="N x d .npy array")
    s.add_argument("--n", type=int, required=True, help="number of rows to select")
    s.add_argument("--method", default="skmm", help="any registered method (default skmm); `skmm methods` lists them")
    s.add_argument("--seed", type=int, default=defaults.SEED, help="fixes the sketch and the selection")
    s.add_argument("--sketch-dim", type=int, default=None,
                   help="sketch the input to this many dimensions (seeded Gaussian JL map) before selecting")
    s.add_argument("--sketch-name", default="cli-input", help="parameter name the sketch is derived from")
    s.add_argument("--labels", default=None, help="N labels (.npy), for --class-balanced")
    s.add_argument("--class-balanced", action="store_true", help="split the budget over classes by their sizes")
    s.add_argument("--class-budgets", choices=["proportional", "equal"], default=None,
                   help="how --class-balanced splits the budget: proportional to class sizes (default) or equal "
                   "per class (imbalanced pools); implies --class-balanced")
    s.add_argument("--reference", default=None,
                   help="rows like --input's (.npy) of the data the model will be evaluated on, e.g. a validation "
                   "split: skmm matches their second moment instead of the input's (a pool with shifted deliveries "
                   "or imbalanced classes; see docs/benchmarks.md, scenario suite)")
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
    s.set_defaults(run="select_cmd:run")

    m = sub.add_parser("methods", help="list the registered selection methods: name, group, input, description")
    m.set_defaults(run="select_cmd:run_methods")

    sh = sub.add_parser("shards", help="land shards: a demo delivery, or a local dataset")
    shsub = sh.add_subparsers(dest="shards_command", required=True)
    sa = shsub.add_parser("add", help="land a new delivery of digits for the demo")
    sa.add_argument("--root", default=".", help="project root; default: current directory")
    sa.add_argument("--name", default=None, help="shard name (default digits-new-<k>)")
    sa.add_argument("--count", type=int, default=100)
    sa.add_argument("--seed", type=int, default=None,
                    help="seed of the delivery's variants (default: a fresh one, printed and recorded)")
    sa.set_defaults(run="shards_cmd:run_add")
    sr = shsub.add_parser("replace", help="accept a shard rewritten in place as replacing its earlier content "
                          "(refused until then: its sketches and subset versions were made on the old one)")
    sr.add_argument("name", help="the shard's name (its file is <landing>/<name>.npz)")
    sr.add_argument("--root", default=".", help="project root; default: current directory")
    sr.set_defaults(run="shards_cmd:run_replace")
    si = shsub.add_parser("import", help="import a local dataset (CIFAR-10, ImageFolder, CSV) as pool shards "
                          "and/or evaluation splits (the import_data job, from the command line)")
    si.add_argument("--root", default=".", help="project root; default: current directory")
    si.add_argument("--source", required=True, choices=["cifar10", "imagefolder", "csv"])
    si.add_argument("--path", required=True, help="the CIFAR-10 folder (or its parent), ImageFolder root, or CSV file")
    # Options left unset stay None: their defaults are ImportRequest's (data/ingest.py), stated once.
    si.add_argument("--role", choices=["pool", "val", "test"], help="default pool")
    si.add_argument("--split", choices=["train", "test"], help="cifar10 only (default train)")
    si.add_argument("--name", help="shard name prefix (default: from the path)")
    si.add_argument("--shards", type=int, help="default 1")
    si.add_argument("--val-fraction", type=float, help="role pool: hold out this share as val.npz")
    si.add_argument("--test-fraction", type=float, help="role pool: hold out this share as test.npz")
    si.add_argument("--seed", type=int)
    si.add_argument("--on-corrupt", choices=["skip", "raise"], help="default skip")
    si.add_argument("--overwrite-eval", action="store_true", help="replace an existing val.npz / test.npz")
    si.add_argument("--replace", action="store_true",
                    help="replace existing pool shards of the same names (recorded as replacing their old content)")
    si.add_argument("--backbone", default="small_cnn",
                    help="transform images for this backbone (as settings.backbone; default small_cnn)")
    si.add_argument("--image-size", type=int, default=224, help="input size for torchvision backbones")
    si.add_argument("--path-column", help="csv only (default path)")
    si.add_argument("--target-column", help="csv only (default target)")
    si.add_argument("--pixels", choices=["uint8", "float32"],
                    help="what shards store: 8-bit pixels and their decode (default uint8, a quarter of the bytes) "
                    "or the transformed float32 inputs")
    si.set_defaults(run="shards_cmd:run_import")

    _add_versions_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, _, func = args.run.partition(":")
    command = getattr(importlib.import_module(f"skmm_pipeline.cli.{module}"), func)
    try:
        return command(args)
    except (SkmmError, *FILE_ERRORS) as exc:  # one clear line; the traceback is noise for these
        print(f"skmm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM: leave at once, not after the work still running in a worker thread (the
        # demo's watched runs); what it was writing is left as a kill leaves it, for the next run to recover.
        print("skmm: interrupted; the next run finishes or rolls back what this one left half done", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


if __name__ == "__main__":
    sys.exit(main())
