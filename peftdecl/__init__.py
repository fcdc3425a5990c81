"""peftdecl: declarative, backend-neutral parameter-efficient fine-tuning adapters, file-compatible with HF PEFT.

spec = peftdecl.load_spec("adapter.yaml")
model = peftdecl.attach(base_model, spec)
model.save("out/")
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from peftdecl.adapter_book import AdapterBook
from peftdecl.arrow import create_arrow_model
from peftdecl.backend import Backend, BackendEntry, Capabilities, Engine, backend_for, get_backend
from peftdecl.backend import backends as _backends
from peftdecl.errors import AdapterFileError, BackendError, PeftdeclError, SpecError, TargetError
from peftdecl.inits.corda_preprocess import preprocess_corda
from peftdecl.inits.eva_model import get_eva_state_dict, initialize_lora_eva_weights
from peftdecl.inits.loftq_replace import replace_lora_weights_loftq
from peftdecl.inits.lora_ga import preprocess_loraga
from peftdecl.model import AdaptedModel
from peftdecl.options import EngineOptions
from peftdecl.peft_compat import NotSupportedError
from peftdecl.plan import ModelInfo, Plan, compile_plan
from peftdecl.pool import AdapterPool
from peftdecl.spec import AdapterSpec, load_spec
from peftdecl.spec.load import SpecSource

__version__ = "0.1.0"


def backends() -> dict[str, BackendEntry]:
    """Installed backends and what each supports; no backend's framework (torch, MLX) is imported."""
    return _backends()


def _resolve_backend(base_model: object, backend: str | Backend | None) -> Backend:
    if backend is None:
        return backend_for(base_model)
    if isinstance(backend, str):
        return get_backend(backend)
    return backend


def _adapted(
    base_model: object,
    backend: str | Backend | None,
    engine_options: Mapping[str, object] | None,
    options: Mapping[str, object],
) -> AdaptedModel:
    return AdaptedModel.create(_resolve_backend(base_model, backend), base_model, engine_options, **options)


def attach(
    base_model: object,
    spec: SpecSource | object,
    name: str = "default",
    backend: str | Backend | None = None,
    *,
    seed: int = 0,
    engine_options: Mapping[str, object] | None = None,
    **options: object,
) -> AdaptedModel:
    """Attach a freshly initialised adapter described by ``spec`` to ``base_model``.

    ``base_model`` is a torch ``nn.Module``, an ``mlx.nn.Module``, or (NumPy reference) a mapping of parameter
    names to arrays, with ``layer_types={module: type}`` where a 2-D weight is not a Linear. ``seed`` fixes the
    initial numbers, identical on every backend. ``engine_options={...}`` sets
    :class:`peftdecl.options.EngineOptions` fields (e.g. ``{"seed": 1, "fused": False}``); each defaults to its
    ``PEFTDECL_<NAME>`` environment variable.
    """
    model = _adapted(base_model, backend, engine_options, options)
    model.add_adapter(name, spec, seed=seed, activate=True)
    return model


def load_adapter(
    base_model: object,
    directory: str | Path,
    name: str = "default",
    backend: str | Backend | None = None,
    *,
    is_trainable: bool = False,
    adapter_name: str | None = None,
    engine_options: Mapping[str, object] | None = None,
    **options: object,
) -> AdaptedModel:
    """Attach an adapter saved by HF PEFT or peftdecl (format detected from the folder).

    As HF PEFT's ``PeftModel.from_pretrained``: the adapter is for inference (frozen, the model in eval mode)
    unless ``is_trainable=True``, which gives a trainable adapter and leaves the model's mode as it is. PEFT's
    keyword ``adapter_name`` is accepted for ``name``; ``engine_options`` as for :func:`attach`."""
    if adapter_name is not None:
        if name != "default":
            raise TypeError("load_adapter() got 'name' and PEFT's 'adapter_name' for the same argument")
        name = adapter_name
    model = _adapted(base_model, backend, engine_options, options)
    model.load_adapter(directory, name, is_trainable, activate=True)
    return model


__all__ = [
    "AdaptedModel",
    "AdapterBook",
    "AdapterFileError",
    "AdapterPool",
    "AdapterSpec",
    "Backend",
    "BackendEntry",
    "BackendError",
    "Capabilities",
    "Engine",
    "EngineOptions",
    "ModelInfo",
    "NotSupportedError",
    "PeftdeclError",
    "Plan",
    "SpecError",
    "TargetError",
    "__version__",
    "attach",
    "backends",
    "compile_plan",
    "create_arrow_model",
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "load_adapter",
    "load_spec",
    "preprocess_corda",
    "preprocess_loraga",
    "replace_lora_weights_loftq",
]
