"""Check the built site's asv dashboard in a real headless Chromium, and take its screenshot.

Serves the built site (default .site/) over HTTP on a free local port (asv's page loads its JSON with requests that a
``file://`` page may not make), then runs the system Chromium headless twice with a virtual-time budget so that
asv's scripts finish: ``--dump-dom`` of the benchmark grid and of one benchmark's graph page, whose DOM must hold
the benchmark list and plots drawn by flot (``canvas.flot-base`` with axis tick labels), and ``--screenshot`` of
that graph page. A canvas with axes is drawn even for a benchmark without data, so the graph's data files (the
JSON the page plots) must also hold a line: values at two commits or more.

``python docs/check_dashboard.py [--site .site] [--screenshot docs/img/dashboard.png]`` after building the docs
(``python docs/build_dashboard.py && mkdocs build --strict``); exits 1 with the reason when a check fails.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / ".site"
PAGE = "dashboard/index.html"
# A benchmark with history on every commit of the committed run, and the lines to draw (asv's URL syntax: one
# ``p-<param>=<value>`` per selected value, values as asv stores them): its graph page is checked and photographed.
GRAPH = (
    "bench_torch.TorchAdaptedLinear.time_forward_backward_adapted"
    "?p-tokens=2048&p-fused=True&p-kind=%27lora%27&p-kind=%27dora%27"
)
SCREENSHOT = ROOT / "docs" / "img" / "dashboard-history.png"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
# Virtual time lets asv's scripts load the JSON and draw before Chromium dumps or photographs the page.
BUDGET_MS = 20000


@dataclass(frozen=True)
class PageReport:
    """What one dumped page held: benchmark entries in the grid, flot plots drawn, and their tick labels."""

    benchmarks: int
    plots: int
    tick_labels: int


def find_chromium() -> str | None:
    """The path of a Chromium (or Chrome) executable on PATH, None when there is none."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


@contextmanager
def serve(directory: Path) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1 at a free port for the duration of the block; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # the request log would drown the report
        pass


def chromium_command(chromium: str, profile: Path, *args: str) -> list[str]:
    """A headless Chromium command line (no sandbox: CI and containers run it as root)."""
    return [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--virtual-time-budget={BUDGET_MS}",
        "--window-size=1400,900",
        *args,
    ]


def dump_dom(chromium: str, url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran."""
    done = subprocess.run(
        chromium_command(chromium, profile, "--dump-dom", url),
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    return done.stdout


def screenshot(chromium: str, url: str, profile: Path, output: Path) -> None:
    """A PNG of the page after its scripts ran."""
    output.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        chromium_command(chromium, profile, f"--screenshot={output}", url),
        capture_output=True,
        timeout=180,
        check=True,
    )
    if not output.is_file() or output.stat().st_size == 0:
        raise RuntimeError(f"Chromium wrote no screenshot to {output}")


def inspect_dom(dom: str) -> PageReport:
    """Count the grid's benchmark entries, the flot plots drawn and their axis tick labels in a dumped DOM."""
    return PageReport(
        benchmarks=len(re.findall(r'class="btn benchmark-container"', dom)),
        plots=len(re.findall(r'<canvas class="flot-base"', dom)),
        tick_labels=len(re.findall(r'class="flot-tick-label', dom)),
    )


def plotted_commits(site: Path, graph: str = GRAPH) -> int:
    """The most commits with a value in one line of ``graph``'s data files (asv's ``graphs/<machine …>/<name>.json``:
    ``[[revision, value-or-values], …]``, one value per parameter combination)."""
    name = graph.split("?", 1)[0]
    best = 0
    for path in (site / PAGE).parent.glob(f"graphs/**/{name}.json"):
        if "summary" in path.relative_to(site).parts:
            continue  # the grid's thumbnails: one averaged line, not the graph's own data
        points = json.loads(path.read_text(encoding="utf-8"))
        columns: dict[int, int] = {}
        for _, value in points:
            for column, v in enumerate(value if isinstance(value, list) else [value]):
                if isinstance(v, (int, float)):
                    columns[column] = columns.get(column, 0) + 1
        best = max(best, *columns.values(), 0)
    return best


def check(site: Path, chromium: str, shot: Path | None, graph: str = GRAPH) -> tuple[PageReport, PageReport]:
    """Load the grid and ``graph``'s page from ``site``; raise AssertionError unless both show plots."""
    if not (site / PAGE).is_file():
        raise FileNotFoundError(
            f"{site / PAGE} is missing: python docs/build_dashboard.py && mkdocs build --strict"
        )
    with serve(site) as base, tempfile.TemporaryDirectory() as profile:
        grid = inspect_dom(dump_dom(chromium, base + PAGE, Path(profile)))
        graph_url = f"{base}{PAGE}#{graph}"
        page = inspect_dom(dump_dom(chromium, graph_url, Path(profile)))
        if shot is not None:
            screenshot(chromium, graph_url, Path(profile), shot)
    assert grid.benchmarks > 0, f"the benchmark grid lists no benchmark: {grid}"
    assert grid.plots > 0, f"the benchmark grid drew no plot: {grid}"
    assert page.plots > 0 and page.tick_labels > 0, f"{graph}'s page drew no graph with axes: {page}"
    lines = plotted_commits(site, graph)
    assert lines >= 2, f"{graph}'s data has no line to draw (values at {lines} commit(s) at most)"
    return grid, page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--site", type=Path, default=SITE, help="the built site (default: %(default)s)")
    parser.add_argument(
        "--screenshot", type=Path, default=SCREENSHOT, help="PNG to write (default: %(default)s)"
    )
    parser.add_argument("--no-screenshot", action="store_true", help="check only")
    parser.add_argument("--graph", default=GRAPH, help="the benchmark whose graph page is checked")
    args = parser.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print("no Chromium on PATH (apt-get install chromium)", file=sys.stderr)
        return 1
    try:
        grid, page = check(args.site, chromium, None if args.no_screenshot else args.screenshot, args.graph)
    except (AssertionError, FileNotFoundError, RuntimeError, subprocess.SubprocessError) as exc:
        print(f"dashboard check failed: {exc}", file=sys.stderr)
        return 1
    print(f"grid: {grid}\ngraph {args.graph}: {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
