"""``AdaptedModel``: the backend-neutral handle returned by ``attach`` and ``load_adapter``.

It owns the bookkeeping every backend shares — adapter names, specs, plans, the active set, saving and loading —
and delegates arrays and arithmetic to the backend's Engine. HF PEFT's ``PeftModel`` names come from
:class:`peftdecl.peft_compat.PeftCompat`. Attributes it does not define are looked up on the engine; of the base
model only the read-only attributes in :data:`peftdecl.peft_compat.BASE_READ_ONLY` pass through, so that nothing
writes or converts the wrapped model behind peftdecl's back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from peftdecl import combine
from peftdecl._json import JsonObject
from peftdecl.adapter_book import AdapterBook
from peftdecl.adapter_files import embedding_copies, is_base_override, module_of
from peftdecl.backend import Backend, Engine
from peftdecl.compatibility import check_compatible, first_vera
from peftdecl.errors import AdapterFileError, PeftdeclError
from peftdecl.formats import hf_peft
from peftdecl.formats.registry import detect_format, get_format, is_adapter_dir
from peftdecl.init import (
    EXTERNAL_SOURCES,
    SHARED_SOURCES,
    ExternalInit,
    check_arrays,
    generator_for,
    init_params,
)
from peftdecl.layer_replication import replicated_info
from peftdecl.lora_init import weight_initialised
from peftdecl.names import check_adapter_name
from peftdecl.options import EngineOptions
from peftdecl.peft_compat import (
    BASE_READ_ONLY,
    NOT_SUPPORTED,
    NotSupportedError,
    PeftCompat,
    base_model_fields,
    check_peft_options,
    peft_alias,
)
from peftdecl.plan import ModelInfo, Plan, compile_plan
from peftdecl.plan.compile import layouts
from peftdecl.plan.ir import ParamSpec
from peftdecl.plan.kinds.lora import refuse_grouped_merges
from peftdecl.plan.kinds.vera import inherit_projections
from peftdecl.spec import SpecBase, load_spec


class AdaptedModel(PeftCompat):
    """A base model with named adapters attached through one backend."""

    def __init__(
        self, backend: Backend, engine: Engine, info: ModelInfo, base_model: object, book: AdapterBook
    ) -> None:
        self._backend = backend
        self._engine = engine
        self._info = info
        self._base_model = base_model
        self._book = book
        """The one record of plans, active, merged, frozen and enabled adapters; the engine reads it too."""

    @classmethod
    def create(
        cls,
        backend: Backend,
        base_model: object,
        engine_options: Mapping[str, object] | None = None,
        **options: object,
    ) -> AdaptedModel:
        """``base_model`` adapted by ``backend``: its inventory, a new AdapterBook and an engine reading it.
        ``engine_options``: :class:`peftdecl.options.EngineOptions` fields (defaults from the environment)."""
        info = backend.inventory(base_model, **options)
        book = AdapterBook()
        engine = backend.create(base_model, info, book, EngineOptions.from_env(engine_options), **options)
        return cls(backend, engine, info, base_model, book)

    def _set_enabled(self, enabled: bool) -> None:
        self._book.enabled = enabled
        self._engine.sync()

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
    def base_model(self) -> object:
        return self._base_model

    @property
    def adapters(self) -> dict[str, Plan]:
        """Adapter name -> its compiled plan."""
        return dict(self._book.plans)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._book.active)

    @property
    def merged_adapters(self) -> tuple[str, ...]:
        return tuple(self._book.merged)

    def plan(self, name: str | None = None) -> Plan:
        return self._book.plans[self._name(name)]

    def spec(self, name: str | None = None) -> SpecBase:
        return self.plan(name).spec

    # -- adapters ------------------------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str | None = None,
        spec: object = None,
        *,
        seed: int = 0,
        activate: bool = False,
        arrays: Mapping[str, npt.ArrayLike] | None = None,
        **peft_options: object,
    ) -> Plan:
        """Compile ``spec`` for this model and attach it as ``name`` (initialised from ``seed`` unless ``arrays``).
        PEFT's keyword names ``adapter_name`` and ``peft_config`` are accepted for ``name`` and ``spec``;
        ``peft_options``: PEFT's other keywords, accepted where they ask for what peftdecl does."""
        name = peft_alias("add_adapter", "name", name, "adapter_name", peft_options)
        spec = peft_alias("add_adapter", "spec", spec, "peft_config", peft_options)
        check_peft_options("add_adapter", peft_options)
        check_adapter_name(name)
        if name in self._book.plans:
            raise PeftdeclError(f"an adapter named {name!r} is already attached")
        if name == "__base__":
            raise PeftdeclError("'__base__' is reserved for rows without an adapter")
        spec = load_spec(spec)
        self._info = replicated_info(self, spec)  # layer_replication rebuilds the layer list first
        plan = compile_plan(spec, self._info, name)
        check_compatible(self._book.plans, plan, self._backend.capabilities)
        base_residuals: dict[str, np.ndarray] = {}
        if arrays is None:
            values = init_params(plan, seed, external=self._external_init(plan, seed))
            values, base_residuals = weight_initialised(
                plan, values, self._engine.base_weight, seed, self._base_model
            )
        else:
            values = {k: np.asarray(v) for k, v in arrays.items()}
            check_arrays(plan, values, origin=f"adapter {name!r}")
        values = self._shared_family_arrays(plan, values)
        originals = {k: np.array(self._engine.base_weight(k.removesuffix(".weight"))) for k in base_residuals}
        if base_residuals:  # PiSSA / OLoRA: W becomes W − s·BA, so that the model's function is unchanged
            self._engine.load_base_weights(base_residuals)
        self._book.plans[name] = plan
        try:
            self._engine.add(name, plan, values)
        except BaseException:
            del self._book.plans[name]
            if originals:
                self._engine.load_base_weights(originals)
            raise
        if activate or not self._book.active:
            self.set_adapter(name)
        return plan

    def load_adapter(
        self,
        directory: str | Path,
        name: str | None = None,
        is_trainable: bool = False,
        *,
        activate: bool = False,
        **peft_options: object,
    ) -> Plan:
        """Read a saved adapter (HF PEFT, mlx-lm or peftdecl's native layout, detected) and attach it as ``name``.

        As HF PEFT's ``load_adapter``: unless ``is_trainable``, the adapter is frozen (no tensor of it is trainable,
        whichever adapters are active) and the model is put in eval mode (dropout off); ``is_trainable=True`` gives
        a trainable adapter and leaves the model's mode as it is. PEFT's keyword ``adapter_name`` is accepted for
        ``name`` (default "default"); ``peft_options``: PEFT's other keywords, accepted where they ask for what
        peftdecl does."""
        name = peft_alias("load_adapter", "name", name, "adapter_name", peft_options, required=False)
        name = hf_peft.DEFAULT_ADAPTER if name is None else name
        check_peft_options("load_adapter", peft_options)
        folder = Path(directory)
        check_adapter_name(name)  # before it becomes a path: "../x" must not read a sibling folder
        if name != hf_peft.DEFAULT_ADAPTER and is_adapter_dir(folder / name):
            folder = folder / name  # PEFT saves a non-default adapter in a sub-folder named after it
        file_format = detect_format(folder)
        spec, tensors = file_format.read(folder)
        self._info = replicated_info(self, spec)
        plan = compile_plan(spec, self._info, name)
        arrays = file_format.to_ir(plan, tensors, self._info)
        base_overrides = {k: v for k, v in arrays.items() if is_base_override(self._info, plan, k)}
        saved_modules = {k: v for k, v in arrays.items() if module_of(k, plan.modules_to_save)}
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
        check_compatible(self._book.plans, plan, self._backend.capabilities)
        if name in self._book.plans:
            raise PeftdeclError(f"an adapter named {name!r} is already attached")
        adapter_arrays = self._shared_family_arrays(plan, adapter_arrays)
        if base_overrides:
            self._engine.load_base_weights(base_overrides)
        # PEFT saves a PiSSA / OLoRA adapter against the original W and recomputes W − s·BA when it loads one
        residuals = weight_initialised(plan, {}, self._engine.base_weight, model=self._base_model)[1]
        if residuals:
            self._engine.load_base_weights(residuals)
        self._book.plans[name] = plan
        try:
            self._engine.add(name, plan, {**adapter_arrays, **saved_modules})
        except BaseException:
            del self._book.plans[name]
            raise
        self._set_frozen(name, not is_trainable)
        if activate or not self._book.active:
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
        self._book.active = names
        self._engine.sync()

    def _set_frozen(self, name: str, frozen: bool) -> None:
        if frozen:
            self._book.frozen.add(name)
        else:
            self._book.frozen.discard(name)
        self._engine.sync()

    def update_spec(self, name: str | None = None, **changes: object) -> Plan:
        """Change config fields of an attached adapter whose tensors keep their shapes (e.g. AdaLoRA's
        ``rank_pattern`` after rank allocation); the adapter is recompiled and keeps its current values."""
        name = self._name(name)
        if name in self._book.merged:
            raise PeftdeclError(f"adapter {name!r} is merged; call unmerge() before changing its spec")
        old = self._book.plans[name]
        plan = compile_plan(old.spec.replace(**changes), self._info)
        shapes = {k: p.shape for k, p in plan.param_specs().items()}
        if shapes != {k: p.shape for k, p in old.param_specs().items()}:
            raise PeftdeclError(f"update_spec{sorted(changes)} would change the tensors of adapter {name!r}")
        self._book.plans[name] = plan
        try:
            self._engine.replace_plan(name, plan)
        except BaseException:
            self._book.plans[name] = old
            raise
        return plan

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter; merged adapters must be unmerged first."""
        self._name(name)
        if name in self._book.merged:
            raise PeftdeclError(f"adapter {name!r} is merged; call unmerge() before deleting it")
        self._engine.remove(name)
        del self._book.plans[name]
        self._book.frozen.discard(name)
        self._book.active = tuple(n for n in self._book.active if n != name)
        self._engine.sync()

    def add_weighted_adapter(
        self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str, **options: Any
    ) -> None:
        """HF PEFT's adapter combination (LoRA, IA3): see :func:`peftdecl.combine.add_weighted_adapter`."""
        combine.add_weighted_adapter(self, adapters, weights, adapter_name, **options)

    # -- merging -------------------------------------------------------------------------------------------
    def merge(self, names: str | Sequence[str] | None = None) -> None:
        """Fold the adapters (default: the active ones) into the base weights."""
        wanted = (
            self._book.active if names is None else ((names,) if isinstance(names, str) else tuple(names))
        )
        for name in wanted:
            if not self._book.plans[self._name(name)].layers and self._book.plans[name].prompt is not None:
                raise PeftdeclError(
                    f"adapter {name!r} is {self._book.plans[name].kind}, which cannot be merged"
                )
        todo = tuple(n for n in wanted if n not in self._book.merged)
        refuse_grouped_merges(self._book.plans[n] for n in todo)  # before any weight is written
        self._engine.merge(todo)
        self._book.merged.extend(todo)

    def unmerge(self) -> None:
        """Restore the base weights of every merged adapter."""
        self._engine.unmerge()
        self._book.merged.clear()

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
        dtype: npt.DTypeLike = np.float32,
    ) -> None:
        """Save adapters (default: all): the default in ``directory``, any other ``X`` in ``directory/X``.

        ``format``: "hf" (HF PEFT, the default), "mlx-lm" (LoRA/DoRA only) or "native" (peftdecl's lossless
        layout: the spec plus every tensor as it lives in memory, e.g. a prefix projection MLP mid-training)."""
        file_format = get_format(format)
        names = tuple(adapters) if adapters is not None else tuple(self._book.plans)
        for name in names:  # each becomes a sub-folder of ``directory``
            check_adapter_name(name)
        payload = {}
        for name in names:
            plan = self._book.plans[self._name(name)]
            arrays = self._engine.export(name)
            # what HF PEFT records of the base model, so that AutoPeftModel can rebuild it
            extra: JsonObject = base_model_fields(plan, self._info) if file_format.name == "hf" else {}
            layout = layouts()[plan.kind]
            if layout.to_file is not None and not file_format.lossless:
                arrays, kind_fields = layout.to_file(plan, arrays)
                extra = {**extra, **kind_fields}
            payload[name] = (
                plan,
                {**arrays, **embedding_copies(self._info, plan, self._engine.base_weight)},
                extra,
            )
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
        names = self._book.trainable(self._book.active)
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
        kinds = ", ".join(f"{n}={p.kind}" for n, p in self._book.plans.items())
        return f"AdaptedModel(backend={self._backend.name}, adapters=[{kinds}], active={list(self._book.active)})"

    # -- helpers -------------------------------------------------------------------------------------------
    def _name(self, name: str | None) -> str:
        if name is None:
            if len(self._book.active) != 1:
                raise PeftdeclError(f"name an adapter; active adapters are {list(self._book.active)}")
            return self._book.active[0]
        if name not in self._book.plans:
            raise PeftdeclError(f"no adapter named {name!r}; attached: {sorted(self._book.plans)}")
        return name

    def _shared_family_arrays(self, plan: Plan, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        first = first_vera(self._book.plans, plan)
        return (
            arrays if first is None else inherit_projections(first, self._engine.export(first), plan, arrays)
        )

    def _external_init(self, plan: Plan, seed: int = 0) -> ExternalInit:
        def supply(key: str, spec: ParamSpec, drawn: Mapping[str, np.ndarray]) -> np.ndarray:
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
