"""Model level: one tiny Llama checkpoint saved by transformers, loaded by transformers (torch, with the real HF
PEFT) and by mlx-lm (MLX, with peftdecl), carrying the same adapter.

Tolerances (float32 end to end): logits, loss and adapter gradients relative error ≤ 1e-4; adapter tensors after
one SGD step ≤ 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest

import peftdecl
from tests.conftest import rel_err
from tests.hf_models import peft, peft_model, perturb, tiny_llama, torch, transformers
from tests.mlx_models import mx, nn, tree_flatten

pytestmark = pytest.mark.peft

MODEL_TOL = 1e-4
STEP_TOL = 1e-5
IDS = np.array([[3, 17, 42, 9, 77, 5, 120], [64, 1, 8, 99, 23, 23, 50]])

CASES = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"]),
    "rslora_layers": dict(
        r=4, lora_alpha=6, use_rslora=True, target_modules=["o_proj"], layers_to_transform=[1]
    ),
    "embedding_head": dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "lm_head", "up_proj"]),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(folder)
    return folder


def torch_base(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def mlx_base(folder):
    from peftdecl_mlx.inventory import load_checkpoint

    return load_checkpoint(folder)


def ir_key(peft_name: str) -> str:
    # PEFT keeps DoRA's magnitude in a module (lora_magnitude_vector.default.weight); the file key drops both
    name = peft_name.removeprefix("base_model.model.").replace(
        "lora_magnitude_vector.default.weight", "lora_magnitude_vector"
    )
    return name.replace(".default", "")


def mlx_ir_key(path: str) -> str:
    module, _, rest = path.partition(".adapters.")
    return f"{module}.{rest.split('.', 1)[1]}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_gives_peft_logits_on_mlx(case: str, checkpoint, tmp_path) -> None:
    wrapped = peft_model(torch_base(checkpoint), peft.LoraConfig(init_lora_weights=False, **CASES[case]))
    perturb(wrapped)
    wrapped.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = wrapped(torch.tensor(IDS)).logits.numpy()
    ours = peftdecl.load_adapter(mlx_base(checkpoint), tmp_path)
    assert rel_err(np.array(ours(mx.array(IDS))), expected) <= MODEL_TOL


@pytest.mark.parametrize("case", ["lora", "dora"])
def test_loss_gradients_and_one_step_match_peft(case: str, checkpoint, tmp_path) -> None:
    wrapped = peft_model(torch_base(checkpoint), peft.LoraConfig(init_lora_weights=False, **CASES[case]))
    perturb(wrapped)
    wrapped.save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(mlx_base(checkpoint), tmp_path, is_trainable=True)
    mlx_model = ours.engine.model
    inputs, targets = IDS[:, :-1], IDS[:, 1:]

    def torch_loss():
        logits = wrapped(torch.tensor(inputs)).logits
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), torch.tensor(targets).reshape(-1)
        )

    def mlx_loss(x: mx.array) -> mx.array:
        return nn.losses.cross_entropy(mlx_model(x), mx.array(targets)).mean()

    wrapped.train()
    loss_t = torch_loss()
    loss_t.backward()
    params_t = {ir_key(n): p for n, p in wrapped.named_parameters() if p.requires_grad}
    step = nn.value_and_grad(mlx_model, mlx_loss)
    loss_m, grads = step(mx.array(inputs))
    grads_m = {mlx_ir_key(k): np.array(v) for k, v in tree_flatten(grads)}
    assert rel_err(loss_m.item(), loss_t.item()) <= MODEL_TOL
    assert set(grads_m) == set(params_t)
    for key, param in params_t.items():
        assert rel_err(grads_m[key], param.grad.numpy()) <= MODEL_TOL, key

    import mlx.optimizers as optim

    lr = 0.5
    torch.optim.SGD(wrapped.parameters(), lr=lr).step()
    optim.SGD(learning_rate=lr).update(mlx_model, grads)
    exported = ours.state_dict()
    for key, param in params_t.items():
        assert rel_err(exported[key], param.detach().numpy()) <= STEP_TOL, key
    with torch.no_grad():
        after_t = torch_loss().item()
    assert rel_err(mlx_loss(mx.array(inputs)).item(), after_t) <= MODEL_TOL
    assert after_t < loss_t.item()


@pytest.mark.parametrize("case", sorted(CASES))
def test_peftdecl_mlx_adapter_saved_as_hf_loads_in_peft(case: str, checkpoint, tmp_path) -> None:
    spec = {"peft_type": "LORA", "init_lora_weights": False, **CASES[case]}
    ours = peftdecl.attach(mlx_base(checkpoint), spec, seed=3)
    ours.save(tmp_path)
    expected = np.array(ours(mx.array(IDS)))
    reference = peft_model(
        torch_base(checkpoint), peft.LoraConfig(**{**CASES[case], "init_lora_weights": False})
    )
    assert set(peft.utils.load_peft_weights(str(tmp_path))) == set(peft.get_peft_model_state_dict(reference))
    loaded = peft.PeftModel.from_pretrained(torch_base(checkpoint), tmp_path)
    with torch.no_grad():
        theirs = loaded(torch.tensor(IDS)).logits.numpy()
    assert rel_err(theirs, expected) <= MODEL_TOL


PROMPTS = {
    "prompt_tuning": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "prefix_tuning": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
}


@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_prompt_learning_logits_and_table_gradient_match_peft(kind: str, checkpoint, tmp_path) -> None:
    wrapped = peft_model(torch_base(checkpoint), PROMPTS[kind]())
    wrapped.save_pretrained(tmp_path)
    ids = torch.tensor(IDS)
    logits_t = wrapped(ids).logits
    logits_t.float().square().mean().backward()
    grad_t = next(p.grad for n, p in wrapped.named_parameters() if p.requires_grad).numpy()

    ours = peftdecl.load_adapter(mlx_base(checkpoint), tmp_path, is_trainable=True)
    mlx_model = ours.engine.model
    assert rel_err(np.array(ours(mx.array(IDS))), logits_t.detach().numpy()) <= MODEL_TOL

    loss = nn.value_and_grad(mlx_model, lambda x: mx.mean(mx.square(ours(x))))
    _, grads = loss(mx.array(IDS))
    ((key, grad_m),) = tree_flatten(grads)
    assert key == "prompt_encoder.default.prompt_embeddings"
    assert rel_err(np.array(grad_m), grad_t) <= MODEL_TOL


@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_prompt_learning_saved_by_peftdecl_on_mlx_loads_in_peft(kind: str, checkpoint, tmp_path) -> None:
    spec = {"peft_type": kind.upper(), "task_type": "CAUSAL_LM", "num_virtual_tokens": 3}
    ours = peftdecl.attach(mlx_base(checkpoint), spec, seed=4)
    ours.save(tmp_path)
    loaded = peft.PeftModel.from_pretrained(torch_base(checkpoint), tmp_path)
    with torch.no_grad():
        theirs = loaded(torch.tensor(IDS)).logits.numpy()
    assert rel_err(np.array(ours(mx.array(IDS))), theirs) <= MODEL_TOL


@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_prompt_learning_generation_through_the_kv_cache(kind: str, checkpoint) -> None:
    """Feeding the tokens in two chunks through the model's KV cache gives the one-pass logits (float32, 1e-5)."""
    spec = {"peft_type": kind.upper(), "task_type": "CAUSAL_LM", "num_virtual_tokens": 3}
    ours = peftdecl.attach(mlx_base(checkpoint), spec, seed=4)
    ids = mx.array(IDS)
    whole = np.array(ours(ids))
    cache = ours.engine.prompt_cache(batch=2) if kind == "prefix_tuning" else ours.engine.model.make_cache()
    first = np.array(ours(ids[:, :4], cache=cache))
    second = np.array(ours(ids[:, 4:], cache=cache))
    assert rel_err(np.concatenate([first, second], axis=1), whole) <= 1e-5
