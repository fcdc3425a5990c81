"""add_weighted_adapter against HF PEFT 0.21 on a small torch MLP, and the exactness / refusal rules of its own.

Three LoRA adapters (two on both layers, one on lin0 only; different alphas, a negative weight) are combined by
every deterministic combination type in real PEFT and in peftdecl (torch backend, and the NumPy float64 reference
from the same tensors). The factor-merging types (``linear``, ``ties``, ``magnitude_prune``) and ``cat`` are
compared factor by factor; the SVD types by their ΔW = B A (the sign of each singular pair is the LAPACK build's
choice) and by outputs. Tolerances: PEFT works in float32, peftdecl in float64: relative 1e-5.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import peftdecl
from peftdecl.errors import PeftdeclError
from tests.conftest import rel_err, selected_backends

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

TOL = 1e-5  # float32 (PEFT) against float64 arithmetic, relative Frobenius error
MODULES = ("lin0", "lin1")
WEIGHTS = [0.7, -0.4, 1.3]
CONFIGS = {  # name -> (lora_alpha, target_modules)
    "t1": (8, ["lin0", "lin1"]),
    "t2": (16, ["lin0", "lin1"]),
    "t3": (4, ["lin0"]),
}
DETERMINISTIC = ("cat", "linear", "ties", "magnitude_prune", "svd", "ties_svd", "magnitude_prune_svd")
OPTIONS = {"density": 0.5, "majority_sign_method": "total"}


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = torch.nn.Linear(12, 16)
        self.lin1 = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def lora_config(name: str, r: int = 4, **extra: object) -> dict[str, object]:
    alpha, targets = CONFIGS[name]
    return {"r": r, "lora_alpha": alpha, "target_modules": targets, "init_lora_weights": False, **extra}


def peft_model(extra: dict[str, object] | None = None) -> tuple[MLP, object]:
    torch.manual_seed(0)
    base = MLP()
    torch.manual_seed(1)
    names = list(CONFIGS)
    model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(**lora_config(names[0], **(extra or {}))), adapter_name=names[0]
    )
    for name in names[1:]:
        model.add_adapter(name, peft.LoraConfig(**lora_config(name, **(extra or {}))))
    return base, model


def peft_factors(model: object, name: str) -> dict[str, np.ndarray]:
    out = {}
    for module in MODULES:
        layer = getattr(model.base_model.model, module)  # type: ignore[attr-defined]
        if name in layer.lora_A:
            out[f"{module}.lora_A.weight"] = layer.lora_A[name].weight.detach().double().numpy()
            out[f"{module}.lora_B.weight"] = layer.lora_B[name].weight.detach().double().numpy()
    return out


def ours_from(base: object, theirs: object, backend: str, extra: dict[str, object] | None = None) -> object:
    """peftdecl on ``base`` holding PEFT's three adapters (same tensors)."""
    if backend == "numpy":
        base = {k: v.detach().double().numpy() for k, v in base.state_dict().items()}  # type: ignore[attr-defined]
    else:
        base = copy.deepcopy(base)
    ours = peftdecl.attach(base, {"peft_type": "LORA", **lora_config("t1", **(extra or {}))}, "init", backend)
    for name in CONFIGS:
        spec = {"peft_type": "LORA", **lora_config(name, **(extra or {}))}
        ours.add_adapter(name, spec, arrays=peft_factors(theirs, name))
    return ours


def delta(factors: dict[str, np.ndarray], module: str) -> np.ndarray:
    return factors[f"{module}.lora_B.weight"] @ factors[f"{module}.lora_A.weight"]


def run(model: object, x: np.ndarray, backend: str = "torch") -> np.ndarray:
    """The model's output on x (float32 tensors on torch, float64 arrays on the NumPy reference)."""
    if backend == "numpy":
        hidden = np.maximum(model("lin0", x.astype(np.float64)), 0.0)  # type: ignore[operator]
        return np.asarray(model("lin1", hidden), dtype=np.float64)  # type: ignore[operator]
    with torch.no_grad():
        return model(torch.from_numpy(x)).double().numpy()  # type: ignore[operator,no-any-return]


@pytest.fixture(scope="module")
def combined() -> dict[str, object]:
    """PEFT and peftdecl (each backend) after every deterministic combination."""
    base, theirs = peft_model()
    backends = [b for b in ("torch", "numpy") if b in selected_backends()]
    ours = {backend: ours_from(base, theirs, backend) for backend in backends}
    for kind in DETERMINISTIC:
        theirs.add_weighted_adapter(list(CONFIGS), WEIGHTS, f"m_{kind}", combination_type=kind, **OPTIONS)
        for model in ours.values():
            model.add_weighted_adapter(list(CONFIGS), WEIGHTS, f"m_{kind}", combination_type=kind, **OPTIONS)
    return {"theirs": theirs, "ours": ours}


@pytest.mark.parametrize("kind", DETERMINISTIC)
def test_combination_equals_peft(combined: dict[str, object], kind: str) -> None:
    theirs, ours = combined["theirs"], combined["ours"]
    if not ours:
        pytest.skip("neither the torch nor the NumPy backend is selected")
    name = f"m_{kind}"
    expected = peft_factors(theirs, name)
    assert theirs.peft_config[name].r == theirs.peft_config[name].lora_alpha  # type: ignore[attr-defined]
    x = np.random.default_rng(3).standard_normal((5, 12)).astype(np.float32)
    theirs.set_adapter(name)  # type: ignore[attr-defined]
    expected_out = run(theirs, x)
    for backend, model in ours.items():  # type: ignore[union-attr]
        got = {k: np.asarray(v, np.float64) for k, v in model.engine.export(name).items()}
        spec = model.spec(name)
        assert (spec.r, spec.lora_alpha) == (theirs.peft_config[name].r,) * 2, backend  # type: ignore[attr-defined]
        for module in MODULES:
            if kind.endswith("svd"):  # singular pairs' signs differ: compare B A
                assert rel_err(delta(got, module), delta(expected, module)) <= TOL, (backend, module)
            else:
                for key in (f"{module}.lora_A.weight", f"{module}.lora_B.weight"):
                    assert rel_err(got[key], expected[key]) <= TOL, (backend, key)
        model.set_adapter(name)
        assert rel_err(run(model, x, backend), expected_out) <= TOL, backend


def test_cat_is_exact_weighted_sum() -> None:
    """cat: ΔW' = Σ w_i s_i B_i A_i, computed here in float64 from the adapters' own tensors (rsLoRA included,
    where PEFT over-scales by √r')."""
    for extra in ({}, {"use_rslora": True}):
        base, theirs = peft_model(extra)
        for backend in [b for b in ("torch", "numpy") if b in selected_backends()]:
            ours = ours_from(base, theirs, backend, extra)
            ours.add_weighted_adapter(list(CONFIGS), WEIGHTS, "sum", combination_type="cat")
            got = ours.engine.export("sum")
            assert ours.plan("sum").layers[0].scaling == 1.0
            for module in MODULES:
                expected = np.zeros(
                    (got[f"{module}.lora_B.weight"].shape[0], got[f"{module}.lora_A.weight"].shape[1])
                )
                for name, w in zip(CONFIGS, WEIGHTS, strict=True):
                    factors = peft_factors(theirs, name)
                    if f"{module}.lora_A.weight" in factors:
                        alpha, r = CONFIGS[name][0], 4
                        s = alpha / np.sqrt(r) if extra else alpha / r
                        expected += w * s * delta(factors, module)
                assert rel_err(delta(got, module), expected) <= 1e-6, (
                    backend,
                    extra,
                    module,
                )  # float32 storage


@pytest.mark.parametrize(("svd_rank", "full_matrices"), [(None, False), (10, True)])
def test_svd_rank_and_full_matrices_equal_peft(svd_rank: int | None, full_matrices: bool) -> None:
    """svd_full_matrices changes only PEFT's intermediate U, Vh: its B A is the same either way. svd_rank 10 is below
    lin0's Σ r_i = 12 (peftdecl's SVD of the small core) and above lin1's 8 (its full SVD of ΔW, whose trailing
    singular pairs are LAPACK's arbitrary completion: only B A is compared)."""
    base, theirs = peft_model()
    options = {"combination_type": "svd", "svd_rank": svd_rank}
    theirs.add_weighted_adapter(list(CONFIGS), WEIGHTS, "full", svd_full_matrices=True, **options)
    theirs.add_weighted_adapter(list(CONFIGS), WEIGHTS, "thin", svd_full_matrices=False, **options)
    full, thin = peft_factors(theirs, "full"), peft_factors(theirs, "thin")
    for module in MODULES:
        assert rel_err(delta(thin, module), delta(full, module)) <= TOL, module  # float32 LAPACK twice
    for backend in [b for b in ("torch", "numpy") if b in selected_backends()]:
        ours = ours_from(base, theirs, backend)
        ours.add_weighted_adapter(list(CONFIGS), WEIGHTS, "mix", svd_full_matrices=full_matrices, **options)
        got = ours.engine.export("mix")
        for module in MODULES:
            assert rel_err(delta(got, module), delta(full, module)) <= TOL, (backend, module)


def test_low_rank_svd_equals_the_truncated_svd_of_the_product() -> None:
    """The core SVD's factors against NumPy's SVD of B' A' formed in float64: same B A, orthonormal rows of A."""
    from peftdecl.combine_math import low_rank_svd_factors

    rng = np.random.default_rng(7)
    b_cat, a_cat = rng.standard_normal((40, 12)), rng.standard_normal((12, 30))
    for rank in (1, 5, 12):
        b, a = low_rank_svd_factors(b_cat, a_cat, rank)
        u, s, vh = np.linalg.svd(b_cat @ a_cat)
        assert rel_err(b @ a, (u[:, :rank] * s[:rank]) @ vh[:rank]) <= 1e-12, rank  # float64 rounding
        assert rel_err(b.T @ b, np.diag(s[:rank] ** 2)) <= 1e-12, rank  # orthogonal columns U S
        assert np.abs(a @ a.T - np.eye(rank)).max() <= 1e-12, rank


def test_ia3_weighted_vectors_equal_peft() -> None:
    torch.manual_seed(0)
    base = MLP()
    cfg = {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin1"], "init_ia3_weights": False}
    torch.manual_seed(2)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**cfg), adapter_name="p")
    theirs.add_adapter("q", peft.IA3Config(**cfg))
    theirs.add_weighted_adapter(["p", "q"], [0.6, 1.5], "pq")
    for backend in [b for b in ("torch", "numpy") if b in selected_backends()]:
        model = copy.deepcopy(base)
        if backend == "numpy":
            model = {k: v.detach().double().numpy() for k, v in base.state_dict().items()}
        ours = peftdecl.attach(model, {"peft_type": "IA3", **cfg}, "init", backend)
        for name in ("p", "q"):
            arrays = {
                f"{m}.ia3_l": getattr(theirs.base_model.model, m).ia3_l[name].detach().double().numpy()
                for m in MODULES
            }
            ours.add_adapter(name, {"peft_type": "IA3", **cfg}, arrays=arrays)
        ours.add_weighted_adapter(["p", "q"], [0.6, 1.5], "pq")
        got = ours.engine.export("pq")
        for m in MODULES:
            expected = getattr(theirs.base_model.model, m).ia3_l["pq"].detach().double().numpy()
            assert rel_err(got[f"{m}.ia3_l"], expected) <= TOL, (backend, m)


@pytest.mark.parametrize(
    ("adapters", "options", "field"),
    [
        (["t1", "t2"], {"combination_type": "average"}, "combination_type"),
        (["t1", "t2"], {"combination_type": "svd", "svd_rank": 11}, "svd_rank"),  # lin1's ΔW is 10×16
        (["t1", "t2"], {"combination_type": "ties"}, "density"),
        (
            ["t1", "t2"],
            {"combination_type": "ties", "density": 0.5, "majority_sign_method": "mean"},
            "majority",
        ),
        (["t1", "t2"], {"combination_type": "dare_linear"}, "density"),
        (["t1", "missing"], {}, "adapters"),
        (["t1", "r8"], {"combination_type": "linear"}, "adapters"),  # linear needs one rank
        (["t1", "dora"], {}, "adapters"),
        (["t1", "bias"], {}, "adapters"),
        (["t1", "t1"], {"weights": [1.0]}, "weights"),
    ],
)
def test_refusals_name_the_argument_and_leave_the_model(
    adapters: list[str], options: dict[str, object], field: str
) -> None:
    state = {k: v.detach().double().numpy() for k, v in MLP().state_dict().items()}
    ours = peftdecl.attach(state, {"peft_type": "LORA", **lora_config("t1")}, "t1", "numpy")
    ours.add_adapter("t2", {"peft_type": "LORA", **lora_config("t2")})
    ours.add_adapter("r8", {"peft_type": "LORA", **lora_config("t2", r=8)})
    ours.add_adapter("dora", {"peft_type": "LORA", **lora_config("t2", use_dora=True)})
    ours.add_adapter("bias", {"peft_type": "LORA", **lora_config("t2", lora_bias=True)})
    before = {name: ours.engine.export(name) for name in ours.adapters}
    weights = options.pop("weights", [1.0] * len(adapters))
    with pytest.raises(PeftdeclError, match=field):
        ours.add_weighted_adapter(adapters, weights, "new", **options)
    assert set(ours.adapters) == set(before)
    for name, arrays in before.items():
        assert all(np.array_equal(v, ours.engine.export(name)[k]) for k, v in arrays.items())


class Mixed(torch.nn.Module):
    """An embedding, a 3×3 convolution and a linear layer (LoRA's three layouts)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.conv = torch.nn.Conv2d(3, 6, 3)
        self.lin = torch.nn.Linear(8, 5)


def layer_factors(model: object, name: str, module: str) -> dict[str, np.ndarray]:
    layer = getattr(model.base_model.model, module)  # type: ignore[attr-defined]
    if module == "emb":
        a, b = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
        keys = (f"{module}.lora_embedding_A", f"{module}.lora_embedding_B")
    else:
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        keys = (f"{module}.lora_A.weight", f"{module}.lora_B.weight")
    return {keys[0]: a.detach().double().numpy(), keys[1]: b.detach().double().numpy()}


def flat_delta(factors: dict[str, np.ndarray], module: str) -> np.ndarray:
    a, b = (factors[k] for k in sorted(factors) if k.startswith(module + "."))
    return b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)


def burn_peft_injection_draws(rank: int) -> None:
    """The torch draws of PEFT injecting a rank-``rank`` adapter into :class:`Mixed` (init_lora_weights=False)."""
    torch.randn((rank, 20)), torch.randn((8, rank))
    torch.nn.Conv2d(3, rank, 3, bias=False), torch.nn.Conv2d(rank, 6, 1, bias=False)
    torch.nn.Linear(8, rank, bias=False), torch.nn.Linear(rank, 5, bias=False)


@pytest.mark.parametrize("kind", ["cat", "svd", "linear", "ties", "dare_ties", "dare_linear_svd"])
def test_embedding_and_conv_layers_equal_peft(kind: str) -> None:
    if "torch" not in selected_backends():
        pytest.skip("the torch backend is not selected")
    torch.manual_seed(0)
    base = Mixed()
    modules = ["emb", "conv", "lin"]
    # cat and svd take adapters of different ranks; the others need one rank
    configs = {"u1": (4, 8), "u2": (3 if kind in ("cat", "svd") else 4, 12)}
    torch.manual_seed(4)
    names = list(configs)
    cfgs = {
        n: {"r": r, "lora_alpha": alpha, "target_modules": modules, "init_lora_weights": False}
        for n, (r, alpha) in configs.items()
    }
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(**cfgs[names[0]]), adapter_name=names[0]
    )
    theirs.add_adapter(names[1], peft.LoraConfig(**cfgs[names[1]]))
    torch.manual_seed(9)  # DARE: the same torch seed, and the same draws before the masks
    theirs.add_weighted_adapter(names, [0.8, -0.5], "mix", combination_type=kind, density=0.6)
    ours = peftdecl.attach(copy.deepcopy(base), {"peft_type": "LORA", **cfgs[names[0]]}, "init", "torch")
    for n in names:
        arrays = {k: v for m in modules for k, v in layer_factors(theirs, n, m).items()}
        ours.add_adapter(n, {"peft_type": "LORA", **cfgs[n]}, arrays=arrays)
    torch.manual_seed(9)
    burn_peft_injection_draws(4)
    ours.add_weighted_adapter(names, [0.8, -0.5], "mix", combination_type=kind, density=0.6)
    got = ours.engine.export("mix")
    for module in modules:
        expected = layer_factors(theirs, "mix", module)
        if kind.endswith("svd"):
            assert rel_err(flat_delta(got, module), flat_delta(expected, module)) <= TOL, module
        else:
            for key, value in expected.items():
                assert rel_err(got[key], value) <= TOL, key


def test_svd_clamp_clips_to_the_quantile_as_torch_does() -> None:
    """svd_clamp: B' and A' clipped to ±q, q the clamp quantile of all their entries (torch.quantile here), B' A'
    the truncated SVD of Σ w_i s_i B_i A_i taken here with NumPy's LAPACK (the signs of its pairs matter)."""
    state = {k: v.detach().double().numpy() for k, v in MLP().state_dict().items()}
    ours = peftdecl.attach(state, {"peft_type": "LORA", **lora_config("t1")}, "t1", "numpy", seed=1)
    ours.add_adapter("t2", {"peft_type": "LORA", **lora_config("t2")}, seed=2)
    ours.add_weighted_adapter(["t1", "t2"], [1.0, 0.5], "clamped", combination_type="svd", svd_clamp=0.8)
    clamped = ours.engine.export("clamped")
    for module in MODULES:
        total = sum(  # scalings alpha / r: 8 / 4 and 16 / 4
            w * s * delta(ours.engine.export(name), module)
            for name, w, s in (("t1", 1.0, 2.0), ("t2", 0.5, 4.0))
        )
        u, sv, vh = np.linalg.svd(total)
        a, b = torch.from_numpy(vh[:4]), torch.from_numpy(u[:, :4] * sv[:4])
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), 0.8)
        for x, tensor in (("A", a), ("B", b)):
            expected = tensor.clamp(-high, high).numpy()
            assert np.abs(expected - tensor.numpy()).max() > 0  # the clamp bites
            assert rel_err(clamped[f"{module}.lora_{x}.weight"], expected) <= 1e-12  # float64 both


@pytest.mark.parametrize("kind", ["svd", "ties_svd"])
def test_svd_clamp_on_torch_equals_peft(kind: str) -> None:
    """On torch the SVD is torch's float32 routine, as PEFT's: the singular pairs get PEFT's signs, so the clamp's
    quantile, and so each clipped factor, equals PEFT's (not only B A)."""
    if "torch" not in selected_backends():
        pytest.skip("the torch backend is not selected")
    base, theirs = peft_model()
    options = {"combination_type": kind, "svd_clamp": 0.8, "density": 0.5}
    theirs.add_weighted_adapter(list(CONFIGS), WEIGHTS, "clamped", **options)  # type: ignore[attr-defined]
    expected = peft_factors(theirs, "clamped")
    ours = ours_from(base, theirs, "torch")
    ours.add_weighted_adapter(list(CONFIGS), WEIGHTS, "clamped", **options)  # type: ignore[attr-defined]
    got = ours.engine.export("clamped")  # type: ignore[attr-defined]
    for key, value in expected.items():
        assert rel_err(np.asarray(got[key], np.float64), value) <= 1e-5, (
            key
        )  # float32 SVDs of ΔWs equal to rounding


def test_regex_targets_are_joined_as_peft_does() -> None:
    state = {k: v.detach().double().numpy() for k, v in MLP().state_dict().items()}
    ours = peftdecl.attach(
        state, {"peft_type": "LORA", **lora_config("t1", target_modules="lin0")}, "t1", "numpy"
    )
    ours.add_adapter("t2", {"peft_type": "LORA", **lora_config("t2", target_modules=".*1")})
    ours.add_adapter("list", {"peft_type": "LORA", **lora_config("t2")})
    ours.add_weighted_adapter(["t1", "t2"], [1.0, 1.0], "both", combination_type="cat")
    assert ours.spec("both").target_modules == "(lin0)|(.*1)"
    assert set(ours.plan("both").targets) == set(MODULES)
    with pytest.raises(PeftdeclError, match="adapters"):  # PEFT refuses a regex mixed with a list too
        ours.add_weighted_adapter(["t1", "list"], [1.0, 1.0], "mixed", combination_type="cat")
    assert "mixed" not in ours.adapters


def test_saved_combination_loads_in_peft(tmp_path: object) -> None:
    """The combined adapter is an ordinary one: PEFT loads peftdecl's saved folder and gives the same outputs
    (rsLoRA adapters here, whose combination PEFT itself over-scales)."""
    if "torch" not in selected_backends():
        pytest.skip("the torch backend is not selected")
    extra = {"use_rslora": True}
    base, theirs = peft_model(extra)
    ours = ours_from(base, theirs, "torch", extra)
    ours.add_weighted_adapter(list(CONFIGS), WEIGHTS, "mix", combination_type="cat")
    ours.save(tmp_path, adapters=["mix"])  # type: ignore[arg-type]
    folder = tmp_path / "mix" if (tmp_path / "mix").is_dir() else tmp_path  # type: ignore[operator]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder)
    x = np.random.default_rng(5).standard_normal((4, 12)).astype(np.float32)
    ours.set_adapter("mix")
    assert rel_err(run(ours, x), run(loaded, x)) <= TOL
    theirs.add_weighted_adapter(list(CONFIGS), WEIGHTS, "mix", combination_type="cat")
    theirs.set_adapter("mix")  # type: ignore[attr-defined]
    off = rel_err(run(theirs, x) - run(base, x), run(ours, x) - run(base, x))
    assert off > 0.5  # PEFT's rsLoRA combination is √(Σ r_i)× too large (PEFT #3761)


@pytest.mark.parametrize("rule", ["dare_linear", "dare_ties"])
def test_dare_rule_equals_peft_given_the_torch_seed(rule: str) -> None:
    """The masks come from torch's global generator in PEFT's order: PEFT's merge_utils rule, same seed, same result."""
    from peft.utils import merge_utils

    from peftdecl.combine_math import combine
    from peftdecl_torch.dare_masks import keep_mask

    tensors = [torch.randn(6, 9) for _ in range(3)]
    weights = [0.5, -1.2, 0.9]
    torch.manual_seed(11)
    expected = getattr(merge_utils, rule)(tensors, torch.tensor(weights), 0.4).double().numpy()
    torch.manual_seed(11)
    got = combine(rule, [t.double().numpy() for t in tensors], weights, 0.4, "total", keep_mask)
    assert rel_err(got, expected) <= 1e-6  # same masks; float32 (PEFT) against float64 sums


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_on_torch_equals_peft_given_the_torch_seed(kind: str) -> None:
    """Same torch seed before the call: PEFT first draws its new adapter's nn.Linear initialisations (layer by layer,
    A then B), then the masks; after the same initialisation draws here, peftdecl's masks are PEFT's."""
    if "torch" not in selected_backends():
        pytest.skip("the torch backend is not selected")
    base, theirs = peft_model()
    ours = ours_from(base, theirs, "torch")
    names = ["t1", "t2"]
    torch.manual_seed(21)
    theirs.add_weighted_adapter(names, [0.7, -0.4], "dare", combination_type=kind, density=0.5)
    torch.manual_seed(21)
    for module in MODULES:  # the draws of PEFT's injection of the new rank-4 adapter
        layer = getattr(base, module)
        torch.nn.Linear(layer.in_features, 4, bias=False), torch.nn.Linear(4, layer.out_features, bias=False)
    ours.add_weighted_adapter(names, [0.7, -0.4], "dare", combination_type=kind, density=0.5)
    got, expected = ours.engine.export("dare"), peft_factors(theirs, "dare")
    for module in MODULES:
        if kind.endswith("svd"):
            assert rel_err(delta(got, module), delta(expected, module)) <= TOL, module
        else:
            for key in (f"{module}.lora_A.weight", f"{module}.lora_B.weight"):
                assert rel_err(got[key], expected[key]) <= TOL, key


def test_dare_is_unbiased_on_numpy() -> None:
    """NumPy's masks (seeded): the mean of dare_linear's B over seeds tends to linear's B (E[m / density] = 1),
    while one draw is far from it."""
    state = {k: v.detach().double().numpy() for k, v in MLP().state_dict().items()}
    ours = peftdecl.attach(state, {"peft_type": "LORA", **lora_config("t1")}, "t1", "numpy", seed=1)
    ours.add_adapter("t2", {"peft_type": "LORA", **lora_config("t2")}, seed=2)
    ours.add_weighted_adapter(["t1", "t2"], [0.7, 0.4], "lin", combination_type="linear")
    key = "lin1.lora_B.weight"
    draws = []
    for seed in range(200):
        ours.add_weighted_adapter(
            ["t1", "t2"], [0.7, 0.4], "d", combination_type="dare_linear", density=0.3, seed=seed
        )
        draws.append(ours.engine.export("d")[key])
        ours.delete_adapter("d")
    linear = ours.engine.export("lin")[key]
    assert rel_err(np.mean(draws, axis=0), linear) <= 0.15  # Monte Carlo: ~1/√200 relative spread per entry
    assert rel_err(draws[0], linear) > 0.3  # one draw is far from it: the masks are random


@pytest.mark.parametrize("kind", ["cat", "svd", "ties"])
def test_mlx_backend_equals_the_numpy_reference(kind: str) -> None:
    """The same adapters on MLX (float32) and on the NumPy reference: the same combination and outputs."""
    if "mlx" not in selected_backends():
        pytest.skip("the mlx backend is not selected")
    from tests.mlx_models import mlx_mlp, mx

    model, state = mlx_mlp()
    specs = {n: {"peft_type": "LORA", **lora_config(n)} for n in CONFIGS}
    reference = peftdecl.attach(state, specs["t1"], "init", "numpy")
    ours = peftdecl.attach(model, specs["t1"], "init", "mlx")
    for seed, name in enumerate(CONFIGS, start=1):
        reference.add_adapter(name, specs[name], seed=seed)
        ours.add_adapter(name, specs[name], arrays=reference.engine.export(name))
    for adapted in (reference, ours):
        adapted.add_weighted_adapter(list(CONFIGS), WEIGHTS, "mix", combination_type=kind, density=0.5)
        adapted.set_adapter("mix")
    x = np.random.default_rng(6).standard_normal((3, 12)).astype(np.float32)
    for module in MODULES:
        got, expected = ours.engine.export("mix"), reference.engine.export("mix")
        assert rel_err(delta(got, module), delta(expected, module)) <= 1e-5, module  # float32 inputs on MLX
    assert rel_err(np.array(ours(mx.array(x))), run(reference, x, "numpy")) <= 1e-5  # float32 forward
