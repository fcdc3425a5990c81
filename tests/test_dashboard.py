"""The performance dashboard: the generated summary table of docs/performance.md, and the published asv page in a
headless Chromium (docs/check_dashboard.py) when Chromium and a built site are there."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SITE = ROOT / ".site"


def load_docs_script(name: str) -> ModuleType:
    """A docs/ script loaded as mkdocs loads a hook: with docs/ on sys.path for its sibling imports."""
    if str(DOCS) not in sys.path:
        sys.path.insert(0, str(DOCS))
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def write_results(root: Path, commit: str, date_ms: int, values: list[float | None]) -> None:
    """An asv results tree with one ratio benchmark over kinds lora and dora, and one time benchmark."""
    (root / "m1").mkdir(parents=True, exist_ok=True)
    (root / "m1" / "machine.json").write_text("{}", encoding="utf-8")
    ratio = {"unit": "ratio", "type": "track", "params": [["'lora'", "'dora'"]]}
    index = {
        "s.Ratios.track_forward_ours_over_peer": ratio,
        "s.Layer.time_x": {"unit": "seconds"},
        "version": 2,
    }
    (root / "benchmarks.json").write_text(json.dumps(index), encoding="utf-8")
    columns = ["result", "params", "version"]
    results = {
        "s.Ratios.track_forward_ours_over_peer": [values, [["'lora'", "'dora'"]], "v"],
        "s.Layer.time_x": [[0.5], [], "v"],
    }
    data = {"commit_hash": commit, "date": date_ms, "result_columns": columns, "results": results}
    (root / "m1" / f"{commit[:8]}-env.json").write_text(json.dumps(data), encoding="utf-8")


def test_the_summary_shows_the_newest_commits_ratios_per_kind(tmp_path: Path) -> None:
    summary = load_docs_script("gen_perf_summary")
    write_results(tmp_path, "a" * 40, 1000, [0.5, 0.25])
    write_results(tmp_path, "b" * 40, 2000, [0.875, None])  # newer: its numbers win; dora failed there
    text = summary.render_generated(tmp_path)
    assert "commit `bbbbbbbb`" in text and "`s.Ratios`" in text
    assert "| lora | 0.875 |" in text  # exact: the value is printed to three significant figures
    assert "| dora | – |" in text
    assert "time_x" not in text  # only unit "ratio" benchmarks are summarised


def test_the_summary_on_the_performance_page_is_up_to_date() -> None:
    summary = load_docs_script("gen_perf_summary")
    page = (DOCS / "performance.md").read_text(encoding="utf-8")
    assert summary.regenerate(page) == page, "stale: run python docs/gen_perf_summary.py"


def cdn_reachable() -> bool:
    """Whether asv's CDN answers (a dashboard built without --vendor loads its scripts from it)."""
    try:
        socket.create_connection(("code.jquery.com", 443), timeout=3).close()
    except OSError:
        return False
    return True


def test_the_dashboard_shows_graphs_in_chromium(tmp_path: Path) -> None:
    check = load_docs_script("check_dashboard")
    chromium = check.find_chromium()
    if chromium is None:
        pytest.skip("no Chromium on PATH (apt-get install chromium)")
    if not (SITE / check.PAGE).is_file():
        pytest.skip("no built site: python docs/build_dashboard.py && mkdocs build --strict")
    index = (SITE / check.PAGE).read_text(encoding="utf-8")
    if "https://code.jquery.com/" in index and not cdn_reachable():
        pytest.skip("offline, and the site loads asv's scripts from their CDN (build with --vendor)")
    grid, page = check.check(SITE, chromium, tmp_path / "dashboard.png")
    assert grid.benchmarks > 0 and grid.plots > 0 and page.plots > 0
    assert (tmp_path / "dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_graph_without_data_is_reported(tmp_path: Path) -> None:
    check = load_docs_script("check_dashboard")
    name = "s.Layer.time_x"
    folder = tmp_path / "dashboard" / "graphs" / "machine-m1"
    folder.mkdir(parents=True)
    summary = tmp_path / "dashboard" / "graphs" / "summary"
    summary.mkdir()
    (summary / f"{name}.json").write_text(json.dumps([[1, 0.5], [2, 0.6], [3, 0.7]]), encoding="utf-8")
    (folder / f"{name}.json").write_text(json.dumps([[1, [None, 0.5]], [2, [None, None]]]), encoding="utf-8")
    assert check.plotted_commits(tmp_path, name + "?p-kind=%27lora%27") == 1  # the summary is not counted
    (folder / f"{name}.json").write_text(json.dumps([[1, [None, 0.5]], [2, [0.4, 0.6]]]), encoding="utf-8")
    assert check.plotted_commits(tmp_path, name) == 2


def test_vendoring_points_the_page_at_local_copies_of_its_cdn_files(tmp_path: Path) -> None:
    build = load_docs_script("build_dashboard")
    cache = tmp_path / "npm"
    cache.mkdir()
    for release in {release for release, _ in build.VENDORED.values()}:
        name, version = release.rsplit("@", 1)
        with tarfile.open(cache / f"{name}-{version}.tgz", "w:gz") as archive:
            for member in {m for r, m in build.VENDORED.values() if r == release}:
                source = tmp_path / "member"
                source.write_text(f"/* {release} {member} */", encoding="utf-8")
                archive.add(source, arcname=member)
    html = tmp_path / "html"
    html.mkdir()
    (html / "index.html").write_text(
        '<script src="https://cdnjs.example/ajax/libs/flot/0.8.3/jquery.flot.min.js" integrity="sha512-x"'
        ' crossorigin="anonymous" onerror="f()"></script>\n'
        '<script src="https://cdn.example/unknown.js" integrity="sha256-y"></script>\n',
        encoding="utf-8",
    )
    assert build.vendor(html, cache) == ["jquery.flot.min.js"]
    page = (html / "index.html").read_text(encoding="utf-8")
    assert '<script src="vendor/jquery.flot.min.js" onerror="f()"></script>' in page
    assert '<script src="https://cdn.example/unknown.js" integrity="sha256-y"></script>' in page  # left alone
    copied = (html / "vendor" / "jquery.flot.min.js").read_text(encoding="utf-8")
    assert copied == "/* flot@0.8.3 package/jquery.flot.js */"
