"""The eleven built-in kinds, in HF PEFT's order: the one place that lists them.

Layouts and backend ops are named as ``"module:ATTR"`` strings and imported on first use, so reading this table
imports neither torch nor MLX.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from peftdecl.kinds._decl import KindDecl, Shapes
from peftdecl.spec._base import SpecBase
from peftdecl.spec.adalora import AdaLoraSpec
from peftdecl.spec.ia3 import IA3Spec
from peftdecl.spec.lora import LoraSpec
from peftdecl.spec.lycoris import LoHaSpec, LoKrSpec
from peftdecl.spec.oft import BOFTSpec, OFTSpec
from peftdecl.spec.prompt import PrefixTuningSpec, PromptTuningSpec
from peftdecl.spec.vera import VeraSpec

BACKENDS = ("numpy", "torch", "mlx")
ALL_LAYERS = ("linear", "embedding", "conv1d", "conv2d", "gpt2_conv1d")


def _ops(module: str) -> dict[str, str]:
    """The ``OPS`` of ``peftdecl_<backend>.kinds.<module>`` on each built-in backend."""
    return {backend: f"peftdecl_{backend}.kinds.{module}:OPS" for backend in BACKENDS}


def _examples(
    spec: Mapping[str, Any], layer_types: tuple[str, ...], **per_layer: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """One spec per layer type (``per_layer`` adds fields for one of them), each targeting module ``m``."""
    return {t: {**spec, "target_modules": ["m"], **per_layer.get(t, {})} for t in layer_types}


# --- rank readings for `peftdecl inspect` (one module's tensor shapes -> the rank column) -----------------------


def lora_rank(shapes: Shapes, spec: SpecBase) -> str | None:
    """r: rows of A (HF PEFT's lora_A / lora_embedding_A), or the columns of mlx-lm's Aᵀ (lora_a)."""
    for key in ("lora_A.weight", "lora_embedding_A", "lora_A"):
        if shapes.get(key):
            return str(shapes[key][0])
    if shapes.get("lora_a"):  # mlx-lm: lora_a is Aᵀ [in, r]
        return str(shapes["lora_a"][-1])
    return None


def loha_rank(shapes: Shapes, spec: SpecBase) -> str | None:
    """r: rows of the Hadamard factor w1_b [r, in]."""
    found = shapes.get("hada_w1_b")
    return str(found[0]) if found else None


def lokr_rank(shapes: Shapes, spec: SpecBase) -> str | None:
    """r: columns of a low-rank factor w_a [l, r]; a fully stored Kronecker factor has no rank, so spec.r."""
    for key in ("lokr_w2_a", "lokr_w1_a"):
        if key in shapes and len(shapes[key]) >= 2:
            return str(shapes[key][1])
    return str(getattr(spec, "r", "-"))


def oft_blocks(shapes: Shapes, spec: SpecBase) -> str | None:
    """blocks × size: OFT stores n rows of the b(b−1)/2 strict upper-triangle entries of each b×b skew block."""
    for key in ("oft_R.weight", "oft_embedding_R.weight"):
        if key in shapes and len(shapes[key]) == 2:
            blocks, tri = shapes[key]
            return f"{blocks}×{round((1 + math.sqrt(1 + 8 * tri)) / 2)}"
    return None


def boft_blocks(shapes: Shapes, spec: SpecBase) -> str | None:
    """factors × blocks × size, from boft_R [factors, blocks, size, size]."""
    if "boft_R" in shapes and len(shapes["boft_R"]) == 4:
        factors, blocks, size, _ = shapes["boft_R"]
        return f"{factors}×{blocks}×{size}"
    return None


def vera_rank(shapes: Shapes, spec: SpecBase) -> str | None:
    """r: the length of λ_d."""
    found = shapes.get("vera_lambda_d")
    return str(found[0]) if found else None


# --- the declarations --------------------------------------------------------------------------------------------

_LORA_SPEC = {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "init_lora_weights": False}
_LORA_TENSORS = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_embedding_A", "lora_embedding_B")
_LYCORIS_LAYERS = ("linear", "conv1d", "conv2d")
_ADALORA_LAYERS = ("linear", "conv2d", "gpt2_conv1d")
_OFT_LAYERS = ("linear", "embedding", "conv2d")
_PROMPT = {"task_type": "CAUSAL_LM", "num_virtual_tokens": 2}

LORA = KindDecl(
    name="lora",
    peft_type="LORA",
    spec_class=LoraSpec,
    layout="peftdecl.plan.kinds.lora:LAYOUT",
    tensor_names=_LORA_TENSORS,
    hf_markers=(".lora_A.", ".lora_B.", ".lora_embedding_A"),
    layer_types=ALL_LAYERS,
    composition="add",
    rank=lora_rank,
    ops=_ops("lora"),
    examples=_examples(_LORA_SPEC, ALL_LAYERS),
    summary="y = W x + s · B A x: a low-rank update of the weight",
)
DORA = KindDecl(
    name="dora",
    peft_type="LORA",
    spec_class=LoraSpec,
    layout="peftdecl.plan.kinds.dora:LAYOUT",
    tensor_names=(*_LORA_TENSORS, "lora_magnitude_vector"),
    hf_markers=(".lora_magnitude_vector",),
    layer_types=ALL_LAYERS,
    composition="output",
    rank=lora_rank,
    ops=_ops("dora"),
    examples=_examples({**_LORA_SPEC, "use_dora": True}, ALL_LAYERS),
    summary="W' = m · (W + s B A) / ‖W + s B A‖: LoRA with the column norm learnt apart (use_dora)",
)
ADALORA = KindDecl(
    name="adalora",
    peft_type="ADALORA",
    spec_class=AdaLoraSpec,
    layout="peftdecl.plan.kinds.adalora:LAYOUT",
    tensor_names=("lora_A", "lora_E", "lora_B"),
    hf_markers=(".lora_E",),
    layer_types=_ADALORA_LAYERS,
    composition="add",
    rank=lora_rank,
    ops=_ops("adalora"),
    examples=_examples(
        {
            "peft_type": "ADALORA",
            "init_r": 3,
            "target_r": 2,
            "lora_alpha": 6,
            "total_step": 10,
            "init_lora_weights": False,
        },
        _ADALORA_LAYERS,
    ),
    summary="y = W x + s · B (E ⊙ A x): an SVD-shaped update whose rank is pruned during training",
)
IA3 = KindDecl(
    name="ia3",
    peft_type="IA3",
    spec_class=IA3Spec,
    layout="peftdecl.plan.kinds.ia3:LAYOUT",
    tensor_names=("ia3_l",),
    hf_markers=(".ia3_l",),
    layer_types=_ADALORA_LAYERS,
    composition="per-layer",
    ops=_ops("ia3"),
    examples=_examples(
        {"peft_type": "IA3", "feedforward_modules": [], "init_ia3_weights": False}, _ADALORA_LAYERS
    ),
    summary="y = l ⊙ (W x), or W (l ⊙ x) on feed-forward layers: a learnt rescaling",
)
LOHA = KindDecl(
    name="loha",
    peft_type="LOHA",
    spec_class=LoHaSpec,
    layout="peftdecl.plan.kinds.lycoris:LAYOUTS",
    tensor_names=("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    hf_markers=(".hada_",),
    layer_types=_LYCORIS_LAYERS,
    composition="add",
    rank=loha_rank,
    ops=_ops("loha"),
    examples=_examples({"peft_type": "LOHA", "r": 3, "alpha": 6, "init_weights": False}, _LYCORIS_LAYERS),
    summary="ΔW = s · (W1a W1b) ⊙ (W2a W2b): a Hadamard product of two low-rank factors",
)
LOKR = KindDecl(
    name="lokr",
    peft_type="LOKR",
    spec_class=LoKrSpec,
    layout="peftdecl.plan.kinds.lycoris:LAYOUTS",
    tensor_names=("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    hf_markers=(".lokr_",),
    layer_types=_LYCORIS_LAYERS,
    composition="add",
    rank=lokr_rank,
    ops=_ops("lokr"),
    examples=_examples({"peft_type": "LOKR", "r": 3, "alpha": 5, "init_weights": False}, _LYCORIS_LAYERS),
    summary="ΔW = s · W1 ⊗ W2: a Kronecker product, either factor optionally low-rank",
)
OFT = KindDecl(
    name="oft",
    peft_type="OFT",
    spec_class=OFTSpec,
    layout="peftdecl.plan.kinds.oft:LAYOUT",
    tensor_names=("oft_R.weight", "oft_embedding_R.weight"),
    hf_markers=(".oft_R.", ".oft_embedding_R."),
    layer_types=_OFT_LAYERS,
    composition="per-layer",
    rank=oft_blocks,
    ops=_ops("oft"),
    examples=_examples({"peft_type": "OFT", "r": 0, "oft_block_size": 2, "init_weights": False}, _OFT_LAYERS),
    summary="W' = W Rᵀ with R block-diagonal orthogonal (Cayley of skew blocks); embeddings rotate the output",
)
BOFT = KindDecl(
    name="boft",
    peft_type="BOFT",
    spec_class=BOFTSpec,
    layout="peftdecl.plan.kinds.boft:LAYOUT",
    tensor_names=("boft_R", "boft_s"),
    hf_markers=(".boft_R", ".boft_s"),
    layer_types=("linear", "conv2d"),
    composition="input",
    rank=boft_blocks,
    ops=_ops("boft"),
    examples=_examples(
        {"peft_type": "BOFT", "boft_block_size": 2, "init_weights": False}, ("linear", "conv2d")
    ),
    summary="W' = s ⊙ (W Rᵀ), R a product of butterfly-permuted block-orthogonal factors",
)
VERA = KindDecl(
    name="vera",
    peft_type="VERA",
    spec_class=VeraSpec,
    layout="peftdecl.plan.kinds.vera:LAYOUT",
    tensor_names=("vera_lambda_b", "vera_lambda_d"),
    hf_markers=(".vera_lambda_", "vera_A"),
    layer_types=("linear", "gpt2_conv1d"),
    composition="add",
    rank=vera_rank,
    ops=_ops("vera"),
    examples=_examples({"peft_type": "VERA", "r": 4, "init_weights": False}, ("linear", "gpt2_conv1d")),
    summary="y = W x + λ_b ⊙ B (λ_d ⊙ A x), A and B random, frozen and shared by all layers",
)
PREFIX_TUNING = KindDecl(
    name="prefix_tuning",
    peft_type="PREFIX_TUNING",
    spec_class=PrefixTuningSpec,
    layout="peftdecl.plan.kinds.prompt:LAYOUTS",
    tensor_names=(),
    hf_markers=("prompt_embeddings",),
    layer_types=(),
    composition="model",
    ops=_ops("prompt"),
    examples={"model": {"peft_type": "PREFIX_TUNING", **_PROMPT}},
    summary="learnt key/value prefixes prepended to every attention layer",
)
PROMPT_TUNING = KindDecl(
    name="prompt_tuning",
    peft_type="PROMPT_TUNING",
    spec_class=PromptTuningSpec,
    layout="peftdecl.plan.kinds.prompt:LAYOUTS",
    tensor_names=(),
    hf_markers=("prompt_embeddings",),
    layer_types=(),
    composition="model",
    ops=_ops("prompt"),
    examples={"model": {"peft_type": "PROMPT_TUNING", **_PROMPT}},
    summary="learnt virtual token embeddings prepended to the input",
)

BUILTIN_KINDS: tuple[KindDecl, ...] = (
    LORA,
    DORA,
    ADALORA,
    IA3,
    LOHA,
    LOKR,
    OFT,
    BOFT,
    VERA,
    PREFIX_TUNING,
    PROMPT_TUNING,
)
"""In HF PEFT's order (SPEC_TYPES, the schemas and the capabilities page keep it)."""
