"""One selection evaluated against uniform subsets of its size and the full pool (the pipeline's
``finetune_eval``).

:func:`evaluate_selection` draws ``uniform_repeats`` seeded uniform subsets of the selection's size (as
the ``uniform`` selector makes them), finetunes FT-1 and/or FT-2 on the selected subset, on each
uniform one and on the whole pool, and summarises per finetuning mode: the selection, the uniform
subsets' mean ± s.e.m. and the full pool, with a bar plot. Classification scores accuracy and
macro-F1, regression MAE (and RMSE from FT-1's ridge head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from skmm_pipeline.core.errors import ConfigError, DataError
from skmm_pipeline.core.sketch import derive_seed
from skmm_pipeline.evaluation._data import EvalData, Pool, check_regression_setup, check_same_task, load_pool
from skmm_pipeline.evaluation._finetune import FINETUNE_MODES, EvalSplit, finetune_tail, linear_probe, ridge_probe
from skmm_pipeline.evaluation._plots import accuracy_plot
from skmm_pipeline.models.backbones import finetune_split
from skmm_pipeline.models.features import standardized_features

# Per task: (the test metric, the validation metric, its short name in metric keys, an extra test metric).
SUMMARY_METRICS = {"classification": ("test_accuracy", "val_accuracy", "acc", "macro_f1"),
                   "regression": ("test_mae", "val_mae", "mae", "test_rmse")}


def ft1_evaluator(pool: Pool, ev: EvalData, seed: int) -> Callable[[np.ndarray], dict]:
    """FT-1: logistic head on pool-standardised frozen features, C chosen on validation; for regression
    (the pool's ``y`` are then targets) a ridge head, alpha chosen on validation by MAE."""
    feats, (val_X, test_X) = standardized_features(pool.model, pool.images, [ev.val.images, ev.test.images],
                                                   device=pool.device)
    labels = pool.y

    if ev.task == "regression":
        val = EvalSplit(val_X, ev.y("val"), ev.ids("val"))
        test = EvalSplit(test_X, ev.y("test"), ev.ids("test"))
        ids = np.asarray(pool.ids)

        def run_ridge(idx):
            r = ridge_probe(EvalSplit(feats[idx], labels[idx], ids[idx]), val, test, seed=seed)
            return {"test_mae": r.test_mae, "val_mae": r.val_metrics["mae"], "test_rmse": r.test_metrics["rmse"],
                    "alpha": r.hyperparameters["alpha"]}

        return run_ridge

    def run(idx):
        r = linear_probe(feats[idx], labels[idx], val_X, ev.val.labels, test_X, ev.test.labels, seed=seed)
        return {"test_accuracy": r.test_accuracy, "val_accuracy": r.val_accuracy, "macro_f1": r.test_macro_f1, "C": r.C}

    return run


def ft2_evaluator(pool: Pool, ev: EvalData, seed: int) -> Callable[[np.ndarray], dict]:
    """FT-2: the last block and the head finetuned (lr, weight decay, epochs chosen on validation); for
    regression the one-output head on standardised targets, MSE loss, chosen by validation MAE."""
    prefix, tail = finetune_split(pool.model, "ft2")
    val = EvalSplit(ev.val.images, ev.y("val"), ev.ids("val"))
    test = EvalSplit(ev.test.images, ev.y("test"), ev.ids("test"))
    ids = np.asarray(pool.ids)
    images, labels = pool.images, pool.y

    def run(idx):
        train = EvalSplit(images[idx], labels[idx], ids[idx])
        r = finetune_tail(prefix, tail, train, val, test, task=ev.task, seed=seed, device=pool.device)
        if ev.task == "regression":
            return {"test_mae": r.test_mae, "val_mae": r.val_metrics["mae"], "trials": list(r.trials),
                    **{f"hp_{k}": v for k, v in r.hyperparameters.items()}}
        return {"test_accuracy": r.test_accuracy, "val_accuracy": r.val_metrics.get("accuracy", float("nan")),
                "macro_f1": r.test_macro_f1, "trials": list(r.trials),
                **{f"hp_{k}": v for k, v in r.hyperparameters.items()}}

    return run


EVALUATORS = {"FT-1": ft1_evaluator, "FT-2": ft2_evaluator}


def ft2_history(scores: Mapping, method: str) -> dict[str, list[tuple[int, float]]]:
    """The selected subset's FT-2 training curves: per (lr, weight decay) tried, the validation metric after
    each epoch checkpoint, as ``{"ft2_val_<metric>/lr_<lr>_wd_<wd>": [(epochs, value), ...]}``; ``{}``
    without FT-2."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for trial in scores.get("FT-2", {}).get(method, {}).get("trials", []):
        for name, value in trial.items():
            if name.startswith("val_"):
                key = f"ft2_{name}/lr_{trial['lr']:g}_wd_{trial['weight_decay']:g}"
                curves.setdefault(key, []).append((int(trial["epochs"]), float(value)))
    return curves


def summarize_scores(scores: dict, method: str, uniform_keys: list[str], n: int, pool_size: int, task: str):
    """``(rows, metrics, eval_rows)`` of the run: per finetuning mode the selected subset, the mean ± s.e.m.
    of the uniform subsets and the full pool. Metric keys: ``acc_skmm``, ``acc_uniform_mean``,
    ``acc_uniform_sem``, ``acc_full_pool``, ``val_acc_skmm``, ``macro_f1_skmm`` (classification) or the
    same with ``mae`` plus ``rmse_skmm``/``rmse_uniform_mean``/``rmse_full_pool`` where FT-1 gives RMSE
    (regression); FT-2's are prefixed ``ft2_``."""
    main, val, short, extra = SUMMARY_METRICS[task]
    rows, metrics, eval_rows = [], {}, []
    for mode, by_subset in scores.items():
        prefix = "" if mode == "FT-1" else "ft2_"
        uni = [by_subset[k][main] for k in uniform_keys]
        sem = float(np.std(uni, ddof=1) / np.sqrt(len(uni))) if len(uni) > 1 else 0.0
        mean_uni = float(np.mean(uni)) if uni else float("nan")
        sk, full = by_subset[method], by_subset["full_pool"]
        mode_rows = [
            {"finetune": mode, "method": method, "n": n, main: round(sk[main], 4), "sem": 0.0},
            {"finetune": mode, "method": f"uniform (x{len(uni)})", "n": n, main: round(mean_uni, 4), "sem": round(sem, 4)},
            {"finetune": mode, "method": "full pool", "n": pool_size, main: round(full[main], 4), "sem": 0.0},
        ]
        metrics.update({
            f"{prefix}{short}_skmm": sk[main], f"{prefix}{short}_uniform_mean": mean_uni,
            f"{prefix}{short}_uniform_sem": sem, f"{prefix}{short}_full_pool": full[main],
            f"{prefix}val_{short}_skmm": sk[val],
        })
        if extra in sk:
            uni_extra = float(np.mean([by_subset[k][extra] for k in uniform_keys])) if uni else float("nan")
            if task == "classification":
                for row, value in zip(mode_rows, (sk[extra], uni_extra, full[extra])):
                    row[extra] = round(value, 4)
                metrics[f"{prefix}macro_f1_skmm"] = sk[extra]
            else:
                metrics.update({f"{prefix}rmse_skmm": sk[extra], f"{prefix}rmse_full_pool": full[extra],
                                **({f"{prefix}rmse_uniform_mean": uni_extra} if uni else {})})
        rows += mode_rows
        eval_rows += [
            {"method": f"{prefix}{method}", "n": n, main: sk[main], val: sk[val]},
            {"method": f"{prefix}uniform", "n": n, main: mean_uni, f"{main}_sem": sem},
            {"method": f"{prefix}full_pool", "n": pool_size, main: full[main]},
        ]
    return rows, metrics, eval_rows


def comparison_subsets(pool_ids: list[str], sample_ids: list[str], method: str, seed: int,
                       uniform_repeats: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """The subsets finetuned, as pool positions: the selection (key ``method``), ``uniform#r`` for each
    repeat (seeded draws of the same size, as the ``uniform`` selector makes them) and ``full_pool``;
    also the uniform keys. Refuses selected ids that are not in the pool."""
    position = {sid: k for k, sid in enumerate(pool_ids)}
    missing = [s for s in sample_ids if s not in position]
    if missing:
        raise DataError(f"{len(missing)} selected ids are not in the registered shards, e.g. {missing[:3]}")
    n = len(sample_ids)
    subsets = {method: np.array([position[s] for s in sample_ids])}
    uniform_keys = [f"uniform#{r}" for r in range(uniform_repeats)]
    for r, key in enumerate(uniform_keys):
        rng = np.random.default_rng(derive_seed(seed, "uniform", r))
        subsets[key] = rng.choice(len(pool_ids), size=n, replace=False)
    subsets["full_pool"] = np.arange(len(pool_ids))
    return subsets, uniform_keys


@dataclass(frozen=True)
class SelectionEvaluation:
    """What :func:`evaluate_selection` found: ``rows`` (the table), ``metrics`` (flat, for tracking),
    ``eval_rows`` (per-method rows for tracking), ``scores`` (mode -> subset -> metrics), ``plot`` (PNG)."""

    task: str
    method: str
    n: int
    pool_size: int
    eval_source: str
    rows: list[dict]
    metrics: dict[str, float]
    eval_rows: list[dict]
    scores: dict[str, dict[str, dict]]
    plot: bytes


def evaluate_selection(shards: Mapping[str, Mapping], model_path, eval_folder, selection: Mapping, *, device: str,
                       finetune_mode: str, seed: int, uniform_repeats: int, label_mode: str,
                       backbone: str) -> SelectionEvaluation:
    """Finetune on a selection (``skmm_selection``'s record: ``method``, ``sample_ids``, ``diagnostics``),
    on uniform subsets of its size and on the full pool of ``shards``; score and summarise.

    ``finetune_mode``: ``ft1``, ``ft2`` or ``both``; ``label_mode`` and ``backbone`` (the settings the
    sketch and the model were made with) are checked for a regression pool before any training.
    Raises ``ValueError`` for an unknown finetuning mode, an unlabelled pool, a pool and evaluation
    splits that disagree on the task, or selected ids outside the pool."""
    if finetune_mode not in FINETUNE_MODES:
        raise ConfigError(f"finetune_mode must be one of {sorted(FINETUNE_MODES)}, got {finetune_mode!r}")
    pool = load_pool(shards, model_path, device,
                     "finetune_eval needs labelled shards to train the head on the selected subset")
    ev = EvalData(eval_folder)
    task = check_same_task(pool, ev)
    if task == "regression":
        check_regression_setup(pool.model, label_mode, backbone)
    method = selection["method"]
    subsets, uniform_keys = comparison_subsets(pool.ids, selection["sample_ids"], method, seed, uniform_repeats)
    n = len(selection["sample_ids"])

    scores: dict[str, dict[str, dict]] = {}  # mode -> subset -> {test_accuracy, macro_f1, ...} or {test_mae, ...}
    for mode in FINETUNE_MODES[finetune_mode]:
        run_one = EVALUATORS[mode](pool, ev, seed)
        scores[mode] = {key: run_one(idx) for key, idx in subsets.items()}

    rows, metrics, eval_rows = summarize_scores(scores, method, uniform_keys, n, len(pool), task)
    metrics = {"moment_ratio": float(selection["diagnostics"]["moment_ratio"]), **metrics}
    plot = accuracy_plot(rows, SUMMARY_METRICS[task][0])
    return SelectionEvaluation(task, method, n, len(pool), ev.source, rows, metrics, eval_rows, scores, plot)
