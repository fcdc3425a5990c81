"""LoRA variants VeLoRA, KaSA, BD-LoRA and MonteCLoRA against HF PEFT 0.21 (torch) and the NumPy reference.

Expected numbers come from real PEFT (its layers, its saved folders, its losses), from NumPy's float64 SVD, or
from the NumPy reference; the outputs, merged outputs and gradients of one small MLP are compared both ways
through saved folders, and training-mode behaviour (VeLoRA's compressed gradient, MonteCLoRA's noise given the
same draws, the variants' losses) against PEFT's own computation.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import peftdecl
from peftdecl.errors import PeftdeclError, SpecError
from peftdecl.spec import load_spec
from tests.conftest import rel_err, selected_backends

F32 = 1e-5  # float32 forward/backward of the same numbers (CONTRIBUTING's bound for float32)
MERGED = 1e-5  # merged model outputs in float32: one extra rounding of W + ΔW per layer


# --- the spec: nested sub-configs validated, errors at their JSON paths (no torch needed) -----------------------


@pytest.mark.parametrize(
    ("fields", "path", "fragment"),
    [
        ({"velora_config": {"num_groups": 0}}, "$.velora_config.num_groups", ">= 1"),
        ({"velora_config": {"scale": 0.0}}, "$.velora_config.scale", "> 0"),
        ({"velora_config": {"init_type": "mean"}}, "$.velora_config.init_type", "batch_average"),
        ({"kasa_config": {"beta": -1.0}}, "$.kasa_config.beta", ">= 0"),
        ({"kasa_config": {"gamma": -0.5}}, "$.kasa_config.gamma", ">= 0"),
        ({"use_bdlora": {"nblocks": 0}}, "$.use_bdlora.nblocks", ">= 1"),
        ({"use_bdlora": {"target_modules_bd_a": "q"}}, "$.use_bdlora.target_modules_bd_a", "list"),
        (
            {"use_bdlora": {"target_modules_bd_a": ["q"], "target_modules_bd_b": ["q", "k"]}},
            "$.use_bdlora.target_modules_bd_b",
            "also in target_modules_bd_a",
        ),
        ({"monteclora_config": {"num_samples": 0}}, "$.monteclora_config.num_samples", ">= 1"),
        ({"monteclora_config": {"dirichlet_prior": 0.0}}, "$.monteclora_config.dirichlet_prior", "> 0"),
        ({"kasa_config": {}, "use_dora": True}, "$.kasa_config", "use_dora"),
        ({"kasa_config": {}, "velora_config": {}}, "$.kasa_config", "velora_config"),
    ],
)
def test_bad_sub_configs_are_refused_at_their_field(fields: dict, path: str, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        load_spec({"peft_type": "LORA", **fields})
    found = dict(info.value.problems)
    assert path in found, found
    assert fragment in found[path]


@pytest.mark.parametrize(
    ("field", "kind"),
    [
        ("velora_config", "velora"),
        ("kasa_config", "kasa"),
        ("use_bdlora", "bdlora"),
        ("monteclora_config", "monteclora"),
    ],
)
def test_each_field_selects_its_kind_and_adalora_refuses_it(field: str, kind: str) -> None:
    spec = load_spec({"peft_type": "LORA", field: {}})
    assert spec.kind == kind
    assert load_spec(spec.to_dict()) == spec  # round trip through the saved config
    with pytest.raises(SpecError, match=rf"\$\.{field}"):
        load_spec({"peft_type": "ADALORA", "total_step": 10, field: {}})


def test_kasa_refuses_a_rank_that_leaves_no_singular_component() -> None:
    state = {"m.weight": np.ones((6, 4))}
    with pytest.raises(PeftdeclError, match="min\\(in_features, out_features\\) = 4"):
        peftdecl.attach(state, {"peft_type": "LORA", "r": 4, "target_modules": ["m"], "kasa_config": {}})


def test_bdlora_refuses_unmatched_targets_and_indivisible_blocks() -> None:
    state = {"m.weight": np.ones((6, 4)), "n.weight": np.ones((4, 6))}
    spec: dict[str, Any] = {"peft_type": "LORA", "r": 4, "target_modules": ["m", "n"]}
    with pytest.raises(PeftdeclError, match="n: matches neither"):
        peftdecl.attach(state, {**spec, "use_bdlora": {"target_modules_bd_a": ["m"], "nblocks": 2}})
    with pytest.raises(PeftdeclError, match="nblocks=4 must divide out_features"):
        peftdecl.attach(state, {**spec, "use_bdlora": {"target_modules_bd_b": ["m", "n"], "nblocks": 4}})


def test_kasa_truncates_the_base_weight_like_a_float64_svd() -> None:
    rng = np.random.default_rng(3)
    w = rng.normal(size=(7, 5))
    model = peftdecl.attach(
        {"m.weight": w}, {"peft_type": "LORA", "r": 2, "target_modules": ["m"], "kasa_config": {}}
    )
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    expected = (u[:, :3] * s[:3]) @ vh[:3]
    # float32 SVD where torch is installed (PEFT's computation): ~1e-6 relative
    assert rel_err(model.engine.base_weight("m"), expected) <= 1e-5
    assert np.linalg.matrix_rank(model.engine.base_weight("m"), tol=1e-4) == 3
    assert model.state_dict()["m.lora_diag"].shape == (2,)
    assert not model.state_dict()["m.lora_B.weight"].any()  # B = 0: the update starts at zero


def test_bdlora_block_diagonal_factor_equals_its_dense_lora() -> None:
    """The blocked A is LoRA with the dense block-diagonal A (independent: np.kron-free explicit blocks)."""
    rng = np.random.default_rng(4)
    state = {"m.weight": rng.normal(size=(6, 4))}
    spec = {"peft_type": "LORA", "r": 4, "target_modules": ["m"], "init_lora_weights": False}
    bd = peftdecl.attach(state, {**spec, "use_bdlora": {"target_modules_bd_a": ["m"], "nblocks": 2}})
    a = bd.state_dict()["m.lora_A.weight"]  # [r, in / 2]: rows 0-1 read inputs 0-1, rows 2-3 inputs 2-3
    dense = np.zeros((4, 4))
    dense[:2, :2], dense[2:, 2:] = a[:2], a[2:]
    plain = peftdecl.attach(state, spec)
    plain.add_adapter("dense", spec, arrays={**bd.state_dict(), "m.lora_A.weight": dense}, activate=True)
    x = rng.normal(size=(3, 4))
    assert rel_err(np.asarray(bd("m", x)), np.asarray(plain("m", x))) <= 1e-12  # float64, same products


# --- against HF PEFT on torch ------------------------------------------------------------------------------------

torch_needed = pytest.mark.skipif(
    "torch" not in selected_backends() or importlib.util.find_spec("peft") is None,
    reason="needs the torch backend (selected by PEFTDECL_TEST_BACKENDS) and peft",
)


def _torch() -> Any:
    return pytest.importorskip("torch")


def mlp() -> Any:
    torch = _torch()

    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin0 = torch.nn.Linear(12, 16)
            self.lin1 = torch.nn.Linear(16, 8)

        def forward(self, x: Any) -> Any:
            return self.lin1(torch.relu(self.lin0(x)))

    torch.manual_seed(0)
    return MLP()


def peft_config(**fields: Any) -> Any:
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import config as lora_config

    sub = {
        "velora_config": lora_config.VeloraConfig,
        "kasa_config": lora_config.KasaConfig,
        "use_bdlora": lora_config.BdLoraConfig,
        "monteclora_config": lora_config.MontecloraConfig,
    }
    kwargs = {k: sub[k](**v) if k in sub else v for k, v in fields.items()}
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], **kwargs)


def perturbed_peft(**fields: Any) -> Any:
    """PEFT's model with every trainable tensor moved off its initial value (seeded)."""
    torch, peft = _torch(), pytest.importorskip("peft")
    wrapped = peft.get_peft_model(mlp(), peft_config(**fields))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in wrapped.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return wrapped


CASES = {
    "velora": {"velora_config": {"num_groups": 3, "init_type": "random"}},
    "kasa": {"kasa_config": {"beta": 0.01, "gamma": 0.02}},
    "bdlora": {
        "use_bdlora": {"target_modules_bd_a": ["lin1"], "target_modules_bd_b": ["lin0"], "nblocks": 2}
    },
    "monteclora": {"monteclora_config": {"num_samples": 3}},
}


@torch_needed
@pytest.mark.parametrize("kind", list(CASES))
def test_peft_folder_loads_with_equal_outputs_and_merge(kind: str, tmp_path: Path) -> None:
    torch = _torch()
    theirs = perturbed_peft(**CASES[kind]).eval()
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    theirs.save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(mlp(), tmp_path, backend="torch")
    assert ours.plan().kind == kind
    with torch.no_grad():
        expected = theirs(x)
        assert rel_err(ours(x).numpy(), expected.numpy()) <= F32
        merged_theirs = theirs.merge_and_unload()(x)
        merged_ours = ours.merge_and_unload()(x)
    assert rel_err(merged_ours.numpy(), merged_theirs.numpy()) <= MERGED


@torch_needed
@pytest.mark.parametrize("kind", list(CASES))
def test_our_folder_loads_in_peft_with_equal_outputs(kind: str, tmp_path: Path) -> None:
    torch, peft = _torch(), pytest.importorskip("peft")
    spec = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["lin0", "lin1"], **CASES[kind]}
    ours = peftdecl.attach(mlp(), spec, backend="torch", seed=3)
    with (
        torch.no_grad()
    ):  # B starts at zero in most variants: move every tensor so the comparison proves something
        for param in ours.trainable_parameters().values():
            param.add_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    ours.eval()
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(mlp(), tmp_path).eval()  # PEFT re-truncates KaSA's base itself
    with torch.no_grad():
        assert rel_err(ours(x).numpy(), theirs(x).numpy()) <= F32
    saved = {k for k in theirs.state_dict() if "lora_" in k}
    assert any("lora_diag" in k for k in saved) == (kind == "kasa")
    assert any("lora_velora_embed" in k for k in saved) == (kind == "velora")


def grads_of(params: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: v.grad.double().numpy() for k, v in params.items() if v.grad is not None}


def peft_grad(model: Any, module: str, name: str) -> np.ndarray:
    return dict(model.named_parameters())[f"base_model.model.{module}.{name}"].grad.double().numpy()


@torch_needed
@pytest.mark.parametrize("init_type", ["random", "batch_average", "batch_average_once"])
def test_velora_training_gradients_are_peft_s_compressed_ones(init_type: str, tmp_path: Path) -> None:
    """Same weights, same batches in training mode (two steps, so that 'batch_average_once' keeps its first
    projection and 'batch_average' takes the second batch's): A's gradient is PEFT's compressed one, B's exact."""
    torch = _torch()
    config = {"velora_config": {"num_groups": 5, "init_type": init_type, "scale": 0.7}}
    theirs = perturbed_peft(**config)
    theirs.save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(mlp(), tmp_path, backend="torch", is_trainable=True).train()
    theirs.train()
    for step in range(2):
        x = torch.randn(2, 3, 12, generator=torch.Generator().manual_seed(2 + step)) + step
        dy = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(3))
        theirs.zero_grad()
        for param in ours.trainable_parameters().values():
            param.grad = None
        (theirs(x) * dy).sum().backward()
        (ours(x) * dy).sum().backward()
        got = grads_of(ours.trainable_parameters())
        for module in ("lin0", "lin1"):
            for factor in ("lora_A", "lora_B"):
                expected = peft_grad(theirs, module, f"{factor}.default.weight")
                assert rel_err(got[f"{module}.{factor}.weight"], expected) <= F32, (step, module, factor)
        # the projection was set from the batch as PEFT sets it
        buffers = dict(theirs.named_buffers())
        embed = buffers["base_model.model.lin0.lora_velora_embed.default"].double().numpy()
        assert rel_err(ours.state_dict()["lin0.lora_velora_embed"], embed) <= F32, step
    # and the compressed gradient differs from the exact one (else the test proves nothing)
    exact = peftdecl.load_adapter(mlp(), tmp_path, backend="torch", is_trainable=True).eval()
    (exact(x) * dy).sum().backward()
    exact_a = grads_of(exact.trainable_parameters())["lin0.lora_A.weight"]
    assert rel_err(exact_a, got["lin0.lora_A.weight"]) > 1e-2


@torch_needed
def test_velora_numpy_reference_backward_matches_peft(tmp_path: Path) -> None:
    torch = _torch()
    theirs = perturbed_peft(velora_config={"num_groups": 5, "init_type": "batch_average"})
    theirs.save_pretrained(tmp_path)
    lin0 = theirs.base_model.model.lin0
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(2))
    dy = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    theirs.train()
    (lin0(x) * dy).sum().backward()
    state = {k: v.detach().double().numpy() for k, v in mlp().state_dict().items()}
    ours = peftdecl.load_adapter(state, tmp_path, backend="numpy", is_trainable=True).train()
    y, tape = ours.engine.layer_forward("lin0", x.double().numpy())
    grads = ours.engine.layer_backward("lin0", tape, dy.double().numpy())
    assert rel_err(y, lin0(x).detach().double().numpy()) <= F32
    for factor in ("lora_A", "lora_B"):
        expected = lin0.get_parameter(f"{factor}.default.weight").grad.double().numpy()
        assert rel_err(grads[f"lin0.{factor}.weight"], expected) <= F32, factor


@torch_needed
def test_kasa_loss_equals_peft_s(tmp_path: Path) -> None:
    torch = _torch()
    from peftdecl_torch.kinds.kasa import kasa_loss

    theirs = perturbed_peft(**CASES["kasa"])
    theirs.save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(mlp(), tmp_path, backend="torch", is_trainable=True)
    expected = theirs.base_model._get_kasa_loss()
    got = kasa_loss(ours)
    assert isinstance(got, torch.Tensor)
    assert float(ours._get_kasa_loss().detach()) == float(got.detach())  # under PEFT's name too
    assert rel_err(got.detach().numpy(), expected.detach().numpy()) <= F32
    expected.backward()
    got.backward()
    grads = grads_of(ours.trainable_parameters())
    assert rel_err(grads["lin0.lora_diag"], peft_grad(theirs, "lin0", "lora_diag.default")) <= F32


def _same_draws(theirs: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make our MonteCLoRA layers use the draws PEFT's samplers hand out (in the same order: lin0, lin1)."""
    import peftdecl_torch.kinds.monteclora as ours_mc

    queue: list[tuple[Any, Any, Any]] = []
    for module in ("lin0", "lin1"):
        sampler = getattr(theirs.base_model.model, module).lora_monteclora_sampler["default"]
        buffered = sampler.sampler
        original = buffered.get

        def record(original: Any = original) -> dict[str, Any]:
            sample = original()
            queue.append((sample["z_mvn"], sample["z_wishart"].diagonal(), sample["z_dirichlet"]))
            return sample

        monkeypatch.setattr(buffered, "get", record)
    monkeypatch.setattr(
        ours_mc, "draw", lambda layer, n, in_features, r, like: tuple(t.to(like.dtype) for t in queue.pop(0))
    )


@torch_needed
def test_monteclora_training_step_equals_peft_given_the_same_draws(tmp_path: Path, monkeypatch) -> None:
    torch = _torch()
    from peftdecl_torch.kinds.monteclora import monteclora_loss

    config = {"monteclora_config": {"num_samples": 3, "sample_scaler": 0.05, "use_entropy": True}}
    theirs = perturbed_peft(**config)
    theirs.save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(mlp(), tmp_path, backend="torch", is_trainable=True).train()
    theirs.train()
    _same_draws(theirs, monkeypatch)
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(2))
    theirs_out = theirs(x)  # PEFT draws lin0's sample, then lin1's; ours replays them in that order
    ours_out = ours(x)
    assert rel_err(ours_out.detach().numpy(), theirs_out.detach().numpy()) <= F32
    with torch.no_grad():
        plain = theirs.eval()(x)
    assert rel_err(theirs_out.detach().numpy(), plain.numpy()) > 1e-4  # the noise changed the output
    theirs.train()
    ((theirs_out**2).sum() + theirs.base_model._get_monteclora_loss()).backward()
    assert float(ours._get_monteclora_loss().detach()) == float(monteclora_loss(ours).detach())  # PEFT's name
    ((ours_out**2).sum() + monteclora_loss(ours)).backward()
    got = grads_of(ours.trainable_parameters())
    sampler = "lora_monteclora_sampler"
    for name, theirs_name in [
        ("lora_A.weight", "lora_A.default.weight"),
        ("lora_B.weight", "lora_B.default.weight"),
        (f"{sampler}.std_prior", f"{sampler}.default.std_prior"),
        (f"{sampler}.expert_weights_prior", f"{sampler}.default.expert_weights_prior"),
    ]:
        assert rel_err(got[f"lin0.{name}"], peft_grad(theirs, "lin0", theirs_name)) <= F32, name


@torch_needed
def test_monteclora_math_equals_peft_s_sampler_and_draws_have_their_distribution() -> None:
    """peftdecl.monteclora_math (NumPy, what the reference draws with) against PEFT's sampler given the same
    z's; and the NumPy reference's training draws: Wishart diagonals ~ χ²_r (mean r)."""
    torch = _torch()
    from peft.tuners.lora.monteclora import MontecloraSampler

    from peftdecl import monteclora_math as mm

    torch.manual_seed(0)
    sampler = MontecloraSampler(
        in_features=6, out_features=4, num_samples=3, sample_scaler=0.1, buffer_size=2
    )
    sample = sampler.sampler.get()
    monkey = sampler.sampler
    monkey.get = lambda: sample
    noise, weights = sampler()
    std = sampler.std_prior.detach().double().numpy()
    var, ours_noise = mm.noise_columns(
        std, sample["z_wishart"].double().numpy(), sample["z_mvn"].double().numpy(), 0.1
    )
    assert rel_err(ours_noise, noise.detach().double().numpy()) <= F32
    prior = sampler.expert_weights_prior.detach().double().numpy()
    assert (
        rel_err(mm.expert_weights(prior, sample["z_dirichlet"].double().numpy()), weights.detach().numpy())
        <= F32
    )
    sampler.train()
    kl = float(sampler.get_variational_loss()[0].detach())
    ours_loss = mm.regulariser(
        std,
        prior,
        var,
        weights.detach().double().numpy(),
        sampler.kl_loss_weight,
        sampler.dirichlet_prior,
        False,
    )
    # PEFT's KL in float32 takes log(exp(lgamma(α))): that round trip costs ~1e-6 relative, within 1e-4
    assert abs(ours_loss - kl) <= 1e-4 * abs(kl)
    z = np.stack([np.diag(mm.draw_noise(np.random.default_rng(i), 1, 2, 4)[1]) for i in range(400)])
    assert abs(z.mean() - 4.0) < 0.3  # χ²_4: mean 4, the mean of 1600 draws has std 0.07


def test_kasa_and_other_adapters_do_not_share_a_model() -> None:
    """HF PEFT refuses the mix both ways (KaSA rewrites the base every other adapter sees)."""
    state = {"m.weight": np.random.default_rng(0).normal(size=(6, 5))}
    kasa = {"peft_type": "LORA", "r": 2, "target_modules": ["m"], "kasa_config": {}}
    plain = {"peft_type": "LORA", "r": 2, "target_modules": ["m"]}
    model = peftdecl.attach(state, kasa)
    with pytest.raises(PeftdeclError, match="'default' is kasa"):
        model.add_adapter("plain", plain)
    model = peftdecl.attach(state, plain)
    with pytest.raises(PeftdeclError, match=r"new adapter uses KaSA"):
        model.add_adapter("kasa", kasa)


CASES_SMALL = {
    "peft_type": "LORA",
    "r": 3,
    "lora_alpha": 6,
    "target_modules": ["m"],
    "init_lora_weights": False,
}
MC_SPEC = {
    "peft_type": "LORA",
    "r": 3,
    "lora_alpha": 6,
    "target_modules": ["m"],
    "init_lora_weights": False,
    # large noise so that the priors' gradients are far from zero
    "monteclora_config": {"num_samples": 3, "sample_scaler": 0.5},
}


def test_monteclora_reference_training_backward_matches_finite_differences() -> None:
    from tests.gradcheck import check_gradients

    rng = np.random.default_rng(5)
    model = peftdecl.attach({"m.weight": rng.normal(size=(6, 5))}, MC_SPEC, backend="numpy", seed=1).train()
    checked = check_gradients(
        model, "m", rng.normal(size=(4, 5)), seed=3
    )  # the draws replayed per evaluation
    assert {"m.lora_monteclora_sampler.std_prior", "m.lora_monteclora_sampler.expert_weights_prior"} <= set(
        checked
    )


@torch_needed
def test_monteclora_torch_training_step_matches_the_reference_given_the_same_draws(monkeypatch) -> None:
    torch = _torch()
    import peftdecl_numpy.kinds.monteclora as numpy_mc
    import peftdecl_torch.kinds.monteclora as torch_mc
    from peftdecl import monteclora_math

    draws = monteclora_math.draw_noise(np.random.default_rng(9), 3, 5, 3)
    monkeypatch.setattr(numpy_mc, "draw_noise", lambda rng, n, in_features, r: draws)
    as_torch = (torch.tensor(draws[0]), torch.tensor(np.diag(draws[1]).copy()), torch.tensor(draws[2]))
    monkeypatch.setattr(
        torch_mc, "draw", lambda layer, n, in_features, r, like: tuple(t.to(like.dtype) for t in as_torch)
    )
    rng = np.random.default_rng(5)
    weight, x, dy = rng.normal(size=(6, 5)), rng.normal(size=(4, 5)), rng.normal(size=(4, 6))
    reference = peftdecl.attach({"m.weight": weight}, MC_SPEC, backend="numpy", seed=1).train()
    y, tape = reference.engine.layer_forward("m", x)
    expected = reference.engine.layer_backward("m", tape, dy)

    class One(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = torch.nn.Linear(5, 6, bias=False, dtype=torch.float64)

    base = One()
    with torch.no_grad():
        base.m.weight.copy_(torch.tensor(weight))
    ours = peftdecl.attach(base, MC_SPEC, backend="torch", seed=1).train()
    params = ours.trainable_parameters()
    with torch.no_grad():
        for key, value in reference.state_dict().items():
            if key in params:
                params[key].copy_(torch.tensor(value))
    out = ours.base_model.m(torch.tensor(x))
    (out * torch.tensor(dy)).sum().backward()
    assert rel_err(out.detach().numpy(), y) <= 1e-10  # float64 both sides
    got = grads_of(params)
    assert set(got) == {k for k in expected if k.startswith("m.")} and len(got) == 4
    for key, grad in got.items():
        assert rel_err(grad, expected[key]) <= 1e-10, key


def test_variant_losses_are_refused_off_torch() -> None:
    state = {"m.weight": np.random.default_rng(0).normal(size=(6, 5))}
    model = peftdecl.attach(state, {"peft_type": "LORA", "r": 2, "target_modules": ["m"], "kasa_config": {}})
    with pytest.raises(PeftdeclError, match="numpy backend does not compute the kasa loss"):
        model._get_kasa_loss()


@pytest.mark.skipif("mlx" not in selected_backends(), reason="needs the MLX backend (PEFTDECL_TEST_BACKENDS)")
@pytest.mark.parametrize("init_type", ["random", "batch_average", "batch_average_once"])
def test_velora_mlx_training_gradients_match_the_reference(init_type: str) -> None:
    """MLX's custom gradient for A against the NumPy reference's explicit one, in training mode (two steps, so
    that batch_average_once keeps its first projection and batch_average takes the second batch's)."""
    from tests.backend_models import MlxDriver
    from tests.layer_cases import LINEAR

    run = MlxDriver()
    rng = np.random.default_rng(2)
    state = {k: v.astype(np.float32).astype(np.float64) for k, v in LINEAR.random_state(rng).items()}
    spec = {**CASES_SMALL, "velora_config": {"num_groups": 2, "init_type": init_type, "scale": 0.8}}
    reference = peftdecl.attach(state, spec, backend="numpy", seed=4).train()
    ours = peftdecl.attach(run.base(LINEAR, state, "float32"), spec, backend="mlx", seed=4).train()
    for step in range(2):
        x = rng.normal(size=(3, 5)).astype(np.float32).astype(np.float64) + step
        dy = rng.normal(size=(3, 6))
        y, tape = reference.engine.layer_forward("m", x)
        expected = reference.engine.layer_backward("m", tape, dy)
        got_y, got = run.vjp(ours, x, dy, "float32")
        assert rel_err(got_y, y) <= F32
        for key in ("m.lora_A.weight", "m.lora_B.weight", "input"):
            assert rel_err(got[key], expected[key]) <= F32, (step, key)


@torch_needed
def test_initial_tensors_follow_peft_s_rules() -> None:
    """Deterministic initial tensors equal PEFT's (zeros, I, 1/N); random ones follow its distributions: the
    Kaiming bound of each A (a blocked A's is √6 times LoRA's, so a wrong rule lands outside 0.5-1× of PEFT's
    largest draw), unit-norm VeLoRA projections, priors in [0, 1)."""
    peft = pytest.importorskip("peft")
    fields = {
        "velora_config": {"num_groups": 5, "init_type": "random"},
        "use_bdlora": {"target_modules_bd_a": ["lin0"], "target_modules_bd_b": ["lin1"], "nblocks": 2},
        "monteclora_config": {"num_samples": 3},
        "kasa_config": {},
    }
    for field, config in fields.items():
        wrapped = peft.get_peft_model(mlp(), peft_config(**{field: config}))
        tensors = {**dict(wrapped.named_buffers()), **dict(wrapped.named_parameters())}
        theirs = {
            k.removeprefix("base_model.model.").replace(".default", ""): v.detach().double().numpy()
            for k, v in tensors.items()
            if "lora" in k
        }
        spec = {
            "peft_type": "LORA",
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["lin0", "lin1"],
            field: config,
        }
        ours = peftdecl.attach(mlp(), spec, backend="torch", seed=5).state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}, field
        for key, value in theirs.items():
            if key.endswith("lora_B.weight") or "gaussian_var_prior" in key or key.endswith("expert_weights"):
                assert np.array_equal(ours[key], value.astype(np.float32)), key
            elif key.endswith("lora_velora_embed"):
                assert abs(np.linalg.norm(ours[key]) - 1.0) < 1e-6 and abs(np.linalg.norm(value) - 1.0) < 1e-6
            elif key.endswith("lora_A.weight"):
                assert 0.5 * np.abs(value).max() < np.abs(ours[key]).max() <= np.sqrt(6.0 / value.shape[1]), (
                    key
                )
            elif "prior" in key:
                assert ours[key].min() >= 0.0 and ours[key].max() < 1.0, key
