"""The quality comparisons behind finetune_eval's and skmm_selection's warnings, on hand-made records."""

import math

from skmm_pipeline.evaluation import comparable, history_points, shard_shares, versus_previous, versus_uniform


def test_behind_uniform_means_worse_than_the_mean_by_more_than_one_sem():
    metrics = {"acc_skmm": 0.80, "acc_uniform_mean": 0.82, "acc_uniform_sem": 0.03,
               "ft2_acc_skmm": 0.70, "ft2_acc_uniform_mean": 0.75, "ft2_acc_uniform_sem": 0.01}
    rows = versus_uniform(metrics)
    assert [(r["finetune"], r["gain"], r["behind"]) for r in rows] == [("FT-1", -0.02, False), ("FT-2", -0.05, True)]
    # Regression: lower MAE is better.
    mae = versus_uniform({"mae_skmm": 1.0, "mae_uniform_mean": 1.2, "mae_uniform_sem": 0.1}, "regression")
    assert mae[0]["gain"] == 0.2 and not mae[0]["behind"]
    assert versus_uniform({"mae_skmm": 1.5, "mae_uniform_mean": 1.2, "mae_uniform_sem": 0.1}, "regression")[0]["behind"]


def test_behind_previous_means_two_points_of_accuracy_or_two_percent_of_mae():
    assert versus_previous({"acc_skmm": 0.9}, None) == []
    assert not versus_previous({"acc_skmm": 0.885}, {"acc_skmm": 0.9})[0]["behind"]
    assert versus_previous({"acc_skmm": 0.875}, {"acc_skmm": 0.9})[0]["behind"]
    assert not versus_previous({"mae_skmm": 1.01}, {"mae_skmm": 1.0}, "regression")[0]["behind"]
    assert versus_previous({"mae_skmm": 1.03}, {"mae_skmm": 1.0}, "regression")[0]["behind"]
    same = {"n": 40, "finetune": "ft1", "eval_source": "embedded digits", "task": "classification"}
    assert comparable(same, {**same, "metrics": {}}) and not comparable(same, {**same, "n": 80})
    assert not comparable(same, {})


def test_shard_shares_flag_a_shard_picked_far_beyond_its_rows():
    rows = shard_shares({"old": 26, "new": 14}, {"old": 500, "new": 100})
    new = next(r for r in rows if r["shard"] == "new")
    p = 100 / 600
    assert math.isclose(new["z"], round((14 - 40 * p) / math.sqrt(40 * p * (1 - p)), 2))
    assert new["over_picked"] and new["pick_share"] == 0.35
    assert not any(r["over_picked"] for r in shard_shares({"a": 20, "b": 20}, {"a": 300, "b": 300}))
    assert shard_shares({"only": 5}, {"only": 50})[0]["z"] == 0.0


def test_history_points_take_ft1_else_ft2_and_skip_other_tasks():
    base = {"task": "classification", "method": "skmm", "n": 40, "pool_size": 537}
    history = [
        {**base, "dvc_tag": "subset-v0001", "metrics": {"acc_skmm": 0.9, "acc_uniform_mean": 0.8, "acc_uniform_sem": 0.02}},
        {**base, "dvc_tag": "subset-v0002", "metrics": {"ft2_acc_skmm": 0.7, "ft2_acc_uniform_mean": 0.6}},
        {**base, "task": "regression", "dvc_tag": "subset-v0003", "metrics": {"mae_skmm": 1.0}},
    ]
    points = history_points(history, "classification")
    assert [(p["tag"], p["selected"], p["uniform"], p["uniform_sem"]) for p in points] == [
        ("subset-v0001", 0.9, 0.8, 0.02), ("subset-v0002", 0.7, 0.6, None)]
    assert [p["tag"] for p in history_points(history, "regression")] == ["subset-v0003"]
