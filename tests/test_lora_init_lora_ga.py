"""LoRA-GA (``init_lora_weights="lora_ga"``, ``preprocess_loraga``) against HF PEFT 0.21.2.

The gradients are PEFT's exactly (the same float32 autograd). A and B come from ``torch.svd_lowrank`` of the
gradient, whose Gaussian test matrix PEFT draws from torch's global generator and peftdecl from its own seeded one:
given PEFT's test matrices (recorded) ours are PEFT's to float32 rounding (float64 here) up to the sign of each
singular pair, which LAPACK chooses (torch's MKL sgesdd and NumPy's OpenBLAS dgesdd disagree on some), so each
row of A and column of B is aligned to PEFT's before comparing; with our own test matrices the same holds because
the gradients here have rank ≤ q, where the randomised SVD is exact.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

import peftdecl
from peftdecl.errors import PeftdeclError, SpecError, TargetError
from peftdecl.inits.lora_ga import lora_ga_factors
from peftdecl.spec.data_inits import LoraGAConfig
from tests.conftest import rel_err, selected_backends

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOL = 1e-5  # float32 (PEFT) against float64 (here) through QR, SVD and products of 16 × 16 matrices
TARGETS = ["lin0", "lin1"]
R = 2


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = torch.nn.Linear(16, 16)
        self.lin1 = torch.nn.Linear(16, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


@pytest.fixture(autouse=True)
def _torch_only() -> None:
    if "torch" not in selected_backends():
        pytest.skip("the torch backend is not selected")
    warnings.simplefilter("ignore")


def base_model() -> MLP:
    torch.manual_seed(0)
    return MLP()


def train_step(model: torch.nn.Module, rows: int = 3) -> object:
    """Two batches of ``rows`` rows: each weight's gradient has rank ≤ 2·rows."""
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(rows, 16, generator=g), torch.randn(rows, 12, generator=g)) for _ in range(2)]

    def step() -> None:
        for x, y in data:
            ((model(x) - y) ** 2).mean().backward()

    return step


def config(**ga: object) -> dict[str, object]:
    return {
        "r": R,
        "lora_alpha": 4,
        "target_modules": TARGETS,
        "init_lora_weights": "lora_ga",
        "lora_ga_config": ga,
    }


def peft_lora_ga(base: MLP, cfg: dict[str, object], monkeypatch: pytest.MonkeyPatch | None = None) -> tuple:
    """PEFT's model after LoRA-GA, its gradients, and the test matrices / permutations it drew per SVD call."""
    model = copy.deepcopy(base)
    lora = peft.LoraConfig(**{**cfg, "lora_ga_config": peft.LoraGAConfig(**cfg["lora_ga_config"])})  # type: ignore[arg-type]
    peft.preprocess_loraga(model, lora, train_step(model))
    grads = {n: m._peft_loraga_grad.double().numpy() for n, m in model.named_modules() if n in TARGETS}
    draws: list[tuple[np.ndarray, np.ndarray]] = []
    if monkeypatch is not None:
        real = torch.svd_lowrank

        def recording(matrix, q=6, niter=2, M=None):  # type: ignore[no-untyped-def]
            before = torch.get_rng_state()
            result = real(matrix, q=q, niter=niter, M=M)
            after = torch.get_rng_state()
            torch.set_rng_state(before)
            test_matrix = torch.randn(min(matrix.shape), q, dtype=matrix.dtype).double().numpy()
            torch.set_rng_state(after)
            permutation = torch.randperm(2 * R).numpy()  # what direction="random" draws next
            torch.set_rng_state(after)
            draws.append((test_matrix, permutation))
            return result

        monkeypatch.setattr(torch, "svd_lowrank", recording)
    theirs = peft.get_peft_model(model, lora)
    if monkeypatch is not None:
        monkeypatch.undo()
    return theirs, grads, draws


def peft_tensors(model: object, module: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    layer = getattr(model.base_model.model, module)  # type: ignore[attr-defined]
    return tuple(  # type: ignore[return-value]
        t.detach().double().numpy()
        for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.base_layer.weight)
    )


def aligned(
    a: np.ndarray, b: np.ndarray, peft_a: np.ndarray, peft_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each row of A and column of B negated where it points away from PEFT's: A and B come from different
    singular pairs, each pair's sign being LAPACK's choice (MKL sgesdd in torch, OpenBLAS dgesdd here)."""
    return a * np.sign(np.sum(a * peft_a, axis=1))[:, None], b * np.sign(np.sum(b * peft_b, axis=0))[None, :]


CASES = [
    {"direction": "ArB2r"},
    {"direction": "ArBr"},
    {"direction": "A2rBr"},
    {"direction": "random"},
    {"scale": "weight_svd"},
    {"scale": "gd_scale", "direction": "ArBr"},
    {"scale": "unit", "stable_gamma": 4},
]


@pytest.mark.parametrize("ga", CASES)
def test_factors_equal_peft_given_its_gradients_and_test_matrices(
    ga: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = base_model()
    theirs, grads, draws = peft_lora_ga(base, config(**ga), monkeypatch)
    calls = iter(draws)
    for module in TARGETS:
        test_matrix, permutation = next(calls)
        weight_test = next(calls)[0] if ga.get("scale") == "weight_svd" else None
        a, b, w = peft_tensors(theirs, module)
        original = getattr(base, module).weight.detach().double().numpy()
        cfg = LoraGAConfig(**ga)  # type: ignore[arg-type]
        mine_a, mine_b = lora_ga_factors(
            grads[module],
            original,
            R,
            4 / R,
            cfg,
            np.random.default_rng(0),
            test_matrix,
            weight_test,
            permutation,
        )
        mine_a, mine_b = aligned(mine_a, mine_b, a, b)
        assert rel_err(mine_a, a) <= TOL
        assert rel_err(mine_b, b) <= TOL
        assert rel_err(original - (4 / R) * mine_b @ mine_a, w) <= TOL  # with PEFT's signs, PEFT's residual


def test_torch_backend_gradients_and_factors_follow_peft() -> None:
    base = base_model()
    theirs, grads, _ = peft_lora_ga(base, config())
    model = copy.deepcopy(base)
    spec = {"peft_type": "LORA", **config()}
    ours_grads = peftdecl.preprocess_loraga(model, spec, train_step(model))
    for module in TARGETS:
        assert rel_err(ours_grads[module], grads[module]) <= 1e-7  # the same float32 autograd
    ours = peftdecl.attach(model, spec, backend="torch")
    values = ours.state_dict()
    for module in TARGETS:
        a, b, _ = peft_tensors(theirs, module)
        mine_a, mine_b = values[f"{module}.lora_A.weight"], values[f"{module}.lora_B.weight"]
        mine_a, mine_b = aligned(mine_a, mine_b, a, b)  # signs: the test matrix's and LAPACK's choice
        assert rel_err(mine_a, a) <= TOL
        assert rel_err(mine_b, b) <= TOL
        original = getattr(base, module).weight.detach().double().numpy()
        delta = (
            ours.plan().layer(module).scaling
            * values[f"{module}.lora_B.weight"]
            @ values[f"{module}.lora_A.weight"]
        )
        assert (
            rel_err(ours.engine.base_weight(module) + delta, original) <= 1e-6
        )  # W − s·BA + s·BA, float32 W
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_err(ours(x).numpy(), base(x).numpy()) <= TOL  # the function is unchanged
    assert not peftdecl.inits.recalled(model, "lora_ga")  # used once, as PEFT deletes _peft_loraga_grad


def test_gradient_cache_is_peft_compatible(tmp_path: Path) -> None:
    """PEFT's cache file gives our adapter the same gradients, without running the training step."""
    base = base_model()
    lora = peft.LoraConfig(**{**config(), "lora_ga_config": peft.LoraGAConfig()})
    theirs = copy.deepcopy(base)
    peft.preprocess_loraga(theirs, lora, train_step(theirs), cache_file=str(tmp_path / "grads.pt"))
    expected = {n: m._peft_loraga_grad.double().numpy() for n, m in theirs.named_modules() if n in TARGETS}

    def fail() -> None:
        raise AssertionError("the cache should have been read")

    grads = peftdecl.preprocess_loraga(
        copy.deepcopy(base), {"peft_type": "LORA", **config()}, fail, cache_file=str(tmp_path / "grads.pt")
    )
    for module in TARGETS:
        np.testing.assert_array_equal(grads[module], expected[module])


def test_converted_adapters_load_both_ways(tmp_path: Path) -> None:
    """save_pretrained(path_initial_model_for_weight_conversion=...): a plain rank-2r LoRA on the original W."""
    base = base_model()
    theirs, _, _ = peft_lora_ga(base, config())
    theirs.peft_config["default"].init_lora_weights = True
    theirs.save_pretrained(tmp_path / "peft_init")
    theirs.peft_config["default"].init_lora_weights = "lora_ga"
    model = copy.deepcopy(base)
    spec = {"peft_type": "LORA", **config()}
    peftdecl.preprocess_loraga(model, spec, train_step(model))
    ours = peftdecl.attach(model, spec, backend="torch")
    ours.save(tmp_path / "ours_init")
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():  # "training": the same kind of change in both
        for param in [
            *ours.trainable_parameters().values(),
            *(p for n, p in theirs.named_parameters() if "lora_" in n),
        ]:
            param.add_(0.2 * torch.randn(param.shape, generator=gen))
    theirs.save_pretrained(
        tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "peft_init")
    )
    ours.save_pretrained(
        tmp_path / "ours", path_initial_model_for_weight_conversion=str(tmp_path / "ours_init")
    )
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(8))
    loaded = peftdecl.load_adapter(copy.deepcopy(base), tmp_path / "peft", backend="torch")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        assert rel_err(ours(x).numpy(), base(x).numpy()) > 1e-2  # the perturbation shows
        assert rel_err(loaded(x).numpy(), theirs(x).numpy()) <= TOL  # the same ΔW, on the original W
        assert rel_err(back(x).numpy(), ours(x).numpy()) <= TOL


def test_loading_a_lora_ga_adapter_leaves_w_as_peft_does(tmp_path: Path) -> None:
    """PEFT's saved lora_ga adapter loads without gradients: A and B from the file, W untouched."""
    base = base_model()
    theirs, _, _ = peft_lora_ga(base, config())
    theirs.save_pretrained(tmp_path / "peft")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    loaded = peftdecl.load_adapter(copy.deepcopy(base), tmp_path / "peft", backend="torch")
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert rel_err(loaded(x).numpy(), reloaded(x).numpy()) <= TOL
    np.testing.assert_array_equal(
        loaded.engine.base_weight("lin0"), base.lin0.weight.detach().double().numpy()
    )


def test_without_gradients_layers_keep_lora_default_and_embeddings_too() -> None:
    model = torch.nn.ModuleDict({"emb": torch.nn.Embedding(10, 16), "lin0": torch.nn.Linear(16, 16)})
    ours = peftdecl.attach(model, {"peft_type": "LORA", **{**config(), "target_modules": ["emb", "lin0"]}})
    values = ours.state_dict()
    assert not values["lin0.lora_B.weight"].any() and values["lin0.lora_A.weight"].any()  # A Kaiming, B = 0
    assert not values["emb.lora_embedding_A"].any()  # PEFT's embedding default: A = 0, B ~ N(0, 1)


def test_refusals_name_the_problem() -> None:
    with pytest.raises(SpecError, match=r"\$\.lora_ga_config\.direction"):
        peftdecl.load_spec({"peft_type": "LORA", **config(direction="sideways")})
    model = base_model()
    with pytest.raises(PeftdeclError, match=r"\$\.lora_ga_config"):
        peftdecl.preprocess_loraga(
            model, {**config(), "peft_type": "LORA", "lora_ga_config": None}, train_step(model)
        )
    with pytest.raises(TargetError, match="2r = 20"):
        peftdecl.preprocess_loraga(model, {"peft_type": "LORA", **config(), "r": 10}, train_step(model))
    adapted = peftdecl.attach(base_model(), {"peft_type": "LORA", "target_modules": TARGETS}, backend="torch")
    with pytest.raises(PeftdeclError, match="before the adapter is attached"):
        peftdecl.preprocess_loraga(adapted, {"peft_type": "LORA", **config()}, train_step(adapted))
    mha = torch.nn.ModuleDict({"attn": torch.nn.MultiheadAttention(8, 2)})
    with pytest.raises((TargetError, SpecError), match="lora_ga"):  # PEFT fails there too (no .weight)
        peftdecl.attach(mha, {"peft_type": "LORA", **{**config(), "target_modules": ["attn"]}})


def test_numpy_reference_equals_the_torch_backend() -> None:
    """Given the same gradients and seed, the NumPy reference draws the same test matrices and gives the same A, B
    and residual W as the torch backend (float64 against the float32 weights torch holds)."""
    model = base_model()
    spec = {"peft_type": "LORA", **config(scale="weight_svd")}
    grads = peftdecl.preprocess_loraga(model, spec, train_step(model))
    state = {k: v.detach().double().numpy() for k, v in base_model().state_dict().items()}
    peftdecl.inits.remember(
        state, "lora_ga", grads
    )  # what preprocess_loraga keeps, for a backend without autograd
    reference = peftdecl.attach(state, spec, backend="numpy", seed=4)
    ours = peftdecl.attach(model, spec, backend="torch", seed=4)
    expected, values = reference.state_dict(), ours.state_dict()
    for module in TARGETS:
        for key in ("lora_A.weight", "lora_B.weight"):
            assert rel_err(values[f"{module}.{key}"], expected[f"{module}.{key}"]) <= TOL
        assert rel_err(ours.engine.base_weight(module), reference.engine.base_weight(module)) <= TOL


def test_gpt2_conv1d_gradients_are_peft_transposed() -> None:
    """GPT-2's Conv1D stores W as [in, out]: the gradient is kept as out × in, A and B keep the function."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_layer=1,
            n_embd=16,
            n_head=2,
            vocab_size=40,
            n_positions=8,
            resid_pdrop=0,
            embd_pdrop=0,
            attn_pdrop=0,
        )
    )
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    cfg = {"r": 2, "lora_alpha": 4, "target_modules": ["c_attn", "c_fc"], "init_lora_weights": "lora_ga"}

    def step_for(model: torch.nn.Module) -> object:
        return lambda: model(input_ids=ids, labels=ids).loss.backward()

    theirs = copy.deepcopy(gpt2)
    peft.preprocess_loraga(
        theirs, peft.LoraConfig(**cfg, lora_ga_config=peft.LoraGAConfig()), step_for(theirs)
    )
    model = copy.deepcopy(gpt2)
    spec = {"peft_type": "LORA", **cfg, "lora_ga_config": {}}
    grads = peftdecl.preprocess_loraga(model, spec, step_for(model))
    for name, module in theirs.named_modules():
        if hasattr(module, "_peft_loraga_grad"):
            np.testing.assert_array_equal(grads[name], module._peft_loraga_grad.double().numpy().T)
    ours = peftdecl.attach(model, spec, backend="torch")
    with torch.no_grad():  # W − s·BA + s·BA: float32 rounding only
        assert rel_err(ours(input_ids=ids).logits.numpy(), gpt2.eval()(input_ids=ids).logits.numpy()) <= TOL


def test_dora_and_rslora_keep_the_function_and_peft_magnitude() -> None:
    """PEFT initialises DoRA's m after LoRA-GA: ‖W − s·BA + s·BA‖ = ‖W‖ per row; rsLoRA only changes s."""
    cfg = {**config(), "use_dora": True, "use_rslora": True}
    theirs, _, _ = peft_lora_ga(base_model(), cfg)
    model = base_model()
    spec = {"peft_type": "LORA", **cfg}
    peftdecl.preprocess_loraga(model, spec, train_step(model))
    ours = peftdecl.attach(model, spec, backend="torch")
    values = ours.state_dict()
    for module in TARGETS:
        layer = getattr(theirs.base_model.model, module)  # type: ignore[attr-defined]
        key = next(k for k in values if k.startswith(f"{module}.") and "magnitude" in k)
        assert (
            rel_err(values[key], layer.lora_magnitude_vector["default"].weight.detach().double().numpy())
            <= TOL
        )
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(ours(x).numpy(), base_model()(x).numpy()) <= TOL
