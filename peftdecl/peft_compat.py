"""HF PEFT's ``PeftModel`` names on :class:`peftdecl.AdaptedModel`: each works with PEFT's meaning or raises
:class:`NotSupportedError` naming what to use instead.

Nothing reaches the base model by accident: :data:`BASE_READ_ONLY` lists the base-model attributes an adapted
model passes through (they read the model, they do not write or convert it); every other PEFT name is either
defined here (:class:`PeftCompat`, mixed into ``AdaptedModel``) or listed in :data:`NOT_SUPPORTED` with its hint.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from peftdecl.errors import PeftdeclError
from peftdecl.plan import ModelInfo, Plan
from peftdecl.quant.requantize import RequantizationWarning
from peftdecl.spec import SpecBase
from peftdecl.variant_losses import variant_loss

if TYPE_CHECKING:
    from peftdecl.adapter_book import AdapterBook
    from peftdecl.backend import Engine

_Model = TypeVar("_Model", bound="PeftCompat")


class NotSupportedError(PeftdeclError, AttributeError):
    """A PEFT ``PeftModel`` name that peftdecl does not offer; the message names the peftdecl way, if any.

    Also an AttributeError, so ``hasattr(model, name)`` is False for it, as for any missing attribute."""


_WRITES = (
    "add_module", "apply", "smart_apply", "register_buffer", "register_module", "register_parameter", "set_submodule",
    "set_extra_state", "share_memory", "register_backward_hook", "register_forward_hook",
    "register_forward_pre_hook", "register_full_backward_hook", "register_full_backward_pre_hook",
    "register_load_state_dict_post_hook", "register_load_state_dict_pre_hook",
    "register_state_dict_post_hook", "register_state_dict_pre_hook",
)  # fmt: skip

NOT_SUPPORTED: dict[str, str] = {
    # PEFT methods with a peftdecl equivalent
    "from_pretrained": "use peftdecl.load_adapter(base_model, folder) (or AdaptedModel.load_adapter on a model)",
    "inject_adapter": "use peftdecl.attach(base_model, spec) or AdaptedModel.add_adapter(name, spec)",
    "load_state_dict": "load saved tensors with load_adapter(folder), or add_adapter(name, spec, arrays=...)",
    "get_layer_status": "read adapters, active_adapters, merged_adapters and peft_config instead",
    "get_model_status": "read adapters, active_adapters, merged_adapters and peft_config instead",
    "get_prompt": "state_dict(name) holds the prompt table; the backend builds the virtual tokens itself",
    "get_prompt_embedding_to_save": "state_dict(name) holds the prompt table as it is saved",
    "push_to_hub": "save the adapter with save_pretrained(folder), then upload the folder with huggingface_hub",
    "create_or_update_model_card": "peftdecl writes no model card; write README.md beside the saved adapter",
    "prepare_model_for_gradient_checkpointing": (
        "call base_model.gradient_checkpointing_enable() and base_model.enable_input_require_grads() on the "
        "transformers model yourself"
    ),
    "requires_grad_": "use set_requires_grad(adapter_names, requires_grad); the base model stays frozen",
    "compile": "compile the adapted model in place: torch.compile(adapted.get_base_model())",
    # PEFT features peftdecl does not implement
    "subtract_mutated_init": "peftdecl does not convert PiSSA/OLoRA adapters to LoRA",
    "supports_lora_conversion": "peftdecl does not convert adapters to LoRA",
    # PEFT internals
    "get_model_config": "a PEFT internal; the model's config is adapted.config",
    "prefix": "a PEFT internal (the tuner's parameter prefix)",
    "target_module_mapping": "a PEFT internal; peftdecl's default targets are in peftdecl.plan.targeting",
    "tuner_layer_cls": "a PEFT internal; peftdecl's layers are the backend's AdaptedLayer",
    "uses_shared_state": "a PEFT internal",
    "prepare_inputs_for_generation": "a PEFT internal; generate() applies the adapters itself",
    "base_model_prepare_inputs_for_generation": "a PEFT internal; generate() applies the adapters itself",
    "special_peft_forward_args": "a PEFT internal; forward() takes adapter_names= for mixed batches",
    "targeted_parameter_names": "peftdecl does not adapt bare parameters (PEFT's target_parameters)",
    # torch.nn.Module methods that would write or convert the wrapped model behind peftdecl's back
    **{
        name: "it changes the wrapped model; call it on adapted.get_base_model() if you mean it"
        for name in _WRITES
    },
    **{
        name: "use to(device or dtype) (torch), which moves the adapters with the model"
        for name in ("to_empty", "type", "xpu", "ipu", "mtia")
    },
    **{
        name: "a torch.nn.Module internal"
        for name in ("T_destination", "call_super_init", "dump_patches", "extra_repr", "get_extra_state")
    },
}
"""PEFT name -> why not / what to use instead (raised as NotSupportedError on access)."""

BASE_READ_ONLY: tuple[str, ...] = (
    "config", "name_or_path", "device", "dtype", "generation_config", "main_input_name", "can_generate",
    "parameters", "named_parameters", "buffers", "named_buffers", "children", "named_children", "modules",
    "named_modules", "get_submodule", "get_parameter", "get_buffer", "zero_grad", "args",
)  # fmt: skip
"""Base-model attributes an adapted model passes through: they read the model (its parameters include the
adapters', so an optimiser can be built from ``parameters()``) or clear gradients; none writes or converts it."""

PEFT_DEVIATIONS: dict[str, str] = {
    "base_model": "the adapted model itself (PEFT: its tuner, whose .model is that model); get_base_model() agrees",
    "state_dict": "the adapter's tensors by key (what PEFT's get_peft_model_state_dict returns), not the model's",
}
"""PEFT names peftdecl keeps with its own, documented meaning."""


PEFT_LOADING_DEFAULTS: dict[str, object] = {
    "torch_device": None,
    "autocast_adapter_dtype": True,
    "ephemeral_gpu_offload": False,
    "low_cpu_mem_usage": False,
    "key_mapping": None,
}
"""Keywords of PEFT's ``add_adapter`` / ``load_adapter`` -> the value that is what peftdecl does."""


def check_peft_options(method: str, options: Mapping[str, object]) -> None:
    """Accept PEFT's ``add_adapter`` / ``load_adapter`` keywords where they ask for what peftdecl does anyway;
    raise NotSupportedError naming the others."""
    bad = sorted(
        k for k, v in options.items() if k not in PEFT_LOADING_DEFAULTS or v != PEFT_LOADING_DEFAULTS[k]
    )
    if bad:
        raise NotSupportedError(
            f"{method}: {bad} not supported (peftdecl loads adapters in the base layer's device and dtype, "
            "half types as float32; the torch backend's autocast_adapter_dtype option is given to attach/load_adapter)"
        )


def base_model_fields(plan: Plan, info: ModelInfo) -> dict[str, str]:
    """The ``adapter_config.json`` field HF PEFT fills from the base model where the spec leaves it null:
    ``base_model_name_or_path`` (the model's ``name_or_path``), which ``AutoPeftModel*.from_pretrained`` loads the
    base from. A null ``task_type`` stays null, as in PEFT's own save; the model's class is then recorded as
    ``auto_mapping``, which is how ``AutoPeftModel`` rebuilds a model saved without a task type."""
    if plan.spec.base_model_name_or_path is None and info.name_or_path:
        return {"base_model_name_or_path": info.name_or_path}
    return {}


class PeftCompat:
    """The ``PeftModel`` methods and attributes of an adapted model (mixed into ``AdaptedModel``)."""

    if TYPE_CHECKING:  # provided by AdaptedModel, whose AdapterBook holds the adapter state
        _engine: Engine
        _base_model: object  # the user's model, of whatever framework, passed through untouched
        _book: AdapterBook
        _info: ModelInfo

        def _name(self, name: str | None) -> str: ...
        def _set_frozen(self, name: str, frozen: bool) -> None: ...
        def _set_enabled(self, enabled: bool) -> None: ...
        def merge(self, names: str | Sequence[str] | None = None) -> None: ...
        def unmerge(self) -> None: ...
        # the part of AdaptedModel.save that save_pretrained calls
        def save(
            self, directory: str | Path, format: str = "hf", *, adapters: Sequence[str] | None = None
        ) -> None: ...

    # -- adapters ------------------------------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, SpecBase]:
        """Adapter name -> its spec (peftdecl's counterpart of PEFT's config object)."""
        return {name: plan.spec for name, plan in self._book.plans.items()}

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name (a list when several are active, as PEFT's tuner gives)."""
        return self._book.active[0] if len(self._book.active) == 1 else list(self._book.active)

    @property
    def active_peft_config(self) -> SpecBase:
        """The spec of the (single) active adapter."""
        return self._book.plans[self._name(None)].spec

    @property
    def peft_type(self) -> str:
        return self.active_peft_config.peft_type

    @property
    def targeted_module_names(self) -> list[str]:
        """Every module some attached adapter adapts, in model order of first appearance."""
        return list(dict.fromkeys(m for plan in self._book.plans.values() for m in plan.targets))

    @property
    def modules_to_save(self) -> set[str] | None:
        modules = {m for plan in self._book.plans.values() for m in plan.modules_to_save}
        return modules or None

    @property
    def has_active_enabled_adapter(self) -> bool:
        return bool(self._book.active) and self._book.enabled

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Make adapters trainable or frozen (only active adapters are ever trainable in peftdecl)."""
        names = (adapter_names,) if isinstance(adapter_names, str) else tuple(adapter_names)
        for name in names:
            self._set_frozen(self._name(name), not requires_grad)

    def get_base_model(self) -> object:
        """The base model, adapted in place (torch / MLX: its targeted layers are peftdecl wrappers)."""
        return self._base_model

    @property
    def base_model_torch_dtype(self) -> object:
        return getattr(self._base_model, "dtype", None)

    # -- enabling and merging ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """PEFT's name for :meth:`disable_adapters`: the base model's computation within the block."""
        with self.disable_adapters():
            yield

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Within the block the model computes as its base (merged adapters are unmerged first)."""
        was = self._book.enabled
        self.disable_adapter_layers()
        try:
            yield
        finally:
            self._set_enabled(was)

    def disable_adapter_layers(self) -> None:
        """Turn every adapter off until :meth:`enable_adapter_layers` (merged ones are unmerged, as PEFT does)."""
        if self._book.merged:
            self.unmerge()
        self._set_enabled(False)

    def enable_adapter_layers(self) -> None:
        self._set_enabled(True)

    def merge_adapter(self, adapter_names: Sequence[str] | None = None) -> None:
        """Fold the adapters (default: the active ones) into the base weights."""
        self.merge(adapter_names)

    def unmerge_adapter(self) -> None:
        self.unmerge()

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Sequence[str] | None = None,
        dequantize: bool = False,
    ) -> object:
        """The base model with the adapters (default: the active ones) merged in and every adapter removed (same
        type as the base). ``safe_merge``: refuse, unmerged, when a merged weight is not finite. ``dequantize``:
        quantised base layers come back as float layers holding the merged weight, not re-quantised (a
        quantised layer otherwise gets its merged weight re-quantised, with a rounding warning).
        ``progressbar`` is accepted and ignored."""
        dequantize_base = getattr(self._engine, "dequantize_base", None)
        if dequantize and dequantize_base is not None:
            dequantize_base()  # float layers first, so the merge below is never rounded to codes
        with warnings.catch_warnings():
            if dequantize:  # the engines' unload keeps the full-precision merge: no rounding to warn about
                warnings.simplefilter("ignore", RequantizationWarning)
            self.merge(adapter_names)
        if safe_merge:
            modules = {m for name in self._book.merged for m in self._book.plans[name].targets}
            bad = sorted(m for m in modules if not np.isfinite(self._engine.base_weight(m)).all())
            if bad:
                self.unmerge()
                raise PeftdeclError(f"merging gives non-finite weights in {bad}; the adapters were unmerged")
        return self._engine.unload(dequantize=dequantize)

    def unload(self) -> object:
        """The base model as it was: merged adapters are taken out again, every adapter removed."""
        if self._book.merged:
            self.unmerge()
        return self._engine.unload()

    # -- saving --------------------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | Path,
        safe_serialization: bool = True,
        selected_adapters: Sequence[str] | None = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | None = None,
        **kwargs: object,
    ) -> None:
        """Save the adapters (not the base model) in HF PEFT's layout: ``save("…", "hf", adapters=...)``."""
        if not safe_serialization:
            raise NotSupportedError(
                "save_pretrained(safe_serialization=False): peftdecl writes safetensors only"
            )
        if save_embedding_layers != "auto":
            raise NotSupportedError(
                "save_pretrained(save_embedding_layers=...): peftdecl saves targeted embeddings as PEFT's 'auto'"
            )
        if kwargs:
            raise NotSupportedError(f"save_pretrained: {sorted(kwargs)} not supported")
        if not is_main_process:
            return
        if path_initial_model_for_weight_conversion is None:
            self.save(save_directory, "hf", adapters=selected_adapters)
        else:
            self._save_as_plain_lora(
                save_directory, selected_adapters, Path(path_initial_model_for_weight_conversion)
            )

    def _save_as_plain_lora(
        self, directory: str | Path, selected: Sequence[str] | None, initial_folder: Path
    ) -> None:
        """PEFT's ``path_initial_model_for_weight_conversion``: the adapter minus its saved initial values, as a
        plain LoRA of rank 2r on the original base (:func:`peftdecl.lora_init.plain_lora_conversion`)."""
        from peftdecl.formats.registry import detect_format, get_format
        from peftdecl.lora_init import plain_lora_conversion
        from peftdecl.plan import compile_plan

        names = tuple(selected) if selected is not None else tuple(self._book.plans)
        if len(names) != 1:
            raise PeftdeclError(
                f"path_initial_model_for_weight_conversion converts one adapter; got {list(names)}"
            )
        name = names[0]
        plan = self._book.plans[name]
        initial_format = detect_format(initial_folder)
        _, tensors = initial_format.read(initial_folder)
        initial = initial_format.to_ir(plan, tensors, self._info)
        changes, arrays = plain_lora_conversion(plan, self._engine.export(name), initial)
        converted = compile_plan(plan.spec.replace(**changes), self._info, name)
        payload = {name: (converted, arrays, base_model_fields(converted, self._info))}
        get_format("hf").write(Path(directory), payload, np.float32, self._info)

    # -- running and devices -------------------------------------------------------------------------------
    def generate(self, *args: object, **kwargs: object) -> Any:
        """The base model's ``generate`` with the adapters applied (torch); returns what it returns."""
        generate = getattr(self._engine, "generate", None)
        if generate is None:
            raise NotSupportedError(
                "generate(): the torch backend's only; on MLX call mlx_lm.generate(adapted.get_base_model(), ...), "
                "whose layers carry the adapters"
            )
        return generate(*args, **kwargs)

    @property
    def training(self) -> bool:
        """Whether the model is in training mode (dropout on)."""
        engine = self._engine
        holder = getattr(engine, "model", engine)
        return bool(getattr(holder, "training", getattr(engine, "training", False)))

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts of the adapted model, counted as PEFT counts them."""
        counts = getattr(self._engine, "parameter_counts", None)
        if counts is None:
            raise NotSupportedError(f"{type(self._engine).__name__} does not count parameters")
        trainable, total = counts()
        return int(trainable), int(total)

    def _get_kasa_loss(self, adapter_names: str | Sequence[str] | None = None) -> Any:
        """HF PEFT's KaSA regulariser of the adapters (default: active), to add to the task loss (torch)."""
        return variant_loss(self, "kasa", adapter_names)

    def _get_monteclora_loss(self, adapter_names: str | Sequence[str] | None = None) -> Any:
        """HF PEFT's MonteCLoRA regulariser of the adapters (default: active), to add to the task loss (torch)."""
        return variant_loss(self, "monteclora", adapter_names)

    def print_trainable_parameters(self) -> None:
        """Print PEFT's line: trainable params, all params and the trainable percentage."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def to(self: _Model, *args: object, **kwargs: object) -> _Model:
        """Move or cast the base model and its adapters together (torch's ``Module.to`` arguments); returns the
        adapted model."""
        mover = getattr(self._engine, "to", None)
        if mover is None:
            raise NotSupportedError(
                f"to(): the {type(self._engine).__name__} keeps its arrays where they are; choose the adapter "
                "dtype when attaching or loading (the MLX backend's adapter_dtype option)"
            )
        mover(*args, **kwargs)
        return self

    def hotswap_adapter(self, path: str | Path, adapter_name: str = "default") -> None:
        """PEFT's hotswap_adapter: ``adapter_name``'s weights replaced in place (:mod:`peftdecl.hotswap`)."""
        from peftdecl import hotswap

        hotswap.hotswap_adapter(self, path, adapter_name)  # type: ignore[arg-type]

    def prepare_for_hotswap(self, target_rank: int | None = None) -> None:
        """PEFT's prepare_model_for_compiled_hotswap (pad ranks to ``target_rank``), before torch.compile."""
        from peftdecl import hotswap

        hotswap.prepare_for_hotswap(self, target_rank)  # type: ignore[arg-type]

    def cpu(self: _Model) -> _Model:
        return self.to("cpu")

    def cuda(self: _Model, device: object = None) -> _Model:
        return self.to(
            "cuda" if device is None else device if not isinstance(device, int) else f"cuda:{device}"
        )

    def double(self: _Model) -> _Model:
        return self._cast("float64")

    def float(self: _Model) -> _Model:
        return self._cast("float32")

    def half(self: _Model) -> _Model:
        return self._cast("float16")

    def bfloat16(self: _Model) -> _Model:
        return self._cast("bfloat16")

    def _cast(self: _Model, dtype: str) -> _Model:
        caster = getattr(self._engine, "cast", None)
        if caster is None:
            return self.to(dtype)  # raises the explanation
        caster(dtype)
        return self


def peft_alias(
    method: str, ours: str, value: Any, peft_name: str, options: dict[str, Any], required: bool = True
) -> Any:
    """``value``, or the same argument given under HF PEFT's keyword ``peft_name`` (removed from ``options``)."""
    if peft_name not in options:
        if value is None and required:
            raise TypeError(f"{method}() missing required argument: {ours!r} (PEFT: {peft_name!r})")
        return value
    if value is not None:
        raise TypeError(f"{method}() got {ours!r} and PEFT's {peft_name!r} for the same argument")
    return options.pop(peft_name)
