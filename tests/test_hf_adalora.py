"""AdaLoRA against the real HF PEFT: files both ways (full and pruned by an allocated rank_pattern), per-layer
outputs, the rank allocator step for step, and the orthogonality regulariser.

Tolerances: merged weights relative error ≤ MERGE_TOL = 1e-6 (float32 files; NumPy merges in float64, PEFT in
float32) and per-layer outputs ≤ OUTPUT_TOL = 1e-5 (PEFT's float32 layer on a float32 input vs the float64
reference), both from tests/peft_parity.py; allocator lora_E values and the regulariser ≤ ALLOC_TOL = 1e-6 (PEFT
float32 vs NumPy float64, same inputs).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import peftdecl
from peftdecl_numpy.kinds.adalora import orthogonal_regularizer
from peftdecl_numpy.rank_allocator import RankAllocator
from tests.conftest import rel_err
from tests.hf_models import (
    Layers,
    merged_state,
    numpy_inputs,
    peft,
    peft_model,
    perturb,
    tiny_gpt2,
    tiny_llama,
    torch,
)
from tests.peft_parity import (
    MERGE_TOL,
    OUTPUT_TOL,
    assert_computes_like_peft,
    assert_config_like_peft,
    assert_layers_like_peft,
    assert_merged_equal,
    assert_saved_like_peft,
    load_peft_saved,
    peft_layer_output,
    round_trip,
    save_for_peft,
)

ALLOC_TOL = 1e-6  # allocator lora_E values and the regulariser: PEFT float32 vs NumPy float64

CASES = {
    "plain": dict(init_r=6, target_r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "dropout_regex": dict(init_r=4, lora_alpha=8, lora_dropout=0.1, target_modules=r".*\.(k|o)_proj"),
    "mlp_layer1": dict(
        init_r=3, lora_alpha=4, target_modules=["down_proj", "up_proj"], layers_to_transform=[1]
    ),
    "alpha_zero": dict(init_r=5, lora_alpha=0, target_modules=["q_proj"]),
}
SCHEDULE = dict(total_step=10, tinit=1, tfinal=3, deltaT=2)
LAYER = "model.layers.0.self_attn.q_proj"


def config(**fields) -> object:
    return peft.AdaLoraConfig(**{**SCHEDULE, **fields})


def ir_key(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.").replace(".default", "")


def assert_files_alike(ours: Path, theirs: Path, tol: float) -> None:
    """The adapter files in both folders hold the same tensor names and shapes, each within ``tol`` (relative)."""
    ours_file = peft.utils.load_peft_weights(str(ours))
    theirs_file = peft.utils.load_peft_weights(str(theirs))
    assert {k: tuple(v.shape) for k, v in ours_file.items()} == {
        k: tuple(v.shape) for k, v in theirs_file.items()
    }
    assert all(rel_err(ours_file[k].numpy(), theirs_file[k].numpy()) <= tol for k in theirs_file)


def allocate_in_peft(wrapped, steps: int, seed: int = 0, lr: float = 0.01) -> None:
    """Drive PEFT's allocator with synthetic gradients and plain SGD steps."""
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        with torch.no_grad():
            for _, p in wrapped.named_parameters():
                if p.requires_grad:
                    p.grad = torch.randn(p.shape, generator=gen)
                    p -= lr * p.grad
        wrapped.base_model.update_and_allocate(step)


@pytest.mark.peft
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_adalora_loads_and_computes_like_peft(case: str, tmp_path) -> None:
    config_ = config(init_lora_weights=False, **CASES[case])
    wrapped, ours = load_peft_saved(tiny_llama, config_, tmp_path)
    wrapped.eval()  # no dropout on PEFT's side
    module = ours.plan().targets[0]
    x = np.random.default_rng(0).normal(size=(3, ours.info.layers[module].in_features))
    assert_computes_like_peft(ours, wrapped, {module: x})


@pytest.mark.peft
@pytest.mark.parametrize("case", sorted(CASES))
def test_peftdecl_saved_adalora_loads_in_peft(case: str, tmp_path) -> None:
    spec = {"peft_type": "ADALORA", "init_lora_weights": False, **SCHEDULE, **CASES[case]}
    ours, loaded = save_for_peft(tiny_llama, spec, tmp_path)
    module = ours.plan().targets[0]
    x = np.random.default_rng(1).normal(size=(2, ours.info.layers[module].in_features))
    expected_out = ours(module, x)
    expected_merge = ours.merge_and_unload()

    reference = peft_model(tiny_llama(), config(init_lora_weights=False, **CASES[case]))
    assert_saved_like_peft(tmp_path, reference)
    assert rel_err(peft_layer_output(loaded, module, x), expected_out) <= OUTPUT_TOL
    assert_merged_equal(expected_merge, merged_state(loaded))


@pytest.mark.peft
def test_fresh_adapter_is_a_no_op_exactly_where_peft_is() -> None:
    state, options = numpy_inputs(tiny_llama())
    x = np.random.default_rng(2).normal(size=(2, 64))
    for init in (True, False):
        wrapped = peft_model(tiny_llama(), config(init_lora_weights=init, **CASES["plain"]))
        spec = {"peft_type": "ADALORA", "init_lora_weights": init, **SCHEDULE, **CASES["plain"]}
        ours = peftdecl.attach(state, spec, **options)
        with wrapped.disable_adapter():
            peft_base = peft_layer_output(wrapped, LAYER, x)
        with ours.disable_adapters():
            base = ours(LAYER, x)
        peft_no_op = np.array_equal(peft_layer_output(wrapped, LAYER, x), peft_base)
        assert peft_no_op == np.array_equal(ours(LAYER, x), base) == init


@pytest.fixture
def allocated(tmp_path):
    """A PEFT AdaLoRA whose allocator ran past total_step - tfinal: its file is pruned to the final ranks."""
    wrapped = peft_model(
        tiny_llama(), config(init_r=8, target_r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    perturb(wrapped)
    allocate_in_peft(wrapped, steps=8)
    wrapped.eval().save_pretrained(tmp_path / "theirs")
    return wrapped, tmp_path


@pytest.mark.peft
def test_pruned_peft_file_loads_and_round_trips(allocated) -> None:
    wrapped, tmp_path = allocated
    saved = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    ranks = [sum(mask) for mask in saved["rank_pattern"].values()]
    assert sum(ranks) == 4 * 4 and len(set(ranks)) > 1  # really pruned, unevenly
    state, options = numpy_inputs(tiny_llama())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no echo of PEFT's spurious "rank_pattern keys did not match" warning
        ours = peftdecl.load_adapter(state, tmp_path / "theirs", **options)
    x = np.random.default_rng(3).normal(size=(4, 64))
    assert_layers_like_peft(ours, wrapped, dict.fromkeys(ours.plan().targets, x))

    ours.save(tmp_path / "ours")
    assert_files_alike(tmp_path / "ours", tmp_path / "theirs", MERGE_TOL)
    assert (
        json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["rank_pattern"]
        == saved["rank_pattern"]
    )

    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    assert_merged_equal(ours.merge_and_unload(), merged_state(loaded))
    assert_merged_equal(merged_state(loaded), merged_state(wrapped))


@pytest.mark.peft
def test_pruned_peftdecl_file_with_alpha_zero_loads_in_peft(tmp_path) -> None:
    # lora_alpha <= 0: PEFT's numerator becomes the layer's rank, which is the kept rank after a pruned load
    state, options = numpy_inputs(tiny_llama())
    pattern = {
        f"model.layers.{i}.self_attn.{m}.lora_E": [bool((i + j + len(m)) % 3) for j in range(5)]
        for i in range(2)
        for m in ("q_proj", "v_proj")
    }
    pattern["model.layers.1.self_attn.v_proj.lora_E"] = [False] * 5  # a layer pruned to rank 0
    spec = {
        "peft_type": "ADALORA",
        "init_lora_weights": False,
        "init_r": 5,
        "lora_alpha": 0,
        "target_modules": ["q_proj", "v_proj"],
        "rank_pattern": pattern,
        **SCHEDULE,
    }
    ours = peftdecl.attach(state, spec, seed=4, **options)
    ours.save(tmp_path)
    reference = peft_model(tiny_llama(), config(**{k: v for k, v in spec.items() if k != "peft_type"}))
    assert_saved_like_peft(tmp_path, reference, shapes=True)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    x = np.random.default_rng(5).normal(size=(2, 64))
    assert rel_err(peft_layer_output(loaded, LAYER, x), ours(LAYER, x)) <= OUTPUT_TOL
    assert_merged_equal(ours.merge_and_unload(), merged_state(loaded))


@pytest.mark.peft
def test_rank_allocator_matches_peft_step_for_step(tmp_path) -> None:
    fields = dict(init_r=6, target_r=3, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])
    wrapped, ours = load_peft_saved(tiny_llama, config(**fields), tmp_path / "start", is_trainable=True)
    allocator = RankAllocator(ours.plan())
    params = ours.trainable_parameters()
    gen, lr = torch.Generator().manual_seed(11), 0.01
    for step in range(1, SCHEDULE["total_step"]):
        grads = {}
        with torch.no_grad():
            for name, p in wrapped.named_parameters():
                if p.requires_grad:
                    p.grad = torch.randn(p.shape, generator=gen)
                    grads[ir_key(name)] = p.grad.double().numpy()
                    p -= lr * p.grad
        for key, g in grads.items():
            params[key] -= lr * g
        budget, mask = allocator.update_and_allocate(step, params, grads)
        wrapped.base_model.update_and_allocate(step)
        assert budget == wrapped.base_model.rankallocator.budget_schedule(step)[0], step
        theirs = wrapped.peft_config["default"].rank_pattern
        if mask is not None:
            assert {ir_key(k): v for k, v in theirs.items()} == mask, step
        for name, p in wrapped.named_parameters():
            if ".lora_E." in name:
                assert rel_err(params[ir_key(name)], p.detach().double().numpy()) <= ALLOC_TOL, (step, name)
    assert mask is not None and sum(map(sum, mask.values())) == allocator.target_bgt

    ours.update_spec(rank_pattern=allocator.rank_pattern)
    ours.save(tmp_path / "ours")
    wrapped.save_pretrained(tmp_path / "theirs")
    assert_files_alike(tmp_path / "ours", tmp_path / "theirs", ALLOC_TOL)


@pytest.mark.peft
@pytest.mark.parametrize("pruned", [False, True])
def test_orthogonal_regularizer_matches_peft_loss_term(pruned: bool, tmp_path) -> None:
    # only a task-typed PeftModel routes through AdaLoraModel.forward, which adds the term
    fields = dict(
        init_r=4,
        target_r=2,
        lora_alpha=8,
        orth_reg_weight=0.7,
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )
    wrapped = peft_model(tiny_llama(), config(**fields))
    perturb(wrapped, scale=0.3)
    if pruned:
        allocate_in_peft(wrapped, steps=8)
    wrapped.save_pretrained(tmp_path)
    if pruned:  # the term is PEFT's on the pruned modules it loads
        wrapped = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        total = wrapped(input_ids=ids, labels=ids).loss.item()
        plain = wrapped.base_model.model(input_ids=ids, labels=ids).loss.item()
    state, options = numpy_inputs(tiny_llama())
    ours = peftdecl.load_adapter(state, tmp_path, is_trainable=True, **options)
    value, _ = orthogonal_regularizer(ours.plan(), ours.trainable_parameters())
    assert abs(value - (total - plain)) <= ALLOC_TOL * max(1.0, abs(total)) + 1e-6  # float32 loss sum in PEFT


def tiny_conv_net() -> Layers:
    return Layers(
        lambda: {
            "conv": torch.nn.Conv2d(3, 5, (3, 2), stride=2, padding=1, dilation=(1, 2)),
            "proj": torch.nn.Linear(5, 4),
        }
    )


BOTH_WAYS = {  # base, fields, probed module, its input shape
    "gpt2_conv1d": (
        tiny_gpt2,
        dict(init_r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
        "transformer.h.0.attn.c_attn",
        (3, 32),
    ),
    "conv2d": (
        tiny_conv_net,
        dict(init_r=3, lora_alpha=6, target_modules=["conv", "proj"]),
        "conv",
        (2, 3, 7, 8),
    ),
}


@pytest.mark.peft
@pytest.mark.parametrize("case", sorted(BOTH_WAYS))
def test_both_ways(case: str, tmp_path) -> None:
    make, fields, module, shape = BOTH_WAYS[case]
    x = np.random.default_rng(0).normal(size=shape)
    model, loaded = round_trip(make, config(init_lora_weights=False, **fields), tmp_path, {module: x})
    if case == "conv2d":  # the conv's A is flattened over its 3×(3×2) input patch
        assert model.state_dict()["conv.lora_A"].shape == (3, 3 * 3 * 2)
    assert_merged_equal(model.merge_and_unload(), merged_state(loaded))


@pytest.mark.peft
def test_saved_config_matches_peft_fields_and_loads_as_spec(allocated) -> None:
    _, tmp_path = allocated
    theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    spec = peftdecl.load_spec(tmp_path / "theirs" / "adapter_config.json")
    assert spec.kind == "adalora" and spec.init_r == theirs["init_r"]
    state, options = numpy_inputs(tiny_llama())
    peftdecl.load_adapter(state, tmp_path / "theirs", **options).save(tmp_path / "ours")
    assert_config_like_peft(tmp_path / "ours", tmp_path / "theirs", ignore=("peft_version",))
