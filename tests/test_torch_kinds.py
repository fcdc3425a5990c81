"""Every adapter kind of the torch backend against the float64 NumPy reference, on every layer type it runs on.

The same spec and seed on both backends give identical initial numbers (the core initialises in NumPy), and the
torch layer is built from the same base weights, so forward outputs and the gradients of every trainable tensor
and of the input must agree: float32 relative error ≤ 1e-5, float64 ≤ 1e-10.
"""

from __future__ import annotations

import numpy as np
import pytest

import peftdecl
from tests.conftest import rel_err

torch = pytest.importorskip("torch")
nn = torch.nn
try:  # transformers' GPT-2 Conv1D; without transformers only that layer type is skipped
    from transformers.pytorch_utils import Conv1D
except ImportError:
    Conv1D = None

from peftdecl_torch.inventory import numpy_model  # noqa: E402
from peftdecl_torch.kinds import _fused as fused  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def make_layer(layer: str) -> tuple[nn.Module, tuple[int, ...] | None]:
    """A base layer and its input shape (None: integer token ids)."""
    torch.manual_seed(0)
    if layer == "linear":
        return nn.Linear(8, 6), (3, 2, 8)
    if layer == "embedding":
        return nn.Embedding(11, 8), None
    if layer == "conv1d":
        return nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 9)
    if layer == "conv2d":
        return nn.Conv2d(4, 6, 3, padding=1), (2, 4, 5, 5)
    if layer == "conv2d_1x1":
        return nn.Conv2d(8, 6, 1), (2, 8, 3, 3)
    if layer == "gpt2_conv1d":
        if Conv1D is None:
            pytest.skip("transformers is not installed (GPT-2 Conv1D)")
        return Conv1D(6, 8), (3, 2, 8)
    raise KeyError(layer)


def layer_type(layer: str) -> str:
    return "conv2d" if layer.startswith("conv2d") else layer


class Holder(nn.Module):
    """One layer named ``m``, called on the input."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.m = layer

    def forward(self, x):
        return self.m(x)


LORA = {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "target_modules": ["m"], "init_lora_weights": False}
CASES: dict[str, tuple[dict, tuple[str, ...]]] = {
    "lora": (LORA, ("linear", "embedding", "conv1d", "conv2d", "conv2d_1x1", "gpt2_conv1d")),
    "lora_rslora": ({**LORA, "use_rslora": True}, ("linear", "conv2d")),
    "lora_bias": ({**LORA, "lora_bias": True}, ("linear", "conv1d", "conv2d", "gpt2_conv1d")),
    "dora": (
        {**LORA, "use_dora": True},
        ("linear", "embedding", "conv1d", "conv2d", "conv2d_1x1", "gpt2_conv1d"),
    ),
    "adalora": (
        {
            "peft_type": "ADALORA",
            "init_r": 3,
            "target_r": 2,
            "lora_alpha": 6,
            "total_step": 10,
            "target_modules": ["m"],
            "init_lora_weights": False,
        },
        ("linear", "conv2d", "gpt2_conv1d"),
    ),
    "adalora_masked": (
        {
            "peft_type": "ADALORA",
            "init_r": 3,
            "target_r": 2,
            "lora_alpha": 6,
            "total_step": 10,
            "target_modules": ["m"],
            "init_lora_weights": False,
            "rank_pattern": {"m.lora_E": [True, False, True]},
        },
        ("linear",),
    ),
    "ia3": (
        {"peft_type": "IA3", "target_modules": ["m"], "feedforward_modules": [], "init_ia3_weights": False},
        ("linear", "conv2d", "gpt2_conv1d"),
    ),
    "ia3_feedforward": (
        {
            "peft_type": "IA3",
            "target_modules": ["m"],
            "feedforward_modules": ["m"],
            "init_ia3_weights": False,
        },
        ("linear", "conv2d", "gpt2_conv1d"),
    ),
    "loha": (
        {"peft_type": "LOHA", "r": 3, "alpha": 6, "target_modules": ["m"], "init_weights": False},
        ("linear", "conv1d", "conv2d", "conv2d_1x1"),
    ),
    "loha_effective": (
        {
            "peft_type": "LOHA",
            "r": 2,
            "alpha": 6,
            "target_modules": ["m"],
            "init_weights": False,
            "use_effective_conv2d": True,
        },
        ("conv2d",),
    ),
    "lokr": (
        {"peft_type": "LOKR", "r": 8, "alpha": 5, "target_modules": ["m"], "init_weights": False},
        ("linear", "conv1d", "conv2d", "conv2d_1x1"),
    ),
    "lokr_decomposed": (
        {
            "peft_type": "LOKR",
            "r": 1,
            "alpha": 5,
            "target_modules": ["m"],
            "init_weights": False,
            "decompose_both": True,
        },
        ("linear", "conv2d"),
    ),
    "lokr_effective": (
        {
            "peft_type": "LOKR",
            "r": 1,
            "alpha": 5,
            "target_modules": ["m"],
            "init_weights": False,
            "use_effective_conv2d": True,
        },
        ("conv2d",),
    ),
    "oft": (
        {"peft_type": "OFT", "r": 0, "oft_block_size": 4, "target_modules": ["m"], "init_weights": False},
        ("linear", "embedding", "conv2d", "conv2d_1x1"),
    ),
    "oft_exact_cayley": (
        {
            "peft_type": "OFT",
            "r": 0,
            "oft_block_size": 4,
            "target_modules": ["m"],
            "init_weights": False,
            "use_cayley_neumann": False,
        },
        ("linear", "conv2d"),
    ),
    "oft_block_share_coft": (
        {
            "peft_type": "OFT",
            "r": 0,
            "oft_block_size": 4,
            "target_modules": ["m"],
            "init_weights": False,
            "block_share": True,
            "coft": True,
            "eps": 0.5,
        },
        ("linear",),
    ),
    "boft": (
        {"peft_type": "BOFT", "boft_block_size": 2, "target_modules": ["m"], "init_weights": False},
        ("linear", "conv2d", "conv2d_1x1"),
    ),
    "boft_butterfly": (
        {
            "peft_type": "BOFT",
            "boft_block_size": 2,
            "boft_n_butterfly_factor": 2,
            "target_modules": ["m"],
            "init_weights": False,
        },
        ("linear", "conv2d_1x1"),
    ),
    "vera": (
        {"peft_type": "VERA", "r": 4, "target_modules": ["m"], "init_weights": False},
        ("linear", "gpt2_conv1d"),
    ),
}


def available(case: str, layer: str) -> str | None:
    """None when both backends run the case, else why not."""
    spec, _ = CASES[case]
    kind = peftdecl.load_spec(spec).kind
    for name in ("numpy", "torch"):
        entry = peftdecl.backends()[name]
        reason = entry.capabilities.why_not(kind, layer_type(layer)) if entry.capabilities else entry.reason
        if reason:
            return reason
    return None


def build(case: str, layer: str, dtype: torch.dtype, seed: int = 3, device: str = "cpu"):
    """(torch model on ``device``, NumPy reference model, float64 input, the same input for torch)."""
    base, x_shape = make_layer(layer)
    base = Holder(base).to(dtype)
    state, layer_types, facts = numpy_model(base)
    spec = CASES[case][0]
    reference = peftdecl.attach(state, spec, layer_types=layer_types, seed=seed, backend="numpy", **facts)
    ours = peftdecl.attach(base.to(device), spec, seed=seed)
    rng = np.random.default_rng(seed)
    if x_shape is None:
        x = rng.integers(0, 11, size=(3, 4))
        return ours, reference, x, torch.tensor(x, device=device)
    x = rng.normal(size=x_shape).astype(np.float32).astype(np.float64)  # representable in float32
    return ours, reference, x, torch.tensor(x, dtype=dtype, device=device, requires_grad=True)


PAIRS = [(case, layer) for case, (_, layers) in CASES.items() for layer in layers]


@pytest.mark.parametrize("path", ["fused", "composed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(("case", "layer"), PAIRS, ids=[f"{c}-{lay}" for c, lay in PAIRS])
def test_forward_and_gradients_match_numpy_reference(
    case: str, layer: str, dtype, path: str, monkeypatch
) -> None:
    reason = available(case, layer)
    if reason:
        pytest.skip(reason)
    # linear layers run hand-written autograd Functions where they can; "composed" forces plain torch ops
    monkeypatch.setattr(fused, "ENABLED", path == "fused")
    check_against_reference(case, layer, dtype)


def check_against_reference(case: str, layer: str, dtype: torch.dtype) -> None:
    """Forward (with and without autograd) and every gradient of one case against the NumPy reference."""
    ours, reference, x, xt = build(case, layer, dtype)
    tol = TOL[dtype]
    expected, tape = reference.engine.layer_forward("m", x)
    dy = np.random.default_rng(1).normal(size=expected.shape)
    expected_grads = reference.engine.layer_backward("m", tape, dy)

    with torch.no_grad():  # inference may take other paths (e.g. LoRA's merged weight on many tokens)
        assert rel_err(ours(xt).numpy(), expected) <= tol
    y = ours(xt)
    assert y.dtype == dtype
    assert rel_err(y.detach().numpy(), expected) <= tol
    y.backward(torch.tensor(dy, dtype=dtype))
    params = ours.trainable_parameters()
    assert set(params) == {k for k in expected_grads if k != "input"}
    for key, param in params.items():
        assert param.grad is not None, key
        assert rel_err(param.grad.numpy(), expected_grads[key]) <= tol, key
    if xt.is_floating_point():
        assert rel_err(xt.grad.numpy(), expected_grads["input"]) <= tol


@pytest.mark.parametrize(("case", "layer"), PAIRS, ids=[f"{c}-{lay}" for c, lay in PAIRS])
def test_merge_matches_numpy_and_unmerge_restores(case: str, layer: str) -> None:
    reason = available(case, layer)
    if reason:
        pytest.skip(reason)
    if case == "lora_bias" and layer == "conv2d_1x1":
        pytest.skip("no base bias to merge lora_bias into")
    ours, reference, _, xt = build(case, layer, torch.float64)
    before = ours.base_weight("m")
    with torch.no_grad():
        adapted = ours(xt).numpy()
    ours.merge()
    reference.merge()
    assert rel_err(ours.base_weight("m"), reference.base_weight("m")) <= 1e-10  # float64 merges agree
    with torch.no_grad():
        assert rel_err(ours(xt).numpy(), adapted) <= 1e-10  # merged forward == adapter forward
    ours.unmerge()
    reference.unmerge()
    assert rel_err(ours.base_weight("m"), reference.base_weight("m")) <= 1e-10
    if not case.startswith("ia3"):  # IA3 unmerges by dividing by l + 1e-8 (HF PEFT's rule): not exact
        assert rel_err(ours.base_weight("m"), before) <= 1e-10
