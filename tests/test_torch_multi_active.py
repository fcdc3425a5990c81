"""Several active adapters on one layer on the torch backend, for the kinds that are not simply summed (DoRA, IA3,
OFT, BOFT, and mixtures): against the float64 NumPy reference on one layer of each type, and against the real HF
PEFT on a tiny Llama (``model.base_model.set_adapter([...])``, PEFT's way to activate several).

Tolerances: float32 forward and gradients against the NumPy reference ≤ 1e-5 relative, float64 merged weights
≤ 1e-10; against PEFT (float32) logits and gradients ≤ 1e-5, merged weights ≤ 1e-6.
"""

from __future__ import annotations

import numpy as np
import pytest

import peftdecl
from tests.conftest import rel_err
from tests.torch_cases import CASES, Holder, make_layer

torch = pytest.importorskip("torch")

from peftdecl_torch.inventory import numpy_model  # noqa: E402

TOL = 1e-5  # float32 against the float64 reference, and against PEFT
MERGE_TOL = 1e-10  # float64 merged weights against the reference
PEFT_MERGE_TOL = 1e-6  # float32 merged weights against PEFT

# adapters (CASES names, in active order) -> the layer types they are stacked on
STACKS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("dora", "dora"): ("linear", "embedding", "conv2d", "gpt2_conv1d"),
    ("lora", "dora"): ("linear", "embedding"),
    ("dora", "lora_rslora"): ("linear", "conv2d"),
    ("ia3", "ia3"): ("linear", "conv2d", "gpt2_conv1d"),
    ("ia3_feedforward", "ia3_feedforward"): ("linear", "conv2d"),
    ("ia3_feedforward", "ia3"): ("linear",),
    ("oft", "oft_exact_cayley"): ("linear", "conv2d"),
    ("oft", "oft"): ("embedding",),
    ("boft", "boft_butterfly"): ("linear", "conv2d_1x1"),
    ("boft", "boft"): ("conv2d",),
    ("oft", "lora", "ia3", "dora"): ("linear",),
}
PAIRS = [(stack, layer) for stack, layers in STACKS.items() for layer in layers]
IDS = ["+".join(stack) + f"-{layer}" for stack, layer in PAIRS]


def build(stack: tuple[str, ...], layer: str, dtype: torch.dtype):
    """(torch model, NumPy reference, float64 input, the same input for torch): the adapters of ``stack`` (as
    ``a0``, ``a1``, …) all active, DoRA magnitudes moved off their initial ‖W + sBA‖ on both backends."""
    base, x_shape = make_layer(layer)
    base = Holder(base).to(dtype)
    state, layer_types, facts = numpy_model(base)
    names = [f"a{i}" for i in range(len(stack))]
    reference = peftdecl.attach(
        state, CASES[stack[0]][0], names[0], "numpy", layer_types=layer_types, seed=1, **facts
    )
    ours = peftdecl.attach(base, CASES[stack[0]][0], names[0], seed=1)
    for i, (name, case) in enumerate(zip(names[1:], stack[1:], strict=True)):
        reference.add_adapter(name, CASES[case][0], seed=2 + i)
        ours.add_adapter(name, CASES[case][0], seed=2 + i)
    rng = np.random.default_rng(0)
    for name in names:
        live = reference.engine.trainable_parameters((name,))
        for key, value in live.items():
            if key.endswith("lora_magnitude_vector"):
                value *= rng.uniform(0.5, 1.5, size=value.shape)
                with torch.no_grad():
                    ours.engine.trainable_parameters((name,))[key].copy_(torch.from_numpy(value))
    reference.set_adapter(names)
    ours.set_adapter(names)
    if x_shape is None:
        x = rng.integers(0, 11, size=(3, 4))
        return ours, reference, x, torch.tensor(x)
    x = rng.normal(size=x_shape).astype(np.float32).astype(np.float64)  # representable in float32
    return ours, reference, x, torch.tensor(x, dtype=dtype, requires_grad=True)


@pytest.mark.parametrize(("stack", "layer"), PAIRS, ids=IDS)
def test_forward_and_gradients_match_numpy_reference(stack, layer) -> None:
    ours, reference, x, xt = build(stack, layer, torch.float32)
    reference.train()
    ours.train()  # dropout is 0 in every case: training mode changes nothing but the gradient bookkeeping
    expected, tape = reference.engine.layer_forward("m", x)
    dy = np.random.default_rng(1).normal(size=expected.shape)
    expected_grads = reference.engine.layer_backward("m", tape, dy)
    y = ours(xt)
    assert rel_err(y.detach().numpy(), expected) <= TOL
    y.backward(torch.tensor(dy, dtype=torch.float32))
    params = ours.trainable_parameters()
    assert set(params) == {k for k in expected_grads if k != "input"}
    for key, param in params.items():
        assert rel_err(param.grad.numpy(), expected_grads[key]) <= TOL, key
    if xt.is_floating_point():
        assert rel_err(xt.grad.numpy(), expected_grads["input"]) <= TOL


@pytest.mark.parametrize(("stack", "layer"), PAIRS, ids=IDS)
def test_merge_in_turn_matches_numpy_and_unmerge_restores(stack, layer) -> None:
    ours, reference, _, _ = build(stack, layer, torch.float64)
    before = ours.base_weight("m")
    ours.merge()
    reference.merge()
    assert rel_err(ours.base_weight("m"), reference.base_weight("m")) <= MERGE_TOL
    ours.unmerge()
    if "ia3" not in " ".join(stack):  # IA3 unmerges by dividing by l + 1e-8 (HF PEFT's rule): not exact
        assert rel_err(ours.base_weight("m"), before) <= MERGE_TOL


# -- against HF PEFT on a tiny Llama ------------------------------------------------------------------------
QV = ["q_proj", "v_proj"]


def peft_configs(peft) -> dict[str, tuple]:
    """Two adapters per case, both on the same layers (the second one as ``other``)."""
    lora = dict(target_modules=QV, init_lora_weights=False)
    ia3 = dict(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
    )
    return {
        "dora+dora": (
            peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, **lora),
            peft.LoraConfig(r=2, lora_alpha=3, use_dora=True, **lora),
        ),
        "lora+dora": (
            peft.LoraConfig(r=4, lora_alpha=8, **lora),
            peft.LoraConfig(r=2, lora_alpha=3, use_dora=True, **lora),
        ),
        "ia3+ia3": (peft.IA3Config(**ia3), peft.IA3Config(**ia3)),
        "oft+oft": (
            peft.OFTConfig(oft_block_size=16, target_modules=QV, init_weights=False),
            peft.OFTConfig(oft_block_size=8, target_modules=QV, init_weights=False, use_cayley_neumann=False),
        ),
        "boft+boft": (
            peft.BOFTConfig(boft_block_size=8, target_modules=QV, init_weights=False),
            peft.BOFTConfig(boft_block_size=4, target_modules=QV, init_weights=False),
        ),
    }


PEFT_CASES = ["dora+dora", "lora+dora", "ia3+ia3", "oft+oft", "boft+boft"]


def peft_pair(case: str, folder):
    """PEFT's model with both adapters active (``default``, then ``other``), non-trivial values, saved in
    ``folder``; and peftdecl's model loaded from those files, both adapters active in the same order."""
    from tests.hf_models import peft, peft_model, perturb, tiny_llama

    first, second = peft_configs(peft)[case]
    wrapped = peft_model(tiny_llama(), first)
    wrapped.add_adapter("other", second)
    wrapped.base_model.set_adapter(["default", "other"])  # both trainable, so perturb reaches both
    perturb(wrapped)
    wrapped.save_pretrained(folder)
    ours = peftdecl.load_adapter(tiny_llama(), folder)
    ours.load_adapter(folder, "other")
    ours.set_adapter(["default", "other"])
    return wrapped, ours


def ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(seed))


@pytest.mark.peft
@pytest.mark.parametrize("case", PEFT_CASES)
def test_logits_and_merged_weights_match_peft(case: str, tmp_path) -> None:
    wrapped, ours = peft_pair(case, tmp_path)
    x = ids(6)
    with torch.no_grad():
        assert rel_err(ours(input_ids=x).logits.numpy(), wrapped(input_ids=x).logits.numpy()) <= TOL
    # merge_and_unload merges the active adapters one after the other, into the weight as it stands
    merged_ours = ours.merge_and_unload().state_dict()
    merged_theirs = wrapped.merge_and_unload().state_dict()
    assert set(merged_ours) == set(merged_theirs)
    for key, value in merged_ours.items():
        assert rel_err(value.numpy(), merged_theirs[key].numpy()) <= PEFT_MERGE_TOL, key


def peft_key(name: str) -> str:
    """PEFT's parameter name of adapter ``default`` or ``other`` -> peftdecl's ``"<adapter>/<key>"``."""
    key = name.removeprefix("base_model.model.")
    adapter = "other" if ".other" in key else "default"
    key = key.replace(f".{adapter}", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
    return f"{adapter}/{key}"


@pytest.mark.peft
@pytest.mark.parametrize("case", PEFT_CASES)
def test_loss_and_gradients_match_peft(case: str, tmp_path) -> None:
    wrapped, ours = peft_pair(case, tmp_path)
    wrapped.train()
    ours.train()
    theirs = {peft_key(n): p for n, p in wrapped.named_parameters() if p.requires_grad}
    params = ours.trainable_parameters()
    assert set(params) == set(theirs)
    x = ids(7)
    loss_theirs = wrapped(input_ids=x, labels=x).loss
    loss_ours = ours(input_ids=x, labels=x).loss
    assert rel_err(loss_ours.item(), loss_theirs.item()) <= TOL
    loss_theirs.backward()
    loss_ours.backward()
    for key, param in params.items():
        assert rel_err(param.grad.numpy(), theirs[key].grad.numpy()) <= TOL, key
