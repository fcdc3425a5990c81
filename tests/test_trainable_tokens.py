"""Trainable tokens (HF PEFT's ``TrainableTokensConfig`` and LoRA's ``trainable_token_indices``) against PEFT 0.21.

PEFT replaces rows t of the embedding (or of a linear head) by the trained rows d, so the same float32 tensors give
the same float32 outputs: outputs are compared within 1e-6 relative (PEFT's ``index_copy`` and ours are exact; the
additive form of the NumPy reference, E[x] + (d − E[t]), rounds once in float64). Gradients against the NumPy
reference run in tests/test_backend_kinds.py (every kind, every backend); here: that only rows t train.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import peftdecl
from peftdecl.errors import SpecError, TargetError
from tests.conftest import rel_err, selected_backends

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOL = 1e-6  # the same float32 rows written into the same float32 table: only summation order can differ
VOCAB, DIM = 20, 6
IDS = torch.tensor([[0, 1, 2, 3, 5, 19], [4, 3, 3, 0, 7, 8]])

if "torch" not in selected_backends():
    pytest.skip("these tests run on the torch backend, not selected here", allow_module_level=True)


class TokenModel(torch.nn.Module):
    """Embedding -> linear -> untied output head, as a language model is laid out."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(VOCAB, DIM)
        self.lin0 = torch.nn.Linear(DIM, DIM)
        self.lm_head = torch.nn.Linear(DIM, VOCAB, bias=False)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.lin0(self.embed_tokens(x))))


def base(seed: int = 0) -> TokenModel:
    torch.manual_seed(seed)
    return TokenModel().eval()


def out(model: Any) -> np.ndarray:
    with torch.no_grad():
        return model(IDS).double().numpy()


def perturb(model: Any, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))


CONFIGS = {
    "standalone-embedding": lambda: peft.TrainableTokensConfig(
        target_modules=["embed_tokens"], token_indices=[1, 3, 19], init_weights=False
    ),
    "standalone-default-target": lambda: peft.TrainableTokensConfig(token_indices=[0, 3]),
    "standalone-lm-head": lambda: peft.TrainableTokensConfig(
        target_modules=["lm_head"], token_indices=[2, 5]
    ),
    "lora-token-list": lambda: peft.LoraConfig(
        target_modules=["lin0"], trainable_token_indices=[0, 3, 11], init_lora_weights=False
    ),
    "lora-token-dict": lambda: peft.LoraConfig(
        target_modules=["lin0"], trainable_token_indices={"embed_tokens": [4], "lm_head": [2, 3]}
    ),
}


def peft_adapter(name: str, folder: Path) -> Any:
    torch.manual_seed(1234)
    wrapped = peft.get_peft_model(base(), CONFIGS[name]())
    perturb(wrapped)
    wrapped.eval()
    wrapped.save_pretrained(folder)
    return wrapped


@pytest.mark.parametrize("name", list(CONFIGS))
def test_peft_folder_loads_in_peftdecl(name: str, tmp_path: Path) -> None:
    """PEFT's saved folder on peftdecl's torch backend: outputs and merge_and_unload outputs equal PEFT's."""
    theirs = peft_adapter(name, tmp_path)
    expected = out(theirs)
    assert rel_err(expected, out(base())) > 1e-3  # the perturbed rows are used by these inputs
    ours = peftdecl.load_adapter(base(), tmp_path, backend="torch")
    assert rel_err(out(ours), expected) <= TOL
    merged_theirs = out(theirs.merge_and_unload())
    assert rel_err(out(ours.merge_and_unload()), merged_theirs) <= TOL


@pytest.mark.parametrize("name", list(CONFIGS))
def test_peftdecl_folder_loads_in_peft(name: str, tmp_path: Path) -> None:
    """peftdecl's saved folder (its tensors perturbed) loads in PEFT with the same outputs."""
    spec = CONFIGS[name]().to_dict()
    ours = peftdecl.attach(base(), spec, backend="torch", seed=5)
    perturb(ours.base_model)
    ours.eval()
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(base(), tmp_path).eval()
    assert rel_err(out(theirs), out(ours)) <= TOL
    assert rel_err(out(theirs), out(base())) > 1e-3


def test_saved_keys_and_shapes_are_peft_s(tmp_path: Path) -> None:
    """The standalone kind saves ``<emb>.trainable_tokens_delta``, LoRA ``<emb>.token_adapter....``, [n, dim]."""
    from safetensors.numpy import load_file

    for name, key, shape in [
        ("standalone-embedding", "base_model.model.embed_tokens.trainable_tokens_delta", (3, DIM)),
        ("lora-token-list", "base_model.model.embed_tokens.token_adapter.trainable_tokens_delta", (3, DIM)),
    ]:
        spec = CONFIGS[name]().to_dict()
        peftdecl.attach(base(), spec, backend="torch").save_pretrained(tmp_path / name)
        peft_adapter(name, tmp_path / f"peft-{name}")
        theirs = load_file(str(tmp_path / f"peft-{name}" / "adapter_model.safetensors"))
        mine = load_file(str(tmp_path / name / "adapter_model.safetensors"))
        assert set(mine) == set(theirs)
        assert mine[key].shape == theirs[key].shape == shape


def test_initial_rows_are_the_current_rows() -> None:
    """init_weights true (and LoRA's token layers, always): d starts as E[t], as PEFT's does; the model is unchanged."""
    theirs = peft.get_peft_model(base(), CONFIGS["standalone-default-target"]())
    expected = theirs.base_model.model.embed_tokens.trainable_tokens_delta["default"].detach().numpy()
    ours = peftdecl.attach(base(), CONFIGS["standalone-default-target"]().to_dict(), backend="torch")
    got = ours.trainable_parameters()["embed_tokens.trainable_tokens_delta"].detach().numpy()
    np.testing.assert_array_equal(got, expected)  # copies of the same float32 rows
    assert rel_err(out(ours), out(base())) == 0.0


def test_only_the_chosen_rows_train() -> None:
    """Gradients reach d only (the base table stays frozen), and a token not chosen keeps its output."""
    ours = peftdecl.attach(base(), CONFIGS["lora-token-list"]().to_dict(), backend="torch", seed=2)
    ours.train()
    params = ours.trainable_parameters()
    ours(IDS).square().sum().backward()
    delta = params["embed_tokens.token_adapter.trainable_tokens_delta"]
    assert delta.grad is not None and bool((delta.grad[:2] != 0).all())  # tokens 0 and 3 appear in IDS
    assert bool((delta.grad[2] == 0).all())  # token 11 does not
    embed = ours.base_model.embed_tokens.base_layer
    assert not embed.weight.requires_grad and embed.weight.grad is None


def test_merge_writes_the_rows_and_unmerge_restores_them() -> None:
    """Merging writes d into rows t exactly; unmerging gives back the original table bit for bit."""
    model = base()
    original = model.embed_tokens.weight.detach().clone()
    ours = peftdecl.attach(model, CONFIGS["standalone-embedding"]().to_dict(), backend="torch", seed=4)
    delta = ours.trainable_parameters()["embed_tokens.trainable_tokens_delta"].detach().clone()
    ours.merge_adapter()
    table = ours.base_model.embed_tokens.base_layer.weight.detach()
    assert torch.equal(table[[1, 3, 19]], delta)
    assert torch.equal(table[[0, 2, 4]], original[[0, 2, 4]])
    ours.unmerge_adapter()
    assert torch.equal(ours.base_model.embed_tokens.base_layer.weight.detach(), original)


def test_numpy_reference_merges_like_peft(tmp_path: Path) -> None:
    """The float64 reference loads PEFT's LoRA + tokens folder; its merged state equals PEFT's merge_and_unload."""
    if "numpy" not in selected_backends():
        pytest.skip("the NumPy backend is not selected")
    from tests.hf_models import merged_state, numpy_inputs

    theirs = peft_adapter("lora-token-dict", tmp_path)
    state, kwargs = numpy_inputs(base())
    got = peftdecl.load_adapter(state, tmp_path, backend="numpy", **kwargs).merge_and_unload()
    for key, value in merged_state(theirs).items():
        assert rel_err(got[key], value) <= TOL, key


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ({"peft_type": "TRAINABLE_TOKENS", "token_indices": [1, 1]}, "$.token_indices"),
        ({"peft_type": "TRAINABLE_TOKENS", "token_indices": []}, "$.token_indices"),
        (
            {"peft_type": "TRAINABLE_TOKENS", "token_indices": [1], "modules_to_save": ["x"]},
            "$.modules_to_save",
        ),
        (
            {"peft_type": "LORA", "target_modules": ["lin0"], "trainable_token_indices": {"e": [2, 2]}},
            "$.trainable_token_indices.e",
        ),
        (
            {"peft_type": "LORA", "target_modules": ["lin0"], "trainable_token_indices": {}},
            "$.trainable_token_indices",
        ),
    ],
)
def test_bad_specs_are_refused_naming_the_field(spec: dict[str, Any], path: str) -> None:
    with pytest.raises(SpecError, match=path.replace("$", r"\$").replace(".", r"\.")):
        peftdecl.attach(base(), spec, backend="torch")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"peft_type": "TRAINABLE_TOKENS", "token_indices": [VOCAB]},
            r"\[20\] are outside embed_tokens's 20 rows",
        ),
        (
            {"peft_type": "TRAINABLE_TOKENS", "token_indices": [25], "target_modules": ["lm_head"]},
            "lm_head's 20",
        ),
        (
            {"peft_type": "LORA", "target_modules": ["lin0"], "trainable_token_indices": {"nothing": [1]}},
            "no module of the model is named 'nothing'",
        ),
        (
            {"peft_type": "LORA", "target_modules": ["embed_tokens"], "trainable_token_indices": [1]},
            "also in target_modules",
        ),
        (
            {
                "peft_type": "LORA",
                "target_modules": ["lin0"],
                "modules_to_save": ["embed_tokens"],
                "trainable_token_indices": {"embed_tokens": [1]},
            },
            "modules_to_save",
        ),
    ],
)
def test_bad_targets_are_refused(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(TargetError, match=message):
        peftdecl.attach(base(), spec, backend="torch")


# --- weights tied to the input embeddings (tie_word_embeddings) --------------------------------------------------

transformers = pytest.importorskip("transformers")
LLAMA_IDS = torch.tensor([[1, 2, 3, 5, 30], [4, 2, 0, 7, 9]])


def tied_llama() -> Any:
    """A one-layer Llama whose lm_head.weight is model.embed_tokens.weight."""
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def logits(model: Any) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=LLAMA_IDS).logits.double().numpy()


TIED_CONFIGS = {
    "lora-token-list": lambda: peft.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 2]),
    "lora-same-ids-ensured": lambda: peft.LoraConfig(
        target_modules=["q_proj"],
        trainable_token_indices={"embed_tokens": [1, 2], "lm_head": [1, 2]},
        ensure_weight_tying=True,
    ),
    "lora-other-ids-untied": lambda: peft.LoraConfig(
        target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 2], "lm_head": [3]}
    ),
    "standalone": lambda: peft.TrainableTokensConfig(token_indices=[2, 30], init_weights=False),
}


@pytest.mark.parametrize("name", list(TIED_CONFIGS))
def test_tied_head_follows_the_embeddings_like_peft(name: str, tmp_path: Path) -> None:
    """On tied weights PEFT's lm_head reads the embeddings' trained rows (saved once, under the embeddings):
    PEFT's folder gives PEFT's logits and merged logits here, and ours loads in PEFT with the same logits."""
    torch.manual_seed(1234)
    theirs = peft.get_peft_model(tied_llama(), TIED_CONFIGS[name]())
    perturb(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft")
    expected = logits(theirs)
    assert rel_err(expected, logits(tied_llama())) > 1e-3
    ours = peftdecl.load_adapter(tied_llama(), tmp_path / "peft", backend="torch")
    assert rel_err(logits(ours), expected) <= TOL
    ours.save_pretrained(tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(tied_llama(), tmp_path / "ours").eval()
    assert rel_err(logits(again), expected) <= TOL
    merged = logits(theirs.merge_and_unload())
    assert rel_err(logits(ours.merge_and_unload()), merged) <= TOL


def test_tied_rows_train_as_one_tensor_like_peft(tmp_path: Path) -> None:
    """The tied head adds no parameter of its own; d's gradient (through the embeddings and the head) equals
    PEFT's (≤ 1e-5: the same float32 graph, summed in another order)."""
    torch.manual_seed(1234)
    theirs = peft.get_peft_model(tied_llama(), TIED_CONFIGS["lora-token-list"]())
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(tied_llama(), tmp_path, backend="torch", is_trainable=True)
    params = ours.trainable_parameters()
    assert [k for k in params if "trainable_tokens" in k] == [
        "model.embed_tokens.token_adapter.trainable_tokens_delta"
    ]
    for model in (theirs, ours):
        model(input_ids=LLAMA_IDS).logits.square().mean().backward()
    wrapper = theirs.base_model.model.model.embed_tokens.token_adapter
    expected = wrapper.trainable_tokens_delta["default"].grad
    got = params["model.embed_tokens.token_adapter.trainable_tokens_delta"].grad
    assert rel_err(got.double().numpy(), expected.double().numpy()) <= 1e-5


def test_ensure_weight_tying_refuses_different_ids_and_tied_dora() -> None:
    """PEFT's ensure_weight_tying error on tied layers with different ids; a DoRA head tied to the embeddings'
    LoRA is refused by peftdecl (only plain LoRA is tied), naming the field."""
    spec = TIED_CONFIGS["lora-other-ids-untied"]().to_dict()
    with pytest.raises(TargetError, match="same token indices on tied layers"):
        peftdecl.attach(tied_llama(), {**spec, "ensure_weight_tying": True}, backend="torch")
    targeted = {"peft_type": "LORA", "target_modules": ["q_proj", "embed_tokens"], "use_dora": True}
    with pytest.raises(TargetError, match=r"\$\.ensure_weight_tying: lm_head \(dora\)"):
        peftdecl.attach(tied_llama(), {**targeted, "ensure_weight_tying": True}, backend="torch")
    peftdecl.attach(tied_llama(), targeted, backend="torch")  # without it, PEFT only warns: accepted


@pytest.mark.parametrize(
    "targets",
    [["q_proj", "embed_tokens"], ["q_proj", "embed_tokens", "lm_head"], "(.*q_proj|.*embed_tokens)"],
)
def test_ensure_weight_tying_ties_the_head_lora_like_peft(targets: Any, tmp_path: Path) -> None:
    """Embeddings in target_modules, with ensure_weight_tying: PEFT gives lm_head a LoRA whose A and B are the
    embeddings' Bᵀ and Aᵀ (one storage). Both ways the same logits; gradients of all four tensors equal PEFT's
    (≤ 1e-5). A merge folds the update in once (PEFT 0.21 folds it twice into the shared table, so its merged
    logits are not its own: ours equal its unmerged ones)."""
    config = peft.LoraConfig(target_modules=targets, ensure_weight_tying=True)
    torch.manual_seed(1234)
    theirs = peft.get_peft_model(tied_llama(), config)
    perturb(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    expected = logits(theirs.eval())
    ours = peftdecl.load_adapter(tied_llama(), tmp_path / "peft", backend="torch", is_trainable=True)
    assert rel_err(logits(ours), expected) <= TOL
    head = ours.base_model.lm_head
    embed = ours.base_model.model.embed_tokens
    assert head.lora_A["default"].weight.data_ptr() == embed.lora_embedding_B["default"].data_ptr()
    ours.save_pretrained(tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(tied_llama(), tmp_path / "ours").eval()
    assert rel_err(logits(again), expected) <= TOL
    for model in (theirs, ours):
        model.train()
        model(input_ids=LLAMA_IDS).logits.square().mean().backward()
    peft_grads = {
        k.replace(".default", ""): p.grad
        for k, p in theirs.base_model.model.named_parameters()
        if p.requires_grad
    }
    for key, param in ours.trainable_parameters().items():
        assert rel_err(param.grad.double().numpy(), peft_grads[key].double().numpy()) <= 1e-5, key
    ours.eval()
    assert rel_err(logits(ours.merge_and_unload()), expected) <= TOL


@pytest.mark.parametrize("saved", [["embed_tokens"], ["lm_head"]])
def test_ensure_weight_tying_ties_the_saved_head_copy_like_peft(saved: list[str], tmp_path: Path) -> None:
    """modules_to_save naming an embedding, with ensure_weight_tying: PEFT trains a copy of the input embeddings
    and the tied head uses that copy. PEFT's folder here, ours in PEFT: the same logits; one trained table whose
    gradient (through both uses) equals PEFT's within 1e-5."""
    config = peft.LoraConfig(target_modules=["q_proj"], modules_to_save=saved, ensure_weight_tying=True)
    torch.manual_seed(1234)
    theirs = peft.get_peft_model(tied_llama(), config)
    perturb(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftdecl.load_adapter(tied_llama(), tmp_path / "peft", backend="torch", is_trainable=True)
    assert rel_err(logits(ours), logits(theirs)) <= TOL
    ours.save_pretrained(tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(tied_llama(), tmp_path / "ours").eval()
    assert rel_err(logits(again), logits(theirs)) <= TOL
    params = ours.trainable_parameters()
    assert "model.embed_tokens.weight" in params and "lm_head.weight" not in params
    for model in (theirs, ours):
        model.train()
        model(input_ids=LLAMA_IDS).logits.square().mean().backward()
    expected = theirs.base_model.model.model.embed_tokens.modules_to_save["default"].weight.grad
    got = params["model.embed_tokens.weight"].grad
    assert rel_err(got.double().numpy(), expected.double().numpy()) <= 1e-5


def test_ensure_weight_tying_without_tied_weights_changes_nothing(tmp_path: Path) -> None:
    """On an untied model PEFT only warns about ensure_weight_tying: the same adapter, the same outputs."""
    config = peft.LoraConfig(
        target_modules=["lin0"], trainable_token_indices=[0, 3], ensure_weight_tying=True
    )
    torch.manual_seed(1234)
    theirs = peft.get_peft_model(base(), config)
    perturb(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    assert rel_err(out(peftdecl.load_adapter(base(), tmp_path, backend="torch")), out(theirs)) <= TOL


def test_two_adapters_together_and_per_batch_row() -> None:
    """Two adapters on disjoint tokens: both active write both sets of rows (PEFT's sequential row replacement);
    ``adapter_names`` gives each batch row its own adapter's rows (the additive path, rounded once in float32)."""
    model = base()
    table = model.embed_tokens.weight.detach().clone()
    ours = peftdecl.attach(
        model, CONFIGS["standalone-embedding"]().to_dict(), name="a", backend="torch", seed=1
    )
    ours.add_adapter(
        "b", {"peft_type": "TRAINABLE_TOKENS", "token_indices": [0, 4], "init_weights": False}, seed=2
    )
    rows = {n: torch.from_numpy(ours.state_dict(n)["embed_tokens.trainable_tokens_delta"]) for n in "ab"}

    def edited(*names: str) -> np.ndarray:
        reference = base()
        with torch.no_grad():
            for name in names:
                index = [1, 3, 19] if name == "a" else [0, 4]
                reference.embed_tokens.weight[index] = rows[name]
        return out(reference)

    assert torch.equal(model.embed_tokens.base_layer.weight, table)
    ours.set_adapter(["a", "b"])
    assert rel_err(out(ours), edited("a", "b")) <= TOL
    with torch.no_grad():
        mixed = ours(IDS, adapter_names=["a", "b"]).double().numpy()
    assert rel_err(mixed[0], edited("a")[0]) <= TOL
    assert rel_err(mixed[1], edited("b")[1]) <= TOL
