"""The NumPy reference engine: a state dict (name -> array) with adapters, computed layer by layer in float64.

The model is a mapping of parameter names to arrays; a module ``m`` owns ``m.weight`` (and ``m.bias``). Calling
the adapted model runs one layer: ``model("layers.0.q_proj", x)``. ``layer_forward`` / ``layer_backward`` expose
the explicit gradients the reference is checked with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from peftdecl.backend import BASE_ROW as BASE
from peftdecl.backend import check_adapter_names, trainable_key
from peftdecl.errors import PeftdeclError
from peftdecl.plan import LayerInfo, LayerPlan, ModelInfo, Plan
from peftdecl_numpy import compose
from peftdecl_numpy.kinds import Context, ops_for
from peftdecl_numpy.layers import BaseLayer


class NumpyEngine:
    """Adapters on a state dict; every number is float64."""

    def __init__(self, state_dict: Mapping[str, Any], info: ModelInfo) -> None:
        self._original = dict(state_dict)
        self._info = info
        self._layers: dict[str, BaseLayer] = {}
        for module, layer in info.layers.items():
            weight = np.asarray(state_dict[f"{module}.weight"], dtype=np.float64)
            if layer.type == "gpt2_conv1d":
                weight = weight.T  # GPT-2 Conv1D stores [in, out]; the IR is [out, in]
            bias = state_dict.get(f"{module}.bias")
            own_bias = None if bias is None else np.asarray(bias, np.float64)
            self._layers[module] = BaseLayer(layer, weight.copy(), own_bias)
        self._plans: dict[str, Plan] = {}
        self._params: dict[str, dict[str, dict[str, np.ndarray]]] = {}  # adapter -> module -> name -> array
        self._saved: dict[str, dict[str, np.ndarray]] = {}  # adapter -> modules_to_save copies
        self._active: tuple[str, ...] = ()
        self._enabled = True
        self._merged: list[str] = []
        self.training = False
        self._frozen: frozenset[str] = frozenset()
        self.rng = np.random.default_rng(0)

    # -- Engine protocol -----------------------------------------------------------------------------------
    def add(self, name: str, plan: Plan, arrays: Mapping[str, np.ndarray]) -> None:
        by_module: dict[str, dict[str, np.ndarray]] = {}
        for lp in plan.layers:
            by_module[lp.module] = {
                p.name: np.array(arrays[lp.key(p.name)], dtype=np.float64) for p in lp.params
            }
        for p in plan.shared:
            by_module.setdefault("", {})[p.name] = np.array(arrays[p.name], dtype=np.float64)
        saved = {}
        for module in plan.modules_to_save:
            prefix = module + "."
            own = {k: v for k, v in arrays.items() if k.startswith(prefix)}
            if not own:
                own = {k: v for k, v in self._original.items() if k.startswith(prefix)}
            saved.update({k: np.array(v, dtype=np.float64) for k, v in own.items()})
        self._plans[name], self._params[name], self._saved[name] = plan, by_module, saved

    def remove(self, name: str) -> None:
        del self._plans[name], self._params[name], self._saved[name]

    def set_active(self, names: tuple[str, ...]) -> None:
        self._active = names

    def set_frozen(self, names: frozenset[str]) -> None:
        """Adapters ``names`` are frozen: ``trainable_parameters`` leaves them out even while active."""
        self._frozen = frozenset(names)

    def set_enabled(self, enabled: bool) -> None:
        self._enabled = enabled

    def export(self, name: str) -> dict[str, np.ndarray]:
        plan, params = self._plans[name], self._params[name]
        out = {lp.key(k): v.copy() for lp in plan.layers for k, v in params[lp.module].items()}
        out.update({k: v.copy() for k, v in params.get("", {}).items()})
        out.update({k: v.copy() for k, v in self._saved[name].items()})
        return out

    def merge(self, names: tuple[str, ...]) -> None:
        """Merge each adapter in turn into the weights as they are (with several, the order matters)."""
        for name in names:
            for lp in self._plans[name].layers:
                base = self._layers[lp.module]
                if base.unmerged is None:
                    base.unmerged = base.weight.copy()
                base.weight, base.bias = ops_for(lp.kind).merge(lp, base, self._layer_params(name, lp))
            self._merged.append(name)

    def unmerge(self) -> None:
        for name in reversed(self._merged):
            for lp in self._plans[name].layers:
                base = self._layers[lp.module]
                base.weight, base.bias = ops_for(lp.kind).unmerge(lp, base, self._layer_params(name, lp))
        for base in self._layers.values():
            base.unmerged = None
        self._merged = []

    def unload(self) -> dict[str, np.ndarray]:
        """A new state dict: merged weights in the original layouts, modules_to_save copies swapped in."""
        out = {k: np.array(v, dtype=np.float64) for k, v in self._original.items()}
        for module, base in self._layers.items():
            out[f"{module}.weight"] = (
                base.weight.T.copy() if base.info.type == "gpt2_conv1d" else base.weight.copy()
            )
            if base.bias is not None:
                out[f"{module}.bias"] = base.bias.copy()
        for name in self._active:
            out.update({k: v.copy() for k, v in self._saved[name].items()})
        return out

    def base_weight(self, module: str) -> np.ndarray:
        return self._layers[module].weight.copy()

    def load_base_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        for key, value in weights.items():
            module = key.removesuffix(".weight").removesuffix(".base_layer")
            if module not in self._layers:
                raise PeftdeclError(f"{key}: the model has no layer {module!r} to load it into")
            array, expected = np.asarray(value), self._layers[module].weight.shape
            if array.shape != expected:  # as the torch and MLX engines refuse it: not later, in a forward
                raise PeftdeclError(
                    f"{key}: shape {list(array.shape)} does not fit {module}'s weight {list(expected)}"
                )
            self._layers[module].weight = array.astype(np.float64)

    def forward(self, module: str, x: Any, *, adapter_names: Sequence[str] | None = None) -> np.ndarray:
        """The output of one layer (``adapter_names``: one adapter per row of a batch, ``"__base__"`` for none)."""
        y, _ = self.layer_forward(module, x, adapter_names=adapter_names)
        return y

    def trainable_parameters(self, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Key -> the live array (an optimiser may update it in place): the full IR key with one adapter,
        ``"<adapter>/<full key>"`` with several (:func:`peftdecl.backend.trainable_key`); frozen adapters are left
        out."""
        out = {}
        names = tuple(n for n in names if n not in self._frozen)
        for name in names:
            plan = self._plans[name]
            own = {}
            for lp in plan.layers:
                for spec in lp.params:
                    if spec.role == "trainable":
                        own[lp.key(spec.name)] = self._params[name][lp.module][spec.name]
            for spec in plan.shared:
                if spec.role == "trainable":
                    own[spec.name] = self._params[name][""][spec.name]
            own.update(self._saved[name])
            out.update({trainable_key(name, k, names): v for k, v in own.items()})
        return out

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, all) numbers of parameters: the state dict's float arrays plus every adapter's trainable
        tensors and modules_to_save copies (frozen tensors are buffers in PEFT, not parameters)."""
        base = sum(np.size(v) for v in self._original.values() if np.asarray(v).dtype.kind == "f")
        own = {name: self.trainable_parameters((name,)) for name in self._plans}
        every = {name: sum(np.size(v) for v in arrays.values()) for name, arrays in own.items()}
        trainable = sum(every[n] for n in self._active if n not in self._frozen)
        return trainable, base + sum(every.values())

    def train(self, mode: bool) -> None:
        self.training = mode

    # -- explicit forward / backward -----------------------------------------------------------------------
    def layer_forward(
        self, module: str, x: Any, *, adapter_names: Sequence[str] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """(y, tape) for one layer; pass the tape to :meth:`layer_backward`."""
        if module not in self._layers:
            raise PeftdeclError(f"no layer named {module!r}; layers: {', '.join(list(self._layers)[:8])}")
        base = self._layers[module]
        x = np.asarray(x) if base.info.type == "embedding" else np.asarray(x, dtype=np.float64)
        ctx = Context(self.training, self.rng)
        if adapter_names is not None:
            return self._mixed_forward(module, base, x, list(adapter_names), ctx)
        running = []
        for name in self._running():
            if module in self._plans[name].targets:
                lp = self._plans[name].layer(module)
                running.append(compose.Running(name, lp, ops_for(lp.kind), self._layer_params(name, lp)))
        if not running:
            return base.forward(x), {"x": x, "running": []}
        if len(running) == 1:
            name, lp, ops, params = running[0]
            y, cache = ops.forward(lp, base, params, x, ctx)
            return y, {"x": x, "running": [(name, lp, cache)]}
        y, composed = compose.forward(base, running, x, ctx)
        return y, {"x": x, "running": [(name, lp, None) for name, lp, _, _ in running], "composed": composed}

    def layer_backward(self, module: str, tape: dict[str, Any], dy: np.ndarray) -> dict[str, Any]:
        """Gradients: ``"input"`` -> dL/dx, and each trainable tensor -> its gradient, keyed as
        ``trainable_parameters`` of the active adapters keys it (``"<adapter>/<full key>"`` when several)."""
        base = self._layers[module]
        running = tape["running"]
        if not running:
            return {"input": base.input_grad(tape["x"], dy)}
        if "composed" in tape:
            dx, by_adapter = compose.backward(base, tape["composed"], dy)
        else:
            name, lp, cache = running[0]
            dx, own = ops_for(lp.kind).backward(lp, base, self._layer_params(name, lp), cache, dy)
            by_adapter = {name: own}
        grads: dict[str, Any] = {}
        for name, lp, _ in running:
            own = by_adapter[name]
            grads.update({trainable_key(name, lp.key(k), self._active): v for k, v in own.items()})
        grads["input"] = dx
        return grads

    # -- prompt learning (prefix / prompt tuning; math in kinds/prompt.py) ----------------------------------
    def prompt_table(self, name: str | None = None) -> np.ndarray:
        """The virtual-token table P: prompt tuning [T·S, d], prepended to the input embeddings by
        ``kinds.prompt.prepend_virtual_tokens``; prefix tuning [T, 2L·d] (through the projection MLP when the
        adapter trains one)."""
        from peftdecl_numpy.kinds import prompt

        plan, params = self._prompt_adapter(name)
        return prompt.table(plan.prompt, params)[0].copy()

    def prefix_key_values(self, batch_size: int, name: str | None = None) -> list[tuple[np.ndarray, ...]]:
        """Per decoder layer the prefix (K, V), each (batch, heads, T, head_dim), as PEFT's ``get_prompt``."""
        from peftdecl_numpy.kinds import prompt

        plan, params = self._prompt_adapter(name)
        if plan.kind != "prefix_tuning":
            raise PeftdeclError(f"adapter is {plan.kind}; only prefix tuning has key/value prefixes")
        return prompt.key_values(plan.prompt, prompt.table(plan.prompt, params)[0], batch_size)

    def prompt_backward(self, d_table: np.ndarray, name: str | None = None) -> dict[str, np.ndarray]:
        """Gradients of the adapter's trainable tensors (by key) from dL/dP (for dL/dKV see kinds.prompt)."""
        from peftdecl_numpy.kinds import prompt

        plan, params = self._prompt_adapter(name)
        _, cache = prompt.table(plan.prompt, params)
        return prompt.table_backward(plan.prompt, params, cache, np.asarray(d_table, dtype=np.float64))

    def _prompt_adapter(self, name: str | None) -> tuple[Plan, dict[str, np.ndarray]]:
        names = [name] if name is not None else [n for n in self._active if self._plans[n].prompt is not None]
        if len(names) != 1 or names[0] not in self._plans or self._plans[names[0]].prompt is None:
            found = sorted(n for n, p in self._plans.items() if p.prompt is not None)
            raise PeftdeclError(f"name one prompt-learning adapter (attached: {found}); got {name!r}")
        return self._plans[names[0]], self._params[names[0]][""]

    # -- helpers -------------------------------------------------------------------------------------------
    def _running(self) -> tuple[str, ...]:
        if not self._enabled:
            return ()
        return tuple(n for n in self._active if n not in self._merged)

    def _layer_params(self, name: str, lp: LayerPlan) -> dict[str, np.ndarray]:
        return {**self._params[name].get("", {}), **self._params[name][lp.module]}

    def _mixed_forward(
        self, module: str, base: BaseLayer, x: np.ndarray, names: list[str], ctx: Context
    ) -> tuple[np.ndarray, dict[str, Any]]:
        if len(names) != x.shape[0]:
            raise PeftdeclError(f"adapter_names has {len(names)} entries for a batch of {x.shape[0]} rows")
        check_adapter_names(names, self._plans, merged=bool(self._merged))
        y = base.forward(x)
        for name in dict.fromkeys(names):
            if name == BASE or module not in self._plans[name].targets:
                continue
            lp = self._plans[name].layer(module)
            if not ops_for(lp.kind).additive:
                raise PeftdeclError(
                    f"adapter {name!r} is {lp.kind}; mixed batches support additive kinds only"
                )
            rows = np.array([n == name for n in names])
            y_rows, _ = ops_for(lp.kind).forward(lp, base, self._layer_params(name, lp), x[rows], ctx)
            y[rows] = y_rows
        return y, {"x": x, "running": []}


def inventory(
    state_dict: Mapping[str, Any], layer_types: Mapping[str, Any] | None = None, **model_facts: Any
) -> ModelInfo:
    """Layers of a state dict: every ``m.weight`` of 2+ dims (2-D: linear unless ``layer_types`` says otherwise).

    ``layer_types`` maps a module to ``"linear" | "embedding" | "conv1d" | "conv2d" | "gpt2_conv1d"`` or to a
    dict / LayerInfo giving convolution settings (``stride``, ``padding``, ``dilation``, ``groups``).
    """
    layer_types = dict(layer_types or {})
    layers: dict[str, LayerInfo] = {}
    modules = []
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        if module and module not in modules:
            modules.append(module)
        if leaf != "weight":
            continue
        shape = np.shape(value)
        declared = layer_types.pop(module, None)
        if declared is None and len(shape) != 2:
            continue
        layers[module] = _layer_info(key, shape, declared, f"{module}.bias" in state_dict)
    if layer_types:
        raise PeftdeclError(
            f"layer_types names modules without a weight in the state dict: {sorted(layer_types)}"
        )
    return ModelInfo(layers=layers, modules=tuple(modules), **model_facts)


def _layer_info(key: str, shape: tuple[int, ...], declared: Any, has_bias: bool) -> LayerInfo:
    if isinstance(declared, LayerInfo):
        return declared
    settings = dict(declared) if isinstance(declared, Mapping) else {"type": declared or "linear"}
    kind = settings.pop("type")
    expected_ndim = {"linear": 2, "embedding": 2, "gpt2_conv1d": 2, "conv1d": 3, "conv2d": 4}
    if kind not in expected_ndim:
        raise PeftdeclError(
            f"layer_types[{key[:-7]!r}]: unknown layer type {kind!r}; expected one of {list(expected_ndim)}"
        )
    if len(shape) != expected_ndim[kind]:
        raise PeftdeclError(
            f"{key}: a {kind} weight has {expected_ndim[kind]} dimensions, got shape {list(shape)}"
        )
    if kind == "gpt2_conv1d":
        return LayerInfo(kind, shape[0], shape[1], has_bias)
    if kind == "linear":
        return LayerInfo(kind, shape[1], shape[0], has_bias)
    if kind == "embedding":
        return LayerInfo(kind, shape[0], shape[1], False)
    dims = len(shape) - 2
    groups = int(settings.pop("groups", 1))

    def tup(name: str, default: int) -> tuple[int, ...]:
        value = settings.pop(name, default)
        return tuple(value) if isinstance(value, (list, tuple)) else (int(value),) * dims

    info = LayerInfo(
        kind,
        shape[1] * groups,
        shape[0],
        has_bias,
        kernel_size=tuple(shape[2:]),
        stride=tup("stride", 1),
        padding=tup("padding", 0),
        dilation=tup("dilation", 1),
        groups=groups,
    )
    if settings:
        raise PeftdeclError(f"layer_types[{key[:-7]!r}]: unknown settings {sorted(settings)}")
    return info
