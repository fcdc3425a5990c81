"""``AdaptedModel``: the backend-neutral handle returned by ``attach`` and ``load_adapter``.

It owns the bookkeeping every backend shares — adapter names, specs, plans, the active set, saving and loading —
and delegates arrays and arithmetic to the backend's Engine. HF PEFT's ``PeftModel`` names come from
:class:`peftdecl.peft_compat.PeftCompat`. Attributes it does not define are looked up on the engine; of the base
model only the read-only attributes in :data:`peftdecl.peft_compat.BASE_READ_ONLY` pass through, so that nothing
writes or converts the wrapped model behind peftdecl's back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from peftdecl.backend import Backend, Engine
from peftdecl.errors import AdapterFileError, PeftdeclError
from peftdecl.formats import hf_peft
from peftdecl.formats.registry import detect_format, get_format, is_adapter_dir
from peftdecl.init import EXTERNAL_SOURCES, SHARED_SOURCES, check_arrays, generator_for, init_params
from peftdecl.names import check_adapter_name
from peftdecl.peft_compat import (
    BASE_READ_ONLY,
    NOT_SUPPORTED,
    NotSupportedError,
    PeftCompat,
    base_model_fields,
    check_peft_options,
)
from peftdecl.plan import ModelInfo, Plan, compile_plan
from peftdecl.plan.compile import layouts
from peftdecl.plan.kinds.vera import check_family as check_vera_family
from peftdecl.plan.kinds.vera import inherit_projections
from peftdecl.spec import SpecBase, load_spec

EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


class AdaptedModel(PeftCompat):
    """A base model with named adapters attached through one backend."""

    def __init__(self, backend: Backend, engine: Engine, info: ModelInfo, base_model: Any) -> None:
        self._backend = backend
        self._engine = engine
        self._info = info
        self._base_model = base_model
        self._plans: dict[str, Plan] = {}
        self._active: tuple[str, ...] = ()
        self._merged: tuple[str, ...] = ()
        self._frozen: set[str] = set()
        self._enabled = True
        """Adapters loaded for inference (``is_trainable=False``): never trainable, even while active."""

    # -- introspection -------------------------------------------------------------------------------------
    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def base_model(self) -> Any:
        return self._base_model

    @property
    def adapters(self) -> dict[str, Plan]:
        """Adapter name -> its compiled plan."""
        return dict(self._plans)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def merged_adapters(self) -> tuple[str, ...]:
        return self._merged

    def plan(self, name: str | None = None) -> Plan:
        return self._plans[self._name(name)]

    def spec(self, name: str | None = None) -> SpecBase:
        return self.plan(name).spec

    # -- adapters ------------------------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str | None = None,
        spec: Any = None,
        *,
        seed: int = 0,
        activate: bool = False,
        arrays: Mapping[str, Any] | None = None,
        **peft_options: Any,
    ) -> Plan:
        """Compile ``spec`` for this model and attach it as ``name`` (initialised from ``seed`` unless ``arrays``).
        PEFT's keyword names ``adapter_name`` and ``peft_config`` are accepted for ``name`` and ``spec``;
        ``peft_options``: PEFT's other keywords, accepted where they ask for what peftdecl does."""
        name = _peft_alias("add_adapter", "name", name, "adapter_name", peft_options)
        spec = _peft_alias("add_adapter", "spec", spec, "peft_config", peft_options)
        check_peft_options("add_adapter", peft_options)
        check_adapter_name(name)
        if name in self._plans:
            raise PeftdeclError(f"an adapter named {name!r} is already attached")
        if name == "__base__":
            raise PeftdeclError("'__base__' is reserved for rows without an adapter")
        plan = compile_plan(load_spec(spec), self._info, name)
        self._check_compatible(plan)
        if arrays is None:
            values = init_params(plan, seed, external=self._external_init(plan, seed))
        else:
            values = {k: np.asarray(v) for k, v in arrays.items()}
            check_arrays(plan, values, origin=f"adapter {name!r}")
        values = self._shared_family_arrays(plan, values)
        self._engine.add(name, plan, values)
        self._plans[name] = plan
        if activate or not self._active:
            self.set_adapter(name)
        return plan

    def load_adapter(
        self,
        directory: str | Path,
        name: str | None = None,
        is_trainable: bool = False,
        *,
        activate: bool = False,
        **peft_options: Any,
    ) -> Plan:
        """Read a saved adapter (HF PEFT, mlx-lm or peftdecl's native layout, detected) and attach it as ``name``.

        As HF PEFT's ``load_adapter``: unless ``is_trainable``, the adapter is frozen (no tensor of it is trainable,
        whichever adapters are active) and the model is put in eval mode (dropout off); ``is_trainable=True`` gives
        a trainable adapter and leaves the model's mode as it is. PEFT's keyword ``adapter_name`` is accepted for
        ``name`` (default "default"); ``peft_options``: PEFT's other keywords, accepted where they ask for what
        peftdecl does."""
        name = _peft_alias("load_adapter", "name", name, "adapter_name", peft_options, required=False)
        name = hf_peft.DEFAULT_ADAPTER if name is None else name
        check_peft_options("load_adapter", peft_options)
        folder = Path(directory)
        check_adapter_name(name)  # before it becomes a path: "../x" must not read a sibling folder
        if name != hf_peft.DEFAULT_ADAPTER and is_adapter_dir(folder / name):
            folder = folder / name  # PEFT saves a non-default adapter in a sub-folder named after it
        file_format = detect_format(folder)
        spec, tensors = file_format.read(folder)
        plan = compile_plan(spec, self._info, name)
        arrays = file_format.to_ir(plan, tensors, self._info)
        base_overrides = {k: v for k, v in arrays.items() if self._is_base_override(plan, k)}
        saved_modules = {k: v for k, v in arrays.items() if _module_of(k, plan.modules_to_save)}
        adapter_arrays = {
            k: v for k, v in arrays.items() if k not in base_overrides and k not in saved_modules
        }
        layout = layouts()[plan.kind]
        origin = folder / file_format.weights_name
        if layout.from_file is not None and not file_format.lossless:
            try:
                adapter_arrays = layout.from_file(plan, adapter_arrays)
            except AdapterFileError as exc:
                raise AdapterFileError(f"{origin}: {exc}") from exc
        check_arrays(plan, adapter_arrays, origin=str(origin))
        self._check_compatible(plan)
        if name in self._plans:
            raise PeftdeclError(f"an adapter named {name!r} is already attached")
        adapter_arrays = self._shared_family_arrays(plan, adapter_arrays)
        if base_overrides:
            self._engine.load_base_weights(base_overrides)
        self._engine.add(name, plan, {**adapter_arrays, **saved_modules})
        self._plans[name] = plan
        self._set_frozen(name, not is_trainable)
        if activate or not self._active:
            self._activate((name,))
        if not is_trainable:
            self.eval()
        return plan

    def set_adapter(self, names: str | Sequence[str], inference_mode: bool = False) -> None:
        """Make ``names`` the active adapters (several: their contributions are combined as PEFT does); as in HF
        PEFT they become trainable, or frozen with ``inference_mode=True``."""
        wanted = (names,) if isinstance(names, str) else tuple(names)
        for name in wanted:
            self._name(name)
        for name in wanted:
            self._set_frozen(name, inference_mode)
        self._activate(wanted)

    def _activate(self, names: tuple[str, ...]) -> None:
        self._engine.set_active(names)
        self._active = names

    def _set_frozen(self, name: str, frozen: bool) -> None:
        if frozen:
            self._frozen.add(name)
        else:
            self._frozen.discard(name)
        self._engine.set_frozen(frozenset(self._frozen))

    def update_spec(self, name: str | None = None, **changes: Any) -> Plan:
        """Change config fields of an attached adapter whose tensors keep their shapes (e.g. AdaLoRA's
        ``rank_pattern`` after rank allocation); the adapter is recompiled and keeps its current values."""
        name = self._name(name)
        if name in self._merged:
            raise PeftdeclError(f"adapter {name!r} is merged; call unmerge() before changing its spec")
        old = self._plans[name]
        plan = compile_plan(old.spec.replace(**changes), self._info)
        shapes = {k: p.shape for k, p in plan.param_specs().items()}
        if shapes != {k: p.shape for k, p in old.param_specs().items()}:
            raise PeftdeclError(f"update_spec{sorted(changes)} would change the tensors of adapter {name!r}")
        arrays = self._engine.export(name)
        self._engine.remove(name)
        self._engine.add(name, plan, arrays)
        self._engine.set_active(self._active)
        self._plans[name] = plan
        return plan

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter; merged adapters must be unmerged first."""
        self._name(name)
        if name in self._merged:
            raise PeftdeclError(f"adapter {name!r} is merged; call unmerge() before deleting it")
        self._engine.remove(name)
        del self._plans[name]
        self._set_frozen(name, False)
        self._active = tuple(n for n in self._active if n != name)
        self._engine.set_active(self._active)

    # -- merging -------------------------------------------------------------------------------------------
    def merge(self, names: str | Sequence[str] | None = None) -> None:
        """Fold the adapters (default: the active ones) into the base weights."""
        wanted = self._active if names is None else ((names,) if isinstance(names, str) else tuple(names))
        for name in wanted:
            if not self._plans[self._name(name)].layers and self._plans[name].prompt is not None:
                raise PeftdeclError(f"adapter {name!r} is {self._plans[name].kind}, which cannot be merged")
        todo = tuple(n for n in wanted if n not in self._merged)
        self._engine.merge(todo)
        self._merged += todo

    def unmerge(self) -> None:
        """Restore the base weights of every merged adapter."""
        self._engine.unmerge()
        self._merged = ()

    # -- saving --------------------------------------------------------------------------------------------
    def state_dict(self, name: str | None = None) -> dict[str, np.ndarray]:
        """Current adapter tensors of ``name`` (IR keys), as NumPy arrays."""
        return self._engine.export(self._name(name))

    def save(
        self,
        directory: str | Path,
        format: str = "hf",
        *,
        adapters: Sequence[str] | None = None,
        dtype: Any = np.float32,
    ) -> None:
        """Save adapters (default: all): the default in ``directory``, any other ``X`` in ``directory/X``.

        ``format``: "hf" (HF PEFT, the default), "mlx-lm" (LoRA/DoRA only) or "native" (peftdecl's lossless
        layout: the spec plus every tensor as it lives in memory, e.g. a prefix projection MLP mid-training)."""
        file_format = get_format(format)
        names = tuple(adapters) if adapters is not None else tuple(self._plans)
        for name in names:  # each becomes a sub-folder of ``directory``
            check_adapter_name(name)
        payload = {}
        for name in names:
            plan = self._plans[self._name(name)]
            arrays: dict[str, Any] = self._engine.export(name)
            # what HF PEFT records of the base model, so that AutoPeftModel can rebuild it
            extra: dict[str, Any] = base_model_fields(plan, self._info) if file_format.name == "hf" else {}
            layout = layouts()[plan.kind]
            if layout.to_file is not None and not file_format.lossless:
                arrays, kind_fields = layout.to_file(plan, arrays)
                extra = {**extra, **kind_fields}
            payload[name] = (plan, {**arrays, **self._embedding_copies(plan)}, extra)
        file_format.write(Path(directory), payload, dtype, self._info)

    # -- running -------------------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._engine.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._engine.forward(*args, **kwargs)

    def train(self, mode: bool = True) -> AdaptedModel:
        self._engine.train(mode)
        return self

    def eval(self) -> AdaptedModel:
        return self.train(False)

    def trainable_parameters(self) -> Any:
        """Backend-native parameters of the active adapters that are not frozen (and their modules_to_save
        copies); an empty dict when there is none, e.g. after an inference-mode ``load_adapter``."""
        names = tuple(n for n in self._active if n not in self._frozen)
        return self._engine.trainable_parameters(names) if names else {}

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        engine = self.__dict__.get("_engine")
        if engine is not None and hasattr(engine, attr):
            return getattr(engine, attr)
        if attr in NOT_SUPPORTED:
            raise NotSupportedError(f"AdaptedModel.{attr} is not supported: {NOT_SUPPORTED[attr]}")
        base = self.__dict__.get("_base_model")
        if attr in BASE_READ_ONLY and base is not None and hasattr(base, attr):
            return getattr(base, attr)
        raise AttributeError(
            f"{type(self).__name__} has no attribute {attr!r} (only {', '.join(BASE_READ_ONLY[:4])}, ... of the base "
            "model pass through; use get_base_model() to reach the rest)"
        )

    def __repr__(self) -> str:
        kinds = ", ".join(f"{n}={p.kind}" for n, p in self._plans.items())
        return f"AdaptedModel(backend={self._backend.name}, adapters=[{kinds}], active={list(self._active)})"

    # -- helpers -------------------------------------------------------------------------------------------
    def _name(self, name: str | None) -> str:
        if name is None:
            if len(self._active) != 1:
                raise PeftdeclError(f"name an adapter; active adapters are {list(self._active)}")
            return self._active[0]
        if name not in self._plans:
            raise PeftdeclError(f"no adapter named {name!r}; attached: {sorted(self._plans)}")
        return name

    def _first_vera(self, plan: Plan) -> str | None:
        """The first VeRA adapter attached, when ``plan`` is a later one (they share its projections)."""
        if plan.kind != "vera":
            return None
        return next((n for n, p in self._plans.items() if p.kind == "vera"), None)

    def _shared_family_arrays(self, plan: Plan, arrays: dict[str, Any]) -> dict[str, Any]:
        first = self._first_vera(plan)
        return (
            arrays if first is None else inherit_projections(first, self._engine.export(first), plan, arrays)
        )

    def _check_compatible(self, plan: Plan) -> None:
        first = self._first_vera(plan)
        if first is not None:
            check_vera_family(first, self._plans[first], plan)
        caps = self._backend.capabilities
        for layer in plan.layers:
            reason = caps.why_not(layer.kind, layer.layer.type)
            if reason:
                raise PeftdeclError(f"{layer.module}: {reason}")
        if plan.prompt is not None and caps.why_not(plan.kind):
            raise PeftdeclError(caps.why_not(plan.kind) or "")

    def _external_init(self, plan: Plan, seed: int = 0) -> Any:
        def supply(key: str, spec: Any, drawn: Mapping[str, np.ndarray]) -> np.ndarray:
            source = spec.init.arg("source")
            if key == spec.name and source in SHARED_SOURCES:  # a shared tensor, e.g. prompt tuning's table
                return SHARED_SOURCES[source](self._engine.base_weight, spec, generator_for(seed, key))
            module = key[: -len(spec.name) - 1]
            if source not in EXTERNAL_SOURCES:
                raise AdapterFileError(f"{key}: no initialiser registered for source {source!r}")
            layer = plan.layer(module)
            own = {p.name: drawn[layer.key(p.name)] for p in layer.params if layer.key(p.name) in drawn}
            return EXTERNAL_SOURCES[source](self._engine.base_weight(module), layer, own)

        return supply

    def _is_base_override(self, plan: Plan, key: str) -> bool:
        return key.endswith(".base_layer.weight") or (
            key.endswith(".weight")
            and key[: -len(".weight")] in (self._info.word_embeddings, self._info.output_head)
            and not _module_of(key, plan.modules_to_save)
        )

    def _embedding_copies(self, plan: Plan) -> dict[str, np.ndarray]:
        # When an embedding-named module is targeted, PEFT also saves the base weight of each targeted
        # input/output embedding, as <module>.base_layer.weight.
        if not any(re.match(rf"(.*\.)?({'|'.join(EMBEDDING_LAYER_NAMES)})$", m) for m in plan.targets):
            return {}
        wanted = (self._info.word_embeddings, self._info.output_head)
        return {f"{m}.base_layer.weight": self._engine.base_weight(m) for m in wanted if m in plan.targets}


def _peft_alias(
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


def _module_of(key: str, modules: Sequence[str]) -> str | None:
    for module in modules:
        if key.startswith(module + "."):
            return module
    return None
