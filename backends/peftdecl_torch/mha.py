"""The torch backend's wrapper for ``nn.MultiheadAttention``: LoRA on its in_proj and out_proj, as HF PEFT has it.

torch's attention reads ``in_proj_weight`` and ``out_proj.weight`` directly (out_proj's ``forward`` never runs),
so the adapters cannot hook a sub-layer. HF PEFT merges the update into both weights around each call; this
wrapper instead calls the base module through ``torch.func.functional_call`` with W' = W + ΔW in place of the
two weights: the base module's own forward runs (``batch_first``, masks, ``bias_k``/``bias_v``,
``add_zero_attn``, ``need_weights`` ...), gradients reach the adapters through W', and the stored weights are never
touched. The IR weight of the layer is in_proj [3E, E] stacked over out_proj [E, E] (``LayerInfo`` type ``mha``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from peftdecl.errors import BackendError
from peftdecl.plan import LayerInfo, LayerPlan
from peftdecl.plan.kinds.lora_mha import OUT_PROJ_PREFIX
from peftdecl_torch.kinds import ops_for
from peftdecl_torch.layer import AdaptedLayer
from peftdecl_torch.mixed_batch import ADAPTER_NAMES

_STORED_PREFIX = "out_proj_"
"""out_proj's tensors are held as ``out_proj_lora_A[adapter].weight`` (a module attribute holds no dots)."""


def _stored(name: str) -> str:
    return _STORED_PREFIX + name.removeprefix(OUT_PROJ_PREFIX) if name.startswith(OUT_PROJ_PREFIX) else name


def _planned(name: str) -> str:
    return OUT_PROJ_PREFIX + name.removeprefix(_STORED_PREFIX) if name.startswith(_STORED_PREFIX) else name


def mha_layer_info(module: nn.MultiheadAttention) -> LayerInfo:
    """The LayerInfo of an attention with one fused in_proj: in = E, out = 3E (HF PEFT's count), its heads."""
    weight = module.in_proj_weight
    return LayerInfo(
        "mha",
        module.embed_dim,
        3 * module.embed_dim,
        module.in_proj_bias is not None,
        dtype=str(weight.dtype).removeprefix("torch."),
        num_heads=module.num_heads,
        batch_first=module.batch_first,
    )


def is_adaptable_mha(module: nn.Module) -> bool:
    """An ``nn.MultiheadAttention`` whose query, key and value share embed_dim (one fused in_proj): the only kind
    HF PEFT adapts."""
    return isinstance(module, nn.MultiheadAttention) and bool(module._qkv_same_embed_dim)


class AdaptedMultiheadAttention(AdaptedLayer):
    """An ``nn.MultiheadAttention`` with LoRA adapters: called like the base module, returns what it returns."""

    @property
    def attention(self) -> nn.MultiheadAttention:
        return cast(nn.MultiheadAttention, self.base_layer)

    @property
    def _qkv_same_embed_dim(self) -> bool:  # read by torch's TransformerEncoderLayer (a private name)
        return bool(self.attention._qkv_same_embed_dim)

    # -- tensors: out_proj's keys hold dots, so they are stored under other attribute names ------------------
    def add(
        self,
        name: str,
        lp: LayerPlan,
        arrays: Mapping[str, np.ndarray],
        *,
        autocast: bool = True,
        shared: Mapping[str, str] | None = None,
    ) -> None:
        stored = replace(lp, params=tuple(replace(p, name=_stored(p.name)) for p in lp.params))
        own = {_stored(k): v for k, v in arrays.items()}
        super().add(name, stored, own, autocast=autocast, shared=shared)
        self._plans[name] = lp
        self._slots[name] = [(_planned(t), attr, leaf) for t, attr, leaf in self._slots[name]]

    # -- the base weights: in_proj stacked over out_proj ---------------------------------------------------
    @property
    def base_weight(self) -> torch.Tensor:
        return self.attention.in_proj_weight

    def weight_ir(self) -> torch.Tensor:
        """[in_proj_weight ; out_proj.weight], [4E, E] (a new tensor, not a view)."""
        return torch.cat([self.attention.in_proj_weight, self.attention.out_proj.weight])

    def write_base(self, weight_ir: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Store the stacked weight back into in_proj_weight and out_proj.weight, in place (biases unchanged)."""
        split = self.info.out_features
        with torch.no_grad():
            self.attention.in_proj_weight.copy_(weight_ir[:split])
            self.attention.out_proj.weight.copy_(weight_ir[split:])

    @property
    def bias(self) -> torch.Tensor | None:
        return None  # LoRA leaves both biases as they are; merges return None for them

    def attend(self, weight_ir: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The base module's own forward with W' (stacked) in place of its two weights."""
        split = self.info.out_features
        weights = {"in_proj_weight": weight_ir[:split], "out_proj.weight": weight_ir[split:]}
        return functional_call(self.attention, weights, args, kwargs)

    def functional(
        self, x: torch.Tensor, weight_ir: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Self-attention of x on W' (the output alone)."""
        out: torch.Tensor = self.attend(weight_ir, x, x, x, need_weights=False)[0]
        return out

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.attention(x, x, x, need_weights=False)[0]
        return out

    # -- forward -------------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """As ``nn.MultiheadAttention.forward``, with every running adapter's ΔW added to the weights."""
        if ADAPTER_NAMES.get() is not None:
            raise BackendError(
                f"{self.module_name}: an nn.MultiheadAttention layer does not run mixed adapter batches "
                "(adapter_names), as in HF PEFT"
            )
        book = self._context.book
        running = [n for n in book.running() if n in self._plans] if book.enabled else []
        if not running:
            return self.base_layer(*args, **kwargs)
        weight = self.weight_ir()
        for name in running:
            lp = self._plans[name]
            ops = cast(Any, ops_for(lp.kind))  # ComposingOps (INPUT): W ↦ W + ΔW
            weight = ops.compose_weight(lp, self, self.tensors(name), weight)
        return self.attend(weight, *args, **kwargs)


def wrapper_class(info: LayerInfo) -> type[AdaptedLayer]:
    """The wrapper the torch engine puts in place of a layer of this type."""
    return AdaptedMultiheadAttention if info.type == "mha" else AdaptedLayer
