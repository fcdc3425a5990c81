"""HF PEFT's on-disk format: ``adapter_config.json`` + ``adapter_model.safetensors``, one folder per adapter.

File keys are ``base_model.model.<module>.<tensor>`` (the adapter name removed), shared tensors such as VeRA's
projections are ``base_model.<name>``, and prompt learning stores one ``prompt_embeddings`` table (and its
modules_to_save tensors as ``base_model.<module>.<tensor>``). The default
adapter lives in the folder itself, any other adapter ``X`` in ``<folder>/X/``. Configs are written with every
field and sorted keys; tensor metadata is exactly ``{"format": "pt"}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from peftdecl._json import JsonObject
from peftdecl.errors import AdapterFileError
from peftdecl.formats.atomic import adapter_folder, atomic_write_text, consistent_read, staged_directory
from peftdecl.formats.safetensors_io import read_safetensors, write_safetensors
from peftdecl.names import check_adapter_name
from peftdecl.plan.ir import Plan
from peftdecl.plan.targeting import IA3_DEFAULT_TARGETS, default_targets
from peftdecl.spec import SpecBase, load_spec

if TYPE_CHECKING:
    from peftdecl.formats.registry import AdapterFormat, ExtraConfig, Payload
    from peftdecl.plan.ir import ModelInfo

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MODEL_PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."
DEFAULT_ADAPTER = "default"
HF_PEFT_FORMAT_VERSION = "0.21.2"
"""The HF PEFT release whose file format this module writes (recorded as ``peft_version`` when unset)."""


def kind_markers() -> dict[str, tuple[str, ...]]:
    """peft_type -> the tensor-name fragments that identify it (its kinds' ``hf_markers``), to explain a
    config/tensor mismatch; read from :mod:`peftdecl.kinds`, so registered kinds are included."""
    from peftdecl.kinds import cached, kinds

    def build() -> dict[str, tuple[str, ...]]:
        found: dict[str, tuple[str, ...]] = {}
        for decl in kinds().values():
            found[decl.peft_type] = (*found.get(decl.peft_type, ()), *decl.hf_markers)
        return found

    return dict(cached("hf_markers", build))


def __getattr__(name: str) -> object:
    if name == "KIND_MARKERS":  # the name earlier releases exported, now computed on access
        return kind_markers()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_hf_adapter_dir(path: Path) -> bool:
    """True if ``path`` holds an HF PEFT adapter config."""
    return (Path(path) / CONFIG_NAME).is_file()


def adapter_dir(directory: Path, name: str) -> Path:
    """Where adapter ``name`` lives inside a saved folder (``name`` checked: one path component)."""
    return Path(directory) if name == DEFAULT_ADAPTER else Path(directory) / check_adapter_name(name)


def file_key(plan: Plan, key: str) -> str:
    """IR key -> HF file key. Prompt learning keeps its table's name and, having no tuner model between the
    PeftModel and the base model, saves modules_to_save tensors as ``base_model.<module>.<tensor>``."""
    if plan.prompt is not None:
        saved = any(key.startswith(module + ".") for module in plan.modules_to_save)
        return SHARED_PREFIX + key if saved else key
    if key in {p.name for p in plan.shared}:
        return SHARED_PREFIX + key
    return MODEL_PREFIX + key


def ir_key(plan_shared: set[str], key: str) -> str:
    """HF file key -> IR key (files written without a PeftModel lack the prefix; both are accepted)."""
    if key.startswith(MODEL_PREFIX):
        return key[len(MODEL_PREFIX) :]
    if key.startswith(SHARED_PREFIX) and key[len(SHARED_PREFIX) :] in plan_shared:
        return key[len(SHARED_PREFIX) :]
    return key


def config_dict(
    plan: Plan,
    extra: ExtraConfig | None = None,
    model_class: tuple[str, str] | None = None,
    model_type: str | None = None,
) -> JsonObject:
    """The ``adapter_config.json`` content PEFT would write for this plan (on a model of ``model_type``)."""
    config = plan.spec.to_dict()
    config["inference_mode"] = True
    if config.get("task_type") is None and config.get("auto_mapping") is None and model_class is not None:
        config["auto_mapping"] = {"base_model_class": model_class[0], "parent_library": model_class[1]}
    if config.get("peft_version") is None:
        config["peft_version"] = HF_PEFT_FORMAT_VERSION
    target = getattr(plan.spec, "target_modules", None)
    if isinstance(target, str) and target.lower() == "all-linear":
        # PEFT saves the expanded set of module names rather than the shorthand
        config["target_modules"] = sorted(plan.targets)
    config.update(_resolved_defaults(plan, config, model_type))
    if extra:
        config.update(extra)
    config.pop("runtime_config", None)
    return config


def _resolved_defaults(plan: Plan, config: JsonObject, model_type: str | None) -> dict[str, list[str]]:
    """The model type's default module lists where the spec left them null: PEFT writes what it resolved."""
    if plan.prompt is not None or model_type is None:
        return {}
    resolved: dict[str, list[str]] = {}
    if "target_modules" in config and config["target_modules"] is None:
        defaults = default_targets(config["peft_type"]).get(model_type)
        if defaults:
            resolved["target_modules"] = sorted(defaults)
    if plan.kind == "ia3" and config.get("feedforward_modules") is None and model_type in IA3_DEFAULT_TARGETS:
        resolved["feedforward_modules"] = sorted(IA3_DEFAULT_TARGETS[model_type][1])
    return resolved


def write_adapter(
    folder: Path,
    plan: Plan,
    arrays: Mapping[str, np.ndarray],
    *,
    dtype: npt.DTypeLike = np.float32,
    extra_config: ExtraConfig | None = None,
    model_class: tuple[str, str] | None = None,
    model_type: str | None = None,
) -> None:
    """Write one adapter's config and tensors into ``folder`` (both files replaced atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {file_key(plan, k): np.asarray(v).astype(dtype) for k, v in arrays.items()}
    write_safetensors(folder / WEIGHTS_NAME, tensors, {"format": "pt"})
    text = json.dumps(config_dict(plan, extra_config, model_class, model_type), indent=2, sort_keys=True)
    atomic_write_text(folder / CONFIG_NAME, text)


def write_adapters(
    directory: Path,
    adapters: Payload,
    *,
    dtype: npt.DTypeLike = np.float32,
    model_class: tuple[str, str] | None = None,
    model_type: str | None = None,
) -> None:
    """Save several adapters PEFT-style, replacing ``directory`` whole (see
    :func:`~peftdecl.formats.atomic.staged_directory`): a failure or a crash leaves it as it was."""
    with staged_directory(Path(directory)) as stage:
        for name, (plan, arrays, extra) in adapters.items():
            folder = adapter_folder(stage, name)
            write_adapter(
                folder,
                plan,
                arrays,
                dtype=dtype,
                extra_config=extra,
                model_class=model_class,
                model_type=model_type,
            )


@consistent_read
def read_adapter(folder: Path) -> tuple[SpecBase, dict[str, np.ndarray]]:
    """The spec and the tensors (file keys) of one saved adapter folder."""
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterFileError(f"{folder}: no {CONFIG_NAME} (not an HF PEFT adapter folder)")
    spec = load_spec(config_path)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise AdapterFileError(
                f"{folder}: only adapter_model.bin (a pickle) is present; peftdecl reads safetensors only — "
                "re-save with safe_serialization=True"
            )
        raise AdapterFileError(f"{folder}: no {WEIGHTS_NAME}")
    tensors, _ = read_safetensors(weights)
    check_kind(spec, tensors, weights)
    return spec, tensors


def check_kind(spec: SpecBase, tensors: Mapping[str, np.ndarray], origin: Path) -> None:
    """Refuse a config whose ``peft_type`` the tensor names contradict."""
    if not tensors:
        raise AdapterFileError(f"{origin}: the file holds no tensors")
    markers = kind_markers()
    expected = markers.get(spec.peft_type, ())
    if any(marker in key for key in tensors for marker in expected):
        return
    seen = [kind for kind, found in markers.items() if any(m in k for k in tensors for m in found)]
    sample = ", ".join(sorted(tensors)[:3])
    raise AdapterFileError(
        f"{origin}: the config says {spec.peft_type} but the tensors ({sample}, ...) are "
        f"{' or '.join(seen) if seen else 'of no known adapter kind'}"
    )


def to_ir_arrays(plan: Plan, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """File keys -> IR keys for a plan."""
    shared = {p.name for p in plan.shared}
    if plan.prompt is not None:  # see file_key
        return {k.removeprefix(MODEL_PREFIX).removeprefix(SHARED_PREFIX): v for k, v in tensors.items()}
    return {ir_key(shared, k): v for k, v in tensors.items()}


def _write_for_registry(
    directory: Path, payload: Payload, dtype: npt.DTypeLike, info: ModelInfo | None
) -> None:
    write_adapters(
        directory,
        payload,
        dtype=dtype,
        model_class=None if info is None else info.model_class,
        model_type=None if info is None else info.model_type,
    )


def _format() -> AdapterFormat:
    from peftdecl.formats.registry import AdapterFormat

    return AdapterFormat(
        name="hf",
        detect=is_hf_adapter_dir,
        read=read_adapter,
        to_ir=lambda plan, tensors, info: to_ir_arrays(plan, tensors),
        write=_write_for_registry,
        weights_name=WEIGHTS_NAME,
    )


FORMAT = _format()
"""This format's entry in :mod:`peftdecl.formats.registry`."""
