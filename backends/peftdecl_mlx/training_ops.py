"""The numerical pieces of MLX training that mlx and mlx-lm do not give as peftdecl needs them: AdamW with
``torch.optim.AdamW``'s arithmetic, AdaLoRA's orthogonality term, and activation checkpointing per transformer
block that keeps the engine's dropout generator consistent between the forward pass and its recomputation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from peftdecl.errors import PeftdeclError
from peftdecl.plan import Plan
from peftdecl.spec.adalora import AdaLoraSpec
from peftdecl_mlx.generator import KEY


class TorchAdamW(optim.Optimizer):
    """AdamW computed as ``torch.optim.AdamW`` computes it: p ← p·(1 − η λ); m ← m + (1 − β₁)(g − m);
    v ← β₂ v + (1 − β₂) g²; p ← p − η/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε).

    mlx's own AdamW raises β to the step in float32 (``1 − 0.999ᵗ`` then errs by ~5e-5 relative), so the bias
    corrections and the decay factor are computed here on the host in float64, as torch does, by :meth:`prepare`
    before each update; they live in the optimizer's state so that a compiled update reads them as inputs."""

    def __init__(self, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
        super().__init__()
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.prepare(0.0, 1)

    def prepare(self, learning_rate: float, update: int) -> None:
        """Set the learning rate and the corrections of update number ``update`` (1 for the first)."""
        beta1, beta2 = self.betas
        self.learning_rate = learning_rate
        self.state["step_size"] = mx.array(learning_rate / (1.0 - beta1**update), dtype=mx.float32)
        self.state["bias2_sqrt"] = mx.array(math.sqrt(1.0 - beta2**update), dtype=mx.float32)
        self.state["decay"] = mx.array(1.0 - learning_rate * self.weight_decay, dtype=mx.float32)

    def init_single(self, parameter: mx.array, state: dict[str, mx.array]) -> None:
        state["m"] = mx.zeros_like(parameter)
        state["v"] = mx.zeros_like(parameter)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict[str, mx.array]) -> mx.array:
        beta1, beta2 = self.betas
        dtype = gradient.dtype
        if self.weight_decay:
            parameter = parameter * self.state["decay"].astype(dtype)
        m = state["m"] + (1.0 - beta1) * (gradient - state["m"])
        v = beta2 * state["v"] + (1.0 - beta2) * mx.square(gradient)
        state["m"], state["v"] = m, v
        denominator = mx.sqrt(v) / self.state["bias2_sqrt"].astype(dtype) + self.eps
        return cast(mx.array, parameter - self.state["step_size"].astype(dtype) * (m / denominator))


def orthogonal_regularizer(plan: Plan, params: Mapping[str, mx.array]) -> mx.array:
    """HF PEFT's AdaLoRA loss term w · mean(‖Q Qᵀ − I‖_F, ‖Pᵀ P − I‖_F over every adapted layer), w the spec's
    orth_reg_weight; triplets outside a layer's rank mask are left out, as in the pruned modules PEFT loads (the
    torch backend's term does the same). ``params``: the live arrays by full key."""
    weight = float(cast(AdaLoraSpec, plan.spec).orth_reg_weight)
    terms = []
    for lp in plan.layers:
        mask = lp.options.get("rank_mask")
        kept = None if mask is None else mx.array(np.flatnonzero(np.asarray(mask)))
        for name, rows in (("lora_A", True), ("lora_B", False)):
            value = params[lp.key(name)]
            if kept is not None:
                value = mx.take(value, kept, axis=0 if rows else 1)
            gram = value @ value.T if rows else value.T @ value
            terms.append(mx.linalg.norm(gram - mx.eye(gram.shape[0], dtype=gram.dtype)))
    return weight * mx.mean(mx.stack(terms)) if terms else mx.array(0.0)


def host_random_layers(plans: Sequence[Plan]) -> list[str]:
    """Adapted modules whose kind draws random numbers on the host while training (LoHa/LoKr/OFT module dropout,
    BOFT's block dropout): their draws read array values, which a compiled step cannot do."""
    found = []
    for plan in plans:
        for lp in plan.layers:
            if lp.options.get("module_dropout", 0.0) > 0.0 or (
                lp.kind == "boft" and lp.options.get("dropout", 0.0) > 0.0
            ):
                found.append(lp.module)
    return found


_Call = Callable[..., Any]


def _recomputable(values: Sequence[object]) -> bool:
    """A block call is recomputed only when its inputs are arrays, strings or None; a KV cache (prefix tuning,
    generation) is stateful and would be appended to twice."""
    return all(v is None or isinstance(v, (mx.array, str)) for v in values)


def _checkpointed_class(block_class: type[nn.Module], root: nn.Module) -> type[nn.Module]:
    """A subclass of ``block_class`` whose call stores only its inputs and recomputes the rest in the backward
    pass. The engine's generator key goes in as an input and the key the call leaves behind is put back, so the
    recomputation draws the same dropout masks and the key advances once, as without checkpointing."""
    original: _Call = block_class.__call__
    advanced: list[mx.array] = []

    def call(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not _recomputable((*args, *kwargs.values())) or KEY not in root:
            return original(self, *args, **kwargs)

        key = root[KEY]  # no gradient flows into a key: held here, not passed as a differentiated input

        def run(params: dict[str, Any], *inner: Any, **inner_kwargs: Any) -> Any:
            outside = root[KEY]
            self.update(params)
            root[KEY] = key
            out = original(self, *inner, **inner_kwargs)
            advanced[:] = [root[KEY]]
            root[KEY] = outside  # a recomputation must not move the key again
            return out

        out = mx.checkpoint(run)(self.trainable_parameters(), *args, **kwargs)
        root[KEY] = advanced[0]
        return out

    return type(f"Checkpointed{block_class.__name__}", (block_class,), {"__call__": call})


def install_checkpointing(root: nn.Module) -> Callable[[], None]:
    """Checkpoint every block of ``root.layers`` (mlx-lm models' transformer blocks); return the undo.

    Only those block objects change (their class becomes a subclass with a checkpointed call), not the class
    shared with other models."""
    blocks = getattr(root, "layers", None)
    if not isinstance(blocks, (list, tuple)) or not blocks:
        raise PeftdeclError(
            f"gradient_checkpointing: {type(root).__name__} has no .layers list of transformer blocks to checkpoint"
        )
    originals: list[tuple[nn.Module, type[nn.Module]]] = []
    made: dict[type[nn.Module], type[nn.Module]] = {}
    for block in blocks:
        cls = type(block)
        if cls not in made:
            made[cls] = _checkpointed_class(cls, root)
        originals.append((block, cls))
        block.__class__ = made[cls]

    def undo() -> None:
        for block, cls in originals:
            block.__class__ = cls

    return undo
