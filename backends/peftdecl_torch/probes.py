"""Helpers of the torch engine outside the adapter arithmetic: NumPy copies of tensors, the per-layer capture
``peftdecl equiv`` compares, and giving new wrappers the train/eval mode of the layer they replace."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU NumPy copy (half types widened to float32, which NumPy can hold and PEFT saves)."""
    tensor = tensor.detach().to("cpu")
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.to(torch.float32)
    array: np.ndarray = tensor.numpy().copy()
    return array


def capture(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    forward: Callable[..., object],
    input_ids: np.ndarray,
) -> tuple[np.ndarray | None, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Run the model on ``input_ids`` without gradients and return (final logits, {adapted module: (its input,
    its output) on its first call}), as NumPy, read by forward hooks on the wrappers (removed afterwards)."""
    records: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def hook(module: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], object], None]:
        # on an AdaptedLayer, whose forward takes one tensor
        def record(_: nn.Module, inputs: tuple[torch.Tensor, ...], output: object) -> None:
            if module not in records and inputs and isinstance(output, torch.Tensor):
                records[module] = (to_numpy(inputs[0]), to_numpy(output))

        return record

    handles = [layer.register_forward_hook(hook(m)) for m, layer in layers.items()]
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long, device=device)
        with torch.no_grad():
            out = forward(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    logits = getattr(out, "logits", out)
    return (to_numpy(logits) if isinstance(logits, torch.Tensor) else None), records


def follow_mode(wrapper: nn.Module, base: nn.Module, training: bool) -> None:
    """Put the modules of ``wrapper`` that peftdecl created (not ``base`` nor anything inside it) in ``training``
    mode, so that a wrapper added to a model in eval mode does not apply dropout; later ``model.train()`` /
    ``model.eval()`` calls reach them as any sub-module."""
    inner = {id(m) for m in base.modules()}
    for module in wrapper.modules():
        if id(module) not in inner:
            module.training = training
