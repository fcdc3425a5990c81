"""Inference-mode loading (issue 10, item 1): a loaded adapter is frozen and the model in eval mode unless
``is_trainable=True``; wrappers take the model's train/eval mode and follow later ``train()`` / ``eval()`` calls, on
torch, MLX and the NumPy reference; ``peftdecl equiv`` compares in eval mode.

Expected numbers come from HF PEFT's own ``PeftModel.from_pretrained`` on the same file (logits within 1e-5
relative, float32) or from a second forward of the same model (identical: dropout off).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import peftdecl
from tests.conftest import rel_err
from tests.hf_models import peft, peft_model, perturb, tiny_llama, torch

TOL = 1e-5  # float32 logits, ours vs PEFT, relative
DROPOUT_LORA = {
    "peft_type": "LORA",
    "r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.3,
    "target_modules": ["q_proj", "v_proj"],
    "init_lora_weights": False,  # non-zero B, so that dropout on the adapter input changes the output
}
IDS = torch.tensor([[3, 17, 42, 9, 77, 5], [64, 1, 8, 99, 23, 50]])


@pytest.fixture
def saved(tmp_path) -> Path:
    """A LoRA with lora_dropout=0.3 saved by peftdecl (HF layout)."""
    peftdecl.attach(tiny_llama(), DROPOUT_LORA).save(tmp_path / "lora")
    return tmp_path / "lora"


def logits(model: peftdecl.AdaptedModel) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_loaded_adapter_is_frozen_in_eval_mode_and_deterministic(saved) -> None:
    base = tiny_llama().train()  # even a model in training mode: PEFT's inference load calls eval()
    ours = peftdecl.load_adapter(base, saved)
    assert torch.equal(logits(ours), logits(ours))
    assert not any(m.training for m in base.modules())
    assert ours.trainable_parameters() == {}
    assert not any(p.requires_grad for p in base.parameters())
    assert ours.training is False


def test_is_trainable_gives_trainable_adapter_and_keeps_the_mode(saved) -> None:
    for mode in (True, False):
        base = tiny_llama().train(mode)
        ours = peftdecl.load_adapter(base, saved, is_trainable=True)
        params = ours.trainable_parameters()
        assert params and all(p.requires_grad for p in params.values())
        assert {m.training for m in base.modules()} == {mode}
        assert torch.equal(logits(ours), logits(ours)) is (not mode)  # dropout only in training


def test_wrappers_follow_train_and_eval(saved) -> None:
    base = tiny_llama()  # eval mode
    ours = peftdecl.attach(base, DROPOUT_LORA)  # attach: trainable, the model's mode kept
    assert ours.trainable_parameters()
    assert torch.equal(logits(ours), logits(ours))
    ours.train()
    assert all(m.training for m in base.modules())
    assert not torch.equal(logits(ours), logits(ours))
    ours.eval()
    assert torch.equal(logits(ours), logits(ours))


def test_adapted_model_load_adapter_keyword(saved) -> None:
    ours = peftdecl.attach(tiny_llama().train(), DROPOUT_LORA)
    ours.load_adapter(saved, "other", is_trainable=True)
    assert ours.training  # trainable load: mode kept
    ours.load_adapter(saved, "frozen")
    assert not ours.training  # inference load: eval, as PEFT's load_adapter
    ours.set_adapter("frozen", inference_mode=True)
    assert ours.trainable_parameters() == {}
    ours.set_adapter("frozen")  # PEFT's set_adapter makes the adapter trainable unless inference_mode=True
    assert ours.trainable_parameters()


def test_inference_load_equals_peft_from_pretrained_with_dropout(tmp_path) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj"])
    wrapped = peft_model(tiny_llama(), config)
    perturb(wrapped)
    wrapped.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama().train(), tmp_path)
    ours = peftdecl.load_adapter(tiny_llama().train(), tmp_path)
    with torch.no_grad():
        expected = theirs(input_ids=IDS).logits
    assert rel_err(logits(ours).numpy(), expected.numpy()) <= TOL
    assert rel_err(logits(ours).numpy(), expected.numpy()) <= TOL  # again: no dropout draw on either side
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_mlx_wrappers_take_the_models_mode(tmp_path) -> None:
    pytest.importorskip("mlx.core")
    import mlx.core as mx

    from tests.mlx_models import tiny_llama as mlx_llama

    spec = {**DROPOUT_LORA, "target_modules": ["q_proj", "v_proj"]}
    peftdecl.attach(mlx_llama(), spec).save(tmp_path)
    ids = mx.array(IDS.numpy() % 64)
    model = mlx_llama()
    model.train()
    ours = peftdecl.load_adapter(model, tmp_path)
    assert np.array_equal(np.array(ours(ids)), np.array(ours(ids)))
    assert ours.trainable_parameters() == {}
    assert not any(m.training for _, m in model.named_modules())
    ours.train()
    assert all(m.training for _, m in model.named_modules())
    assert not np.array_equal(np.array(ours(ids)), np.array(ours(ids)))
    from mlx.utils import tree_flatten

    for mode in (True, False):
        base = mlx_llama().train(mode)
        trainable = peftdecl.load_adapter(base, tmp_path, is_trainable=True)
        assert tree_flatten(trainable.trainable_parameters())
        assert {m.training for _, m in base.named_modules()} == {mode}  # a trainable load keeps the mode
    fresh = mlx_llama()
    fresh.eval()
    attached = peftdecl.attach(fresh, spec)
    assert not any(m.training for _, m in fresh.named_modules())
    assert np.array_equal(np.array(attached(ids)), np.array(attached(ids)))


def test_numpy_inference_load_is_frozen(saved) -> None:
    from peftdecl_torch.inventory import numpy_model

    state, layer_types, facts = numpy_model(tiny_llama())
    frozen = peftdecl.load_adapter(dict(state), saved, layer_types=layer_types, **facts)
    assert frozen.trainable_parameters() == {}
    assert frozen.training is False
    trainable = peftdecl.load_adapter(dict(state), saved, is_trainable=True, layer_types=layer_types, **facts)
    assert set(trainable.trainable_parameters()) == set(trainable.state_dict())


def test_equiv_passes_on_the_example_with_dropout(tmp_path) -> None:
    pytest.importorskip("mlx.core")
    from peftdecl.equiv import run_equivalence

    tiny_llama().save_pretrained(tmp_path)
    example = Path(__file__).resolve().parent.parent / "examples" / "lora_llama.yaml"
    assert peftdecl.load_spec(example).lora_dropout > 0
    report = run_equivalence(example, model_dir=tmp_path, backend_names=["numpy", "torch", "mlx"])
    assert report.passed, report.format()


def test_peft_keyword_names_are_accepted(tmp_path) -> None:
    """PEFT's ``adapter_name`` / ``peft_config`` keywords name the same arguments as peftdecl's positional ones."""
    state = {"q.weight": np.linspace(-1, 1, 12).reshape(3, 4)}
    spec = {"peft_type": "LORA", "r": 2, "target_modules": ["q"], "init_lora_weights": False}
    model = peftdecl.attach(dict(state), spec)
    model.add_adapter(adapter_name="other", peft_config={**spec, "r": 1})
    model.save(tmp_path)
    loaded = peftdecl.load_adapter(dict(state), tmp_path, adapter_name="other")
    assert loaded.active_adapters == ["other"] and loaded.peft_config["other"].r == 1
    loaded.load_adapter(tmp_path, adapter_name="again")
    assert sorted(loaded.peft_config) == ["again", "other"]
    with pytest.raises(TypeError, match="same argument"):
        loaded.load_adapter(tmp_path, "x", adapter_name="y")
