"""Build the performance dashboard from the committed asv results: ``asv publish`` into .asv/html/, and the summary
table of docs/performance.md (docs/gen_perf_summary.py).

Needs asv and a git clone that holds ``main`` (asv orders the results along that branch); runs no benchmark. The docs
build then takes the HTML in as the site's ``dashboard/`` (the mkdocs hook docs/dashboard_hook.py), so from a clean
clone: ``python docs/build_dashboard.py && mkdocs build --strict``.

asv's page loads jQuery, flot, Bootstrap and two small plugins from public CDNs. ``--vendor`` (or
``PEFTDECL_DASHBOARD_VENDOR=1``, which the mkdocs hook reads) copies the same releases from the npm registry
(``npm pack``, cached in .asv/npm/) into the dashboard's ``vendor/`` and points the page at them, so that the site
works offline and without third-party requests.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import gen_perf_summary

ROOT = Path(__file__).resolve().parent.parent
HTML_DIR = ROOT / ".asv" / "html"
NPM_CACHE = ROOT / ".asv" / "npm"
# The file a CDN URL of asv's index.html ends in -> the npm release and the member of its tarball with that code
# (the same release as the CDN's; stupidtable 1.0.1 is not on npm, 1.1.3 keeps its API).
VENDORED: dict[str, tuple[str, str]] = {
    "jquery-3.3.1.min.js": ("jquery@3.3.1", "package/dist/jquery.min.js"),
    "jquery.flot.min.js": ("flot@0.8.3", "package/jquery.flot.js"),
    "jquery.flot.time.min.js": ("flot@0.8.3", "package/jquery.flot.time.js"),
    "jquery.flot.selection.min.js": ("flot@0.8.3", "package/jquery.flot.selection.js"),
    "jquery.flot.categories.min.js": ("flot@0.8.3", "package/jquery.flot.categories.js"),
    "jquery.flot.orderBars.js": ("flot-orderbars@1.0.0", "package/js/jquery.flot.orderBars.js"),
    "stupidtable.min.js": ("stupid-table-plugin@1.1.3", "package/stupidtable.min.js"),
    "md5.min.js": ("blueimp-md5@2.19.0", "package/js/md5.min.js"),
    "bootstrap.min.js": ("bootstrap@3.1.1", "package/dist/js/bootstrap.min.js"),
    "bootstrap.min.css": ("bootstrap@3.1.1", "package/dist/css/bootstrap.min.css"),
}
EXTERNAL = re.compile(r'(?P<attr>src|href)="(?P<url>https://[^"]+/(?P<name>[^"/]+))"(?P<rest>[^>]*)>')


def publish(html_dir: Path = HTML_DIR) -> Path:
    """Run ``asv publish`` on benchmarks/asv/results/ into ``html_dir``; return the dashboard's index.html."""
    command = [sys.executable, "-m", "asv", "publish", "--no-pull", "--html-dir", str(html_dir)]
    subprocess.run(command, cwd=ROOT, check=True)
    index = html_dir / "index.html"
    if not index.is_file():
        raise RuntimeError(f"asv publish wrote no {index}")
    return index


def npm_tarball(release: str, cache: Path = NPM_CACHE) -> Path:
    """The npm tarball of ``release`` (``name@version``), fetched with ``npm pack`` into ``cache`` once."""
    name, version = release.rsplit("@", 1)
    tarball = cache / f"{name}-{version}.tgz"
    if not tarball.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "pack", release, "--pack-destination", str(cache)], check=True, capture_output=True
        )
    return tarball


def vendor(html_dir: Path = HTML_DIR, cache: Path = NPM_CACHE) -> list[str]:
    """Point the dashboard's CDN scripts and stylesheet at copies in ``html_dir/vendor/``; return their names.

    The rewritten tags lose their ``integrity`` attribute (cdnjs serves its own minified builds of flot, md5 and
    stupidtable, other bytes than npm's) and keep working when an URL is not in VENDORED (it stays on the CDN).
    """
    index = html_dir / "index.html"
    (html_dir / "vendor").mkdir(exist_ok=True)
    copied: list[str] = []

    def local(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in VENDORED:
            return match[0]
        release, member = VENDORED[name]
        with tarfile.open(npm_tarball(release, cache)) as archive:
            source = archive.extractfile(member)
            if source is None:
                raise RuntimeError(f"{member} is not a file in {release}")
            (html_dir / "vendor" / name).write_bytes(source.read())
        copied.append(name)
        rest = re.sub(r'\s(integrity|crossorigin|referrerpolicy)="[^"]*"', "", match["rest"])
        return f'{match["attr"]}="vendor/{name}"{rest}>'

    index.write_text(EXTERNAL.sub(local, index.read_text(encoding="utf-8")), encoding="utf-8")
    return copied


def wants_vendor() -> bool:
    """PEFTDECL_DASHBOARD_VENDOR=1 asks for vendored scripts (read by the mkdocs hook too)."""
    return os.environ.get("PEFTDECL_DASHBOARD_VENDOR", "") not in ("", "0")


def build(html_dir: Path = HTML_DIR, vendored: bool = False) -> Path:
    """Publish the dashboard into ``html_dir`` (vendoring its scripts if asked); return its index.html."""
    index = publish(html_dir)
    if vendored:
        print(f"vendored: {', '.join(vendor(html_dir))}")
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--html-dir", type=Path, default=HTML_DIR, help="where asv writes (default: %(default)s)"
    )
    parser.add_argument(
        "--vendor", action="store_true", help="serve jQuery, flot, ... from the site (npm pack)"
    )
    args = parser.parse_args(argv)
    print(f"dashboard: {build(args.html_dir, args.vendor or wants_vendor())}")
    return gen_perf_summary.main([])


if __name__ == "__main__":
    raise SystemExit(main())
