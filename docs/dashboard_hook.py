"""mkdocs hook: put the asv dashboard (.asv/html/, written by docs/build_dashboard.py) into the site as ``dashboard/``.

The files are added to mkdocs' file collection rather than copied after the build, so that links and the nav entry
to ``dashboard/index.html`` resolve under ``--strict``. When .asv/html/ is missing the hook publishes it first (that
needs asv); without asv it warns, which fails a strict build with the command that fixes it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import build_dashboard  # a sibling script: importable while mkdocs loads this hook (docs/ is on sys.path then)
from mkdocs.structure.files import File, Files

HTML_DIR = build_dashboard.HTML_DIR
SITE_SUBDIR = "dashboard"
log = logging.getLogger("mkdocs.hooks.dashboard")


def ensure_published(html_dir: Path = HTML_DIR) -> bool:
    """True when ``html_dir`` holds a dashboard, publishing it from the committed results if needed."""
    if (html_dir / "index.html").is_file():
        return True
    try:
        build_dashboard.build(html_dir, build_dashboard.wants_vendor())
    except Exception as exc:  # asv missing, a git clone without main, ...: say so, and strict mode stops
        log.warning("no asv dashboard (%s); run: pip install asv && python docs/build_dashboard.py", exc)
        return False
    return True


def on_files(files: Files, config: Any, **kwargs: Any) -> Files:
    """Add every file of the published dashboard under ``dashboard/`` in the site."""
    if not ensure_published():
        return files
    for path in sorted(p for p in HTML_DIR.rglob("*") if p.is_file()):
        relative = path.relative_to(HTML_DIR).as_posix()
        files.append(File.generated(config, f"{SITE_SUBDIR}/{relative}", abs_src_path=str(path)))
    return files
