"""HF PEFT's ``bias`` option ("all", "<kind>_only"): the base biases an adapter trains, saves and loads.

Checked against real peft on a small torch model (two Linear layers, a LayerNorm and a head): which biases are
trainable, the saved keys, loading PEFT's folder (outputs equal, float32 ≤ 1e-6 relative) and PEFT loading ours.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

import peftdecl  # noqa: E402
from peftdecl.errors import PeftdeclError  # noqa: E402
from tests.conftest import selected_backends  # noqa: E402

if "torch" not in selected_backends():
    pytest.skip("bias training is checked on the torch backend, not selected here", allow_module_level=True)

nn = torch.nn
PREFIX = "base_model.model."
TOL = 1e-6  # float32, relative


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.ln(self.b(torch.relu(self.a(x)))))


CASES = {
    "lora-all": {"peft_type": "LORA", "target_modules": ["a", "b"], "r": 2, "bias": "all"},
    "lora-only": {"peft_type": "LORA", "target_modules": ["a"], "r": 2, "bias": "lora_only"},
    "adalora-only": {"peft_type": "ADALORA", "target_modules": ["a"], "total_step": 10, "bias": "lora_only"},
    "oft-only": {
        "peft_type": "OFT",
        "target_modules": ["a"],
        "r": 0,
        "oft_block_size": 2,
        "bias": "oft_only",
    },
    "oft-all": {"peft_type": "OFT", "target_modules": ["b"], "r": 0, "oft_block_size": 2, "bias": "all"},
    "boft-only": {"peft_type": "BOFT", "target_modules": ["a"], "boft_block_size": 2, "bias": "boft_only"},
    "vera-only": {"peft_type": "VERA", "target_modules": ["a", "b"], "r": 2, "bias": "vera_only"},
}


def peft_config(spec: dict):
    kwargs = {k: v for k, v in spec.items() if k != "peft_type"}
    return peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[spec["peft_type"]](**kwargs)


def base() -> nn.Module:
    torch.manual_seed(0)
    return Small()


def randomise(module: nn.Module, seed: int) -> None:
    """Move every trainable tensor (adapter and biases) away from its initial value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def peftdecl_trainable(model) -> set[str]:
    return set(model.trainable_parameters())


@pytest.mark.parametrize("case", CASES)
def test_trainable_biases_and_saved_keys_match_peft(case: str, tmp_path) -> None:
    spec = CASES[case]
    theirs = peft.get_peft_model(base(), peft_config(spec))
    their_trainable = {n.removeprefix(PREFIX) for n, p in theirs.named_parameters() if p.requires_grad}
    ours = peftdecl.attach(base(), spec, backend="torch")
    our_trainable = peftdecl_trainable(ours)
    assert {n for n in their_trainable if "bias" in n and ".default" not in n} == {
        n for n in our_trainable if "bias" in n and not n.endswith("lora_B.bias")
    }
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    their_keys = set(safetensors_torch.load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    our_keys = set(safetensors_torch.load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert {k for k in their_keys if "bias" in k} == {k for k in our_keys if "bias" in k}


@pytest.mark.parametrize("case", CASES)
def test_peft_folder_with_trained_biases_loads_with_equal_outputs(case: str, tmp_path) -> None:
    spec = CASES[case]
    theirs = peft.get_peft_model(base(), peft_config(spec))
    randomise(theirs, 1)
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    ours = peftdecl.load_adapter(base(), tmp_path, backend="torch")
    with torch.no_grad():
        assert rel(ours(x), theirs(x)) <= TOL
        merged = ours.merge_and_unload()(x)
        assert rel(merged, theirs.merge_and_unload()(x)) <= 1e-5


@pytest.mark.parametrize("case", ["lora-all", "lora-only", "vera-only"])
def test_trained_biases_saved_by_peftdecl_load_in_peft(case: str, tmp_path) -> None:
    spec = CASES[case]
    ours = peftdecl.attach(base(), spec, backend="torch")
    ours.train()
    loss = ours(torch.randn(5, 8, generator=torch.Generator().manual_seed(3))).square().sum()
    loss.backward()
    trained = ours.trainable_parameters()
    bias_keys = [k for k in trained if k.endswith(".bias") and "lora_" not in k]
    assert bias_keys and all(trained[k].grad is not None for k in bias_keys)
    with torch.no_grad():
        for param in trained.values():
            param.add_(0.1 * torch.ones_like(param))
    ours.eval()
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(base(), tmp_path).eval()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel(theirs(x), ours(x)) <= TOL


def test_a_second_adapter_with_bias_is_refused_as_in_peft() -> None:
    ours = peftdecl.attach(base(), CASES["lora-only"], backend="torch")
    with pytest.raises(PeftdeclError, match="only one adapter per model may set bias"):
        ours.add_adapter("other", {**CASES["lora-only"], "target_modules": ["b"]})
    ours.add_adapter("plain", {"peft_type": "LORA", "target_modules": ["b"], "r": 2})


def test_bias_value_of_another_kind_is_refused_with_the_field() -> None:
    with pytest.raises(peftdecl.SpecError, match=r"\$\.bias"):
        peftdecl.load_spec({"peft_type": "VERA", "target_modules": ["a"], "bias": "lora_only"})


@pytest.mark.parametrize("case", ["lora-all", "oft-only", "vera-only"])
def test_numpy_reference_loads_peft_biases_and_merges_like_peft(case: str, tmp_path) -> None:
    """The float64 reference: the merged state dict equals PEFT's merge_and_unload (≤ 1e-6 relative, PEFT's float32)
    biases included, LayerNorm's too with bias="all"."""
    from tests.hf_models import merged_state, numpy_inputs

    if "numpy" not in selected_backends():
        pytest.skip("the NumPy backend is not selected")
    theirs = peft.get_peft_model(base(), peft_config(CASES[case]))
    randomise(theirs, 5)
    theirs.save_pretrained(tmp_path)
    state, kwargs = numpy_inputs(base())
    ours = peftdecl.load_adapter(state, tmp_path, backend="numpy", **kwargs)
    expected = merged_state(theirs)
    got = ours.merge_and_unload()
    for key, value in expected.items():
        assert rel(torch.from_numpy(got[key]), torch.from_numpy(value)) <= TOL, key


def test_numpy_bias_gradient_equals_torch_autograd() -> None:
    """dL/db of the trained biases from the reference's explicit backward equals torch autograd (≤ 1e-10, float64)."""
    if "numpy" not in selected_backends():
        pytest.skip("the NumPy backend is not selected")
    from tests.hf_models import numpy_inputs

    spec = CASES["lora-all"]
    torch_model = peftdecl.attach(base().double(), spec, backend="torch")
    state, kwargs = numpy_inputs(base().double())
    ours = peftdecl.attach(state, spec, backend="numpy", **kwargs)
    ours.train()
    torch_model.train()
    x = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    dy = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    torch_layer = torch_model.base_model.a
    (torch_layer(x) * dy).sum().backward()
    _, tape = ours.engine.layer_forward("a", x.numpy())
    grads = ours.engine.layer_backward("a", tape, dy.numpy())
    expected = torch_model.trainable_parameters()["a.base_layer.bias"].grad.numpy()
    assert abs(grads["a.base_layer.bias"] - expected).max() <= 1e-10
    assert set(ours.trainable_parameters()) >= {"a.base_layer.bias", "b.base_layer.bias", "head.bias"}


def mlx_small(mx, mnn):
    """Small in MLX, holding the torch model's weights."""
    from mlx.utils import tree_unflatten

    class MlxSmall(mnn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = mnn.Linear(8, 8), mnn.Linear(8, 8)
            self.ln, self.head = mnn.LayerNorm(8), mnn.Linear(8, 4)

        def __call__(self, x):
            return self.head(self.ln(self.b(mx.maximum(self.a(x), 0))))

    model = MlxSmall()
    model.update(tree_unflatten([(k, mx.array(v.detach().numpy())) for k, v in base().state_dict().items()]))
    return model


def test_mlx_loads_trains_and_saves_peft_biases(tmp_path) -> None:
    """MLX: PEFT's folder loads with equal outputs (≤ 1e-5, float32), the trained biases get PEFT's gradients
    (≤ 1e-5) and the saved folder holds PEFT's bias keys and values."""
    if "mlx" not in selected_backends():
        pytest.skip("the MLX backend is not selected")
    mx = pytest.importorskip("mlx.core")
    mnn = pytest.importorskip("mlx.nn")
    theirs = peft.get_peft_model(base(), peft_config(CASES["lora-all"]))
    randomise(theirs, 8)
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftdecl.load_adapter(mlx_small(mx, mnn), tmp_path / "peft", backend="mlx", is_trainable=True)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(9))
    dy = torch.randn(5, 4, generator=torch.Generator().manual_seed(10))
    (theirs(x) * dy).sum().backward()
    y = np.asarray(ours(mx.array(x.numpy())))
    assert abs(y - theirs(x).detach().numpy()).max() <= 1e-5
    engine = ours.engine

    def loss(model):
        return (model(mx.array(x.numpy())) * mx.array(dy.numpy())).sum()

    _, grads = mnn.value_and_grad(engine.model, loss)(engine.model)
    for key in ("a.base_layer.bias", "ln.bias", "head.bias"):
        tree = grads
        for part in key.split("."):
            tree = tree[part]
        expected = dict(theirs.named_parameters())[PREFIX + key].grad.numpy()
        assert abs(np.asarray(tree) - expected).max() <= 1e-5, key
    ours.save_pretrained(tmp_path / "ours")
    saved = safetensors_torch.load_file(tmp_path / "ours" / "adapter_model.safetensors")
    for key, value in safetensors_torch.load_file(tmp_path / "peft" / "adapter_model.safetensors").items():
        assert torch.allclose(saved[key], value), key
