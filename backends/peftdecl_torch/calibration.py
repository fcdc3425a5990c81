"""CorDA's calibration on torch: each target layer's input covariance, read by forward hooks while the user's
``run_model()`` runs calibration data, and PEFT's torch files of covariances and singular triplets.

Per call of a hooked layer, as HF PEFT 0.21 computes it (float32, or the input's own dtype with
``use_float16_for_covariance``): X = the call's first input as rows (in features each), X ← X / |max X|,
C += Xᵀ X; at the end C ← C / (number of calls). PEFT reads only a 2-D input or a batch of one (it squeezes the
batch dimension); peftdecl reads every row of any leading shape, which is the same there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from peftdecl.errors import PeftdeclError, TargetError
from peftdecl.inits.corda import CordaEigens
from peftdecl_torch.base_weights import base_weight_ir


class _Covariance:
    """The running sum of XᵀX over the calls of one layer."""

    def __init__(self, name: str, keep_dtype: bool) -> None:
        self.name, self.keep_dtype = name, keep_dtype
        self.total: torch.Tensor | None = None
        self.calls = 0

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        x = inputs[0].detach()
        x = x.reshape(-1, x.shape[-1])
        if not self.keep_dtype:
            x = x.float()
        x = x / torch.max(x).abs()
        if not torch.isfinite(x).all():
            raise TargetError(f"{self.name}: a calibration input is inf or NaN (or all zero); check the data")
        covariance = x.t().matmul(x)
        if not torch.isfinite(covariance).all():
            raise TargetError(
                f"{self.name}: the input covariance overflows {covariance.dtype}; "
                "set corda_config.use_float16_for_covariance to false"
            )
        self.total = covariance if self.total is None else self.total + covariance
        self.calls += 1


def collect_covariances(
    model: nn.Module, modules: Sequence[str], run_model: Callable[[], object], keep_dtype: bool = False
) -> dict[str, np.ndarray]:
    """Run ``run_model()`` with a covariance hook on each of ``modules`` of ``model`` (in eval mode, no gradients,
    as PEFT does) and return each layer's mean XᵀX as float64 NumPy."""
    hooks: dict[str, _Covariance] = {}
    handles = []
    for name in modules:
        try:
            layer = model.get_submodule(name)
        except AttributeError as exc:
            raise TargetError(f"{name}: the hooked model has no such module") from exc
        hooks[name] = _Covariance(name, keep_dtype)
        handles.append(layer.register_forward_hook(hooks[name]))
    model.eval()
    try:
        with torch.no_grad():
            run_model()
    finally:
        for handle in handles:
            handle.remove()
    found: dict[str, np.ndarray] = {}
    for name, hook in hooks.items():
        if hook.total is None:
            raise TargetError(
                f"{name}: run_model() never called this layer, so CorDA has no covariance for it"
            )
        found[name] = (hook.total / hook.calls).detach().cpu().double().numpy()
    return found


def ir_weight(model: nn.Module, module: str) -> np.ndarray:
    """The float64 base weight of ``module`` in the IR layout ``[out, in]`` (GPT-2 Conv1D transposed)."""
    return base_weight_ir(model, {}, module).detach().cpu().double().numpy()


def _readable(path: str | None) -> bool:
    return path is not None and os.path.exists(path) and os.path.getsize(path) > 0


def load_covariances(path: str | None, modules: Sequence[str]) -> dict[str, np.ndarray] | None:
    """PEFT's ``covariance_file`` (a torch file: module name -> C), when it exists and is not empty."""
    if path is None or not _readable(path):
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    missing = [name for name in modules if name not in saved]
    if missing:
        raise PeftdeclError(f"{path}: covariance file has no entry for {missing}")
    return {name: saved[name].double().numpy() for name in modules}


def save_covariances(path: str, covariances: Mapping[str, np.ndarray]) -> None:
    """Write ``covariance_file`` as PEFT does (float32 tensors by module name)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {name: torch.from_numpy(np.asarray(c, dtype=np.float32)) for name, c in covariances.items()}, path
    )


def load_eigens(path: str | None, modules: Sequence[str]) -> dict[str, CordaEigens] | None:
    """PEFT's ``cache_file`` (``<module>.eigens.S_WC`` / ``U_WC`` / ``V_WC``), when it exists and is not empty."""
    if path is None or not _readable(path):
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    found: dict[str, CordaEigens] = {}
    for name in modules:
        keys = [f"{name}.eigens.{part}_WC" for part in ("S", "U", "V")]
        if any(key not in saved for key in keys):
            raise PeftdeclError(f"{path}: CorDA cache file has no eigens for {name}")
        s, u, v = (saved[key].double().numpy() for key in keys)
        found[name] = CordaEigens(s=s, u=u, v=v)
    return found


def save_eigens(path: str, eigens: Mapping[str, CordaEigens]) -> None:
    """Write ``cache_file`` in PEFT's layout (float32 tensors), so that either library can read the other's."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cache: dict[str, torch.Tensor] = {}
    for name, found in eigens.items():
        for part, values in (("S", found.s), ("U", found.u), ("V", found.v)):
            cache[f"{name}.eigens.{part}_WC"] = torch.from_numpy(np.asarray(values, dtype=np.float32).copy())
    torch.save(cache, path)
