"""LoRA (and DoRA through ``use_dora``): y = W x + s · B A dropout(x), s = alpha / r (alpha / √r with rsLoRA)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, ClassVar, Literal

from msgspec import Meta

from peftdecl._json import JsonObject
from peftdecl.layer_replication import layer_map_problems
from peftdecl.spec._base import (
    Alpha,
    AlphaPattern,
    ExcludeModules,
    LayersPattern,
    LayersToTransform,
    PositiveInt,
    Probability,
    Rank,
    RankPattern,
    SpecBase,
    TargetModules,
    bias_help,
    targeting_problems,
)
from peftdecl.spec.data_inits import EvaConfig, LoraGAConfig
from peftdecl.spec.loftq_corda import CordaConfig, loftq_config_problems
from peftdecl.spec.lora_variants import (
    BdLoraConfig,
    KasaConfig,
    MontecloraConfig,
    VeloraConfig,
    variant_kind,
    variant_problems,
)
from peftdecl.spec.lora_variants_b import (
    QALORA_HELP,
    VARIANT_B_ACCEPTED,
    ArrowConfig,
    variant_b_kind,
    variant_b_problems,
)
from peftdecl.spec.target_parameters import target_parameter_problems
from peftdecl.spec.trainable_tokens import TrainableTokenIndices, trainable_token_problems

# init_lora_weights values HF PEFT knows; "pissa_niter_K" (K a whole number) is supported too. PiSSA and OLoRA
# replace the base weight by its residual (peftdecl.lora_init); the data-driven ones are not implemented.
LORA_INITS_SUPPORTED = (
    *(True, False, "gaussian", "pissa", "olora", "orthogonal", "eva", "lora_ga", "mica"),
    *("loftq", "corda"),
)
LORA_INITS_KNOWN = ("eva", "olora", "pissa", "corda", "loftq", "lora_ga", "orthogonal", "mica")
_SUPPORTED_TEXT = (
    "true, false, 'gaussian', 'pissa', 'pissa_niter_K', 'olora', 'orthogonal', 'eva', 'lora_ga', 'mica', 'loftq', "
    "'corda'"
)


def is_pissa_niter(init: object) -> bool:
    """``init`` is "pissa_niter_K" with K a whole number (the subspace iterations of the randomised SVD)."""
    return isinstance(init, str) and re.fullmatch(r"pissa_niter_[0-9]+", init) is not None


class LowRankSpec(SpecBase, frozen=True):
    """The fields LoRA and AdaLoRA share (not a kind itself: it has no ``peft_type``).

    ``rank_pattern`` means different things in the two kinds (LoRA: a rank per module pattern; AdaLoRA: the
    kept-rank mask of each layer, written by training), so each kind narrows its type; declaring it here keeps
    its place among the fields (and so in the schemas and saved configs) the same in both.
    """

    r: Annotated[Rank, Meta(description="Rank of the update.")] = 8
    target_modules: TargetModules = None
    exclude_modules: ExcludeModules = None
    lora_alpha: Annotated[Alpha, Meta(description="Scale numerator: s = lora_alpha / r.")] = 8
    lora_dropout: Annotated[
        Probability, Meta(description="Dropout on the adapter's input, training only.")
    ] = 0.0
    fan_in_fan_out: Annotated[
        bool, Meta(description="The base weight is stored [in, out] (GPT-2 Conv1D); set automatically there.")
    ] = False
    bias: Annotated[Literal["none", "all", "lora_only"], Meta(description=bias_help("lora_only"))] = "none"
    use_rslora: Annotated[bool, Meta(description="Rank-stabilised scale s = lora_alpha / sqrt(r).")] = False
    init_lora_weights: Annotated[
        bool | str,
        Meta(
            description="true: A Kaiming-uniform, B zero (a no-op); 'gaussian': A ~ N(0, 1/r); false: both random; "
            "'pissa' / 'pissa_niter_K': A, B from the (randomised, K iterations) SVD of W; 'olora': from its QR "
            "(both replace W by W - s·BA); 'orthogonal': random A, B with BA = 0 (even r); 'eva': B = 0, A from the "
            "SVD of layer inputs (initialize_lora_eva_weights); 'lora_ga': from the SVD of gradients "
            "(preprocess_loraga), W replaced by W - s·BA."
            " 'loftq': W becomes its NF4/int8 round trip Q, B A the SVD of W - Q (loftq_config); 'corda': from the SVD "
            "of W times its input covariance (preprocess_corda), W replaced by W - s·BA."
        ),
    ] = True
    layers_to_transform: LayersToTransform = None
    layers_pattern: LayersPattern = None
    rank_pattern: Mapping[str, int | tuple[bool, ...]] | None = None
    alpha_pattern: AlphaPattern = {}
    use_dora: Annotated[
        bool,
        Meta(description="Weight-decomposed LoRA: a learned magnitude per output row times the direction."),
    ] = False
    lora_bias: Annotated[bool, Meta(description="Give lora_B a trainable bias.")] = False
    # HF PEFT fields peftdecl does not implement; accepted only at their default.
    megatron_config: JsonObject | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: TrainableTokenIndices = None
    loftq_config: Annotated[
        JsonObject,
        Meta(description="With init_lora_weights 'loftq': {loftq_bits: 4 or 8, loftq_iter: >= 1}."),
    ] = {}
    eva_config: Annotated[
        EvaConfig | None,
        Meta(
            description="EVA (init 'eva'): rho, tau, use_label_mask, label_mask_value, whiten, adjust_scaling_factors."
        ),
    ] = None
    corda_config: CordaConfig | None = None
    lora_ga_config: Annotated[
        LoraGAConfig | None, Meta(description="LoRA-GA (init 'lora_ga'): direction, scale, stable_gamma.")
    ] = None
    velora_config: VeloraConfig | None = None
    alora_invocation_tokens: tuple[int, ...] | None = None
    use_qalora: Annotated[bool, Meta(description=QALORA_HELP)] = False
    qalora_group_size: Annotated[
        PositiveInt, Meta(description="QA-LoRA's pooling group (see use_qalora).")
    ] = 16
    monteclora_config: MontecloraConfig | None = None
    layer_replication: Annotated[
        tuple[tuple[int, int], ...] | None,
        Meta(
            description="Rebuild the decoder's layer list from [start, end) ranges of it, copies sharing base weights, "
            "each with its own adapter (e.g. [[0, 4], [2, 5]]); torch backend, first adapter only, no merge."
        ),
    ] = None
    runtime_config: JsonObject | None = None
    target_parameters: tuple[str, ...] | None = None
    use_bdlora: BdLoraConfig | None = None
    arrow_config: ArrowConfig | None = None
    kasa_config: KasaConfig | None = None
    ensure_weight_tying: Annotated[
        bool,
        Meta(
            description="On tied embeddings: the output head follows the embeddings' trainable tokens, their "
            "modules_to_save copy or their LoRA (torch); differing token ids on tied layers are refused."
        ),
    ] = False

    UNSUPPORTED: ClassVar[dict[str, object]] = {
        "megatron_config": None,
        "loftq_config": {},
        "corda_config": None,
        "alora_invocation_tokens": None,
        "use_qalora": False,
        "target_parameters": None,
        "arrow_config": None,
    }

    def cross_field_problems(self) -> list[tuple[str, str]]:
        found = targeting_problems(self)
        init = self.init_lora_weights
        if init not in LORA_INITS_SUPPORTED and not is_pissa_niter(init):
            name = str(init)
            known = name in LORA_INITS_KNOWN or name.startswith("pissa_niter_")
            found.append(
                (
                    "$.init_lora_weights",
                    f"{name!r} is not supported by peftdecl (supported: {_SUPPORTED_TEXT})"
                    if known
                    else f"unknown initialisation {name!r}; expected one of {_SUPPORTED_TEXT}",
                )
            )
        if self.lora_bias and self.use_dora:
            found.append(("$.lora_bias", "cannot be combined with use_dora"))
        if self.lora_bias and init not in (True, False):
            found.append(("$.lora_bias", "needs init_lora_weights to be true or false"))
        found.extend(trainable_token_problems(self))
        found.extend(layer_map_problems(self))
        found.extend(loftq_config_problems(init, self.loftq_config))
        found.extend(variant_problems(self))
        found.extend(variant_b_problems(self))
        found.extend(target_parameter_problems(self))
        return found


class LoraSpec(LowRankSpec, tag="LORA", frozen=True):
    """Low-rank adaptation: ΔW = s · B A with A ∈ R^{r×in}, B ∈ R^{out×r}."""

    rank_pattern: RankPattern = {}

    # LoftQ and CorDA are LoRA's only (PEFT's AdaLoRA refuses LoftQ)
    UNSUPPORTED: ClassVar[dict[str, object]] = {
        k: v
        for k, v in LowRankSpec.UNSUPPORTED.items()
        if k not in ("loftq_config", "corda_config", "target_parameters", *VARIANT_B_ACCEPTED)
    }

    @property
    def kind(self) -> str:
        return variant_kind(self) or variant_b_kind(self) or ("dora" if self.use_dora else "lora")
