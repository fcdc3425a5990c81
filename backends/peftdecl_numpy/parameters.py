"""LoRA on raw parameters (``target_parameters``) in the NumPy reference engine.

A raw parameter W (``[out, in]``, or an expert stack ``[E, out, in]`` / ``[E, in, out]``) has no operation of its
own: the module holding it decides how it is used. So the reference keeps W as a tensor of the state dict and
computes what the adapters do to it (:mod:`peftdecl_numpy.kinds.lora_param`): merged, W ← W + ΔW; running,
W' = W + Σ ΔW of the running adapters, handed to whoever runs the module; training, dL/dA and dL/dB from the dL/dW'
that forward gives. Running one layer on it is refused (merge, or run the model on the torch backend).

As in HF PEFT (whose wrappers nest per module), every adapter that adapts a parameter of a module must adapt the
same parameters of it in the same order, and a module adapted through ``target_modules`` by one adapter cannot hold
a targeted parameter of another.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import numpy as np
import numpy.typing as npt

from peftdecl.adapter_book import AdapterBook
from peftdecl.backend import trainable_key
from peftdecl.errors import PeftdeclError
from peftdecl.plan import LayerInfo, LayerPlan, Plan
from peftdecl.plan.kinds.lora_param import parameter_info
from peftdecl_numpy.kinds import lora_param
from peftdecl_numpy.kinds.base import Params
from peftdecl_numpy.xp_ops import Array, to_numpy

PARAMETER = "parameter"
"""The IR layer type of a raw parameter, and the ``layer_types`` entry that declares one."""


def parameter_infos(
    state_dict: Mapping[str, npt.ArrayLike], layer_types: MutableMapping[str, Any]
) -> dict[str, LayerInfo]:
    """Every floating-point tensor of ``state_dict`` as a parameter ``target_parameters`` may name, in state-dict
    order. ``layer_types`` may declare one by its full name, ``{"type": "parameter", "transposed": True}`` for an
    expert stack stored ``[E, in, out]`` (PEFT reads ``is_transposed`` from the module); those entries are taken
    out of ``layer_types``."""
    declared = {k: layer_types.pop(k) for k in list(layer_types) if _is_parameter_declaration(layer_types[k])}
    found: dict[str, LayerInfo] = {}
    for name, value in state_dict.items():
        array = np.asarray(value)
        if array.dtype.kind in "biuO":  # integer codes (quantised weights), flags, step counters
            continue
        transposed = _transposed(name, declared.pop(name, PARAMETER))
        found[name] = parameter_info(name, tuple(array.shape), array.dtype.name, transposed)
    if declared:
        raise PeftdeclError(
            f"layer_types declares parameters the state dict does not hold as floating-point tensors: "
            f"{sorted(declared)}"
        )
    return found


def _is_parameter_declaration(declared: object) -> bool:
    if isinstance(declared, LayerInfo):
        return declared.type == PARAMETER
    if isinstance(declared, Mapping):
        return declared.get("type") == PARAMETER
    return declared == PARAMETER


def _transposed(name: str, declared: object) -> bool:
    if isinstance(declared, LayerInfo):
        return declared.transposed
    if not isinstance(declared, Mapping):
        return False
    unknown = sorted(set(declared) - {"type", "transposed"})
    if unknown:
        raise PeftdeclError(
            f"layer_types[{name!r}]: a parameter takes only 'transposed' (true for an [E, in, out] expert stack); "
            f"got {unknown}"
        )
    transposed = declared.get("transposed", False)
    if not isinstance(transposed, bool):
        raise PeftdeclError(
            f"layer_types[{name!r}].transposed: expected true or false, got {type(transposed).__name__}"
        )
    return transposed


def holder(lp: LayerPlan) -> str:
    """The module holding ``lp``'s parameter (``experts`` for ``experts.gate_up_proj``)."""
    return lp.layer.parameter.rpartition(".")[0]


class ParameterWeights:
    """The targeted parameters of a state dict: the loaded values, and the merged ones while adapters are merged."""

    def __init__(
        self,
        original: Mapping[str, npt.ArrayLike],
        book: AdapterBook,
        asarray: Callable[[npt.ArrayLike], Array],
    ) -> None:
        self._original, self._book, self._asarray = original, book, asarray
        self._merged: dict[str, Array] = {}  # parameter -> W + Σ ΔW of the merged adapters

    # -- attaching -----------------------------------------------------------------------------------------
    def check(self, name: str, plan: Plan) -> None:
        """Refuse ``plan`` (adapter ``name``) where it and another attached adapter adapt a module differently:
        a parameter wrapper position holding another parameter, or a module adapted both as a layer and through
        one of its parameters."""
        others = [(n, lp) for n, p in self._book.plans.items() if n != name for lp in p.layers]
        for lp in plan.layers:
            for other_name, other in others:
                mine, theirs = lp.layer.type == PARAMETER, other.layer.type == PARAMETER
                same_place = other.module == lp.module
                if mine and theirs and same_place and other.layer.parameter != lp.layer.parameter:
                    raise PeftdeclError(
                        f"{lp.layer.parameter}: all adapters with target_parameters must target the same "
                        f"parameters (as in HF PEFT); adapter {other_name!r} has {other.layer.parameter} at "
                        f"{lp.module}"
                    )
                as_layer, as_parameter = (other, lp) if mine else (lp, other)
                if mine != theirs and as_layer.module == holder(as_parameter):
                    raise PeftdeclError(
                        f"{as_parameter.layer.parameter}: {as_layer.module} is adapted through target_modules "
                        f"by one adapter and through its parameter by another; a module is adapted one way only "
                        "(as in HF PEFT)"
                    )

    # -- merging -------------------------------------------------------------------------------------------
    def merge(self, lp: LayerPlan, params: Params) -> None:
        """W ← W + ΔW of one adapter."""
        self._merged[lp.layer.parameter] = lora_param.merged(lp, self.current(lp.layer.parameter), params)

    def unmerge(self) -> None:
        """Every merged adapter taken out: the loaded values again, exactly."""
        self._merged.clear()

    def current(self, parameter: str) -> Array:
        """The parameter as it stands (merged adapters folded in)."""
        found = self._merged.get(parameter)
        return self._asarray(self._original[parameter]) if found is None else found

    def unloaded(self) -> dict[str, np.ndarray]:
        """The merged parameters, under their state-dict names."""
        return {name: to_numpy(value) for name, value in self._merged.items()}

    def weight_at(self, module: str) -> Array | None:
        """The parameter an adapter keys at ``module`` (``experts.base_layer``), as it stands; None when no attached
        adapter adapts a parameter there."""
        for plan in self._book.plans.values():
            for lp in plan.layers:
                if lp.layer.type == PARAMETER and lp.module == module:
                    return self.current(lp.layer.parameter)
        return None

    # -- running -------------------------------------------------------------------------------------------
    def refuse_forward(self, module: str) -> None:
        """Raise when ``module`` is (or holds) a parameter an attached adapter adapts: it has no forward here."""
        for plan in self._book.plans.values():
            for lp in plan.layers:
                if lp.layer.type == PARAMETER and module in (lp.module, holder(lp)):
                    raise PeftdeclError(
                        f"{module}: LoRA on the raw parameter {lp.layer.parameter} (target_parameters) has no "
                        "forward of its own on the NumPy reference (the module holding it decides how it is "
                        "used): merge the adapter (merge_and_unload() gives the state dict with W + ΔW), use "
                        "effective_parameter() in your own forward, or run the model on the torch backend"
                    )

    def running_on(self, parameter: str) -> list[tuple[str, LayerPlan]]:
        """(adapter, layer plan) of every running adapter on ``parameter``."""
        self._known(parameter)
        found = []
        for name in self._book.running():
            found += [(name, lp) for lp in self._book.plans[name].layers if lp.layer.parameter == parameter]
        return found

    def effective(self, parameter: str, params_of: Callable[[str, LayerPlan], Params]) -> Array:
        """W' = W + Σ ΔW of the running adapters: what the module holding the parameter computes with."""
        value = self.current(parameter)
        for name, lp in self.running_on(parameter):
            value = value + lora_param.delta_weight(lp, params_of(name, lp))
        return value

    def backward(
        self, parameter: str, d_weight: Array, params_of: Callable[[str, LayerPlan], Params]
    ) -> dict[str, Array]:
        """dL/dA and dL/dB of every running adapter on ``parameter`` given dL/dW', keyed as
        ``trainable_parameters`` keys them (frozen adapters left out)."""
        trainable = self._book.trainable(self._book.active)
        grads = {}
        for name, lp in self.running_on(parameter):
            if name not in trainable:
                continue
            own = lora_param.factor_grads(lp, params_of(name, lp), d_weight)
            grads.update({trainable_key(name, lp.key(k), trainable): v for k, v in own.items()})
        return grads

    def _known(self, parameter: str) -> None:
        if parameter not in self._original:
            raise PeftdeclError(f"the state dict has no parameter {parameter!r}")
