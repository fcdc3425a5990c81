"""Test bodies the NumPy reference's kinds share, parametrised over kind and layer type (the layers and default
specs are in tests/layer_cases.py): merge == forward and unmerge restores the weight, default initialisation
is a no-op, dropout is seeded and applies only in training.

Tolerances: float64 internal consistency, relative, per kind in MERGE_TOL and NO_OP_TOL below.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from peftdecl_numpy.kinds.dora import OPS as DORA
from peftdecl_numpy.layers import BaseLayer
from tests.conftest import rel_err
from tests.layer_cases import (
    ADALORA_MASK,
    BOFT_VARIANTS,
    KINDS,
    LOKR_VARIANTS,
    LORA_LAYERS,
    OFT_VARIANTS,
    base_output,
    build,
    layer_params,
)

# kind -> (merged forward vs adapter forward, unmerged weight vs the original), relative; float64: merge is
# exact up to rounding. AdaLoRA, OFT and BOFT keep the 1e-10 float64 bound of their own modules (a Neumann R is
# not orthogonal: unmerge inverts it).
MERGE_TOL = {
    "lora": (1e-12, 1e-12),
    "dora": (1e-12, 1e-12),
    "vera": (1e-12, 1e-12),
    "loha": (1e-12, 1e-12),
    "lokr": (1e-12, 1e-12),
    "adalora": (1e-10, 1e-12),
    "oft": (1e-10, 1e-10),
    "boft": (1e-10, 1e-10),
}
CHANGED = 1e-3  # an adapter output at least this far (relative) from the base output really changes it
# kind -> bound on the default-initialised output vs the base output (relative): 0 is bit for bit; OFT and BOFT
# keep the 1e-14 of their own modules
NO_OP_TOL = {"lora": 0.0, "dora": 0.0, "oft": 1e-14, "boft": 1e-14}

# lora_bias on every layer but the embedding (PEFT has none there) and the 1×1 convolution
LORA_BIAS = {layer: layer not in ("embedding", "conv2d_1x1") for layer in LORA_LAYERS}
MERGE_VARIANTS = {  # the spec variants each kind's merge is tested with
    "adalora": {"": {}, "mask": ADALORA_MASK},
    "loha": {"plain": {}, "effective": {"use_effective_conv2d": True}},
    "lokr": LOKR_VARIANTS,
    "boft": {name: BOFT_VARIANTS[name] for name in ("one_factor", "three_factors", "block_num")},
    "oft": {name: OFT_VARIANTS[name] for name in ("neumann", "exact", "block_share")},
}


def cases(kind: str, variants: dict[str, dict] | None = None, **per_layer: dict[str, Any]) -> list:
    """pytest params (kind, layer, spec fields): every layer of ``kind``'s table × every named variant of the
    spec; ``per_layer`` adds fields whose value depends on the layer (field -> {layer: value})."""
    params = []
    for layer in sorted(KINDS[kind].layers):
        for name, fields in (variants or {"": {}}).items():
            extra = {field: values[layer] for field, values in per_layer.items()}
            case_id = "-".join(filter(None, [kind, layer, name]))
            params.append(pytest.param(kind, layer, {**fields, **extra}, id=case_id))
    return params


def dora_merged_weight(model) -> np.ndarray:
    """W + ΔW with ΔW from the DoRA ops' own delta_weight (taken before merging)."""
    before = model.base_weight("m")
    lp = model.plan().layer("m")
    return before + DORA.delta_weight(lp, BaseLayer(lp.layer, before), layer_params(model))


MERGED_WEIGHT = {"dora": dora_merged_weight}  # kinds whose merged weight is also checked against a formula


@pytest.mark.parametrize(
    ("kind", "layer", "fields"),
    [
        *cases("lora", lora_bias=LORA_BIAS),
        *cases("dora"),
        *cases("vera"),
        *[param for kind, variants in MERGE_VARIANTS.items() for param in cases(kind, variants)],
    ],
)
def test_merged_forward_equals_adapter_forward_and_unmerge_restores(
    kind: str, layer: str, fields: dict
) -> None:
    merge_tol, unmerge_tol = MERGE_TOL[kind]
    model, x = build(kind, layer, **fields)
    before = model.base_weight("m")
    adapted = model("m", x)
    assert rel_err(adapted, base_output(model, x)) > CHANGED
    expected_weight = MERGED_WEIGHT[kind](model) if kind in MERGED_WEIGHT else None
    model.merge()
    assert rel_err(model("m", x), adapted) <= merge_tol
    if expected_weight is not None:
        assert rel_err(model.base_weight("m"), expected_weight) <= merge_tol
    model.unmerge()
    assert rel_err(model.base_weight("m"), before) <= unmerge_tol
    base_out = base_output(model, x)
    assert rel_err(adapted, base_out) > CHANGED and rel_err(model("m", x), base_out) > CHANGED


@pytest.mark.parametrize(
    ("kind", "layer", "fields"),
    [
        pytest.param("lora", "linear", {"init_lora_weights": True}, id="lora-linear"),
        *cases("dora", {"": {"init_lora_weights": True}}),
        *cases("boft", {"": {"init_weights": True, "boft_block_size": 2, "boft_n_butterfly_factor": 2}}),
        # also for the 3×3 convolution, where HF PEFT's fold-based forward is not a no-op (see test_hf_oft)
        *cases("oft", {"": {"init_weights": True}}),
    ],
)
def test_default_init_is_a_no_op(kind: str, layer: str, fields: dict) -> None:
    model, x = build(kind, layer, **fields)
    if NO_OP_TOL[kind] == 0.0:
        np.testing.assert_array_equal(model("m", x), base_output(model, x))
    else:
        assert rel_err(model("m", x), base_output(model, x)) <= NO_OP_TOL[kind]


@pytest.mark.parametrize(
    ("kind", "field"), [("lora", "lora_dropout"), ("adalora", "lora_dropout"), ("vera", "vera_dropout")]
)
def test_dropout_is_seeded_and_only_in_training(kind: str, field: str) -> None:
    model, x = build(kind, "linear", **{field: 0.5})
    eval_out = model("m", x)
    model.train()
    model.engine.rng = np.random.default_rng(5)
    first = model("m", x)
    model.engine.rng = np.random.default_rng(5)
    np.testing.assert_array_equal(model("m", x), first)
    assert rel_err(first, eval_out) > 1e-6  # half the inputs dropped: far from the eval output
    model.eval()
    np.testing.assert_array_equal(model("m", x), eval_out)
