"""Four LoRA variants as execution kinds of ``peft_type`` LORA (chosen by :attr:`LoraSpec.kind` from the field that
is set): VeLoRA, KaSA, BD-LoRA and MonteCLoRA. HF PEFT runs each on ``nn.Linear`` only (KaSA and BD-LoRA refuse
GPT-2's Conv1D; VeLoRA and MonteCLoRA take it, as LoRA's linear layer).

Their layouts and ops are named as ``"module:ATTR"`` strings and imported on first use.
"""

from __future__ import annotations

from peftdecl._json import JsonObject
from peftdecl.kinds._decl import KindDecl, Shapes
from peftdecl.spec._base import SpecBase
from peftdecl.spec.lora import LoraSpec

_BACKENDS = ("numpy", "torch")
_WITH_MLX = (*_BACKENDS, "mlx")
_LORA_TENSORS = ("lora_A.weight", "lora_B.weight", "lora_B.bias")
_EXAMPLE: JsonObject = {"peft_type": "LORA", "r": 4, "lora_alpha": 6, "init_lora_weights": False}


def _rank(shapes: Shapes, spec: SpecBase) -> str | None:
    """r: the LoRA rank of the spec (a block-diagonal A has r rows too, a block-diagonal B not r columns)."""
    found = shapes.get("lora_A.weight")
    return str(found[0]) if found else None


def _variant(
    name: str,
    tensors: tuple[str, ...],
    markers: tuple[str, ...],
    layers: tuple[str, ...],
    fields: JsonObject,
    summary: str,
    needs_dense_weight: bool = False,
    backends: tuple[str, ...] = _BACKENDS,
) -> KindDecl:
    return KindDecl(
        name=name,
        peft_type="LORA",
        spec_class=LoraSpec,
        layout=f"peftdecl.plan.kinds.{name}:LAYOUT",
        tensor_names=(*_LORA_TENSORS, *tensors),
        hf_markers=markers,
        layer_types=layers,
        composition="add",
        rank=_rank,
        ops={backend: f"peftdecl_{backend}.kinds.{name}:OPS" for backend in backends},
        examples={t: {**_EXAMPLE, **fields, "target_modules": ["m"]} for t in layers},
        summary=summary,
        needs_dense_weight=needs_dense_weight,
    )


VELORA = _variant(
    "velora",
    ("lora_velora_embed",),
    (".lora_velora_embed",),
    ("linear", "gpt2_conv1d"),
    # one feature per group: the compressed A gradient is then exact, so training mode equals the reference's
    {"velora_config": {"num_groups": 1024, "init_type": "random"}},
    "LoRA whose A gradient sees each input token compressed to one number per feature group (velora_config)",
    backends=_WITH_MLX,
)
KASA = _variant(
    "kasa",
    ("lora_diag",),
    (".lora_diag",),
    ("linear",),
    {"kasa_config": {}},
    "W ← W minus its r smallest singular components; ΔW = s · B diag(d) A with d learnt (kasa_config)",
    needs_dense_weight=True,
    backends=_WITH_MLX,
)
BDLORA = _variant(
    "bdlora",
    (),
    (),
    ("linear",),
    {"use_bdlora": {"target_modules_bd_b": ["m"], "nblocks": 2}},
    "LoRA with a block-diagonal A or B on the modules use_bdlora names (sharded serving)",
    backends=_WITH_MLX,
)
MONTECLORA = _variant(
    "monteclora",
    (
        "lora_monteclora_sampler.std_prior",
        "lora_monteclora_sampler.expert_weights_prior",
        "lora_monteclora_sampler.gaussian_var_prior",
        "lora_monteclora_sampler.expert_weights",
    ),
    (".lora_monteclora_sampler.",),
    ("linear", "gpt2_conv1d"),
    # no noise and one sample: a training step then equals LoRA's exactly (the priors get zero gradients)
    {"monteclora_config": {"num_samples": 1, "sample_scaler": 0.0}},
    "LoRA whose A is perturbed by learnt Monte Carlo noise while training (monteclora_config)",
    backends=_WITH_MLX,
)

VARIANT_A_KINDS: tuple[KindDecl, ...] = (VELORA, KASA, BDLORA, MONTECLORA)
