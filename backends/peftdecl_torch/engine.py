"""The torch engine: adapters live inside the user's ``nn.Module``, which keeps its type and call signature.

Each targeted layer is replaced in place by an :class:`AdaptedLayer` (``modules_to_save`` modules by a
:class:`SavedModule`); calling the adapted model calls the base model. ``adapter_names`` (a mixed batch) reaches the
wrappers through a context variable that is reset when the call ends, whether it returns or raises.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from peftdecl.adapter_book import AdapterBook
from peftdecl.backend import RngState, trainable_key
from peftdecl.bias_training import trained_bias_keys
from peftdecl.errors import BackendError, PeftdeclError
from peftdecl.layer_replication import MERGE_REFUSAL
from peftdecl.options import EngineOptions
from peftdecl.plan import ModelInfo, Plan
from peftdecl_torch.base_biases import bias_names, live_bias, write_biases
from peftdecl_torch.base_weights import base_weight_ir, write_base_weights
from peftdecl_torch.context import EngineContext
from peftdecl_torch.inventory import inventory, layer_type
from peftdecl_torch.kinds.alora import invocation_rows
from peftdecl_torch.kinds.prompt import PromptAdapter
from peftdecl_torch.layer import AdaptedLayer, adapter_dtype
from peftdecl_torch.mha import wrapper_class
from peftdecl_torch.mixed_batch import mixed_rows
from peftdecl_torch.param_wrapper import wrap_parameter
from peftdecl_torch.probes import capture, follow_mode, to_numpy
from peftdecl_torch.prompt_routing import PromptRouting
from peftdecl_torch.prompting import generation_inputs
from peftdecl_torch.quantized import (
    model_float_dtype,
    replace_quantized,
    warn_merging,
)
from peftdecl_torch.replication import replicate_layers
from peftdecl_torch.saved import SavedModule
from peftdecl_torch.seq2seq import seq2seq_generate
from peftdecl_torch.tied import tie_lora, tie_saved_copies, tied_links


class TorchEngine(PromptRouting):
    """Adapters on a torch model, wrapped layer by layer; which of them run and train is read from ``book``."""

    def __init__(
        self,
        model: nn.Module,
        info: ModelInfo,
        book: AdapterBook,
        options: EngineOptions,
        *,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        self.model = model
        self.book = book
        self.options = options
        self._info = info
        self._replicated = False  # layer_replication rebuilt the layer list: copies share base weights
        self._autocast = autocast_adapter_dtype
        self._context = EngineContext(book, options)
        self._layers: dict[str, AdaptedLayer] = {}
        self._saved: dict[str, SavedModule] = {}
        self._shared: dict[str, dict[str, np.ndarray]] = {}
        self._prompts: dict[str, PromptAdapter] = {}
        # the base model is frozen while adapted; unload() gives the flags back
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        for param in model.parameters():
            param.requires_grad_(False)

    # -- Engine protocol -----------------------------------------------------------------------------------
    def add(self, name: str, plan: Plan, arrays: Mapping[str, np.ndarray]) -> None:
        if plan.prompt is not None:
            weight = self._embedding().weight
            dtype = adapter_dtype(weight, self._autocast)
            self._prompts[name] = PromptAdapter(plan.prompt, plan.shared, arrays, weight.device, dtype)
            self._prompts[name].train(self.model.training)
            self._add_saved(name, plan, arrays)
            self.sync()
            return
        shared_specs = {p.name: p for p in plan.shared}
        trainable_shared = [n for n, p in shared_specs.items() if p.role == "trainable"]
        if trainable_shared:
            raise BackendError(
                f"adapter {name!r}: trainable shared tensors {trainable_shared} are not supported"
            )
        self._shared[name] = {n: np.asarray(arrays[n]) for n in shared_specs}
        copies: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}  # one per device and dtype
        for lp in plan.layers:
            if lp.layer.type == "parameter":  # target_parameters: PEFT's nested ParamWrappers
                layer = wrap_parameter(self.model, self._layers, lp, self._context)
            else:
                layer = self._wrap(lp.module, lp.layer.type)
            links = {}
            device = layer.base_weight.device
            dtype = adapter_dtype(layer.base_weight, self._autocast)
            for tensor_name, value in self._shared[name].items():
                key = (tensor_name, device, dtype)
                if key not in copies:
                    copies[key] = torch.tensor(value).to(device, dtype)
                attr = f"shared_{name}_{tensor_name}"
                layer.add_shared(attr, copies[key])
                links[tensor_name] = attr
            links.update(
                tied_links(name, lp, layer, self._layers)
            )  # a tied head reads the embeddings' tensor
            layer.add(
                name,
                lp,
                {p.name: arrays[lp.key(p.name)] for p in lp.params},
                autocast=self._autocast,
                shared=links,
            )
            tie_lora(name, lp, layer, self._layers)  # ensure_weight_tying: a head's LoRA over the embeddings'
            follow_mode(layer, layer.base_layer, layer.training)
        self._add_saved(name, plan, arrays)
        self.sync()

    def _add_saved(self, name: str, plan: Plan, arrays: Mapping[str, np.ndarray]) -> None:
        for module in plan.modules_to_save:
            prefix = module + "."
            saved = self._save_wrapper(module)
            saved.add(name, {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)})
        tie_saved_copies(name, plan, self._info, self._saved)

    def remove(self, name: str) -> None:
        """Drop adapter ``name`` (still in the book: the model removes it from there afterwards)."""
        plan = self.book.plans[name]
        self._shared.pop(name, None)
        self._prompts.pop(name, None)
        for lp in plan.layers:
            layer = self._layers[lp.module]
            layer.remove(name)
            if not layer.adapter_names:
                self._replace(lp.module, layer.base_layer)
                del self._layers[lp.module]
        for module in plan.modules_to_save:
            saved = self._saved[module]
            saved.remove(name)
            if not len(saved.copies):
                self._replace(module, saved.original)
                del self._saved[module]

    def replace_plan(self, name: str, plan: Plan) -> None:
        """Adapter ``name`` now runs ``plan`` (already in the book; same tensors): every live parameter keeps its
        identity, so an optimizer built before the change keeps training them."""
        for lp in plan.layers:
            self._layers[lp.module].replace_plan(name, lp)
        if name in self._prompts and plan.prompt is not None:
            self._prompts[name].plan = plan.prompt

    def sync(self) -> None:
        """Trainability follows the book: an adapter's tensors (and modules_to_save copies) require gradients
        while it is active and not frozen."""
        book = self.book
        active = set(book.active)
        for name in book.plans:
            train = name in active and name not in book.frozen
            for param in self._own_parameters(name).values():
                param.requires_grad_(train)

    def get_rng_state(self) -> RngState:
        """The engine's generators' states (device -> uint8 array): dropout masks and other draws."""
        return self._context.generators.get_state()

    def set_rng_state(self, state: RngState) -> None:
        self._context.generators.set_state(state)

    def export(self, name: str) -> dict[str, np.ndarray]:
        plan = self.book.plans[name]
        out: dict[str, np.ndarray] = {}
        for lp in plan.layers:
            own = self._layers[lp.module].tensors(name)
            out.update({lp.key(p.name): to_numpy(own[p.name]) for p in lp.params})
        out.update({k: v.copy() for k, v in self._shared.get(name, {}).items()})
        if name in self._prompts:
            out.update({k: to_numpy(v) for k, v in self._prompts[name].tensors().items()})
        for module in plan.modules_to_save:
            copy = self._saved[module].copies[name]
            out.update({f"{module}.{k}": to_numpy(v) for k, v in copy.state_dict().items()})
        out.update({k: to_numpy(v) for k, v in self._trained_biases(plan).items()})
        return out

    def merge(self, names: tuple[str, ...]) -> None:
        """Fold ``names`` into the base weights in turn (the model adds them to ``book.merged`` afterwards)."""
        if self._replicated:
            raise PeftdeclError(MERGE_REFUSAL)
        before = list(self.book.merged)
        requantized: dict[str, str] = {}  # module -> its quantisation, for the one warning below
        for name in names:  # all or nothing: no weight is written while a later layer would refuse
            for lp in self.book.plans[name].layers:
                layer = self._layers[lp.module]
                layer.check_mergeable()
                if layer.quantized:
                    requantized.setdefault(lp.module, layer.info.quantization or "")
        warn_merging(requantized)
        for name in names:
            for lp in self.book.plans[name].layers:
                if "tied_lora_to" not in lp.options:  # a tied head's weight is the embeddings': merged there
                    self._layers[lp.module].merge(name, before)
            before.append(name)

    def unmerge(self) -> None:
        """Take every adapter of ``book.merged`` out again, the last merged first."""
        remaining = list(self.book.merged)
        while remaining:
            name = remaining.pop()
            for lp in self.book.plans[name].layers:
                if "tied_lora_to" not in lp.options:
                    self._layers[lp.module].unmerge(name, remaining)

    def unload(self, dequantize: bool = False) -> nn.Module:
        """The base model itself, wrappers removed (merged weights stay), modules_to_save copies swapped in.
        ``dequantize``: every bitsandbytes layer of the model becomes an ``nn.Linear`` holding its dequantised
        (merged) weight, 4-bit in the dtype it was quantised from, int8 in the model's float dtype; biases kept."""
        for module, layer in self._layers.items():
            self._replace(module, layer.base_layer)
        for module, saved in self._saved.items():
            self._replace(module, saved.active_module())
        self._layers, self._saved = {}, {}
        for pname, param in self.model.named_parameters():
            param.requires_grad_(self._requires_grad.get(pname, False))
        if dequantize:
            replace_quantized(self.model, model_float_dtype(self.model))
        return self.model

    def dequantize_base(self) -> list[str]:
        """Replace every bitsandbytes layer, adapted or not, by its dequantised ``nn.Linear`` (as ``unload`` does):
        adapters keep running and later merges add in full precision, with no re-quantisation. The names replaced."""
        int8_dtype = model_float_dtype(self.model)
        replaced = []
        for module, layer in self._layers.items():
            if layer.quantized:
                layer.dequantize_base(int8_dtype)
                replaced.append(module)
        return replaced + replace_quantized(self.model, int8_dtype)

    def base_weight(self, module: str) -> np.ndarray:
        array: np.ndarray = self._weight_ir(module).detach().to("cpu", torch.float64).numpy().copy()
        return array

    def replicate_layers(self, layer_map: Sequence[tuple[int, int]]) -> ModelInfo:
        """HF PEFT's ``layer_replication`` on the model (:mod:`peftdecl_torch.replication`); its new inventory."""
        replicate_layers(self.model, layer_map)
        self._info, self._replicated = inventory(self.model), True
        return self._info

    def load_base_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        biases = {k: v for k, v in weights.items() if k.endswith(".bias")}
        write_biases(self.model, biases)
        write_base_weights(self.model, self._layers, {k: v for k, v in weights.items() if k not in biases})

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """Call the base model; ``adapter_names`` gives each batch row its adapter (``"__base__"``: none)."""
        with (
            mixed_rows(adapter_names, self.book, frozenset(self._prompts), expand=False),
            invocation_rows(self.book, args, kwargs),
        ):
            prompt = self._active_prompt()
            if prompt is None:
                return self.model(*args, **kwargs)
            return self._prompt_rules(prompt)(self._prompt_site(prompt), args, kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The base model's ``generate`` with the adapters applied (rows repeated by beam search follow their name)."""
        generate: Callable[..., object] | None = getattr(self.model, "generate", None)
        if generate is None:
            raise PeftdeclError(f"{type(self.model).__name__} has no generate()")
        with (
            mixed_rows(adapter_names, self.book, frozenset(self._prompts), expand=True),
            invocation_rows(self.book, args, kwargs),
        ):
            prompt = self._active_prompt()
            if prompt is None:
                return generate(*args, **kwargs)
            site = self._prompt_site(prompt)
            if self._info.is_encoder_decoder:
                return seq2seq_generate(site, args, kwargs)
            with generation_inputs(site):
                return generate(*args, **kwargs)

    def trainable_parameters(self, names: tuple[str, ...]) -> dict[str, nn.Parameter]:
        """Key -> the live parameter, for the adapters ``names`` (and their modules_to_save copies): the full IR key
        with one adapter, ``"<adapter>/<full key>"`` with several (:func:`peftdecl.backend.trainable_key`). The
        same objects across ``set_adapter``, ``update_spec`` and AdaLoRA's rank changes."""
        out: dict[str, nn.Parameter] = {}
        for name in names:
            out.update({trainable_key(name, k, names): v for k, v in self._own_parameters(name).items()})
        return out

    def _own_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """Full key -> parameter of adapter ``name``: its layers' trainable tensors, prompt tables and copies."""
        plan = self.book.plans[name]
        own: dict[str, nn.Parameter] = {}
        for lp in plan.layers:
            own.update({lp.key(k): v for k, v in self._layers[lp.module].trainable(name).items()})
        if name in self._prompts:
            own.update(self._prompts[name].tensors())
        for module in plan.modules_to_save:
            copy = self._saved[module].copies[name]
            seen = {id(p) for p in own.values()}  # a tied head's copy holds the embeddings' copy's weight
            own.update({f"{module}.{k}": v for k, v in copy.named_parameters() if id(v) not in seen})
        return own | self._trained_biases(plan)

    def _trained_biases(self, plan: Plan) -> dict[str, nn.Parameter]:
        """The base biases ``plan`` trains (HF PEFT's ``bias``), by PEFT's key names."""
        keys = trained_bias_keys(plan, bias_names(self._requires_grad))
        return {key: live_bias(self.model, key) for key in keys}

    def to(self, *args: Any, **kwargs: Any) -> None:
        """``nn.Module.to`` on the model, its wrappers and the prompt adapters together; a new float dtype becomes
        the adapters' compute dtype too."""
        self.model.to(*args, **kwargs)
        for adapter in self._prompts.values():
            adapter.to(*args, **kwargs)
        for layer in self._layers.values():
            layer.sync_dtypes()

    def cast(self, dtype: str) -> None:
        """``to(torch.<dtype>)``, for a torch dtype named as a string (``"float64"``)."""
        self.to(getattr(torch, dtype))

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, all) numbers of parameters of the model with its adapters, each shared tensor once."""
        params = {id(p): p for p in self.model.parameters()}
        for adapter in self._prompts.values():
            params.update({id(p): p for p in adapter.parameters()})
        total = sum(p.numel() for p in params.values())
        return sum(p.numel() for p in params.values() if p.requires_grad), total

    def train(self, mode: bool) -> None:
        """Training (dropout on) or eval mode for the model, its wrappers and the prompt adapters alike."""
        self.model.train(mode)
        for adapter in self._prompts.values():
            adapter.train(mode)

    # -- capture (used by peftdecl.equiv) -------------------------------------------------------------------
    def capture(
        self, input_ids: np.ndarray
    ) -> tuple[np.ndarray | None, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """Run the model on ``input_ids`` without gradients and return (final logits, {adapted module: (its input,
        its output) on its first call}), as NumPy (:func:`peftdecl_torch.probes.capture`)."""
        return capture(self.model, self._layers, self.forward, input_ids)

    # -- extras --------------------------------------------------------------------------------------------
    def layer(self, module: str) -> AdaptedLayer:
        """The wrapper that replaced ``module``."""
        if module not in self._layers:
            raise PeftdeclError(
                f"{module} carries no adapter; adapted layers: {', '.join(list(self._layers)[:8])}"
            )
        return self._layers[module]

    @property
    def adapted_layers(self) -> dict[str, AdaptedLayer]:
        return dict(self._layers)

    # -- helpers -------------------------------------------------------------------------------------------
    def _parent(self, module: str) -> tuple[nn.Module, str]:
        parent_name, _, child = module.rpartition(".")
        return (self.model.get_submodule(parent_name) if parent_name else self.model), child

    def _replace(self, module: str, new: nn.Module) -> None:
        parent, child = self._parent(module)
        setattr(parent, child, new)

    def _wrap(self, module: str, expected: str) -> AdaptedLayer:
        if module in self._layers:
            return self._layers[module]
        try:
            found = self.model.get_submodule(module)
        except AttributeError as exc:
            raise PeftdeclError(f"the model has no module {module!r}") from exc
        if isinstance(found, SavedModule):
            raise PeftdeclError(
                f"{module} is in another adapter's modules_to_save and cannot also be adapted"
            )
        if layer_type(found) != expected:
            raise PeftdeclError(f"{module} is a {type(found).__name__}; the plan expects a {expected} layer")
        info = self._info.layers[module]
        wrapper = wrapper_class(info)(found, info, module, self._context)
        follow_mode(wrapper, found, found.training)  # a new nn.Module is in training mode; take the layer's
        self._replace(module, wrapper)
        self._layers[module] = wrapper
        return wrapper

    def _save_wrapper(self, module: str) -> SavedModule:
        if module in self._saved:
            return self._saved[module]
        if module in self._layers or any(m.startswith(module + ".") for m in self._layers):
            raise PeftdeclError(f"{module} holds adapted layers and cannot also be in modules_to_save")
        original = self.model.get_submodule(module)
        wrapper = SavedModule(original, module, self._context)
        follow_mode(wrapper, original, original.training)  # its copies are deep copies: already in that mode
        self._replace(module, wrapper)
        self._saved[module] = wrapper
        return wrapper

    def _weight_ir(self, module: str, key: str | None = None) -> torch.Tensor:
        return base_weight_ir(self.model, self._layers, module, key)
