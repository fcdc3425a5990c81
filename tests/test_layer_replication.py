"""LoRA's ``layer_replication`` against HF PEFT 0.21 on a tiny Llama (torch backend).

PEFT rebuilds the decoder's layer list from ranges of it, the copies sharing base weights, and gives each copy its
own LoRA. The same float32 weights give the same float32 logits here (compared within 1e-6 relative: the same
operations in the same order); gradients within 1e-5 (the same graph, accumulated in another order).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import peftdecl
from peftdecl.errors import PeftdeclError, SpecError, TargetError
from tests.conftest import rel_err, selected_backends

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

if "torch" not in selected_backends():
    pytest.skip("layer_replication runs on the torch backend, not selected here", allow_module_level=True)

TOL = 1e-6
LAYER_MAP = [[0, 2], [1, 3]]  # layers 0, 1, 1, 2 of three
IDS = torch.tensor([[1, 2, 3, 5], [4, 0, 7, 9]])
CONFIG = transformers.LlamaConfig(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=2,
)


def llama() -> Any:
    """A fresh three-layer Llama (its own config: replication changes num_hidden_layers in place, as PEFT does)."""
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(copy.deepcopy(CONFIG)).eval()


def logits(model: Any) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=IDS).logits.double().numpy()


def lora(**extra: Any) -> Any:
    return peft.LoraConfig(
        target_modules=["q_proj", "v_proj"], layer_replication=LAYER_MAP, init_lora_weights=False, **extra
    )


def test_peft_folder_loads_in_peftdecl(tmp_path: Path) -> None:
    """PEFT's replicated adapter: four layers sharing three layers' weights, each copy with its LoRA; PEFT's logits."""
    torch.manual_seed(1234)
    theirs = peft.get_peft_model(llama(), lora()).eval()
    theirs.save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(llama(), tmp_path, backend="torch")
    layers = ours.base_model.model.layers
    assert len(layers) == 4 and ours.base_model.config.num_hidden_layers == 4
    assert layers[1].mlp.up_proj.weight is layers[2].mlp.up_proj.weight  # copies share the base weights
    assert layers[1].self_attn.q_proj.base_layer.weight is layers[2].self_attn.q_proj.base_layer.weight
    assert len(ours.plan().layers) == 8  # q_proj and v_proj on every copy
    expected = logits(theirs)
    assert rel_err(expected, logits(llama())) > 1e-3
    assert rel_err(logits(ours), expected) <= TOL


def test_peftdecl_folder_loads_in_peft(tmp_path: Path) -> None:
    """Our replicated adapter (random A and B) saves PEFT's config and keys: PEFT loads it with our logits."""
    ours = peftdecl.attach(llama(), lora().to_dict(), backend="torch", seed=3)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(llama(), tmp_path).eval()
    assert rel_err(logits(theirs), logits(ours)) <= TOL
    assert rel_err(logits(ours), logits(llama())) > 1e-3


def test_each_copy_trains_its_own_lora_like_peft(tmp_path: Path) -> None:
    """Gradients of every copy's A and B equal PEFT's; the shared base weights stay frozen."""
    torch.manual_seed(1234)
    theirs = peft.get_peft_model(llama(), lora())
    theirs.save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(llama(), tmp_path, backend="torch", is_trainable=True)
    for model in (theirs, ours):
        model(input_ids=IDS).logits.square().mean().backward()
    expected = {
        k.replace(".default", ""): p.grad
        for k, p in theirs.base_model.model.named_parameters()
        if p.requires_grad
    }
    got = ours.trainable_parameters()
    assert set(got) == set(expected) and len(got) == 16
    for key, param in got.items():
        assert rel_err(param.grad.double().numpy(), expected[key].double().numpy()) <= 1e-5, key
    assert not ours.base_model.model.layers[1].mlp.up_proj.weight.requires_grad


def test_merging_a_replicated_model_is_refused() -> None:
    """Copies share one base weight, so a merge would apply each copy's update to all of them: refused."""
    ours = peftdecl.attach(llama(), lora().to_dict(), backend="torch")
    with pytest.raises(PeftdeclError, match="replicated"):
        ours.merge_and_unload()


def test_bad_layer_maps_are_refused_naming_the_field() -> None:
    spec = lora().to_dict()
    with pytest.raises(SpecError, match=r"\$\.layer_replication\[1\]: \[2, 2\]"):
        peftdecl.attach(llama(), {**spec, "layer_replication": [[0, 1], [2, 2]]}, backend="torch")
    with pytest.raises(
        TargetError, match=r"\$\.layer_replication\[0\]: \[1, 4\] is not a range of the model's 3"
    ):
        peftdecl.attach(llama(), {**spec, "layer_replication": [[1, 4]]}, backend="torch")
    model = peftdecl.attach(llama(), {**spec, "layer_replication": None}, backend="torch")
    with pytest.raises(TargetError, match="only the first adapter attached"):
        model.add_adapter("other", spec)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(TargetError, match="found no layer list"):
        peftdecl.attach(mlp, {"peft_type": "LORA", "target_modules": ["0"], "layer_replication": [[0, 1]]})


def test_backends_without_replication_refuse_it() -> None:
    """The NumPy reference works on a state dict, with no layer list to rebuild: refused, naming the field."""
    if "numpy" not in selected_backends():
        pytest.skip("the NumPy backend is not selected")
    from tests.hf_models import numpy_inputs

    state, kwargs = numpy_inputs(llama())
    with pytest.raises(TargetError, match=r"\$\.layer_replication: the numpy backend does not replicate"):
        peftdecl.attach(state, lora().to_dict(), backend="numpy", **kwargs)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora", "corda", "lora_ga", "loftq"])
def test_base_writing_inits_are_refused_with_replication(init: str) -> None:
    """The copies share one base weight, so an initialisation that writes W − s·BA per layer cannot be used."""
    spec = {
        "peft_type": "LORA",
        "target_modules": ["q_proj"],
        "layer_replication": [[0, 2]],
        "init_lora_weights": init,
    }
    if init == "loftq":
        spec["loftq_config"] = {"loftq_bits": 4, "loftq_iter": 1}
    with pytest.raises(SpecError) as info:
        peftdecl.load_spec(spec)
    assert "$.init_lora_weights" in dict(info.value.problems)
