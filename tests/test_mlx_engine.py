"""The MLX engine on a tiny mlx-lm Llama: trainability, training with mlx.optimizers, several adapters, mixed
batches, disabling, merge_and_unload, modules_to_save and the errors for what it refuses.

Tolerances: float32 model outputs computed two ways agree to relative error ≤ 1e-5; per-layer results against the
float64 NumPy reference ≤ 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest

import peftdecl
from peftdecl.errors import BackendError, PeftdeclError
from tests.conftest import rel_err
from tests.mlx_models import Tiny, mx, nn, tiny_llama, tree_flatten, twin

TOL = 1e-5
LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "init_lora_weights": False}
IDS = mx.array([[1, 5, 9, 2, 7], [3, 3, 8, 0, 4]])


def logits(model) -> np.ndarray:
    out = model(IDS)
    mx.eval(out)
    return np.array(out)


def test_only_active_adapter_tensors_are_trainable() -> None:
    model = peftdecl.attach(tiny_llama(), {**LORA, "target_modules": ["q_proj", "v_proj"]}, seed=1)
    model.add_adapter("other", {**LORA, "target_modules": ["o_proj"]}, seed=2)
    keys = set(model.trainable_parameters())  # flat IR keys, as on every backend
    assert keys == {
        f"model.layers.{i}.self_attn.{p}.lora_{ab}.weight"
        for i in range(2) for p in ("q_proj", "v_proj") for ab in "AB"
    }  # fmt: skip
    in_tree = {k.replace(".lora_", ".adapters.default.lora_") for k in keys}
    assert {k for k, _ in tree_flatten(model.engine.model.trainable_parameters())} == in_tree
    assert {k for k, _ in tree_flatten(model.parameter_tree())} == in_tree
    model.set_adapter("other")
    assert keys.isdisjoint(model.trainable_parameters())
    assert all(".o_proj." in k for k in model.trainable_parameters())
    assert all(".adapters.other." in k for k, _ in tree_flatten(model.engine.model.trainable_parameters()))


def test_training_with_value_and_grad_moves_only_adapters() -> None:
    import mlx.optimizers as optim

    base = tiny_llama()
    before = dict(tree_flatten(base.parameters()))
    model = peftdecl.attach(base, {**LORA, "target_modules": ["q_proj", "down_proj"]}, seed=1)
    mlx_model = model.engine.model
    targets = IDS[:, 1:]

    def loss_fn(inputs: mx.array) -> mx.array:
        return nn.losses.cross_entropy(mlx_model(inputs), targets).mean()

    step = nn.value_and_grad(mlx_model, loss_fn)
    opt = optim.SGD(learning_rate=0.5)
    start = model.state_dict()
    losses = []
    for _ in range(3):
        loss, grads = step(IDS[:, :-1])
        opt.update(mlx_model, grads)
        mx.eval(mlx_model.parameters(), opt.state)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = model.state_dict()
    assert all(rel_err(after[k], start[k]) > 1e-4 for k in start)
    merged = model.merge_and_unload()
    params = dict(tree_flatten(merged.parameters()))
    targeted = {f"{m}.weight" for m in model.plan().targets}
    for key, value in before.items():
        changed = rel_err(np.array(params[key]), np.array(value)) > 1e-4
        assert changed == (key in targeted), key


def test_several_adapters_sum_like_the_reference_and_mixed_rows_match_single_runs() -> None:
    spec_a = {**LORA, "target_modules": ["q_proj", "down_proj"]}
    spec_b = {**LORA, "r": 2, "target_modules": ["q_proj"]}
    ours, ref = twin(Tiny(), spec_a, name="a")
    ours.eval()
    arrays_b = ref.state_dict("a")  # any numbers of the right shapes: reuse A's q_proj tensors with rank 2
    arrays_b = {
        k: v[:2] if k.endswith("lora_A.weight") else v[:, :2] for k, v in arrays_b.items() if "q_proj" in k
    }
    ours.add_adapter("b", spec_b, arrays=arrays_b)
    ref.add_adapter("b", spec_b, arrays=arrays_b)
    ours.set_adapter(["a", "b"])
    ref.set_adapter(["a", "b"])
    x = np.random.default_rng(0).normal(size=(2, 3, 16))
    y, _ = ours.engine.layer_vjp("q_proj", x, np.ones((2, 3, 12)))
    assert rel_err(y, ref("q_proj", x)) <= TOL

    ids = mx.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    names = ["a", "__base__", "b"]
    mixed = np.array(ours(ids, adapter_names=names))
    singles = {}
    for name in ("a", "b"):
        ours.set_adapter(name)
        singles[name] = np.array(ours(ids))
    with ours.disable_adapters():
        singles["__base__"] = np.array(ours(ids))
    for row, name in enumerate(names):
        assert rel_err(mixed[row], singles[name][row]) <= TOL, name
    with pytest.raises(PeftdeclError, match="unknown adapters"):
        ours(ids, adapter_names=["a", "zzz", "b"])
    assert np.array_equal(np.array(ours(ids)), singles["b"])  # a failed mixed call leaves nothing behind


def test_disable_delete_and_merge_and_unload() -> None:
    base = tiny_llama()
    plain = logits(base)
    model = peftdecl.attach(base, {**LORA, "target_modules": ["q_proj", "embed_tokens", "lm_head"]}, seed=3)
    adapted = logits(model)
    assert rel_err(adapted, plain) > 1e-3
    with model.disable_adapters():
        assert rel_err(logits(model), plain) <= TOL
    model.merge()
    assert rel_err(logits(model), adapted) <= TOL
    model.unmerge()
    model.add_adapter("spare", {**LORA, "target_modules": ["k_proj"]}, seed=4)
    model.delete_adapter("spare")
    assert type(model.engine.model.model.layers[0].self_attn.k_proj) is nn.Linear
    unloaded = model.merge_and_unload()
    assert unloaded is base
    names = {type(m).__name__ for _, m in unloaded.named_modules()}
    assert "AdaptedLayer" not in names
    assert rel_err(logits(unloaded), adapted) <= TOL


def test_tied_output_head_reads_the_base_embedding_unless_merged() -> None:
    base = tiny_llama(tie_word_embeddings=True)
    plain = logits(base)
    model = peftdecl.attach(base, {**LORA, "target_modules": ["embed_tokens"]}, seed=3)
    assert model.info.output_head is None and model.info.word_embeddings == "model.embed_tokens"
    h = base.model(IDS)  # the adapted embedding feeds the blocks; the tied head still uses the base table
    expected = np.array(h @ model.engine.layer("model.embed_tokens").base_layer.weight.T)
    assert rel_err(logits(model), expected) <= TOL
    assert rel_err(logits(model), plain) > 1e-3


def test_modules_to_save_trains_a_copy_per_adapter() -> None:
    base = tiny_llama()
    original = np.array(base.lm_head.weight)
    model = peftdecl.attach(
        base, {**LORA, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, seed=1
    )
    exported = model.state_dict()
    assert rel_err(exported["lm_head.weight"], original) == 0.0
    copy = model.engine.model.lm_head.copies["default"]
    copy.weight = copy.weight * 2.0
    assert "lm_head.weight" in model.trainable_parameters()
    assert "lm_head.copies.default.weight" in dict(tree_flatten(model.parameter_tree()))
    doubled = logits(model)
    with model.disable_adapters():
        base_out = logits(model)
    assert rel_err(doubled, base_out) > 1e-3
    with pytest.raises(PeftdeclError, match="adapter_names with modules_to_save"):
        model(IDS, adapter_names=["default", "__base__"])
    unloaded = model.merge_and_unload()
    assert rel_err(np.array(unloaded.lm_head.weight), 2.0 * original) <= TOL


def test_refusals_name_the_problem() -> None:
    quantised = tiny_llama(hidden_size=64, intermediate_size=64)
    # affine runs; MLX's floating-point modes do not
    nn.quantize(quantised, group_size=32, bits=4, mode="mxfp4")
    with pytest.raises(
        BackendError, match=r"model\.layers\.0\.self_attn\.q_proj: the base layer is quantised \(mlx_mxfp4\)"
    ):
        peftdecl.attach(quantised, {**LORA, "target_modules": ["q_proj"]})
    with pytest.raises(BackendError, match="unknown options"):
        peftdecl.attach(Tiny(), {**LORA, "target_modules": ["q_proj"]}, layer_types={"q_proj": "linear"})
    with pytest.raises(PeftdeclError, match=r"contains '\.'"):
        peftdecl.attach(Tiny(), {**LORA, "target_modules": ["q_proj"]}, name="a.b")
    model = peftdecl.attach(Tiny(), {"peft_type": "LORA", "use_dora": True, "target_modules": ["q_proj"]})
    with pytest.raises(PeftdeclError, match="mixed batches support additive kinds only"):
        model(mx.array([[1, 2]]), adapter_names=["default"])


def test_bfloat16_base_keeps_float32_adapters() -> None:
    """Adapters are float32 on a bfloat16 model; outputs follow the base dtype (bfloat16 tolerance 2e-2)."""
    base = tiny_llama()
    base.set_dtype(mx.bfloat16)
    spec = {**LORA, "target_modules": ["q_proj", "down_proj"], "use_dora": True}
    model, ref = twin(base, spec)
    model.eval()
    assert all(v.dtype == mx.float32 for v in model.trainable_parameters().values())
    _, layers = model.engine.capture(np.array(IDS))
    assert model(IDS).dtype == mx.bfloat16
    for module, (x, y) in layers.items():
        assert rel_err(y, ref(module, x.astype(np.float64))) <= 2e-2, module
    assert all(v.dtype == np.float32 for v in model.state_dict().values())
