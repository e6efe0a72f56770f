"""Copy the benchmark scripts' saved tables into the README and docs/, so no result is typed by hand.

A page marks a generated region with two comments; everything between them is replaced by the file named
in the first one (relative to ``docs/``)::

    <!-- results: results/digits_transfer_ft1.md -->
    ...generated, do not edit...
    <!-- /results -->

The files under ``docs/results/`` are written by the benchmark scripts themselves (``--markdown``,
``--json`` or their printed report saved with ``tee``). ``--check`` changes nothing and exits 1 when a
region differs from its file or names a missing one (the test suite runs it).

    python benchmarks/publish_docs.py [--check]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REGION = re.compile(r"(<!-- results: (?P<name>[^ ]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def render(text: str, docs: Path) -> tuple[str, list[str]]:
    """``text`` with every region refilled from its file, and the problems found (missing files)."""
    problems: list[str] = []

    def fill(m: re.Match) -> str:
        src = docs / m["name"]
        if not src.is_file():
            problems.append(f"missing {src}")
            return m.group(0)
        return m.group(1) + src.read_text().rstrip("\n") + "\n" + m.group(4)

    return REGION.sub(fill, text), problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="report stale regions, change nothing")
    ap.add_argument("--root", default=str(ROOT), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    root = Path(args.root)
    stale, missing = [], []
    for page in pages(root):
        text = page.read_text()
        new, problems = render(text, root / "docs")
        missing += [f"{page.relative_to(root)}: {p}" for p in problems]
        if new != text:
            stale.append(f"{page.relative_to(root)}: a generated region differs from its file")
            if not args.check:
                page.write_text(new)
    for line in missing + stale:
        print(line)
    return 1 if missing or (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
