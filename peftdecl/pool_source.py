"""Where an :class:`peftdecl.pool.AdapterPool` finds its adapters, and reading one off the forward path.

A source is a directory (adapter ``name`` = its sub-folder ``name``) or a callable resolver ``name -> folder``.
:func:`read_pooled_adapter` turns a folder into the spec and IR arrays that ``AdaptedModel.add_adapter(name, spec,
arrays=...)`` attaches: files are read, converted and validated here, without touching the model's adapters, so
that the pool can do it outside the lock that serialises forwards. Only adapters that leave the shared base model
alone and run in mixed batches are accepted (no modules_to_save, base-weight overrides, PiSSA-style residuals,
layer replication or prompt learning): a pool serves many adapters from one unchanged base.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from peftdecl.adapter_files import is_base_override
from peftdecl.errors import AdapterFileError, PeftdeclError
from peftdecl.formats.registry import detect_format, is_adapter_dir
from peftdecl.init import check_arrays
from peftdecl.lora_init import weight_initialised
from peftdecl.names import check_adapter_name
from peftdecl.plan import compile_plan
from peftdecl.plan.compile import layouts
from peftdecl.spec import SpecBase

if TYPE_CHECKING:
    from peftdecl.model import AdaptedModel

Resolver = Callable[[str], str | Path]
"""Adapter name -> the folder holding that adapter."""

AdapterSource = str | Path | Resolver
"""A directory whose sub-folders are adapters, or a :data:`Resolver`."""


@dataclass(frozen=True)
class PooledAdapter:
    """An adapter read from ``folder`` and ready to attach: its spec and its IR arrays (float, NumPy)."""

    name: str
    folder: Path
    spec: SpecBase
    arrays: dict[str, np.ndarray]


def resolve_folder(source: AdapterSource, name: str) -> Path:
    """The folder of adapter ``name``: ``source/name`` for a directory, ``source(name)`` for a resolver."""
    check_adapter_name(name)  # before it becomes a path: "../x" must not reach a sibling folder
    if callable(source):
        found = source(name)
        if not isinstance(found, (str, Path)):
            raise PeftdeclError(
                f"adapter {name!r}: the pool's resolver returned {found!r}, expected a folder path"
            )
        return Path(found)
    folder = Path(source) / name
    if not is_adapter_dir(folder):
        raise AdapterFileError(
            f"adapter {name!r}: {folder} is not an adapter folder (the pool's directory is {source})"
        )
    return folder


def read_pooled_adapter(model: AdaptedModel, name: str, folder: Path) -> PooledAdapter:
    """Read, convert and check the adapter saved in ``folder`` for ``model`` as ``name``; attaches nothing."""
    file_format = detect_format(folder)
    spec, tensors = file_format.read(folder)
    origin = folder / file_format.weights_name
    if getattr(spec, "layer_replication", None):
        raise _refused(name, folder, "it replicates decoder layers (layer_replication)")
    plan = compile_plan(spec, model.info, name)
    if plan.prompt is not None or not plan.layers:
        raise _refused(name, folder, f"it is {plan.kind}, and mixed batches take layer adapters")
    mixed = set(model.backend.capabilities.mixed_batch)
    for kind in sorted({lp.kind for lp in plan.layers} - mixed):
        raise _refused(name, folder, f"its {kind} layers do not run in mixed batches on {model.backend.name}")
    if plan.modules_to_save:
        raise _refused(name, folder, f"it saves whole modules ({', '.join(plan.modules_to_save)})")
    arrays = file_format.to_ir(plan, tensors, model.info)
    overrides = sorted(k for k in arrays if is_base_override(model.info, plan, k))
    if overrides:
        raise _refused(name, folder, f"it overrides base weights ({', '.join(overrides[:3])})")
    layout = layouts()[plan.kind]
    if layout.from_file is not None and not file_format.lossless:
        try:
            arrays = layout.from_file(plan, arrays)
        except AdapterFileError as exc:
            raise AdapterFileError(f"{origin}: {exc}") from exc
    check_arrays(plan, arrays, origin=str(origin))
    residuals = weight_initialised(plan, {}, model.engine.base_weight, model=model.base_model)[1]
    if residuals:
        raise _refused(name, folder, "its initialisation rewrites the base weights (e.g. PiSSA, OLoRA)")
    return PooledAdapter(name, folder, spec, arrays)


def _refused(name: str, folder: Path, why: str) -> PeftdeclError:
    return PeftdeclError(f"adapter {name!r} ({folder}) cannot be served from a pool: {why}")
