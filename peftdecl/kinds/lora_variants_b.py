"""LoRA variants as execution kinds of ``peft_type`` LORA, chosen by :attr:`LoraSpec.kind` from a LoraConfig value
(:mod:`peftdecl.spec.lora_variants_b`): MiCA (``init_lora_weights="mica"``), aLoRA (``alora_invocation_tokens``)
and Arrow (``arrow_config``).

Layouts and ops are named as ``"module:ATTR"`` strings and imported on first use.
"""

from __future__ import annotations

from peftdecl.kinds._decl import KindDecl, Shapes
from peftdecl.spec._base import SpecBase
from peftdecl.spec.lora import LoraSpec


def lora_rank(shapes: Shapes, spec: SpecBase) -> str | None:
    """r: rows of A (lora_A.weight, or an embedding's lora_embedding_A)."""
    for key in ("lora_A.weight", "lora_embedding_A"):
        if shapes.get(key):
            return str(shapes[key][0])
    return None


_MICA_LAYERS = ("linear", "embedding", "gpt2_conv1d")

MICA = KindDecl(
    name="mica",
    peft_type="LORA",
    spec_class=LoraSpec,
    layout="peftdecl.plan.kinds.mica:LAYOUT",
    tensor_names=("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B"),
    hf_markers=(".lora_A.", ".lora_B.", ".lora_embedding_A"),
    layer_types=_MICA_LAYERS,
    composition="add",
    rank=lora_rank,
    ops={backend: f"peftdecl_{backend}.kinds.mica:OPS" for backend in ("numpy", "torch", "mlx")},
    examples={
        t: {
            "peft_type": "LORA",
            "r": 3,
            "lora_alpha": 6,
            "init_lora_weights": "mica",
            "target_modules": ["m"],
        }
        for t in _MICA_LAYERS
    },
    summary="LoRA with B the minor left singular vectors of W (frozen) and A = 0 (init_lora_weights='mica')",
    needs_dense_weight=False,
)

_ALORA_LAYERS = ("linear", "gpt2_conv1d")

ALORA = KindDecl(
    name="alora",
    peft_type="LORA",
    spec_class=LoraSpec,
    layout="peftdecl.plan.kinds.alora:LAYOUT",
    tensor_names=("lora_A.weight", "lora_B.weight", "lora_B.bias"),
    hf_markers=(".lora_A.", ".lora_B."),
    layer_types=_ALORA_LAYERS,
    composition="add",
    rank=lora_rank,
    ops={backend: f"peftdecl_{backend}.kinds.alora:OPS" for backend in ("numpy", "torch", "mlx")},
    examples={
        t: {
            "peft_type": "LORA",
            "r": 3,
            "lora_alpha": 6,
            "init_lora_weights": False,
            "alora_invocation_tokens": [1, 2],
            "target_modules": ["m"],
        }
        for t in _ALORA_LAYERS
    },
    summary="LoRA acting only from the last invocation token sequence of each row on (alora_invocation_tokens)",
    needs_dense_weight=False,
)

_ARROW_LAYERS = ("linear", "gpt2_conv1d")

ARROW = KindDecl(
    name="arrow",
    peft_type="LORA",
    spec_class=LoraSpec,
    layout="peftdecl.plan.kinds.arrow:LAYOUT",
    tensor_names=(
        "lora_A.weight",
        "lora_B.weight",
        "arrow_experts_A",
        "arrow_experts_B",
        "arrow_experts_scaling",
    ),
    hf_markers=(".lora_A.", ".lora_B."),
    layer_types=_ARROW_LAYERS,
    composition="add",
    rank=lora_rank,
    ops={backend: f"peftdecl_{backend}.kinds.arrow:OPS" for backend in ("numpy", "torch", "mlx")},
    examples={
        t: {
            "peft_type": "LORA",
            "r": 2,
            "arrow_config": {
                "top_k": 2,
                "router_temperature": 0.5,
                "task_adapter_names": ["task_0", "task_1", "task_2"],
            },
            "target_modules": ["m"],
        }
        for t in _ARROW_LAYERS
    },
    summary="Arrow: each token mixes the top-k of a library of LoRA experts by prototype similarity (arrow_config)",
    needs_dense_weight=False,
)

VARIANT_B_KINDS: tuple[KindDecl, ...] = (MICA, ALORA, ARROW)
"""After LoRA's other kinds, in the order of PEFT's LoraConfig fields."""
