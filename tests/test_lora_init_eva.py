"""EVA (``init_lora_weights="eva"``) against HF PEFT 0.21.2 and against NumPy's SVD.

PEFT fits each layer's inputs with a float32 incremental PCA whose SVD is ``torch.svd_lowrank`` (q = 2k, 4 subspace
iterations, seed 42); peftdecl folds the same batches with an exact float64 SVD. Both converge to the top right
singular vectors of the same data, and both fix each vector's sign by its largest entry, so A is compared as it
is: on inputs with a clear spectral gap the randomised range finder is exact to float32 rounding, giving
‖A − A_peft‖/‖A_peft‖ ≈ 1e-7 (bound 1e-5). The redistributed ranks, alphas and target modules must be PEFT's
exactly.
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
from tests.conftest import rel_err, selected_backends

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOL = 1e-5  # float32 randomised SVD (PEFT) against float64 exact SVD on a gapped spectrum, see the module doc
TARGETS = ["lin0", "lin1", "lin2", "lin3"]
NO_PREP = {"prepare_model_inputs_fn": None, "prepare_layer_inputs_fn": None}  # custom model: every row


class Net(torch.nn.Module):
    """lin0 and lin1 read the same input x (EVA fits it once); lin2 reads z, lin3 a hidden activation of z."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = torch.nn.Linear(16, 16)
        self.lin1 = torch.nn.Linear(16, 12)
        self.lin2 = torch.nn.Linear(16, 12)
        self.lin3 = torch.nn.Linear(12, 8)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.lin3(torch.relu(self.lin2(z))) + self.lin1(x)[..., :8] + self.lin0(x)[..., :8]


@pytest.fixture(autouse=True)
def _torch_only() -> None:
    if "torch" not in selected_backends():
        pytest.skip("the torch backend is not selected")
    warnings.simplefilter("ignore")


def base_model() -> Net:
    torch.manual_seed(0)
    return Net()


def batches(n: int = 6) -> list[dict[str, torch.Tensor]]:
    """x: three strong directions over weak noise; z: a gently decaying spectrum (0.9^i)."""
    g = torch.Generator().manual_seed(1)
    rotation = torch.linalg.qr(torch.randn(16, 16, generator=g))[0]
    x_scales = torch.tensor([8.0, 6, 5] + [0.05] * 13)
    z_scales = 0.9 ** torch.arange(16.0)
    return [
        {
            "x": (torch.randn(32, 16, generator=g) * x_scales) @ rotation.T,
            "z": torch.randn(32, 16, generator=g) * z_scales,
        }
        for _ in range(n)
    ]


def config(**eva: object) -> dict[str, object]:
    return {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": "eva", "eva_config": eva}


def peft_eva(base: Net, cfg: dict[str, object]) -> object:
    lora = peft.LoraConfig(**{**cfg, "eva_config": peft.EvaConfig(**cfg["eva_config"])})  # type: ignore[arg-type]
    model = peft.get_peft_model(copy.deepcopy(base), lora)
    peft.initialize_lora_eva_weights(model, batches(), show_progress_bar=False, **NO_PREP)
    return model


def ours_eva(base: Net, cfg: dict[str, object]) -> peftdecl.AdaptedModel:
    model = peftdecl.attach(copy.deepcopy(base), {"peft_type": "LORA", **cfg}, backend="torch")
    peftdecl.initialize_lora_eva_weights(model, batches(), **NO_PREP)
    return model


@pytest.mark.parametrize("eva", [{}, {"rho": 1.0}, {"whiten": True, "adjust_scaling_factors": False}])
def test_ranks_and_a_equal_peft(eva: dict[str, object]) -> None:
    base = base_model()
    theirs, ours = peft_eva(base, config(**eva)), ours_eva(base, config(**eva))
    peft_cfg, spec = theirs.peft_config["default"], ours.spec()  # type: ignore[attr-defined]
    assert dict(spec.rank_pattern) == peft_cfg.rank_pattern
    assert dict(spec.alpha_pattern) == peft_cfg.alpha_pattern
    assert sorted(spec.target_modules) == sorted(peft_cfg.target_modules)
    if eva == {}:
        assert spec.rank_pattern  # this data does redistribute ranks: the test compares something
    values = ours.state_dict()
    for module in peft_cfg.target_modules:
        if eva.get("whiten") and module in ("lin0", "lin1"):
            # PEFT 0.21.2 whitens layers that share one SVD twice: their A are views of one tensor divided in
            # place once per layer (A / S instead of A / √S)
            continue
        layer = getattr(theirs.base_model.model, module)  # type: ignore[attr-defined]
        a = layer.lora_A["default"].weight.detach().double().numpy()
        ours_a = values[f"{module}.lora_A.weight"]
        if eva.get("rho") == 1.0 and module in ("lin0", "lin1"):
            # x has three strong directions; with r = 4 the fourth component lies in its flat noise floor, which
            # PEFT's randomised range finder (q = 8 of 16 columns) resolves to about 1e-2 only
            assert rel_err(ours_a, a) <= 5e-2
            ours_a, a = ours_a[:3], a[:3]
        # rho = 1 on z (0.9^i, no gap): q = 8 columns and 4 power iterations resolve lin2's A to ~1e-4
        assert rel_err(ours_a, a) <= (1e-3 if eva.get("rho") == 1.0 else TOL)
        assert not values[f"{module}.lora_B.weight"].any()  # B = 0: the model's function is unchanged


def test_rank_zero_layer_loses_its_adapter_as_in_peft() -> None:
    """With r = 1 and rho = 4 the budget of 4 ranks all goes to x's strongest directions (lin0 and lin1)."""
    base = base_model()
    cfg = {**config(rho=4.0), "r": 1}
    theirs, ours = peft_eva(base, cfg), ours_eva(base, cfg)
    peft_cfg = theirs.peft_config["default"]  # type: ignore[attr-defined]
    assert sorted(ours.spec().target_modules) == sorted(peft_cfg.target_modules)
    assert dict(ours.spec().rank_pattern) == peft_cfg.rank_pattern
    assert len(peft_cfg.target_modules) < len(TARGETS)  # some layer got rank 0: the case is exercised
    assert sorted(ours.plan().targets) == sorted(peft_cfg.target_modules)


def test_saved_adapters_load_both_ways(tmp_path: Path) -> None:
    base = base_model()
    theirs, ours = peft_eva(base, config()), ours_eva(base, config())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # B away from zero, the same in both, so that the comparison proves something
        for module in theirs.peft_config["default"].target_modules:  # type: ignore[attr-defined]
            layer = getattr(theirs.base_model.model, module)  # type: ignore[attr-defined]
            layer.lora_B["default"].weight.copy_(
                torch.randn(layer.lora_B["default"].weight.shape, generator=g)
            )
            ours.engine.layer(module).trainable("default")["lora_B.weight"].copy_(
                layer.lora_B["default"].weight
            )
    x = {k: v[:5] for k, v in batches(1)[0].items()}
    with torch.no_grad():
        expected = theirs(**x).numpy()  # type: ignore[operator]
        assert rel_err(ours(**x).numpy(), expected) <= TOL
    theirs.save_pretrained(tmp_path / "peft")  # type: ignore[attr-defined]
    ours.save_pretrained(tmp_path / "ours")
    loaded = peftdecl.load_adapter(copy.deepcopy(base), tmp_path / "peft", backend="torch")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        assert rel_err(loaded(**x).numpy(), expected) <= 1e-6  # float32 files, the same arithmetic
        assert rel_err(back(**x).numpy(), expected) <= TOL


def test_state_dict_of_a_base_model_equals_the_adapted_models() -> None:
    base = base_model()
    spec = {"peft_type": "LORA", **config()}
    plain = peftdecl.get_eva_state_dict(copy.deepcopy(base), batches(), spec, **NO_PREP)
    adapted = peftdecl.attach(copy.deepcopy(base), spec, backend="torch")
    state = peftdecl.get_eva_state_dict(adapted, batches(), **NO_PREP)
    assert sorted(plain) == sorted(state) == TARGETS
    for module in TARGETS:
        np.testing.assert_array_equal(plain[module], state[module])  # the same float32 inputs, the same math


def test_peft_eva_state_dict_is_accepted() -> None:
    """PEFT's state dict (keys ``base_model.model.<module>``, torch tensors) initialises our adapter."""
    base = base_model()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**{**config(), "eva_config": None}))
    state = peft.get_eva_state_dict(theirs, batches(), show_progress_bar=False, **NO_PREP)
    ours = peftdecl.attach(copy.deepcopy(base), {"peft_type": "LORA", **config()}, backend="torch")
    peftdecl.initialize_lora_eva_weights(ours, eva_state_dict=state)
    for key, a in state.items():
        module = key.removeprefix("base_model.model.")
        if a.shape[0]:
            assert rel_err(ours.state_dict()[f"{module}.lora_A.weight"], a.double().numpy()) <= 1e-7  # a copy


def test_language_modeling_mask_keeps_unmasked_positions() -> None:
    """PEFT's default preparation: rows whose attention mask is 1 and whose label is not -100."""
    from peftdecl_torch.activations import (
        prepare_layer_inputs_fn_language_modeling,
        prepare_model_inputs_fn_language_modeling,
    )

    spec = peftdecl.load_spec({"peft_type": "LORA", **config()})
    batch = {
        "input_ids": torch.zeros(2, 3, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]]),
        "labels": torch.tensor([[5, -100, 5], [5, 5, -100]]),
    }
    hidden = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    rows = prepare_layer_inputs_fn_language_modeling(
        (hidden,), prepare_model_inputs_fn_language_modeling(batch, spec), "x"
    )
    expected = torch.stack([hidden[0, 0], hidden[1, 0], hidden[1, 1]])
    torch.testing.assert_close(rows, expected, rtol=0, atol=0)


def test_refusals_name_the_problem() -> None:
    conv = torch.nn.Sequential(torch.nn.Conv1d(4, 4, 1))
    with pytest.raises(TargetError, match="eva"):
        peftdecl.attach(conv, {"peft_type": "LORA", "target_modules": ["0"], "init_lora_weights": "eva"})
    with pytest.raises(SpecError, match=r"\$\.eva_config\.rho"):
        peftdecl.load_spec({"peft_type": "LORA", **config(rho=0.5)})
    plain = peftdecl.attach(base_model(), {"peft_type": "LORA", "target_modules": TARGETS}, backend="torch")
    with pytest.raises(PeftdeclError, match="init_lora_weights='eva'"):
        peftdecl.initialize_lora_eva_weights(plain, batches())
    too_many = peftdecl.attach(base_model(), {"peft_type": "LORA", **config(rho=5.0)}, backend="torch")
    with pytest.raises(TargetError, match="lin0: EVA needs 20 components"):
        peftdecl.initialize_lora_eva_weights(too_many, batches(), **NO_PREP)


def test_numpy_reference_takes_the_eva_state_of_the_torch_backend() -> None:
    """A backend without forward hooks (the NumPy reference) is initialised from an EVA state computed elsewhere:
    the same ranks, alphas and A as on torch."""
    base = base_model()
    torch_model = ours_eva(base, config())
    state = peftdecl.get_eva_state_dict(
        copy.deepcopy(base), batches(), {"peft_type": "LORA", **config()}, **NO_PREP
    )
    arrays = {k: v.detach().double().numpy() for k, v in base.state_dict().items()}
    reference = peftdecl.attach(arrays, {"peft_type": "LORA", **config()}, backend="numpy")
    with pytest.raises(peftdecl.NotSupportedError, match="forward hooks"):
        peftdecl.initialize_lora_eva_weights(reference, batches())
    peftdecl.initialize_lora_eva_weights(reference, eva_state_dict=state)
    assert reference.spec().rank_pattern == torch_model.spec().rank_pattern
    assert reference.spec().alpha_pattern == torch_model.spec().alpha_pattern
    expected = torch_model.state_dict()
    for key, value in reference.state_dict().items():
        assert rel_err(value, expected[key]) <= 1e-6  # float64 here, rounded to float32 in torch's parameters


def test_gpt2_with_peft_language_modeling_defaults() -> None:
    """A tiny GPT-2 (Conv1D layers) with PEFT's default input preparation: padding (attention mask 0) and
    label-masked positions left out."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    ).eval()
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(4):
        ids = torch.randint(0, 50, (4, 8), generator=g)
        mask = torch.ones_like(ids)
        mask[:, -1] = 0
        labels = ids.clone()
        labels[:, 0] = -100
        data.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"], "init_lora_weights": "eva"}
    theirs = peft.get_peft_model(copy.deepcopy(gpt2), peft.LoraConfig(**cfg, eva_config=peft.EvaConfig()))
    peft.initialize_lora_eva_weights(theirs, data, show_progress_bar=False)
    ours = peftdecl.attach(
        copy.deepcopy(gpt2), {"peft_type": "LORA", **cfg, "eva_config": {}}, backend="torch"
    )
    peftdecl.initialize_lora_eva_weights(ours, data)
    assert dict(ours.spec().rank_pattern) == theirs.peft_config["default"].rank_pattern
    values = ours.state_dict()
    for name, module in theirs.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a = module.lora_A["default"].weight.detach().double().numpy()
            # no spectral gap in these activations: PEFT's range finder (q = 2k of 32 columns, 4 iterations)
            # resolves A to ~1e-5
            assert rel_err(values[f"{name.removeprefix('base_model.model.')}.lora_A.weight"], a) <= 1e-4


def test_dora_magnitude_stays_the_base_norm_as_in_peft() -> None:
    """B = 0, so DoRA's m = ‖W + s·BA‖ per row is ‖W‖ whatever rank EVA gives the layer."""
    cfg = {**config(), "use_dora": True}
    theirs, ours = peft_eva(base_model(), cfg), ours_eva(base_model(), cfg)
    assert dict(ours.spec().rank_pattern) == theirs.peft_config["default"].rank_pattern  # type: ignore[attr-defined]
    values = ours.state_dict()
    for module in TARGETS:
        layer = getattr(theirs.base_model.model, module)  # type: ignore[attr-defined]
        key = next(k for k in values if k.startswith(f"{module}.") and "magnitude" in k)
        assert (
            rel_err(values[key], layer.lora_magnitude_vector["default"].weight.detach().double().numpy())
            <= TOL
        )


def test_batches_smaller_than_the_components_fail_instead_of_cycling() -> None:
    """PEFT skips a batch with fewer rows than components and would cycle for ever; peftdecl stops and says so."""
    model = peftdecl.attach(base_model(), {"peft_type": "LORA", **config()}, backend="torch")
    tiny = [{k: v[:5] for k, v in batch.items()} for batch in batches(2)]  # 5 rows < k = 8
    with pytest.raises(PeftdeclError, match="as many input rows as SVD components"):
        peftdecl.initialize_lora_eva_weights(model, tiny, **NO_PREP)
