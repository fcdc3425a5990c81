"""OFT and BOFT files both ways against the real HF PEFT on tiny Llama models and small convolutions.

Tolerances (tests/peft_parity.py): merged weights agree to relative error ≤ MERGE_TOL = 1e-6 (float32 files and
PEFT's float32 merge vs the float64 reference); per-layer outputs ≤ OUTPUT_TOL = 1e-5 (PEFT's float32 layer on a
float32 input vs the float64 reference). HF PEFT without its CUDA extension builds a single butterfly factor;
several factors are compared against PEFT's own layer code with only its CUDA block-diagonal kernel replaced by
``torch.block_diag`` (the ``cpu_butterfly`` fixture).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peftdecl
from peftdecl.plan.kinds.boft import block_butterfly_perm
from peftdecl.plan.kinds.oft import nearest_divisor
from peftdecl_numpy.rotation import neumann, skew_from_triu
from tests.conftest import rel_err
from tests.hf_models import Layers, merged_state, numpy_inputs, peft, peft_model, perturb, tiny_llama, torch
from tests.peft_parity import (
    OUTPUT_TOL,
    assert_computes_like_peft,
    assert_config_like_peft,
    assert_merged_equal,
    assert_saved_like_peft,
    load_peft_saved,
    peft_layer_output,
    save_for_peft,
)

OFT_CASES = {
    "neumann": dict(oft_block_size=16, target_modules=["q_proj", "v_proj"]),
    "exact_cayley": dict(oft_block_size=16, use_cayley_neumann=False, target_modules=["q_proj", "v_proj"]),
    "neumann_3_terms": dict(
        oft_block_size=16, num_cayley_neumann_terms=3, target_modules=["q_proj", "v_proj"]
    ),
    "neumann_8_terms": dict(oft_block_size=8, num_cayley_neumann_terms=8, target_modules=["v_proj"]),
    "coft": dict(oft_block_size=16, coft=True, eps=2.0, target_modules=["q_proj", "v_proj"]),
    "block_share": dict(oft_block_size=16, block_share=True, target_modules=["q_proj", "v_proj"]),
    "r_blocks": dict(r=4, oft_block_size=0, target_modules=["q_proj", "down_proj"]),
    "adjusted_block_size": dict(oft_block_size=12, target_modules=["q_proj", "v_proj"]),
    "embedding": dict(oft_block_size=16, target_modules=["embed_tokens", "q_proj"]),
    "bias": dict(oft_block_size=16, use_cayley_neumann=False, target_modules=["o_proj"]),
}
BOFT_CASES = {
    "block_size": dict(boft_block_size=8, target_modules=["q_proj", "v_proj"]),
    "block_num": dict(boft_block_size=0, boft_block_num=4, target_modules=["q_proj", "o_proj"]),
    "bias": dict(boft_block_size=8, target_modules=["o_proj"]),
}
CASES = {"OFT": OFT_CASES, "BOFT": BOFT_CASES}
KIND_CASES = [(kind, case) for kind, cases in CASES.items() for case in sorted(cases)]
BUTTERFLY_CASES = {
    "two_factors": dict(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=["q_proj", "v_proj"]),
    "three_factors": dict(
        boft_block_size=4, boft_n_butterfly_factor=3, target_modules=["q_proj", "down_proj"]
    ),
}


def conv_net(kernel: int, stride: int = 1, padding: int = 0) -> Layers:
    return Layers(lambda: {"conv": torch.nn.Conv2d(4, 6, kernel, stride=stride, padding=padding)})


def llama(case: str):
    return tiny_llama(attention_bias=True) if case == "bias" else tiny_llama()


def config_for(kind: str, fields: dict, init_weights: bool = False):
    cls = peft.OFTConfig if kind == "OFT" else peft.BOFTConfig
    return cls(init_weights=init_weights, **fields)


def layer_input(base, module: str, rng: np.random.Generator) -> np.ndarray:
    sub = base.get_submodule(module)
    if isinstance(sub, torch.nn.Embedding):
        return rng.integers(0, sub.num_embeddings, size=(2, 5))
    if isinstance(sub, torch.nn.Conv2d):
        return rng.normal(size=(2, sub.in_channels, 7, 7))
    return rng.normal(size=(3, sub.in_features))


def peft_saved_loads_like_peft(kind: str, fields: dict, make_base, tmp_path) -> peftdecl.AdaptedModel:
    """PEFT creates, perturbs and saves; peftdecl loads: same per-layer outputs and merged weights."""
    wrapped, ours = load_peft_saved(make_base, config_for(kind, fields), tmp_path)
    rng = np.random.default_rng(0)
    inputs = {module: layer_input(make_base(), module, rng) for module in ours.plan().targets}
    assert_computes_like_peft(ours, wrapped, inputs)
    return ours


def peftdecl_saved_loads_in_peft(kind: str, fields: dict, make_base, tmp_path) -> None:
    """peftdecl creates and saves; PEFT loads it with its own keys and shapes, same outputs and merges."""
    ours, loaded = save_for_peft(make_base, {"peft_type": kind, "init_weights": False, **fields}, tmp_path)
    assert_saved_like_peft(tmp_path, peft_model(make_base(), config_for(kind, fields)), shapes=True)
    rng = np.random.default_rng(1)
    for module in ours.plan().targets:
        x = layer_input(make_base(), module, rng)
        assert rel_err(peft_layer_output(loaded, module, x), ours(module, x)) <= OUTPUT_TOL, module
    assert_merged_equal(ours.merge_and_unload(), merged_state(loaded))


@pytest.fixture
def cpu_butterfly(monkeypatch):
    """PEFT's BOFT layer with several factors on CPU: its CUDA block-diagonal kernel is block_diag here."""
    import peft.tuners.boft.layer as boft_layer

    class BlockDiagonal:
        @staticmethod
        def apply(blocks):  # [N, D, H, H] -> [N, D·H, D·H], what fbd_cuda computes
            return torch.stack([torch.block_diag(*factor) for factor in blocks])

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: True)
    monkeypatch.setattr(boft_layer, "FastBlockDiag", BlockDiagonal)


# -- OFT -----------------------------------------------------------------------------------------------------
@pytest.mark.peft
@pytest.mark.parametrize(("kind", "case"), KIND_CASES)
def test_peft_saved_file_loads_like_peft(kind: str, case: str, tmp_path) -> None:
    peft_saved_loads_like_peft(kind, CASES[kind][case], lambda: llama(case), tmp_path)


@pytest.mark.peft
@pytest.mark.parametrize(("kind", "case"), KIND_CASES)
def test_peftdecl_saved_file_loads_in_peft(kind: str, case: str, tmp_path) -> None:
    peftdecl_saved_loads_in_peft(kind, CASES[kind][case], lambda: llama(case), tmp_path)


@pytest.mark.peft
@pytest.mark.parametrize("stride_padding", [(1, 0), (2, 1)])
def test_oft_conv_1x1_both_ways(stride_padding, tmp_path) -> None:
    fields = dict(oft_block_size=2, target_modules=["conv"])
    peft_saved_loads_like_peft("OFT", fields, lambda: conv_net(1, *stride_padding), tmp_path / "theirs")
    peftdecl_saved_loads_in_peft("OFT", fields, lambda: conv_net(1, *stride_padding), tmp_path / "ours")


@pytest.mark.peft
def test_oft_conv_3x3_follows_peft_merged_weight_where_peft_forward_disagrees(tmp_path) -> None:
    # HF PEFT's forward folds rotated stride-1 patches back by summing overlaps (tuners/oft/layer.py:188-243):
    # neither a no-op at initialisation nor equal to its own merged weight. The reference follows the merged
    # weight.
    fields = dict(oft_block_size=4, target_modules=["conv"])
    x = np.random.default_rng(2).normal(size=(2, 4, 7, 7))
    fresh = peft_model(conv_net(3, 1, 1), config_for("OFT", fields, init_weights=True))
    assert (
        rel_err(
            peft_layer_output(fresh, "conv", x),
            conv_net(3, 1, 1).conv(torch.tensor(x, dtype=torch.float32)).detach().double().numpy(),
        )
        > 1e-2
    )  # PEFT: default init is not a no-op

    wrapped = peft_model(conv_net(3, 1, 1), config_for("OFT", fields))
    perturb(wrapped)
    wrapped.save_pretrained(tmp_path)
    peft_forward = peft_layer_output(wrapped, "conv", x)
    theirs = merged_state(wrapped)
    merged_conv = conv_net(3, 1, 1)
    merged_conv.load_state_dict({k: torch.tensor(v, dtype=torch.float32) for k, v in theirs.items()})
    with torch.no_grad():
        peft_merged_forward = merged_conv.conv(torch.tensor(x, dtype=torch.float32)).double().numpy()
    assert rel_err(peft_forward, peft_merged_forward) > 1e-2  # PEFT: forward ≠ forward of its merged weight

    state, options = numpy_inputs(conv_net(3, 1, 1))
    ours = peftdecl.load_adapter(state, tmp_path, **options)
    assert rel_err(ours("conv", x), peft_merged_forward) <= OUTPUT_TOL
    assert_merged_equal(ours.merge_and_unload(), theirs)


@pytest.mark.peft
def test_oft_conv_3x3_saved_by_peftdecl_merges_like_peft(tmp_path) -> None:
    peftdecl_saved = dict(oft_block_size=4, target_modules=["conv"])
    spec = {"peft_type": "OFT", "init_weights": False, **peftdecl_saved}
    ours, loaded = save_for_peft(lambda: conv_net(3, 2, 1), spec, tmp_path, seed=5)
    assert_merged_equal(ours.merge_and_unload(), merged_state(loaded))


@pytest.mark.peft
@pytest.mark.parametrize("terms", range(1, 9))
def test_neumann_series_matches_peft(terms: int) -> None:
    from peft.tuners.oft.layer import OFTRotationModule

    block = 5
    module = OFTRotationModule(2, block * (block - 1) // 2, block, 2 * block).double()
    u = np.random.default_rng(terms).normal(scale=0.3, size=(2, block * (block - 1) // 2))
    theirs = module._cayley_batch(torch.tensor(u), block, True, terms).numpy()
    assert rel_err(neumann(skew_from_triu(u, block), terms), theirs) <= 1e-13  # both float64


@settings(max_examples=60, deadline=None)
@given(dim=st.integers(1, 300), value=st.integers(1, 320))
def test_block_adjustment_matches_peft(dim: int, value: int) -> None:
    from peft.tuners.oft.layer import OFTLayer

    assert nearest_divisor(dim, value) == OFTLayer.adjust_oft_parameters(None, dim, value)


# -- BOFT ----------------------------------------------------------------------------------------------------
@pytest.mark.peft
@pytest.mark.parametrize("kernel_stride_padding", [(1, 1, 0), (3, 2, 1)])
def test_boft_conv_both_ways(kernel_stride_padding, tmp_path) -> None:
    fields = dict(boft_block_size=4, target_modules=["conv"])
    peft_saved_loads_like_peft("BOFT", fields, lambda: conv_net(*kernel_stride_padding), tmp_path / "theirs")
    peftdecl_saved_loads_in_peft("BOFT", fields, lambda: conv_net(*kernel_stride_padding), tmp_path / "ours")


@pytest.mark.peft
def test_peft_cpu_file_with_forced_single_factor_loads(tmp_path) -> None:
    # without its CUDA extension PEFT writes boft_n_butterfly_factor 2 into the config but builds one factor
    fields = BUTTERFLY_CASES["two_factors"]
    with pytest.warns(UserWarning, match="holds 1 butterfly factor but its config says 2"):
        ours = peft_saved_loads_like_peft("BOFT", fields, tiny_llama, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["boft_n_butterfly_factor"] == 2
    assert ours.plan().layer("model.layers.0.self_attn.q_proj").param("boft_R").shape == (2, 8, 8, 8)


@pytest.mark.peft
@pytest.mark.parametrize("case", sorted(BUTTERFLY_CASES))
def test_several_butterfly_factors_both_ways(case: str, cpu_butterfly, tmp_path) -> None:
    fields = BUTTERFLY_CASES[case]
    peft_saved_loads_like_peft("BOFT", fields, tiny_llama, tmp_path / "theirs")
    saved = peft.utils.load_peft_weights(str(tmp_path / "theirs"))
    assert (
        saved["base_model.model.model.layers.0.self_attn.q_proj.boft_R"].shape[0]
        == fields["boft_n_butterfly_factor"]
    )
    peftdecl_saved_loads_in_peft("BOFT", fields, tiny_llama, tmp_path / "ours")


@pytest.mark.peft
def test_several_butterfly_factors_on_a_conv_both_ways(cpu_butterfly, tmp_path) -> None:
    fields = dict(boft_block_size=2, boft_n_butterfly_factor=2, target_modules=["conv"])  # width 4·3·3 = 36
    peft_saved_loads_like_peft("BOFT", fields, lambda: conv_net(3, 2, 1), tmp_path / "theirs")
    peftdecl_saved_loads_in_peft("BOFT", fields, lambda: conv_net(3, 2, 1), tmp_path / "ours")


@pytest.mark.peft
@pytest.mark.parametrize(
    ("width", "block", "factors"),
    [(16, 2, 2), (16, 2, 4), (64, 8, 2), (64, 4, 3), (48, 4, 3), (96, 6, 2), (8, 4, 1)],
)
def test_butterfly_permutations_match_peft(width: int, block: int, factors: int) -> None:
    from peft.tuners.boft.layer import BOFTLayer

    blocks = width // block
    for i in range(factors):
        theirs = BOFTLayer.block_butterfly_perm(None, width, blocks // 2**i, block // 2, factors - 1)
        np.testing.assert_array_equal(
            block_butterfly_perm(width, blocks // 2**i, block // 2, factors > 1), theirs
        )


# -- gradients -----------------------------------------------------------------------------------------------
GRAD_TOL = 1e-5  # PEFT's float32 autograd vs the float64 reference's explicit gradients


@pytest.mark.peft
@pytest.mark.parametrize(
    ("kind", "case"),
    [
        ("OFT", "neumann"),
        ("OFT", "exact_cayley"),
        ("OFT", "coft"),
        ("OFT", "block_share"),
        ("OFT", "embedding"),
        ("BOFT", "block_size"),
        ("BOFT", "bias"),
    ],
)
def test_gradients_match_peft_autograd(kind: str, case: str, tmp_path) -> None:
    fields = CASES[kind][case]
    wrapped, ours = load_peft_saved(lambda: llama(case), config_for(kind, fields), tmp_path)
    module = ours.plan().targets[0]
    rng = np.random.default_rng(4)
    x = layer_input(llama(case), module, rng)
    y, tape = ours.engine.layer_forward(module, x)
    weights = rng.normal(size=y.shape)
    grads = ours.engine.layer_backward(module, tape, weights)

    layer = wrapped.base_model.model.get_submodule(module)
    x_t = torch.tensor(x) if x.dtype.kind == "i" else torch.tensor(x, dtype=torch.float32, requires_grad=True)
    (layer(x_t) * torch.tensor(weights, dtype=torch.float32)).sum().backward()
    params = {n.replace(".default", ""): p for n, p in layer.named_parameters() if p.requires_grad}
    assert params
    for name, param in params.items():
        assert rel_err(grads[f"{module}.{name}"], param.grad.double().numpy()) <= GRAD_TOL, name
    if x_t.requires_grad:
        assert rel_err(grads["input"], x_t.grad.double().numpy()) <= GRAD_TOL


# -- configs -------------------------------------------------------------------------------------------------
@pytest.mark.peft
@pytest.mark.parametrize(("kind", "fields"), [("OFT", OFT_CASES["coft"]), ("BOFT", BOFT_CASES["block_num"])])
def test_configs_read_and_written_like_peft(kind: str, fields: dict, tmp_path) -> None:
    peft_model(tiny_llama(), config_for(kind, fields)).save_pretrained(tmp_path / "theirs")
    spec = peftdecl.load_spec(tmp_path / "theirs" / "adapter_config.json")
    state, options = numpy_inputs(tiny_llama())
    peftdecl.attach(state, spec, **options).save(tmp_path / "ours")
    assert_config_like_peft(
        tmp_path / "ours", tmp_path / "theirs", ignore=("peft_version", "base_model_name_or_path")
    )
