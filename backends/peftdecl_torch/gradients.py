"""Averaged weight gradients for LoRA-GA (:func:`peftdecl.inits.lora_ga.preprocess_loraga`), as HF PEFT
estimates them: the model in training mode, gradients enabled on the targeted weights only, the user's training
step run once; each weight's summed gradient is divided by the number of backward passes through its layer."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

_CACHE_SUFFIX = "._peft_loraga_grad"  # PEFT's key in its gradient cache file


def estimate_gradients(
    model: nn.Module,
    targets: Mapping[str, str],
    train_step: Callable[[], None],
    cache_file: str | None = None,
) -> dict[str, np.ndarray]:
    """Module -> its weight's averaged gradient, float64 in the IR layout (out × in; a GPT-2 Conv1D's is
    transposed). ``targets``: module -> IR layer type. Layers no backward pass reached are left out."""
    modules = {name: model.get_submodule(name) for name in targets}
    if cache_file is not None and os.path.exists(cache_file) and os.path.getsize(cache_file) > 0:
        cache = torch.load(cache_file, map_location="cpu", weights_only=True)
        found = {name: cache[name + _CACHE_SUFFIX] for name in modules if name + _CACHE_SUFFIX in cache}
    else:
        found = _run(model, modules, train_step)
        if cache_file is not None:
            os.makedirs(os.path.dirname(cache_file) or ".", exist_ok=True)
            torch.save({name + _CACHE_SUFFIX: grad for name, grad in found.items()}, cache_file)
    out = {}
    for name, grad in found.items():
        array = grad.detach().to("cpu", torch.float64).numpy()
        out[name] = array.T.copy() if targets[name] == "gpt2_conv1d" else array
    return out


def _run(
    model: nn.Module, modules: Mapping[str, nn.Module], train_step: Callable[[], None]
) -> dict[str, torch.Tensor]:
    training = model.training
    model.train()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    for module in modules.values():
        module.weight.requires_grad_(True)
    counts = dict.fromkeys(modules, 0)

    def counter(name: str) -> Callable[..., None]:
        def count(*_: object) -> None:
            counts[name] += 1

        return count

    handles = [module.register_full_backward_hook(counter(name)) for name, module in modules.items()]
    try:
        with torch.enable_grad():
            train_step()
    finally:
        for handle in handles:
            handle.remove()
        for name, param in model.named_parameters():
            param.requires_grad_(flags.get(name, param.requires_grad))
    found = {}
    for name, module in modules.items():
        weight = module.get_parameter("weight")
        if counts[name] > 0 and weight.grad is not None:
            found[name] = weight.grad.detach() / counts[name]
        weight.grad = None
    model.train(training)
    return found
