"""peftdecl's native adapter layout: the spec and every tensor exactly as the adapter holds them in memory.

``peftdecl_adapter.json`` holds ``{"format": "peftdecl", "format_version": 1, "spec": {...}}`` and
``adapter.safetensors`` the tensors under their IR keys (``<module>.<tensor>``, shared tensors by bare name). Unlike
HF PEFT's files nothing is converted on the way: AdaLoRA keeps its full-rank tensors and prefix tuning keeps its
projection MLP, so training can resume where it stopped. Saves are atomic, staged like the HF ones.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt

from peftdecl.errors import AdapterFileError
from peftdecl.formats.atomic import adapter_folder, atomic_write_text, consistent_read, staged_directory
from peftdecl.formats.registry import AdapterFormat, Payload, read_config_text
from peftdecl.formats.safetensors_io import read_safetensors, write_safetensors
from peftdecl.plan.ir import ModelInfo, Plan
from peftdecl.spec import SpecBase
from peftdecl.spec.load import spec_from_dict

CONFIG_NAME = "peftdecl_adapter.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT_VERSION = 1


def is_native_adapter_dir(folder: Path) -> bool:
    """True if ``folder`` holds a native peftdecl adapter."""
    return (Path(folder) / CONFIG_NAME).is_file()


@consistent_read
def read_adapter(folder: Path) -> tuple[SpecBase, dict[str, np.ndarray]]:
    """The spec and IR-keyed tensors of one native adapter folder."""
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    text = read_config_text(config_path)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{config_path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (ValueError, RecursionError) as exc:
        raise AdapterFileError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != "peftdecl":
        raise AdapterFileError(f'{config_path}: expected {{"format": "peftdecl", ...}}')
    if document.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(
            f"{config_path}: format_version {document.get('format_version')!r} is not {FORMAT_VERSION}"
        )
    spec = spec_from_dict(document.get("spec"), f"{config_path} (spec)")
    tensors, _ = read_safetensors(folder / WEIGHTS_NAME)
    return spec, tensors


def write_adapters(
    directory: Path, payload: Payload, dtype: npt.DTypeLike, info: ModelInfo | None = None
) -> None:
    """Save ``{name: (plan, IR arrays, extra)}``: the default adapter in ``directory``, others in sub-folders."""
    del info  # the native layout needs nothing from the model
    with staged_directory(Path(directory)) as stage:
        for name, (plan, arrays, _extra) in payload.items():
            folder = adapter_folder(stage, name)
            write_safetensors(
                folder / WEIGHTS_NAME,
                {k: np.asarray(v).astype(dtype) for k, v in arrays.items()},
                {"format": "peftdecl", "kind": plan.kind},
            )
            document = {"format": "peftdecl", "format_version": FORMAT_VERSION, "spec": plan.spec.to_dict()}
            atomic_write_text(folder / CONFIG_NAME, json.dumps(document, indent=2, sort_keys=True))


def _identity(plan: Plan, tensors: Mapping[str, np.ndarray], info: ModelInfo | None) -> dict[str, np.ndarray]:
    return dict(tensors)


FORMAT = AdapterFormat(
    name="native",
    detect=is_native_adapter_dir,
    read=read_adapter,
    to_ir=_identity,
    write=write_adapters,
    weights_name=WEIGHTS_NAME,
    lossless=True,
)
"""This format's entry in :mod:`peftdecl.formats.registry`."""
