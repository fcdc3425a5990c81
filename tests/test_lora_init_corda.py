"""LoRA's CorDA initialisation (init_lora_weights='corda' with corda_config) against HF PEFT 0.21.2.

Both sides see the same calibration data: PEFT through ``peft.tuners.lora.corda.preprocess_corda(model, config,
run_model=...)``, peftdecl through ``peftdecl.preprocess_corda(model, spec, run_model=...)``. The covariances are
collected the same way in float32 (equal to rounding of the summation order); the damping is chosen in float32
as PEFT chooses it; the SVD of W·C' is float64 here against PEFT's float32. A and B are compared after aligning the
sign of each singular pair (LAPACK builds differ), B A, the residual W − s·B A and outputs as they are.

Tolerances (relative): 1e-4 for A and B (float32 SVD of W·C', whose singular values may lie close together;
kpm keeps the smallest ones, the least accurate in float32), 1e-5 for the residual weight and outputs.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import peftdecl
from peftdecl.errors import SpecError, TargetError
from peftdecl.inits.corda import corda_eigens, corda_factors
from peftdecl.spec import load_spec
from tests.conftest import rel_err, selected_backends

torch = pytest.importorskip("torch")

from tests.torch_mlp import Mlp, torch_mlp  # noqa: E402

peft = pytest.importorskip("peft")
corda = pytest.importorskip("peft.tuners.lora.corda")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGETS = ["lin0", "lin1"]
FACTOR_TOL = 1e-4  # A, B: float32 SVD of W·C' (PEFT) against float64, signs aligned
TOL = 1e-5  # residual weights and outputs (float32 models)


def base_model(seed: int = 0) -> Mlp:
    return torch_mlp(seed)


# rows of 12 features; the last call is a (1, sequence, features) batch of one, which PEFT squeezes to 2-D
BATCHES = [torch.randn(24, 12, generator=torch.Generator().manual_seed(10 + i)) for i in range(2)]
BATCHES.append(torch.randn(1, 20, 12, generator=torch.Generator().manual_seed(12)))


def runner(model: Any) -> Any:
    def run_model() -> None:
        for batch in BATCHES:
            model(batch)

    return run_model


def config(method: str = "ipm", **extra: object) -> dict[str, object]:
    corda_config = {"corda_method": method, **dict(extra.pop("corda_config", {}))}  # type: ignore[call-overload]
    return {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": TARGETS,
        "init_lora_weights": "corda",
        "corda_config": corda_config,
        **extra,
    }


def peft_corda(base: Any, cfg: dict[str, object]) -> Any:
    """PEFT's recipe: preprocess_corda with the calibration run, then get_peft_model."""
    model = copy.deepcopy(base)
    lora_config = peft.LoraConfig(**cfg)
    corda.preprocess_corda(model, lora_config, run_model=runner(model))
    return peft.get_peft_model(model, lora_config)


def ours_corda(base: Any, cfg: dict[str, object]) -> Any:
    model = copy.deepcopy(base)
    spec = {"peft_type": "LORA", **cfg}
    peftdecl.preprocess_corda(model, spec, run_model=runner(model))
    return peftdecl.attach(model, spec, backend="torch")


def peft_tensors(model: Any, module: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    layer = getattr(model.base_model.model, module)
    return tuple(  # type: ignore[return-value]
        t.detach().double().numpy()
        for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.base_layer.weight)
    )


def aligned(a: np.ndarray, b: np.ndarray, peft_a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A and B with singular pair i negated where its row of A points away from PEFT's (B A is unchanged)."""
    signs = np.where(np.sum(a * peft_a, axis=1) < 0, -1.0, 1.0)
    return a * signs[:, None], b * signs[None, :]


def assert_like_peft(
    values: dict[str, np.ndarray], base_weight: Any, theirs: Any, transposed: bool = False
) -> None:
    for module in [m for m in TARGETS if f"{m}.lora_A.weight" in values]:
        a, b, w = peft_tensors(theirs, module)
        ours_a, ours_b = aligned(values[f"{module}.lora_A.weight"], values[f"{module}.lora_B.weight"], a)
        assert rel_err(ours_a, a) <= FACTOR_TOL
        assert rel_err(ours_b, b) <= FACTOR_TOL
        assert rel_err(base_weight(module), w.T if transposed else w) <= TOL


def needs_torch_backend() -> None:
    if "torch" not in selected_backends():
        pytest.skip("the torch backend is not selected")


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_torch_backend_equals_peft(method: str) -> None:
    needs_torch_backend()
    base = base_model()
    cfg = config(method)
    theirs = peft_corda(base, cfg)
    ours = ours_corda(base, cfg)
    assert_like_peft(ours.state_dict(), ours.engine.base_weight, theirs)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(ours(x).numpy(), base(x).numpy()) <= TOL  # W − s·BA + s·BA = W
        assert rel_err(ours(x).numpy(), theirs(x).numpy()) <= TOL


def test_numpy_reference_from_peft_covariance_file(tmp_path: Path) -> None:
    """PEFT writes the covariances it collected; the NumPy reference builds the same adapter from them."""
    base = base_model(1)
    cov_file = str(tmp_path / "cov.pt")
    cfg = config(corda_config={"covariance_file": cov_file})
    theirs = peft_corda(base, cfg)
    covariances = {k: v.double().numpy() for k, v in torch.load(cov_file, weights_only=True).items()}
    state = {k: v.detach().double().numpy() for k, v in base.state_dict().items()}
    spec = {"peft_type": "LORA", **config()}
    peftdecl.preprocess_corda(state, spec, covariances=covariances)
    ours = peftdecl.attach(state, spec, backend="numpy")
    assert_like_peft(ours.state_dict(), ours.engine.base_weight, theirs)


def test_rank_pattern_dora_and_an_adapted_model() -> None:
    """rank_pattern sets each layer's r (PEFT crops its triplets to it); with DoRA, m = ‖W‖ per row (PEFT
    initialises m after W − s·BA and the factors); preprocessing an AdaptedModel prepares its next adapter."""
    needs_torch_backend()
    base = base_model(2)
    cfg = config("kpm", rank_pattern={"lin1": 2}, use_dora=True)
    theirs = peft_corda(base, cfg)
    ours = peftdecl.attach(
        copy.deepcopy(base), {"peft_type": "LORA", "target_modules": ["lin0"]}, backend="torch"
    )
    spec = {"peft_type": "LORA", **cfg}
    peftdecl.preprocess_corda(ours, spec, run_model=runner(ours))
    ours.add_adapter("corda", spec)
    ours.set_adapter("corda")
    values = ours.state_dict("corda")
    assert values["lin1.lora_A.weight"].shape == (2, 16)
    assert_like_peft(values, ours.engine.base_weight, theirs)
    for module in TARGETS:
        layer = getattr(theirs.base_model.model, module)
        magnitude = layer.lora_magnitude_vector["default"].weight.detach().double().numpy()
        key = next(k for k in values if k.startswith(f"{module}.") and "magnitude" in k)
        assert rel_err(values[key], magnitude) <= TOL


def test_gpt2_conv1d_equals_peft() -> None:
    """PEFT transposes GPT-2's Conv1D weight ([in, out]) for CorDA and transposes s·B A back."""
    needs_torch_backend()
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(3)
    base = torch.nn.Sequential()
    base.add_module("lin0", conv1d(16, 12))  # nf = out = 16, nx = in = 12
    cfg = config(target_modules=["lin0"], fan_in_fan_out=True)
    theirs = peft_corda(base, cfg)
    ours = ours_corda(base, cfg)
    assert_like_peft(ours.state_dict(), ours.engine.base_weight, theirs, transposed=True)


def test_cache_files_are_shared_both_ways(tmp_path: Path) -> None:
    """PEFT's cache_file (its kept triplets) prepares peftdecl without calibration data, and peftdecl's prepares
    PEFT: the same adapters either way."""
    needs_torch_backend()
    base = base_model(4)
    theirs_cache, ours_cache = str(tmp_path / "theirs.pt"), str(tmp_path / "ours.pt")
    theirs = peft_corda(base, config(corda_config={"cache_file": theirs_cache}))
    ours = ours_corda(base, config(corda_config={"cache_file": ours_cache}))
    from_theirs = copy.deepcopy(base)
    spec = {"peft_type": "LORA", **config(corda_config={"cache_file": theirs_cache})}
    peftdecl.preprocess_corda(from_theirs, spec)  # no run_model: the cache is read
    from_theirs_model = peftdecl.attach(from_theirs, spec, backend="torch")
    for module in TARGETS:  # read from PEFT's float32 triplets: PEFT's A and B to float32 rounding
        a, b, _ = peft_tensors(theirs, module)
        assert rel_err(from_theirs_model.state_dict()[f"{module}.lora_A.weight"], a) <= 1e-6
        assert rel_err(from_theirs_model.state_dict()[f"{module}.lora_B.weight"], b) <= 1e-6
    peft_model = copy.deepcopy(base)
    lora_config = peft.LoraConfig(**config(corda_config={"cache_file": ours_cache}))
    corda.preprocess_corda(peft_model, lora_config)
    from_ours = peft.get_peft_model(peft_model, lora_config)
    for module in TARGETS:
        a, b, w = peft_tensors(from_ours, module)
        assert rel_err(ours.state_dict()[f"{module}.lora_A.weight"], a) <= 1e-6
        assert rel_err(ours.state_dict()[f"{module}.lora_B.weight"], b) <= 1e-6
        assert rel_err(ours.engine.base_weight(module), w) <= TOL


def test_covariance_file_and_hooked_model(tmp_path: Path) -> None:
    """peftdecl's covariance_file, collected on a separate hooked_model, prepares PEFT with peftdecl's own
    adapter's tensors; triplets kept for another rank are refused, as PEFT refuses them."""
    needs_torch_backend()
    base = base_model(8)
    cov_file = str(tmp_path / "cov" / "c.pt")
    cfg = config(r=3, corda_config={"covariance_file": cov_file})
    hooked = copy.deepcopy(base)
    model = copy.deepcopy(base)
    peftdecl.preprocess_corda(
        model, {"peft_type": "LORA", **cfg}, run_model=runner(hooked), hooked_model=hooked
    )
    with pytest.raises(TargetError, match="built for another model or rank"):
        peftdecl.attach(model, {"peft_type": "LORA", **{**cfg, "r": 4}}, backend="torch")
    ours = peftdecl.attach(model, {"peft_type": "LORA", **cfg}, backend="torch")
    peft_model = copy.deepcopy(base)
    lora_config = peft.LoraConfig(**cfg)
    corda.preprocess_corda(peft_model, lora_config)  # no run_model: the covariance file is read
    assert_like_peft(ours.state_dict(), ours.engine.base_weight, peft.get_peft_model(peft_model, lora_config))


def _perturb(model: Any, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # away from the initial values, so that the comparison shows the adapter
                param.add_(0.2 * torch.randn(param.shape, generator=gen))


def test_peft_saved_adapter_loads_after_preprocessing(tmp_path: Path) -> None:
    """As in PEFT, loading a saved CorDA adapter recomputes W − s·B₀A₀ from the preprocessed triplets, so the
    original base must be preprocessed first; without that, peftdecl says so."""
    needs_torch_backend()
    base = base_model(5)
    cfg = config()
    theirs = peft_corda(base, cfg)
    _perturb(theirs, 6)
    theirs.save_pretrained(tmp_path / "ad")
    with pytest.raises(TargetError, match="preprocess_corda"):
        peftdecl.load_adapter(copy.deepcopy(base), tmp_path / "ad", backend="torch")
    model = copy.deepcopy(base)
    peftdecl.preprocess_corda(model, {"peft_type": "LORA", **cfg}, run_model=runner(model))
    ours = peftdecl.load_adapter(model, tmp_path / "ad", backend="torch")
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert rel_err(theirs(x).numpy(), base(x).numpy()) > 1e-2  # the perturbation shows
        assert rel_err(ours(x).numpy(), theirs(x).numpy()) <= TOL


def test_conversion_to_plain_lora_on_save_loads_in_peft(tmp_path: Path) -> None:
    """save_pretrained(path_initial_model_for_weight_conversion=...): a plain rank-2r LoRA over the original base
    that gives the trained CorDA model's outputs, in PEFT."""
    needs_torch_backend()
    base = base_model(6)
    ours = ours_corda(base, config())
    ours.save_pretrained(tmp_path / "init")
    _perturb(ours.get_base_model(), 8)
    ours.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    plain = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "plain")
    assert (plain.peft_config["default"].r, plain.peft_config["default"].init_lora_weights) == (8, True)
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert rel_err(ours(x).numpy(), base(x).numpy()) > 1e-2
        assert rel_err(plain(x).numpy(), ours(x).numpy()) <= TOL


def test_the_math_is_a_covariance_weighted_svd() -> None:
    """Independent of PEFT: with C = I-like inputs CorDA's IPM triplets are W's own top singular triplets, and
    s·B A reproduces them; KPM keeps the smallest."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((9, 7))
    covariance = np.eye(7)
    u, s, vh = np.linalg.svd(w)
    for method, keep in (("ipm", slice(0, 3)), ("kpm", slice(4, 7))):
        eigens = corda_eigens(w, covariance, 3, method)
        a, b = corda_factors(eigens, 2.0)
        expected = (u[:, keep] * s[keep]) @ vh[keep]
        assert rel_err(2.0 * b @ a, expected) <= 1e-12  # C' = 1.01·I: W C' (C')⁻¹, float64


@pytest.mark.parametrize(
    ("change", "error", "needle"),
    [
        ({"corda_config": {"corda_method": "xpm"}}, SpecError, r"\$\.corda_config\.corda_method"),
        ({"corda_config": {"cache": "x"}}, SpecError, r"\$\.corda_config"),
        ({"target_modules": ["conv"]}, TargetError, "not on this conv2d layer"),
    ],
)
def test_refusals_name_the_problem(change: dict[str, object], error: type[Exception], needle: str) -> None:
    needs_torch_backend()
    model = torch.nn.Sequential()
    model.add_module("lin0", torch.nn.Linear(4, 4))
    model.add_module("conv", torch.nn.Conv2d(3, 4, 3))
    spec = {"peft_type": "LORA", **config(target_modules=["lin0"]), **change}
    with pytest.raises(error, match=needle):
        peftdecl.preprocess_corda(model, spec, run_model=lambda: None)


def test_missing_calibration_is_refused() -> None:
    needs_torch_backend()
    model = base_model()
    spec = {"peft_type": "LORA", **config()}
    with pytest.raises(TargetError, match="needs run_model"):
        peftdecl.preprocess_corda(model, spec)
    with pytest.raises(TargetError, match="lin1: run_model\\(\\) never called"):
        peftdecl.preprocess_corda(model, spec, run_model=lambda: model.lin0(BATCHES[0]))
    with pytest.raises(TargetError, match="needs this layer's CorDA eigens"):
        peftdecl.attach(model, spec, backend="torch")


def test_corda_config_defaults_as_peft() -> None:
    spec = load_spec({"peft_type": "LORA", "init_lora_weights": "corda"})
    assert (
        spec.corda_config is None
    )  # PEFT fills in CordaConfig() with a warning; preprocess_corda does the same


def test_mlx_backend_equals_the_numpy_reference() -> None:
    """MLX has no forward hooks: an adapted MLX model is prepared from given covariances (here the ones torch
    collects on the same weights) and gets the NumPy reference's A, B and residual W, to float32 storage."""
    if "mlx" not in selected_backends():
        pytest.skip("the mlx backend is not selected")
    mx = pytest.importorskip("mlx.core")
    from peftdecl_torch.calibration import collect_covariances

    base = base_model(7)
    covariances = collect_covariances(base, TARGETS, runner(base))
    state = {k: v.detach().double().numpy() for k, v in base.state_dict().items()}
    spec = {"peft_type": "LORA", **config("kpm")}
    peftdecl.preprocess_corda(state, spec, covariances=covariances)
    reference = peftdecl.attach(state, spec, backend="numpy")
    from tests.mlx_models import mlx_mlp

    model, _ = mlx_mlp()
    model.load_weights([(k, mx.array(v.astype(np.float32))) for k, v in state.items()])
    ours = peftdecl.attach(model, {"peft_type": "LORA", "r": 2, "target_modules": ["lin0"]}, backend="mlx")
    peftdecl.preprocess_corda(ours, spec, covariances=covariances)
    ours.add_adapter("corda", spec)
    expected = reference.state_dict()
    for key, value in ours.state_dict("corda").items():
        assert rel_err(value, expected[key]) <= 1e-6  # float32 storage of the same float64 factors
    for module in TARGETS:
        assert rel_err(ours.engine.base_weight(module), reference.engine.base_weight(module)) <= 1e-6


def test_quantised_bases_are_refused_as_peft() -> None:
    """PEFT refuses CorDA on a weight that is not float32/16/bf16 ("initialize CorDA under float32 ..."); a
    quantised layer is refused before any calibration runs."""
    from peftdecl.lora_init import weight_initialised
    from peftdecl.plan import LayerInfo, ModelInfo, compile_plan

    info = ModelInfo(layers={"m": LayerInfo("linear", 8, 6, quantization="bnb_4bit")}, modules=("m",))
    plan = compile_plan(load_spec({"peft_type": "LORA", **config(target_modules=["m"])}), info)
    with pytest.raises(TargetError, match="quantised"):
        weight_initialised(plan, {"m.lora_A.weight": np.zeros(1)}, lambda _m: np.ones((6, 8)), model=object())
