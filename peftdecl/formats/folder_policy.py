"""What a save may replace in its target folder, and what it keeps there.

A save swaps the whole folder (:mod:`peftdecl.formats.atomic`), so every entry of the old folder is either
*adapter litter*, which the new save replaces or drops, or *the user's*, which is carried into the new folder
before the swap:

* adapter litter: the adapter files of every format (:data:`ADAPTER_FILES`), temporary files of an interrupted
  older peftdecl write, a file browser's :data:`OS_FILES`, and sub-folders holding only those (old sub-adapters);
* the user's: everything else at the top level (a tokenizer, ``training_args.json``, a Trainer's
  ``checkpoint-500/``, a ``README.md``), carried over as it is: files as hard links (a copy where the file system
  has none), symbolic links as links (never followed), folders recursively.

So saving into a Trainer's output folder keeps its other files and drops only the previous adapter's, exactly
as the new save leaves no stale file of another format. A new sub-adapter whose name is taken by a folder of the
user's is refused, since the save would otherwise replace that folder. Entries created by another process while
the save runs are not carried over: do not write into a folder while saving an adapter to it.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from peftdecl.errors import AdapterFileError

ADAPTER_FILES = frozenset(
    {
        "adapter_config.json",  # HF PEFT and mlx-lm configs
        "adapter_model.safetensors",  # HF PEFT tensors
        "adapter_model.bin",  # HF PEFT's pickled tensors (never read; a stale one is dropped)
        "adapters.safetensors",  # mlx-lm tensors
        "peftdecl_adapter.json",  # native config
        "adapter.safetensors",  # native tensors
    }
)
"""The files a save writes or replaces; no other file of the target is ever dropped."""
MODEL_CARD = "README.md"
"""HF PEFT writes one beside each adapter: inside an old sub-adapter folder it goes with it; at the top level it
is carried over like any file of the user's."""
OS_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
"""Folder metadata file browsers leave in any folder they show; dropped with the old folder."""


def is_litter_file(name: str, *, in_sub_adapter: bool = False) -> bool:
    """True for a file name a save may drop: an adapter file, an OS file, an old temporary file."""
    # ".<file>.<random>.tmp": a temporary file an interrupted single-file write of an older peftdecl left
    temporary = name.startswith(".") and name.endswith(".tmp")
    return (
        name in ADAPTER_FILES
        or name in OS_FILES
        or (in_sub_adapter and name == MODEL_CARD)
        or (temporary and any(name.startswith(f".{f}.") for f in ADAPTER_FILES))
    )


def is_old_sub_adapter(folder: Path) -> bool:
    """True for a sub-folder holding nothing but adapter files (a sub-adapter an earlier save wrote)."""
    entries = list(os.scandir(folder))
    return bool(entries) and all(
        e.is_file(follow_symlinks=False) and is_litter_file(e.name, in_sub_adapter=True) for e in entries
    )


def users_entries(target: Path) -> list[str]:
    """Top-level names in ``target`` that belong to the user (kept by a save), in sorted order."""
    kept = []
    for entry in sorted(os.scandir(target), key=lambda e: e.name):
        if entry.is_symlink():
            kept.append(entry.name)
        elif entry.is_file(follow_symlinks=False):
            if not is_litter_file(entry.name):
                kept.append(entry.name)
        elif entry.is_dir(follow_symlinks=False):
            if entry.name.startswith(".") or not is_old_sub_adapter(Path(entry.path)):
                kept.append(entry.name)
        else:
            raise AdapterFileError(
                f"{entry.path}: is a device, FIFO or socket; a save replaces the whole folder and cannot keep "
                "it — move it away"
            )
    return kept


def carry_over(target: Path, stage: Path) -> None:
    """Put the user's entries of ``target`` into the staged folder ``stage`` before it replaces ``target``."""
    if not os.path.isdir(target) or os.path.islink(target):
        return
    for name in users_entries(target):
        destination = stage / name
        if os.path.lexists(destination):
            raise AdapterFileError(
                f"{target / name}: is not an adapter file or sub-adapter of this save, and the new save writes "
                f"{name!r} too; rename the adapter or move it away"
            )
        _link_tree(target / name, destination)


def _link_tree(source: Path, destination: Path) -> None:
    mode = os.lstat(source).st_mode
    if stat.S_ISLNK(mode):
        os.symlink(os.readlink(source), destination)
    elif stat.S_ISDIR(mode):
        os.mkdir(destination)
        shutil.copystat(source, destination, follow_symlinks=False)
        for entry in os.scandir(source):
            _link_tree(Path(entry.path), destination / entry.name)
    elif stat.S_ISREG(mode):
        try:
            os.link(source, destination, follow_symlinks=False)
        except OSError:  # a file system without hard links: copy, keeping times and mode
            shutil.copy2(source, destination, follow_symlinks=False)
    else:  # inside a carried folder; the top level was checked by users_entries
        raise AdapterFileError(
            f"{source}: is a device, FIFO or socket; a save cannot keep it in the replaced folder — move it away"
        )
