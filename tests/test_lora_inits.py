"""LoRA initialisations that read the base weight (PiSSA, pissa_niter_K, OLoRA, orthogonal) against HF PEFT 0.21.

PiSSA (SVD) and OLoRA (QR) are deterministic given W: A, B and the residual base weight W − s·BA equal PEFT's
(PEFT works in float32, peftdecl in float64 on the NumPy reference and on the float32 weights of torch). OLoRA's
Householder QR fixes its signs, so A and B are compared as they are. The SVD's sign of each singular pair (u_i, v_i)
is not fixed by W: it depends on the LAPACK build and precision (torch's MKL sgesdd against NumPy's OpenBLAS dgesdd
disagree on some pairs), so PiSSA's A and B are compared after flipping row i of A and column i of B together where
PEFT's pair has the other sign; B A, the residual W and every output do not depend on it and are compared as they
are. ``pissa_niter_K`` and ``orthogonal`` draw random numbers
(PEFT from torch's global generator, peftdecl from its own seeded one): the randomised SVD is compared step for step
given the same Gaussian test matrix, and orthogonal by the properties that define it.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest

import peftdecl
from peftdecl.errors import SpecError, TargetError
from peftdecl.lora_init import pissa_factors, randomized_svd
from tests.conftest import rel_err, selected_backends

torch = pytest.importorskip("torch")

from tests.torch_mlp import Mlp, torch_mlp  # noqa: E402

peft = pytest.importorskip("peft")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOL = 1e-5  # float32 SVD/QR in PEFT against float64 here: singular vectors agree to ~eps32 / spectral gap
TARGETS = ["lin0", "lin1"]


def base_model(seed: int = 0) -> Mlp:
    return torch_mlp(seed)


def config(init: str, r: int = 4, **extra: object) -> dict[str, object]:
    return {"r": r, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": init, **extra}


def peft_tensors(model: object, module: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    layer = getattr(model.base_model.model, module)  # type: ignore[attr-defined]
    return tuple(  # type: ignore[return-value]
        t.detach().double().numpy()
        for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.base_layer.weight)
    )


def aligned(a: np.ndarray, b: np.ndarray, peft_a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A and B with rank component i negated where its row of A points away from PEFT's (B A is unchanged)."""
    signs = np.where(np.sum(a * peft_a, axis=1) < 0, -1.0, 1.0)
    return a * signs[:, None], b * signs[None, :]


def assert_factors_equal(
    init: str, a: np.ndarray, b: np.ndarray, peft_a: np.ndarray, peft_b: np.ndarray
) -> None:
    if init.startswith("pissa"):
        a, b = aligned(a, b, peft_a)
    assert rel_err(a, peft_a) <= TOL
    assert rel_err(b, peft_b) <= TOL


def needs_torch_backend() -> None:
    if "torch" not in selected_backends():
        pytest.skip("the torch backend is not selected")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_torch_backend_equals_peft_and_keeps_the_function(init: str) -> None:
    needs_torch_backend()
    base = base_model()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config(init)))
    ours = peftdecl.attach(copy.deepcopy(base), {"peft_type": "LORA", **config(init)}, backend="torch")
    values = ours.state_dict()
    for module in TARGETS:
        a, b, w = peft_tensors(theirs, module)
        assert_factors_equal(init, values[f"{module}.lora_A.weight"], values[f"{module}.lora_B.weight"], a, b)
        assert rel_err(ours.engine.base_weight(module), w) <= TOL
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # the residual W − s·BA plus s·BA is W again: float32 rounding of one subtraction and one addition
        assert rel_err(ours(x).numpy(), base(x).numpy()) <= TOL
        assert rel_err(ours(x).numpy(), theirs(x).numpy()) <= TOL


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_numpy_reference_equals_peft(init: str) -> None:
    base = base_model()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config(init)))
    state = {k: v.detach().double().numpy() for k, v in base.state_dict().items()}
    ours = peftdecl.attach(state, {"peft_type": "LORA", **config(init)}, backend="numpy")
    values = ours.state_dict()
    for module in TARGETS:
        a, b, w = peft_tensors(theirs, module)
        # float64 here against PEFT's float32
        assert_factors_equal(init, values[f"{module}.lora_A.weight"], values[f"{module}.lora_B.weight"], a, b)
        assert rel_err(ours.engine.base_weight(module), w) <= TOL
        residual = ours.engine.base_weight(module)
        delta = (
            ours.plan().layer(module).scaling
            * values[f"{module}.lora_B.weight"]
            @ values[f"{module}.lora_A.weight"]
        )
        assert rel_err(residual + delta, state[f"{module}.weight"]) <= 1e-12  # float64: W − s·BA + s·BA


@pytest.mark.parametrize("init", ["pissa", "olora", "orthogonal"])
def test_dora_magnitude_follows_the_new_factors_as_in_peft(init: str) -> None:
    """PEFT initialises DoRA's m = ‖W + s·BA‖ per row after the LoRA factors: ‖W‖ of the original weight."""
    needs_torch_backend()
    base = base_model(3)
    cfg = config(init, use_dora=True)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    ours = peftdecl.attach(copy.deepcopy(base), {"peft_type": "LORA", **cfg}, backend="torch", seed=2)
    values = ours.state_dict()
    for module in TARGETS:
        layer = getattr(theirs.base_model.model, module)
        magnitude = layer.lora_magnitude_vector["default"].weight.detach().double().numpy()
        key = next(k for k in values if k.startswith(f"{module}.") and "magnitude" in k)
        assert rel_err(values[key], magnitude) <= TOL  # both ≈ ‖W_original‖ per row, float32 rounding
        if init != "orthogonal":
            a, b, w = peft_tensors(theirs, module)
            assert_factors_equal(
                init, values[f"{module}.lora_A.weight"], values[f"{module}.lora_B.weight"], a, b
            )
            assert rel_err(ours.engine.base_weight(module), w) <= TOL
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(ours(x).numpy(), base(x).numpy()) <= TOL  # DoRA at m = ‖W + s·BA‖ is the base layer


def test_pissa_scaling_and_rslora_follow_peft() -> None:
    needs_torch_backend()
    cfg = config("pissa", r=2, lora_alpha=3, use_rslora=True)
    base = base_model(2)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    ours = peftdecl.attach(copy.deepcopy(base), {"peft_type": "LORA", **cfg}, backend="torch")
    a, b, w = peft_tensors(theirs, "lin1")
    values = ours.state_dict()
    assert_factors_equal("pissa", values["lin1.lora_A.weight"], values["lin1.lora_B.weight"], a, b)
    assert rel_err(ours.engine.base_weight("lin1"), w) <= TOL


def test_randomized_svd_follows_torch_svd_lowrank_given_its_test_matrix() -> None:
    rng = np.random.default_rng(0)
    for shape in ((20, 9), (9, 20)):  # tall and wide (torch transposes a wide matrix)
        w = rng.normal(size=shape)
        torch.manual_seed(3)
        u, s, v = (t.numpy() for t in torch.svd_lowrank(torch.from_numpy(w), q=4, niter=2))
        torch.manual_seed(3)
        test_matrix = torch.randn(min(shape), 4, dtype=torch.float64).numpy()
        mine_u, mine_s, mine_v = randomized_svd(w, 4, 2, test_matrix)
        signs = np.where(np.sum(mine_u * u, axis=0) < 0, -1.0, 1.0)  # the SVD's sign per pair (module doc)
        # float64 on both sides, the same steps: only rounding differs
        assert rel_err(mine_s, s) <= 1e-10
        assert rel_err(mine_u * signs, u) <= 1e-10 and rel_err(mine_v * signs, v) <= 1e-10


def test_pissa_niter_equals_peft_given_the_same_test_matrices(monkeypatch: pytest.MonkeyPatch) -> None:
    """PEFT draws svd_lowrank's test matrix from torch's global generator; record it, then feed it to ours."""
    layer_module = pytest.importorskip("peft.tuners.lora.layer")
    recorded: list[np.ndarray] = []
    real = layer_module.svd_lowrank

    def recording(matrix, q, niter):  # type: ignore[no-untyped-def]
        state = torch.get_rng_state()
        result = real(matrix, q, niter=niter)
        after = torch.get_rng_state()
        torch.set_rng_state(state)
        recorded.append(torch.randn(min(matrix.shape), q, dtype=matrix.dtype).double().numpy())
        torch.set_rng_state(after)
        return result

    monkeypatch.setattr(layer_module, "svd_lowrank", recording)
    theirs = peft.get_peft_model(base_model(), peft.LoraConfig(**config("pissa_niter_3")))
    plan_scaling = 8 / 4
    for module, test_matrix in zip(TARGETS, recorded, strict=True):
        a, b, w = peft_tensors(theirs, module)
        original = getattr(base_model(), module).weight.detach().double().numpy()
        mine_a, mine_b = pissa_factors(original, 4, plan_scaling, niter=3, random_matrix=test_matrix)
        assert_factors_equal("pissa_niter_3", mine_a, mine_b, a, b)
        assert rel_err(original - plan_scaling * mine_b @ mine_a, w) <= TOL


def test_pissa_niter_approaches_exact_pissa() -> None:
    """With a clear spectral gap, K subspace iterations find the top-r subspace: s·BA matches the exact SVD's."""
    rng = np.random.default_rng(1)
    u = np.linalg.qr(rng.normal(size=(16, 12)))[0]
    v = np.linalg.qr(rng.normal(size=(12, 12)))[0]
    w = (u * np.array([9.0, 7, 5, 4] + [0.01] * 8)) @ v.T  # top-4 singular values far above the rest
    state = {"lin0.weight": w, "lin0.bias": np.zeros(16)}
    spec = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["lin0"]}
    exact = peftdecl.attach(state, {**spec, "init_lora_weights": "pissa"}, backend="numpy")
    approx = peftdecl.attach(state, {**spec, "init_lora_weights": "pissa_niter_4"}, backend="numpy", seed=5)
    # (σ5/σ4)^(2K+1) = (0.0025)^9: the subspaces agree to float64 rounding; the signs may differ per vector
    assert rel_err(approx.engine.base_weight("lin0"), exact.engine.base_weight("lin0")) <= 1e-9


def orthogonal_properties(a: np.ndarray, b: np.ndarray, r: int) -> tuple[float, int, int, float, float]:
    return (
        float(np.abs(b @ a).max()),
        int(np.linalg.matrix_rank(a, tol=1e-4 * np.abs(a).max())),  # float32 zeros are ~1e-8, kept ones ~1
        int(np.linalg.matrix_rank(b, tol=1e-4 * np.abs(b).max())),
        float(np.sqrt(np.mean(a**2))),
        float(np.sqrt(np.mean(b**2))),
    )


def test_orthogonal_has_peft_properties() -> None:
    """B A = 0 (base untouched, function kept), each factor of rank r/2, entries of RMS √((r/2)/r)/10 = 1/√200."""
    needs_torch_backend()
    cfg = config("orthogonal", r=8)
    big = torch.nn.Sequential()
    big.add_module("lin0", torch.nn.Linear(96, 80))
    big.add_module("lin1", torch.nn.Linear(80, 64))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(copy.deepcopy(big), peft.LoraConfig(**cfg))
    ours = peftdecl.attach(copy.deepcopy(big), {"peft_type": "LORA", **cfg}, backend="torch", seed=3)
    values = ours.state_dict()
    for module in TARGETS:
        a, b, w = peft_tensors(theirs, module)
        mine = orthogonal_properties(values[f"{module}.lora_A.weight"], values[f"{module}.lora_B.weight"], 8)
        expected = orthogonal_properties(a, b, 8)
        assert mine[0] <= 1e-7 and expected[0] <= 1e-7  # float32 rounding of a product that is exactly zero
        assert mine[1:3] == expected[1:3] == (4, 4)
        for rms, theirs_rms in zip(mine[3:], expected[3:], strict=True):
            # a few hundred correlated Gaussian entries: their RMS is within 25 % of 1/√200 (> 5 sigma)
            assert abs(rms - 200**-0.5) <= 0.25 * 200**-0.5
            assert abs(theirs_rms - 200**-0.5) <= 0.25 * 200**-0.5
        assert np.array_equal(ours.engine.base_weight(module), w.astype(np.float32))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_saved_adapter_loads_in_peft_over_the_original_base(tmp_path: Path, init: str) -> None:
    """PEFT keeps init_lora_weights in the saved config and recomputes W − s·BA from the base it is loaded over."""
    needs_torch_backend()
    base = base_model()
    ours = peftdecl.attach(copy.deepcopy(base), {"peft_type": "LORA", **config(init)}, backend="torch")
    ours.save(tmp_path / "ad")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad")
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(loaded(x).numpy(), ours(x).numpy()) <= TOL  # float32 rounding of W − s·BA + s·BA
        assert rel_err(loaded(x).numpy(), base(x).numpy()) <= TOL
    for module in TARGETS:
        layer = getattr(loaded.base_model.model, module)
        assert rel_err(ours.engine.base_weight(module), layer.base_layer.weight.detach().numpy()) <= TOL


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_saved_adapter_loads_over_the_original_base(tmp_path: Path, init: str, dora: bool) -> None:
    """A trained (perturbed) PEFT PiSSA / OLoRA adapter: peftdecl rebuilds the residual and gives PEFT's outputs."""
    needs_torch_backend()
    base = base_model()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config(init, use_dora=dora)))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:  # away from the initial values, so that the outputs differ from the base's
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    theirs.save_pretrained(tmp_path / "ad")
    ours = peftdecl.load_adapter(copy.deepcopy(base), tmp_path / "ad", backend="torch")
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(theirs(x).numpy(), base(x).numpy()) > 1e-2  # the perturbation shows
        assert rel_err(ours(x).numpy(), theirs(x).numpy()) <= TOL


@pytest.mark.parametrize(
    ("init", "extra", "needle"),
    [
        ("orthogonal", {"r": 3}, "even rank"),
    ],
)
def test_refusals_name_the_problem(init: str, extra: dict[str, object], needle: str) -> None:
    state = {"lin0.weight": np.ones((4, 6)), "lin0.bias": np.zeros(4)}
    spec = {"peft_type": "LORA", "target_modules": ["lin0"], "init_lora_weights": init, "r": 2, **extra}
    with pytest.raises(TargetError, match=needle):
        peftdecl.attach(state, spec, backend="numpy")


@pytest.mark.parametrize("init", ["pissa", "olora", "orthogonal"])
def test_convolutions_are_refused_and_embeddings_keep_peft_default(init: str) -> None:
    """PEFT raises for a Conv2d target ("Unknown initialization") and leaves an Embedding at A = 0, B ~ N(0, 1)."""
    needs_torch_backend()
    model = torch.nn.Sequential()
    model.add_module("emb", torch.nn.Embedding(10, 6))
    model.add_module("conv", torch.nn.Conv2d(3, 4, 3))
    spec = {"peft_type": "LORA", "target_modules": ["conv"], "init_lora_weights": init, "r": 2}
    with pytest.raises(TargetError, match=r"conv: .* not on this conv2d layer"):
        peftdecl.attach(copy.deepcopy(model), spec, backend="torch")
    with pytest.raises(ValueError, match="Unknown initialization"):
        peft.get_peft_model(
            copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["conv"], init_lora_weights=init)
        )
    ours = peftdecl.attach(copy.deepcopy(model), {**spec, "target_modules": ["emb"]}, backend="torch")
    assert not ours.state_dict()["emb.lora_embedding_A"].any()  # A = 0 as PEFT's, so B A = 0
    assert np.array_equal(ours.engine.base_weight("emb"), model.emb.weight.detach().numpy())


def test_pissa_on_a_gpt2_conv1d_equals_peft() -> None:
    """GPT-2's Conv1D stores W as [in, out]; PEFT transposes it for the SVD, so B A and the residual are W's."""
    needs_torch_backend()
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(5)
    model = torch.nn.Sequential()
    model.add_module("lin0", conv1d(14, 9))  # nf = out = 14, nx = in = 9
    cfg = {
        "r": 3,
        "lora_alpha": 6,
        "target_modules": ["lin0"],
        "init_lora_weights": "pissa",
        "fan_in_fan_out": True,
    }
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg))
    ours = peftdecl.attach(copy.deepcopy(model), {"peft_type": "LORA", **cfg}, backend="torch")
    a, b, w = peft_tensors(theirs, "lin0")
    values = ours.state_dict()
    assert_factors_equal("pissa", values["lin0.lora_A.weight"], values["lin0.lora_B.weight"], a, b)
    assert rel_err(ours.engine.base_weight("lin0"), w.T) <= TOL  # IR layout [out, in]
    x = torch.randn(3, 9, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert rel_err(ours(x).numpy(), model(x).numpy()) <= TOL


def test_malformed_pissa_niter_is_a_spec_error() -> None:
    state = {"lin0.weight": np.ones((4, 6))}
    with pytest.raises(SpecError, match=r"\$\.init_lora_weights"):
        peftdecl.attach(
            state, {"peft_type": "LORA", "target_modules": ["lin0"], "init_lora_weights": "pissa_niter_x"}
        )


@pytest.mark.parametrize("rslora", [False, True])
def test_plain_lora_conversion_equals_peft(tmp_path: Path, rslora: bool) -> None:
    """PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) against plain_lora_conversion on the
    same trained and initial tensors; the converted LoRA over the original base gives the trained model's outputs."""
    from safetensors.numpy import load_file

    from peftdecl.lora_init import plain_lora_conversion

    base = base_model()
    cfg = config("pissa", use_rslora=rslora)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    theirs.peft_config[
        "default"
    ].init_lora_weights = True  # PEFT's recipe: the initial adapter is saved as plain
    theirs.save_pretrained(tmp_path / "init")
    theirs.peft_config["default"].init_lora_weights = "pissa"
    initial = {k: v.detach().double().numpy() for k, v in peft.get_peft_model_state_dict(theirs).items()}
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                param.add_(0.2 * torch.randn(param.shape, generator=gen))
    trained = {k: v.detach().double().numpy() for k, v in peft.get_peft_model_state_dict(theirs).items()}
    theirs.save_pretrained(
        tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init")
    )
    saved = load_file(str(tmp_path / "converted" / "adapter_model.safetensors"))
    state = {k: v.detach().double().numpy() for k, v in base.state_dict().items()}
    plan = peftdecl.attach(state, {"peft_type": "LORA", **cfg}, backend="numpy").plan()

    def ir(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k.removeprefix("base_model.model."): v for k, v in tensors.items()}

    changes, converted = plain_lora_conversion(plan, ir(trained), ir(initial))
    for key, value in converted.items():
        assert (
            rel_err(value, saved[f"base_model.model.{key}"]) <= 1e-7
        )  # a copy and a sign: float32 storage only
    written = peft.PeftConfig.from_pretrained(tmp_path / "converted")
    assert (changes["r"], changes["init_lora_weights"]) == (written.r, written.init_lora_weights)
    assert abs(float(changes["lora_alpha"]) - written.lora_alpha) <= 1e-12  # type: ignore[arg-type]
    plain = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "converted")
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert rel_err(plain(x).numpy(), theirs(x).numpy()) <= TOL  # the same ΔW on W instead of W_res


@pytest.mark.parametrize("init", ["pissa", "olora", "orthogonal"])
def test_mlx_backend_equals_the_numpy_reference(init: str) -> None:
    """The same float64 initialisation on MLX (float32 weights): tensors, residual W and unchanged outputs."""
    if "mlx" not in selected_backends():
        pytest.skip("the mlx backend is not selected")
    from tests.mlx_models import mlx_mlp, mx

    model, state = mlx_mlp()
    x = mx.random.normal((3, 12))
    before = np.array(model(x))
    spec = {"peft_type": "LORA", **config(init)}
    reference = peftdecl.attach(state, spec, backend="numpy")
    ours = peftdecl.attach(model, spec, backend="mlx")
    expected = reference.state_dict()
    for key, value in ours.state_dict().items():
        assert rel_err(value, expected[key]) <= TOL  # float32 storage of float64 values
    for module in TARGETS:
        assert rel_err(ours.engine.base_weight(module), reference.engine.base_weight(module)) <= TOL
    assert rel_err(np.array(ours(x)), before) <= TOL  # W − s·BA + s·BA in float32


def test_a_failed_add_leaves_the_base_weight_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    state = {"lin0.weight": rng.normal(size=(5, 7)), "lin0.bias": np.zeros(5)}
    model = peftdecl.attach(state, {"peft_type": "LORA", "r": 2, "target_modules": ["lin0"]}, backend="numpy")
    before = np.array(model.engine.base_weight("lin0"))

    def failing_add(*args: object) -> None:
        raise RuntimeError("engine refused")

    monkeypatch.setattr(model.engine, "add", failing_add)
    spec = {"peft_type": "LORA", "r": 2, "target_modules": ["lin0"], "init_lora_weights": "pissa"}
    with pytest.raises(RuntimeError, match="engine refused"):
        model.add_adapter("second", spec)
    assert np.array_equal(model.engine.base_weight("lin0"), before)  # written back exactly (float64)
    assert "second" not in model.adapters


def test_save_pretrained_converts_to_plain_lora_that_peft_loads(tmp_path: Path) -> None:
    needs_torch_backend()
    base = base_model()
    ours = peftdecl.attach(copy.deepcopy(base), {"peft_type": "LORA", **config("pissa")}, backend="torch")
    ours.save(tmp_path / "init")
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for param in ours.trainable_parameters().values():
            param.add_(0.2 * torch.randn(param.shape, generator=gen))
    ours.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    plain = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "plain")
    assert plain.peft_config["default"].r == 8 and plain.peft_config["default"].init_lora_weights is True
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert rel_err(ours(x).numpy(), base(x).numpy()) > 1e-2  # the perturbation shows
        assert rel_err(plain(x).numpy(), ours(x).numpy()) <= TOL  # the same ΔW, now on the original W


@pytest.mark.parametrize("init", [False, "loftq"])
def test_conversion_is_refused_where_the_initial_model_was_not_the_base(tmp_path: Path, init: object) -> None:
    """init false starts at W + s·BA and LoftQ at Q + s·BA: subtracting the initial factors would not give the
    trained update of the original base, so peftdecl refuses (HF PEFT warns and writes a wrong adapter)."""
    needs_torch_backend()
    spec = {"peft_type": "LORA", "r": 2, "target_modules": ["lin0"], "init_lora_weights": init}
    if init == "loftq":
        spec["loftq_config"] = {"loftq_bits": 8, "loftq_iter": 1}
    ours = peftdecl.attach(base_model(), spec, backend="torch")
    ours.save(tmp_path / "init")
    with pytest.raises(TargetError, match="cannot be converted to a plain LoRA"):
        ours.save_pretrained(
            tmp_path / "plain", path_initial_model_for_weight_conversion=str(tmp_path / "init")
        )
    assert not (tmp_path / "plain").exists()
