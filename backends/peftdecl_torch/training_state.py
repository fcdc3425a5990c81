"""A torch training run's resumable state as NumPy tensors plus JSON: optimizer moments and step counts, torch's and
the engine's generator states, AdaLoRA's allocator. Tensors are float32 or uint8 (safetensors-friendly); a
parameter kept in bfloat16 records its dtype so that its moments come back in it."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from peftdecl._json import JsonObject
from peftdecl.errors import PeftdeclError
from peftdecl_numpy.rank_allocator import RankAllocator
from peftdecl_torch.engine import TorchEngine

OPTIMIZER = "optimizer/"
RNG = "rng/"
ALLOCATOR = "adalora/"
MOMENTS = ("exp_avg", "exp_avg_sq", "momentum_buffer")
ALLOCATOR_ARRAYS = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A host copy; bfloat16 and float16 widen to float32 exactly (NumPy and safetensors-friendly)."""
    value = tensor.detach()
    if value.dtype in (torch.bfloat16, torch.float16):
        value = value.float()
    array: np.ndarray = value.cpu().numpy().copy()
    return array


def _from_numpy(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(device=like.device, dtype=like.dtype)


def optimizer_state(
    optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter]
) -> tuple[dict[str, np.ndarray], JsonObject]:
    """Per parameter key: its moment tensors and its step count (JSON), as the optimizer holds them."""
    tensors: dict[str, np.ndarray] = {}
    steps: dict[str, float] = {}
    dtypes: dict[str, str] = {}
    for key, param in params.items():
        state = optimizer.state.get(param, {})
        for name in MOMENTS:
            value = state.get(name)
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIMIZER}{key}/{name}"] = to_numpy(value)
                dtypes[key] = str(value.dtype).removeprefix("torch.")
        if "step" in state:
            steps[key] = float(state["step"])
    return tensors, {"steps": steps, "dtypes": dtypes}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    params: Mapping[str, nn.Parameter],
    tensors: Mapping[str, np.ndarray],
    meta: JsonObject,
) -> None:
    """Give every parameter back the moments and step count :func:`optimizer_state` recorded."""
    steps = meta.get("steps", {})
    for key in {k[len(OPTIMIZER) :].rpartition("/")[0] for k in tensors if k.startswith(OPTIMIZER)} | set(
        steps
    ):
        if key not in params:
            raise PeftdeclError(
                f"the checkpoint's optimizer state names {key}, which the adapter does not have"
            )
    for key, param in params.items():
        state: dict[str, torch.Tensor] = {}
        for name in MOMENTS:
            array = tensors.get(f"{OPTIMIZER}{key}/{name}")
            if array is not None:
                if tuple(array.shape) != tuple(param.shape):
                    raise PeftdeclError(
                        f"checkpoint optimizer state {key}/{name} has shape {list(array.shape)}, "
                        f"the parameter {list(param.shape)}"
                    )
                state[name] = _from_numpy(array, param)
        if key in steps:
            # AdamW keeps its step as a float32 host scalar (non-capturable, non-fused)
            state["step"] = torch.tensor(float(steps[key]), dtype=torch.float32)
        if state:
            optimizer.state[param] = state
        else:
            optimizer.state.pop(param, None)


def rng_state(engine: TorchEngine) -> dict[str, np.ndarray]:
    """torch's CPU (and every CUDA device's) generator and the engine's own dropout generators."""
    out = {f"{RNG}torch/cpu": torch.get_rng_state().numpy().copy()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"{RNG}torch/cuda:{index}"] = cuda_state.numpy().copy()
    for device, engine_state in engine.get_rng_state().items():
        out[f"{RNG}engine/{device}"] = np.asarray(engine_state, dtype=np.uint8).copy()
    return out


def load_rng_state(engine: TorchEngine, tensors: Mapping[str, np.ndarray]) -> None:
    """Restore :func:`rng_state` (the CUDA states only where this process has those devices)."""
    engine_state = {}
    for key, array in tensors.items():
        if not key.startswith(RNG):
            continue
        owner, _, device = key[len(RNG) :].partition("/")
        if owner == "engine":
            engine_state[device] = array
            continue
        state = torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint8).copy())
        if device == "cpu":
            torch.set_rng_state(state)
        elif device.startswith("cuda:") and torch.cuda.is_available():
            index = int(device.partition(":")[2])
            if index < torch.cuda.device_count():
                torch.cuda.set_rng_state(state, index)
    if engine_state:
        engine.set_rng_state(engine_state)


def allocator_state(allocator: RankAllocator) -> tuple[dict[str, np.ndarray], JsonObject]:
    """AdaLoRA's smoothed importances (by parameter key) and its latest rank pattern."""
    tensors = {}
    for name in ALLOCATOR_ARRAYS:
        for key, value in getattr(allocator, name).items():
            tensors[f"{ALLOCATOR}{name}/{key}"] = to_numpy(value)
    return tensors, {"rank_pattern": allocator.rank_pattern}


def load_allocator_state(
    allocator: RankAllocator,
    params: Mapping[str, nn.Parameter],
    tensors: Mapping[str, np.ndarray],
    meta: JsonObject,
) -> None:
    """Restore :func:`allocator_state`: the arrays go to their parameter's device and dtype."""
    allocator.reset_ipt()
    for full, array in tensors.items():
        if not full.startswith(ALLOCATOR):
            continue
        name, _, key = full[len(ALLOCATOR) :].partition("/")
        if name not in ALLOCATOR_ARRAYS or key not in params:
            raise PeftdeclError(f"the checkpoint's AdaLoRA state has an unknown entry {full}")
        getattr(allocator, name)[key] = _from_numpy(array, params[key].detach())
    pattern = meta.get("rank_pattern")
    allocator.rank_pattern = (
        None if pattern is None else {k: [bool(b) for b in v] for k, v in pattern.items()}
    )
