"""LoHa and LoKr against the real HF PEFT, both ways, on tiny Llama and on a small torch conv model.

Tolerances (tests/peft_parity.py): merged weights relative error ≤ MERGE_TOL = 1e-6 (float32 files and PEFT's
float32 merge vs the float64 reference); per-layer outputs ≤ OUTPUT_TOL = 1e-5 (PEFT's float32 layer on a
float32 input vs the float64 reference).
Initialisation is compared rule by rule: the same tensors are zero, and PEFT's random tensors lie within the
Kaiming bound our plan declares for them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peftdecl
from peftdecl.plan.kinds.lycoris import factorization
from tests.conftest import rel_err
from tests.hf_models import Layers, numpy_inputs, peft, peft_model, tiny_llama, torch
from tests.peft_parity import (
    MERGE_TOL,
    assert_computes_like_peft,
    assert_config_like_peft,
    assert_saved_like_peft,
    load_peft_saved,
    peft_layer_output,
    probe_inputs,
    save_for_peft,
)

CONFIGS = {"LOHA": peft.LoHaConfig, "LOKR": peft.LoKrConfig}
LLAMA_CASES = {
    "loha": ("LOHA", dict(r=8, alpha=16, target_modules=["q_proj", "v_proj"])),
    "loha_patterns": (
        "LOHA",
        dict(
            r=4,
            alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj"],
            rank_pattern={"k_proj": 2},
            alpha_pattern={"model.layers.0.self_attn.q_proj": 3},
        ),
    ),
    "lokr_full": ("LOKR", dict(r=8, alpha=16, target_modules=["q_proj", "v_proj"])),
    "lokr_decompose_both": (
        "LOKR",
        dict(r=2, alpha=16, decompose_both=True, target_modules=["q_proj", "v_proj"]),
    ),
    "lokr_w2_factored": ("LOKR", dict(r=2, alpha=3, target_modules=["q_proj", "v_proj", "down_proj"])),
    "lokr_factor_patterns": (
        "LOKR",
        dict(
            r=1,
            alpha=2,
            decompose_both=True,
            decompose_factor=4,
            target_modules=["q_proj", "o_proj"],
            rank_pattern={"o_proj": 8},
            alpha_pattern={"o_proj": 5},
        ),
    ),
}
LLAMA_PROBES = {"model.layers.0.self_attn.q_proj": (3, 64), "model.layers.1.self_attn.v_proj": (3, 64)}


def conv_net() -> Layers:
    """Conv2d (strided, grouped + dilated, 1x1), Conv1d and Linear layers LyCORIS factors differently."""
    return Layers(
        lambda: {
            "c2": torch.nn.Conv2d(4, 6, 3, padding=1, stride=2),
            "c2g": torch.nn.Conv2d(4, 6, (3, 2), groups=2, dilation=2, bias=False),
            "p1": torch.nn.Conv2d(4, 8, 1),
            "c1": torch.nn.Conv1d(6, 4, 3, padding=1),
            "lin": torch.nn.Linear(8, 12),
        }
    )


CONV_TARGETS = ["c2", "c2g", "p1", "c1", "lin"]
CONV_PROBES = {"c2": (2, 4, 7, 7), "c2g": (2, 4, 7, 6), "p1": (2, 4, 3, 3), "c1": (2, 6, 9), "lin": (3, 8)}
CONV_CASES = {
    "loha": ("LOHA", dict(r=3, alpha=5)),
    "loha_effective": ("LOHA", dict(r=3, alpha=5, use_effective_conv2d=True)),
    "lokr_full": ("LOKR", dict(r=8, alpha=5)),  # Conv1d full lokr_w2 takes PEFT's 2-d ⊗ 3-d kron path
    "lokr_w2_factored": ("LOKR", dict(r=1, alpha=2)),
    # PEFT cannot run a Conv1d LoKr whose w2 is a CP rebuild (test_lokr_conv1d_cp_...): c1 is left out
    "lokr_effective": (
        "LOKR",
        dict(r=1, alpha=2, use_effective_conv2d=True, target_modules=CONV_TARGETS[:3]),
    ),
    "lokr_decompose_both": (
        "LOKR",
        dict(r=1, alpha=3, decompose_both=True, use_effective_conv2d=True, target_modules=CONV_TARGETS[:3]),
    ),
}
CASES = {
    **{
        f"llama-{k}": (tiny_llama, peft_type, cfg, LLAMA_PROBES)
        for k, (peft_type, cfg) in LLAMA_CASES.items()
    },
    **{
        f"conv-{k}": (conv_net, peft_type, {"target_modules": CONV_TARGETS, **cfg}, CONV_PROBES)
        for k, (peft_type, cfg) in CONV_CASES.items()
    },
}


def peft_config(peft_type: str, fields: dict, **overrides):
    return CONFIGS[peft_type](**{**fields, **overrides})


@pytest.mark.peft
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_adapter_loads_and_computes_like_peft(case: str, tmp_path) -> None:
    make_base, peft_type, fields, probes = CASES[case]
    wrapped, ours = load_peft_saved(make_base, peft_config(peft_type, fields, init_weights=False), tmp_path)
    assert_computes_like_peft(ours, wrapped, probe_inputs(ours, probes))


@pytest.mark.peft
@pytest.mark.parametrize("case", sorted(CASES))
def test_peftdecl_saved_adapter_loads_in_peft(case: str, tmp_path) -> None:
    make_base, peft_type, fields, probes = CASES[case]
    ours, loaded = save_for_peft(
        make_base, {"peft_type": peft_type, **fields, "init_weights": False}, tmp_path
    )
    reference = peft_model(make_base(), peft_config(peft_type, fields, init_weights=False))
    assert_saved_like_peft(tmp_path, reference)
    assert_computes_like_peft(ours, loaded, probe_inputs(ours, probes))


@pytest.mark.peft
def test_lokr_conv1d_cp_factor_matches_peft_building_blocks(tmp_path) -> None:
    """PEFT 0.21.2 creates and saves lokr_t2 for a Conv1d with use_effective_conv2d, but its forward and merge
    raise in torch.kron (the CP rebuild's [k, n, ks, 1] result has a stride torch.kron cannot view). The file
    still loads here, and ΔW equals PEFT's own pieces composed as its get_delta_weight intends."""
    from peft.tuners.lokr.layer import make_weight_cp

    fields = dict(r=1, alpha=3, decompose_both=True, use_effective_conv2d=True, target_modules=["c1"])
    wrapped, ours = load_peft_saved(conv_net, peft.LoKrConfig(init_weights=False, **fields), tmp_path)
    layer = wrapped.base_model.model.c1
    with torch.no_grad():
        w1 = (
            layer.lokr_w1["default"]
            if "default" in layer.lokr_w1
            else layer.lokr_w1_a["default"] @ layer.lokr_w1_b["default"]
        )
        w2 = make_weight_cp(layer.lokr_t2["default"], layer.lokr_w2_a["default"], layer.lokr_w2_b["default"])
        w2 = torch.empty(w2.shape).copy_(
            w2
        )  # the same numbers with standard strides, which torch.kron accepts
        expected = (torch.kron(w1[:, :, None, None], w2) * layer.scaling["default"]).reshape(
            layer.weight.shape
        )

    assert "lokr_t2" in {p.name for p in ours.plan().layer("c1").params}
    ours.save(tmp_path / "ours")
    assert_saved_like_peft(tmp_path / "ours", wrapped)
    merged = ours.merge_and_unload()["c1.weight"]
    assert rel_err(merged - numpy_inputs(conv_net())[0]["c1.weight"], expected.double().numpy()) <= MERGE_TOL


def _kaiming_bound(fan_in: int) -> float:
    return math.sqrt(6.0 / ((1.0 + 5.0) * fan_in))  # torch's kaiming_uniform_ with a = √5


# init_weights="lycoris" exists for LoKr only
INIT_CASES = [
    (c, i) for c in sorted(CASES) for i in (True, False, "lycoris") if i != "lycoris" or CASES[c][1] == "LOKR"
]


@pytest.mark.peft
@pytest.mark.parametrize(("case", "init"), INIT_CASES)
def test_initialisation_follows_peft_rule_by_rule(case: str, init, tmp_path) -> None:
    make_base, peft_type, fields, probes = CASES[case]
    wrapped = peft_model(make_base(), peft_config(peft_type, fields, init_weights=init))
    theirs = {
        k.removeprefix("base_model.model."): v.double().numpy()
        for k, v in peft.get_peft_model_state_dict(wrapped).items()
    }
    state, options = numpy_inputs(make_base())
    ours = peftdecl.attach(state, {"peft_type": peft_type, **fields, "init_weights": init}, seed=5, **options)
    specs = ours.plan().param_specs()
    assert set(specs) == set(theirs)
    mine = ours.state_dict()
    for key, spec in specs.items():
        assert spec.shape == theirs[key].shape, key
        if spec.init.rule == "zeros":
            assert not np.any(theirs[key]), key
            continue
        assert spec.init.rule == "kaiming_uniform" and spec.init.arg("a") == math.sqrt(5), key
        bound = _kaiming_bound(spec.init.arg("fan_in"))
        for values in (theirs[key], mine[key]):
            assert np.abs(values).max() <= bound * (1 + 1e-6), key
            if values.size >= 32:  # P(max < bound/2) = 2^-size: PEFT really draws at this bound
                assert np.abs(values).max() >= bound / 2, key
    # a fresh adapter is a no-op exactly where PEFT's is
    inputs = probe_inputs(ours, probes)
    peft_out = {m: peft_layer_output(wrapped, m, x) for m, x in inputs.items()}
    with wrapped.disable_adapter():
        peft_base = {m: peft_layer_output(wrapped, m, x) for m, x in inputs.items()}
    with ours.disable_adapters():
        our_base = {m: ours(m, x) for m, x in inputs.items()}
    for module, x in inputs.items():
        peft_noop = rel_err(peft_out[module], peft_base[module]) <= 1e-7
        our_noop = rel_err(ours(module, x), our_base[module]) == 0.0
        assert peft_noop == our_noop == (init is not False), module


@pytest.mark.peft
@pytest.mark.parametrize("peft_type", sorted(CONFIGS))
def test_saved_config_matches_peft_and_load_spec_accepts_peft_config(peft_type: str, tmp_path) -> None:
    fields = dict(
        r=4, alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2}, module_dropout=0.1
    )
    if peft_type == "LOKR":
        fields.update(decompose_both=True, init_weights="lycoris", rank_dropout_scale=True)
    peft_model(tiny_llama(), peft_config(peft_type, fields)).save_pretrained(tmp_path / "theirs")
    spec = peftdecl.load_spec(tmp_path / "theirs" / "adapter_config.json")
    assert spec.peft_type == peft_type and spec.kind == peft_type.lower()
    state, options = numpy_inputs(tiny_llama())
    peftdecl.attach(state, spec, **options).save(tmp_path / "ours")
    assert_config_like_peft(tmp_path / "ours", tmp_path / "theirs")  # peft_version included


@settings(max_examples=80, deadline=None)
@given(dimension=st.integers(1, 600), factor=st.integers(-3, 40))
def test_factorization_matches_peft(dimension: int, factor: int) -> None:
    from peft.tuners.lokr.layer import factorization as peft_factorization

    assert factorization(dimension, factor) == peft_factorization(dimension, factor)
