"""Writing a merged model folder (``peftdecl merge``), the parts every backend's ``save_merged`` shares: which
adapters can be merged, which files of the source checkpoint travel along, and an all-or-nothing new folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from peftdecl.errors import PeftdeclError
from peftdecl.formats.atomic import fsync_dir, fsync_tree

if TYPE_CHECKING:
    from peftdecl.model import AdaptedModel

TOKENIZER_FILE_PREFIXES = (
    "tokenizer",
    "special_tokens_map",
    "added_tokens",
    "vocab",
    "merges",
    "chat_template",
)
TOKENIZER_FILE_SUFFIXES = (".model", ".tiktoken", ".jinja")
CARRIED_FILES = ("generation_config.json",)
"""Besides tokenizer files, what a merged folder copies unchanged from its source."""


def refuse_prompt_adapters(model: AdaptedModel) -> None:
    """Prompt and prefix tuning add virtual tokens, not weight changes: there is nothing to merge."""
    for name in model.active_adapters:
        if model.plan(name).prompt is not None:
            raise PeftdeclError(
                f"adapter {name!r} is {model.plan(name).kind}: prompt-learning adapters have no weights to merge "
                "into the base model (use it with --adapter instead)"
            )


def carried_files(source: Path) -> list[Path]:
    """The tokenizer files (sentencepiece models, vocabularies, templates, ...) and generation config of a
    checkpoint folder."""
    return [
        p
        for p in sorted(source.iterdir())
        if p.is_file()
        and (
            p.name.startswith(TOKENIZER_FILE_PREFIXES)
            or p.name.endswith(TOKENIZER_FILE_SUFFIXES)
            or p.name in CARRIED_FILES
        )
    ]


def check_new_folder(out: Path) -> None:
    """``out`` must be absent or an empty folder."""
    if out.is_file() or out.is_symlink():
        raise PeftdeclError(f"--out {out}: a file is in the way")
    if out.is_dir() and any(out.iterdir()):
        raise PeftdeclError(f"--out {out}: the folder exists and is not empty; merge into a new folder")


@contextmanager
def new_folder(out: Path) -> Iterator[Path]:
    """A staging folder beside ``out`` to write into; on success it is fsynced and renamed to ``out`` (absent or
    empty, checked before and again at the end), on failure removed: ``out`` appears complete or not at all."""
    check_new_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        os.chmod(stage, 0o755)
        yield stage
        fsync_tree(stage)
        check_new_folder(out)  # again: something may have appeared meanwhile
        if out.is_dir():
            out.rmdir()  # empty (checked): the rename needs the name free
        os.replace(stage, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
