"""VeLoRA (Miles et al., 2024) in the NumPy reference: LoRA's forward; in training, A's gradient is taken from
compressed inputs.

The input h of A (after dropout) is cut into G groups of g = ⌈in / G⌉ features (zero-padded), each group h_k kept
as one number c_k = h_k · v; the backward rebuilds h_k ≈ scale · c_k v and uses it for dL/dA only (dL/dx and
dL/dB are LoRA's exact ones). v is the projection ``lora_velora_embed``: fixed ('random'), or in training the
normalised mean of the batch's sub-tokens h_k, set from every batch ('batch_average') or the first one of this
adapter's life in memory ('batch_average_once'; as in HF PEFT, loading an adapter starts that over).
"""

from __future__ import annotations

import weakref

from peftdecl.plan import LayerPlan
from peftdecl.plan.kinds.velora import EMBED
from peftdecl_numpy.kinds.base import Params, Tape
from peftdecl_numpy.kinds.lora import LoraOps
from peftdecl_numpy.layers import BaseLayer, rows
from peftdecl_numpy.xp_ops import Array, namespace


def sub_tokens(h: Array, num_groups: int) -> Array:
    """h [..., in] as [T, G, g]: each token's features in G groups of g, the last group zero-padded."""
    xp = namespace(h)
    flat = rows(h)
    g = -(-flat.shape[1] // num_groups)
    padded = xp.zeros((flat.shape[0], num_groups * g), dtype=flat.dtype)
    padded[:, : flat.shape[1]] = flat
    return xp.reshape(padded, (flat.shape[0], num_groups, g))


def unit(v: Array) -> Array:
    """v / ‖v‖, or the normalised all-ones vector for v = 0 (HF PEFT's fallback)."""
    xp = namespace(v)
    norm = float(xp.linalg.norm(v))
    if norm == 0.0:
        v = xp.ones_like(v)
        norm = float(xp.linalg.norm(v))
    return v / norm


def compress(h: Array, v: Array, num_groups: int) -> Array:
    """c [T, G]: each group of each token projected on v."""
    return sub_tokens(h, num_groups) @ v


def reconstruct(c: Array, v: Array, in_features: int, scale: float) -> Array:
    """scale · c_k v per group, concatenated and cut to ``in_features``: [T, in]."""
    xp = namespace(c)
    grouped = c[:, :, None] * xp.reshape(v, (1, 1, -1))
    return scale * xp.reshape(grouped, (c.shape[0], -1))[:, :in_features]


class ProjectionSeen:
    """Which projection arrays have been set from a batch ('batch_average_once'), held weakly by identity."""

    def __init__(self) -> None:
        self._seen: weakref.WeakValueDictionary[int, object] = weakref.WeakValueDictionary()

    def __contains__(self, array: object) -> bool:
        return self._seen.get(id(array)) is array

    def add(self, array: object) -> None:
        self._seen[id(array)] = array


class VeloraOps(LoraOps):
    kind = "velora"

    def __init__(self) -> None:
        self.seen = ProjectionSeen()

    def delta_record(self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> tuple[Array, Tape]:
        delta, tape = super().delta_record(lp, layer, p, x)
        if layer.training:
            h, embed = tape["h"], p[EMBED]
            self.update_projection(lp, h, embed)
            tape = {**tape, "compressed": compress(h, embed, lp.options["num_groups"])}
        return delta, tape

    def update_projection(self, lp: LayerPlan, h: Array, embed: Array) -> None:
        """Set v (in place) from the batch's mean sub-token where the init type asks for it."""
        init = lp.options["init_type"]
        if init == "random" or (init == "batch_average_once" and embed in self.seen):
            return
        mean = namespace(h).mean(rows(sub_tokens(h, lp.options["num_groups"])), axis=0)
        embed[...] = unit(mean)
        self.seen.add(embed)

    def delta_backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, d_delta: Array
    ) -> tuple[Array | None, Params]:
        dx, grads = super().delta_backward(lp, layer, p, tape, d_delta)
        if "compressed" not in tape:
            return dx, grads
        du = lp.scaling * rows(d_delta) @ p["lora_B.weight"]
        rebuilt = reconstruct(tape["compressed"], p[EMBED], lp.layer.in_features, lp.options["velora_scale"])
        return dx, {**grads, "lora_A.weight": du.T @ rebuilt}


OPS = VeloraOps()
