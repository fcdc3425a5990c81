"""Adapter file formats by name: each knows how to recognise a folder, read it and write adapters into one.

``read(folder) -> (spec, tensors)`` returns the file's tensors under the format's own keys; ``to_ir(plan, tensors,
info)`` turns them into IR keys once the spec is compiled against a model; ``write(directory, payload, dtype,
info)`` saves ``{name: (plan, IR arrays, extra config fields)}``, the default adapter in ``directory`` itself and
any other adapter ``X`` in ``directory/X``.
"""

from __future__ import annotations

import glob
import importlib
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from peftdecl.errors import AdapterFileError, PeftdeclError
from peftdecl.plan.ir import ModelInfo, Plan
from peftdecl.spec import SpecBase

ExtraConfig = Mapping[str, object]
"""Fields added to a saved adapter config (JSON values), e.g. AdaLoRA's trained ``rank_pattern``."""

Payload = Mapping[str, tuple[Plan, Mapping[str, np.ndarray], ExtraConfig | None]]
"""Adapter name -> (its plan, its IR arrays, extra config fields): what a format's ``write`` saves."""


@dataclass(frozen=True)
class AdapterFormat:
    """One on-disk adapter format."""

    name: str
    detect: Callable[[Path], bool]
    read: Callable[[Path], tuple[SpecBase, dict[str, np.ndarray]]]
    to_ir: Callable[[Plan, Mapping[str, np.ndarray], ModelInfo | None], dict[str, np.ndarray]]
    write: Callable[[Path, Payload, npt.DTypeLike, ModelInfo | None], None]
    weights_name: str
    """The tensor file inside an adapter folder (named in errors)."""
    lossless: bool = False
    """True if the format stores the adapter exactly as it lives in memory, so the kinds' to_file/from_file
    conversions (AdaLoRA pruning, prefix projection tables) are skipped."""


# format name -> module defining FORMAT; checked in this order when detecting (the first match wins)
_FORMAT_MODULES = {
    "native": "peftdecl.formats.native",
    "mlx-lm": "peftdecl.formats.mlx_lm",
    "hf": "peftdecl.formats.hf_peft",
}


def formats() -> dict[str, AdapterFormat]:
    """Format name -> format, importing each format module on first use."""
    found: dict[str, AdapterFormat] = {}
    for name, module in _FORMAT_MODULES.items():
        fmt = importlib.import_module(module).FORMAT
        assert isinstance(fmt, AdapterFormat), module
        found[name] = fmt
    return found


MAX_CONFIG_BYTES = 16 * 1024 * 1024
"""The largest adapter config read (real ones are a few kB)."""


def read_config_text(path: Path) -> str:
    """The UTF-8 text of a config file: a regular file of at most :data:`MAX_CONFIG_BYTES`, else an error."""
    try:
        with open(path, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise AdapterFileError(f"{path}: not a regular file")
            if info.st_size > MAX_CONFIG_BYTES:
                raise AdapterFileError(f"{path}: {info.st_size} bytes; a config may have {MAX_CONFIG_BYTES}")
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise AdapterFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterFileError(f"{path}: over {MAX_CONFIG_BYTES} bytes; too large for a config")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AdapterFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def get_format(name: str) -> AdapterFormat:
    """The format called ``name`` (``"hf"``, ``"mlx-lm"``)."""
    known = formats()
    if name not in known:
        raise PeftdeclError(f"unknown adapter format {name!r}; known formats: {', '.join(known)}")
    return known[name]


def is_adapter_dir(folder: Path) -> bool:
    """True if ``folder`` holds an adapter in any known format."""
    return any(_detects(fmt, Path(folder)) for fmt in formats().values())


def _detects(fmt: AdapterFormat, folder: Path) -> bool:
    # a path the OS cannot even look up (too long, a NUL byte, no permission) is no adapter folder, said cleanly
    try:
        return fmt.detect(folder)
    except (OSError, ValueError) as exc:
        raise AdapterFileError(f"{folder!s:.300}: cannot be read as an adapter folder ({exc})") from None


def detect_format(folder: Path) -> AdapterFormat:
    """The format of the adapter saved in ``folder``."""
    folder = Path(folder)
    for fmt in formats().values():
        if _detects(fmt, folder):
            return fmt
    if not folder.is_dir():
        moved = sorted(folder.parent.glob(f".{glob.escape(folder.name)}.peftdecl-old-*"))
        if moved:  # the two-rename swap (no renameat2) was interrupted between its renames
            raise AdapterFileError(
                f"{folder}: no such adapter folder; an interrupted save left the previous adapter in {moved[-1]} "
                "(the next save of this folder, or peftdecl.formats.atomic.recover(folder), puts it back)"
            )
        raise AdapterFileError(f"{folder}: no such adapter folder")
    raise AdapterFileError(
        f"{folder}: not an adapter folder (expected adapter_config.json with adapter_model.safetensors for HF PEFT, "
        "adapters.safetensors for mlx-lm, or peftdecl_adapter.json for peftdecl's native format)"
    )
