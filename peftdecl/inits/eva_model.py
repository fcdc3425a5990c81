"""HF PEFT's EVA entry points on an :class:`~peftdecl.model.AdaptedModel`: ``get_eva_state_dict`` runs batches
through the model (its adapters off) and returns each layer's EVA A; ``initialize_lora_eva_weights`` puts them into
an ``init_lora_weights="eva"`` adapter, with PEFT's new ranks (``rank_pattern``), alphas and target modules.

The batches run on the model's backend: its package's ``activations`` module records layer inputs
(``peftdecl_torch.activations``); the arithmetic is :mod:`peftdecl.inits.eva`.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any

import numpy as np

from peftdecl.backend import Backend, backend_for
from peftdecl.errors import PeftdeclError
from peftdecl.inits.eva import check_eva_layers, eva_adapter, eva_components, eva_targets
from peftdecl.model import AdaptedModel
from peftdecl.peft_compat import NotSupportedError
from peftdecl.plan import Plan, compile_plan
from peftdecl.spec import load_spec
from peftdecl.spec.data_inits import EvaConfig

LANGUAGE_MODELING = "language_modeling"
"""PEFT's default input preparation: the rows of positions whose attention mask is 1 (and, with
``eva_config.use_label_mask``, whose label is not ``label_mask_value``)."""

InputsFn = Callable[..., Any] | Mapping[str, Callable[..., Any]] | str | None


def get_eva_state_dict(
    model: object,
    dataloader: Iterable[object],
    spec: object = None,
    forward_fn: Callable[[object, object], object] | None = None,
    prepare_model_inputs_fn: Callable[..., Any] | str | None = LANGUAGE_MODELING,
    prepare_layer_inputs_fn: InputsFn = LANGUAGE_MODELING,
    adapter_name: str | None = None,
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = False,
    max_steps: int | None = None,
) -> dict[str, np.ndarray]:
    """Module -> EVA's A (r' × in, float64) for ``model``: an AdaptedModel (its adapter ``adapter_name``) or a base
    model with ``spec``. ``forward_fn(model, batch)`` runs one batch (default ``model(**batch)``); the
    ``prepare_*`` functions are PEFT's (``None``: every row, flattened to 2-D). ``max_steps`` bounds the batches
    (PEFT cycles until convergence); ``gather_distributed_inputs`` and ``show_progress_bar`` are accepted for
    PEFT's signature (peftdecl runs in one process, quietly)."""
    plan, backend = _plan_and_backend(model, spec, adapter_name)
    config = getattr(plan.spec, "eva_config", None) or EvaConfig()
    targets = eva_targets(plan)
    if not targets:
        raise PeftdeclError("EVA found no linear layer among the adapter's targets")
    activations = _activations(backend)
    with activations.eva_recorder(
        model, tuple(targets), plan.spec, forward_fn, prepare_model_inputs_fn, prepare_layer_inputs_fn
    ) as recorder:
        return eva_components(
            {name: lp.r for name, lp in targets.items()},
            config,
            dataloader,
            recorder.record,
            recorder.max_parameter_dim,
            int(getattr(plan.spec, "r", 8)),
            max_steps,
        )


def initialize_lora_eva_weights(
    model: AdaptedModel,
    dataloader: Iterable[object] | None = None,
    eva_state_dict: Mapping[str, Any] | None = None,
    forward_fn: Callable[[object, object], object] | None = None,
    prepare_model_inputs_fn: Callable[..., Any] | str | None = LANGUAGE_MODELING,
    prepare_layer_inputs_fn: InputsFn = LANGUAGE_MODELING,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = False,
    max_steps: int | None = None,
) -> AdaptedModel:
    """Give the ``init_lora_weights="eva"`` adapter ``adapter_name`` EVA's A (B = 0) and ranks, from
    ``eva_state_dict`` (module -> A, e.g. :func:`get_eva_state_dict`'s or PEFT's) or else from ``dataloader``.
    The adapter is rebuilt with the new ``rank_pattern``, ``alpha_pattern`` and ``target_modules`` and stays
    active; returns ``model``."""
    if not isinstance(model, AdaptedModel):
        raise PeftdeclError("initialize_lora_eva_weights needs an AdaptedModel (peftdecl.attach(...))")
    active = model.active_adapters
    if len(active) > 1:
        raise PeftdeclError(f"initialize_lora_eva_weights works with one active adapter, not {active}")
    plan = model.plan(adapter_name)
    if getattr(plan.spec, "init_lora_weights", None) != "eva":
        raise PeftdeclError(
            f"initialize_lora_eva_weights needs init_lora_weights='eva'; adapter {adapter_name!r} has "
            f"{getattr(plan.spec, 'init_lora_weights', None)!r}"
        )
    check_eva_layers(plan)
    if eva_state_dict is None:
        if dataloader is None:
            raise PeftdeclError("initialize_lora_eva_weights needs a dataloader or an eva_state_dict")
        state: Mapping[str, Any] = get_eva_state_dict(
            model,
            dataloader,
            forward_fn=forward_fn,
            prepare_model_inputs_fn=prepare_model_inputs_fn,
            prepare_layer_inputs_fn=prepare_layer_inputs_fn,
            adapter_name=adapter_name,
            max_steps=max_steps,
        )
    else:
        state = {k: _to_numpy(v) for k, v in eva_state_dict.items()}
    old_arrays = model.state_dict(adapter_name)
    changes, arrays = eva_adapter(plan, old_arrays, state)
    spec = plan.spec.replace(**changes)
    compile_plan(spec, model.info, adapter_name)  # a bad result fails here, before the old adapter goes
    model.delete_adapter(adapter_name)
    try:
        model.add_adapter(adapter_name, spec, arrays=arrays)
    except BaseException:
        model.add_adapter(adapter_name, plan.spec, arrays=old_arrays)
        raise
    finally:
        if active:
            model.set_adapter(active)
    return model


def _plan_and_backend(model: object, spec: object, adapter_name: str | None) -> tuple[Plan, Backend]:
    if isinstance(model, AdaptedModel):
        plan = model.plan(adapter_name) if spec is None else compile_plan(load_spec(spec), model.info)
        return plan, model.backend
    if spec is None:
        raise PeftdeclError("get_eva_state_dict needs spec= when the model is not an AdaptedModel")
    backend = backend_for(model)
    return compile_plan(load_spec(spec), backend.inventory(model), adapter_name or "default"), backend


def _activations(backend: Backend) -> ModuleType:
    name = f"{getattr(backend, 'package', None)}.activations"
    if getattr(backend, "package", None) is None or importlib.util.find_spec(name) is None:
        raise NotSupportedError(
            f"EVA collects layer inputs with forward hooks, which the {backend.name} backend does not have; "
            "compute the EVA state elsewhere and pass eva_state_dict= to initialize_lora_eva_weights"
        )
    return importlib.import_module(name)


def _to_numpy(value: Any) -> np.ndarray:
    """An array from a NumPy array or a framework tensor (torch: detached, on the CPU)."""
    if hasattr(value, "detach"):
        value = value.detach().to("cpu").double().numpy()
    return np.asarray(value, dtype=np.float64)
