"""Automation for growing data: a sensor that registers newly landed shards, and a schedule that re-selects.

The shard sensor turns files in the landing folder into dynamic partitions and requests one
``sketch_shard`` run per new or changed shard; old shards are never recomputed. The re-selection
schedule launches ``reselect`` only when the set of shard sketches changed since the last selection,
so a tick over unchanged inputs creates no run and no new subset version.
"""

import json
import os
from pathlib import Path

import dagster as dg

from skmm_pipeline.core.hashing import fingerprint_of
from skmm_pipeline.data.shards import ShardError, check_shard_name
from skmm_pipeline.defs.ingest import shard_partitions
from skmm_pipeline.defs.resources import Workspace
from skmm_pipeline.defs.selection import skmm_selection
from skmm_pipeline.defs.sketch import gradient_sketch, pretrained_model

DATA_VERSION_TAG = "dagster/data_version"
DEFAULT_RESELECT_CRON = "0 6 * * 1"  # Mondays 06:00


def scan_landing(landing: Path) -> tuple[dict[str, str], list[str]]:
    """Shard files in ``landing``: ``{name: size-mtime signature}`` and the names refused as unsafe."""
    found, refused = {}, []
    if not landing.is_dir():
        return found, refused
    for path in sorted(landing.glob("*.npz")):
        try:
            check_shard_name(path.stem)
        except ShardError:
            refused.append(path.name)
            continue
        try:
            st = path.stat()
        except FileNotFoundError:  # removed between listing and stat
            continue
        found[path.stem] = f"{st.st_size}-{st.st_mtime_ns}"
    return found, refused


def _latest_sketch_events(instance: dg.DagsterInstance, partitions: list[str]) -> dict[str, dg.EventLogRecord]:
    out = {}
    for p in partitions:
        result = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=gradient_sketch.key, asset_partitions=[p]), limit=1
        )
        if result.records:
            out[p] = result.records[0]
    return out


@dg.sensor(
    job_name="sketch_shard",
    minimum_interval_seconds=int(os.environ.get("SKMM_SENSOR_INTERVAL", "30")),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Registers shards that land in the workspace's landing folder and sketches each new or changed one.",
)
def shard_sensor(context: dg.SensorEvaluationContext, workspace: Workspace):
    found, refused = scan_landing(workspace.landing)
    if refused:
        context.log.warning(f"ignoring shard files with unsafe names: {refused}")
    registered = set(context.instance.get_dynamic_partitions(shard_partitions.name))
    seen = json.loads(context.cursor) if context.cursor else {}

    new = [n for n in found if n not in registered]
    gone = sorted(registered - set(found))
    # A registered shard is up to date if the sensor already requested it at this signature, or (for
    # shards registered by hand or by the demo) if its sketch is newer than the file.
    events = _latest_sketch_events(context.instance, [n for n in found if n in registered and seen.get(n) != found[n]])
    changed = []
    for n, event in events.items():
        mtime = int(found[n].split("-")[1]) / 1e9
        if mtime > event.timestamp:
            changed.append(n)
        else:
            seen[n] = found[n]
    never_sketched = [n for n in found if n in registered and n not in events and seen.get(n) != found[n]]
    todo = new + changed + never_sketched

    partition_requests = []
    if new:
        partition_requests.append(shard_partitions.build_add_request(new))
    if gone:
        context.log.warning(f"shards no longer in {workspace.landing}: {gone}; removing their partitions")
        partition_requests.append(shard_partitions.build_delete_request(gone))

    if todo and context.instance.get_latest_materialization_event(pretrained_model.key) is None:
        return dg.SensorResult(
            dynamic_partitions_requests=partition_requests,
            skip_reason=dg.SkipReason(
                f"{len(todo)} shard(s) waiting, but pretrained_model has never been materialized: "
                "run the `pretrain` job first"
            ),
            cursor=json.dumps(seen, sort_keys=True),
        )
    runs = [dg.RunRequest(partition_key=n, run_key=f"{n}@{found[n]}") for n in todo]
    seen.update({n: found[n] for n in todo})
    for n in gone:
        seen.pop(n, None)
    skip = None
    if not runs:
        skip = dg.SkipReason(
            f"no new or changed shards in {workspace.landing} ({len(found)} registered"
            + (f", {len(refused)} ignored for unsafe names" if refused else "")
            + ")"
        )
    return dg.SensorResult(
        run_requests=runs,
        dynamic_partitions_requests=partition_requests,
        skip_reason=skip,
        cursor=json.dumps(seen, sort_keys=True),
    )


def sketch_fingerprint(instance: dg.DagsterInstance) -> tuple[str | None, list[str]]:
    """A hash of the data versions of the latest sketch of every registered shard.

    Returns ``(fingerprint, missing)``; ``fingerprint`` is None when some shard has no sketch yet.
    """
    partitions = sorted(instance.get_dynamic_partitions(shard_partitions.name))
    events = _latest_sketch_events(instance, partitions)
    missing = [p for p in partitions if p not in events]
    if missing or not partitions:
        return None, missing
    versions = {p: events[p].asset_materialization.tags.get(DATA_VERSION_TAG) for p in partitions}
    return fingerprint_of(versions), []


@dg.schedule(
    cron_schedule=os.environ.get("SKMM_RESELECT_CRON", DEFAULT_RESELECT_CRON),
    job_name="reselect",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Re-selects, versions and evaluates when shard sketches changed since the last selection.",
)
def reselect_schedule(context: dg.ScheduleEvaluationContext):
    return reselect_request(context.instance)


def reselect_request(instance: dg.DagsterInstance) -> dg.RunRequest | dg.SkipReason:
    fingerprint, missing = sketch_fingerprint(instance)
    if fingerprint is None:
        return dg.SkipReason(f"not every shard is sketched yet (missing: {missing or 'all'})")
    last = instance.get_latest_materialization_event(skmm_selection.key)
    if last is not None:
        meta = last.asset_materialization.metadata
        previous = meta.get("sketch_fingerprint")
        if previous is not None and previous.value == fingerprint:
            return dg.SkipReason(f"no shard changed since the last selection (fingerprint {fingerprint})")
    # No run_key: a failed re-selection must be retried at the next tick with the same inputs.
    return dg.RunRequest(tags={"skmm/sketch_fingerprint": fingerprint})
