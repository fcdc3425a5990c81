"""Which raw parameters ``target_parameters`` adapts, and under which keys, as HF PEFT 0.21 decides.

- A parameter ``<module>.<name>`` matches when its full name equals an entry or ends with ``"." + entry``
  (``exclude_modules``, ``layers_to_transform`` and ``modules_to_save`` are not consulted, as in PEFT).
- PEFT wraps the module holding each matched parameter in a ``ParamWrapper``; several parameters of one module
  nest, the first registered innermost. Each wrapper's tensors are saved under the module's name with one
  ``.base_layer`` per wrapper around it, so with ``gate_up_proj`` registered before ``down_proj``:
  ``experts.base_layer.lora_A.weight`` (gate_up_proj) and ``experts.lora_A.weight`` (down_proj).
- ``target_modules`` null with ``target_parameters`` set: the model type's default modules if it has any, else
  none; a module adapted through ``target_modules`` cannot also hold a targeted parameter.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from peftdecl.errors import TargetError
from peftdecl.plan.ir import LayerPlan, ModelInfo
from peftdecl.plan.kinds.lora_param import build_parameter_layer
from peftdecl.plan.targeting import default_targets, is_targeted, resolve_target_modules, select_targets
from peftdecl.spec._base import SpecBase
from peftdecl.spec.lora import LoraSpec

WRAPPED = ".base_layer"
"""What each enclosing ParamWrapper adds to a nested wrapper's key prefix."""


def wanted_parameters(spec: SpecBase) -> tuple[str, ...]:
    """The spec's ``target_parameters`` (empty when it has none)."""
    return tuple(getattr(spec, "target_parameters", None) or ())


def module_targets(spec: SpecBase, info: ModelInfo) -> list[str]:
    """The layers ``target_modules`` adapts; with ``target_parameters`` set, matching nothing is no error here
    (:func:`parameter_layers` raises when neither matched) and a null ``target_modules`` without a default for
    the model type adapts no module, as in HF PEFT."""
    if not wanted_parameters(spec):
        return select_targets(spec, info)
    if getattr(spec, "target_modules", None) is None and info.model_type not in default_targets(
        spec.peft_type
    ):
        return []
    targets = resolve_target_modules(spec, info)
    if not targets:
        return []
    chosen = [name for name in info.modules if is_targeted(name, spec, targets)]
    if any(name not in info.layers for name in chosen):
        return select_targets(spec, info)  # its error names the modules that are not layers
    return chosen


def matched_parameters(spec: SpecBase, info: ModelInfo) -> list[str]:
    """Full names of the parameters ``target_parameters`` selects, in model order."""
    wanted = set(wanted_parameters(spec))
    return [name for name in info.parameters if name in wanted or any(name.endswith(f".{w}") for w in wanted)]


def parameter_layers(spec: SpecBase, info: ModelInfo, module_layers: Sequence[LayerPlan]) -> list[LayerPlan]:
    """One LoRA layer plan per selected parameter, keyed as PEFT saves it, innermost wrapper first per module
    (the order in which wrappers are put in place and taken out). Raises where nothing at all is adapted."""
    if not wanted_parameters(spec):
        return []
    assert isinstance(spec, LoraSpec)  # only LoRA accepts target_parameters (its spec checks the options)
    if not info.parameters:
        raise TargetError(
            "target_parameters needs a backend whose inventory lists the model's raw parameters (torch, or the "
            "NumPy reference on a state dict); this one lists none"
        )
    chosen = matched_parameters(spec, info)
    if not chosen and not module_layers:
        raise TargetError(
            f"target_parameters {list(wanted_parameters(spec))} matched no parameter of the model and "
            "target_modules no module; name a parameter by its full name or a '.'-separated suffix of it "
            "(e.g. 'experts.gate_up_proj')"
        )
    if not chosen:
        warnings.warn(
            f"target_parameters {list(wanted_parameters(spec))} matched no parameter",
            RuntimeWarning,
            stacklevel=3,
        )
    adapted = {lp.module for lp in module_layers}
    by_module: dict[str, list[str]] = {}
    for name in chosen:
        module = name.rpartition(".")[0]
        if not module:
            raise TargetError(
                f"target_parameters selects {name!r}, a parameter of the top-level module; HF PEFT cannot wrap it "
                "either (target a parameter of a submodule)"
            )
        if module in adapted:
            raise TargetError(
                f"target_parameters selects {name}, but target_modules already adapts {module}; a module is "
                "adapted either way, not both (set target_modules=[] to adapt only parameters)"
            )
        by_module.setdefault(module, []).append(name)
    layers = []
    for module, names in by_module.items():
        for index, name in enumerate(names):
            key = module + WRAPPED * (len(names) - 1 - index)
            layers.append(build_parameter_layer(spec, key, info.parameters[name]))
    return layers
