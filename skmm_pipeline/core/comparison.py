"""Compare selection methods on one pool: method x budget x seed -> finetuning -> test metrics.

:func:`compare` runs every selection of a grid, finetunes on each subset and scores the test split:

* **Selection.** Each :class:`MethodSpec` names a registered method (``core.selection``), its input and
  whether its budget is split over classes. Methods whose input is ``"any"`` run on the pool's gradient
  sketch (one sketch per seed, see :class:`SeededSketches`); ``"features"`` methods run on the pool's
  standardised frozen features and get the labels.
* **Groups.** ``label-free``: methods that never see a label (the sketch-based ones, uniform included).
  ``label-using``: the class-balanced variants of the label-free methods (``class_balanced=True``, label
  ``<method>-cb``) and the methods that need labels (the model-based baselines). Compare methods within
  a group: class-balanced uniform alone is far ahead of uniform at small budgets.
* **Finetuning.** FT-1 (``core.finetune.linear_probe``: logistic head on the standardised features, C
  chosen on validation) and/or FT-2 (``core.finetune.finetune_tail``: the last block + head, lr, weight
  decay and epochs chosen on validation). Test metrics: accuracy and macro-F1, computed once with the
  chosen model.
* **Seeds.** A seed fixes the sketch, the selection and the training (``linear_probe``'s and
  ``finetune_tail``'s seed); the same seeds give the same table.
* **Failures.** A selection or a finetuning that raises becomes a row with ``status="failed"`` and the
  error as ``reason``; the rest of the grid runs. A class-balanced budget smaller than the number of
  classes is refused the same way (a class-balanced subset has at least one sample per class).

The result is a tidy DataFrame, one row per finetuning mode x method x budget x seed (plus, optionally,
the full pool as a ceiling). :func:`summarize` gives mean +- s.e.m. per method and budget and the paired
difference to the group's uniform baseline in s.e.m. units; :func:`method_table` and :func:`z_table`
lay it out method x budget; :func:`plot_comparison` draws metric vs budget; :func:`headline_checks`
states whether a method is best in its group and ahead of uniform.

Which sample ids each phase touched is recorded in ``df.attrs["split_ids"]`` (``fit``: pool ids the
heads were trained on; ``select``: ids the hyper-parameters were chosen on; ``test``: ids scored once).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from skmm_pipeline.core import selection
from skmm_pipeline.core.finetune import FINETUNE_MODES
from skmm_pipeline.core.selection import GROUPS, INPUTS, method_info
from skmm_pipeline.core.validation import InputError

LABEL_FREE, LABEL_USING = GROUPS
REFERENCE = "reference"
CB_SUFFIX = "-cb"
FULL_POOL = "full-pool"
EXCLUDED_BY_DEFAULT = ("skmm-v1-reference",)  # the research code's loop: slow, kept for reference only
HP_COLUMNS = ("C", "lr", "weight_decay", "epochs")
COLUMNS = (
    "finetune", "group", "method", "base_method", "class_balanced", "input", "n", "seed", "status", "reason",
    "test_accuracy", "macro_f1", "val_accuracy", "n_classes_seen", *HP_COLUMNS, "select_seconds", "fit_seconds",
)
TIMING_COLUMNS = ("select_seconds", "fit_seconds")


# --------------------------------------------------------------------------------------------------
# Methods


@dataclass(frozen=True)
class MethodSpec:
    """One line of a comparison: a registered method, its input and options.

    ``input``: ``"auto"`` (the method's own, from :func:`method_info`), ``"any"`` (the gradient sketch)
    or ``"features"`` (standardised frozen features, with labels). ``class_balanced``: the budget is
    split over classes by their sizes and the method runs inside each class (label-using).
    ``label``: the name shown in tables (default ``<method>`` or ``<method>-cb``).
    """

    method: str
    class_balanced: bool = False
    input: str = "auto"
    options: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self):
        info = method_info(self.method)
        kind = info["input"] if self.input == "auto" else self.input
        if kind not in INPUTS:
            raise InputError(f"input must be 'auto', 'any' or 'features', got {self.input!r}")
        object.__setattr__(self, "input", kind)
        object.__setattr__(self, "options", dict(self.options))
        forbidden = {"class_balanced", "class_budgets", "seed", "labels"} & set(self.options)
        if forbidden:
            raise InputError(f"options {sorted(forbidden)} are set by the comparison, not per method")
        if not self.label:
            object.__setattr__(self, "label", self.method + (CB_SUFFIX if self.class_balanced else ""))

    @property
    def group(self) -> str:
        if self.class_balanced or method_info(self.method)["group"] == LABEL_USING:
            return LABEL_USING
        return LABEL_FREE

    @property
    def uses_labels(self) -> bool:
        return self.group == LABEL_USING or self.input == "features"


def default_methods(exclude: Iterable[str] = EXCLUDED_BY_DEFAULT) -> list[str]:
    """Every registered method, in registration order, but the excluded ones."""
    skip = set(exclude)
    return [m for m in selection.SELECTORS if m not in skip]


def default_specs(methods: Sequence[str] | None = None, class_balanced: bool = True) -> list[MethodSpec]:
    """The standard grid: each label-free method as is and, with ``class_balanced``, its class-balanced
    variant; each label-using method as is. ``methods=None``: :func:`default_methods`; the label-using
    methods then take part only with ``class_balanced`` (the label-using group on), while a method
    named explicitly always does."""
    explicit = methods is not None
    names = list(methods) if explicit else default_methods()
    specs: list[MethodSpec] = []
    for name in dict.fromkeys(names):
        info = method_info(name)
        if info["group"] == LABEL_USING:
            if class_balanced or explicit:
                specs.append(MethodSpec(name))
            continue
        specs.append(MethodSpec(name))
        if class_balanced:
            specs.append(MethodSpec(name, class_balanced=True))
    # Label-free first, then label-using, each in registration order.
    return [s for s in specs if s.group == LABEL_FREE] + [s for s in specs if s.group == LABEL_USING]


# --------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Split:
    """One split: standardised frozen features (FT-1 and ``features`` methods), labels, stable sample ids
    and, for FT-2, the model inputs."""

    features: np.ndarray
    labels: np.ndarray
    ids: tuple[str, ...]
    inputs: Any = None

    @classmethod
    def of(cls, name: str, features, labels, inputs=None, ids=None) -> "Split":
        labels = np.asarray(labels)
        ids = [f"{name}/{i}" for i in range(len(labels))] if ids is None else ids
        return cls(np.asarray(features), labels, tuple(str(i) for i in ids), inputs)

    def __post_init__(self):
        n = len(self.labels)
        if n == 0:
            raise InputError("a split needs at least one sample")
        if self.features.ndim != 2 or len(self.features) != n or len(self.ids) != n:
            raise InputError(f"a split needs one feature row, label and id per sample: features {self.features.shape}, "
                             f"{n} labels, {len(self.ids)} ids")
        if self.inputs is not None and len(self.inputs) != n:
            raise InputError(f"a split needs one model input per sample: {len(self.inputs)} inputs for {n} labels")
        if len(set(self.ids)) != n:
            raise InputError("sample ids within a split must be unique")
        if not np.issubdtype(self.labels.dtype, np.integer):
            raise InputError(f"labels must be integer class indices (the comparison is classification-only), "
                             f"got dtype {self.labels.dtype}")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class FT2Setup:
    """FT-2: the frozen ``prefix`` and the finetuned ``tail`` (``models.backbones.finetune_split``), the
    hyper-parameter grid and the device (the modules must already be on it)."""

    prefix: Any
    tail: Any
    grid: Any = None
    device: Any = "cpu"


def standardized_features(model, pool_inputs, others: Sequence, device="cpu") -> tuple[np.ndarray, list[np.ndarray]]:
    """Penultimate features of the pool and of other splits, standardised with the pool's statistics."""
    from skmm_pipeline.core.finetune import Standardizer
    from skmm_pipeline.models.small_cnn import extract_features

    pool = extract_features(model, pool_inputs, device=device)
    std = Standardizer(pool)
    return std(pool), [std(extract_features(model, x, device=device)) for x in others]


class SeededSketches:
    """``seed -> N x m`` gradient sketch of the pool by the sketch engine, the same settings for every seed.

    ``stored``: rows already made for some seeds (e.g. the pipeline's ``gradient_sketch``), used as
    they are. Other seeds are sketched on demand with ``core.sketch_engine.GradientSketcher(model,
    **sketcher_kwargs, seed=seed)``; the last one is kept, so loop over seeds outermost.
    """

    def __init__(self, model, inputs, *, labels=None, sample_ids=None, stored: Mapping[int, np.ndarray] | None = None,
                 **sketcher_kwargs):
        self.model, self.inputs, self.labels, self.sample_ids = model, inputs, labels, sample_ids
        self.stored = {int(k): v for k, v in (stored or {}).items()}
        self.kwargs = dict(sketcher_kwargs)
        self.kwargs.pop("seed", None)
        self._last: tuple[int, np.ndarray] | None = None
        self.sketched: list[int] = []  # seeds sketched in-process, in order

    def sketcher(self, seed: int):
        from skmm_pipeline.core.sketch_engine import GradientSketcher

        return GradientSketcher(self.model, seed=int(seed), **self.kwargs)

    def __call__(self, seed: int) -> np.ndarray:
        seed = int(seed)
        if seed in self.stored:
            return self.stored[seed]
        if self._last is not None and self._last[0] == seed:
            return self._last[1]
        labels = self.labels if self.kwargs.get("label_mode") == "true" else None
        rows = self.sketcher(seed).sketch(self.inputs, labels=labels, sample_ids=self.sample_ids)
        self._last = (seed, rows)
        self.sketched.append(seed)
        return rows

    @classmethod
    def from_identity(cls, model, inputs, identity: Mapping, stored_rows: np.ndarray, *, labels=None, sample_ids=None,
                      device=None, check_rows: int = 256) -> "SeededSketches":
        """Reproduce the settings of a stored sketch (its identity) for other seeds.

        Checks that the rebuilt sketcher, at the stored seed, has the stored identity and reproduces the stored rows of the first ``check_rows`` samples; raises ``InputError`` if not.
        """
        from skmm_pipeline.core.sketch_io import canonical_identity

        ident = dict(identity)
        if "engine" not in ident:
            raise InputError(f"not a sketch-engine identity (no 'engine' field): {ident}; re-materialize gradient_sketch")
        blocks = ident.get("blocks") or []
        kwargs = dict(
            sketch_dim=int(ident["sketch_dim"]), kind=ident["kind"], layers=list(ident["param_set"]),
            label_mode=ident["label_mode"], draws=int(ident.get("draws", 1)),
            block_scales={b["name"]: float(b["scale"]) for b in blocks} or None,
            model_id=ident.get("model_id"), precision=ident.get("precision", "float32"), device=device,
        )
        seed = int(ident["seed"])
        out = cls(model, inputs, labels=labels, sample_ids=sample_ids, stored={seed: stored_rows}, **kwargs)
        k = min(len(inputs), check_rows)
        probe = out.sketcher(seed)
        lab = None if labels is None or kwargs["label_mode"] != "true" else labels[:k]
        ids = None if sample_ids is None else list(sample_ids[:k])
        rows = probe.sketch(inputs[:k], labels=lab, sample_ids=ids)
        if canonical_identity(probe.identity) != canonical_identity(ident):
            raise InputError(f"cannot reproduce the stored sketch's settings: rebuilt identity {probe.identity} "
                             f"differs from the stored {ident}")
        ref = np.asarray(stored_rows[:k], dtype=np.float32)
        scale = max(float(np.abs(ref).max()), 1e-12)
        if not np.allclose(rows, ref, rtol=1e-3, atol=1e-4 * scale):
            raise InputError("re-sketching the pool with the stored sketch's settings does not reproduce its rows "
                             f"(max difference {float(np.abs(rows - ref).max()):.3g}): the model or the pool changed; "
                             "re-materialize gradient_sketch")
        return out


# --------------------------------------------------------------------------------------------------
# The grid


def _check_grid(budgets, seeds) -> tuple[list[int], list[int]]:
    bs, ss = [], []
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b <= 0:
            raise InputError(f"budgets must be positive integers, got {b!r}")
        bs.append(int(b))
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
            raise InputError(f"seeds must be non-negative integers, got {s!r}")
        ss.append(int(s))
    if not bs or not ss:
        raise InputError("the grid needs at least one budget and one seed")
    if len(set(bs)) != len(bs) or len(set(ss)) != len(ss):
        raise InputError(f"budgets and seeds must be distinct, got {bs} and {ss}")
    return bs, ss


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def _row(spec_or_name, ft: str, n: int, seed: int, **values) -> dict:
    if isinstance(spec_or_name, MethodSpec):
        s = spec_or_name
        base = dict(group=s.group, method=s.label, base_method=s.method, class_balanced=s.class_balanced, input=s.input)
    else:
        base = dict(group=REFERENCE, method=spec_or_name, base_method=spec_or_name, class_balanced=False, input="-")
    row = {c: np.nan for c in COLUMNS}
    row.update(finetune=ft, n=int(n), seed=int(seed), status="ok", reason="", **base)
    row.update(values)
    return row


class _FT1:
    def __init__(self, pool: Split, val: Split, test: Split, ledger: dict):
        self.pool, self.val, self.test, self.ledger = pool, val, test, ledger

    def __call__(self, idx: np.ndarray, seed: int) -> dict:
        from skmm_pipeline.core.finetune import linear_probe

        p, v, t = self.pool, self.val, self.test
        r = linear_probe(p.features[idx], p.labels[idx], v.features, v.labels, t.features, t.labels, seed=seed)
        self.ledger["fit"].update(p.ids[i] for i in idx)
        self.ledger["select"].update(v.ids)
        self.ledger["test"].update(t.ids)
        return dict(test_accuracy=r.test_accuracy, macro_f1=r.test_macro_f1, val_accuracy=r.val_accuracy,
                    n_classes_seen=r.n_classes_seen, C=r.C)


class _FT2:
    def __init__(self, setup: FT2Setup, pool: Split, val: Split, test: Split, ledger: dict):
        from skmm_pipeline.core.finetune import DEFAULT_FT2_GRID, EvalSplit

        for name, s in (("pool", pool), ("validation", val), ("test", test)):
            if s.inputs is None:
                raise InputError(f"FT-2 needs the model inputs of the {name} split (Split.inputs)")
        self.setup, self.pool, self.ledger = setup, pool, ledger
        self.grid = setup.grid or DEFAULT_FT2_GRID
        self.val = EvalSplit(val.inputs, val.labels, val.ids)
        self.test = EvalSplit(test.inputs, test.labels, test.ids)

    def __call__(self, idx: np.ndarray, seed: int) -> dict:
        from skmm_pipeline.core.finetune import EvalSplit, finetune_tail

        p = self.pool
        train = EvalSplit(p.inputs[idx], p.labels[idx], [p.ids[i] for i in idx])
        r = finetune_tail(self.setup.prefix, self.setup.tail, train, self.val, self.test, grid=self.grid, seed=seed,
                          device=self.setup.device)
        for phase, ids in r.split_ids.items():
            self.ledger[phase].update(ids)
        return dict(test_accuracy=r.test_accuracy, macro_f1=r.test_macro_f1,
                    val_accuracy=r.val_metrics.get("accuracy", np.nan), n_classes_seen=r.n_classes_seen,
                    **{k: float(v) for k, v in r.hyperparameters.items()})


def compare(
    pool: Split,
    val: Split,
    test: Split,
    specs: Sequence[MethodSpec],
    budgets: Iterable[int],
    seeds: Iterable[int],
    *,
    sketch: np.ndarray | Callable[[int], np.ndarray] | None = None,
    finetune: str = "ft1",
    ft2: FT2Setup | None = None,
    full_pool: bool = False,
    progress: Callable[[str], None] | None = None,
    threads: int | None = 1,
) -> pd.DataFrame:
    """Run the grid; one row per finetuning mode x spec x budget x seed (see the module doc).

    ``sketch``: the pool's gradient sketch for a seed (a callable, e.g. :class:`SeededSketches`), or one
    array used for every seed; needed when a spec's input is ``"any"``. ``finetune``: ``ft1``, ``ft2``
    or ``both`` (FT-2 needs ``ft2`` and the splits' ``inputs``). ``full_pool``: add one row per
    finetuning mode trained on the whole pool (group ``reference``, the first seed). ``threads``: BLAS
    and torch CPU threads while the grid runs (``None``: unchanged). The grid is many small
    linear-algebra calls and small trainings, which threads make slower, not faster: on a busy 2-core
    machine 1 thread was 10x (BLAS) to 30x (torch) faster than 2.
    Configuration errors (unknown finetuning mode, overlapping splits, bad budgets) raise
    ``InputError``; failures of single selections or trainings are rows with ``status="failed"``.
    """
    if finetune not in FINETUNE_MODES:
        raise InputError(f"finetune must be one of {sorted(FINETUNE_MODES)}, got {finetune!r}")
    budgets, seeds = _check_grid(budgets, seeds)
    specs = list(specs)
    if not specs:
        raise InputError("no methods to compare")
    labels = [s.label for s in specs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup or FULL_POOL in labels:
        raise InputError(f"method labels must be unique and not {FULL_POOL!r}; repeated: {dup or [FULL_POOL]}")
    for a, b, what in ((pool, val, "pool and validation"), (pool, test, "pool and test"), (val, test, "validation and test")):
        both = set(a.ids) & set(b.ids)
        if both:
            raise InputError(f"{what} splits share {len(both)} sample id(s), e.g. {sorted(both)[:3]}: splits must be disjoint")
    if not (pool.features.shape[1] == val.features.shape[1] == test.features.shape[1]):
        raise InputError(f"feature dimensions differ: pool {pool.features.shape[1]}, validation {val.features.shape[1]}, "
                         f"test {test.features.shape[1]}")
    if any(s.input == "any" for s in specs) and sketch is None:
        raise InputError("methods on the gradient sketch (input 'any') need sketch=")
    ledger: dict[str, set] = {"fit": set(), "select": set(), "test": set()}
    modes = FINETUNE_MODES[finetune]
    evaluators = {}
    for ft in modes:
        if ft == "FT-1":
            evaluators[ft] = _FT1(pool, val, test, ledger)
        else:
            if ft2 is None:
                raise InputError("FT-2 needs ft2=FT2Setup(prefix, tail, ...)")
            evaluators[ft] = _FT2(ft2, pool, val, test, ledger)
    sketch_fn = sketch if callable(sketch) or sketch is None else (lambda _seed, _G=sketch: _G)
    say = progress or (lambda _msg: None)

    rows: list[dict] = []
    t_start = time.perf_counter()
    with _thread_limit(threads):
        _run_grid(rows, pool, specs, budgets, seeds, modes, evaluators, sketch_fn, say, t_start)
        if full_pool:
            everything = np.arange(len(pool))
            for ft in modes:
                t1 = time.perf_counter()
                try:
                    values = evaluators[ft](everything, seeds[0])
                    rows.append(_row(FULL_POOL, ft, len(pool), seeds[0], fit_seconds=time.perf_counter() - t1, **values))
                except Exception as exc:
                    rows.append(_row(FULL_POOL, ft, len(pool), seeds[0], status="failed", reason=f"{ft}: {_reason(exc)}"))
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df.attrs["split_ids"] = {k: tuple(sorted(v)) for k, v in ledger.items()}
    df.attrs["seconds"] = time.perf_counter() - t_start
    return df


@contextlib.contextmanager
def _thread_limit(threads: int | None):
    if threads is None:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        with threadpool_limits(limits=int(threads), user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


def _run_grid(rows, pool, specs, budgets, seeds, modes, evaluators, sketch_fn, say, t_start) -> None:
    n_classes = int(np.unique(pool.labels).size)
    N = len(pool)
    for k, seed in enumerate(seeds):
        G, sketch_error = None, None
        if sketch_fn is not None and any(s.input == "any" for s in specs):
            try:
                G = np.asarray(sketch_fn(seed))
                if G.ndim != 2 or len(G) != N:
                    raise InputError(f"the sketch for seed {seed} has shape {G.shape}, expected ({N}, m)")
            except Exception as exc:  # every sketch-based row of this seed fails with this reason
                sketch_error = "sketch: " + _reason(exc)
        for spec in specs:
            X = G if spec.input == "any" else pool.features
            for n in budgets:
                def failed(why, spec=spec, n=n):
                    rows.extend(_row(spec, ft, n, seed, status="failed", reason=why) for ft in modes)

                if spec.input == "any" and sketch_error:
                    failed(sketch_error)
                    continue
                if spec.class_balanced and n < n_classes:
                    failed(f"class-balanced selection needs n >= the number of classes ({n_classes}), got n={n}")
                    continue
                t0 = time.perf_counter()
                try:
                    sel = selection.select(spec.method, X, n, seed=seed, labels=pool.labels if spec.uses_labels else None,
                                           class_balanced=spec.class_balanced, **spec.options)
                except Exception as exc:
                    failed("selection: " + _reason(exc))
                    continue
                t_sel = time.perf_counter() - t0
                idx = np.asarray(sel.indices)
                for ft in modes:
                    t1 = time.perf_counter()
                    try:
                        values = evaluators[ft](idx, seed)
                    except Exception as exc:
                        rows.append(_row(spec, ft, n, seed, status="failed", reason=f"{ft}: {_reason(exc)}",
                                         select_seconds=t_sel))
                        continue
                    rows.append(_row(spec, ft, n, seed, select_seconds=t_sel, fit_seconds=time.perf_counter() - t1,
                                     **values))
        say(f"seed {seed} done ({k + 1}/{len(seeds)}, {time.perf_counter() - t_start:.0f} s)")


# --------------------------------------------------------------------------------------------------
# Summaries


def group_baselines(df: pd.DataFrame, baseline: str = "uniform") -> dict[str, str]:
    """The reference method of each group: ``baseline`` for label-free, ``baseline-cb`` for label-using
    (``baseline`` itself if there is no class-balanced variant)."""
    present = set(df["method"])
    out = {LABEL_FREE: baseline}
    out[LABEL_USING] = baseline + CB_SUFFIX if baseline + CB_SUFFIX in present else baseline
    return out


def _paired(df: pd.DataFrame, ft: str, a: str, b: str, metric: str) -> pd.DataFrame:
    """Per-n paired difference a - b over the seeds where both succeeded: mean, s.e.m., z, pairs."""
    ok = df[(df.finetune == ft) & (df.status == "ok")]
    wide = ok[ok.method.isin([a, b])].pivot_table(index=["n", "seed"], columns="method", values=metric)
    if a not in wide or b not in wide:
        return pd.DataFrame(columns=["diff", "diff_sem", "z", "pairs"])
    d = (wide[a] - wide[b]).dropna().groupby(level="n")
    out = pd.DataFrame({"diff": d.mean(), "diff_sem": d.sem(), "pairs": d.count()})
    out["z"] = [_z(m, s) for m, s in zip(out["diff"], out["diff_sem"])]
    return out


def _z(mean: float, sem: float) -> float:
    if not np.isfinite(sem):
        return np.nan
    if sem <= 1e-12:  # identical differences on every seed (rounding noise aside)
        return 0.0 if abs(mean) <= 1e-12 else math.copysign(math.inf, mean)
    return float(mean / sem)


def summarize(df: pd.DataFrame, metric: str = "test_accuracy", baseline: str = "uniform") -> pd.DataFrame:
    """Mean +- s.e.m. over seeds per finetuning mode x method x budget, with the paired difference to
    the group's baseline (:func:`group_baselines`): ``diff`` (mean of per-seed differences),
    ``diff_sem`` and ``z = diff / diff_sem``. ``failed`` counts failed seeds, ``reason`` names the first."""
    refs = group_baselines(df, baseline)
    keys = ["finetune", "group", "method", "n"]
    order = list(dict.fromkeys(df["method"]))
    out = []
    for (ft, group, method, n), g in df.groupby(keys, sort=False):
        ok = g[g.status == "ok"][metric]
        bad = g[g.status != "ok"]
        out.append({
            "finetune": ft, "group": group, "method": method, "n": int(n),
            "seeds": int(ok.size), "failed": int(len(bad)),
            "mean": float(ok.mean()) if ok.size else np.nan,
            "sem": float(ok.sem()) if ok.size > 1 else (0.0 if ok.size == 1 else np.nan),
            "baseline": refs.get(group, ""), "diff": np.nan, "diff_sem": np.nan, "z": np.nan,
            "reason": bad["reason"].iloc[0] if len(bad) else "",
        })
    summary = pd.DataFrame(out)
    if summary.empty:
        return summary
    for (ft, group, method), _ in summary.groupby(["finetune", "group", "method"], sort=False):
        ref = refs.get(group)
        if not ref or method == ref:
            continue
        paired = _paired(df, ft, method, ref, metric)
        mask = (summary.finetune == ft) & (summary.method == method)
        for i in summary.index[mask]:
            n = summary.at[i, "n"]
            if n in paired.index:
                summary.loc[i, ["diff", "diff_sem", "z"]] = paired.loc[n, ["diff", "diff_sem", "z"]].to_numpy(float)
    summary["_order"] = summary["method"].map({m: k for k, m in enumerate(order)})
    summary = summary.sort_values(["finetune", "group", "_order", "n"], kind="stable").drop(columns="_order")
    return summary.reset_index(drop=True)


def _cell(mean, sem, seeds, failed, scale, digits) -> str:
    if not seeds:
        return f"failed ({failed})" if failed else "-"
    text = f"{scale * mean:.{digits}f}" + (f" ± {scale * sem:.{digits}f}" if seeds > 1 else "")
    return text + (f" [{failed} failed]" if failed else "")


def method_table(summary: pd.DataFrame, finetune: str, group: str | None = None, scale: float = 100.0,
                 digits: int = 1) -> pd.DataFrame:
    """Methods x budgets, cells ``mean ± s.e.m.`` (``scale``: 100 for percent); ``group=None``: all."""
    s = summary[(summary.finetune == finetune) & ((summary.group == group) if group else True)]
    cells = {(m, n): _cell(mean, sem, k, f, scale, digits)
             for m, n, mean, sem, k, f in zip(s.method, s.n, s["mean"], s["sem"], s.seeds, s.failed)}
    methods = list(dict.fromkeys(s.method))
    budgets = sorted(set(s.n))
    table = pd.DataFrame([[cells.get((m, n), "") for n in budgets] for m in methods], index=methods,
                         columns=[f"n={n}" for n in budgets])
    table.index.name = "method"
    return table


def z_table(summary: pd.DataFrame, finetune: str, group: str, scale: float = 100.0, digits: int = 1) -> pd.DataFrame:
    """Methods x budgets, cells ``difference to the group baseline (z = diff / s.e.m.)``, paired over seeds."""
    s = summary[(summary.finetune == finetune) & (summary.group == group) & (summary.method != summary.baseline)]
    cells = {}
    for m, n, d, z in zip(s.method, s.n, s["diff"], s["z"]):
        cells[(m, n)] = "-" if not np.isfinite(d) else f"{scale * d:+.{digits}f} (z={z:.1f})"
    methods = list(dict.fromkeys(s.method))
    budgets = sorted(set(s.n))
    table = pd.DataFrame([[cells.get((m, n), "") for n in budgets] for m in methods], index=methods,
                         columns=[f"n={n}" for n in budgets])
    table.index.name = f"vs {s.baseline.iloc[0]}" if len(s) else "method"
    return table


def markdown(table: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table (index as the first column)."""
    head = [table.index.name or ""] + [str(c) for c in table.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for idx, row in table.iterrows():
        lines.append("| " + " | ".join([str(idx)] + [str(v) for v in row]) + " |")
    return "\n".join(lines)


def summary_markdown(summary: pd.DataFrame, metric_label: str = "test accuracy (%)") -> str:
    """Every finetuning mode and group: the mean ± s.e.m. table and the paired z table, in Markdown."""
    parts = []
    for ft in dict.fromkeys(summary.finetune):
        for group in [g for g in (*GROUPS, REFERENCE) if ((summary.finetune == ft) & (summary.group == g)).any()]:
            parts.append(f"**{ft}, {group}: {metric_label}, mean ± s.e.m.**\n\n" + markdown(method_table(summary, ft, group)))
            if group != REFERENCE:
                z = z_table(summary, ft, group)
                if len(z):
                    parts.append(f"**{ft}, {group}: paired difference to {z.index.name[3:]} (points)**\n\n" + markdown(z))
    return "\n\n".join(parts)


def headline_checks(df: pd.DataFrame, finetune: str, method: str, group: str, *, baseline: str | None = None,
                    metric: str = "test_accuracy", best_max_n: int = 80, beat_max_n: int = 40,
                    beat_z: float = 2.0) -> dict[str, str]:
    """Does ``method`` lead its group? Three statements, each ``yes`` or ``no (...)``:

    * ``best_or_within_1sem``: at every n <= ``best_max_n``, ``method`` has the highest mean of its
      group, or the best method's lead over it is at most one s.e.m. of their paired difference;
    * ``beats_baseline``: at every n <= ``beat_max_n``, the paired z against the baseline is >= ``beat_z``;
    * ``never_below_baseline``: at every n, the mean difference to the baseline is >= 0.
    """
    baseline = baseline or group_baselines(df)[group]
    ok = df[(df.finetune == finetune) & (df.group == group) & (df.status == "ok")]
    means = ok.groupby(["n", "method"])[metric].mean().unstack("method")
    if method not in means:
        return {k: f"no ({method} has no results)" for k in ("best_or_within_1sem", "beats_baseline", "never_below_baseline")}
    misses = []
    for n in [n for n in means.index if n <= best_max_n]:
        row = means.loc[n].dropna()
        best = row.idxmax()
        if best == method or row[best] == row.get(method):
            continue
        p = _paired(df, finetune, best, method, metric)
        if n not in p.index or not p.loc[n, "diff"] <= p.loc[n, "diff_sem"]:
            lead = float(row[best] - row.get(method, np.nan))
            misses.append(f"n={n}: {best} ahead by {100 * lead:.1f}")
    p = _paired(df, finetune, method, baseline, metric)
    weak = [f"n={n}: z={p.loc[n, 'z']:.1f}" for n in p.index if n <= beat_max_n and not p.loc[n, "z"] >= beat_z]
    weak += [f"n={n}: no pairs" for n in means.index if n <= beat_max_n and n not in p.index]
    below = [f"n={n}: {100 * p.loc[n, 'diff']:+.1f}" for n in p.index if p.loc[n, "diff"] < 0]

    def verdict(problems):
        return "yes" if not problems else "no (" + "; ".join(problems) + ")"

    return {"best_or_within_1sem": verdict(misses), "beats_baseline": verdict(weak), "never_below_baseline": verdict(below)}


# --------------------------------------------------------------------------------------------------
# Plot


def plot_comparison(summary: pd.DataFrame, metric_label: str = "test accuracy (%)", scale: float = 100.0,
                    highlight: Sequence[str] = ("skmm",), dpi: int = 80) -> bytes:
    """PNG of metric vs budget: one panel per finetuning mode x group (label-free: solid lines, circles;
    label-using: dashed, squares), one line per method with s.e.m. error bars, the same colour for a
    method and its class-balanced variant (uniform in black), the full pool as a grey dotted line;
    ``highlight``ed base methods drawn thicker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(summary.finetune))
    groups = [g for g in GROUPS if (summary.group == g).any()] or list(GROUPS[:1])
    base = lambda m: m[: -len(CB_SUFFIX)] if m.endswith(CB_SUFFIX) else m  # noqa: E731
    bases = list(dict.fromkeys(base(m) for m in summary.method if m != FULL_POOL))
    cmap = plt.get_cmap("tab20")
    palette = [cmap(k) for k in range(0, 20, 2)] + [cmap(k) for k in range(1, 20, 2)]  # dark shades first
    others = [b for b in bases if b != "uniform"]
    colour = {b: palette[k % 20] for k, b in enumerate(others)}
    colour["uniform"] = "black"  # the reference line of both groups
    fig, axes = plt.subplots(len(modes), len(groups), figsize=(5.2 * len(groups), 3.6 * len(modes)), dpi=dpi,
                             squeeze=False, sharey="row")
    for r, ft in enumerate(modes):
        ceiling = summary[(summary.finetune == ft) & (summary.method == FULL_POOL) & (summary.seeds > 0)]
        for c, group in enumerate(groups):
            ax = axes[r][c]
            s = summary[(summary.finetune == ft) & (summary.group == group) & (summary.seeds > 0)]
            style = dict(linestyle="-", marker="o") if group == LABEL_FREE else dict(linestyle="--", marker="s")
            for method in dict.fromkeys(s.method):
                m = s[s.method == method].sort_values("n")
                thick = base(method) in highlight
                ax.errorbar(m.n, scale * m["mean"], yerr=scale * m["sem"].fillna(0), color=colour[base(method)],
                            label=method, linewidth=2.4 if thick else 1.0, markersize=4 if thick else 3, capsize=2,
                            zorder=3 if thick else 2, **style)
            if len(ceiling):
                ax.axhline(scale * ceiling["mean"].iloc[0], color="grey", linestyle=":", linewidth=1, label="full pool")
            ax.set_xscale("log", base=2)
            budgets = sorted(set(s.n)) or sorted(set(summary.n))
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.set_title(f"{ft} — {group}", fontsize=9)
            ax.set_xlabel("budget n", fontsize=8)
            if c == 0:
                ax.set_ylabel(metric_label, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, ncol=2, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def to_json_records(df: pd.DataFrame) -> list[dict]:
    """Rows as JSON-safe dicts (NaN -> None)."""
    return json.loads(df.to_json(orient="records"))
