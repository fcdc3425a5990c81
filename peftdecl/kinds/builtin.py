"""The built-in kinds, in HF PEFT's order: the one place that lists them.

Layouts and backend ops are named as ``"module:ATTR"`` strings and imported on first use, so reading this table
imports neither torch nor MLX.
"""

from __future__ import annotations

import math

from peftdecl._json import JsonObject
from peftdecl.kinds._decl import Composition, KindDecl, RankReader, Shapes, no_rank
from peftdecl.kinds.lora_variants_a import VARIANT_A_KINDS
from peftdecl.kinds.lora_variants_b import VARIANT_B_KINDS
from peftdecl.kinds.mha import LORA_MHA
from peftdecl.spec._base import SpecBase
from peftdecl.spec.adalora import AdaLoraSpec
from peftdecl.spec.ia3 import IA3Spec
from peftdecl.spec.lora import LoraSpec
from peftdecl.spec.lycoris import LoHaSpec, LoKrSpec
from peftdecl.spec.oft import BOFTSpec, OFTSpec
from peftdecl.spec.prompt import PrefixTuningSpec, PromptTuningSpec
from peftdecl.spec.trainable_tokens import TrainableTokensSpec
from peftdecl.spec.vera import VeraSpec

BACKENDS = ("numpy", "torch", "mlx")
ALL_LAYERS = ("linear", "embedding", "conv1d", "conv2d", "conv3d", "gpt2_conv1d")


def _ops(module: str) -> dict[str, str]:
    """The ``OPS`` of ``peftdecl_<backend>.kinds.<module>`` on each built-in backend."""
    return {backend: f"peftdecl_{backend}.kinds.{module}:OPS" for backend in BACKENDS}


def _examples(
    spec: JsonObject, layer_types: tuple[str, ...], **per_layer: JsonObject
) -> dict[str, JsonObject]:
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


def _builtin(
    name: str,
    spec_class: type[SpecBase],
    *,
    layout: str,
    tensors: tuple[str, ...],
    markers: tuple[str, ...],
    layers: tuple[str, ...],
    composition: Composition,
    example: JsonObject,
    summary: str,
    rank: RankReader = no_rank,
    ops: str | None = None,
    needs_dense_weight: bool = True,
) -> KindDecl:
    """A built-in kind: its peft_type is its spec's tag, its ops are ``OPS`` of ``peftdecl_<backend>.kinds.<ops>``
    (default: the kind's name) on every built-in backend, and ``example`` is its test spec on each layer type."""
    return KindDecl(
        name=name,
        peft_type=str(spec_class.__struct_config__.tag),
        spec_class=spec_class,
        layout=layout,
        tensor_names=tensors,
        hf_markers=markers,
        layer_types=layers,
        composition=composition,
        rank=rank,
        ops=_ops(ops or name),
        examples=_examples(example, layers),
        summary=summary,
        needs_dense_weight=needs_dense_weight,
    )


def _prompt_learning(
    name: str, spec_class: type[PrefixTuningSpec | PromptTuningSpec], summary: str
) -> KindDecl:
    """Prefix or prompt tuning: model-level, one shared ``prompt_embeddings`` table, one set of ops for both."""
    peft_type = str(spec_class.__struct_config__.tag)
    return KindDecl(
        name=name,
        peft_type=peft_type,
        spec_class=spec_class,
        layout="peftdecl.plan.kinds.prompt:LAYOUTS",
        tensor_names=(),
        hf_markers=("prompt_embeddings",),
        layer_types=(),
        composition="model",
        ops=_ops("prompt"),
        examples={"model": {"peft_type": peft_type, "task_type": "CAUSAL_LM", "num_virtual_tokens": 2}},
        summary=summary,
    )


_LORA_SPEC = {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "init_lora_weights": False}
_LORA_TENSORS = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_embedding_A", "lora_embedding_B")
_LYCORIS_LAYERS = ("linear", "conv1d", "conv2d")
_ADALORA_LAYERS = ("linear", "conv2d", "gpt2_conv1d")
_OFT_LAYERS = ("linear", "embedding", "conv2d")
_IA3_LAYERS = ("linear", "conv2d", "conv3d", "gpt2_conv1d")

LORA = _builtin(
    "lora",
    LoraSpec,
    layout="peftdecl.plan.kinds.lora:LAYOUT",
    tensors=_LORA_TENSORS,
    markers=(".lora_A.", ".lora_B.", ".lora_embedding_A"),
    # "parameter": target_parameters (torch, NumPy); an mha target goes to lora_mha (peftdecl.kinds.mha)
    layers=(*ALL_LAYERS, "parameter"),
    composition="add",
    rank=lora_rank,
    example=_LORA_SPEC,
    summary="y = W x + s · B A x: a low-rank update of the weight",
    needs_dense_weight=False,
)
DORA = _builtin(
    "dora",
    LoraSpec,
    layout="peftdecl.plan.kinds.dora:LAYOUT",
    tensors=(*_LORA_TENSORS, "lora_magnitude_vector"),
    markers=(".lora_magnitude_vector",),
    layers=ALL_LAYERS,
    composition="output",
    rank=lora_rank,
    example={**_LORA_SPEC, "use_dora": True},
    summary="W' = m · (W + s B A) / ‖W + s B A‖: LoRA with the column norm learnt apart (use_dora)",
)
ADALORA = _builtin(
    "adalora",
    AdaLoraSpec,
    layout="peftdecl.plan.kinds.adalora:LAYOUT",
    tensors=("lora_A", "lora_E", "lora_B"),
    markers=(".lora_E",),
    layers=_ADALORA_LAYERS,
    composition="add",
    rank=lora_rank,
    example={
        "peft_type": "ADALORA",
        "init_r": 3,
        "target_r": 2,
        "lora_alpha": 6,
        "total_step": 10,
        "init_lora_weights": False,
    },
    summary="y = W x + s · B (E ⊙ A x): an SVD-shaped update whose rank is pruned during training",
    needs_dense_weight=False,
)
IA3 = _builtin(
    "ia3",
    IA3Spec,
    layout="peftdecl.plan.kinds.ia3:LAYOUT",
    tensors=("ia3_l",),
    markers=(".ia3_l",),
    layers=_IA3_LAYERS,
    composition="per-layer",
    example={"peft_type": "IA3", "feedforward_modules": [], "init_ia3_weights": False},
    summary="y = l ⊙ (W x), or W (l ⊙ x) on feed-forward layers: a learnt rescaling",
    needs_dense_weight=False,
)
LOHA = _builtin(
    "loha",
    LoHaSpec,
    layout="peftdecl.plan.kinds.lycoris:LAYOUTS",
    tensors=("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    markers=(".hada_",),
    layers=_LYCORIS_LAYERS,
    composition="add",
    rank=loha_rank,
    example={"peft_type": "LOHA", "r": 3, "alpha": 6, "init_weights": False},
    summary="ΔW = s · (W1a W1b) ⊙ (W2a W2b): a Hadamard product of two low-rank factors",
)
LOKR = _builtin(
    "lokr",
    LoKrSpec,
    layout="peftdecl.plan.kinds.lycoris:LAYOUTS",
    tensors=("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    markers=(".lokr_",),
    layers=_LYCORIS_LAYERS,
    composition="add",
    rank=lokr_rank,
    example={"peft_type": "LOKR", "r": 3, "alpha": 5, "init_weights": False},
    summary="ΔW = s · W1 ⊗ W2: a Kronecker product, either factor optionally low-rank",
)
OFT = _builtin(
    "oft",
    OFTSpec,
    layout="peftdecl.plan.kinds.oft:LAYOUT",
    tensors=("oft_R.weight", "oft_embedding_R.weight"),
    markers=(".oft_R.", ".oft_embedding_R."),
    layers=_OFT_LAYERS,
    composition="per-layer",
    rank=oft_blocks,
    example={"peft_type": "OFT", "r": 0, "oft_block_size": 2, "init_weights": False},
    summary="W' = W Rᵀ with R block-diagonal orthogonal (Cayley of skew blocks); embeddings rotate the output",
)
BOFT = _builtin(
    "boft",
    BOFTSpec,
    layout="peftdecl.plan.kinds.boft:LAYOUT",
    tensors=("boft_R", "boft_s"),
    markers=(".boft_R", ".boft_s"),
    layers=("linear", "conv2d"),
    composition="input",
    rank=boft_blocks,
    example={"peft_type": "BOFT", "boft_block_size": 2, "init_weights": False},
    summary="W' = s ⊙ (W Rᵀ), R a product of butterfly-permuted block-orthogonal factors",
)
VERA = _builtin(
    "vera",
    VeraSpec,
    layout="peftdecl.plan.kinds.vera:LAYOUT",
    tensors=("vera_lambda_b", "vera_lambda_d"),
    markers=(".vera_lambda_", "vera_A"),
    layers=("linear", "gpt2_conv1d"),
    composition="add",
    rank=vera_rank,
    example={"peft_type": "VERA", "r": 4, "init_weights": False},
    summary="y = W x + λ_b ⊙ B (λ_d ⊙ A x), A and B random, frozen and shared by all layers",
    needs_dense_weight=False,
)
TRAINABLE_TOKENS = _builtin(
    "trainable_tokens",
    TrainableTokensSpec,
    layout="peftdecl.plan.kinds.trainable_tokens:LAYOUT",
    tensors=("trainable_tokens_delta", "token_adapter.trainable_tokens_delta"),
    markers=("trainable_tokens_delta",),
    layers=("embedding", "linear"),
    composition="add",
    example={"peft_type": "TRAINABLE_TOKENS", "token_indices": [0, 2], "init_weights": False},
    summary="E'[t] = d_t for the chosen tokens t: new rows of an embedding (or tied head), the rest frozen",
)
PREFIX_TUNING = _prompt_learning(
    "prefix_tuning", PrefixTuningSpec, "learnt key/value prefixes prepended to every attention layer"
)
PROMPT_TUNING = _prompt_learning(
    "prompt_tuning", PromptTuningSpec, "learnt virtual token embeddings prepended to the input"
)

BUILTIN_KINDS: tuple[KindDecl, ...] = (
    LORA,
    DORA,
    LORA_MHA,
    ADALORA,
    IA3,
    LOHA,
    LOKR,
    OFT,
    BOFT,
    VERA,
    *VARIANT_A_KINDS,
    *VARIANT_B_KINDS,
    TRAINABLE_TOKENS,
    PREFIX_TUNING,
    PROMPT_TUNING,
)
"""In HF PEFT's order (SPEC_TYPES, the schemas and the capabilities page keep it)."""
