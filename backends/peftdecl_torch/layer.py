"""The wrappers the torch backend puts in place of a model's modules.

``AdaptedLayer`` replaces a targeted layer: y = base(x) with each running adapter applied by its kind's ops;
several compose by the rules of :mod:`peftdecl.composition` (additive kinds: y = base(x) + Σ_a Δ_a(x)).
The wrapper reads the model's :class:`peftdecl.adapter_book.AdapterBook` (which adapters run), the engine's
options and generators through the shared :class:`peftdecl_torch.context.EngineContext`, and the per-call
``adapter_names`` (mixed batches) from a context variable. ``modules_to_save`` wrappers live in
:mod:`peftdecl_torch.saved`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812  (the torch idiom)
from torch import nn

from peftdecl.backend import BASE_ROW as BASE
from peftdecl.backend import KindOps
from peftdecl.errors import PeftdeclError
from peftdecl.options import EngineOptions
from peftdecl.plan import LayerInfo, LayerPlan
from peftdecl_torch import compose, cuda_kernels
from peftdecl_torch.base_view import PeftLayerAttributes
from peftdecl_torch.context import EngineContext
from peftdecl_torch.kinds import _fused as fused
from peftdecl_torch.kinds import ops_for
from peftdecl_torch.mixed_batch import RowAdapters, current_rows
from peftdecl_torch.quantized import bnb_kind, dequantized_linear, dequantized_weight, float_dtype, requantize


class _Holder(nn.Module):
    """Holds one adapter's tensor(s) under their leaf names (``weight``, ``bias``) as PEFT's sub-modules do."""


class _BufferDict(nn.Module):
    """Adapter name -> frozen tensor (a buffer, so it follows ``.to()`` but is never trained)."""


def _to_tensor(value: np.ndarray, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # a copy: the caller's array must not become the live (trained) parameter
    tensor = torch.tensor(np.asarray(value))
    return tensor.to(device=like.device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)


def adapter_dtype(base_weight: torch.Tensor, autocast: bool) -> torch.dtype:
    """PEFT's rule: adapters take the base layer's float dtype, except that half types become float32."""
    if not base_weight.is_floating_point():
        return torch.float32
    if autocast and base_weight.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return base_weight.dtype


class AdaptedLayer(PeftLayerAttributes, nn.Module):
    """A base layer plus the adapters of every plan that targets it."""

    def __init__(
        self, base_layer: nn.Module, info: LayerInfo, module_name: str, context: EngineContext
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.info = info
        self.module_name = module_name
        self._context = context
        # the layer plan of each adapter whose tensors live here (an index into the book's plans, which
        # replace_plan refreshes)
        self._plans: dict[str, LayerPlan] = {}
        self._slots: dict[str, list[tuple[str, str, str]]] = {}  # adapter -> (tensor, attribute, leaf)
        self._shared: dict[str, dict[str, str]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._caches: dict[str, dict[str, torch.Tensor]] = {}
        self.scratch: dict[str, dict[Hashable, torch.Tensor]] = {}
        """Kind-level caches keyed by what they depend on (e.g. DoRA's ‖W‖² by the weight's version)."""
        self._unmerged: torch.Tensor | None = None
        self._float_base = False  # a quantised base replaced by its dequantised nn.Linear (dequantize_base)

    # -- adapters ------------------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(self._plans)

    def plan(self, name: str) -> LayerPlan:
        return self._plans[name]

    def replace_plan(self, name: str, lp: LayerPlan) -> None:
        """Adapter ``name`` now runs ``lp`` (same tensors, which keep their identity); caches are dropped."""
        self._plans[name] = lp
        self._caches[name].clear()
        self.scratch.clear()

    @property
    def options(self) -> EngineOptions:
        """The engine's options (fused paths, half-precision compute, saved shrink)."""
        return self._context.options

    # -- random draws (the engine's generators, never torch's global one) ----------------------------------
    def generator(self, device: torch.device) -> torch.Generator:
        return self._context.generators.on(device)

    def dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """Inverted dropout in training mode: x ⊙ m / (1 − p), m ~ Bernoulli(1 − p); x itself otherwise."""
        if not self.training or p <= 0.0:
            return x
        if p >= 1.0:
            return x * 0.0
        keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=self.generator(x.device))
        return x * keep.div_(1.0 - p)

    def random(
        self, shape: Sequence[int], device: torch.device, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Uniform draws in [0, 1)."""
        return torch.rand(tuple(shape), generator=self.generator(device), device=device, dtype=dtype)

    def permutation(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.randperm(n, generator=self.generator(device), device=device)

    def integers(self, high: int) -> int:
        """A uniform integer in [0, high), drawn on the CPU (no device round trip)."""
        return int(torch.randint(high, (), generator=self.generator(torch.device("cpu"))))

    def add(
        self,
        name: str,
        lp: LayerPlan,
        arrays: Mapping[str, np.ndarray],
        *,
        autocast: bool = True,
        shared: Mapping[str, str] | None = None,
    ) -> None:
        """Create adapter ``name``'s tensors from ``arrays`` (tensor name -> array) on the base layer's device.

        ``lora_A.weight`` lives at ``lora_A[name].weight`` and ``ia3_l`` at ``ia3_l[name]``, as in HF PEFT's
        modules. ``shared`` maps tensor names the kind reads (VeRA's ``vera_A``) to buffers registered with
        :meth:`add_shared`."""
        weight = self.base_weight
        dtype = adapter_dtype(weight, autocast)
        slots = []
        for spec in lp.params:
            tensor = _to_tensor(arrays[spec.name], weight, dtype)
            head, _, leaf = spec.name.partition(".")
            trainable = spec.role == "trainable"
            if leaf:
                attr = self._container(head, nn.ModuleDict)
                holder = getattr(self, attr)[name] if name in getattr(self, attr) else _Holder()
                if trainable:
                    holder.register_parameter(leaf, nn.Parameter(tensor, requires_grad=False))
                else:
                    holder.register_buffer(leaf, tensor)
                getattr(self, attr)[name] = holder
            elif trainable:
                attr = self._container(head, nn.ParameterDict)
                getattr(self, attr)[name] = nn.Parameter(tensor, requires_grad=False)
            else:
                attr = self._container(head, _BufferDict)
                getattr(self, attr).register_buffer(name, tensor)
            slots.append((spec.name, attr, leaf))
        self._plans[name] = lp
        ops_for(lp.kind)  # imported now: an import inside a compiled forward would break its graph
        self._slots[name] = slots
        self._shared[name] = dict(shared or {})
        self._dtypes[name] = dtype
        self._caches[name] = {}

    def sync_dtypes(self) -> None:
        """Take each adapter's compute dtype from its tensors again, after ``Module.to(dtype)`` cast them."""
        for name in self._plans:
            floats = [t.dtype for t in self.tensors(name).values() if t.is_floating_point()]
            if floats:
                self._dtypes[name] = floats[0]
            self._caches[name].clear()
        self.scratch.clear()

    def add_shared(self, attr: str, tensor: torch.Tensor) -> None:
        """Register a frozen tensor several layers read (one per adapter and name, kept on this layer's device)."""
        self.register_buffer(attr, tensor, persistent=False)

    def remove(self, name: str) -> None:
        for _, attr, _leaf in self._slots.pop(name):
            container = getattr(self, attr)
            if isinstance(container, _BufferDict):
                if hasattr(container, name):
                    delattr(container, name)
            elif name in container:
                del container[name]
        for attr in self._shared.pop(name).values():
            if attr in self._buffers:  # not hasattr: that would find a base layer attribute of the same name
                delattr(self, attr)
        for store in (self._plans, self._dtypes, self._caches):
            store.pop(name, None)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors by their plan names (and its shared tensors by theirs)."""
        out = {}
        for tensor_name, attr, leaf in self._slots[name]:
            container = getattr(self, attr)
            if leaf:
                out[tensor_name] = getattr(container[name], leaf)
            elif isinstance(container, _BufferDict):
                out[tensor_name] = getattr(container, name)
            else:
                out[tensor_name] = container[name]
        for tensor_name, attr in self._shared[name].items():
            out[tensor_name] = getattr(self, attr)
        return out

    def trainable(self, name: str) -> dict[str, nn.Parameter]:
        """Adapter ``name``'s own parameters (not those it reads from another layer, such as a tied head's)."""
        linked = self._shared[name]
        return {
            k: v for k, v in self.tensors(name).items() if isinstance(v, nn.Parameter) and k not in linked
        }

    def _container(self, head: str, kind: type[nn.Module]) -> str:
        """The attribute holding tensors called ``head`` in a container of type ``kind``, created on first use.

        Kinds that store ``lora_A`` differently (LoRA's ``lora_A.weight``, AdaLoRA's bare ``lora_A``) may share a
        layer; the second storage gets a suffixed attribute name."""
        for attr in (head, f"{head}_{kind.__name__.lower()}"):
            found = self._modules.get(attr)
            if found is None:
                self.add_module(attr, kind())
                return attr
            if type(found) is kind:
                return attr
        raise PeftdeclError(f"{self.module_name}: cannot store adapter tensor {head!r}")

    # -- the base layer ------------------------------------------------------------------------------------
    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer itself on x (its own module, hooks included)."""
        y: torch.Tensor = self.base_layer(x)
        return y

    @property
    def base_weight(self) -> torch.Tensor:
        """The base layer's weight as it stores it (GPT-2 Conv1D: ``[in, out]``)."""
        return cast(torch.Tensor, self.base_layer.weight)

    @property
    def quantized(self) -> bool:
        """Whether the base layer stores quantised codes (bitsandbytes 4-bit or 8-bit), not its weight."""
        return self.info.quantization is not None and not self._float_base

    def dequantize_base(self, int8_dtype: torch.dtype) -> None:
        """Replace the quantised base layer by an ``nn.Linear`` holding its dequantised weight (4-bit in the dtype
        it was quantised from, int8 in ``int8_dtype``): later merges add in full precision, with no rounding."""
        self._require_codes()
        dtype = int8_dtype if bnb_kind(self.base_layer) == "8bit" else float_dtype(self.base_layer)
        self.base_layer = dequantized_linear(self.base_layer, dtype)
        self._float_base = True
        self.scratch.clear()

    def weight_ir(self) -> torch.Tensor:
        """The base weight in the IR layout ``[out, in]`` (a view: GPT-2 Conv1D stores ``[in, out]``); a quantised
        layer's weight dequantised on the fly (a new tensor each call, never stored: W = code · scale per block or
        row, :mod:`peftdecl_torch.quantized`)."""
        if self.quantized:
            return self._dequantized()
        weight = self.base_weight
        return weight.T if self.info.type == "gpt2_conv1d" else weight

    def _dequantized(self) -> torch.Tensor:
        self._require_codes()
        return dequantized_weight(self.base_layer).detach()

    def _require_codes(self) -> None:
        if bnb_kind(self.base_layer) is None:
            raise PeftdeclError(
                f"{self.module_name}: the base layer is quantised ({self.info.quantization}) but is not a "
                f"bitsandbytes layer holding its codes ({type(self.base_layer).__name__}); its weight cannot be read"
            )

    def check_mergeable(self) -> None:
        """PeftdeclError when a merge into this layer would be refused (checked on every layer before any merge):
        a quantised layer must be one whose codes can be read and written again."""
        if self.quantized:
            self._require_codes()

    @property
    def bias(self) -> torch.Tensor | None:
        return cast("torch.Tensor | None", getattr(self.base_layer, "bias", None))

    def functional(
        self, x: torch.Tensor, weight_ir: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The base layer's operation with another weight (IR layout) and bias."""
        info = self.info
        if info.type == "embedding":
            return self.embed(x, weight_ir)
        if info.type == "conv1d":
            return F.conv1d(x, weight_ir, bias, info.stride, info.padding, info.dilation, info.groups)
        if info.type == "conv2d":
            return F.conv2d(x, weight_ir, bias, info.stride, info.padding, info.dilation, info.groups)
        if info.type == "conv3d":
            return F.conv3d(x, weight_ir, bias, info.stride, info.padding, info.dilation, info.groups)
        return F.linear(x, weight_ir, bias)

    def embed(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Look ``x`` up in ``table`` with the base embedding's settings (padding_idx gets no gradient)."""
        base = cast(nn.Embedding, self.base_layer)
        return F.embedding(
            x, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )

    def write_base(self, weight_ir: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Store a new base weight (IR layout) and bias in place, in the base layer's own dtype and layout; a
        quantised layer's weight is re-quantised with its own scheme (the codes bitsandbytes gives that weight)."""
        with torch.no_grad():
            if self.quantized:
                requantize(self.base_layer, weight_ir)
                self.scratch.clear()  # caches keyed by the old weight's storage must not match the new one
            else:
                self.base_weight.copy_(weight_ir.T if self.info.type == "gpt2_conv1d" else weight_ir)
            target_bias = self.bias
            if bias is not None and target_bias is not None:
                target_bias.copy_(bias)

    # -- merging -------------------------------------------------------------------------------------------
    def merge(self, name: str, before: Sequence[str]) -> None:
        """Fold adapter ``name`` into the base weight as it is; ``before``: the adapters merged before it (they stay
        in)."""
        lp = self._plans[name]
        if not self._merged_here(before) and self._keeps_unmerged():
            self._unmerged = self.weight_ir().detach().clone()
        with torch.no_grad():
            weight, bias = ops_for(lp.kind).merge(lp, self, self.tensors(name), self._caches[name])
        self.write_base(weight, bias)

    def unmerge(self, name: str, remaining: Sequence[str]) -> None:
        """Take adapter ``name`` out of the base weight; ``remaining``: the adapters still merged after it."""
        lp = self._plans[name]
        with torch.no_grad():
            weight, bias = ops_for(lp.kind).unmerge(lp, self, self.tensors(name), self._caches[name])
        self.write_base(weight, bias)
        self._caches[name].clear()
        if not self._merged_here(remaining):
            self._unmerged = None

    def unmerged_weight_ir(self) -> torch.Tensor:
        """The base weight (IR layout) without the adapters merged into it: what DoRA's norm is taken on when it
        merges after others, as in HF PEFT (which takes them out and puts them back)."""
        if self._unmerged is not None:
            return self._unmerged
        if self._merged_here(self._context.book.merged):
            raise PeftdeclError(
                f"{self.module_name}: an adapter added after the merge needs the unmerged weight; "
                "unmerge() and merge again"
            )
        return self.weight_ir()

    def _merged_here(self, merged: Sequence[str]) -> list[str]:
        return [n for n in merged if n in self._plans]

    def _keeps_unmerged(self) -> bool:
        # a copy of the weight only where a later merge can read it (memory: one weight per such layer)
        return len(self._plans) > 1 and any(
            getattr(ops_for(lp.kind), "merge_reads_unmerged", False) for lp in self._plans.values()
        )

    # -- forward -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        book = self._context.book
        if not book.enabled:
            return self.base_forward(x)
        rows = current_rows()
        if rows is not None:
            return self._mixed_forward(x, rows)
        running = [n for n in book.running() if n in self._plans]
        if not running:
            return self.base_forward(x)
        if len(running) == 1:
            name = running[0]
            lp = self._plans[name]
            ops: KindOps[AdaptedLayer] = ops_for(lp.kind)
            if not ops.additive or self._same_dtype(x, name) or self._half_fused(x, name, ops):
                y: torch.Tensor = ops.forward(lp, self, self.tensors(name), x)
                return y
        return self._composed_forward(x, running)

    def _same_dtype(self, x: torch.Tensor, name: str) -> bool:
        dtype = self._dtypes[name]
        return self.base_weight.dtype == dtype and (x.dtype == dtype or not x.is_floating_point())

    def _half_fused(self, x: torch.Tensor, name: str, ops: KindOps[AdaptedLayer]) -> bool:
        """Whether a kind's fused Function runs float32 adapters in this half-precision base's dtype."""
        if not getattr(ops, "half_compute", False):
            return False
        lp = self._plans[name]
        dropout = lp.options.get("dropout", 0.0)
        return fused.fusable(lp, self, x, self._dtypes[name], dropout, half_compute=True)

    @cuda_kernels.replaces("composed_forward")
    def _composed_forward(self, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        running = [
            compose.Running(n, self._plans[n], ops_for(self._plans[n].kind), self._dtypes[n], self.tensors(n))
            for n in names
        ]
        return compose.forward(self, x, running)

    @cuda_kernels.replaces("mixed_forward")
    def _mixed_forward(self, x: torch.Tensor, row_adapters: RowAdapters) -> torch.Tensor:
        rows = row_adapters.for_batch(x.shape[0], self.module_name)
        result = self.base_forward(x)
        for name in dict.fromkeys(rows):
            if name == BASE or name not in self._plans:
                continue
            index = torch.tensor([i for i, n in enumerate(rows) if n == name], device=x.device)
            part = self._additive_rows(x.index_select(0, index), result.index_select(0, index), name)
            result = result.index_copy(0, index, part)
        return result

    def _additive_rows(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        lp = self._plans[name]
        dtype = self._dtypes[name]
        xa = x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x
        return compose.accumulate(ops_for(lp.kind), lp, self, self.tensors(name), xa, result.to(dtype)).to(
            result.dtype
        )

    def extra_repr(self) -> str:
        kinds = ", ".join(f"{n}={lp.kind}(r={lp.r})" for n, lp in self._plans.items())
        return f"adapters=[{kinds}]"
