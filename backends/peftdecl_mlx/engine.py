"""The MLX engine: adapters live inside the user's ``mlx.nn.Module`` (targeted layers replaced by
:class:`AdaptedLayer`), the model runs through its normal call, and only active adapter arrays are trainable.

Arrays enter as NumPy (the same initial numbers on every backend) and leave as NumPy with ``mx.eval`` forced first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from peftdecl.backend import check_adapter_names, trainable_key
from peftdecl.errors import BackendError, PeftdeclError
from peftdecl.plan import LayerPlan, ModelInfo, Plan
from peftdecl_mlx.inventory import get_module, quantized_layers, set_module
from peftdecl_mlx.kinds import prompt
from peftdecl_mlx.layer import AdaptedLayer, AdapterParams, SavedModule

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def to_numpy(value: mx.array) -> np.ndarray:
    """A concrete NumPy copy (bfloat16, which NumPy cannot hold, widened to float32)."""
    if value.dtype == mx.bfloat16:
        value = value.astype(mx.float32)
    return np.array(value)


class MlxEngine:
    """A backend engine over one MLX model; see :class:`peftdecl.backend.Engine`."""

    def __init__(self, model: nn.Module, info: ModelInfo, adapter_dtype: str = "float32") -> None:
        if adapter_dtype not in DTYPES:
            raise BackendError(f"adapter_dtype {adapter_dtype!r} is not one of {sorted(DTYPES)}")
        self._model = model
        self._info = info
        self._dtype = DTYPES[adapter_dtype]
        self._quantized = quantized_layers(model)
        self._plans: dict[str, Plan] = {}
        self._layers: dict[str, AdaptedLayer] = {}
        self._saved: dict[str, SavedModule] = {}
        self._active: tuple[str, ...] = ()
        self._enabled = True
        self._merged: list[str] = []
        self._frozen: frozenset[str] = frozenset()
        model.freeze()  # the base model is frozen; adapters unfreeze their own trainable tensors

    @property
    def model(self) -> nn.Module:
        """The MLX model itself (adapted in place): pass it to ``nn.value_and_grad`` and ``optimizer.update``."""
        return self._model

    def layer(self, module: str) -> AdaptedLayer:
        """The wrapper that replaced ``module``."""
        if module not in self._layers:
            raise PeftdeclError(
                f"no adapted layer named {module!r}; adapted: {', '.join(list(self._layers)[:8])}"
            )
        return self._layers[module]

    # -- Engine protocol -----------------------------------------------------------------------------------
    def add(self, name: str, plan: Plan, arrays: Mapping[str, np.ndarray]) -> None:
        if "." in name:
            raise PeftdeclError(f"adapter name {name!r} contains '.', which MLX parameter paths cannot hold")
        for lp in plan.layers:
            if lp.module in self._quantized:
                raise BackendError(
                    f"{lp.module} is a quantised MLX layer ({type(get_module(self._model, lp.module)).__name__}); "
                    "the mlx backend does not adapt quantised bases yet"
                )
        shared = {p.name: self._array(arrays[p.name]) for p in plan.shared}
        if plan.prompt is not None:
            prompt.check_model(self._model, plan)
            if prompt.ENCODER not in self._model:
                self._model[prompt.ENCODER] = nn.Module()
            self._model[prompt.ENCODER][name] = AdapterParams(shared)
            # a new mlx Module is in training mode: it takes the model's
            self._model[prompt.ENCODER].train(self._model.training)
        for lp in plan.layers:
            own = {p.name: self._array(arrays[lp.key(p.name)]) for p in lp.params}
            layer = self._wrap(lp)
            layer.add(name, lp, own, shared)
            layer.train(layer.training)  # the new AdapterParams take the layer's mode
        for module in plan.modules_to_save:
            self._save_module(name, module, arrays)
        self._plans[name] = plan
        self._refresh()

    def remove(self, name: str) -> None:
        plan = self._plans.pop(name)
        for lp in plan.layers:
            layer = self._layers[lp.module]
            layer.remove(name)
            if not layer.adapters:
                set_module(self._model, lp.module, layer.base_layer)
                del self._layers[lp.module]
        for module in plan.modules_to_save:
            saved = self._saved[module]
            del saved.copies[name]
            if not saved.copies:
                set_module(self._model, module, saved.original)
                del self._saved[module]
        if plan.prompt is not None:
            encoder = self._model[prompt.ENCODER]
            del encoder[name]
            if not encoder:
                del self._model[prompt.ENCODER]
        self._active = tuple(n for n in self._active if n != name)
        self._refresh()

    def set_active(self, names: tuple[str, ...]) -> None:
        self._active = tuple(names)
        self._refresh()

    def set_frozen(self, names: frozenset[str]) -> None:
        """Adapters ``names`` stay frozen (not trainable) even while active, as after HF PEFT's inference load."""
        self._frozen = frozenset(names)
        self._refresh()

    def set_enabled(self, enabled: bool) -> None:
        self._enabled = enabled
        self._refresh()

    def export(self, name: str) -> dict[str, np.ndarray]:
        plan = self._plans[name]
        out: dict[str, mx.array] = {}
        for lp in plan.layers:
            out.update({lp.key(k): v for k, v in self._layers[lp.module].adapters[name].tensors().items()})
        if plan.shared:
            out.update(self._shared(name, plan))
        for module in plan.modules_to_save:
            copy = self._saved[module].copies[name]
            out.update({f"{module}.{k}": v for k, v in tree_flatten(copy.parameters())})
        mx.eval(list(out.values()))
        return {k: to_numpy(v) for k, v in out.items()}

    def merge(self, names: tuple[str, ...]) -> None:
        for name in names:
            for lp in self._plans[name].layers:
                self._layers[lp.module].merge(name)
            self._merged.append(name)
        self._refresh()

    def unmerge(self) -> None:
        for name in reversed(self._merged):
            for lp in self._plans[name].layers:
                self._layers[lp.module].unmerge(name)
        self._merged = []
        self._refresh()

    def unload(self) -> nn.Module:
        """The MLX model with every wrapper replaced by its (possibly merged) base layer and the running adapters'
        modules_to_save copies swapped in. The base stays frozen, as HF PEFT leaves it."""
        for module, layer in self._layers.items():
            set_module(self._model, module, layer.base_layer)
        for module, saved in self._saved.items():
            set_module(self._model, module, saved.active_module())
        if prompt.ENCODER in self._model:
            del self._model[prompt.ENCODER]
        self._layers, self._saved = {}, {}
        return self._model

    def base_weight(self, module: str) -> np.ndarray:
        weight = self._layers[module].weight if module in self._layers else self._plain_weight(module)
        mx.eval(weight)
        return to_numpy(weight).astype(np.float64)

    def load_base_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        for key, value in weights.items():
            module = key.removesuffix(".weight").removesuffix(".base_layer")
            target = (
                self._layers[module].base_layer if module in self._layers else self._plain_layer(module, key)
            )
            if tuple(np.shape(value)) != tuple(target.weight.shape):
                raise PeftdeclError(
                    f"{key}: shape {list(np.shape(value))} does not match {list(target.weight.shape)}"
                )
            target.weight = mx.array(np.asarray(value), dtype=target.weight.dtype)
        mx.eval(self._model.parameters())

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The model's own call; NumPy arguments are converted; ``adapter_names`` picks one adapter per row."""
        args = tuple(mx.array(a) if isinstance(a, np.ndarray) else a for a in args)
        running = self._running()
        prompts = [n for n in running if self._plans[n].prompt is not None]
        if prompts:
            if len(running) > 1 or adapter_names is not None:
                raise PeftdeclError(
                    f"{prompts[0]!r} is {self._plans[prompts[0]].kind}; it runs as the only adapter"
                )
            pp = self._plans[prompts[0]].prompt
            embed = get_module(self._model, self._info.word_embeddings or "")
            params = self._model[prompt.ENCODER][prompts[0]].tensors()
            return prompt.forward(self._model, pp, params, embed, *args, **kwargs)
        if adapter_names is None:
            return self._model(*args, **kwargs)
        rows = tuple(adapter_names)
        check_adapter_names(rows, self._plans, merged=bool(self._merged))
        if self._saved:
            raise PeftdeclError(
                f"adapter_names with modules_to_save ({', '.join(self._saved)}) is not supported by the mlx backend"
            )
        for layer in self._layers.values():
            layer.adapter_state.rows = rows
        try:
            return self._model(*args, **kwargs)
        finally:  # a failing call must not leave the row assignment behind (HF PEFT's hooks do, issue #3475)
            for layer in self._layers.values():
                layer.adapter_state.rows = None

    def prompt_cache(self, batch: int = 1) -> list[Any]:
        """KV caches holding the running prefix-tuning adapter's prefix, for step-by-step generation: pass them
        as ``cache=`` to every call (the forward then leaves them as they are)."""
        running = [n for n in self._running() if self._plans[n].kind == "prefix_tuning"]
        if not running:
            raise PeftdeclError("no prefix_tuning adapter is running")
        pp = self._plans[running[0]].prompt
        return prompt.prefilled_cache(
            self._model, pp, self._model[prompt.ENCODER][running[0]].tensors(), batch
        )

    def trainable_parameters(self, names: tuple[str, ...]) -> dict[str, Any]:
        """The MLX parameter tree of the trainable tensors of ``names`` (what ``mlx.optimizers`` expect)."""
        if tuple(names) == self._active:
            return self._model.trainable_parameters()
        self._set_trainable(tuple(names))
        try:
            return self._model.trainable_parameters()
        finally:
            self._set_trainable(self._active)

    def train(self, mode: bool) -> None:
        self._model.train(mode)

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, all) numbers of parameters of the model with its adapters."""
        total = sum(v.size for _, v in tree_flatten(self._model.parameters()))
        return sum(v.size for _, v in tree_flatten(self._model.trainable_parameters())), total

    # -- capture (used by peftdecl.equiv) and explicit layer gradients (used by tests) ---------------------
    def capture(
        self, input_ids: np.ndarray
    ) -> tuple[np.ndarray | None, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """Run the model on ``input_ids`` and return (logits, {adapted module: (its input, its output)})."""
        for layer in self._layers.values():
            layer.adapter_state.capture = []
        try:
            out = self.forward(mx.array(np.asarray(input_ids)))
            records = {m: layer.adapter_state.capture for m, layer in self._layers.items()}
            mx.eval(out, [pair for rec in records.values() for pair in rec])
        finally:
            for layer in self._layers.values():
                layer.adapter_state.capture = None
        layers = {m: (to_numpy(rec[0][0]), to_numpy(rec[0][1])) for m, rec in records.items() if rec}
        logits = to_numpy(out) if isinstance(out, mx.array) else None
        return logits, layers

    def layer_vjp(self, module: str, x: Any, dy: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(y, grads) of one adapted layer for the loss Σ y ⊙ dy: ``"input"`` -> dL/dx (not for embeddings) and
        each trainable tensor's full IR key (``"<adapter>/<key>"`` while several are active, as the NumPy
        engine keys them) -> its gradient, by ``mx.value_and_grad``."""
        layer = self.layer(module)
        x = (
            mx.array(np.asarray(x))
            if layer.layer_type == "embedding"
            else mx.array(np.asarray(x), dtype=self._dtype)
        )
        dy = mx.array(np.asarray(dy), dtype=mx.float32)
        original = layer.trainable_parameters()
        wants_input = layer.layer_type != "embedding"

        def loss(params: Any, inputs: mx.array) -> tuple[mx.array, mx.array]:
            layer.update(params)
            out = layer(inputs)
            return mx.sum(out.astype(mx.float32) * dy), out

        try:  # one call, so that dropout draws are made once
            (_, y), grads = mx.value_and_grad(loss, argnums=(0, 1) if wants_input else 0)(original, x)
        finally:
            layer.update(original)
        param_grads, input_grad = grads if wants_input else (grads, None)
        out = {}
        for path, value in tree_flatten(param_grads):
            _, name, tensor = path.split(".", 2)  # adapters.<name>.<IR tensor name>
            out[trainable_key(name, f"{module}.{tensor}", self._active)] = value
        if input_grad is not None:
            out["input"] = input_grad
        mx.eval(y, list(out.values()))
        return to_numpy(y), {k: to_numpy(v) for k, v in out.items()}

    # -- helpers -------------------------------------------------------------------------------------------
    def _array(self, value: Any) -> mx.array:
        return mx.array(np.asarray(value, dtype=np.float32), dtype=self._dtype)

    def _wrap(self, lp: LayerPlan) -> AdaptedLayer:
        if lp.module not in self._layers:
            if lp.module in self._saved:
                raise PeftdeclError(
                    f"{lp.module} is in modules_to_save of another adapter and cannot be adapted"
                )
            base = get_module(self._model, lp.module)
            layer = AdaptedLayer(lp.module, base, lp.layer.type, self._dtype)
            layer.train(base.training)  # a new mlx Module is in training mode; take the layer's
            set_module(self._model, lp.module, layer)
            self._layers[lp.module] = layer
        return self._layers[lp.module]

    def _save_module(self, name: str, module: str, arrays: Mapping[str, np.ndarray]) -> None:
        import copy

        if module in self._layers:
            raise PeftdeclError(f"{module} carries adapters and cannot also be in modules_to_save")
        if module not in self._saved:
            original = get_module(self._model, module)
            saved = SavedModule(module, original)
            saved.train(original.training)  # a new mlx Module is in training mode; take the module's
            set_module(self._model, module, saved)
            self._saved[module] = saved
        saved = self._saved[module]
        clone = copy.deepcopy(saved.original)
        prefix = module + "."
        own = [(k[len(prefix) :], mx.array(np.asarray(v))) for k, v in arrays.items() if k.startswith(prefix)]
        if own:
            clone.update(tree_unflatten(own))
        saved.copies[name] = clone

    def _shared(self, name: str, plan: Plan) -> dict[str, mx.array]:
        if plan.prompt is not None:
            return self._model[prompt.ENCODER][name].tensors()
        for lp in plan.layers:
            return dict(self._layers[lp.module].adapter_state.shared[name])
        return {}

    def _running(self) -> tuple[str, ...]:
        if not self._enabled:
            return ()
        return tuple(n for n in self._active if n not in self._merged)

    def _refresh(self) -> None:
        running = self._running()
        for layer in self._layers.values():
            layer.adapter_state.running = tuple(n for n in running if n in layer.adapters)
        # a whole-module copy is not merged into anything: it serves while its adapter is active and enabled
        active = self._active if self._enabled else ()
        for saved in self._saved.values():
            saved.current = next((n for n in active if n in saved.copies), None)
        self._set_trainable(self._active)

    def _set_trainable(self, names: tuple[str, ...]) -> None:
        names = tuple(n for n in names if n not in self._frozen)
        for layer in self._layers.values():
            for name, params in layer.adapters.items():
                lp = layer.adapter_state.plans[name]
                params.set_trainable(
                    [p.name for p in lp.params if p.role == "trainable"] if name in names else []
                )
        for saved in self._saved.values():
            for name, clone in saved.copies.items():
                if name in names:
                    clone.unfreeze()
                else:
                    clone.freeze()
        for name, params in self._model[prompt.ENCODER].items() if prompt.ENCODER in self._model else ():
            specs = self._plans[name].shared
            params.set_trainable([p.name for p in specs if p.role == "trainable"] if name in names else [])

    def _plain_layer(self, module: str, key: str) -> nn.Module:
        try:
            found = get_module(self._model, module)
        except (KeyError, IndexError, ValueError):
            raise PeftdeclError(f"{key}: the model has no layer {module!r} to load it into") from None
        if not hasattr(found, "weight"):
            raise PeftdeclError(f"{key}: {module!r} has no weight")
        return found

    def _plain_weight(self, module: str) -> mx.array:
        if module in self._quantized:
            raise BackendError(
                f"{module} is quantised; the mlx backend cannot read its weight as an array yet"
            )
        return self._plain_layer(module, module).weight
