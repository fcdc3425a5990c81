"""Training checkpoints ``output_dir/checkpoint-STEP/``, written atomically: a reader (or a resumed run) sees a
complete checkpoint or none, never a part, and a killed run leaves the previous checkpoints intact.

A checkpoint folder holds the adapter in HF PEFT format (``adapter_config.json``, ``adapter_model.safetensors``:
``peft.PeftModel.from_pretrained(checkpoint-STEP)`` loads it), ``training_state.safetensors`` (optimizer moments,
RNG states, the live adapter arrays: NumPy tensors, no pickle) and ``trainer_state.json`` (the JSON state, the step
and :data:`FORMAT_VERSION`). It is built inside a hidden work folder ``.peftdecl-checkpoint-<random>`` of
``output_dir``, fsynced, and renamed into place; an existing ``checkpoint-STEP`` is swapped with it in one step
(see :mod:`peftdecl.formats.atomic`). Leftover work folders of a killed run are removed by
:func:`clean_stale_temporaries`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from peftdecl._json import JsonObject
from peftdecl.errors import PeftdeclError
from peftdecl.formats.atomic import OLD, atomic_write_text, fsync_dir, fsync_tree, recover, swap_into_place
from peftdecl.formats.safetensors_io import read_safetensors, write_safetensors

FORMAT_VERSION = 1
"""Version of the checkpoint layout, recorded in ``trainer_state.json`` as ``checkpoint_format``."""
TENSORS_FILE = "training_state.safetensors"
STATE_FILE = "trainer_state.json"
PREFIX = "checkpoint-"
WORK_PREFIX = ".peftdecl-checkpoint-"
"""Hidden work folders (a checkpoint being built, one being pruned) start with this."""
_NAME = re.compile(r"checkpoint-(\d+)")


def checkpoint_step(folder: Path) -> int | None:
    """STEP of a folder named ``checkpoint-STEP``; None for any other name."""
    match = _NAME.fullmatch(Path(folder).name)
    return int(match.group(1)) if match else None


def write_checkpoint(
    output_dir: Path,
    step: int,
    write_adapter: Callable[[Path], None],
    tensors: Mapping[str, np.ndarray],
    state: JsonObject,
) -> Path:
    """Write ``output_dir/checkpoint-{step}`` atomically and return it.

    ``write_adapter(folder)`` writes the adapter files into ``folder`` (``AdaptedModel.save`` does: it may replace
    the folder whole, which is why it runs first, in a folder of its own); then ``tensors`` go to
    ``training_state.safetensors`` and ``state`` (plus ``step`` and ``checkpoint_format``) to
    ``trainer_state.json``. If anything fails, no ``checkpoint-*`` changes."""
    if "step" in state and state["step"] != step:
        raise ValueError(f"state['step'] is {state['step']!r} but the checkpoint is of step {step}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / f"{PREFIX}{step}"
    work = output_dir / f"{WORK_PREFIX}{secrets.token_hex(8)}"
    os.mkdir(work)
    try:
        built = work / target.name  # the adapter's save may lock, stage and swap: all of it inside ``work``
        os.mkdir(built)
        write_adapter(built)
        if not built.is_dir():
            raise PeftdeclError(f"{built}: the adapter writer left no folder behind")
        write_safetensors(built / TENSORS_FILE, tensors, {"format": "peftdecl-checkpoint"})
        record = {**state, "step": step, "checkpoint_format": FORMAT_VERSION}
        atomic_write_text(built / STATE_FILE, json.dumps(record, indent=1, allow_nan=True) + "\n")
        fsync_tree(built)
        swap_into_place(
            built, target
        )  # afterwards ``built`` holds the replaced checkpoint of this step, if there was one
        fsync_dir(output_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def read_checkpoint(folder: Path) -> tuple[dict[str, np.ndarray], JsonObject]:
    """A checkpoint's tensors and its ``trainer_state.json`` object; a missing or corrupt file is a
    :class:`PeftdeclError` naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PeftdeclError(f"{folder}: is not a checkpoint folder (no such folder)")
    state_path, tensors_path = folder / STATE_FILE, folder / TENSORS_FILE
    try:
        text = state_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PeftdeclError(f"{state_path}: missing; {folder} is not a complete checkpoint") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PeftdeclError(f"{state_path}: cannot be read ({exc})") from None
    try:
        state = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PeftdeclError(f"{state_path}: is not valid JSON ({exc})") from None
    _check_state(state_path, state)
    if not tensors_path.exists():
        raise PeftdeclError(f"{tensors_path}: missing; {folder} is not a complete checkpoint")
    try:
        tensors, _metadata = read_safetensors(tensors_path, floats_only=False)
    except PeftdeclError as exc:  # already names the file; say what it is
        raise PeftdeclError(f"checkpoint training state: {exc}") from None
    return tensors, state


def _check_state(path: Path, state: object) -> None:
    if not isinstance(state, dict):
        raise PeftdeclError(f"{path}: must hold a JSON object, not {type(state).__name__}")
    version = state.get("checkpoint_format")
    if version != FORMAT_VERSION:
        raise PeftdeclError(
            f"{path}: checkpoint_format is {version!r}; this peftdecl reads version {FORMAT_VERSION}"
        )
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise PeftdeclError(f"{path}: 'step' must be a non-negative integer, not {step!r}")


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """``(STEP, folder)`` of every complete ``checkpoint-STEP`` folder (both state files present), by step."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for entry in os.scandir(output_dir):
        step = checkpoint_step(Path(entry.name))
        if step is None or not entry.is_dir(follow_symlinks=False):
            continue
        folder = Path(entry.path)
        if (folder / STATE_FILE).is_file() and (folder / TENSORS_FILE).is_file():
            found.append((step, folder))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint with the highest STEP, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def prune_checkpoints(output_dir: Path, keep: int | None) -> list[Path]:
    """Remove the oldest complete checkpoints (lowest STEP) beyond ``keep``; return the removed folders.

    The most recently written checkpoint (newest ``trainer_state.json``) is always kept, even when a run resumed
    from an earlier checkpoint left others of a higher STEP behind. ``keep`` None: remove nothing."""
    if keep is None:
        return []
    found = complete_checkpoints(output_dir)
    if len(found) <= max(keep, 1):
        return []
    newest = max(found, key=lambda item: ((item[1] / STATE_FILE).stat().st_mtime_ns, item[0]))
    removable = [folder for step, folder in found if (step, folder) != newest]
    removed = removable[: len(found) - max(keep, 1)]
    for folder in removed:
        # out of sight first, so that a crash mid-removal never leaves a half-deleted checkpoint-STEP
        trash = folder.parent / f"{WORK_PREFIX}{secrets.token_hex(8)}"
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)
    if removed:
        fsync_dir(Path(output_dir))
    return removed


def clean_stale_temporaries(output_dir: Path) -> list[Path]:
    """Remove what a killed run's checkpoint writes left in ``output_dir`` (work folders, a checkpoint moved aside
    by a two-rename swap is put back first); return the entries removed."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    removed = []
    for entry in sorted(os.scandir(output_dir), key=lambda e: e.name):
        name = entry.name
        if name.startswith(WORK_PREFIX):
            removed.append(Path(entry.path))
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
        elif name.startswith(f".{PREFIX}") and f".{OLD}" in name:
            # ``.checkpoint-STEP.peftdecl-old-<random>``: a swap without RENAME_EXCHANGE was interrupted
            target = output_dir / name[1:].split(f".{OLD}", 1)[0]
            if checkpoint_step(target) is not None:
                recover(target)
                removed.append(Path(entry.path))
    return removed
