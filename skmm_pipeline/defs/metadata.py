"""Metadata values the Dagster UI shows well: tables with rounded numbers, and images.

The UI draws a Markdown value inline only when its text is under 1000 characters; a longer one (an
image embedded as a data URI) sits behind "[Show Markdown]". So an image shown inline is a Markdown
link to where a server serves it (:func:`linked_image`, e.g. an MLflow artifact), and
:func:`embedded_image` keeps a copy that needs no server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import dagster as dg

from skmm_pipeline.evaluation import image_markdown


def _cell(value, digits: int):
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, digits)
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    return str(value)


def _column_type(values: list) -> str:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return "bool"
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return "int"
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return "float"
    return "string"


def table(rows: Sequence[Mapping], digits: int = 4) -> dg.MetadataValue:
    """Records as a Dagster table (columns: the union of keys in first-seen order), floats rounded to
    ``digits`` decimals."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [{c: _cell(row.get(c), digits) for c in columns} for row in rows]
    schema = dg.TableSchema(columns=[dg.TableColumn(c, _column_type([r[c] for r in cells])) for c in columns])
    return dg.MetadataValue.table([dg.TableRecord(r) for r in cells], schema=schema)


def key_values(values: Mapping, digits: int = 4) -> dg.MetadataValue:
    """A flat mapping as a two-column (``name``, ``value``) table; numbers rounded, shown as text."""
    rows = [{"name": str(k), "value": str(_cell(v, digits))} for k, v in values.items()
            if isinstance(v, (int, float, str, bool))]
    return table(rows)


def embedded_image(alt: str, png: bytes) -> dg.MetadataValue:
    """A PNG inside the metadata (a data-URI Markdown image): always available, opened with "[Show Markdown]"."""
    return dg.MetadataValue.md(image_markdown(alt, png))


def linked_image(alt: str, url: str, link: str | None = None) -> dg.MetadataValue:
    """A short Markdown image served from ``url`` (shown inline by the UI while that server runs),
    optionally wrapped in a ``link``."""
    image = f"![{alt}]({url})"
    return dg.MetadataValue.md(f"[{image}]({link})" if link else image)
