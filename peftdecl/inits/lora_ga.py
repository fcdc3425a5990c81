"""LoRA-GA (HF PEFT's ``init_lora_weights="lora_ga"``): A and B from the SVD of each layer's averaged gradient.

With G ≈ U S Vᵀ the top 2r singular triplets of the gradient of W (out × in; the randomised SVD of Halko et al.
with q = min(4r, min(out, in)) columns and 4 subspace iterations, as ``torch.svd_lowrank``), ``direction`` picks r
rows of Vᵀ for A and r columns of U·S for B (ArB2r: A = V[:, :r]ᵀ, B = U[:, r:2r]·S[r:2r]); ``scale`` then
multiplies B by out^(1/4)/√gamma ("stable"), by σ₁(W)/S_B[0] ("weight_svd"), divides A and B by s ("gd_scale"),
or leaves them ("unit"). The base weight becomes W − s·BA, so the model's function does not change.
:func:`preprocess_loraga` estimates the gradients (the backend's ``gradients`` module runs the user's training
step) and keeps them for the base model until an adapter is attached to it.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping

import numpy as np

from peftdecl.backend import backend_for
from peftdecl.errors import PeftdeclError, TargetError
from peftdecl.init import generator_for
from peftdecl.inits import forget, recalled, remember
from peftdecl.lora_init import _redraw_base_dependent, randomized_svd
from peftdecl.plan import compile_plan
from peftdecl.plan.ir import CONV_LAYER_TYPES, LayerPlan, Plan
from peftdecl.spec import load_spec
from peftdecl.spec.data_inits import LoraGAConfig

GA_LAYER_TYPES = ("linear", "gpt2_conv1d")
"""The layers LoRA-GA initialises; PEFT leaves embeddings and convolutions at LoRA's default init."""
_DEFAULT_INIT_TYPES = ("embedding", *CONV_LAYER_TYPES)
_NITER = 4  # torch.svd_lowrank's subspace iterations in PEFT's lora_ga_init


def lora_ga_factors(
    gradient: np.ndarray,
    weight: np.ndarray,
    r: int,
    scaling: float,
    config: LoraGAConfig,
    rng: np.random.Generator,
    gradient_test_matrix: np.ndarray | None = None,
    weight_test_matrix: np.ndarray | None = None,
    permutation: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A (r × in) and B (out × r) from the gradient (out × in). The Gaussian test matrices of the randomised SVDs
    and the permutation of ``direction="random"`` are drawn from ``rng`` unless given (PEFT draws them from
    torch's global generator: pass those to reproduce its numbers)."""
    grad = np.asarray(gradient, dtype=np.float64)
    q = min(4 * r, *grad.shape)
    if gradient_test_matrix is None:
        gradient_test_matrix = rng.standard_normal((min(grad.shape), q))
    u, s, v = randomized_svd(grad, q, _NITER, gradient_test_matrix)
    u, s, vh = u[:, : 2 * r], s[: 2 * r], v[:, : 2 * r].T
    if config.direction == "ArBr":
        a_rows, b_cols = np.arange(1, 2 * r, 2), np.arange(0, 2 * r, 2)
    elif config.direction == "A2rBr":
        a_rows, b_cols = np.arange(r, 2 * r), np.arange(r)
    elif config.direction == "ArB2r":
        a_rows, b_cols = np.arange(r), np.arange(r, 2 * r)
    else:
        chosen = (rng.permutation(2 * r) if permutation is None else np.asarray(permutation))[:r]
        a_rows = b_cols = chosen
    a, s_b = vh[a_rows], s[b_cols]
    b = u[:, b_cols] * s_b[None, :]
    if config.scale == "stable":
        b = b * (grad.shape[0] ** 0.25 / config.stable_gamma**0.5)
    elif config.scale == "weight_svd":
        if weight_test_matrix is None:
            weight_test_matrix = rng.standard_normal((min(weight.shape), r))
        top = randomized_svd(np.asarray(weight, dtype=np.float64), r, _NITER, weight_test_matrix)[1][0]
        if s_b[0] > 0:
            b = b * (top / s_b[0])
    elif config.scale == "gd_scale":
        a, b = a / scaling, b / scaling
    return a, b


def check_lora_ga_layer(layer: LayerPlan) -> None:
    """Refuse a layer LoRA-GA cannot initialise where HF PEFT fails too (a layer without a weight, e.g.
    attention), a quantised base, and a rank above half the smaller dimension (2r singular pairs are needed)."""
    info = layer.layer
    if info.type in _DEFAULT_INIT_TYPES:
        return
    if info.type not in GA_LAYER_TYPES:
        raise TargetError(
            f"{layer.module}: init_lora_weights='lora_ga' works on linear layers (embeddings and convolutions get "
            f"LoRA's default init), not on this {info.type} layer"
        )
    if info.quantization is not None:
        raise TargetError(
            f"{layer.module}: init_lora_weights='lora_ga' needs full-precision gradients; this base is quantised "
            f"({info.quantization})"
        )
    if 2 * layer.r > min(info.in_features, info.out_features):
        raise TargetError(
            f"{layer.module}: init_lora_weights='lora_ga' takes 2r = {2 * layer.r} singular pairs of the "
            f"{info.out_features} × {info.in_features} gradient; lower r"
        )


def lora_ga_initialised(
    plan: Plan,
    values: Mapping[str, np.ndarray],
    base_weight: Callable[[str], np.ndarray],
    seed: int = 0,
    model: object = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``values`` with A and B from the gradients :func:`preprocess_loraga` kept for ``model``, and the residual
    base weights W − s·BA; a layer without a gradient keeps its LoRA default (A Kaiming-uniform, B = 0) and its
    W, as in PEFT (e.g. when an adapter is loaded from a file)."""
    for layer in plan.layers:
        check_lora_ga_layer(layer)
    gradients = recalled(model, "lora_ga") if model is not None else {}
    out, bases = dict(values), {}
    used = [lp for lp in plan.layers if lp.module in gradients and lp.layer.type in GA_LAYER_TYPES]
    config: LoraGAConfig | None = getattr(plan.spec, "lora_ga_config", None)
    if used and config is None:
        raise PeftdeclError("$.lora_ga_config: init_lora_weights='lora_ga' needs a lora_ga_config")
    for layer in used:
        weight = np.asarray(base_weight(layer.module), dtype=np.float64)
        gradient = np.asarray(gradients[layer.module], dtype=np.float64)
        if gradient.shape != weight.shape:
            raise TargetError(f"{layer.module}: gradient of shape {gradient.shape}, weight {weight.shape}")
        rng = generator_for(seed, layer.key("lora_ga"))
        a, b = lora_ga_factors(gradient, weight, layer.r, layer.scaling, config or LoraGAConfig(), rng)
        out[layer.key("lora_A.weight")], out[layer.key("lora_B.weight")] = a, b
        bases[f"{layer.module}.weight"] = weight - layer.scaling * (b @ a)
        _redraw_base_dependent(layer, bases[f"{layer.module}.weight"], out)
    if used:
        forget(model, "lora_ga", [lp.module for lp in used])  # PEFT deletes a layer's gradient once used
    return out, bases


def preprocess_loraga(
    model: object,
    spec: object,
    train_step: Callable[[], None],
    cache_file: str | None = None,
) -> dict[str, np.ndarray]:
    """Estimate the gradient of each targeted linear weight of the base ``model`` over ``train_step()`` (which
    runs forward and backward passes; gradients are summed over its calls and divided by the number of backward
    passes through each layer) and keep them for the adapter later attached to ``model``. ``cache_file``: read
    the gradients from it when it exists, else write them there (PEFT's keys, ``<module>._peft_loraga_grad``).
    Returns module -> gradient (out × in)."""
    spec = load_spec(spec)
    if getattr(spec, "lora_ga_config", None) is None:
        raise PeftdeclError(
            "$.lora_ga_config: LoRA-GA needs init_lora_weights='lora_ga' and a lora_ga_config ({} for the defaults)"
        )
    if hasattr(model, "add_adapter") and hasattr(model, "engine"):
        raise PeftdeclError(
            "preprocess_loraga runs on the base model before the adapter is attached (as PEFT's before "
            "get_peft_model); pass the base model, then peftdecl.attach(model, spec)"
        )
    backend = backend_for(model)
    plan = compile_plan(spec, backend.inventory(model))
    targets = {lp.module: lp.layer.type for lp in plan.layers if lp.layer.type in GA_LAYER_TYPES}
    for layer in plan.layers:
        check_lora_ga_layer(layer)
    if not targets:
        raise TargetError(
            "LoRA-GA found no linear layer among the targets; it initialises linear layers only"
        )
    module = f"{getattr(backend, 'package', None)}.gradients"
    if getattr(backend, "package", None) is None or importlib.util.find_spec(module) is None:
        raise PeftdeclError(
            f"LoRA-GA estimates gradients with autograd, which the {backend.name} backend lacks"
        )
    gradients: dict[str, np.ndarray] = importlib.import_module(module).estimate_gradients(
        model, targets, train_step, cache_file
    )
    remember(model, "lora_ga", gradients)
    return gradients
