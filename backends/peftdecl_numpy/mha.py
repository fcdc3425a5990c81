"""torch's ``nn.MultiheadAttention`` in the NumPy reference: forward and explicit gradients, float64 by default.

A state dict holds it as ``m.in_proj_weight`` [3E, E], ``m.in_proj_bias`` [3E], ``m.out_proj.weight`` [E, E] and
``m.out_proj.bias`` [E]; ``layer_types={"m": {"type": "mha", "num_heads": H, "batch_first": False}}`` declares
it. The layer's IR weight is in_proj stacked over out_proj, [4E, E] (biases likewise, [4E]). Called with one
input x it is self-attention, as torch's module with query = key = value = x and no masks:

    Q, K, V = x W_qᵀ + b_q, x W_kᵀ + b_k, x W_vᵀ + b_v      (split into H heads of size d = E / H)
    P = softmax(Q Kᵀ / √d),  O = P V,  y = O W_oᵀ + b_o

x is [L, N, E] (``batch_first``: [N, L, E]) or an unbatched [L, E]. Masks, ``bias_k``/``bias_v``,
``add_zero_attn`` and attention dropout are torch-side features the reference does not model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from peftdecl.errors import PeftdeclError
from peftdecl.plan import LayerInfo
from peftdecl_numpy.layers import BaseLayer, Mode, rows
from peftdecl_numpy.xp_ops import Array

MHA_KEYS = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
UNMODELLED = ("bias_k", "bias_v", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def is_mha_declaration(declared: object) -> bool:
    """Whether a ``layer_types`` entry declares an attention layer (``"mha"`` or ``{"type": "mha", ...}``)."""
    if isinstance(declared, LayerInfo):
        return declared.type == "mha"
    if isinstance(declared, Mapping):
        return declared.get("type") == "mha"
    return declared == "mha"


def mha_layer_info(state_dict: Mapping[str, npt.ArrayLike], module: str, declared: object) -> LayerInfo:
    """The LayerInfo of a declared attention layer, from its in_proj weight (in = E, out = 3E, as HF PEFT)."""
    if isinstance(declared, LayerInfo):
        return declared
    settings: dict[str, Any] = dict(declared) if isinstance(declared, Mapping) else {"type": "mha"}
    settings.pop("type")
    heads, batch_first = settings.pop("num_heads", None), bool(settings.pop("batch_first", False))
    if settings:
        raise PeftdeclError(f"layer_types[{module!r}]: unknown settings {sorted(settings)} for an mha layer")
    key = f"{module}.in_proj_weight"
    if key not in state_dict:
        raise PeftdeclError(f"layer_types[{module!r}] is mha but the state dict has no {key}")
    unmodelled = [k for k in UNMODELLED if f"{module}.{k}" in state_dict]
    if unmodelled:
        raise PeftdeclError(f"{module}: {', '.join(unmodelled)} of an attention layer are not modelled here")
    shape = np.shape(state_dict[key])
    if len(shape) != 2 or shape[0] != 3 * shape[1]:
        raise PeftdeclError(f"{key}: expected shape [3E, E], got {list(shape)}")
    embed = int(shape[1])
    if not isinstance(heads, int) or heads < 1 or embed % heads:
        raise PeftdeclError(
            f"layer_types[{module!r}].num_heads: expected a whole number of heads dividing embed_dim {embed}, "
            f"got {heads!r}"
        )
    dtype = np.asarray(state_dict[key]).dtype.name
    has_bias = f"{module}.in_proj_bias" in state_dict
    return LayerInfo("mha", embed, 3 * embed, has_bias, dtype=dtype, num_heads=heads, batch_first=batch_first)


def mha_base_layer(
    state_dict: Mapping[str, npt.ArrayLike],
    module: str,
    info: LayerInfo,
    asarray: Callable[[Any], Array],
    mode: Mode,
) -> MhaLayer:
    """The frozen attention layer of ``module``: stacked weight [4E, E] and bias [4E] (or None)."""
    weight = np.concatenate(
        [
            np.asarray(state_dict[f"{module}.in_proj_weight"]),
            np.asarray(state_dict[f"{module}.out_proj.weight"]),
        ]
    )
    bias = None
    if info.bias:
        bias = np.concatenate(
            [
                np.asarray(state_dict[f"{module}.in_proj_bias"]),
                np.asarray(state_dict[f"{module}.out_proj.bias"]),
            ]
        )
    return MhaLayer(info, asarray(weight), None if bias is None else asarray(bias), mode)


def mha_state(
    module: str, weight: np.ndarray, bias: np.ndarray | None, info: LayerInfo
) -> dict[str, np.ndarray]:
    """The stacked weight (and bias) as torch's state-dict keys."""
    split = info.out_features
    out = {f"{module}.in_proj_weight": weight[:split], f"{module}.out_proj.weight": weight[split:]}
    if bias is not None:
        out.update({f"{module}.in_proj_bias": bias[:split], f"{module}.out_proj.bias": bias[split:]})
    return out


@dataclass
class _Cache:
    xb: Array  # [N, L, E]
    q: Array  # [N, H, L, d], and k, v
    k: Array
    v: Array
    p: Array  # [N, H, L, L]
    o: Array  # [N, L, E]


@dataclass
class MhaLayer(BaseLayer):
    """A frozen self-attention layer whose ``weight`` is [W_q; W_k; W_v; W_o] (IR layout) and ``bias`` likewise."""

    def forward(self, x: Array, weight: Array | None = None, with_bias: bool = True) -> Array:
        y, _ = self._attend(x, self.weight if weight is None else weight, with_bias)
        return y

    def input_grad(self, x: Array, dy: Array, weight: Array | None = None) -> Array | None:
        return self.grads(x, dy, self.weight if weight is None else weight)[0]

    def weight_grad(self, x: Array, dy: Array, weight: Array | None = None) -> Array:
        return self.grads(x, dy, self.weight if weight is None else weight)[1]

    def bias_shape_sum(self, dy: Array) -> Array:
        raise PeftdeclError(f"an mha layer has no single output bias ({self.info.type})")

    # -- the math ------------------------------------------------------------------------------------------
    def _batched(self, x: Array) -> tuple[Array, bool]:
        """x as [N, L, E], and whether it was unbatched."""
        xp = self.xp
        if x.ndim == 2:
            return xp.reshape(x, (1, *x.shape)), True
        if x.ndim != 3 or x.shape[-1] != self.info.in_features:
            raise PeftdeclError(
                f"an mha layer takes [L, N, E] inputs (E = {self.info.in_features}), got {x.shape}"
            )
        return (x if self.info.batch_first else xp.permute_dims(x, (1, 0, 2))), False

    def _unbatched(self, yb: Array, unbatched: bool) -> Array:
        xp = self.xp
        if unbatched:
            return xp.reshape(yb, yb.shape[1:])
        return yb if self.info.batch_first else xp.permute_dims(yb, (1, 0, 2))

    def _heads(self, t: Array) -> Array:
        n, seq, embed = t.shape
        heads = self.info.num_heads
        return self.xp.permute_dims(self.xp.reshape(t, (n, seq, heads, embed // heads)), (0, 2, 1, 3))

    def _merge_heads(self, t: Array) -> Array:
        n, heads, seq, d = t.shape
        return self.xp.reshape(self.xp.permute_dims(t, (0, 2, 1, 3)), (n, seq, heads * d))

    def _projections(self, w: Array) -> list[Array]:
        embed = self.info.in_features
        return [w[i * embed : (i + 1) * embed] for i in range(4)]

    def _biases(self) -> list[Array | None]:
        embed, b = self.info.in_features, self.bias
        return [None if b is None else b[i * embed : (i + 1) * embed] for i in range(4)]

    def _attend(self, x: Array, w: Array, with_bias: bool = True) -> tuple[Array, _Cache]:
        xp = self.xp
        xb, unbatched = self._batched(x)
        wq, wk, wv, wo = self._projections(w)
        bq, bk, bv, bo = self._biases() if with_bias else [None] * 4
        q, k, v = (
            self._heads(xb @ wt.T if bt is None else xb @ wt.T + bt)
            for wt, bt in ((wq, bq), (wk, bk), (wv, bv))
        )
        scores = q @ xp.permute_dims(k, (0, 1, 3, 2)) / math.sqrt(q.shape[-1])
        scores = xp.exp(scores - xp.max(scores, axis=-1, keepdims=True))
        p = scores / xp.sum(scores, axis=-1, keepdims=True)
        o = self._merge_heads(p @ v)
        yb = o @ wo.T if bo is None else o @ wo.T + bo
        return self._unbatched(yb, unbatched), _Cache(xb, q, k, v, p, o)

    def grads(self, x: Array, dy: Array, w: Array) -> tuple[Array, Array]:
        """(dL/dx, dL/dW) for the stacked weight W from dL/dy."""
        xp = self.xp
        _, c = self._attend(x, w)
        dyb, unbatched = self._batched(dy)
        wq, wk, wv, wo = self._projections(w)
        d_wo = rows(dyb).T @ rows(c.o)
        d_o = self._heads(dyb @ wo)
        d_p = d_o @ xp.permute_dims(c.v, (0, 1, 3, 2))
        d_v = xp.permute_dims(c.p, (0, 1, 3, 2)) @ d_o
        d_s = c.p * (d_p - xp.sum(d_p * c.p, axis=-1, keepdims=True)) / math.sqrt(c.q.shape[-1])
        d_q = self._merge_heads(d_s @ c.k)
        d_k = self._merge_heads(xp.permute_dims(d_s, (0, 1, 3, 2)) @ c.q)
        d_v = self._merge_heads(d_v)
        dxb = d_q @ wq + d_k @ wk + d_v @ wv
        d_w = xp.concat([rows(g).T @ rows(c.xb) for g in (d_q, d_k, d_v)] + [d_wo], axis=0)
        return self._unbatched(dxb, unbatched), d_w
