"""Finetuning evaluation with validation-split model selection.

FT-1 (:func:`linear_probe`): a linear head (multinomial logistic regression) on frozen penultimate
features. Features are standardised with statistics of the whole pool (known to the selector anyway),
not of the small training subset. For regression, :func:`ridge_probe` fits a ridge head (closed form,
unpenalised intercept) on the same features, targets standardised with the training subset's mean and
spread, the penalty chosen from a fixed grid by validation MAE.

FT-2 (:func:`finetune_tail`): the last two layers of a network trained by AdamW on a subset, the rest
frozen. The network comes cut in two (``models.backbones.finetune_split``): a frozen ``prefix`` whose
activations are computed once per split (cached while they fit ``cache_bytes``), and the ``tail``
holding the finetuned parameters, copied for every configuration so the pretrained model is never
modified. The whole network runs in eval mode: BatchNorm keeps its pretrained running statistics and
dropout is off, so a run depends only on the subset, the grid and the seed.

Both protocols choose their hyper-parameters (C or the ridge penalty alpha; or learning rate, weight
decay and number of epochs) on the validation split alone and score the test split once, with the
chosen model. :class:`FinetuneResult` records which sample ids were used to fit, to select and to test.
Metrics: accuracy and macro-F1 for classification, MAE for regression (and RMSE for the ridge head).
"""

from __future__ import annotations

import copy
import itertools
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from skmm_pipeline.core.validation import InputError

# settings.finetune_mode / the benchmark's finetune -> the protocols run: FT-1 (a head on frozen
# features), FT-2 (last block + head), or both.
FINETUNE_MODES = {"ft1": ("FT-1",), "ft2": ("FT-2",), "both": ("FT-1", "FT-2")}
DEFAULT_CS = (0.01, 0.1, 1.0, 10.0, 100.0)
DEFAULT_ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)
TASKS = ("classification", "regression")


def macro_f1(y_true, y_pred) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``y_true`` or ``y_pred`` (a class
    never predicted and never true does not count; 0/0 counts as 0), as scikit-learn's
    ``f1_score(average="macro", zero_division=0)``."""
    y_true, y_pred = np.asarray(y_true).reshape(-1), np.asarray(y_pred).reshape(-1)
    classes = np.union1d(y_true, y_pred)
    if classes.size == 0:
        return float("nan")
    tp = np.array([np.sum((y_true == c) & (y_pred == c)) for c in classes], dtype=np.float64)
    denom = np.array([np.sum(y_true == c) + np.sum(y_pred == c) for c in classes], dtype=np.float64)
    return float(np.mean(np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)))


# --------------------------------------------------------------------------------------------------
# FT-1


@dataclass(frozen=True)
class ProbeResult:
    test_accuracy: float
    val_accuracy: float
    C: float
    n_train: int
    n_classes_seen: int
    test_macro_f1: float = float("nan")


def linear_probe(train_X, train_y, val_X, val_y, test_X, test_y, Cs=DEFAULT_CS, seed: int = 0) -> ProbeResult:
    """Fit a logistic-regression head for each C, keep the best on validation, score it on test."""
    # Imported on first use, not at module top: `import sklearn.linear_model` takes about 1.4 s
    # (measured on the 2-core machine), which loading the Dagster definitions (every step process)
    # should not pay unless a head is trained.
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415

    train_y = np.asarray(train_y)
    test_y = np.asarray(test_y)
    classes = np.unique(train_y)
    if classes.size == 1:
        # A subset with one class: the only sensible head predicts that class.
        c = classes[0]
        constant = np.full_like(test_y, c)
        return ProbeResult(
            float(np.mean(test_y == c)), float(np.mean(np.asarray(val_y) == c)), float("nan"), len(train_y), 1,
            macro_f1(test_y, constant),
        )
    best = None
    for C in Cs:
        clf = LogisticRegression(C=C, max_iter=3000, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence warnings on tiny subsets are expected
            clf.fit(train_X, train_y)
        val_acc = float(clf.score(val_X, val_y))
        if best is None or val_acc > best[0]:
            best = (val_acc, C, clf)
    val_acc, C, clf = best
    pred = clf.predict(test_X)
    return ProbeResult(
        float(np.mean(pred == test_y)), val_acc, float(C), len(train_y), int(classes.size), macro_f1(test_y, pred)
    )


# --------------------------------------------------------------------------------------------------
# FT-2


@dataclass(frozen=True)
class EvalSplit:
    """One split: model inputs (what the prefix takes), targets and the samples' ids."""

    inputs: np.ndarray | torch.Tensor
    targets: np.ndarray
    ids: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "ids", tuple(str(i) for i in self.ids))
        n = len(self.ids)
        if len(self.inputs) != n or len(self.targets) != n:
            raise InputError(f"a split needs one input and one target per id: {len(self.inputs)} inputs, "
                             f"{len(self.targets)} targets, {n} ids")
        if n == 0:
            raise InputError("a split needs at least one sample")
        if len(set(self.ids)) != n:
            raise InputError("sample ids within a split must be unique")

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class FinetuneGrid:
    """Configurations tried: every (lr, weight decay) pair trained for ``max(epochs)`` epochs, scored
    on validation after each epoch count listed in ``epochs``."""

    lrs: tuple[float, ...] = (1e-4, 1e-3)
    weight_decays: tuple[float, ...] = (0.0, 0.1)
    epochs: tuple[int, ...] = (10, 30, 60)
    batch_size: int = 32

    def __post_init__(self):
        if not self.lrs or not self.weight_decays or not self.epochs:
            raise InputError("the finetuning grid needs at least one lr, weight decay and epoch count")
        if any(lr <= 0 for lr in self.lrs) or any(wd < 0 for wd in self.weight_decays):
            raise InputError(f"learning rates must be > 0 and weight decays >= 0, got {self.lrs}, {self.weight_decays}")
        if any(int(e) <= 0 for e in self.epochs) or self.batch_size <= 0:
            raise InputError(f"epochs and batch_size must be positive, got {self.epochs}, {self.batch_size}")

    def as_dict(self) -> dict:
        return {"lrs": list(self.lrs), "weight_decays": list(self.weight_decays), "epochs": sorted(set(self.epochs)),
                "batch_size": self.batch_size}


DEFAULT_FT2_GRID = FinetuneGrid()


@dataclass(frozen=True)
class FinetuneResult:
    task: str
    test_metrics: dict[str, float]  # accuracy + macro_f1, or mae
    val_metrics: dict[str, float]  # of the chosen configuration
    hyperparameters: dict[str, float]  # lr, weight_decay, epochs
    trials: tuple[dict, ...]  # every configuration with its validation metrics
    n_train: int
    n_classes_seen: int | None
    split_ids: dict[str, tuple[str, ...]]  # ids used to fit, to select, and to test
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def test_accuracy(self) -> float:
        return self.test_metrics.get("accuracy", float("nan"))

    @property
    def test_macro_f1(self) -> float:
        return self.test_metrics.get("macro_f1", float("nan"))

    @property
    def test_mae(self) -> float:
        return self.test_metrics.get("mae", float("nan"))


class _Ledger:
    """Which ids were touched in which phase; filled where the data is actually used."""

    def __init__(self):
        self.used: dict[str, list[str]] = {"fit": [], "select": [], "test": []}

    def use(self, phase: str, split: EvalSplit) -> EvalSplit:
        seen = set(self.used[phase])
        self.used[phase].extend(i for i in split.ids if i not in seen)
        return split

    def frozen(self) -> dict[str, tuple[str, ...]]:
        return {k: tuple(v) for k, v in self.used.items()}


class _Activations:
    """Prefix outputs of one split: computed once and kept (CPU) when they fit the cache budget,
    otherwise recomputed batch by batch whenever the split is passed through."""

    def __init__(self, prefix: Callable, inputs, batch_size: int, device: torch.device, cache_bytes: int):
        self.prefix, self.batch_size, self.device = prefix, batch_size, device
        self.inputs = torch.as_tensor(np.asarray(inputs) if not torch.is_tensor(inputs) else inputs)
        self.cached = None
        with torch.no_grad():
            first = self._run(self.inputs[:1])
        if first.numel() * first.element_size() * len(self.inputs) <= cache_bytes:
            self.cached = torch.cat([self._run(b) for b in self.inputs.split(batch_size)])

    def _run(self, xb: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.prefix(xb.to(self.device)).float().cpu()

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        if self.cached is not None:
            return self.cached[index]
        return self._run(self.inputs[index])

    def batches(self):
        n = len(self.inputs)
        for s in range(0, n, self.batch_size):
            yield self.rows(torch.arange(s, min(n, s + self.batch_size)))


def _metrics(task: str, y_true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    if task == "classification":
        return {"accuracy": float(np.mean(pred == y_true)), "macro_f1": macro_f1(y_true, pred)}
    return {"mae": float(np.mean(np.abs(pred - y_true)))}


def _better(task: str, a: dict, b: dict | None) -> bool:
    """Is ``a`` strictly better than ``b`` (ties keep the earlier configuration)?"""
    if b is None:
        return True
    if task == "classification":
        return (a["accuracy"], a["macro_f1"]) > (b["accuracy"], b["macro_f1"])
    return a["mae"] < b["mae"]


def _check_disjoint(train: EvalSplit, val: EvalSplit, test: EvalSplit) -> None:
    tr, va, te = set(train.ids), set(val.ids), set(test.ids)
    for a, b, what in ((tr, te, "training and test"), (va, te, "validation and test"), (tr, va, "training and validation")):
        both = a & b
        if both:
            raise InputError(f"{what} splits share {len(both)} sample id(s), e.g. {sorted(both)[:3]}: splits must be disjoint")


# --------------------------------------------------------------------------------------------------
# FT-1 for regression (a ridge head; it shares the split and result types of FT-2)


def _ridge_fit(X: np.ndarray, z: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """``(w, b)`` minimising ``||X w + b - z||^2 + alpha ||w||^2`` (the intercept is not penalised),
    in closed form: the primal normal equations for ``n >= d``, the dual (kernel) form otherwise."""
    mu = X.mean(axis=0)
    Xc = X - mu
    n, d = Xc.shape
    zc = z - z.mean()
    if n >= d:
        w = np.linalg.solve(Xc.T @ Xc + alpha * np.eye(d), Xc.T @ zc)
    else:
        w = Xc.T @ np.linalg.solve(Xc @ Xc.T + alpha * np.eye(n), zc)
    return w, float(z.mean() - mu @ w)


def _regression_metrics(y_true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    err = pred - y_true
    return {"mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err**2)))}


def ridge_probe(train: EvalSplit, val: EvalSplit, test: EvalSplit, alphas=DEFAULT_ALPHAS, seed: int = 0) -> FinetuneResult:
    """FT-1 for regression: a ridge head on frozen features, alpha chosen on ``val``, ``test`` scored once.

    ``inputs`` of every split are feature rows (N x d), standardised by the caller with the pool's
    statistics (``models.features.Standardizer``), as for :func:`linear_probe`; ``targets`` are real numbers.
    Targets are standardised with the training subset's mean and spread (1 when it has none), a ridge
    head with an unpenalised intercept is fitted in closed form for every alpha of the grid, the one
    with the lowest validation MAE is kept (ties: the first in the grid) and scores the test split.
    The fit is exact and deterministic; ``seed`` is recorded for parity with the other protocols.
    Returns a :class:`FinetuneResult` (task ``regression``, test MAE and RMSE, hyper-parameter
    ``alpha``, the ids used to fit, select and test).
    """
    alphas = tuple(float(a) for a in alphas)
    if not alphas or not all(math.isfinite(a) and a > 0 for a in alphas):
        raise InputError(f"ridge penalties (alphas) must be positive finite numbers, got {alphas}")
    _check_disjoint(train, val, test)
    t0 = time.perf_counter()
    ledger = _Ledger()

    def data(split: EvalSplit, what: str) -> tuple[np.ndarray, np.ndarray]:
        X = np.asarray(split.inputs, dtype=np.float64)
        X = X.reshape(len(X), -1)
        y = np.asarray(split.targets)
        if y.dtype == bool or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
            raise InputError(f"regression targets of the {what} split must be real numbers, got dtype {y.dtype}")
        y = y.astype(np.float64).reshape(-1)
        if not np.isfinite(y).all() or not np.isfinite(X).all():
            raise InputError(f"features and regression targets of the {what} split must be finite")
        return X, y

    X_train, y_train = data(ledger.use("fit", train), "training")
    X_val, y_val = data(ledger.use("select", val), "validation")
    if X_val.shape[1] != X_train.shape[1]:
        raise InputError(f"training and validation features differ in width: {X_train.shape[1]} vs {X_val.shape[1]}")
    t_mean = float(y_train.mean())
    t_scale = float(y_train.std()) if len(y_train) > 1 and y_train.std() > 0 else 1.0
    z_train = (y_train - t_mean) / t_scale

    trials, best = [], None
    for alpha in alphas:
        w, b = _ridge_fit(X_train, z_train, alpha)
        val_m = _regression_metrics(y_val, (X_val @ w + b) * t_scale + t_mean)
        trials.append({"alpha": alpha, **{f"val_{m}": v for m, v in val_m.items()}})
        if math.isfinite(val_m["mae"]) and _better("regression", val_m, None if best is None else best[0]):
            best = (val_m, alpha, w, b)
    if best is None:
        raise InputError("the ridge head produced no finite validation score")
    val_m, alpha, w, b = best
    X_test, y_test = data(ledger.use("test", test), "test")
    if X_test.shape[1] != X_train.shape[1]:
        raise InputError(f"training and test features differ in width: {X_train.shape[1]} vs {X_test.shape[1]}")
    test_m = _regression_metrics(y_test, (X_test @ w + b) * t_scale + t_mean)
    return FinetuneResult(
        task="regression",
        test_metrics=test_m,
        val_metrics=val_m,
        hyperparameters={"alpha": alpha},
        trials=tuple(trials),
        n_train=len(y_train),
        n_classes_seen=None,
        split_ids=ledger.frozen(),
        seconds=time.perf_counter() - t0,
        extra={"alphas": list(alphas), "seed": seed, "target_mean": t_mean, "target_scale": t_scale},
    )


# --------------------------------------------------------------------------------------------------
# FT-2 training


def finetune_tail(
    prefix: Callable[[torch.Tensor], torch.Tensor] | None,
    tail: nn.Module,
    train: EvalSplit,
    val: EvalSplit,
    test: EvalSplit,
    *,
    task: str = "classification",
    grid: FinetuneGrid = DEFAULT_FT2_GRID,
    seed: int = 0,
    device: str | torch.device = "cpu",
    cache_bytes: int = 1 << 30,
    eval_batch_size: int = 256,
) -> FinetuneResult:
    """Finetune ``tail`` (all its parameters) on ``train``; choose lr, weight decay and epochs on
    ``val``; score the chosen model once on ``test``.

    ``prefix``: the frozen part of the network (``None``: identity), applied to every split's inputs in
    eval mode without gradients. ``tail`` maps prefix outputs to ``K`` logits (classification, labels
    in ``0..K-1``) or to one value (regression; trained on targets standardised with the training
    subset's mean and spread, MSE loss). Neither module is modified; both must already be on
    ``device`` (e.g. a model from ``models.backbones.load_backbone(path, device)``). Training is
    deterministic for a ``seed`` on a given device: the shuffling order is the same for every
    configuration.
    """
    if task not in TASKS:
        raise InputError(f"task must be one of {TASKS}, got {task!r}")
    _check_disjoint(train, val, test)
    device = torch.device(device)
    t0 = time.perf_counter()
    ledger = _Ledger()
    prefix = prefix if prefix is not None else nn.Identity()
    if isinstance(prefix, nn.Module):
        prefix.eval()

    def targets(split: EvalSplit) -> np.ndarray:
        y = np.asarray(split.targets)
        if task == "classification":
            if not np.issubdtype(y.dtype, np.integer):
                raise InputError(f"classification targets must be integer labels, got dtype {y.dtype}")
            return y.astype(np.int64)
        y = y.astype(np.float64)
        if not np.isfinite(y).all():
            raise InputError("regression targets must be finite")
        return y

    y_train = targets(ledger.use("fit", train))
    acts_train = _Activations(prefix, train.inputs, eval_batch_size, device, cache_bytes)
    y_val = targets(ledger.use("select", val))
    acts_val = _Activations(prefix, val.inputs, eval_batch_size, device, cache_bytes)

    base = copy.deepcopy(tail).to(device).eval()
    with torch.no_grad():
        out_dim = base(acts_train.rows(torch.arange(1)).to(device)).reshape(1, -1).shape[1]
    if task == "classification":
        bad = [int(y) for y in np.unique(np.concatenate([y_train, y_val])) if not 0 <= y < out_dim]
        if bad:
            raise InputError(f"labels {bad[:5]} are outside the tail's {out_dim} outputs")
        t_mean, t_scale = 0.0, 1.0
    else:
        if out_dim != 1:
            raise InputError(f"regression needs a tail with one output, this one has {out_dim}")
        t_mean = float(y_train.mean())
        t_scale = float(y_train.std()) if len(y_train) > 1 and y_train.std() > 0 else 1.0

    def predict(model: nn.Module, acts: _Activations) -> np.ndarray:
        outs = []
        with torch.no_grad():
            for xb in acts.batches():
                outs.append(model(xb.to(device)).float().cpu())
        out = torch.cat(outs)
        if task == "classification":
            return out.argmax(1).numpy()
        return out.reshape(-1).double().numpy() * t_scale + t_mean

    y_fit = torch.as_tensor(y_train if task == "classification" else (y_train - t_mean) / t_scale)
    n = len(y_train)
    checkpoints = sorted({int(e) for e in grid.epochs})
    shuffle_seed = int(np.random.SeedSequence([seed, 0xF72]).generate_state(1)[0])
    trials, best = [], None
    for k, (lr, wd) in enumerate(itertools.product(grid.lrs, grid.weight_decays)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([seed, k]).generate_state(1)[0]))
            model = copy.deepcopy(base)
            for p in model.parameters():
                p.requires_grad_(True)
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
            gen = torch.Generator().manual_seed(shuffle_seed)
            for epoch in range(1, checkpoints[-1] + 1):
                perm = torch.randperm(n, generator=gen)
                for s in range(0, n, grid.batch_size):
                    idx = perm[s : s + grid.batch_size]
                    out = model(acts_train.rows(idx).to(device))
                    yb = y_fit[idx].to(device)
                    if task == "classification":
                        loss = nn.functional.cross_entropy(out, yb)
                    else:
                        loss = nn.functional.mse_loss(out.reshape(-1), yb.float())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                if epoch in checkpoints:
                    val_m = _metrics(task, y_val, predict(model, acts_val))
                    trial = {"lr": float(lr), "weight_decay": float(wd), "epochs": epoch, **{f"val_{m}": v for m, v in val_m.items()}}
                    trials.append(trial)
                    if _better(task, val_m, None if best is None else best[0]):
                        state = {name: t.detach().clone() for name, t in model.state_dict().items()}
                        best = (val_m, trial, state)
    if best is None or not all(math.isfinite(v) for v in best[0].values()):
        raise InputError("finetuning produced no finite validation score (diverged?): try smaller learning rates")
    val_m, trial, state = best
    chosen = copy.deepcopy(base)
    chosen.load_state_dict(state)
    y_test = targets(ledger.use("test", test))
    acts_test = _Activations(prefix, test.inputs, eval_batch_size, device, cache_bytes)
    test_m = _metrics(task, y_test, predict(chosen, acts_test))
    return FinetuneResult(
        task=task,
        test_metrics=test_m,
        val_metrics=val_m,
        hyperparameters={"lr": trial["lr"], "weight_decay": trial["weight_decay"], "epochs": trial["epochs"]},
        trials=tuple(trials),
        n_train=n,
        n_classes_seen=int(np.unique(y_train).size) if task == "classification" else None,
        split_ids=ledger.frozen(),
        seconds=time.perf_counter() - t0,
        extra={"grid": grid.as_dict(), "seed": seed, "train_activations_cached": acts_train.cached is not None},
    )
