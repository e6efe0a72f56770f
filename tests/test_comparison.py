"""The method comparison core (real selections, real linear probes) and the method_benchmark asset."""

import base64
import json

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from skmm_pipeline import evaluation as cmp
from skmm_pipeline.core.selection import method_info
from skmm_pipeline.core.validation import InputError
from skmm_pipeline.evaluation import FinetuneGrid

K = 4  # classes of the synthetic task


def blobs(n, seed, name, d=6):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, 2.0, size=(K, d))
    y = np.arange(n) % K
    X = (centres[y] + rng.normal(0, 1.0, size=(n, d))).astype(np.float32)
    return cmp.Split.of(name, X, y, inputs=X)


def projection_sketch(pool: cmp.Split, m=5):
    """seed -> a seeded random projection of the pool's features (stands in for the gradient sketch)."""
    def sketch(seed):
        S = np.random.default_rng(1000 + seed).normal(size=(pool.features.shape[1], m)) / np.sqrt(m)
        return pool.features @ S
    return sketch


@pytest.fixture(scope="module")
def splits():
    return blobs(80, 1, "pool"), blobs(40, 2, "val"), blobs(40, 3, "test")


SPECS = [
    cmp.MethodSpec("skmm"),
    cmp.MethodSpec("uniform"),
    cmp.MethodSpec("herding"),
    cmp.MethodSpec("skmm", class_balanced=True),
    cmp.MethodSpec("uniform", class_balanced=True),
    cmp.MethodSpec("skmm", options={"no_such_option": 1}, label="skmm-broken"),
]


def run_grid(splits, specs=SPECS, **kw):
    pool, val, test = splits
    kw.setdefault("sketch", projection_sketch(pool))
    return cmp.compare(pool, val, test, specs, budgets=(3, 12), seeds=(0, 1), **kw)


def test_grid_groups_failures_and_summary(splits):
    df = run_grid(splits, full_pool=True)
    assert list(df.columns) == list(cmp.COLUMNS)
    # One row per finetuning mode x method x n x seed, plus the full-pool ceiling.
    assert len(df) == len(SPECS) * 2 * 2 + 1
    groups = df.groupby("method")["group"].first().to_dict()
    assert groups == {"skmm": "label-free", "uniform": "label-free", "herding": "label-free", "skmm-broken": "label-free",
                      "skmm-cb": "label-using", "uniform-cb": "label-using", "full-pool": "reference"}

    # Failures are rows with a reason; everything else ran.
    failed = df[df.status == "failed"]
    cb_small = failed[failed.method.str.endswith("-cb")]
    assert set(zip(cb_small.method, cb_small.n)) == {("skmm-cb", 3), ("uniform-cb", 3)}
    assert cb_small.reason.str.contains("needs n >= the number of classes \\(4\\)").all()
    broken = failed[failed.method == "skmm-broken"]
    assert len(broken) == 4 and broken.reason.str.startswith("selection: InputError").all()
    assert len(failed) == 4 + 4 and failed.test_accuracy.isna().all()
    ok = df[df.status == "ok"]
    assert ok.test_accuracy.between(0, 1).all() and ok.macro_f1.between(0, 1).all()
    assert ok[ok.n_classes_seen > 1].C.notna().all()  # a one-class subset has no C to choose
    assert (ok[ok.method == "skmm-cb"].n_classes_seen == K).all()  # one sample per class at least

    summary = cmp.summarize(df)
    row = summary[(summary.method == "skmm-cb") & (summary.n == 3)].iloc[0]
    assert row.seeds == 0 and row.failed == 2 and "number of classes" in row.reason
    row = summary[(summary.method == "skmm") & (summary.n == 12)].iloc[0]
    accs = ok[(ok.method == "skmm") & (ok.n == 12)].test_accuracy
    assert row.seeds == 2 and row["mean"] == pytest.approx(accs.mean()) and row["sem"] == pytest.approx(accs.sem())
    # Paired difference to the group's uniform: uniform for label-free, uniform-cb for label-using.
    assert row.baseline == "uniform"
    uni = ok[(ok.method == "uniform") & (ok.n == 12)].set_index("seed").test_accuracy
    diff = accs.set_axis(ok[(ok.method == "skmm") & (ok.n == 12)].seed) - uni
    assert row["diff"] == pytest.approx(diff.mean())
    assert summary[(summary.method == "skmm-cb") & (summary.n == 12)].baseline.iloc[0] == "uniform-cb"

    table = cmp.method_table(summary, "FT-1", "label-using")
    assert list(table.index) == ["skmm-cb", "uniform-cb"] and list(table.columns) == ["n=3", "n=12"]
    assert table.loc["skmm-cb", "n=3"] == "failed (2)" and " ± " in table.loc["skmm-cb", "n=12"]
    z = cmp.z_table(summary, "FT-1", "label-free")
    assert z.index.name == "vs uniform" and "uniform" not in z.index and "(z=" in z.loc["skmm", "n=12"]
    md = cmp.summary_markdown(summary)
    assert "FT-1, label-free" in md and "FT-1, label-using" in md and "| skmm-cb |" in md
    checks = cmp.headline_checks(df, "FT-1", "skmm", "label-free")
    assert set(checks) == {"best_or_within_1sem", "beats_baseline", "never_below_baseline"}
    assert all(v == "yes" or v.startswith("no (") for v in checks.values())
    png = cmp.plot_comparison(summary)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 300_000


def test_same_seeds_same_table(splits):
    a, b = run_grid(splits), run_grid(splits)
    drop = list(cmp.TIMING_COLUMNS)
    pd.testing.assert_frame_equal(a.drop(columns=drop), b.drop(columns=drop))
    assert a.attrs["split_ids"] == b.attrs["split_ids"]


def test_hyperparameters_never_see_the_test_split(splits):
    pool, val, test = splits
    specs = [cmp.MethodSpec("uniform"), cmp.MethodSpec("skmm")]
    torch.manual_seed(0)
    tail = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, K))
    ft2 = cmp.FT2Setup(None, tail, FinetuneGrid(lrs=(1e-2,), weight_decays=(0.0, 0.1), epochs=(2, 5), batch_size=16))
    kw = dict(sketch=projection_sketch(pool), finetune="both", ft2=ft2)
    df = cmp.compare(pool, val, test, specs, budgets=(12,), seeds=(0,), **kw)
    assert (df.status == "ok").all() and set(df.finetune) == {"FT-1", "FT-2"}
    used = df.attrs["split_ids"]
    assert set(used["select"]) == set(val.ids) and set(used["test"]) == set(test.ids)
    assert set(used["fit"]) <= set(pool.ids) and not (set(used["fit"]) | set(used["select"])) & set(test.ids)
    ft2_rows = df[df.finetune == "FT-2"]
    assert ft2_rows[["lr", "weight_decay", "epochs"]].notna().all().all() and ft2_rows.C.isna().all()

    # Scrambled test labels: the same choices and validation scores, other test scores.
    scrambled = cmp.Split(test.features, (test.labels + 1) % K, test.ids, test.inputs)
    other = cmp.compare(pool, val, scrambled, specs, budgets=(12,), seeds=(0,), **kw)
    chosen = ["C", "lr", "weight_decay", "epochs", "val_accuracy"]
    pd.testing.assert_frame_equal(df[chosen], other[chosen])
    assert not np.allclose(df.test_accuracy, other.test_accuracy)

    # A test split sharing ids with validation is refused before anything runs.
    leaky = cmp.Split(val.features, val.labels, val.ids, val.inputs)
    with pytest.raises(InputError, match="validation and test splits share 40 sample id"):
        cmp.compare(pool, val, leaky, specs, budgets=(12,), seeds=(0,), sketch=kw["sketch"])


def test_default_specs_and_sketch_failures(splits):
    specs = cmp.default_specs()
    labels = [s.label for s in specs]
    assert "skmm-v1-reference" not in labels and labels[0] == "skmm" and "uniform-cb" in labels
    assert all(s.group == "label-free" for s in specs if not s.class_balanced and s.input == "any"
               and method_info(s.method)["group"] == "label-free")
    assert all(s.input == "features" and s.uses_labels for s in specs if s.input != "any")
    assert {s.group for s in cmp.default_specs(class_balanced=False)} == {"label-free"}
    with pytest.raises(InputError, match="unknown selection method"):
        cmp.default_specs(["skmm", "nope"])

    # A seed whose sketch cannot be made fails the sketch-based rows of that seed only.
    pool, val, test = splits
    good = projection_sketch(pool)

    def flaky(seed):
        if seed == 1:
            raise RuntimeError("out of memory")
        return good(seed)

    df = cmp.compare(pool, val, test, SPECS[:2], budgets=(12,), seeds=(0, 1), sketch=flaky)
    assert (df[df.seed == 0].status == "ok").all()
    assert (df[df.seed == 1].reason == "sketch: RuntimeError: out of memory").all()


# --------------------------------------------------------------------------------------------------
# The Dagster asset on the embedded digits data


def test_benchmark_config_is_checked_before_any_work():
    from skmm_pipeline.defs.benchmark_assets import BenchmarkConfig, check_config

    check_config(BenchmarkConfig())
    for bad, msg in (({"seeds": 0}, "seeds must be at least 1"), ({"finetune": "ft3"}, "finetune must be one of"),
                     ({"budgets": [10, 0]}, "budgets must be positive"), ({"methods": ["skmm", "nope"]}, "unknown")):
        with pytest.raises(InputError, match=msg):
            check_config(BenchmarkConfig(**bad))


def test_method_benchmark_asset(project, tmp_path):
    from skmm_pipeline.data.digits import write_digits_shards
    from skmm_pipeline.data.pool import load_sketches
    from skmm_pipeline.data.shards import read_shard
    from skmm_pipeline.definitions import build_definitions
    from skmm_pipeline.defs.ingest import shard_partitions
    from skmm_pipeline.defs.resources import SkmmSettings
    from skmm_pipeline.demo import format_benchmark
    from skmm_pipeline.models.backbones import load_backbone

    defs = build_definitions(project, settings=SkmmSettings(pretrain_epochs=1, sketch_dim=32, device="cpu"))
    names = write_digits_shards(defs.resources["workspace"].landing)
    config = {"budgets": [3, 20], "seeds": 2, "methods": ["skmm", "uniform"], "full_pool": False, "finetune": "both"}
    sketch_records = {}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(shard_partitions.name, names)
        pretrain = defs.resolve_job_def("pretrain").execute_in_process(instance=instance)
        for name in names:
            done = defs.resolve_job_def("sketch_shard").execute_in_process(instance=instance, partition_key=name)
            sketch_records[name] = done.output_for_node("gradient_sketch")
        result = defs.resolve_job_def("benchmark").execute_in_process(
            instance=instance, run_config={"ops": {"method_benchmark": {"config": config}}})
        assert result.success
        record = result.output_for_node("method_benchmark")
        meta = instance.get_latest_materialization_event(dg.AssetKey("method_benchmark")).asset_materialization.metadata

    # Metadata: the Markdown tables, the inline plot, what was run and what failed.
    table = meta["results"].value
    assert all(f"{ft}, {g}" in table for ft in ("FT-1", "FT-2") for g in ("label-free", "label-using"))
    assert "| skmm |" in table and "| uniform-cb |" in table and "vs uniform" in table
    plot = meta["plot"].value
    assert plot.startswith("![selection benchmark](data:image/png;base64,")
    assert base64.b64decode(plot.split(",", 1)[1].rstrip(")"))[:4] == b"\x89PNG"
    assert meta["seeds"].value == [0, 1] and meta["methods"].value == ["skmm", "skmm-val", "uniform", "skmm-cb", "uniform-cb"]
    assert meta["sketched_in_process"].value == [1]  # seed 0 is the stored sketch
    # The pipeline's default (the validation split's moment) runs next to skmm on the pool's moment.
    assert "| skmm-val |" in table
    # Budget 3 < 5 classes: the class-balanced runs fail, recorded, and the asset still succeeds.
    assert meta["runs"].value == 5 * 2 * 2 * 2 and meta["failed_runs"].value == 2 * 2 * 2
    assert set(meta["failures"].value) == {"skmm-cb n=3", "uniform-cb n=3"}
    summary = pd.DataFrame(record["summary"])
    ok = summary[summary.seeds == 2]
    assert len(ok) == 2 * 8 and ok["mean"].between(0.2, 1).all()
    assert "label-using" in format_benchmark(record)

    # MLflow: a finished run with the parameters, per-method metrics and the artifacts.
    client = MlflowClient(record["mlflow_tracking_uri"])
    run = client.get_run(record["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["dagster.asset"] == "method_benchmark"
    assert run.data.params["finetune"] == "both" and json.loads(run.data.params["seeds"]) == [0, 1]
    assert 0 < run.data.metrics["test_accuracy/skmm"] <= 1 and 0 < run.data.metrics["test_accuracy/ft2_skmm-cb"] <= 1
    assert run.data.metrics["failed_runs"] == 8
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "benchmark")}
    assert artifacts == {"benchmark/results.csv", "benchmark/summary.csv", "benchmark/summary.md"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/method_benchmark.png"]
    rows = pd.read_csv(client.download_artifacts(run.info.run_id, "benchmark/results.csv", str(tmp_path)))
    assert len(rows) == 40 and set(rows.group) == {"label-free", "label-using"}
    assert set(rows[rows.finetune == "FT-2"].status) == {"ok", "failed"} and rows.lr.notna().sum() == 16

    # Re-sketching with the stored sketch's settings is checked against the stored rows.
    G, ids, identity = load_sketches(sketch_records)
    model = load_backbone(pretrain.output_for_node("pretrained_model")["path"])
    images = np.concatenate([read_shard(defs.resources["workspace"].shard_path(n)).images for n in names])
    sk = cmp.SeededSketches.from_identity(model, images, identity, G, sample_ids=ids, device="cpu")
    assert np.array_equal(sk(identity["seed"]), G) and sk(identity["seed"] + 1).shape == G.shape
    with pytest.raises(InputError, match="does not reproduce its rows"):
        cmp.SeededSketches.from_identity(model, images, identity, G * 1.5, sample_ids=ids, device="cpu")
    with pytest.raises(InputError, match="not a sketch-engine identity"):
        cmp.SeededSketches.from_identity(model, images, {"kind": "gaussian", "seed": 0, "sketch_dim": G.shape[1]}, G,
                                         sample_ids=ids, device="cpu")


def test_rows_keep_the_subset_and_a_spec_can_match_the_validation_moment(splits):
    pool, val, test = splits
    specs = [cmp.MethodSpec("skmm"), cmp.MethodSpec("skmm", options={"reference": "validation"}, label="skmm-val")]
    with pytest.raises(InputError, match="validation_sketch"):
        cmp.compare(pool, val, test, specs, budgets=(8,), seeds=(0,), sketch=projection_sketch(pool))
    S = np.random.default_rng(1000).normal(size=(pool.features.shape[1], 5)) / np.sqrt(5)
    df = cmp.compare(pool, val, test, specs, budgets=(8,), seeds=(0,), sketch=projection_sketch(pool),
                     validation_sketch=lambda seed: val.features @ S)
    assert (df.status == "ok").all()
    for _, row in df.iterrows():
        idx = np.array(row.selected.split(), dtype=int)
        assert idx.size == 8 and np.unique(idx).size == 8
        counts = np.array(row.class_counts.split(), dtype=int)
        assert counts.sum() == 8 and np.array_equal(counts, np.bincount(pool.labels[idx], minlength=K))


def test_class_balanced_specs_can_split_the_budget_equally(splits):
    pool, val, test = splits
    keep = np.r_[np.flatnonzero(pool.labels == 0), np.flatnonzero(pool.labels != 0)[:12]]  # class 0 dominates
    lopsided = cmp.Split.of("pool", pool.features[keep], pool.labels[keep], pool.features[keep])
    specs = [cmp.MethodSpec("uniform", class_balanced=True)]
    with pytest.raises(InputError, match="class_budgets"):
        cmp.compare(lopsided, val, test, specs, budgets=(8,), seeds=(0,), class_budgets="fair",
                    sketch=projection_sketch(lopsided))
    df = cmp.compare(lopsided, val, test, specs, budgets=(8,), seeds=(0,), class_budgets="equal",
                     sketch=projection_sketch(lopsided))
    assert df.class_counts.iloc[0] == "2 2 2 2"
