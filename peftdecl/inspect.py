"""Summarise a saved adapter folder without a model: kind, targets, ranks, parameter count, dtypes."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from peftdecl.errors import AdapterFileError
from peftdecl.formats import hf_peft
from peftdecl.formats.safetensors_io import read_safetensors
from peftdecl.spec import SpecBase, load_spec

# Tensor-name suffixes of each kind, longest first, to split a key into (module, tensor).
_SUFFIXES = (
    "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_A.weight", "lora_B.weight",
    "lora_B.bias", "lora_A", "lora_B", "lora_E", "ia3_l", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
    "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "oft_R.weight", "boft_R", "boft_s", "vera_lambda_b", "vera_lambda_d", "base_layer.weight",
)  # fmt: skip


@dataclass(frozen=True)
class AdapterSummary:
    """What ``peftdecl inspect`` prints for one adapter folder."""

    folder: Path
    spec: SpecBase
    modules: dict[str, dict[str, tuple[int, ...]]]
    shared: dict[str, tuple[int, ...]]
    num_parameters: int
    dtypes: tuple[str, ...]


def summarise(folder: Path) -> AdapterSummary:
    """Read one HF PEFT adapter folder."""
    folder = Path(folder)
    if not hf_peft.is_hf_adapter_dir(folder):
        raise AdapterFileError(f"{folder}: no {hf_peft.CONFIG_NAME}; not an adapter folder")
    spec = load_spec(folder / hf_peft.CONFIG_NAME)
    tensors, _ = read_safetensors(folder / hf_peft.WEIGHTS_NAME)
    modules: dict[str, dict[str, tuple[int, ...]]] = defaultdict(dict)
    shared = {}
    for key, value in sorted(tensors.items()):
        name = key.removeprefix(hf_peft.MODEL_PREFIX)
        suffix = next((s for s in _SUFFIXES if name.endswith("." + s)), None)
        if suffix is None:
            shared[name.removeprefix(hf_peft.SHARED_PREFIX)] = value.shape
        else:
            modules[name[: -len(suffix) - 1]][suffix] = value.shape
    dtypes = tuple(sorted({str(v.dtype) for v in tensors.values()}))
    count = int(sum(np.prod(v.shape) for v in tensors.values()))
    return AdapterSummary(folder, spec, dict(modules), shared, count, dtypes)


def rank_of(spec: SpecBase, shapes: dict[str, tuple[int, ...]]) -> str:
    """A kind-appropriate size for one module: the rank, or the block layout for OFT/BOFT."""
    for key in ("lora_A.weight", "lora_embedding_A", "lora_E", "hada_w1_b", "lora_A"):
        if key in shapes:
            return str(shapes[key][0])
    if "vera_lambda_d" in shapes:
        return str(shapes["vera_lambda_d"][0])
    if "oft_R.weight" in shapes:
        blocks, tri = shapes["oft_R.weight"]
        size = int((1 + (1 + 8 * tri) ** 0.5) / 2)
        return f"{blocks}×{size}"
    if "boft_R" in shapes:
        factors, blocks, size, _ = shapes["boft_R"]
        return f"{factors}×{blocks}×{size}"
    if any(k.startswith("lokr_") for k in shapes):
        return str(getattr(spec, "r", "-"))
    return "-"


def format_summary(summary: AdapterSummary) -> str:
    """The table ``peftdecl inspect`` prints."""
    spec = summary.spec
    lines = [
        f"folder      {summary.folder}",
        "format      hf (adapter_config.json + adapter_model.safetensors)",
        f"kind        {spec.peft_type}" + (" (DoRA)" if getattr(spec, "use_dora", False) else ""),
        f"parameters  {summary.num_parameters:,}",
        f"dtype       {', '.join(summary.dtypes)}",
    ]
    if summary.modules:
        width = max(len(m) for m in summary.modules)
        lines.append("")
        lines.append(f"{'module':<{width}}  rank  tensors")
        for module, shapes in summary.modules.items():
            tensors = ", ".join(f"{k} {list(v)}" for k, v in shapes.items())
            lines.append(f"{module:<{width}}  {rank_of(spec, shapes):>4}  {tensors}")
    for name, shape in summary.shared.items():
        lines.append(f"shared      {name} {list(shape)}")
    return "\n".join(lines)
