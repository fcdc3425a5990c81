"""The backend contract: a ``Backend`` builds an ``Engine`` per model; both are typed Protocols.

Backends are found through the entry-point group ``peftdecl.backends`` and imported lazily: listing them reads
each one's static :class:`Capabilities` without importing its framework (torch, MLX).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, runtime_checkable

import numpy as np

from peftdecl.adapter_book import AdapterBook
from peftdecl.errors import BackendError, PeftdeclError
from peftdecl.options import EngineOptions
from peftdecl.plan.ir import LayerPlan, ModelInfo, Plan

if TYPE_CHECKING:
    from peftdecl.kinds import BackendKinds

ENTRY_POINT_GROUP = "peftdecl.backends"
# Shipped in the peftdecl wheel; used when entry points are unavailable (e.g. running from a source tree).
BUILTIN_BACKENDS: dict[str, str] = {
    "numpy": "peftdecl_numpy:NumpyBackend",
    "torch": "peftdecl_torch:TorchBackend",
    "mlx": "peftdecl_mlx:MlxBackend",
    "cupy": "peftdecl_cupy:CupyBackend",
}


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do. Tests, benchmarks and docs read this; a missing entry is a skip with a reason."""

    name: str
    kinds: Mapping[str, tuple[str, ...]]
    """Execution kind -> layer types it runs on. A backend passes :class:`peftdecl.kinds.BackendKinds`, read live
    from the kind registry (every kind that declares ops for it, on the layer types it wraps)."""
    gradients: Literal["autograd", "explicit", "none"]
    devices: tuple[str, ...] = ("cpu",)
    dtypes: tuple[str, ...] = ("float64",)
    mixed_batch: Sequence[str] = ()
    """Kinds that accept ``adapter_names=`` (one adapter per row): :func:`peftdecl.kinds.additive_kinds`."""
    multi_active: Sequence[str] = ()
    """Kinds that allow several active adapters on one layer at once: :func:`peftdecl.kinds.layer_kinds`."""
    fused_kernels: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    """Python modules the backend imports when created (checked without importing them)."""
    quantizations: tuple[str, ...] = ()
    """Quantised base layers (``LayerInfo.quantization`` values) the backend can adapt."""
    dequantizes: bool = False
    """Kinds that read the base weight (``KindDecl.needs_dense_weight``) run over a quantised layer by
    dequantising its weight on the fly; False: the backend refuses them there."""

    def __post_init__(self) -> None:
        from peftdecl.kinds import BackendKinds

        # a registry-backed table stays live (kinds registered later join it); any other is frozen as given
        if not isinstance(self.kinds, BackendKinds):
            object.__setattr__(self, "kinds", MappingProxyType(dict(self.kinds)))

    def supports(self, kind: str, layer_type: str | None = None) -> bool:
        types = self.kinds.get(kind)
        return types is not None and (layer_type is None or layer_type in types)

    def why_not(self, kind: str, layer_type: str | None = None) -> str | None:
        """None if supported, else a one-line reason (used as a test skip reason)."""
        if kind not in self.kinds:
            return f"the {self.name} backend does not implement {kind}"
        if layer_type is not None and layer_type not in self.kinds[kind]:
            return f"the {self.name} backend does not run {kind} on {layer_type} layers"
        return None

    @classmethod
    def of_kinds(
        cls,
        kinds: BackendKinds,
        gradients: Literal["autograd", "explicit", "none"],
        dequantizes: bool = False,
        **fields: tuple[str, ...],
    ) -> Capabilities:
        """A backend's capabilities from its registry-backed kind table: its additive kinds run in mixed batches
        and every layer kind composes with the others on a layer (:mod:`peftdecl.composition`); prompt learning
        has none. ``fields``: devices, dtypes, fused_kernels, requires, quantizations."""
        from peftdecl.kinds import additive_kinds, layer_kinds

        return cls(
            name=kinds.backend,
            kinds=kinds,
            gradients=gradients,
            mixed_batch=additive_kinds(kinds),
            multi_active=layer_kinds(kinds),
            dequantizes=dequantizes,
            **fields,
        )


LayerT = TypeVar("LayerT", contravariant=True)
if TYPE_CHECKING:
    # PEP 696 default, for the checker only: a backend may write ``KindOps[Handle]`` without naming its array type
    from typing_extensions import TypeVar as DefaultingTypeVar

    ArrayT = DefaultingTypeVar("ArrayT", default=Any)
else:
    ArrayT = TypeVar("ArrayT")
Params = Mapping[str, ArrayT]
"""A layer's adapter tensors by HF PEFT suffix (``lora_A.weight``), shared tensors (VeRA's) included."""


@runtime_checkable
class KindOps(Protocol[LayerT, ArrayT]):
    """The math of one adapter kind on one backend: the same names and arguments on every backend.

    ``lp`` is the layer's plan, ``layer`` the backend's handle on the adapted layer (its base weights, training
    flag and the engine's generator for random draws), ``p`` the adapter's tensors, ``x`` the layer input;
    ``ArrayT`` is the backend's array type (``torch.Tensor``, ``mx.array``, the NumPy reference's arrays).
    Prompt learning (prefix and prompt tuning) acts on the model, not a layer, and has its own model-level ops.
    """

    kind: str
    additive: bool
    """True when the output is base(x) + Δ(x) (:class:`AdditiveOps`); otherwise :class:`ComposingOps`."""

    def forward(self, lp: LayerPlan, layer: LayerT, p: Params[ArrayT], x: ArrayT) -> ArrayT:
        """The whole layer output, base included, with only this adapter running."""
        ...

    def delta_weight(self, lp: LayerPlan, layer: LayerT, p: Params[ArrayT]) -> ArrayT:
        """ΔW in the IR layout, such that merging gives W + ΔW (for multiplicative kinds: the merged W − W)."""
        ...

    def merge(
        self, lp: LayerPlan, layer: LayerT, p: Params[ArrayT], cache: dict[str, ArrayT]
    ) -> tuple[ArrayT, ArrayT | None]:
        """(W, b) with the adapter folded into the current base weights; ``cache`` lives until the unmerge."""
        ...

    def unmerge(
        self, lp: LayerPlan, layer: LayerT, p: Params[ArrayT], cache: dict[str, ArrayT]
    ) -> tuple[ArrayT, ArrayT | None]:
        """(W, b) with the adapter taken out again."""
        ...


@runtime_checkable
class AdditiveOps(KindOps[LayerT, ArrayT], Protocol[LayerT, ArrayT]):
    """A kind whose output is base(x) + Δ(x): it stacks with others by addition and runs in mixed batches.

    Optional fast path: ``accumulate(lp, layer, p, x, result) -> result + Δ(x)`` (e.g. one fused multiply-add into
    the output so far); callers use it where a kind has it and ``result + delta(...)`` otherwise.
    Optional fast path: ``alone(lp, layer, p, x) -> y | None``, the whole output with this adapter alone where it
    can beat base(x) + Δ(x) (MLX LoRA's fused functions), None where it cannot; ``forward`` falls back then."""

    def delta(self, lp: LayerPlan, layer: LayerT, p: Params[ArrayT], x: ArrayT) -> ArrayT:
        """Δ(x): the adapter's contribution to the layer output."""
        ...


@runtime_checkable
class ComposingOps(KindOps[LayerT, ArrayT], Protocol[LayerT, ArrayT]):
    """A kind that transforms the output built so far (OUTPUT) or the input the base reads (INPUT); see
    :mod:`peftdecl.composition` for how several active adapters combine."""

    input_order: Literal["active", "reversed"]

    def composition(self, lp: LayerPlan) -> Literal["output", "input"]: ...
    def compose_output(self, lp: LayerPlan, layer: LayerT, p: Params[ArrayT], x: ArrayT, y: ArrayT) -> ArrayT:
        """OUTPUT: y ← φ(x, y), the output so far transformed."""
        ...

    def compose_weight(self, lp: LayerPlan, layer: LayerT, p: Params[ArrayT], weight: ArrayT) -> ArrayT:
        """INPUT: the weight the base operation runs with, W ↦ W Tᵀ for the input transform T."""
        ...


Tape = dict[str, object]
"""What a ``*_record`` keeps for its backward: each kind's own record of arrays, flags and nested tapes."""


@runtime_checkable
class ExplicitGradientOps(KindOps[LayerT, ArrayT], Protocol[LayerT, ArrayT]):
    """A backend without autograd (the NumPy reference) also records a tape and runs the backward by hand.

    Each way of running a kind has a ``*_record`` that returns (its result, a tape) and a ``*_backward`` that
    takes the tape and the gradient of that result, with the same leading ``(lp, layer, p)``:

    - the whole layer: :meth:`record` / :meth:`backward`;
    - an additive kind's Δ(x): ``delta_record(lp, layer, p, x) -> (Δ, tape)``,
      ``delta_backward(lp, layer, p, tape, dΔ) -> (dL/dx through Δ or None, grads)``;
    - an OUTPUT kind: ``compose_output_record(lp, layer, p, x, y) -> (y', tape)``,
      ``compose_output_backward(lp, layer, p, tape, dy') -> (dL/dy, dL/dx outside y or None, grads)``;
    - an INPUT kind: ``compose_weight_record(lp, layer, p, weight) -> (W', tape)``,
      ``compose_weight_backward(lp, layer, p, tape, dW') -> (dL/dW, grads)``.

    ``grads`` maps each trainable tensor's name to dL/d(tensor); the tape-free methods of :class:`KindOps`,
    :class:`AdditiveOps` and :class:`ComposingOps` return the first element of the matching ``*_record``.
    """

    def record(self, lp: LayerPlan, layer: LayerT, p: Params[ArrayT], x: ArrayT) -> tuple[ArrayT, Tape]:
        """(the output of :meth:`forward`, the tape its backward needs)."""
        ...

    def backward(
        self, lp: LayerPlan, layer: LayerT, p: Params[ArrayT], tape: Tape, dy: ArrayT
    ) -> tuple[ArrayT | None, dict[str, ArrayT]]:
        """(dL/dx, dL/dp for every trainable tensor by name) from dL/dy."""
        ...


RngState = dict[str, np.ndarray]
"""An engine generator's state as NumPy arrays (safetensors can store it in a training checkpoint)."""


@runtime_checkable
class Engine(Protocol):
    """A backend's live state for one adapted model.

    The engine reads the model's :class:`peftdecl.adapter_book.AdapterBook` (plans, active, merged, frozen,
    enabled) and keeps no copy of it; ``sync()`` is called after the model changes the book."""

    def add(self, name: str, plan: Plan, arrays: Mapping[str, np.ndarray]) -> None:
        """Build the tensors of adapter ``name`` (already in the book) from ``arrays`` (IR keys)."""
        ...

    def remove(self, name: str) -> None: ...
    def replace_plan(self, name: str, plan: Plan) -> None:
        """Adapter ``name`` now runs ``plan`` (same tensor shapes): its live parameters keep their identity."""
        ...

    def sync(self) -> None:
        """The book changed (active set, enabled, frozen): bring trainability and modes in line."""
        ...

    def export(self, name: str) -> dict[str, np.ndarray]: ...
    def merge(self, names: tuple[str, ...]) -> None: ...
    def unmerge(self) -> None: ...
    def unload(self, dequantize: bool = False) -> object:
        """The base model (of the backend's framework) with every adapter layer removed; merged weights stay.
        ``dequantize``: every quantised base layer becomes a float layer holding its dequantised weight."""
        ...

    def base_weight(self, module: str) -> np.ndarray:
        """The base weight in the IR layout, as NumPy in its own dtype (float64 for the reference); a quantised
        layer's weight dequantised."""
        ...

    def load_base_weights(self, weights: Mapping[str, np.ndarray]) -> None: ...
    def forward(self, *args: Any, **kwargs: Any) -> Any: ...
    def trainable_parameters(self, names: tuple[str, ...]) -> dict[str, Any]:
        """The live trainable tensors of adapters ``names`` (and their modules_to_save copies), one flat mapping
        keyed by :func:`trainable_key` on every backend; frozen adapters are left out."""
        ...

    def train(self, mode: bool) -> None: ...
    def get_rng_state(self) -> RngState:
        """The state of the engine's own generator (dropout masks and other draws)."""
        ...

    def set_rng_state(self, state: RngState) -> None:
        """Restore a state returned by :meth:`get_rng_state`: the same draws follow."""
        ...


ADAPTER_KEY_SEPARATOR = "/"


def trainable_key(adapter: str, key: str, adapters: Sequence[str]) -> str:
    """The key of ``adapter``'s tensor ``key`` (its full IR key, e.g. ``layers.0.q.lora_A.weight``, or a
    modules_to_save tensor such as ``classifier.weight``) in ``trainable_parameters(adapters)``: the full key itself
    when one adapter is asked for, ``"<adapter>/<full key>"`` when several are (each may hold the same key)."""
    return f"{adapter}{ADAPTER_KEY_SEPARATOR}{key}" if len(adapters) > 1 else key


def check_options(backend: str, options: Mapping[str, object], known: Sequence[str], source: str) -> None:
    """Refuse the ``options`` of ``attach`` / ``load_adapter`` that ``backend`` does not accept (``known``): raises
    BackendError naming them and ``source``, where that backend reads layer types and model facts instead."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise BackendError(
            f"the {backend} backend got unknown options {unknown}; it accepts {list(known)} "
            f"(layer types and model facts are read from {source})"
        )


BASE_ROW = "__base__"
"""The ``adapter_names`` entry of a mixed-batch row that runs without an adapter."""


def check_adapter_names(names: Iterable[str], attached: Collection[str], merged: bool) -> None:
    """Refuse a mixed batch's ``adapter_names`` (one per row) when they list an adapter that is not ``attached``
    (:data:`BASE_ROW` aside) or when adapters are ``merged``: raises PeftdeclError, returns None otherwise."""
    unknown = sorted({n for n in names if n != BASE_ROW and n not in attached})
    if unknown:
        raise PeftdeclError(f"adapter_names lists unknown adapters {unknown}; attached: {sorted(attached)}")
    if merged:
        raise PeftdeclError("adapter_names cannot be used while adapters are merged; call unmerge() first")


@runtime_checkable
class Backend(Protocol):
    """Turns a base model into an inventory and an Engine."""

    name: str
    capabilities: Capabilities

    def accepts(self, model: object) -> bool: ...
    def inventory(self, model: Any, **options: Any) -> ModelInfo: ...
    def create(
        self, model: Any, info: ModelInfo, book: AdapterBook, options: EngineOptions, **model_options: Any
    ) -> Engine: ...


LayerCapture = dict[str, tuple[np.ndarray, np.ndarray]]
"""Adapted module -> (its input, its output) as NumPy arrays, from the first call of that layer."""


@runtime_checkable
class Capturing(Protocol):
    """Optional Engine method (used by :mod:`peftdecl.equiv`): run token ids ``[batch, seq]`` through the model
    and return (final logits as NumPy, or None; the input and output of every adapted layer)."""

    def capture(self, input_ids: np.ndarray) -> tuple[np.ndarray | None, LayerCapture]: ...


@runtime_checkable
class CheckpointLoading(Protocol):
    """Optional Backend method (used by :mod:`peftdecl.equiv`): the backend's model built from a local HF
    checkpoint folder (``config.json`` + ``model*.safetensors``, as ``save_pretrained`` writes it), offline."""

    def load_checkpoint(self, directory: str | Path) -> object: ...


@dataclass(frozen=True)
class BackendEntry:
    """An installed backend, known before it is imported."""

    name: str
    target: str
    capabilities: Capabilities | None = None
    available: bool = True
    reason: str = ""
    extra: dict[str, object] = field(default_factory=dict)


def _entry_points() -> dict[str, str]:
    found = dict(BUILTIN_BACKENDS)
    try:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            found[ep.name] = ep.value
    except Exception:  # a broken distribution must not hide the built-in backends
        pass
    return found


def _backend_class(target: str) -> type[Backend]:
    module_name, _, attr = target.partition(":")
    found: type[Backend] = getattr(importlib.import_module(module_name), attr)
    return found


def backends() -> dict[str, BackendEntry]:
    """Installed backends and their Capabilities; the heavy libraries are not imported. A backend class may
    define ``unavailable_reason() -> str`` (a static method): a non-empty reason lists it as unavailable."""
    entries = {}
    for name, target in _entry_points().items():
        try:
            cls = _backend_class(target)
            caps: Capabilities = cls.capabilities
            missing = [m for m in caps.requires if importlib.util.find_spec(m) is None]
            reason = f"needs {', '.join(missing)} (not installed)" if missing else ""
            # a backend that needs hardware says why it cannot run here (no device), without raising
            probe = getattr(cls, "unavailable_reason", None)
            if not missing and callable(probe):
                reason = probe()
            entries[name] = BackendEntry(name, target, caps, not reason, reason)
        except Exception as exc:
            entries[name] = BackendEntry(name, target, None, False, f"failed to load: {exc}")
    return entries


_INSTANCES: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """The backend called ``name``, created on first use."""
    if name not in _INSTANCES:
        entry = backends().get(name)
        if entry is None:
            raise BackendError(f"no backend named {name!r}; installed: {', '.join(backends())}")
        if not entry.available:
            raise BackendError(f"backend {name!r} is unavailable: {entry.reason}")
        _INSTANCES[name] = _backend_class(entry.target)()
    return _INSTANCES[name]


def backend_for(model: object) -> Backend:
    """The first available backend whose ``accepts`` takes ``model``."""
    for name, entry in backends().items():
        if entry.available:
            backend = get_backend(name)
            if backend.accepts(model):
                return backend
    raise BackendError(
        f"no installed backend accepts a {type(model).__module__}.{type(model).__name__}; "
        "pass a torch nn.Module, an mlx.nn.Module, or a mapping of names to NumPy arrays"
    )
