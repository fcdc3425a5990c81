"""IA3 files both ways against the real HF PEFT: tiny Llama (explicit and default targets), GPT-2 Conv1D
(c_attn, feed-forward mlp.c_proj) and a torch module with Conv2d layers, feed-forward and not.

Tolerances (tests/peft_parity.py): merged weights relative error ≤ MERGE_TOL = 1e-6 (float32 PEFT vs the float64
reference on float32 files); per-layer outputs ≤ OUTPUT_TOL = 1e-5 (PEFT's float32 layer called on a float32
input).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import peftdecl
from tests import peft_parity as parity
from tests.hf_models import Layers, numpy_inputs, peft, peft_model, tiny_gpt2, tiny_llama, torch


def convs() -> Layers:
    """Two Conv2d layers: one scaled at its output, one (feed-forward) at its input."""
    return Layers(
        lambda: {"attn": torch.nn.Conv2d(3, 5, 3, padding=1), "ff": torch.nn.Conv2d(4, 6, 1, groups=2)}
    )


CASES = {
    "llama": (
        parity.llama_with_bias,
        dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    ),
    "llama_defaults": (tiny_llama, dict()),
    "llama_regex": (
        tiny_llama,
        dict(target_modules=r".*\.(v_proj|up_proj)", feedforward_modules=r".*up_proj"),
    ),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])),
    "gpt2_defaults": (tiny_gpt2, dict()),
    "convs": (convs, dict(target_modules=["attn", "ff"], feedforward_modules=["ff"])),
}
PROBES = {  # module -> input shape
    "model.layers.0.self_attn.k_proj": (2, 3, 64),
    "model.layers.1.self_attn.v_proj": (3, 64),
    "model.layers.0.mlp.down_proj": (3, 128),
    "model.layers.1.mlp.up_proj": (3, 64),
    "transformer.h.0.attn.c_attn": (3, 32),
    "transformer.h.1.mlp.c_proj": (3, 128),
    "attn": (2, 3, 5, 5),
    "ff": (2, 4, 3, 3),
}


def feedforward_of(wrapped) -> dict[str, bool]:
    return {
        name: layer.is_feedforward
        for name, layer in wrapped.base_model.model.named_modules()
        if isinstance(layer, peft.tuners.ia3.IA3Layer)
    }


@pytest.mark.peft
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_ia3_loads_with_peft_outputs_and_merge(case: str, tmp_path) -> None:
    make, config = CASES[case]
    # l ~ N(0, 1), left as drawn
    config = peft.IA3Config(init_ia3_weights=False, **config)
    wrapped, ours = parity.load_peft_saved(make, config, tmp_path, perturbed=False)
    assert {lp.module: lp.options["feedforward"] for lp in ours.plan().layers} == feedforward_of(wrapped)
    parity.assert_computes_like_peft(ours, wrapped, parity.probe_inputs(ours, PROBES))


@pytest.mark.peft
@pytest.mark.parametrize("case", sorted(CASES))
def test_peftdecl_saved_ia3_loads_in_peft(case: str, tmp_path) -> None:
    make, config = CASES[case]
    ours, loaded = parity.save_for_peft(
        make, {"peft_type": "IA3", "init_ia3_weights": False, **config}, tmp_path
    )

    reference = peft_model(make(), peft.IA3Config(init_ia3_weights=False, **config))
    parity.assert_saved_like_peft(tmp_path, reference)
    reference.save_pretrained(tmp_path / "theirs")
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(saved) == set(json.loads((tmp_path / "theirs" / "adapter_config.json").read_text()))
    assert saved["peft_type"] == "IA3"

    assert {lp.module: lp.options["feedforward"] for lp in ours.plan().layers} == feedforward_of(loaded)
    parity.assert_computes_like_peft(ours, loaded, parity.probe_inputs(ours, PROBES))


@pytest.mark.peft
def test_default_ia3_is_a_no_op_like_peft(tmp_path) -> None:
    wrapped = peft_model(tiny_llama(), peft.IA3Config())
    wrapped.save_pretrained(tmp_path)
    state, options = numpy_inputs(tiny_llama())
    ours = peftdecl.load_adapter(state, tmp_path, **options)
    fresh = peftdecl.attach(state, {"peft_type": "IA3"}, **options)
    assert set(ours.state_dict()) == set(fresh.state_dict())
    for key, value in fresh.state_dict().items():
        np.testing.assert_array_equal(value, ours.state_dict()[key])  # both all ones
    x = np.random.default_rng(0).normal(size=(2, 128))
    module = "model.layers.0.mlp.down_proj"
    with fresh.disable_adapters():
        base = fresh(module, x)
    np.testing.assert_array_equal(fresh(module, x), base)
