"""The NumPy reference engine: a state dict (name -> array) with adapters, computed layer by layer.

The model is a mapping of parameter names to arrays; a module ``m`` owns ``m.weight`` (and ``m.bias``). Calling
the adapted model runs one layer: ``model("layers.0.q_proj", x)``. ``layer_forward`` / ``layer_backward`` expose
the explicit gradients the reference is checked with. The arrays live in an array-API namespace ``xp`` (NumPy by
default) in one ``dtype`` (float64 by default); which adapters run comes from the model's
:class:`peftdecl.adapter_book.AdapterBook`. A quantised layer (bitsandbytes 4-/8-bit, MLX affine) computes with
its dequantised weight; merging into it re-quantises (:mod:`peftdecl_numpy.quantized`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TypedDict

import numpy as np
import numpy.typing as npt

from peftdecl.adapter_book import AdapterBook
from peftdecl.backend import BASE_ROW as BASE
from peftdecl.backend import RngState, check_adapter_names, trainable_key
from peftdecl.errors import PeftdeclError
from peftdecl.options import EngineOptions
from peftdecl.plan import LayerPlan, ModelInfo, Plan
from peftdecl.quant.layouts import dequantize, tensors_from_quantized
from peftdecl_numpy import compose
from peftdecl_numpy.base_biases import BaseBiases
from peftdecl_numpy.kinds import ops_for
from peftdecl_numpy.kinds.base import MergeCache, NumpyOps, Tape
from peftdecl_numpy.layers import BaseLayer, Mode, ModeView
from peftdecl_numpy.mha import mha_base_layer, mha_state
from peftdecl_numpy.parameters import ParameterWeights
from peftdecl_numpy.prompt_access import PromptLearning
from peftdecl_numpy.quantized import StoredWeight, read_stored, requantize
from peftdecl_numpy.rng_state import generator_state, restore_generator
from peftdecl_numpy.xp_ops import Array, Namespace, resolve, to_numpy

Tensors = dict[str, Array]


class _LayerTapeBase(TypedDict):
    x: Array
    running: list[tuple[str, LayerPlan, Tape | None]]
    """(adapter, layer plan, its own tape: set when it runs alone, None when ``composed`` holds the tapes)."""


class LayerTape(_LayerTapeBase, total=False):
    """What :meth:`NumpyEngine.layer_forward` records for :meth:`NumpyEngine.layer_backward`."""

    composed: compose.ComposedTape
    """Set when several adapters run on the layer."""


class NumpyEngine(PromptLearning, ModeView):
    """Adapters on a state dict, every number in one namespace and dtype (float64 NumPy by default)."""

    def __init__(
        self,
        state_dict: Mapping[str, npt.ArrayLike],
        info: ModelInfo,
        book: AdapterBook | None = None,
        options: EngineOptions | None = None,
        *,
        xp: Namespace | None = None,
        dtype: str = "float64",
    ) -> None:
        self.book = AdapterBook() if book is None else book
        self.options = EngineOptions() if options is None else options
        self.xp = resolve(xp)
        self.dtype_name = dtype
        self.dtype = getattr(self.xp, dtype)
        self._original = dict(state_dict)
        self._info = info
        self.mode = Mode(rng=np.random.default_rng(self.options.seed))  # shared by every layer
        self._layers: dict[str, BaseLayer] = {}
        self._stored: dict[str, StoredWeight] = {}  # quantised layers: their codes
        for module, layer in info.layers.items():
            if layer.type == "mha":  # in_proj and out_proj weights, stacked (peftdecl_numpy.mha)
                self._layers[module] = mha_base_layer(state_dict, module, layer, self._asarray, self.mode)
                continue
            if layer.quantization is not None:
                stored = read_stored(state_dict, module, layer)
                if stored is None:
                    continue  # never read as numbers: the model refuses plans that target it
                self._stored[module] = stored
                weight = dequantize(stored.original)
            else:
                weight = np.asarray(state_dict[f"{module}.weight"])
            if layer.type == "gpt2_conv1d":
                weight = weight.T  # GPT-2 Conv1D stores [in, out]; the IR is [out, in]
            bias = state_dict.get(f"{module}.bias")
            own_bias = None if bias is None else self._asarray(bias)
            self._layers[module] = BaseLayer(layer, self._asarray(weight), own_bias, self.mode)
        self._params: dict[str, dict[str, Tensors]] = {}  # adapter -> module ("" shared) -> name -> array
        self._saved: dict[str, Tensors] = {}  # adapter -> modules_to_save copies
        self._merge_caches: dict[tuple[str, str], MergeCache] = {}  # (adapter, module) -> kept until unmerge
        self._biases = BaseBiases(self._original, self._layers, self._asarray)  # HF PEFT's bias option
        self._parameters = ParameterWeights(self._original, self.book, self._asarray)  # target_parameters

    # -- Engine protocol -----------------------------------------------------------------------------------
    def add(self, name: str, plan: Plan, arrays: Mapping[str, np.ndarray]) -> None:
        by_module: dict[str, Tensors] = {}
        self._parameters.check(name, plan)
        for lp in plan.layers:
            if lp.layer.type != "parameter":  # a raw parameter is no layer (peftdecl_numpy.parameters)
                self._layer(lp.module)
            by_module[lp.module] = {p.name: self._asarray(arrays[lp.key(p.name)]) for p in lp.params}
        for p in plan.shared:
            by_module.setdefault("", {})[p.name] = self._asarray(arrays[p.name])
        saved = {}
        for module in plan.modules_to_save:
            prefix = module + "."
            own: dict[str, npt.ArrayLike] = {k: v for k, v in arrays.items() if k.startswith(prefix)}
            if not own:
                own = {k: v for k, v in self._original.items() if k.startswith(prefix)}
            saved.update({k: self._asarray(v) for k, v in own.items()})
        self._params[name], self._saved[name] = by_module, saved

    def remove(self, name: str) -> None:
        del self._params[name], self._saved[name]

    def replace_plan(self, name: str, plan: Plan) -> None:
        """Adapter ``name`` runs ``plan`` (already in the book) from now on; its arrays stay the same objects,
        so an optimiser holding them keeps working. Refused when a tensor's shape would change."""
        own = self._params[name]
        for lp in plan.layers:
            for spec in lp.params:
                current = own.get(lp.module, {}).get(spec.name)
                if current is None or tuple(current.shape) != tuple(spec.shape):
                    raise PeftdeclError(
                        f"{lp.key(spec.name)}: the new plan needs shape {list(spec.shape)}; the adapter has "
                        f"{None if current is None else list(current.shape)} (attach it again instead)"
                    )

    def sync(self) -> None:
        """Nothing to bring in line: which adapters run and train is read from the book at every call."""

    def export(self, name: str) -> dict[str, np.ndarray]:
        plan, params = self.book.plans[name], self._params[name]
        out = {lp.key(k): to_numpy(v) for lp in plan.layers for k, v in params[lp.module].items()}
        out.update({k: to_numpy(v) for k, v in params.get("", {}).items()})
        out.update({k: to_numpy(v) for k, v in self._saved[name].items()})
        out.update({k: to_numpy(v) for k, v in self._biases.trained(plan).items()})
        return out

    def merge(self, names: tuple[str, ...]) -> None:
        """Merge each adapter in turn into the weights as they are (with several, the order matters)."""
        for name in names:
            for lp in self.book.plans[name].layers:
                if lp.layer.type == "parameter":  # W ← W + ΔW on the state dict's tensor
                    self._parameters.merge(lp, self._layer_params(name, lp))
                    continue
                layer = self._layers[lp.module]
                if layer.unmerged is None:
                    layer.unmerged = layer.weight
                cache = self._merge_caches.setdefault((name, lp.module), {})
                params, stored = self._layer_params(name, lp), self._stored.get(lp.module)
                if stored is not None:  # the same merge in full precision, for unload(dequantize=True)
                    shadow = layer if stored.full is None else dataclasses.replace(layer, weight=stored.full)
                    stored.full = ops_for(lp.kind).merge(lp, shadow, params, {})[0]
                layer.weight, layer.bias = ops_for(lp.kind).merge(lp, layer, params, cache)
                if stored is not None:
                    stored.current = requantize(lp.module, stored.current, to_numpy(layer.weight))
                    layer.weight = self._asarray(dequantize(stored.current))

    def unmerge(self) -> None:
        """Take the merged adapters (the book's ``merged``) out again, last merged first."""
        for name in reversed(self.book.merged):
            for lp in self.book.plans[name].layers:
                if lp.layer.type == "parameter":
                    continue  # every merged parameter is restored below
                layer = self._layers[lp.module]
                cache = self._merge_caches.pop((name, lp.module), {})
                params = self._layer_params(name, lp)
                layer.weight, layer.bias = ops_for(lp.kind).unmerge(lp, layer, params, cache)
        self._parameters.unmerge()
        for layer in self._layers.values():
            layer.unmerged = None
        for module, stored in self._stored.items():  # the loaded codes again, exactly
            if stored.merged:
                stored.current, stored.full = stored.original, None
                self._layers[module].weight = self._asarray(dequantize(stored.original))

    def unload(self, dequantize: bool = False) -> dict[str, np.ndarray]:
        """A new state dict: merged weights in the original layouts, modules_to_save copies swapped in.

        A quantised layer keeps its library's tensors (re-quantised where merged); with ``dequantize`` it becomes
        ``<module>.weight`` in the engine's dtype (the full-precision merged weight where merged) instead."""
        # float tensors in the engine's dtype; integer ones and a quantised layer's own tensors as they are
        packed = tuple(f"{m}." for m, layer in self._info.layers.items() if layer.quantization is not None)
        out = {
            k: np.array(v) if k.startswith(packed) else _host_copy(v, self.dtype_name)
            for k, v in self._original.items()
        }
        for module, layer in self._layers.items():
            weight, stored = to_numpy(layer.weight), self._stored.get(module)
            if stored is not None and not dequantize:
                out.update(tensors_from_quantized(module, stored.current) if stored.merged else {})
            elif stored is not None:
                for key in stored.keys(module):
                    out.pop(key, None)
                out[f"{module}.weight"] = weight if stored.full is None else to_numpy(stored.full)
            elif layer.info.type == "mha":
                bias = None if layer.bias is None else to_numpy(layer.bias)
                out.update(mha_state(module, weight, bias, layer.info))
                continue
            else:
                out[f"{module}.weight"] = weight.T.copy() if layer.info.type == "gpt2_conv1d" else weight
            if layer.bias is not None:
                out[f"{module}.bias"] = to_numpy(layer.bias)
        out.update(self._parameters.unloaded())
        out.update({k: to_numpy(v) for k, v in self._biases.unloaded().items()})
        for name in self.book.active:
            out.update({k: to_numpy(v) for k, v in self._saved[name].items()})
        return out

    def base_weight(self, module: str) -> np.ndarray:
        """The current base weight in the IR layout, as NumPy in the engine's dtype (a targeted raw parameter where an
        adapter keys one at ``module``)."""
        found = self._parameters.weight_at(module)
        return to_numpy(self._layer(module).weight if found is None else found)

    def load_base_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        self._biases.load({k: v for k, v in weights.items() if k.endswith(".bias")})
        for key, value in weights.items():
            if key.endswith(".bias"):
                continue
            module = key.removesuffix(".weight").removesuffix(".base_layer")
            if module not in self._layers:
                raise PeftdeclError(f"{key}: the model has no layer {module!r} to load it into")
            array, expected = np.asarray(value), tuple(self._layers[module].weight.shape)
            if array.shape != expected:  # as the torch and MLX engines refuse it: not later, in a forward
                raise PeftdeclError(
                    f"{key}: shape {list(array.shape)} does not fit {module}'s weight {list(expected)}"
                )
            stored = self._stored.get(module)
            if stored is not None:  # a float weight loaded into a quantised layer is stored quantised
                stored.original = stored.current = requantize(module, stored.original, array, warn=False)
                stored.full = None
                array = dequantize(stored.original)
            self._layers[module].weight = self._asarray(array)

    def forward(self, module: str, x: Array, *, adapter_names: Sequence[str] | None = None) -> Array:
        """The output of one layer (``adapter_names``: one adapter per row of a batch, ``"__base__"`` for none)."""
        y, _ = self.layer_forward(module, x, adapter_names=adapter_names)
        return y

    def trainable_parameters(self, names: tuple[str, ...]) -> dict[str, Array]:
        """Key -> the live array (an optimiser may update it in place): the full IR key with one adapter,
        ``"<adapter>/<full key>"`` with several (:func:`peftdecl.backend.trainable_key`); frozen adapters are left
        out."""
        out = {}
        names = self.book.trainable(names)
        for name in names:
            plan = self.book.plans[name]
            own = {}
            for lp in plan.layers:
                for spec in lp.params:
                    if spec.role == "trainable":
                        own[lp.key(spec.name)] = self._params[name][lp.module][spec.name]
            for spec in plan.shared:
                if spec.role == "trainable":
                    own[spec.name] = self._params[name][""][spec.name]
            own.update(self._saved[name])
            own.update(self._biases.trained(plan))
            out.update({trainable_key(name, k, names): v for k, v in own.items()})
        return out

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, all) numbers of parameters: the state dict's float arrays plus every adapter's trainable
        tensors and modules_to_save copies (frozen tensors are buffers in PEFT, not parameters)."""
        # a quantised layer counts its weight's elements once, as PEFT counts a 4-bit weight (not its state)
        quantised = {key for module, stored in self._stored.items() for key in stored.keys(module)}
        base = sum(
            np.size(v)
            for k, v in self._original.items()
            if np.asarray(v).dtype.kind == "f" and k not in quantised
        )
        base += sum(int(np.prod(stored.original.shape)) for stored in self._stored.values())
        own = {name: self.trainable_parameters((name,)) for name in self.book.plans}
        every = {name: sum(int(np.prod(v.shape)) for v in arrays.values()) for name, arrays in own.items()}
        trainable = sum(every[n] for n in self.book.trainable(self.book.active))
        return trainable, base + sum(every.values())

    def train(self, mode: bool) -> None:
        self.mode.training = mode

    def get_rng_state(self) -> RngState:
        return generator_state(self.mode.rng)

    def set_rng_state(self, state: RngState) -> None:
        restore_generator(self.mode.rng, state)

    # -- explicit forward / backward -----------------------------------------------------------------------
    def layer_forward(
        self, module: str, x: Array, *, adapter_names: Sequence[str] | None = None
    ) -> tuple[Array, LayerTape]:
        """(y, tape) for one layer; pass the tape to :meth:`layer_backward`."""
        self._parameters.refuse_forward(module)
        layer = self._layer(module)
        x = self.xp.asarray(np.asarray(x)) if layer.info.type == "embedding" else self._asarray(x, copy=False)
        if adapter_names is not None:
            return self._mixed_forward(module, layer, x, list(adapter_names))
        running = [
            compose.Running(name, lp, self.kind_ops(lp.kind), self._layer_params(name, lp))
            for name, lp in self.book.running_on(module)
        ]
        if not running:
            return layer.forward(x), {"x": x, "running": []}
        if len(running) == 1:
            name, lp, ops, params = running[0]
            y, tape = ops.record(lp, layer, params, x)
            return y, {"x": x, "running": [(name, lp, tape)]}
        y, composed = compose.forward(layer, running, x)
        return y, {"x": x, "running": [(name, lp, None) for name, lp, _, _ in running], "composed": composed}

    def layer_backward(self, module: str, tape: LayerTape, dy: Array) -> dict[str, Array | None]:
        """Gradients: ``"input"`` -> dL/dx, and each trainable tensor -> its gradient, keyed as
        ``trainable_parameters`` of the active adapters keys it (``"<adapter>/<full key>"`` when several)."""
        layer = self._layer(module)
        dy = self._asarray(dy, copy=False)
        running = tape["running"]
        if not running:
            return {
                "input": layer.input_grad(tape["x"], dy),
                **self._biases.gradients(self.book, module, layer, dy),
            }
        if "composed" in tape:
            dx, by_adapter = compose.backward(layer, tape["composed"], dy)
        else:
            name, lp, own_tape = running[0]
            assert own_tape is not None  # one adapter alone records its own tape
            dx, own = self.kind_ops(lp.kind).backward(lp, layer, self._layer_params(name, lp), own_tape, dy)
            by_adapter = {name: own}
        grads: dict[str, Array | None] = {}
        for name, lp, _ in running:
            own = by_adapter[name]
            grads.update({trainable_key(name, lp.key(k), self.book.active): v for k, v in own.items()})
        grads.update(self._biases.gradients(self.book, module, layer, dy))
        grads["input"] = dx
        return grads

    def effective_parameter(self, parameter: str) -> Array:
        """W' = W + Σ ΔW of the running adapters on a targeted raw parameter: the value to run its module with."""
        return self._parameters.effective(parameter, self._layer_params)

    def parameter_backward(self, parameter: str, d_weight: Array) -> dict[str, Array]:
        """dL/dA, dL/dB of the running adapters on a raw parameter, given dL/dW' (keyed as trainable_parameters)."""
        d_weight = self._asarray(d_weight, copy=False)
        return self._parameters.backward(parameter, d_weight, self._layer_params)

    # -- helpers -------------------------------------------------------------------------------------------
    def kind_ops(self, kind: str) -> NumpyOps:
        """The ops that run ``kind`` forward and backward here: the reference's; a backend built on this engine
        overrides it to put its kernels in front (merges always take the reference's ops)."""
        return ops_for(kind)

    def _asarray(self, value: Array | npt.ArrayLike, copy: bool = True) -> Array:
        """``value`` as an array of the engine's namespace and dtype: a fresh one (never a view of the caller's
        array) unless ``copy`` is False (inputs and output gradients, which are only read)."""
        if not isinstance(value, np.ndarray) and hasattr(value, "__dlpack__"):
            value = to_numpy(value)
        host = np.array(value, dtype=self.dtype_name) if copy else np.asarray(value, dtype=self.dtype_name)
        return self.xp.asarray(host, dtype=self.dtype)

    def _layer(self, module: str) -> BaseLayer:
        layer = self._layers.get(module)
        if layer is not None:
            return layer
        info = self._info.layers.get(module)
        if info is not None and info.quantization is not None:
            raise PeftdeclError(f"{module}: the base layer is quantised ({info.quantization}); not computed")
        raise PeftdeclError(f"no layer named {module!r}; layers: {', '.join(list(self._layers)[:8])}")

    def _layer_params(self, name: str, lp: LayerPlan) -> Tensors:
        return {**self._params[name].get("", {}), **self._params[name][lp.module]}

    def _mixed_forward(
        self, module: str, layer: BaseLayer, x: Array, names: list[str]
    ) -> tuple[Array, LayerTape]:
        if len(names) != x.shape[0]:
            raise PeftdeclError(f"adapter_names has {len(names)} entries for a batch of {x.shape[0]} rows")
        check_adapter_names(names, self.book.plans, merged=bool(self.book.merged))
        xp = self.xp
        y = layer.forward(x)
        for name in dict.fromkeys(names):
            if name == BASE or module not in self.book.plans[name].targets:
                continue
            lp = self.book.plans[name].layer(module)
            ops = self.kind_ops(lp.kind)
            if not ops.additive:
                raise PeftdeclError(
                    f"adapter {name!r} is {lp.kind}; mixed batches support additive kinds only"
                )
            picked = [i for i, n in enumerate(names) if n == name]
            rows = xp.asarray(picked, dtype=xp.int64)
            y_rows = ops.forward(lp, layer, self._layer_params(name, lp), xp.take(x, rows, axis=0))
            # row i of the batch takes row position[i] of y_rows where it runs this adapter
            position = np.zeros(len(names), dtype=np.int64)
            position[picked] = np.arange(len(picked))
            chosen = np.zeros(len(names), dtype=bool)
            chosen[picked] = True
            where = xp.reshape(xp.asarray(chosen), (-1, *(1,) * (y.ndim - 1)))
            y = xp.where(where, xp.take(y_rows, xp.asarray(position), axis=0), y)
        return y, {"x": x, "running": []}


def _host_copy(value: npt.ArrayLike, float_dtype: str) -> np.ndarray:
    array = np.asarray(value)
    return np.array(array, dtype=float_dtype) if array.dtype.kind == "f" else array.copy()
