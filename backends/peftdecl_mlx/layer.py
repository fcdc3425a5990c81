"""The MLX module that replaces an adapted layer: the whole output of one running adapter's kind, or several
composed by the rules of :mod:`peftdecl.composition` (additive kinds: y = base(x) + Σᵢ Δᵢ(x)).

The base layer is kept frozen as ``base_layer``; each adapter's tensors live in ``adapters[name]`` (an
:class:`AdapterParams` module), so the model's parameter tree reads ``...q_proj.adapters.default.lora_A.weight``
and ``mx.value_and_grad`` / ``mlx.optimizers`` see exactly the adapter arrays that are trainable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import mlx.core as mx
import mlx.nn as nn

from peftdecl.backend import BASE_ROW as BASE
from peftdecl.errors import PeftdeclError
from peftdecl.options import EngineOptions
from peftdecl.plan import LayerPlan
from peftdecl.quant.requantize import warn_requantized
from peftdecl_mlx import compose, quantized
from peftdecl_mlx.generator import Generator
from peftdecl_mlx.kinds import ops_for
from peftdecl_mlx.kinds._protocols import MergeCache, MlxAdditiveOps, MlxOps
from peftdecl_mlx.kinds.trainable_tokens import tied_head_tokens

T = TypeVar("T")


class TensorGroup(nn.Module):
    """One level of an adapter's nested tensor names (``lora_A`` of ``lora_A.weight``): a module, not a dict, so
    that each leaf is frozen by its own key (MLX freezes a module's direct keys only)."""


class AdapterParams(nn.Module):
    """One adapter's tensors on one layer, nested at the IR name's dots (``lora_A.weight`` -> ``lora_A["weight"]``).

    Each level is a :class:`TensorGroup`, so a frozen tensor beside trainable ones (MiCA's ``lora_B.weight``,
    MonteCLoRA's sampler buffers) is left out of ``trainable_parameters()`` whole and ``Module.update`` accepts the
    tree (a frozen leaf in a plain dict would come back as ``{}`` in an array's place)."""

    _ir_paths: tuple[tuple[str, tuple[str, ...]], ...]

    def __init__(self, arrays: Mapping[str, mx.array]) -> None:
        super().__init__()
        for name, value in arrays.items():
            *heads, leaf = name.split(".")
            self._group(heads, create=True)[leaf] = value
        # (IR name, path) of every tensor, outside the parameter tree (a plain attribute): tensors() runs on every
        # call of the layer and walks these instead of the whole tree
        object.__setattr__(self, "_ir_paths", tuple((n, tuple(n.split("."))) for n in arrays))

    def _group(self, heads: Sequence[str], create: bool = False) -> nn.Module:
        """The module holding the leaves under ``heads`` (made where missing when ``create``)."""
        node: nn.Module = self
        for head in heads:
            if create and head not in node:
                node[head] = TensorGroup()
            node = cast(nn.Module, node[head])
        return node

    def tensors(self) -> dict[str, mx.array]:
        """IR name -> array (read at call time, so tracers from ``mx.value_and_grad`` are picked up)."""
        out: dict[str, mx.array] = {}
        for name, path in self._ir_paths:
            node: object = self
            for part in path:
                node = cast("dict[str, object]", node)[part]
            out[name] = cast(mx.array, node)
        return out

    def set_trainable(self, names: Sequence[str]) -> None:
        """Freeze every tensor, then unfreeze ``names`` (IR names), each by its leaf key in its own group."""
        self.freeze()
        for name in names:
            *heads, leaf = name.split(".")
            self._group(heads).unfreeze(recurse=False, keys=[leaf])

    def overwrite(self, name: str, value: mx.array) -> None:
        """Replace the array of IR name ``name`` (its trainability stays)."""
        *heads, leaf = name.split(".")
        self._group(heads)[leaf] = value


@dataclass
class LayerState:
    """What the engine decides for a layer; not part of the parameter tree."""

    plans: dict[str, LayerPlan] = field(default_factory=dict)
    shared: dict[str, dict[str, mx.array]] = field(default_factory=dict)
    running: tuple[str, ...] = ()
    merged: list[str] = field(default_factory=list)
    merge_cache: dict[str, MergeCache] = field(default_factory=dict)
    unmerged: mx.array | None = None
    """The base weight before the first merged adapter, kept while any is merged where a later merge reads it."""
    unmerged_codes: dict[str, mx.array] | None = None
    """A quantised base's arrays (codes and bias) before the first merge, kept while any adapter is merged: the last
    unmerge puts them back exactly, and a dequantising unload merges again from them in full precision."""
    rows: tuple[str, ...] | None = None
    """Mixed batch: one adapter name per batch row for the current call."""
    capture: list[tuple[mx.array, mx.array]] | None = None
    norm_cache: tuple[mx.array, mx.array] | None = None
    """(the weight array, its rows' Σ W²): valid while the base weight is that very array."""
    ops: dict[str, MlxOps] = field(default_factory=dict)
    memo: dict[int, tuple[tuple[mx.array, ...], object]] = field(default_factory=dict)
    """id(layer plan) -> (the input arrays, what :meth:`AdaptedLayer.memo` computed from them)."""


class AdaptedLayer(nn.Module):
    """An ``nn.Linear`` or ``nn.Embedding`` with peftdecl adapters; ``options`` and ``generator`` are the engine's."""

    def __init__(
        self,
        module: str,
        base_layer: nn.Module,
        layer_type: str,
        adapter_dtype: mx.Dtype,
        options: EngineOptions,
        generator: Generator,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters: dict[str, AdapterParams] = {}
        self.module_name = module
        self.layer_type = layer_type
        self.adapter_dtype = adapter_dtype
        self.options = options
        self.generator = generator
        self.adapter_state = LayerState()

    # -- the base layer -----------------------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        """Whether the base is an ``nn.QuantizedLinear`` / ``nn.QuantizedEmbedding``."""
        return quantized.is_quantized(self.base_layer)

    @property
    def weight(self) -> mx.array:
        """The base weight in the IR layout ([out, in]; embeddings [num_embeddings, dim]), as MLX stores it; a
        quantised base's dequantised on every read (a temporary, never kept)."""
        if quantized.is_quantized(self.base_layer):
            return quantized.dequantize(self.base_layer)
        weight: mx.array = self.base_layer.weight
        return weight

    @property
    def weight_identity(self) -> mx.array:
        """The array that is replaced whenever the base weight changes (a quantised base's codes): the key of
        caches derived from the weight."""
        weight: mx.array = self.base_layer.weight
        return weight

    @property
    def dtype(self) -> mx.Dtype:
        """The dtype the base computes in (a quantised base's: its scales')."""
        held: mx.array = self.base_layer.scales if self.quantized else self.base_layer.weight
        return held.dtype

    @property
    def bias(self) -> mx.array | None:
        return self.base_layer.get("bias", None)

    def base_forward(self, x: mx.array, weight: mx.array | None = None, with_bias: bool = True) -> mx.array:
        """The base operation with ``weight`` (default: its own) in the IR layout."""
        if weight is None and (with_bias or self.layer_type == "embedding"):
            y: mx.array = self.base_layer(x)
            return y
        if weight is None and isinstance(self.base_layer, nn.QuantizedLinear):
            return quantized.quantized_matmul(self.base_layer, x)
        w = self.weight if weight is None else weight
        if self.layer_type == "embedding":
            return w[x]
        y = x @ w.T
        bias = self.bias
        return y + bias if with_bias and bias is not None else y

    def row_norms_squared(self) -> mx.array:
        """Σ_in W² per output row of the frozen base weight, cached until the weight array is replaced."""
        key = self.weight_identity
        cached = self.adapter_state.norm_cache
        if cached is None or cached[0] is not key:
            w = self.weight
            rows = w.T if self.layer_type == "embedding" else w
            cached = (key, mx.sum(mx.square(rows.astype(mx.float32)), axis=1))
            self.adapter_state.norm_cache = cached
        return cached[1]

    def set_base(self, weight: mx.array, bias: mx.array | None) -> None:
        """Replace the base weight (and bias), keeping the base layer's dtype; a quantised base's weight is
        quantised again with its own bits and group size (and says so: RequantizationWarning)."""
        if quantized.is_quantized(self.base_layer):
            quantized.requantize(self.base_layer, weight)
            warn_requantized(self.module_name, quantized.quantization_name(self.base_layer))
        else:
            self.base_layer.weight = weight.astype(self.base_layer.weight.dtype)
        if bias is not None and "bias" in self.base_layer:
            self.base_layer.bias = bias.astype(self.base_layer.bias.dtype)
        mx.eval(self.base_layer.parameters())

    def as_linear(self, x: mx.array) -> mx.array:
        # a tied output head reads the embedding's base weight, as in HF PEFT (merges do show up there), and the
        # embedding's trainable tokens, which HF PEFT ties to the head
        y: mx.array = self.base_layer.as_linear(x)
        return tied_head_tokens(self, x, y)

    # -- adapters -----------------------------------------------------------------------------------------
    def add(
        self, name: str, lp: LayerPlan, arrays: Mapping[str, mx.array], shared: Mapping[str, mx.array]
    ) -> None:
        self.adapters[name] = AdapterParams(arrays)
        self.adapter_state.plans[name] = lp
        self.adapter_state.shared[name] = dict(shared)
        self.adapter_state.ops[name] = ops_for(lp.kind)

    def replace_plan(self, name: str, lp: LayerPlan) -> None:
        """Adapter ``name`` now runs ``lp`` (same tensors: the arrays stay where they are)."""
        state = self.adapter_state
        state.memo.pop(id(state.plans[name]), None)
        state.plans[name] = lp
        state.ops[name] = ops_for(lp.kind)

    def remove(self, name: str) -> None:
        self.adapter_state.running = tuple(n for n in self.adapter_state.running if n != name)
        del self.adapters[name]
        self.adapter_state.memo.pop(id(self.adapter_state.plans[name]), None)
        del self.adapter_state.plans[name]
        self.adapter_state.shared.pop(name, None)
        self.adapter_state.ops.pop(name, None)

    def params(self, name: str) -> dict[str, mx.array]:
        """The tensors one adapter's kind reads: its own and the shared ones."""
        own = self.adapters[name].tensors()
        shared = self.adapter_state.shared[name]
        return {**shared, **own} if shared else own

    def memo(self, lp: LayerPlan, inputs: tuple[mx.array, ...], compute: Callable[[], T]) -> T:
        """``compute()`` for one adapter's layer plan, reused while ``inputs`` are the very same array objects.

        MLX arrays are replaced, not changed, by optimisers and by ``value_and_grad``'s tracers, so a training step
        always recomputes; repeated inference calls do not."""
        cached = self.adapter_state.memo.get(id(lp))
        same = cached is not None and len(cached[0]) == len(inputs)
        if same and cached is not None and all(a is b for a, b in zip(cached[0], inputs, strict=True)):
            return cast(T, cached[1])
        value = compute()
        self.adapter_state.memo[id(lp)] = (inputs, value)
        return value

    # every random draw comes from the engine's generator (seeded by EngineOptions.seed, saved with its state)
    def random(self, shape: Sequence[int]) -> mx.array:
        """U[0, 1) of the given shape."""
        return self.generator.uniform(shape)

    def permutation(self, n: int) -> list[int]:
        """A random permutation of range(n)."""
        return self.generator.permutation(n)

    def integers(self, high: int) -> int:
        """A random integer in [0, high)."""
        return self.generator.integers(high)

    def overwrite(self, lp: LayerPlan, tensor: str, value: mx.array) -> None:
        """Replace one stored adapter tensor (COFT's in-place projection, MonteCLoRA's last draw, as HF PEFT does)."""
        name = next(n for n, plan in self.adapter_state.plans.items() if plan is lp)
        self.adapters[name].overwrite(tensor, value)

    def dropout(self, x: mx.array, p: float) -> mx.array:
        """x ⊙ mask / (1 − p) in training mode, the mask kept where u ≥ p (the NumPy reference's rule); x otherwise."""
        if not self.training or p <= 0.0:
            return x
        mask = (self.random(x.shape) >= p).astype(mx.float32) / (1.0 - p)
        return x * mask.astype(x.dtype)

    # -- merging ------------------------------------------------------------------------------------------
    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weight as it is (adapters merged before stay in)."""
        state = self.adapter_state
        lp = state.plans[name]
        base = self.base_layer
        if not state.merged and quantized.is_quantized(base):
            # MLX arrays are replaced, not changed: holding the codes copies nothing
            bias = base.get("bias")
            state.unmerged_codes = {**quantized.codes(base), **({} if bias is None else {"bias": bias})}
        elif not state.merged and len(state.plans) > 1:
            state.unmerged = self.weight
        cache = state.merge_cache.setdefault(name, {})
        weight, bias = state.ops[name].merge(lp, self, self.params(name), cache)
        self.set_base(weight, bias)
        self.adapter_state.merged.append(name)

    def unmerge(self, name: str) -> None:
        lp = self.adapter_state.plans[name]
        cache = self.adapter_state.merge_cache.pop(name, {})
        weight, bias = self.adapter_state.ops[name].unmerge(lp, self, self.params(name), cache)
        state = self.adapter_state
        if state.merged == [name] and state.unmerged_codes is not None:
            # the last unmerge of a quantised base: its own codes, not a second rounding of W′ − ΔW
            quantized.restore(self.base_layer, state.unmerged_codes)
            mx.eval(self.base_layer.parameters())
        else:
            self.set_base(weight, bias)
        state.merged.remove(name)
        if not state.merged:
            state.unmerged = state.unmerged_codes = None

    def dequantize_base(self) -> None:
        """Make a quantised base an ``nn.Linear`` / ``nn.Embedding`` holding its dequantised weight; adapters merged
        into it are merged again, in order, in full precision from the codes they were first merged into."""
        base = self.base_layer
        if not quantized.is_quantized(base):
            return
        state = self.adapter_state
        merged = list(state.merged)
        if state.unmerged_codes is not None:
            quantized.restore(base, state.unmerged_codes)
        self.base_layer = quantized.dequantized_layer(base)
        state.merged, state.merge_cache = [], {}
        state.unmerged = state.unmerged_codes = state.norm_cache = None
        state.memo.clear()
        for name in merged:
            self.merge(name)

    def unmerged_weight(self) -> mx.array:
        """The base weight without the adapters merged into it: what DoRA's norm is taken on when it merges after
        others, as in HF PEFT (which takes them out and puts them back)."""
        state = self.adapter_state
        if state.unmerged is not None:
            return state.unmerged
        if state.unmerged_codes is not None and quantized.is_quantized(self.base_layer):
            return quantized.dequantize(self.base_layer, state.unmerged_codes)
        if state.merged:
            raise PeftdeclError(
                f"{self.module_name}: an adapter added after the merge needs the unmerged weight; "
                "unmerge() and merge again"
            )
        return self.weight

    # -- forward ------------------------------------------------------------------------------------------
    def adapter_input(self, x: mx.array) -> mx.array:
        """x in the adapter dtype (an embedding's token ids as they are)."""
        if self.layer_type == "embedding" or x.dtype == self.adapter_dtype:
            return x
        return x.astype(self.adapter_dtype)

    def __call__(self, x: mx.array) -> mx.array:
        state = self.adapter_state
        if state.rows is not None:
            y = self._mixed(x, state.rows)
        elif not state.running:
            y = self.base_layer(x)
        else:
            y = self._running(x, state.running)
        if state.capture is not None:
            state.capture.append((x, y))
        return y

    def _running(self, x: mx.array, running: tuple[str, ...]) -> mx.array:
        state = self.adapter_state
        if len(running) == 1:
            name = running[0]
            y: mx.array = state.ops[name].forward(state.plans[name], self, self.params(name), x)
            return y if self.layer_type == "embedding" or y.dtype == x.dtype else y.astype(x.dtype)
        entries = [compose.Running(state.plans[n], state.ops[n], self.params(n)) for n in running]
        return compose.forward(self, x, entries)

    def _mixed(self, x: mx.array, rows: tuple[str, ...]) -> mx.array:
        if len(rows) != x.shape[0]:
            raise PeftdeclError(f"adapter_names has {len(rows)} entries for a batch of {x.shape[0]} rows")
        y: mx.array = self.base_layer(x)
        xa = self.adapter_input(x)
        for name in dict.fromkeys(rows):
            if name == BASE or name not in self.adapters:
                continue
            lp = self.adapter_state.plans[name]
            ops = self.adapter_state.ops[name]
            if not ops.additive:
                raise PeftdeclError(
                    f"adapter {name!r} is {lp.kind}; mixed batches support additive kinds only"
                )
            index = mx.array([i for i, n in enumerate(rows) if n == name])
            delta = cast("MlxAdditiveOps", ops).delta(lp, self, self.params(name), xa[index])
            y = y.at[index].add(delta.astype(y.dtype))
        return y


class SavedModule(nn.Module):
    """HF PEFT's ``modules_to_save``: a trainable copy of a whole module per adapter; the first active adapter
    that has a copy computes (merged or not: nothing is merged into a copy), otherwise the original does."""

    def __init__(self, module: str, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.copies: dict[str, nn.Module] = {}
        self.module_name = module
        self.current: str | None = None

    def active_module(self) -> nn.Module:
        return self.original if self.current is None else self.copies[self.current]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.active_module()(*args, **kwargs)

    def as_linear(self, x: mx.array) -> mx.array:
        y: mx.array = self.active_module().as_linear(x)
        return y

    @property
    def weight(self) -> mx.array:
        weight: mx.array = self.active_module().weight
        return weight
