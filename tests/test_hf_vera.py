"""VeRA files both ways against the real HF PEFT on tiny Llama and GPT-2, shared projections included.

Tolerances (tests/peft_parity.py): merged weights relative error ≤ MERGE_TOL = 1e-6 (float32 files; PEFT merges
in float32, the reference in float64); one layer's output ≤ OUTPUT_TOL = 1e-5 (PEFT's float32 forward vs the
float64 reference). Projections regenerated from the PRNG key are compared bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

import peftdecl
from peftdecl.errors import AdapterFileError
from peftdecl.init import init_tensor
from peftdecl.plan import LayerInfo, LayerPlan
from peftdecl.plan.kinds import vera as vera_layout
from peftdecl_numpy.torch_bridge import vera_projections
from tests.hf_models import numpy_inputs, peft, peft_model, perturb, tiny_gpt2, tiny_llama, torch
from tests.peft_parity import (
    assert_computes_like_peft,
    assert_config_like_peft,
    assert_layers_like_peft,
    assert_saved_like_peft,
    load_peft_saved,
    save_for_peft,
)

LLAMA = dict(r=16, target_modules=["q_proj", "v_proj"])
LLAMA_LAYERS = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
GPT2 = dict(r=4, target_modules=["c_attn", "c_proj"])  # 32→96, 32→32 and 128→32: projections cut three ways
GPT2_LAYERS = ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.h.0.mlp.c_proj"]

pytestmark = pytest.mark.peft


def layer_inputs(wrapped, modules: list[str]) -> dict[str, np.ndarray]:
    """3 random rows as wide as each module's layer."""
    rng = np.random.default_rng(0)
    base = wrapped.get_base_model()
    return {m: rng.normal(size=(3, base.get_submodule(m).in_features)) for m in modules}


def bits_equal_or_one_ulp(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Bit-exact where torch's uniform_ kernel uses a fused multiply-add (AVX2, AVX-512); torch's non-FMA
    DEFAULT kernel rounds twice and may differ by one float32 ulp."""
    ours32, theirs32 = ours.astype(np.float32), theirs.astype(np.float32)
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        np.testing.assert_array_equal(ours32, theirs32)
    else:
        assert np.max(np.abs(ours32 - theirs32) / np.spacing(np.abs(theirs32))) <= 1


@pytest.mark.parametrize(
    ("base", "config", "modules"), [(tiny_llama, LLAMA, LLAMA_LAYERS), (tiny_gpt2, GPT2, GPT2_LAYERS)]
)
def test_peft_saved_vera_loads_and_computes_like_peft(base, config, modules, tmp_path) -> None:
    wrapped, ours = load_peft_saved(base, peft.VeraConfig(init_weights=False, **config), tmp_path)
    assert_computes_like_peft(ours, wrapped, layer_inputs(wrapped, modules))


@pytest.mark.parametrize(
    ("base", "config", "modules"), [(tiny_llama, LLAMA, LLAMA_LAYERS), (tiny_gpt2, GPT2, GPT2_LAYERS)]
)
@pytest.mark.parametrize("save_projection", [True, False])
def test_peftdecl_saved_vera_loads_in_peft(base, config, modules, save_projection, tmp_path) -> None:
    spec = {"peft_type": "VERA", "init_weights": False, "save_projection": save_projection, **config}
    ours, loaded = save_for_peft(base, spec, tmp_path)
    reference = peft_model(
        base(), peft.VeraConfig(init_weights=False, save_projection=save_projection, **config)
    )
    assert_saved_like_peft(tmp_path, reference)
    for name in ("vera_A", "vera_B"):
        bits_equal_or_one_ulp(
            ours.state_dict()[name], getattr(reference.base_model, name)["default"].double().numpy()
        )
    assert_computes_like_peft(ours, loaded, layer_inputs(loaded, modules))


def test_saved_config_matches_peft_fields(tmp_path) -> None:
    state, options = numpy_inputs(tiny_gpt2())
    peftdecl.attach(state, {"peft_type": "VERA", **GPT2}, **options).save(tmp_path / "ours")
    peft_model(tiny_gpt2(), peft.VeraConfig(**GPT2)).save_pretrained(tmp_path / "theirs")
    _, theirs = assert_config_like_peft(tmp_path / "ours", tmp_path / "theirs", ignore=("peft_version",))
    assert theirs["fan_in_fan_out"] is True  # PEFT rewrites it for GPT-2's Conv1D


def test_peft_file_without_projections_is_regenerated_bit_exactly(tmp_path) -> None:
    config = peft.VeraConfig(init_weights=False, save_projection=False, **LLAMA)
    wrapped, ours = load_peft_saved(tiny_llama, config, tmp_path)  # regenerated through torch, as PEFT does
    assert "base_model.vera_A" not in peft.utils.load_peft_weights(str(tmp_path))
    for name in ("vera_A", "vera_B"):
        expected = getattr(wrapped.base_model, name)["default"].double().numpy()
        np.testing.assert_array_equal(ours.state_dict()[name], expected)
    assert_layers_like_peft(ours, wrapped, layer_inputs(wrapped, LLAMA_LAYERS))


def test_peft_file_without_projections_is_refused_when_nothing_can_regenerate_them(
    tmp_path, monkeypatch
) -> None:
    wrapped = peft_model(tiny_llama(), peft.VeraConfig(save_projection=False, projection_prng_key=5, **LLAMA))
    wrapped.save_pretrained(tmp_path)
    monkeypatch.setattr(vera_layout, "_PROJECTION_SOURCES", [])  # as on a machine without torch
    state, options = numpy_inputs(tiny_llama())
    with pytest.raises(
        AdapterFileError, match=r"adapter_model\.safetensors: .*manual_seed\(5\).*needs torch"
    ):
        peftdecl.load_adapter(state, tmp_path, **options)


def test_later_peft_adapter_carries_the_first_adapters_projections(tmp_path) -> None:
    wrapped = peft_model(tiny_llama(), peft.VeraConfig(init_weights=False, **LLAMA))
    # same r (PEFT's forward does not cut a larger first-adapter r: a smaller r fails in vera/layer.py:285),
    # narrower targets: the file holds the first adapter's [64, 16] vera_B where this adapter needs [32, 16]
    wrapped.add_adapter("other", peft.VeraConfig(r=16, target_modules=["v_proj"], init_weights=False))
    perturb(wrapped)
    wrapped.save_pretrained(tmp_path)
    assert peft.utils.load_peft_weights(str(tmp_path / "other"))["base_model.vera_B"].shape == (64, 16)
    state, options = numpy_inputs(tiny_llama())
    ours = peftdecl.load_adapter(state, tmp_path, **options)
    ours.load_adapter(tmp_path, "other")
    assert ours.state_dict("other")["vera_B"].shape == (32, 16)  # cut to the adapter's own widest layer
    ours.set_adapter("other")
    wrapped.set_adapter("other")
    assert_layers_like_peft(
        ours,
        wrapped,
        layer_inputs(wrapped, ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]),
    )


def test_peft_written_config_is_a_valid_spec(tmp_path) -> None:
    peft_model(tiny_llama(), peft.VeraConfig(**LLAMA)).save_pretrained(tmp_path)
    spec = peftdecl.load_spec(tmp_path / "adapter_config.json")
    assert (spec.kind, spec.r, set(spec.target_modules)) == ("vera", 16, {"q_proj", "v_proj"})


@pytest.mark.parametrize(
    ("key", "r", "max_in", "max_out"),
    [(0, 16, 64, 64), (7, 3, 129, 5), (-3, 8, 10, 300), (2**33 + 1, 1, 1, 1)],
)
def test_numpy_replay_of_torchs_generator(key: int, r: int, max_in: int, max_out: int) -> None:
    spec = peftdecl.load_spec({"peft_type": "VERA", "r": r, "projection_prng_key": key})
    layer = LayerPlan(module="m", layer=LayerInfo("linear", max_in, max_out), kind="vera", params=())
    theirs = vera_projections(key, r, max_in, max_out)
    assert theirs is not None
    for planned, expected in zip(vera_layout.build_vera_shared(spec, [layer], None), theirs, strict=True):
        bits_equal_or_one_ulp(init_tensor(planned.init, planned.shape, np.random.default_rng(0)), expected)


@pytest.mark.parametrize("field", ["projection_prng_key", "save_projection"])
def test_a_second_vera_adapter_must_share_the_first_ones_projections(field: str) -> None:
    changed = {"projection_prng_key": 1, "save_projection": False}[field]
    wrapped = peft_model(tiny_llama(), peft.VeraConfig(**LLAMA))
    with pytest.raises(ValueError):  # PEFT refuses it too
        wrapped.add_adapter("other", peft.VeraConfig(**LLAMA, **{field: changed}))
    state, options = numpy_inputs(tiny_llama())
    ours = peftdecl.attach(state, {"peft_type": "VERA", **LLAMA}, backend="numpy", **options)
    with pytest.raises(peftdecl.PeftdeclError, match=rf"{field}: .*first VeRA adapter's \('default' has"):
        ours.add_adapter("other", {"peft_type": "VERA", **LLAMA, field: changed})
    assert list(ours.adapters) == ["default"]  # nothing half-added
    ours.add_adapter("same", {"peft_type": "VERA", **LLAMA})  # the same key and setting are fine


def test_a_later_vera_adapter_uses_the_first_ones_projections_as_peft_does(tmp_path) -> None:
    # without saved projections a later adapter's A and B can only come from the first's, cut to its layers (PEFT
    # shares them): here 32→32 layers against the first's 128 inputs and 96 outputs, so a fresh draw would differ.
    # (A later adapter of smaller r is not compared: PEFT 0.21.2's forward fails on it with a shape error.)
    first = dict(r=4, target_modules=["c_attn", "c_proj"], save_projection=False, init_weights=False)
    second = dict(r=4, target_modules=r".*\.attn\.c_proj", save_projection=False, init_weights=False)
    wrapped = peft_model(tiny_gpt2(), peft.VeraConfig(**first))
    wrapped.add_adapter("other", peft.VeraConfig(**second))
    wrapped.base_model.set_adapter(["default", "other"])  # both trainable, so perturb reaches both
    perturb(wrapped)
    wrapped.save_pretrained(tmp_path)
    state, options = numpy_inputs(tiny_gpt2())
    ours = peftdecl.load_adapter(state, tmp_path, backend="numpy", **options)
    ours.load_adapter(tmp_path, "other")
    ours.set_adapter("other")
    wrapped.base_model.set_adapter("other")
    assert_layers_like_peft(
        ours, wrapped, layer_inputs(wrapped, ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"])
    )

    fresh = peftdecl.attach(state, {"peft_type": "VERA", **first}, backend="numpy", **options)
    fresh.add_adapter("other", {"peft_type": "VERA", **second})
    shared, later = fresh.engine.export("default"), fresh.engine.export("other")
    np.testing.assert_array_equal(later["vera_A"], shared["vera_A"][:, :32])
    np.testing.assert_array_equal(later["vera_B"], shared["vera_B"][:32])


def test_a_later_vera_adapter_larger_than_the_first_is_refused_like_peft() -> None:
    wrapped = peft_model(tiny_llama(), peft.VeraConfig(r=8, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="or greater is required"):
        wrapped.add_adapter("other", peft.VeraConfig(r=16, target_modules=["q_proj"]))
    state, options = numpy_inputs(tiny_llama())
    ours = peftdecl.attach(state, {"peft_type": "VERA", "r": 8, "target_modules": ["q_proj"]}, **options)
    with pytest.raises(peftdecl.PeftdeclError, match=r"r=16 .* first VeRA adapter \('default'\) .* r=8"):
        ours.add_adapter("other", {"peft_type": "VERA", "r": 16, "target_modules": ["q_proj"]})
    assert list(ours.adapters) == ["default"]
