"""The MLX engine: adapters live inside the user's ``mlx.nn.Module`` (targeted layers replaced by
:class:`AdaptedLayer`), the model runs through its normal call, and only active adapter arrays are trainable.

Which adapters exist, run and train is the model's :class:`peftdecl.adapter_book.AdapterBook`, read here and never
copied; the engine keeps the physical state only (wrappers, saved-module copies, the generator). Arrays enter as
NumPy (the same initial numbers on every backend) and leave as NumPy with ``mx.eval`` forced first.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import numpy.typing as npt
from mlx.utils import tree_unflatten

from peftdecl.adapter_book import AdapterBook
from peftdecl.backend import RngState, check_adapter_names
from peftdecl.bias_training import trained_bias_keys
from peftdecl.errors import BackendError, PeftdeclError
from peftdecl.layer_replication import MERGE_REFUSAL
from peftdecl.options import EngineOptions
from peftdecl.plan import LayerPlan, ModelInfo, Plan
from peftdecl_mlx import probes, quantized
from peftdecl_mlx.base_biases import base_bias_paths, bias_values, set_bias_trainability, write_biases
from peftdecl_mlx.generator import Generator
from peftdecl_mlx.inventory import flatten, get_module, inventory, set_module, walk
from peftdecl_mlx.kinds import prompt
from peftdecl_mlx.kinds.alora import invocation_rows
from peftdecl_mlx.layer import AdaptedLayer, AdapterParams, SavedModule
from peftdecl_mlx.probes import to_numpy
from peftdecl_mlx.replication import BASE_WRITE_REFUSAL, BIAS_REFUSAL, replicate_layers
from peftdecl_mlx.trainable import TrainableTree, trainable_names

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class MlxEngine(TrainableTree):
    """A backend engine over one MLX model; see :class:`peftdecl.backend.Engine`."""

    def __init__(
        self,
        model: nn.Module,
        info: ModelInfo,
        book: AdapterBook,
        options: EngineOptions,
        adapter_dtype: str = "float32",
    ) -> None:
        if adapter_dtype not in DTYPES:
            raise BackendError(f"adapter_dtype {adapter_dtype!r} is not one of {sorted(DTYPES)}")
        self._model = model
        self._info = info
        self._book = book
        self._options = options
        self._dtype = DTYPES[adapter_dtype]
        self._generator = Generator(model, options.seed)
        self._layers: dict[str, AdaptedLayer] = {}
        self._saved: dict[str, SavedModule] = {}
        self._replicated = False  # layer_replication rebuilt the layer list: copies share base weights
        model.freeze()  # the base model is frozen; adapters unfreeze their own trainable tensors

    @property
    def model(self) -> nn.Module:
        """The MLX model itself (adapted in place): pass it to ``nn.value_and_grad`` and ``optimizer.update``."""
        return self._model

    @property
    def options(self) -> EngineOptions:
        return self._options

    @property
    def adapter_dtype(self) -> mx.Dtype:
        return self._dtype

    @property
    def layers(self) -> Mapping[str, AdaptedLayer]:
        """Adapted module name -> the wrapper that replaced it."""
        return self._layers

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
        if self._replicated and trained_bias_keys(plan, base_bias_paths(self._model)):
            raise PeftdeclError(f"$.bias: {getattr(plan.spec, 'bias', None)!r}: {BIAS_REFUSAL}")
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
        self.sync()

    def remove(self, name: str) -> None:
        plan = self._book.plans[name]
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

    def replace_plan(self, name: str, plan: Plan) -> None:
        """Adapter ``name`` runs ``plan`` (already in the book): every array stays where it is, so the model's
        parameter tree keeps its keys and arrays (an optimizer's state stays valid)."""
        for lp in plan.layers:
            self._layers[lp.module].replace_plan(name, lp)
        self.sync()

    def sync(self) -> None:
        """Bring the wrappers in line with the book: running adapters per layer, saved copies, trainability."""
        self._refresh(self._book.merged)

    def export(self, name: str) -> dict[str, np.ndarray]:
        plan = self._book.plans[name]
        out: dict[str, mx.array] = {}
        for lp in plan.layers:
            out.update({lp.key(k): v for k, v in self._layers[lp.module].adapters[name].tensors().items()})
        if plan.shared:
            out.update(self._shared(name, plan))
        for module in plan.modules_to_save:
            copy_ = self._saved[module].copies[name]
            out.update({f"{module}.{k}": v for k, v in flatten(copy_.parameters())})
        out.update(bias_values(self._model, self._book, name))
        mx.eval(list(out.values()))
        return {k: to_numpy(v) for k, v in out.items()}

    def merge(self, names: tuple[str, ...]) -> None:
        if self._replicated:
            raise PeftdeclError(MERGE_REFUSAL)
        for name in names:
            for lp in self._book.plans[name].layers:
                self._layers[lp.module].merge(name)
        # the model records the merge in the book after this returns
        self._refresh((*self._book.merged, *names))

    def unmerge(self) -> None:
        for name in reversed(self._book.merged):
            for lp in self._book.plans[name].layers:
                self._layers[lp.module].unmerge(name)
        # the model clears the book's merged list after this returns
        self._refresh(())

    def unload(self, dequantize: bool = False) -> nn.Module:
        """The MLX model with every wrapper replaced by its (possibly merged) base layer and the running adapters'
        modules_to_save copies swapped in. The base stays frozen, as HF PEFT leaves it. ``dequantize``: every
        ``nn.QuantizedLinear`` / ``nn.QuantizedEmbedding`` becomes an ``nn.Linear`` / ``nn.Embedding`` holding its
        dequantised weight, merged adapters added in full precision (mlx-lm's ``fuse(dequantize=True)``)."""
        for module, layer in self._layers.items():
            if dequantize:
                layer.dequantize_base()
            set_module(self._model, module, layer.base_layer)
        for module, saved in self._saved.items():
            set_module(self._model, module, saved.active_module())
        if prompt.ENCODER in self._model:
            del self._model[prompt.ENCODER]
        self._generator.detach()
        self._layers, self._saved = {}, {}
        if dequantize:
            for module, found in [(n, m) for n, m in walk(self._model) if quantized.is_quantized(m)]:
                set_module(self._model, module, quantized.dequantized_layer(found))
        return self._model

    def base_weight(self, module: str) -> np.ndarray:
        """The base weight in the IR layout as float64 NumPy (the dtype the initialisers compute in)."""
        weight = self._layers[module].weight if module in self._layers else self._plain_weight(module)
        mx.eval(weight)
        return to_numpy(weight).astype(np.float64)

    def replicate_layers(self, layer_map: Sequence[tuple[int, int]]) -> ModelInfo:
        """HF PEFT's ``layer_replication`` on the model (:mod:`peftdecl_mlx.replication`); its new inventory."""
        replicate_layers(self._model, layer_map)
        self._info, self._replicated = inventory(self._model), True
        return self._info

    def load_base_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        if self._replicated:
            raise PeftdeclError(f"{', '.join(list(weights)[:3])}: {BASE_WRITE_REFUSAL}")
        write_biases(self._model, {k: v for k, v in weights.items() if k.endswith(".bias")})
        for key, value in weights.items():
            if key.endswith(".bias"):
                continue
            module = key.removesuffix(".weight").removesuffix(".base_layer")
            target = (
                self._layers[module].base_layer if module in self._layers else self._plain_layer(module, key)
            )
            # a quantised layer takes the dense weight and quantises it with its own bits and group size
            shape = (
                quantized.dequantize(target).shape if quantized.is_quantized(target) else target.weight.shape
            )
            if tuple(np.shape(value)) != tuple(shape):
                raise PeftdeclError(f"{key}: shape {list(np.shape(value))} does not match {list(shape)}")
            if quantized.is_quantized(target):
                # a saved copy of the layer's own dequantised weight (PEFT saves a targeted head's base) keeps its
                # codes: re-quantising it would move them
                current = np.asarray(quantized.dequantize(target).astype(mx.float32))
                if not np.array_equal(np.asarray(value, np.float32), current):
                    quantized.requantize(target, mx.array(np.asarray(value)))
            else:
                target.weight = mx.array(np.asarray(value), dtype=target.weight.dtype)
        mx.eval(self._model.parameters())

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The model's own call; NumPy arguments are converted; ``adapter_names`` picks one adapter per row; aLoRA
        adapters find their invocation in the token ids (:func:`peftdecl_mlx.kinds.alora.invocation_rows`)."""
        args = tuple(mx.array(a) if isinstance(a, np.ndarray) else a for a in args)
        with invocation_rows(self._book, args, kwargs, adapter_names):
            return self._forward(args, adapter_names, kwargs)

    def _forward(
        self, args: tuple[Any, ...], adapter_names: Sequence[str] | None, kwargs: dict[str, Any]
    ) -> Any:
        running = self._book.running()
        plans = self._book.plans
        prompts = [n for n in running if plans[n].prompt is not None]
        if prompts:
            if len(running) > 1 or adapter_names is not None:
                raise PeftdeclError(
                    f"{prompts[0]!r} is {plans[prompts[0]].kind}; it runs as the only adapter"
                )
            pp = plans[prompts[0]].prompt
            assert pp is not None
            embed = get_module(self._model, self._info.word_embeddings or "")
            params = self._model[prompt.ENCODER][prompts[0]].tensors()
            return prompt.forward(self._model, pp, params, embed, *args, **kwargs)
        if adapter_names is None:
            return self._model(*args, **kwargs)
        rows = tuple(adapter_names)
        check_adapter_names(rows, plans, merged=bool(self._book.merged))
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

    def prompt_cache(self, batch: int = 1) -> list[prompt.KVCache]:
        """KV caches holding the running prefix-tuning adapter's prefix, for step-by-step generation: pass them
        as ``cache=`` to every call (the forward then leaves them as they are)."""
        running = [n for n in self._book.running() if self._book.plans[n].kind == "prefix_tuning"]
        if not running:
            raise PeftdeclError("no prefix_tuning adapter is running")
        pp = self._book.plans[running[0]].prompt
        assert pp is not None
        return prompt.prefilled_cache(
            self._model, pp, self._model[prompt.ENCODER][running[0]].tensors(), batch
        )

    # -- training (trainable_parameters, parameter_tree, update_parameters: TrainableTree) ------------------
    def train(self, mode: bool) -> None:
        self._model.train(mode)

    def get_rng_state(self) -> RngState:
        """The engine generator's key (``{"key": uint32 array}``): dropout masks and block drops come from it."""
        return self._generator.get_state()

    def set_rng_state(self, state: RngState) -> None:
        self._generator.set_state(state)

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, all) numbers of parameters of the model with its adapters; a quantised layer's weight counts
        its elements once (not its packed words, scales and biases), as PEFT counts a 4-bit weight; an array that
        layer copies share (layer_replication) counts once, as PEFT counts a shared parameter."""
        total = sum(v.size for v in {id(v): v for _, v in flatten(self._model.parameters())}.values())
        for found in {id(m.weight): m for _, m in walk(self._model) if quantized.is_quantized(m)}.values():
            total += quantized.element_count(found) - sum(v.size for v in quantized.codes(found).values())
        return sum(v.size for _, v in flatten(self._model.trainable_parameters())), total

    # -- capture (used by peftdecl.equiv) and explicit layer gradients (used by tests) ---------------------
    def capture(
        self, input_ids: np.ndarray
    ) -> tuple[np.ndarray | None, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """Run the model on ``input_ids`` and return (logits, {adapted module: (its input, its output)})."""
        return probes.capture(self, input_ids)

    def layer_vjp(
        self, module: str, x: npt.ArrayLike, dy: npt.ArrayLike
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(y, grads) of one adapted layer for the loss Σ y ⊙ dy; see :func:`peftdecl_mlx.probes.layer_vjp`."""
        return probes.layer_vjp(self, self.layer(module), dy=dy, x=x, active=self._book.active)

    # -- helpers -------------------------------------------------------------------------------------------
    def _array(self, value: npt.ArrayLike) -> mx.array:
        return mx.array(np.asarray(value, dtype=np.float32), dtype=self._dtype)

    def _wrap(self, lp: LayerPlan) -> AdaptedLayer:
        if lp.module not in self._layers:
            if lp.module in self._saved:
                raise PeftdeclError(
                    f"{lp.module} is in modules_to_save of another adapter and cannot be adapted"
                )
            base = get_module(self._model, lp.module)
            layer = AdaptedLayer(lp.module, base, lp.layer.type, self._dtype, self._options, self._generator)
            layer.train(base.training)  # a new mlx Module is in training mode; take the layer's
            set_module(self._model, lp.module, layer)
            self._layers[lp.module] = layer
        return self._layers[lp.module]

    def _save_module(self, name: str, module: str, arrays: Mapping[str, np.ndarray]) -> None:
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
            encoder: AdapterParams = self._model[prompt.ENCODER][name]
            return encoder.tensors()
        for lp in plan.layers:
            return dict(self._layers[lp.module].adapter_state.shared[name])
        return {}

    def _refresh(self, merged: Collection[str]) -> None:
        """Running adapters per layer (``merged``: the adapters folded into the weights, which may be ahead of
        the book during merge and unmerge), the modules_to_save copy in use, and trainability."""
        book = self._book
        running = tuple(n for n in book.active if n not in merged) if book.enabled else ()
        for layer in self._layers.values():
            layer.adapter_state.running = tuple(n for n in running if n in layer.adapters)
        # a whole-module copy is not merged into anything: it serves while its adapter is active and enabled
        active = book.active if book.enabled else ()
        for saved in self._saved.values():
            saved.current = next((n for n in active if n in saved.copies), None)
        trainable = book.trainable(book.active)
        for layer in self._layers.values():
            for name, params in layer.adapters.items():
                params.set_trainable(
                    trainable_names(layer.adapter_state.plans[name].params, name in trainable)
                )
        for saved in self._saved.values():
            for name, clone in saved.copies.items():
                clone.unfreeze() if name in trainable else clone.freeze()
        for name, params in self._model[prompt.ENCODER].items() if prompt.ENCODER in self._model else ():
            params.set_trainable(trainable_names(book.plans[name].shared, name in trainable))
        set_bias_trainability(self._model, book)

    def _plain_layer(self, module: str, key: str) -> nn.Module:
        try:
            found: nn.Module = get_module(self._model, module)
        except (KeyError, IndexError, ValueError):
            raise PeftdeclError(f"{key}: the model has no layer {module!r} to load it into") from None
        if not hasattr(found, "weight"):
            raise PeftdeclError(f"{key}: {module!r} has no weight")
        return found

    def _plain_weight(self, module: str) -> mx.array:
        layer = self._plain_layer(module, module)
        if quantized.is_quantized(layer):
            return quantized.dequantize(layer)
        weight: mx.array = layer.weight
        return weight
