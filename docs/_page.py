"""What the docs/gen_*.py page generators share: a page is written only when its text changed, and each script has
the same command line (``--check`` for CI, ``--out`` for another path).

The generators import this as a sibling module: ``python docs/gen_x.py`` and mkdocs' hook loader both put docs/
on ``sys.path``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def write_if_changed(output: Path, text: str) -> bool:
    """Write ``text`` to ``output`` unless it holds that text already; True when it was written."""
    if output.is_file() and output.read_text(encoding="utf-8") == text:
        return False
    output.write_text(text, encoding="utf-8")
    return True


def main(
    description: str, output: Path, regenerate: Callable[[str | None], str], argv: list[str] | None = None
) -> int:
    """A generator's command line. ``regenerate(current)`` is the page's fresh text given its current text (None
    when the page is missing); ``--check`` exits 1 when the page is missing or differs from it, otherwise the page
    is written if it changed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=output, help="page to write (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is missing or stale")
    args = parser.parse_args(argv)
    page: Path = args.out
    current = page.read_text(encoding="utf-8") if page.is_file() else None
    if args.check:
        fresh = current is not None and regenerate(current) == current
        print(f"{page} is {'up to date' if fresh else 'stale'}", file=sys.stdout if fresh else sys.stderr)
        return 0 if fresh else 1
    print(f"{'wrote' if write_if_changed(page, regenerate(current)) else 'unchanged'}: {page}")
    return 0
