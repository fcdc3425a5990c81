"""The torch backend against the real HF PEFT on tiny transformers models (built from configs, float32).

The same adapter weights (a PEFT-saved file loaded by peftdecl, or a peftdecl-saved file loaded by PEFT) must give
the same logits, the same loss, the same gradients and the same parameters after one SGD step: relative error
≤ 1e-5. Merged weights agree to ≤ 1e-6. Greedy generation agrees token for token.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import peftdecl
from tests.conftest import rel_err
from tests.hf_models import peft, peft_model, perturb, tiny_gpt2, tiny_llama, torch
from tests.peft_parity import assert_training_step_like_peft

pytestmark = pytest.mark.peft

TOL = 1e-5  # float32 logits, loss, gradients and parameters after a step
MERGE_TOL = 1e-6  # float32 merged weights

QV = ["q_proj", "v_proj"]
KINDS = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV, init_lora_weights=False),
    "lora_embedding": lambda: peft.LoraConfig(
        r=4, target_modules=["embed_tokens", "o_proj"], init_lora_weights=False
    ),
    "dora": lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=QV, use_dora=True, init_lora_weights=False
    ),
    # a task type makes PEFT's model add AdaLoRA's orthogonality term to the training loss
    "adalora": lambda: peft.AdaLoraConfig(
        init_r=4, target_r=2, total_step=10, target_modules=QV, task_type="CAUSAL_LM"
    ),
    "ia3": lambda: peft.IA3Config(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
    ),
    "loha": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=QV, init_weights=False),
    "lokr": lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=QV, init_weights=False),
    "oft": lambda: peft.OFTConfig(oft_block_size=16, target_modules=QV, init_weights=False),
    "boft": lambda: peft.BOFTConfig(boft_block_size=8, target_modules=QV, init_weights=False),
    "vera": lambda: peft.VeraConfig(r=8, target_modules=QV, init_weights=False),
}


def two_peft_loras(
    make: Callable[[], Any], folder: Path, other: list[str]
) -> tuple[Any, peftdecl.AdaptedModel]:
    """PEFT's LoRA "default" (r 4 on q/v) and "other" (r 2 on ``other``) on ``make()``, perturbed and saved to
    ``folder``; peftdecl loads both from there onto a fresh ``make()``. Returns (PEFT's model, ours)."""
    wrapped = peft_model(make(), peft.LoraConfig(r=4, target_modules=QV, init_lora_weights=False))
    wrapped.add_adapter("other", peft.LoraConfig(r=2, target_modules=other, init_lora_weights=False))
    perturb(wrapped)
    wrapped.save_pretrained(folder)
    ours = peftdecl.load_adapter(make(), folder)
    ours.load_adapter(folder, "other")
    return wrapped, ours


def ids(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def peft_saved(kind: str, folder, base=None):
    """A PEFT model of ``kind`` with non-trivial adapter weights, saved in ``folder``."""
    wrapped = peft_model(base if base is not None else tiny_llama(), KINDS[kind]())
    perturb(wrapped)
    wrapped.save_pretrained(folder)
    return wrapped


def ir_key(peft_name: str) -> str:
    """PEFT's in-memory parameter name -> peftdecl's key (the adapter name removed)."""
    key = peft_name.removeprefix("base_model.model.").replace(".default", "")
    return key.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


def peft_trainable(wrapped) -> dict:
    return {ir_key(n): p for n, p in wrapped.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_peft_file_gives_peft_logits_and_merged_weights(kind: str, tmp_path) -> None:
    wrapped = peft_saved(kind, tmp_path)
    ours = peftdecl.load_adapter(tiny_llama(), tmp_path)
    assert isinstance(ours.base_model, type(wrapped.base_model.model))
    x = ids()
    with torch.no_grad():
        expected = wrapped(input_ids=x).logits
        got = ours(input_ids=x).logits
    assert rel_err(got.numpy(), expected.numpy()) <= TOL
    with torch.no_grad(), wrapped.disable_adapter(), ours.disable_adapters():
        assert rel_err(ours(input_ids=x).logits.numpy(), wrapped(input_ids=x).logits.numpy()) <= TOL

    merged_ours = ours.merge_and_unload()
    merged_theirs = wrapped.merge_and_unload()
    assert type(merged_ours) is type(merged_theirs)
    theirs = merged_theirs.state_dict()
    for key, value in merged_ours.state_dict().items():
        assert rel_err(value.numpy(), theirs[key].numpy()) <= MERGE_TOL, key
    assert not any("peftdecl" in type(m).__module__ for m in merged_ours.modules())


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_same_loss_gradients_and_sgd_step_as_peft(kind: str, tmp_path) -> None:
    wrapped = peft_saved(kind, tmp_path)
    ours = peftdecl.load_adapter(tiny_llama(), tmp_path, is_trainable=True)
    x = ids(seed=1)
    assert_training_step_like_peft(wrapped, ours, peft_trainable(wrapped), TOL, input_ids=x, labels=x)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_peftdecl_file_loads_in_peft_with_the_same_logits(kind: str, tmp_path) -> None:
    # the config as PEFT writes it (sets become lists)
    spec = peftdecl.load_spec(json.loads(json.dumps(KINDS[kind]().to_dict(), default=sorted)))
    ours = peftdecl.attach(tiny_llama(), spec, seed=5)
    with torch.no_grad():
        # non-trivial values everywhere (fresh PEFT-style inits leave some tensors at zero)
        gen = torch.Generator().manual_seed(2)
        for param in ours.trainable_parameters().values():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    ours.save(tmp_path)
    expected_keys = set(peft.get_peft_model_state_dict(peft_model(tiny_llama(), KINDS[kind]())))
    assert set(peft.utils.load_peft_weights(str(tmp_path))) == expected_keys

    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    x = ids(seed=2)
    with torch.no_grad():
        assert rel_err(ours(input_ids=x).logits.numpy(), loaded(input_ids=x).logits.numpy()) <= TOL


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_greedy_generate_matches_peft(kind: str, tmp_path) -> None:
    wrapped = peft_saved(kind, tmp_path)
    ours = peftdecl.load_adapter(tiny_llama(), tmp_path)
    prompt = ids(batch=2, length=5, seed=3)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = wrapped.generate(input_ids=prompt, **settings)
    got = ours.generate(input_ids=prompt, **settings)
    assert torch.equal(got, expected)
    with ours.disable_adapters():
        plain = ours.generate(input_ids=prompt, **settings)
    assert torch.equal(plain, tiny_llama().generate(input_ids=prompt, **settings))


def test_mixed_batch_matches_peft_adapter_names(tmp_path) -> None:
    wrapped, ours = two_peft_loras(tiny_llama, tmp_path, other=["q_proj", "o_proj"])
    wrapped.eval()  # PEFT refuses adapter_names in training mode
    names = ["other", "__base__", "default", "other"]
    x = ids(batch=4, seed=4)
    with torch.no_grad():
        expected = wrapped(input_ids=x, adapter_names=names).logits
        got = ours(input_ids=x, adapter_names=names).logits
    assert rel_err(got.numpy(), expected.numpy()) <= TOL
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    prompt = ids(batch=4, length=4, seed=5)
    expected_tokens = wrapped.generate(input_ids=prompt, adapter_names=names, **settings)
    assert torch.equal(ours.generate(input_ids=prompt, adapter_names=names, **settings), expected_tokens)


def test_two_active_adapters_sum_like_peft(tmp_path) -> None:
    wrapped, ours = two_peft_loras(tiny_llama, tmp_path, other=["q_proj"])
    wrapped.base_model.set_adapter(["default", "other"])
    ours.set_adapter(["default", "other"])
    x = ids(seed=6)
    with torch.no_grad():
        assert rel_err(ours(input_ids=x).logits.numpy(), wrapped(input_ids=x).logits.numpy()) <= TOL


def test_gpt2_conv1d_and_modules_to_save_both_ways(tmp_path) -> None:
    config = peft.LoraConfig(
        r=4, target_modules=["c_attn"], modules_to_save=["lm_head"], init_lora_weights=False
    )
    wrapped = peft_model(tiny_gpt2(), config)
    perturb(wrapped)
    wrapped.save_pretrained(tmp_path / "theirs")
    ours = peftdecl.load_adapter(tiny_gpt2(), tmp_path / "theirs", is_trainable=True)
    x = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert rel_err(ours(input_ids=x).logits.numpy(), wrapped(input_ids=x).logits.numpy()) <= TOL
    assert "lm_head.weight" in ours.trainable_parameters()
    ours.save(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ours")
    with torch.no_grad():
        assert rel_err(loaded(input_ids=x).logits.numpy(), wrapped(input_ids=x).logits.numpy()) <= TOL
        merged = ours.merge_and_unload()
        assert rel_err(merged(input_ids=x).logits.numpy(), wrapped(input_ids=x).logits.numpy()) <= TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_base_keeps_float32_adapters(dtype, tmp_path) -> None:
    peft_saved("lora", tmp_path)
    ours = peftdecl.load_adapter(tiny_llama().to(dtype), tmp_path)
    assert all(p.dtype == torch.float32 for p in ours.trainable_parameters().values())
    reference = peftdecl.load_adapter(tiny_llama().double(), tmp_path)  # float64 torch, same file
    x = ids(seed=8)
    with torch.no_grad():
        logits = ours(input_ids=x).logits
        assert logits.dtype == dtype
        assert rel_err(logits.double().numpy(), reference(input_ids=x).logits.numpy()) <= 2e-2
    their = peft.PeftModel.from_pretrained(tiny_llama().to(dtype), tmp_path)
    assert {p.dtype for n, p in their.named_parameters() if "lora_" in n} == {torch.float32}


def test_adalora_rank_allocation_follows_peft_step_for_step(tmp_path) -> None:
    from peftdecl_numpy.rank_allocator import RankAllocator
    from peftdecl_torch.kinds.adalora import update_and_allocate

    schedule = dict(total_step=8, tinit=1, tfinal=2, deltaT=2)
    config = peft.AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj", "v_proj"], **schedule)
    wrapped = peft_model(tiny_llama(), config)
    perturb(wrapped)
    wrapped.save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(tiny_llama(), tmp_path, is_trainable=True)
    allocator = RankAllocator(ours.plan())
    params, theirs = ours.trainable_parameters(), peft_trainable(wrapped)
    gen = torch.Generator().manual_seed(3)
    for step in range(1, schedule["total_step"]):
        with torch.no_grad():  # the same random gradients and SGD step on both sides
            for key, param in params.items():
                grad = torch.randn(param.shape, generator=gen)
                param.grad, theirs[key].grad = grad.clone(), grad.clone()
                param -= 0.01 * grad
                theirs[key] -= 0.01 * grad
        budget, mask = update_and_allocate(ours, allocator, step)
        wrapped.base_model.update_and_allocate(step)
        assert budget == wrapped.base_model.rankallocator.budget_schedule(step)[0], step
        if mask is not None:
            pattern = {
                k.removeprefix("base_model.model."): v
                for k, v in wrapped.peft_config["default"].rank_pattern.items()
            }
            assert {k.replace(".default", ""): v for k, v in pattern.items()} == mask, step
        for key, param in params.items():
            assert rel_err(param.detach().numpy(), theirs[key].detach().numpy()) <= TOL, (step, key)
    assert mask is not None and sum(map(sum, mask.values())) == 2 * 4  # target_r · layers
