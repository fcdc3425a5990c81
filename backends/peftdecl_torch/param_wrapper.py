"""LoRA on raw ``nn.Parameter``s (``target_parameters``), as HF PEFT's ``ParamWrapper``: the holding module runs
with W + ΔW in place of its parameter W, ΔW = s · B A per expert (:mod:`peftdecl.plan.kinds.lora_param`).

Like PEFT, a :class:`ParameterLayer` replaces the module holding the parameter, one per targeted parameter,
nested (the first registered innermost), so the module tree and the adapter keys are PEFT's
(``experts.base_layer.lora_A.weight``). Its forward calls the module it wraps through
``torch.func.functional_call`` with the parameter swapped for W + ΔW: a functional swap rather than
``torch.nn.utils.parametrize`` (which PEFT registers and removes around every call) because it leaves the
module's parameters, state-dict keys and hooks untouched, restores the parameter even when the forward raises,
and gives ΔW's factors their gradients through autograd while W stays frozen. Reading ``module.weight`` outside the
module's own forward gives W without ΔW, as in PEFT.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from peftdecl.errors import PeftdeclError
from peftdecl.plan import LayerInfo, LayerPlan
from peftdecl.plan.kinds.lora_param import parameter_info
from peftdecl_torch.context import EngineContext
from peftdecl_torch.layer import AdaptedLayer
from peftdecl_torch.mixed_batch import ADAPTER_NAMES
from peftdecl_torch.probes import follow_mode


def parameter_infos(model: nn.Module) -> dict[str, LayerInfo]:
    """Every parameter of ``model`` by full name, in ``named_modules`` order and, within a module, in registration
    order (the order HF PEFT nests its wrappers in); ``is_transposed`` is read from the holding module."""
    found: dict[str, LayerInfo] = {}
    for module_name, module in model.named_modules():
        transposed = bool(getattr(module, "is_transposed", False))
        for leaf, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{leaf}" if module_name else leaf
            dtype = str(param.dtype).removeprefix("torch.")
            found[name] = parameter_info(name, tuple(param.shape), dtype, transposed)
    return found


def delta_weight(lp: LayerPlan, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ΔW in the parameter's own shape: s · B A (2-D), or per expert e: s · B_e A_e with A_e the rows e·r… of A and
    B_e the columns e, e + E, … of B, transposed for an ``[E, in, out]`` stack."""
    info = lp.layer
    if len(info.shape) == 2:
        return lp.scaling * (b @ a)
    num = info.shape[0]
    a3 = a.reshape(num, -1, a.shape[-1])  # [E, r, in]
    b3 = b.reshape(b.shape[0], -1, num)  # [out, r, E]
    pattern = "ore,eri->eio" if info.transposed else "ore,eri->eoi"
    return lp.scaling * torch.einsum(pattern, b3, a3)


def folded(lp: LayerPlan, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W + ΔW of one adapter on an expert stack as HF PEFT runs it: one ``baddbmm`` in W's dtype (autocast off),
    W + s · B_e A_e per expert (transposed: W + s · A_eᵀ B_eᵀ), so half-precision stacks round as PEFT's do."""
    num = lp.layer.shape[0]
    a3 = a.reshape(num, -1, a.shape[-1]).to(weight.dtype)  # [E, r, in]
    b3 = b.reshape(b.shape[0], -1, num).permute(2, 0, 1).to(weight.dtype)  # [E, out, r]
    lhs, rhs = (a3.transpose(1, 2), b3.transpose(1, 2)) if lp.layer.transposed else (b3, a3)
    with torch.autocast(device_type=weight.device.type, enabled=False):
        return torch.baddbmm(weight, lhs, rhs, alpha=lp.scaling)


class ParameterLayer(AdaptedLayer):
    """The module holding one targeted parameter (or the wrapper of another of its parameters), run with that
    parameter replaced by W + Σ ΔW of the running adapters."""

    def __init__(
        self, base_layer: nn.Module, info: LayerInfo, module_name: str, context: EngineContext, parameter: str
    ) -> None:
        super().__init__(base_layer, info, module_name, context)
        self.parameter_name = parameter
        for head in ("lora_A", "lora_B"):
            # set directly: add_module would see the wrapped wrapper's own lora_A through attribute pass-through
            self._modules[head] = nn.ModuleDict()

    @property
    def base_weight(self) -> torch.Tensor:
        """The targeted parameter itself, on the innermost module."""
        found: torch.Tensor = getattr(self.get_base_layer(), self.parameter_name)
        return found

    def weight_ir(self) -> torch.Tensor:
        return self.base_weight

    def check_mergeable(self) -> None:
        """A raw parameter is a plain tensor: it can always take ΔW."""

    def delta(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s ΔW, in the parameter's dtype."""
        p = self.tensors(name)
        found = delta_weight(self._plans[name], p["lora_A.weight"], p["lora_B.weight"])
        return found.to(self.base_weight.dtype)

    def merge(self, name: str, before: Sequence[str]) -> None:
        """W ← W + ΔW of adapter ``name``."""
        with torch.no_grad():
            self.write_base(self.base_weight + self.delta(name), None)

    def unmerge(self, name: str, remaining: Sequence[str]) -> None:
        """W ← W − ΔW of adapter ``name``."""
        with torch.no_grad():
            self.write_base(self.base_weight - self.delta(name), None)

    def _path(self) -> str:
        """The parameter's name as seen from the module this one wraps (through any inner wrappers)."""
        hops, layer = [], self.base_layer
        while isinstance(layer, ParameterLayer):
            hops.append("base_layer")
            layer = layer.base_layer
        return ".".join([*hops, self.parameter_name])

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # the wrapped module's own signature
        book = self._context.book
        running = [n for n in book.running() if n in self._plans]
        if running and ADAPTER_NAMES.get() is not None:
            raise PeftdeclError(
                f"{self.module_name}: LoRA on a raw parameter (target_parameters) cannot run a mixed batch "
                "(adapter_names), as in HF PEFT"
            )
        if not running:
            return self.base_layer(*args, **kwargs)
        weight = self.base_weight
        lp = self._plans[running[0]]
        if len(running) == 1 and len(lp.layer.shape) == 3:
            p = self.tensors(running[0])
            effective = folded(lp, weight, p["lora_A.weight"], p["lora_B.weight"])
        else:  # as PEFT: the sum of the ΔW, each in W's dtype, added to W
            effective = weight + sum((self.delta(n) for n in running[1:]), self.delta(running[0]))
        return torch.func.functional_call(
            self.base_layer, {self._path(): effective}, args, kwargs, strict=False
        )

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, {super().extra_repr()}"


def wrap_parameter(
    model: nn.Module, layers: dict[str, AdaptedLayer], lp: LayerPlan, context: EngineContext
) -> AdaptedLayer:
    """The wrapper of ``lp``'s parameter, put in place on first use (innermost first, so that each sits at its
    plan's key) and recorded in ``layers``; every adapter with target_parameters must name the same parameters."""
    holder, _, leaf = lp.layer.parameter.rpartition(".")
    found = layers.get(lp.module)
    if found is not None:
        if not isinstance(found, ParameterLayer) or found.parameter_name != leaf:
            raise PeftdeclError(
                f"{lp.layer.parameter}: all adapters with target_parameters must target the same parameters "
                "(as in HF PEFT): the wrapper at this position holds another one"
            )
        return found
    parent_name, _, child = holder.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    current = getattr(parent, child)
    if isinstance(current, nn.Module) and not isinstance(current, ParameterLayer):
        from peftdecl_torch.saved import SavedModule

        if isinstance(current, (AdaptedLayer, SavedModule)):
            raise PeftdeclError(
                f"{lp.layer.parameter}: {holder} is already adapted through target_modules or modules_to_save "
                "by another adapter and cannot also have a targeted parameter"
            )
    wrapper = ParameterLayer(current, lp.layer, lp.module, context, leaf)
    follow_mode(wrapper, current, current.training)
    setattr(parent, child, wrapper)
    layers[lp.module] = wrapper
    return wrapper
