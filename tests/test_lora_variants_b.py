"""LoRA variants of HF PEFT 0.21 chosen by LoraConfig values, against real PEFT and the NumPy reference.

MiCA (``init_lora_weights="mica"``): B = the r left singular vectors of W with the smallest singular values,
frozen; A = 0. B is deterministic given W up to the sign of each singular vector, which is LAPACK's choice (torch's
sgesdd and NumPy's dgesdd may disagree on a column), so B is compared after flipping the columns that point away
from PEFT's; A, the output and everything after a save are compared as they are.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import peftdecl
from peftdecl.alora import invocation_offsets, invocation_offsets_set
from peftdecl.errors import AdapterFileError, PeftdeclError, SpecError, TargetError
from peftdecl.plan.kinds.arrow import exact_prototypes
from peftdecl.plan.kinds.mica import minor_left_singular_vectors
from tests.conftest import rel_err, selected_backends

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOL = 1e-5  # float32 (PEFT, torch backend) against float64 or float32: SVD vectors agree to ~eps32 / spectral gap


class Net(torch.nn.Module):
    """Token ids -> embedding -> two linear layers: every layer type MiCA adapts on torch, in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 12)
        self.lin0 = torch.nn.Linear(12, 16)
        self.lin1 = torch.nn.Linear(16, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(self.emb(ids))))


def base_model(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def ids() -> torch.Tensor:
    return torch.randint(0, 10, (3, 5), generator=torch.Generator().manual_seed(1))


def mica_config(targets: list[str], r: int = 4, **extra: object) -> dict[str, object]:
    return {"r": r, "lora_alpha": 8, "target_modules": targets, "init_lora_weights": "mica", **extra}


def needs_torch_backend() -> None:
    if "torch" not in selected_backends():
        pytest.skip("the torch backend is not selected")


def aligned_columns(b: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """B with each column negated where it points away from the reference's (a singular vector's sign is free)."""
    signs = np.where(np.sum(b * reference, axis=0) < 0, -1.0, 1.0)
    return b * signs[None, :]


PEFT_NAMES = {"emb": ("lora_embedding_A", "lora_embedding_B"), "lin0": ("lora_A", "lora_B")}
OUR_NAMES = {"emb": ("lora_embedding_A", "lora_embedding_B"), "lin0": ("lora_A.weight", "lora_B.weight")}


def peft_factors(model: object, module: str) -> tuple[np.ndarray, np.ndarray]:
    layer = getattr(model.base_model.model, module)  # type: ignore[attr-defined]
    found = []
    for name in PEFT_NAMES[module]:
        value = getattr(layer, name)["default"]
        found.append((value if module == "emb" else value.weight).detach().double().numpy())
    return found[0], found[1]


def test_minor_singular_vectors_span_the_smallest_singular_values() -> None:
    """Independent of any SVD routine's ordering: ‖Wᵀ b‖ of each column is a singular value, the r smallest."""
    w = np.random.default_rng(0).standard_normal((7, 5))
    b = minor_left_singular_vectors(w, 2)
    assert rel_err(b.T @ b, np.eye(2)) <= 1e-12  # float64 orthonormal columns
    values = np.sort(np.linalg.norm(w.T @ b, axis=0))
    smallest = np.sort(np.sqrt(np.linalg.eigvalsh(w.T @ w)))[:2]
    assert rel_err(values, smallest) <= 1e-10  # float64 eigenvalues of WᵀW against the SVD


@pytest.mark.parametrize("module", ["lin0", "emb"])
def test_torch_initial_tensors_and_trainability_equal_peft(module: str) -> None:
    needs_torch_backend()
    base = base_model()
    cfg = mica_config([module])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    ours = peftdecl.attach(copy.deepcopy(base), {"peft_type": "LORA", **cfg}, backend="torch")
    values = ours.state_dict()
    peft_a, peft_b = peft_factors(theirs, module)
    a_name, b_name = OUR_NAMES[module]
    a, b = values[f"{module}.{a_name}"], values[f"{module}.{b_name}"]
    assert not a.any() and not peft_a.any()  # A = 0 in both: the adapter starts as the base model
    assert rel_err(aligned_columns(b, peft_b), peft_b) <= TOL
    # only A trains: PEFT freezes B (requires_grad False), peftdecl gives B the frozen role
    peft_trainable = [n for n, p in theirs.named_parameters() if p.requires_grad]
    assert peft_trainable and all(PEFT_NAMES[module][0] in n for n in peft_trainable)
    trainable = set(ours.trainable_parameters())
    assert any(a_name in key for key in trainable) and not any(b_name in key for key in trainable)
    with torch.no_grad():
        assert rel_err(ours(ids()).numpy(), base(ids()).numpy()) == 0.0  # B A = 0 exactly


def test_gpt2_conv1d_initial_b_equals_peft() -> None:
    """GPT-2's Conv1D stores W as [in, out]; PEFT transposes it before the SVD, so B spans W's output side."""
    needs_torch_backend()
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("c_attn", Conv1D(10, 7))  # nf = out = 10, nx = in = 7
    cfg = mica_config(["c_attn"], r=3, fan_in_fan_out=True)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg))
    ours = peftdecl.attach(copy.deepcopy(model), {"peft_type": "LORA", **cfg}, backend="torch")
    peft_b = theirs.base_model.model.c_attn.lora_B["default"].weight.detach().double().numpy()
    assert peft_b.shape == (10, 3)
    assert rel_err(aligned_columns(ours.state_dict()["c_attn.lora_B.weight"], peft_b), peft_b) <= TOL


def test_numpy_reference_initial_tensors_equal_peft() -> None:
    base = base_model()
    cfg = mica_config(["lin0", "lin1"])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    state = {k: v.detach().double().numpy() for k, v in base.state_dict().items() if not k.startswith("emb")}
    ours = peftdecl.attach(state, {"peft_type": "LORA", **cfg}, backend="numpy")
    values = ours.state_dict()
    for module in ("lin0", "lin1"):
        layer = getattr(theirs.base_model.model, module)
        peft_b = layer.lora_B["default"].weight.detach().double().numpy()
        assert not values[f"{module}.lora_A.weight"].any()
        assert rel_err(aligned_columns(values[f"{module}.lora_B.weight"], peft_b), peft_b) <= TOL
        assert np.array_equal(ours.engine.base_weight(module), state[f"{module}.weight"])  # W untouched


def test_gradients_reach_a_only() -> None:
    needs_torch_backend()
    ours = peftdecl.attach(base_model(), {"peft_type": "LORA", **mica_config(["lin0"])}, backend="torch")
    ours.train()
    ours(ids()).square().sum().backward()
    grads = {key: p.grad for key, p in ours.trainable_parameters().items()}
    assert len(grads) == 1 and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def perturbed_peft(base: Net, cfg: dict[str, object]) -> object:
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:  # A away from 0 (and B from its SVD), so that the adapter changes the output
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    return theirs


def test_saved_adapters_load_both_ways(tmp_path: Path) -> None:
    needs_torch_backend()
    base = base_model()
    cfg = mica_config(["emb", "lin0", "lin1"])
    theirs = perturbed_peft(base, cfg)
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftdecl.load_adapter(copy.deepcopy(base), tmp_path / "peft", backend="torch", is_trainable=True)
    with torch.no_grad():
        expected = theirs(ids()).numpy()
        assert rel_err(expected, base(ids()).numpy()) > 1e-2  # the perturbation shows
        assert rel_err(ours(ids()).numpy(), expected) <= TOL  # float32 forward of the same weights
    assert not any("lora_B" in k or "embedding_B" in k for k in ours.trainable_parameters())
    ours.save(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours", is_trainable=True)
    assert loaded.peft_config["default"].init_lora_weights == "mica"
    frozen = {n for n, p in loaded.named_parameters() if "lora_" in n and not p.requires_grad}
    assert frozen and all("_B" in n for n in frozen)  # PEFT freezes B of the adapter we saved
    with torch.no_grad():
        assert rel_err(loaded(ids()).numpy(), expected) <= TOL
        merged = ours.merge_and_unload()
        assert rel_err(merged(ids()).numpy(), expected) <= TOL  # merge is LoRA's W + s·B A


@pytest.mark.parametrize(
    ("extra", "error", "needle"),
    [
        ({"r": 13}, TargetError, r"r <= min\(in, out\) = 12"),
        ({"use_dora": True}, SpecError, r"\$.init_lora_weights: cannot be combined with use_dora"),
        ({"lora_bias": True}, SpecError, r"\$.lora_bias"),
    ],
)
def test_refusals_name_the_field(extra: dict[str, object], error: type[Exception], needle: str) -> None:
    state = {"lin0.weight": np.ones((16, 12)), "lin0.bias": np.zeros(16)}
    with pytest.raises(error, match=needle):
        peftdecl.attach(state, {"peft_type": "LORA", **mica_config(["lin0"]), **extra}, backend="numpy")


def test_convolutions_are_refused_as_in_peft() -> None:
    needs_torch_backend()
    model = torch.nn.Sequential()
    model.add_module("conv", torch.nn.Conv2d(3, 4, 3))
    cfg = mica_config(["conv"], r=2)
    with pytest.raises(TargetError, match=r"conv \(conv2d\) cannot be adapted"):
        peftdecl.attach(copy.deepcopy(model), {"peft_type": "LORA", **cfg}, backend="torch")
    with pytest.raises(ValueError, match="unsupported variant combination"):
        peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg))


# --- QA-LoRA: PEFT pools the adapter input on GPTQ layers only; on every layer peftdecl runs it is plain LoRA -----


def test_qalora_on_plain_layers_is_peft_plain_lora_both_ways(tmp_path: Path) -> None:
    """PEFT ignores use_qalora outside GPTQ (A stays [r, in], even for in not divisible by the group, and it
    merges); peftdecl does the same, and the flag survives a save in either direction."""
    needs_torch_backend()
    base = base_model()
    cfg = {"r": 2, "target_modules": ["lin0", "lin1"], "use_qalora": True, "qalora_group_size": 5}
    theirs = perturbed_peft(base, cfg)
    assert theirs.base_model.model.lin0.lora_A["default"].weight.shape == (2, 12)  # 12 % 5 != 0: not pooled
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftdecl.load_adapter(copy.deepcopy(base), tmp_path / "peft", backend="torch")
    assert ours.plan().kind == "lora"
    with torch.no_grad():
        expected = theirs(ids()).numpy()
        assert rel_err(expected, base(ids()).numpy()) > 1e-2  # the perturbation shows
        assert rel_err(ours(ids()).numpy(), expected) <= TOL  # float32 forward of the same weights
    ours.save(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert loaded.peft_config["default"].use_qalora and loaded.peft_config["default"].qalora_group_size == 5
    with torch.no_grad():
        assert rel_err(loaded(ids()).numpy(), expected) <= TOL
        assert rel_err(ours.merge_and_unload()(ids()).numpy(), expected) <= TOL  # merges as PEFT does here


def test_qalora_group_size_must_be_positive() -> None:
    state = {"lin0.weight": np.ones((16, 12))}
    spec = {"peft_type": "LORA", "target_modules": ["lin0"], "use_qalora": True, "qalora_group_size": 0}
    with pytest.raises(SpecError, match=r"\$.qalora_group_size: must be >= 1"):
        peftdecl.attach(state, spec, backend="numpy")


# --- aLoRA: the adapter acts from the last invocation token sequence of each row on --------------------------------

INVOCATION = [5, 6]


def test_invocation_offsets_equal_peft() -> None:
    from peft.tuners.lora.variants import calculate_alora_offsets

    rng = np.random.default_rng(0)
    input_ids = rng.integers(4, 8, size=(12, 9))  # small alphabet: 0, 1 or several invocations per row
    config = peft.LoraConfig(task_type="CAUSAL_LM", alora_invocation_tokens=INVOCATION)
    expected = calculate_alora_offsets({"a": config}, "a", torch.as_tensor(input_ids))
    assert list(invocation_offsets(input_ids, INVOCATION)) == expected
    assert None in expected and any(o is not None for o in expected)  # both cases are exercised


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Any:
    transformers = pytest.importorskip("transformers")
    from peftdecl.train.tiny_model import build_tiny_llama

    folder = build_tiny_llama(
        tmp_path_factory.mktemp("llama") / "m", hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64
    )
    return transformers.AutoModelForCausalLM.from_pretrained(folder)


# row 0: one invocation in the middle; row 1: two (the last counts); row 2: none (the base model's output)
LLAMA_IDS = [[1, 2, 5, 6, 3, 4, 7], [5, 6, 1, 5, 6, 2, 3], [1, 2, 3, 4, 7, 8, 9]]


def test_alora_forward_and_generate_equal_peft_both_ways(tiny_llama: Any, tmp_path: Path) -> None:
    needs_torch_backend()
    cfg = peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=2,
        target_modules=["q_proj", "v_proj", "down_proj"],
        alora_invocation_tokens=INVOCATION,
        init_lora_weights=False,  # random A and B, so that the adapter changes the output where it acts
    )
    theirs = peft.get_peft_model(copy.deepcopy(tiny_llama), cfg).eval()
    input_ids = torch.tensor(LLAMA_IDS)
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftdecl.load_adapter(copy.deepcopy(tiny_llama), tmp_path / "peft", backend="torch")
    with torch.no_grad():
        expected = theirs(input_ids=input_ids).logits.numpy()
        base = tiny_llama(input_ids=input_ids).logits.numpy()
        logits = ours(input_ids=input_ids).logits.numpy()
    assert rel_err(expected[:2, 2:], base[:2, 2:]) > 1e-2  # PEFT's adapter acts from the invocation on ...
    assert np.array_equal(expected[:, :2], base[:, :2]) and np.array_equal(expected[2], base[2])  # ... only
    assert rel_err(logits, expected) <= TOL  # float32 forward of the same weights
    generated = ours.generate(input_ids=input_ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, theirs.generate(input_ids=input_ids, max_new_tokens=4, do_sample=False))
    ours.save(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path / "ours").eval()
    assert loaded.peft_config["default"].alora_invocation_tokens == INVOCATION
    with torch.no_grad():
        assert rel_err(loaded(input_ids=input_ids).logits.numpy(), expected) <= TOL
        # without input_ids there is no invocation to find: the base model, in PEFT (which warns) and here
        embeds = tiny_llama.get_input_embeddings()(input_ids)
        assert rel_err(ours(inputs_embeds=embeds).logits.numpy(), base) <= TOL
    with pytest.raises(PeftdeclError, match="aLoRA adapter cannot be merged"):
        ours.merge_and_unload()


def test_alora_torch_equals_numpy_reference_with_gradients() -> None:
    """One linear layer under given offsets: the torch output and gradients against the reference's explicit
    backward (row 0 adapted from position 2 on, row 1 not at all)."""
    needs_torch_backend()
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("m", torch.nn.Linear(6, 5))
    spec = {
        "peft_type": "LORA",
        "r": 2,
        "target_modules": ["m"],
        "init_lora_weights": False,
        "alora_invocation_tokens": INVOCATION,
    }
    state = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    reference = peftdecl.attach(state, spec, backend="numpy")
    ours = peftdecl.attach(copy.deepcopy(model), spec, backend="torch")
    ours.delete_adapter("default")
    ours.add_adapter("default", spec, arrays=reference.state_dict(), activate=True)
    x = np.random.default_rng(1).standard_normal((2, 4, 6))
    dy = np.random.default_rng(2).standard_normal((2, 4, 5))
    with invocation_offsets_set({tuple(INVOCATION): (2, None)}):
        expected, tape = reference.engine.layer_forward("m", x)
        grads = reference.engine.layer_backward("m", tape, dy)
        xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
        y = ours(xt)
        (y * torch.tensor(dy, dtype=torch.float32)).sum().backward()
    base = x @ state["m.weight"].T + state["m.bias"]
    assert np.allclose(expected[:, :2], base[:, :2]) and np.allclose(
        expected[1], base[1]
    )  # float64: not adapted
    assert rel_err(expected, base) > 1e-2
    assert rel_err(y.detach().numpy(), expected) <= TOL  # float32 against float64
    assert rel_err(xt.grad.numpy(), grads["input"]) <= TOL
    for key, param in ours.trainable_parameters().items():
        assert rel_err(param.grad.numpy(), grads[key]) <= TOL, key


def test_alora_refusals() -> None:
    state = {"lin0.weight": np.ones((16, 12)), "emb.weight": np.ones((10, 12))}
    spec = {"peft_type": "LORA", "target_modules": ["lin0"], "alora_invocation_tokens": INVOCATION}
    with pytest.raises(SpecError, match=r"\$.alora_invocation_tokens: cannot be combined with use_dora"):
        peftdecl.attach(state, {**spec, "use_dora": True}, backend="numpy")
    assert (
        peftdecl.attach(state, {**spec, "alora_invocation_tokens": []}, backend="numpy").plan().kind == "lora"
    )
    reference = peftdecl.attach(state, spec, backend="numpy")
    with pytest.raises(PeftdeclError, match="lin0: an aLoRA adapter cannot be merged"):
        reference.merge()
    # PEFT has aLoRA for linear layers only ("Invalid or unsupported variant combination" elsewhere)
    with pytest.raises(TargetError, match=r"emb \(embedding\) cannot be adapted"):
        peftdecl.attach(
            state, {**spec, "target_modules": ["emb"]}, backend="numpy", layer_types={"emb": "embedding"}
        )


def test_alora_in_a_mixed_batch_equals_peft(tiny_llama: Any, tmp_path: Path) -> None:
    """adapter_names: each row's offsets come from its own adapter's invocation (none for LoRA and base rows)."""
    needs_torch_backend()

    def config(tokens: list[int] | None) -> Any:
        return peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=2,
            target_modules=["q_proj", "v_proj"],
            alora_invocation_tokens=tokens,
            init_lora_weights=False,
        )

    theirs = peft.get_peft_model(copy.deepcopy(tiny_llama), config(INVOCATION), adapter_name="inv")
    theirs.add_adapter("seven", config([7]))
    theirs.add_adapter("plain", config(None))
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(copy.deepcopy(tiny_llama), tmp_path, backend="torch", name="inv")
    for name in ("seven", "plain"):
        ours.load_adapter(tmp_path / name, name)
    input_ids = torch.tensor([*LLAMA_IDS, [1, 7, 3, 5, 6, 8, 9]])
    names = ["inv", "seven", "plain", "seven"]  # row 1 has no 7: "seven" does not act there; row 3 has
    with torch.no_grad():
        expected = theirs(input_ids=input_ids, adapter_names=names).logits.numpy()
        base = tiny_llama(input_ids=input_ids).logits.numpy()
        assert np.array_equal(expected[1], base[1]) and rel_err(expected[3, 1:], base[3, 1:]) > 1e-3
        assert rel_err(ours(input_ids=input_ids, adapter_names=names).logits.numpy(), expected) <= TOL
    generated = ours.generate(input_ids=input_ids, adapter_names=names, max_new_tokens=3, do_sample=False)
    expected_ids = theirs.generate(
        input_ids=input_ids, adapter_names=names, max_new_tokens=3, do_sample=False
    )
    assert torch.equal(generated, expected_ids)


# --- Arrow: a router over a library of LoRA experts ----------------------------------------------------------------


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = torch.nn.Linear(12, 16)
        self.lin1 = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> tuple[MLP, list[str]]:
    """A base MLP and five saved rank-2 experts of different lora_alpha. Row 0 of each A is scaled by 4, so that
    B A has a clear spectral gap: PEFT's 15 power iterations then reach the top singular vector that peftdecl
    computes exactly (without a gap the two prototypes, and so the routing, may differ)."""
    torch.manual_seed(0)
    base = MLP()
    folder = tmp_path_factory.mktemp("experts")
    paths = []
    for i in range(5):
        cfg = peft.LoraConfig(r=2, lora_alpha=4 + i, target_modules=["lin0", "lin1"], init_lora_weights=False)
        expert = peft.get_peft_model(copy.deepcopy(base), cfg)
        with torch.no_grad():
            for name, param in expert.named_parameters():
                if "lora_A" in name:
                    param[0] *= 4.0
        expert.save_pretrained(folder / f"e{i}")
        paths.append(str(folder / f"e{i}"))
    return base, paths


@pytest.mark.parametrize("seed", [None, 1])
@pytest.mark.parametrize("gks", [False, True])
def test_arrow_router_equals_peft(experts: tuple[MLP, list[str]], gks: bool, seed: int | None) -> None:
    needs_torch_backend()
    from peft.tuners.lora.arrow import create_arrow_model as peft_create_arrow_model

    base, paths = experts
    tasks, general = (paths[:3], paths[3:]) if gks else (paths, None)
    options = {"top_k": 2, "router_temperature": 0.7, "use_gks": gks, "rng_seed": seed}
    theirs = peft_create_arrow_model(
        copy.deepcopy(base), tasks, peft.ArrowConfig(**options), general_adapter_paths=general
    ).eval()
    ours = peftdecl.create_arrow_model(copy.deepcopy(base), tasks, options, general, backend="torch")
    assert ours.active_adapters == ["arrow_router"] and set(ours.adapters) == set(theirs.peft_config)
    x = torch.randn(4, 3, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, base_out = theirs(x).numpy(), base(x).numpy()
        assert rel_err(expected, base_out) > 1e-1  # the routed experts change the output
        # float32; without a seed PEFT iterates from a random start and peftdecl takes the exact limit, which agree
        # to ~1e-7 on these experts (spectral gap); with one, both run the same iteration
        assert rel_err(ours(x).numpy(), expected) <= TOL
    # GenKnowSub has changed the task adapters themselves (PEFT: on the router's first forward, just above)
    for module in ("lin0", "lin1"):
        peft_a = getattr(theirs.base_model.model, module).lora_A["task_1"].weight.detach().numpy()
        assert rel_err(ours.state_dict("task_1")[f"{module}.lora_A.weight"], peft_a) <= TOL  # float32 means
    assert not any(k.startswith("task_1/") or "task_1" in k for k in ours.trainable_parameters())
    with pytest.raises(PeftdeclError, match="Arrow router cannot be merged"):
        ours.merge_and_unload()


def test_arrow_prototypes_follow_peft_s_power_iteration_given_its_seed(tmp_path: Path) -> None:
    """Plain random experts (no spectral gap: 15 iterations stop short of the top singular vector): with rng_seed
    peftdecl starts where PEFT starts and iterates as PEFT does, so prototypes and outputs agree all the same."""
    needs_torch_backend()
    from peft.tuners.lora.arrow import create_arrow_model as peft_create_arrow_model

    torch.manual_seed(1)
    base = MLP()
    paths = []
    for i in range(4):
        cfg = peft.LoraConfig(r=2, target_modules=["lin0", "lin1"], init_lora_weights=False)
        peft.get_peft_model(copy.deepcopy(base), cfg).save_pretrained(tmp_path / f"e{i}")
        paths.append(str(tmp_path / f"e{i}"))
    options = {"top_k": 2, "router_temperature": 0.7, "rng_seed": 3}
    theirs = peft_create_arrow_model(copy.deepcopy(base), paths, peft.ArrowConfig(**options)).eval()
    ours = peftdecl.create_arrow_model(copy.deepcopy(base), paths, options, backend="torch")
    x = torch.randn(4, 3, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = theirs(x).numpy()  # PEFT builds its prototypes on the first forward
        assert rel_err(ours(x).numpy(), expected) <= TOL  # float32
    layer = theirs.base_model.model.lin0.lora_arrow["arrow_router"]
    exact = exact_prototypes(*(ours.state_dict("arrow_router")[f"lin0.arrow_experts_{p}"] for p in "AB"))
    peft_protos = layer.prototypes.double().numpy()
    assert (
        rel_err(ours.state_dict("arrow_router")["lin0.arrow_prototypes"], peft_protos) <= TOL
    )  # float32 steps
    assert np.abs(np.sum(exact * peft_protos, axis=1)).min() < 1 - 1e-4  # and PEFT's are not the exact ones


def test_arrow_router_files_are_peft_s_and_load_only_with_the_experts(
    experts: tuple[MLP, list[str]], tmp_path: Path
) -> None:
    """PEFT saves the router's own (unused) LoRA pair and its arrow_config, not the experts; a router is rebuilt
    from its experts (create_arrow_model), never loaded alone, in PEFT and here."""
    needs_torch_backend()
    from peft.tuners.lora.arrow import create_arrow_model as peft_create_arrow_model

    base, paths = experts
    theirs = peft_create_arrow_model(copy.deepcopy(base), paths[:3], peft.ArrowConfig(top_k=2))
    theirs.save_pretrained(tmp_path / "peft", selected_adapters=["arrow_router"])
    ours = peftdecl.create_arrow_model(copy.deepcopy(base), paths[:3], {"top_k": 2}, backend="torch")
    ours.save(tmp_path / "ours", adapters=["arrow_router"])
    from safetensors.numpy import load_file

    peft_keys = set(load_file(tmp_path / "peft" / "arrow_router" / "adapter_model.safetensors"))
    assert set(load_file(tmp_path / "ours" / "arrow_router" / "adapter_model.safetensors")) == peft_keys
    with pytest.raises(AdapterFileError, match=r"holds no experts; build the router .*create_arrow_model"):
        peftdecl.load_adapter(copy.deepcopy(base), tmp_path / "peft" / "arrow_router", backend="torch")


@pytest.mark.parametrize(
    ("arrow_config", "extra", "needle"),
    [
        ({"top_k": 0, "task_adapter_names": ["t"]}, {}, r"\$.arrow_config.top_k"),
        ({"router_temperature": 0.0, "task_adapter_names": ["t"]}, {}, r"\$.arrow_config.router_temperature"),
        (
            {"top_k": 3, "task_adapter_names": ["t0", "t1"]},
            {},
            r"\$.arrow_config.top_k: must be <= the number",
        ),
        (
            {"task_adapter_names": ["t"], "top_k": 1},
            {"use_dora": True},
            r"\$.arrow_config: cannot be combined",
        ),
        ({"top_k": 1}, {}, r"\$.arrow_config.task_adapter_names: names no expert"),
    ],
)
def test_arrow_refusals_name_the_field(
    arrow_config: dict[str, Any], extra: dict[str, Any], needle: str
) -> None:
    state = {"lin0.weight": np.ones((16, 12))}
    spec = {"peft_type": "LORA", "r": 2, "target_modules": ["lin0"], "arrow_config": arrow_config, **extra}
    with pytest.raises(SpecError, match=needle):
        peftdecl.attach(state, spec, backend="numpy")


def test_create_arrow_model_refuses_what_peft_refuses(experts: tuple[MLP, list[str]], tmp_path: Path) -> None:
    """Experts of different ranks or modules (PEFT: "rank mismatch" / "target_modules mismatch"), GenKnowSub
    without general adapters."""
    needs_torch_backend()
    base, paths = experts
    other = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=3, target_modules=["lin0", "lin1"]))
    other.save_pretrained(tmp_path / "r3")
    with pytest.raises(PeftdeclError, match="the same modules and rank"):
        peftdecl.create_arrow_model(
            copy.deepcopy(base), [paths[0], tmp_path / "r3"], {"top_k": 1}, backend="torch"
        )
    with pytest.raises(PeftdeclError, match="use_gks needs general_adapter_paths"):
        peftdecl.create_arrow_model(
            copy.deepcopy(base), paths[:2], {"top_k": 1, "use_gks": True}, backend="torch"
        )
