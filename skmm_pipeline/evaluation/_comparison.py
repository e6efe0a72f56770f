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
* **Finetuning.** FT-1 (``evaluation.linear_probe``: logistic head on the standardised features, C
  chosen on validation) and/or FT-2 (``evaluation.finetune_tail``: the last block + head, lr, weight
  decay and epochs chosen on validation). Test metrics: accuracy and macro-F1, computed once with the
  chosen model.
* **Seeds.** A seed fixes the sketch, the selection and the training (``linear_probe``'s and
  ``finetune_tail``'s seed); the same seeds give the same table.
* **Failures.** A selection or a finetuning that raises becomes a row with ``status="failed"`` and the
  error as ``reason``; the rest of the grid runs. A class-balanced budget smaller than the number of
  classes is refused the same way (a class-balanced subset has at least one sample per class).

The result is a tidy DataFrame, one row per finetuning mode x method x budget x seed (plus, optionally,
the full pool as a ceiling). Each row keeps the subset it scored: ``selected`` (the pool row indices in
selection order, space-separated) and ``class_counts`` (picks per class, in sorted label order).
``summary.summarize`` gives mean +- s.e.m. per method and budget and the
paired difference to the group's uniform baseline in s.e.m. units; ``report.method_table`` and
``report.z_table`` lay it out method x budget; ``report.plot_comparison`` draws metric vs budget;
``summary.headline_checks`` states whether a method is best in its group and ahead of uniform.

Which sample ids each phase touched is recorded in ``df.attrs["split_ids"]`` (``fit``: pool ids the
heads were trained on; ``select``: ids the hyper-parameters were chosen on; ``test``: ids scored once).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits

from skmm_pipeline.core import selection
from skmm_pipeline.core.budgets import BUDGET_RULES
from skmm_pipeline.core.progress import Progress
from skmm_pipeline.core.selection import GROUPS, INPUTS, method_info
from skmm_pipeline.core.sketch_engine import GradientSketcher, SketchConfig
from skmm_pipeline.core.sketch_io import canonical_identity
from skmm_pipeline.core.validation import InputError, check_int
from skmm_pipeline.evaluation._finetune import DEFAULT_FT2_GRID, FINETUNE_MODES, EvalSplit, finetune_tail, linear_probe

LABEL_FREE, LABEL_USING = GROUPS
REFERENCE = "reference"
CB_SUFFIX = "-cb"
FULL_POOL = "full-pool"
EXCLUDED_BY_DEFAULT = ("skmm-v1-reference",)  # the research code's loop: slow, kept for reference only
HP_COLUMNS = ("C", "lr", "weight_decay", "epochs")
COLUMNS = (
    "finetune", "group", "method", "base_method", "class_balanced", "input", "n", "seed", "status", "reason",
    "test_accuracy", "macro_f1", "val_accuracy", "n_classes_seen", *HP_COLUMNS, "select_seconds", "fit_seconds",
    "selected", "class_counts",
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
        ident = dict(identity)
        kwargs = {**SketchConfig.from_identity(ident).kwargs(), "device": device}
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
    bs = [check_int(b, "budgets", minimum=1) for b in budgets]
    ss = [check_int(s, "seeds", minimum=0) for s in seeds]
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
        p, v, t = self.pool, self.val, self.test
        r = linear_probe(p.features[idx], p.labels[idx], v.features, v.labels, t.features, t.labels, seed=seed)
        self.ledger["fit"].update(p.ids[i] for i in idx)
        self.ledger["select"].update(v.ids)
        self.ledger["test"].update(t.ids)
        return dict(test_accuracy=r.test_accuracy, macro_f1=r.test_macro_f1, val_accuracy=r.val_accuracy,
                    n_classes_seen=r.n_classes_seen, C=r.C)


class _FT2:
    def __init__(self, setup: FT2Setup, pool: Split, val: Split, test: Split, ledger: dict):
        for name, s in (("pool", pool), ("validation", val), ("test", test)):
            if s.inputs is None:
                raise InputError(f"FT-2 needs the model inputs of the {name} split (Split.inputs)")
        self.setup, self.pool, self.ledger = setup, pool, ledger
        self.grid = setup.grid or DEFAULT_FT2_GRID
        self.val = EvalSplit(val.inputs, val.labels, val.ids)
        self.test = EvalSplit(test.inputs, test.labels, test.ids)

    def __call__(self, idx: np.ndarray, seed: int) -> dict:
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
    validation_sketch: Callable[[int], np.ndarray] | None = None,
    class_budgets: str = "proportional",
) -> pd.DataFrame:
    """Run the grid; one row per finetuning mode x spec x budget x seed (see the module doc).

    ``validation_sketch``: the validation split's rows for a seed, sketched like the pool; a spec whose
    options say ``reference="validation"`` selects against that moment instead of the pool's.
    ``class_budgets``: how class-balanced specs split the budget, ``"proportional"`` to class sizes or
    ``"equal"`` (:func:`core.budgets.class_budgets`).

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
    if class_budgets not in BUDGET_RULES:
        raise InputError(f"class_budgets must be one of {BUDGET_RULES}, got {class_budgets!r}")
    if validation_sketch is None and any(s.options.get("reference") == "validation" for s in specs):
        raise InputError('specs with reference="validation" need validation_sketch=')
    say = progress or (lambda _msg: None)

    rows: list[dict] = []
    t_start = time.perf_counter()
    with _thread_limit(threads):
        _run_grid(rows, pool, specs, budgets, seeds, modes, evaluators, sketch_fn, say, t_start, validation_sketch,
                  class_budgets)
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
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        with threadpool_limits(limits=int(threads), user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


def _run_grid(rows, pool, specs, budgets, seeds, modes, evaluators, sketch_fn, say, t_start, validation_sketch,
              budget_rule) -> None:
    classes, codes = np.unique(pool.labels, return_inverse=True)
    n_classes = int(classes.size)
    N = len(pool)
    progress = Progress("comparison runs", len(seeds) * len(specs) * len(budgets) * len(modes), "runs")
    for k, seed in enumerate(seeds):
        G, sketch_error = None, None
        if sketch_fn is not None and any(s.input == "any" for s in specs):
            try:
                G = np.asarray(sketch_fn(seed))
                if G.ndim != 2 or len(G) != N:
                    raise InputError(f"the sketch for seed {seed} has shape {G.shape}, expected ({N}, m)")
            except Exception as exc:  # every sketch-based row of this seed fails with this reason
                sketch_error = "sketch: " + _reason(exc)
        reference = None
        if any(s.options.get("reference") == "validation" for s in specs):
            reference = np.asarray(validation_sketch(seed))
        for spec in specs:
            options = dict(spec.options)
            if options.get("reference") == "validation":
                options["reference"] = reference
            if spec.class_balanced:
                options["class_budgets"] = budget_rule
            X = G if spec.input == "any" else pool.features
            for n in budgets:
                progress.advance(len(modes))  # runs begun, failed ones included

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
                                           class_balanced=spec.class_balanced, **options)
                except Exception as exc:
                    failed("selection: " + _reason(exc))
                    continue
                t_sel = time.perf_counter() - t0
                idx = np.asarray(sel.indices)
                picked = {"selected": " ".join(map(str, idx.tolist())),
                          "class_counts": " ".join(map(str, np.bincount(codes[idx], minlength=len(classes)).tolist()))}
                for ft in modes:
                    t1 = time.perf_counter()
                    try:
                        values = evaluators[ft](idx, seed)
                    except Exception as exc:
                        rows.append(_row(spec, ft, n, seed, status="failed", reason=f"{ft}: {_reason(exc)}",
                                         select_seconds=t_sel, **picked))
                        continue
                    rows.append(_row(spec, ft, n, seed, select_seconds=t_sel, fit_seconds=time.perf_counter() - t1,
                                     **values, **picked))
        say(f"seed {seed} done ({k + 1}/{len(seeds)}, {time.perf_counter() - t_start:.0f} s)")
