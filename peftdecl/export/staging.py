"""Writing an export file all at once: files are built in a staging folder beside the target, then renamed into
place, so the target (and its companions, e.g. ONNX external data) appears complete or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from peftdecl.errors import PeftdeclError
from peftdecl.formats.atomic import fsync_dir


def check_new_files(paths: Sequence[Path]) -> None:
    """Each of ``paths`` must be absent: an export never overwrites."""
    for path in paths:
        if path.exists() or path.is_symlink():
            raise PeftdeclError(f"--out {paths[0]}: {path} exists; export to a new path")


@contextmanager
def staged_files(out: Path, companions: Sequence[str] = ()) -> Iterator[Path]:
    """A staging folder beside ``out`` to write ``out.name`` (and the ``companions`` file names) into; on success
    the companions, then ``out`` itself, are fsynced and renamed into place; on failure the folder is removed."""
    out = Path(out)
    targets = [out, *(out.parent / name for name in companions)]
    check_new_files(targets)
    if out.name in ("", ".", ".."):
        raise PeftdeclError(f"--out {out}: expected a file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield stage
        check_new_files(targets)  # again: something may have appeared meanwhile
        # companions first: the main file, which names them, appears last
        for target in (*targets[1:], targets[0]):
            staged = stage / target.name
            if not staged.exists():
                continue
            with open(staged, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(staged, target)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
