"""``skmm shards``: land a demo delivery, import a local dataset as pool shards / evaluation splits, or accept
a shard rewritten in place as replacing its earlier content."""

from __future__ import annotations

import secrets
from dataclasses import fields
from pathlib import Path

from skmm_pipeline.data.contract import ShardHashes
from skmm_pipeline.data.digits import write_new_digits_shard
from skmm_pipeline.data.ingest import ImportRequest, import_dataset
from skmm_pipeline.defs.resources import Workspace
from skmm_pipeline.models.backbones import default_transform


def run_add(args) -> int:
    landing = Workspace(root=str(Path(args.root).resolve())).landing
    seed = secrets.randbits(31) if args.seed is None else args.seed  # each delivery is new data by default
    name = write_new_digits_shard(landing, args.name, args.count, seed)
    print(
        f"landed shard {name!r} ({args.count} samples, seed {seed}, recorded in its source_ids) in {landing}\n"
        "The running `shard_sensor` (dagster dev) registers and sketches it; then run the `reselect` job,\n"
        "or wait for `reselect_schedule`. Without the UI: `make demo` re-selects over all shards."
    )
    return 0


def run_import(args) -> int:
    ws = Workspace(root=str(Path(args.root).resolve()))
    # The request's fields and defaults live in ImportRequest; the parser leaves unset options as None.
    given = {f.name: getattr(args, f.name) for f in fields(ImportRequest) if getattr(args, f.name, None) is not None}
    req = ImportRequest(**given)
    res = import_dataset(req, ws.landing, ws.evaluation, default_transform(args.backbone, args.image_size),
                         ShardHashes(ws.artifacts / "shard_hashes.json"))
    for name, rows in res.rows.items():
        where = ws.landing if name in res.shards else ws.evaluation
        print(f"wrote {where / (name + '.npz')} ({rows} images)" + (", replacing the shard of that name"
                                                                      if name in res.replaced else ""))
    print(f"{res.task}; {res.skipped} unreadable images skipped. The running `shard_sensor` (dagster dev) registers "
          "and sketches new shards; or run the `import_data` job from the UI, which registers them itself.")
    return 0


def run_replace(args) -> int:
    ws = Workspace(root=str(Path(args.root).resolve()))
    old, new = ShardHashes(ws.artifacts / "shard_hashes.json").replace(args.name, ws.shard_path(args.name))
    if old is None or old == new:
        print(f"shard {args.name!r} (sha256 {new[:12]}) has nothing to replace: it is admitted as it is")
        return 0
    print(f"shard {args.name!r}: content sha256 {new[:12]} now replaces {old[:12]} (recorded in "
          f"{ws.artifacts / 'shard_hashes.json'}). The next run sketches it again; subset versions made before "
          f"keep {old[:12]} as the shard's data version in their manifest (skmm versions show).")
    return 0
