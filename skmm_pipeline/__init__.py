"""skmm_pipeline: pick the few samples worth finetuning on, with Sketchy Moment Matching.

The package is layered: ``core`` (pure numpy/torch math), ``data`` and ``models`` (adapters),
``versioning`` (DVC) and ``tracking`` (MLflow), and ``defs`` (Dagster assets, thin).
Heavy dependencies are imported lazily so that ``import skmm_pipeline`` stays cheap.
"""

__version__ = "0.1.0"


def select(method, X, n, *, seed=0, labels=None, **options):
    """Select ``n`` rows of ``X`` with a registered method; see :func:`skmm_pipeline.core.selection.select`."""
    from skmm_pipeline.core.selection import select as _select  # noqa: PLC0415 - `import skmm_pipeline` (and `skmm --help`) must not import torch

    return _select(method, X, n, seed=seed, labels=labels, **options)


__all__ = ["__version__", "select"]
