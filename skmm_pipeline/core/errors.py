"""The one error hierarchy of skmm_pipeline.

Every error a *user* can cause (a bad input, a corrupt file, a dirty workspace, a missing weights file)
derives from :class:`SkmmError`; the CLI and the Dagster assets turn any of them into one line naming
the problem and what to do. A plain ``ValueError``/``TypeError`` that is not an ``SkmmError`` is a
programming error and keeps its traceback.

Each class also keeps the builtin base it had before the hierarchy existed (``ValueError`` for bad
values, ``RuntimeError`` for state problems), so ``except ValueError`` in callers keeps working.
"""

from __future__ import annotations


class SkmmError(Exception):
    """Base of every error caused by what the user gave or by the state of their workspace."""


class InputError(SkmmError, ValueError):
    """An input the core cannot work with: wrong shape, non-finite values, bad budget or option."""


class SketchMismatchError(InputError):
    """A sketch shard whose identity (seed, kind, m, model, parameter set, label mode...) differs."""


class DataError(SkmmError, ValueError):
    """A dataset that is missing, malformed or cannot be used as asked."""


class CorruptImageError(DataError):
    """An image file that cannot be decoded (raised only with ``on_corrupt="raise"``)."""


class ShardError(SkmmError, ValueError):
    """A shard that is missing, unreadable, empty, malformed or breaks the data contract."""


class BackboneWeightsError(SkmmError, ValueError):
    """A weights file that is missing, unreadable, or does not fit the architecture."""


class SubsetVersionError(SkmmError, RuntimeError):
    """A subset version could not be written, listed or read; the message names the problem."""


class MetricsUnavailable(SubsetVersionError):
    """The MLflow store given for evaluation metrics cannot be read."""


class ConfigError(SkmmError, ValueError):
    """A setting, resource or run config that cannot work (unknown architecture, relative path, ...)."""


class SetupError(SkmmError, RuntimeError):
    """The environment is not set up for a run (e.g. DAGSTER_HOME missing or relative)."""

