"""``replace_lora_weights_loftq``: HF PEFT's LoftQ for a model that is already quantised with bitsandbytes 4-bit.

For each LoRA layer over a 4-bit base, with W the float weight read from the model's safetensors checkpoint and Q
the layer's dequantised weight: W − Q ≈ B A (rank-r truncated SVD, A = √S_r V_rᵀ, B = U_r √S_r; one step, as
PEFT). The base stays as it is; only A and B change. A ``callback(model, module) -> bool`` may keep or undo each
layer's change (PEFT's greedy check that the error went down).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from peftdecl.errors import PeftdeclError
from peftdecl.formats.safetensors_io import read_safetensors
from peftdecl.inits.loftq import truncated_factors
from peftdecl.quant.folder import tensor_headers


class _Checkpoint:
    """Float tensors of a safetensors checkpoint folder (or file), each file read once when first needed."""

    def __init__(self, path: Path) -> None:
        folder = path.parent if path.suffix == ".safetensors" else path
        self.headers = tensor_headers(folder)
        self.files: dict[Path, dict[str, np.ndarray]] = {}

    def tensor(self, names: list[str]) -> np.ndarray:
        """The first of ``names`` the checkpoint holds (a module name with and without the model's prefix)."""
        for name in names:
            header = self.headers.get(name)
            if header is not None:
                if header.file not in self.files:
                    self.files[header.file] = read_safetensors(header.file)[0]
                return self.files[header.file][name]
        raise PeftdeclError(f"replace_lora_weights_loftq: the checkpoint has no tensor {' or '.join(names)}")


def _checkpoint_path(model: object, model_path: str | Path | None) -> Path:
    if model_path is not None:
        return Path(model_path)
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if isinstance(name, str) and Path(name).is_dir():
        return Path(name)
    raise PeftdeclError(
        "replace_lora_weights_loftq: pass model_path, the folder (or model.safetensors file) of the unquantised "
        "checkpoint; the model's config names no local folder"
    )


def replace_lora_weights_loftq(
    peft_model: object,
    model_path: str | Path | None = None,
    adapter_name: str = "default",
    callback: Callable[[object, str], bool] | None = None,
) -> None:
    """Set the LoRA factors of ``adapter_name`` over every bitsandbytes 4-bit layer of ``peft_model`` (an
    AdaptedModel) to LoftQ's, from the float weights in ``model_path``; ``callback(peft_model, module)`` returning
    False undoes that layer's change."""
    from peftdecl.model import AdaptedModel

    if not isinstance(peft_model, AdaptedModel):
        raise PeftdeclError("replace_lora_weights_loftq needs an AdaptedModel (peftdecl.attach(...))")
    plan = peft_model.plan(adapter_name)
    layers = [layer for layer in plan.layers if layer.layer.quantization == "bnb_4bit"]
    if plan.kind not in ("lora", "dora") or not layers:
        raise PeftdeclError(
            f"replace_lora_weights_loftq: adapter {adapter_name!r} has no LoRA layer over a bitsandbytes 4-bit layer"
        )
    checkpoint = _Checkpoint(_checkpoint_path(peft_model.get_base_model(), model_path))
    prefix = getattr(peft_model.get_base_model(), "base_model_prefix", None)
    arrays = peft_model.state_dict(adapter_name)
    for layer in layers:
        names = [f"{layer.module}.weight"]
        if prefix and layer.module.startswith(f"{prefix}."):
            names.append(f"{layer.module.removeprefix(f'{prefix}.')}.weight")
        weight = np.asarray(checkpoint.tensor(names), dtype=np.float32).astype(np.float64)
        quantised = np.asarray(peft_model.engine.base_weight(layer.module), dtype=np.float64)
        before = dict(arrays)
        arrays[layer.key("lora_A.weight")], arrays[layer.key("lora_B.weight")] = truncated_factors(
            weight - quantised, layer.r
        )
        if callback is None:
            continue
        _replace_arrays(peft_model, adapter_name, arrays)
        if not callback(peft_model, layer.module):
            arrays = before
            _replace_arrays(peft_model, adapter_name, arrays)
    if callback is None:
        _replace_arrays(peft_model, adapter_name, arrays)


def _replace_arrays(model: object, name: str, arrays: dict[str, np.ndarray]) -> None:
    """Re-attach adapter ``name`` with ``arrays`` (same spec), keeping which adapters are active."""
    from peftdecl.model import AdaptedModel

    assert isinstance(model, AdaptedModel)
    spec, active = model.plan(name).spec, model.active_adapters
    model.delete_adapter(name)
    model.add_adapter(name, spec, arrays=arrays)
    if active:
        model.set_adapter(active)
