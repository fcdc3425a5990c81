"""Summarise a saved adapter folder without a model: format, kind, targets, ranks, parameter count, dtypes.

Every format ``load_adapter`` reads (HF PEFT, mlx-lm, peftdecl's native layout) is read through the format
registry, so inspect parses nothing itself. A key is split into (module, tensor) at its first dotted component
that starts with an adapter tensor prefix; the prefixes come from each registered kind's ``tensor_names``
(:mod:`peftdecl.kinds`) and mlx-lm's leaves from ``mlx_lm.LEAVES``, so no second table of tensor names exists
here, and the rank column is the kind's own ``rank`` reading. ``<module>.base_layer.weight`` (the copy of an
adapted embedding PEFT saves) is listed under its module. Keys with no such component (VeRA's projections,
prompt tables, modules_to_save copies) are listed as shared tensors.
"""

from __future__ import annotations

import math
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from peftdecl.errors import AdapterFileError
from peftdecl.formats import hf_peft, mlx_lm
from peftdecl.formats.registry import AdapterFormat, detect_format, is_adapter_dir
from peftdecl.kinds import cached, kinds
from peftdecl.spec import SpecBase

FORMAT_FILES = {
    "hf": "HF PEFT: adapter_config.json + adapter_model.safetensors",
    "mlx-lm": "mlx-lm: adapter_config.json + adapters.safetensors",
    "native": "peftdecl native: peftdecl_adapter.json + adapter.safetensors",
}
MAX_SUB_ADAPTERS = 1000
"""Sub-folders inspected at most (a folder with more is refused rather than walked for minutes)."""


def tensor_prefixes() -> tuple[str, ...]:
    """``lora_``, ``hada_``, ``oft_``, …: the start of every per-layer tensor name of every registered kind (the
    part of its first component up to the first ``_``)."""

    def build() -> tuple[str, ...]:
        names = (name for decl in kinds().values() for name in decl.tensor_names)
        return tuple(sorted({name.split(".", 1)[0].split("_", 1)[0] + "_" for name in names}))

    return cached("tensor_prefixes", build)


BASE_LAYER = "base_layer"
"""The component under which PEFT saves a wrapped module's own weight (an adapted embedding's copy)."""


@dataclass(frozen=True)
class AdapterSummary:
    """What ``peftdecl inspect`` prints for one adapter folder."""

    folder: Path
    format: str
    spec: SpecBase
    modules: dict[str, dict[str, tuple[int, ...]]]
    """Adapted module -> tensor name (as the file names it) -> shape."""
    shared: dict[str, tuple[int, ...]]
    num_parameters: int
    dtypes: tuple[str, ...]
    name: str = "default"
    """The adapter's name: ``default`` for the folder itself, the sub-folder's name otherwise."""


def split_key(key: str, file_format: str) -> tuple[str, str] | None:
    """(module, tensor) of a file key in ``file_format``, or None for a tensor that belongs to no module."""
    if file_format == "mlx-lm":
        module, _, leaf = key.rpartition(".")
        return (module, leaf) if module and leaf in mlx_lm.LEAVES else None
    if file_format == "hf" and not key.startswith(hf_peft.MODEL_PREFIX):
        return None  # base_model.<name> (VeRA's projections), prompt tables, prompt learning's saved modules
    parts = key.removeprefix(hf_peft.MODEL_PREFIX).split(".")
    prefixes = tensor_prefixes()
    for index in range(1, len(parts)):
        if parts[index].startswith(prefixes) or parts[index] == BASE_LAYER:
            return ".".join(parts[:index]), ".".join(parts[index:])
    return None


def _check_folder(folder: Path) -> None:
    try:
        mode = folder.stat().st_mode
    except FileNotFoundError:
        raise AdapterFileError(f"{folder}: no such folder") from None
    except (OSError, ValueError) as exc:  # a name too long, a loop of links, a NUL byte, no permission
        raise AdapterFileError(
            f"{folder}: cannot be read ({getattr(exc, 'strerror', None) or exc})"
        ) from None
    if not stat.S_ISDIR(mode):
        raise AdapterFileError(f"{folder}: not a folder (inspect reads an adapter folder)")


def summarise(folder: Path, name: str = "default") -> AdapterSummary:
    """Read the one adapter saved in ``folder`` (any format ``load_adapter`` reads)."""
    folder = Path(folder)
    _check_folder(folder)
    file_format: AdapterFormat = detect_format(folder)
    spec, tensors = file_format.read(folder)
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    shared: dict[str, tuple[int, ...]] = {}
    for key, value in sorted(tensors.items()):
        shape = tuple(int(n) for n in np.shape(value))
        split = split_key(key, file_format.name)
        if split is None:
            shared[key.removeprefix(hf_peft.MODEL_PREFIX).removeprefix(hf_peft.SHARED_PREFIX)] = shape
        else:
            modules.setdefault(split[0], {})[split[1]] = shape
    dtypes = tuple(sorted({str(np.asarray(v).dtype) for v in tensors.values()}))
    count = sum(math.prod(np.shape(v)) for v in tensors.values())
    return AdapterSummary(folder, file_format.name, spec, modules, shared, count, dtypes, name)


def sub_adapters(folder: Path) -> list[tuple[str, Path]]:
    """(name, folder) of every non-default adapter saved beside the default one (one sub-folder each)."""
    folder = Path(folder)
    _check_folder(folder)
    found = []
    for index, child in enumerate(sorted(folder.iterdir())):
        if index >= MAX_SUB_ADAPTERS:
            raise AdapterFileError(f"{folder}: more than {MAX_SUB_ADAPTERS} entries; not an adapter folder")
        if child.is_dir() and not child.is_symlink() and is_adapter_dir(child):
            found.append((child.name, child))
    return found


def summarise_all(folder: Path) -> list[AdapterSummary]:
    """The default adapter saved in ``folder`` (if any) and every sub-adapter, default first."""
    folder = Path(folder)
    _check_folder(folder)
    subs = sub_adapters(folder)
    # without sub-adapters the folder itself must be one: summarise lets detect_format say what it lacks
    own = [summarise(folder)] if not subs or is_adapter_dir(folder) else []
    return own + [summarise(path, name) for name, path in subs]


def rank_of(spec: SpecBase, shapes: Mapping[str, tuple[int, ...]]) -> str:
    """What the rank column shows for one module: the kind's own ``rank`` reading of its tensor shapes (the
    rank, or OFT/BOFT's block layout), ``-`` when the kind has none or is not registered here."""
    decl = kinds().get(spec.kind)
    found = None if decl is None else decl.rank(shapes, spec)
    return "-" if found is None else found


def _targets_line(spec: SpecBase, modules: Mapping[str, object]) -> str:
    wanted = getattr(spec, "target_modules", None)
    if hasattr(spec, "num_virtual_tokens"):  # prompt learning adapts no layer
        return f"targets     none ({spec.num_virtual_tokens} virtual tokens)"
    listed = wanted if isinstance(wanted, str) or wanted is None else sorted(wanted)
    return f"targets     {len(modules)} modules (target_modules: {listed})"


def format_summary(summary: AdapterSummary) -> str:
    """The table ``peftdecl inspect`` prints for one adapter."""
    spec = summary.spec
    lines = [
        f"adapter     {summary.name}",
        f"folder      {summary.folder}",
        f"format      {FORMAT_FILES.get(summary.format, summary.format)}",
        f"kind        {spec.peft_type}" + (" (DoRA)" if getattr(spec, "use_dora", False) else ""),
        _targets_line(spec, summary.modules),
        f"parameters  {summary.num_parameters:,}",
        f"dtype       {', '.join(summary.dtypes)}",
    ]
    if summary.modules:
        width = max(len(m) for m in summary.modules)
        lines.append("")
        lines.append(f"{'module':<{width}}  rank  tensors")
        for module, shapes in summary.modules.items():
            tensors = ", ".join(f"{k} {list(v)}" for k, v in shapes.items())
            lines.append(f"{module:<{width}}  {rank_of(spec, shapes):>4}  {tensors}")
    for name, shape in summary.shared.items():
        lines.append(f"shared      {name} {list(shape)}")
    return "\n".join(lines)
