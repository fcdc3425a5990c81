"""A LoRA adapter in llama.cpp's GGUF adapter layout, as ``convert_lora_to_gguf.py`` writes it.

Metadata: ``general.architecture`` (llama.cpp's name, e.g. ``llama``), ``general.type = "adapter"``,
``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32, the config's ``lora_alpha``). Tensors:
``<gguf base name>.lora_a`` [r, in] and ``.lora_b`` [out, r] in float32 (NumPy order; GGUF's ``ne`` is reversed:
[in, r] and [r, out]), e.g. ``blk.0.attn_q.weight.lora_a``. llama.cpp adds ``s · B A x`` with
``s = alpha / r`` (r read from each tensor pair), so a layer whose PEFT scaling differs (``alpha_pattern``,
rsLoRA's ``alpha / √r``) gets the ratio folded into its ``lora_b``. llama.cpp stores Llama's q/k projections with
the rows of each head interleaved for its RoPE; ``lora_b`` of q_proj/k_proj gets the same row permutation.
Targets: q/k/v/o_proj, gate/up/down_proj, lm_head (``output``, untied only) and embed_tokens (``token_embd``,
whose ``lora_a`` llama.cpp takes transposed: [vocab, r]).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from peftdecl.errors import PeftdeclError
from peftdecl.export.staging import staged_files
from peftdecl.spec.lora import LoraSpec

if TYPE_CHECKING:
    from peftdecl.model import AdaptedModel
    from peftdecl.plan import LayerPlan

ARCHITECTURES: Mapping[str, str] = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
"""HF architecture -> llama.cpp architecture: the Llama family, whose q/k rows llama.cpp permutes."""
TENSOR_TYPES = (
    "ATTN_Q",
    "ATTN_K",
    "ATTN_V",
    "ATTN_OUT",
    "FFN_GATE",
    "FFN_UP",
    "FFN_DOWN",
    "OUTPUT",
    "TOKEN_EMBD",
)
"""gguf.MODEL_TENSOR members an adapter may target (the projections, the output head, the token embeddings)."""
FACTOR_NAMES = {
    "linear": ("lora_A.weight", "lora_B.weight"),
    "embedding": ("lora_embedding_A", "lora_embedding_B"),
}
"""Layer type -> the IR names of its (A, B) factors: the only tensors a GGUF LoRA layer can hold."""
SCALE_RTOL = 1e-12
"""A layer whose PEFT scaling equals llama.cpp's alpha / r within this is written unchanged."""


@dataclass(frozen=True)
class GgufAdapter:
    """What goes into the file: llama.cpp's architecture name, the global alpha, the tensors by GGUF name, and
    the HF modules whose ``lora_b`` carries a folded scale ratio."""

    architecture: str
    alpha: float
    tensors: dict[str, np.ndarray]
    folded: dict[str, float] = field(default_factory=dict)


def base_config(model_dir: Path) -> dict[str, object]:
    """The base checkpoint's ``config.json``."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise PeftdeclError(f"--model {model_dir}: no config.json there (expected a HF checkpoint folder)")
    config = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise PeftdeclError(f"{path}: expected a JSON object")
    return config


def llama_cpp_architecture(config: Mapping[str, object]) -> str:
    """llama.cpp's architecture name for the checkpoint's ``architectures[0]``; an unsupported one is refused."""
    names = config.get("architectures")
    hf_name = names[0] if isinstance(names, list) and names else None
    if hf_name not in ARCHITECTURES:
        raise PeftdeclError(
            f"config.json $.architectures[0]: {hf_name!r} is not supported by the GGUF export; expected one of "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[str(hf_name)]


def permute_rope_rows(b: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: within each head, the two RoPE halves are interleaved
    (row h·d + 2i + j  <-  row h·d + j·d/2 + i)."""
    out, r = b.shape
    permuted: np.ndarray = b.reshape(heads, 2, out // heads // 2, r).swapaxes(1, 2).reshape(out, r)
    return permuted


def gguf_adapter(model: AdaptedModel, config: Mapping[str, object], name: str = "default") -> GgufAdapter:
    """The GGUF tensors of LoRA adapter ``name`` of ``model`` (the base is ``config``'s checkpoint)."""
    import gguf

    architecture = llama_cpp_architecture(config)
    plan = model.plan(name)
    if plan.kind != "lora" or plan.prompt is not None or not isinstance(plan.spec, LoraSpec):
        raise PeftdeclError(
            f"adapter {name!r} is {plan.kind}: llama.cpp's GGUF adapters hold plain LoRA only (no DoRA, no other "
            "kind); use --format safetensors or onnx for a merged model"
        )
    if plan.shared or plan.modules_to_save:
        raise PeftdeclError(
            f"adapter {name!r} has modules_to_save/shared tensors; a GGUF LoRA adapter holds lora_a/lora_b only"
        )
    alpha = float(plan.spec.lora_alpha)
    heads = int(config.get("num_attention_heads", 0))  # type: ignore[call-overload]
    kv_heads = int(config.get("num_key_value_heads", heads))  # type: ignore[call-overload]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config.get("num_hidden_layers", 0)))  # type: ignore[call-overload]
    allowed = {getattr(gguf.MODEL_TENSOR, t) for t in TENSOR_TYPES}
    arrays = model.state_dict(name)
    tensors: dict[str, np.ndarray] = {}
    folded: dict[str, float] = {}
    for lp in plan.layers:
        a, b = lora_factors(lp, arrays)
        found = names.get_type_and_name(lp.module, try_suffixes=(".weight",))
        if found is None or found[0] not in allowed:
            raise PeftdeclError(
                f"{lp.module}: no llama.cpp {architecture} tensor for this module; the GGUF export maps "
                "q/k/v/o_proj, gate/up/down_proj, lm_head and embed_tokens"
            )
        tensor_type, base_name = found
        if tensor_type == gguf.MODEL_TENSOR.OUTPUT and config.get("tie_word_embeddings"):
            raise PeftdeclError(
                f"{lp.module}: config.json $.tie_word_embeddings is true, so llama.cpp's model has no output tensor "
                "to adapt; leave lm_head out of target_modules"
            )
        llama_scale = alpha / lp.r if alpha else 1.0  # llama.cpp: alpha 0 means scale 1
        ratio = lp.scaling / llama_scale
        if not math.isclose(ratio, 1.0, rel_tol=SCALE_RTOL):
            b = b * ratio
            folded[lp.module] = ratio
        if tensor_type == gguf.MODEL_TENSOR.ATTN_Q:
            b = permute_rope_rows(b, heads)
        elif tensor_type == gguf.MODEL_TENSOR.ATTN_K:
            b = permute_rope_rows(b, kv_heads)
        if tensor_type == gguf.MODEL_TENSOR.TOKEN_EMBD:
            a = a.T  # llama.cpp's embedding graph takes token_embd's lora_a as [vocab, r] rows (A transposed)
        tensors[f"{base_name}.weight.lora_a"] = np.ascontiguousarray(a)
        tensors[f"{base_name}.weight.lora_b"] = np.ascontiguousarray(b.astype(np.float32))
    if not tensors:
        raise PeftdeclError(f"adapter {name!r} adapts no layer; nothing to export")
    return GgufAdapter(architecture, alpha, tensors, folded)


def lora_factors(lp: LayerPlan, arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(A float32, B float64) of a plain LoRA linear or embedding layer; any other layer is refused."""
    names = FACTOR_NAMES.get(lp.layer.type)
    if lp.kind != "lora" or names is None or {p.name for p in lp.params} != set(names):
        raise PeftdeclError(
            f"{lp.module}: a {lp.kind} {lp.layer.type} layer with {sorted(p.name for p in lp.params)}; the GGUF "
            "export writes plain LoRA linear and embedding layers (A and B only, no lora_bias)"
        )
    a, b = (arrays[f"{lp.module}.{name}"] for name in names)
    return np.asarray(a, np.float32), np.asarray(b, np.float64)


def write_gguf_adapter(adapter: GgufAdapter, out: Path, title: str | None = None) -> None:
    """Write ``adapter`` to ``out`` (absent; all at once), then read it back and compare every tensor and the
    metadata, bit for bit."""
    import gguf

    out = Path(out)
    with staged_files(out) as stage:
        staged = stage / out.name
        writer = gguf.GGUFWriter(str(staged), adapter.architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, adapter.alpha)
        if title:
            writer.add_name(title)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tensor_name, data in adapter.tensors.items():
            writer.add_tensor(tensor_name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        check_gguf_adapter(staged, adapter)


def check_gguf_adapter(path: Path, adapter: GgufAdapter) -> None:
    """Read ``path`` with gguf's reader: the architecture, type, alpha and every tensor (name, shape, float32
    values) must equal ``adapter``'s."""
    import gguf

    reader = gguf.GGUFReader(str(path))

    def text(key: str) -> str:
        item = reader.get_field(key)
        return "" if item is None else str(item.contents())

    alpha_field = reader.get_field(gguf.Keys.Adapter.LORA_ALPHA)
    got_alpha = None if alpha_field is None else float(alpha_field.contents())
    wrong = [
        f"{key}={got!r}"
        for key, got, want in (
            ("general.architecture", text("general.architecture"), adapter.architecture),
            ("general.type", text("general.type"), "adapter"),
            ("adapter.type", text(gguf.Keys.Adapter.TYPE), "lora"),
            ("adapter.lora.alpha", got_alpha, float(np.float32(adapter.alpha))),
        )
        if got != want
    ]
    read = {t.name: t for t in reader.tensors}
    if set(read) != set(adapter.tensors):
        wrong.append(f"tensors {sorted(set(read) ^ set(adapter.tensors))}")
    for tensor_name, data in adapter.tensors.items():
        t = read.get(tensor_name)
        if t is not None and (
            t.tensor_type != gguf.GGMLQuantizationType.F32 or not np.array_equal(t.data, data)
        ):
            wrong.append(tensor_name)
    if wrong:
        raise PeftdeclError(
            f"{path}: the GGUF file read back differs from what was written: {', '.join(wrong)}"
        )
