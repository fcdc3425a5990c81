"""``preprocess_corda``: HF PEFT's CorDA preprocessing for peftdecl models, before the adapter is attached.

PEFT's recipe ``preprocess_corda(model, lora_config, run_model=...)`` then ``get_peft_model(model, lora_config)``
becomes ``peftdecl.preprocess_corda(model, spec, run_model=...)`` then ``peftdecl.attach(model, spec)`` (or, on an
already adapted model, ``adapted.add_adapter(name, spec)``). The covariances are collected by the model's backend
(torch: forward hooks while ``run_model()`` runs the calibration data); the triplets are computed by
:mod:`peftdecl.inits.corda` and kept for ``model`` (:mod:`peftdecl.inits`) until the adapter is attached.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from peftdecl.errors import BackendError, TargetError
from peftdecl.inits import remember
from peftdecl.inits.corda import CordaEigens, corda_settings, corda_targets, eigens_for_plan
from peftdecl.lora_init import check_weight_init_layer
from peftdecl.plan import ModelInfo, Plan, compile_plan
from peftdecl.spec import load_spec


def _model_parts(model: object) -> tuple[object, ModelInfo, Callable[[str], np.ndarray], bool]:
    """(base model, its inventory, base weight in IR layout by module, whether it is a torch model)."""
    from peftdecl.backend import backend_for
    from peftdecl.model import AdaptedModel

    if isinstance(model, AdaptedModel):
        base = model.get_base_model()
        return base, model.info, model.engine.base_weight, model.backend.name == "torch"
    backend = backend_for(model)
    info = backend.inventory(model)
    if backend.name == "torch":
        ir_weight = _torch_calibration().ir_weight
        return model, info, lambda module: ir_weight(model, module), True
    if isinstance(model, Mapping):
        return model, info, lambda module: np.asarray(model[f"{module}.weight"], dtype=np.float64), False
    raise BackendError(
        f"preprocess_corda: a {type(model).__name__} model is not supported; pass a torch model, an "
        "AdaptedModel, or (NumPy reference) a state mapping with covariances="
    )


def preprocess_corda(
    model: object,
    lora_config: object,
    run_model: Callable[[], object] | None = None,
    hooked_model: object = None,
    *,
    covariances: Mapping[str, np.ndarray] | None = None,
) -> dict[str, CordaEigens]:
    """Compute CorDA's singular triplets for every target layer of ``model`` and keep them for the adapter
    with ``init_lora_weights='corda'`` that is attached to ``model`` next (PEFT's ``preprocess_corda``).

    ``model``: a torch model, an :class:`~peftdecl.AdaptedModel`, or the NumPy reference's state mapping;
    ``lora_config``: the LoRA spec (any form ``load_spec`` reads, PEFT's ``LoraConfig`` included) whose
    ``corda_config`` is used; ``run_model()`` runs the calibration data through the model (torch, hooked on
    ``hooked_model`` when given, else on ``model``); ``covariances``: each layer's input covariance given directly
    instead (module -> in × in). ``corda_config.cache_file`` / ``covariance_file`` are read when they exist and
    written otherwise, in PEFT's torch format. Returns the kept triplets by module."""
    spec = load_spec(lora_config)
    config = corda_settings(spec)
    base, info, base_weight, is_torch = _model_parts(model)
    plan: Plan = compile_plan(spec, info, "corda")
    for layer in plan.layers:
        check_weight_init_layer("corda", layer)
    modules = [layer.module for layer in corda_targets(plan)]
    if not modules:
        raise TargetError("preprocess_corda: the spec targets no linear layer of this model")
    eigens = (
        None if config.cache_file is None else _torch_calibration().load_eigens(config.cache_file, modules)
    )
    if eigens is None:
        found = _covariances(config, modules, run_model, hooked_model, covariances, base, is_torch)
        if config.verbose:
            print(f"CorDA: computing the {config.corda_method} triplets of {len(modules)} layers")
        eigens = eigens_for_plan(plan, found, base_weight, config.corda_method)
        if config.cache_file is not None:
            _torch_calibration().save_eigens(config.cache_file, eigens)
    remember(base, "corda", eigens)
    return eigens


TORCH_CALIBRATION = "peftdecl_torch.calibration"
"""Where the torch backend records covariances and reads/writes PEFT's cache and covariance files (torch files)."""


def _torch_calibration() -> Any:
    try:  # by name: the core names no framework package in its imports
        calibration = importlib.import_module(TORCH_CALIBRATION)
    except ImportError as exc:
        raise BackendError(
            f"CorDA's cache and covariance files are torch files; torch is needed: {exc}"
        ) from exc
    return calibration


def _covariances(
    config: Any,
    modules: list[str],
    run_model: Callable[[], object] | None,
    hooked_model: object,
    given: Mapping[str, np.ndarray] | None,
    base: object,
    is_torch: bool,
) -> Mapping[str, np.ndarray]:
    """The covariances given, else read from ``covariance_file``, else collected by running the model."""
    if given is not None:
        return given
    calibration = _torch_calibration() if config.covariance_file is not None or is_torch else None
    if calibration is not None:
        loaded = calibration.load_covariances(config.covariance_file, modules)
        if loaded is not None:
            return dict(loaded)
    if run_model is None:
        raise TargetError(
            "preprocess_corda needs run_model (a function running calibration data through the model) unless "
            "corda_config.cache_file or covariance_file already exists, or covariances= is given"
        )
    if not is_torch or calibration is None:
        raise BackendError("preprocess_corda: run_model collects covariances on torch models only")
    hooked = base if hooked_model is None else hooked_model
    if not isinstance(hooked, Mapping) and hasattr(hooked, "get_base_model"):
        hooked = hooked.get_base_model()
    found: dict[str, np.ndarray] = calibration.collect_covariances(
        hooked, modules, run_model, config.use_float16_for_covariance
    )
    if config.covariance_file is not None:
        calibration.save_covariances(config.covariance_file, found)
    return found
