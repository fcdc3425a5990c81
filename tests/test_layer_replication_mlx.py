"""LoRA's ``layer_replication`` on the MLX backend, against HF PEFT 0.21 on torch and against mlx-lm itself.

One tiny Llama checkpoint folder is loaded by transformers (for PEFT) and by mlx-lm. PEFT's replicated adapter
loads on MLX with PEFT's logits and ours loads in PEFT with ours: float32 on both sides through different kernels
(MLX's fused attention and RMSNorm against torch's), so within 1e-4 relative. A replicated mlx-lm model equals
the same architecture built by mlx-lm with the replicated layer layout (the same MLX operations: 1e-6), and its
step-by-step generation through mlx-lm's KV cache gives its full-sequence logits (1e-5: other summation order).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import peftdecl
from peftdecl.errors import PeftdeclError, TargetError
from tests.conftest import rel_err, selected_backends

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

if "mlx" not in selected_backends():
    pytest.skip("the MLX backend is not selected", allow_module_level=True)

from peftdecl.train.tiny_model import build_tiny_llama  # noqa: E402
from peftdecl_mlx.inventory import load_checkpoint  # noqa: E402
from peftdecl_mlx.replication import replicate_layers  # noqa: E402
from tests.mlx_models import tiny_llama  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TORCH_TOL = 1e-4
LAYER_MAP = [[0, 2], [1, 3]]  # layers 0, 1, 1, 2 of three
IDS = [[5, 6, 7, 9, 40], [8, 4, 11, 13, 50]]
SPEC = {
    "peft_type": "LORA",
    "target_modules": ["q_proj", "v_proj"],
    "layer_replication": LAYER_MAP,
    "init_lora_weights": False,
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(
        tmp_path_factory.mktemp("tiny"), hidden=16, layers=3, heads=2, kv_heads=1, intermediate=32
    )


def torch_llama(folder: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype="float32").eval()


def torch_logits(model: Any) -> np.ndarray:
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.double().numpy()


def mlx_logits(model: Any) -> np.ndarray:
    return np.array(model(mx.array(IDS)), dtype=np.float64)


def test_peft_folder_loads_on_mlx(folder: Path, tmp_path: Path) -> None:
    """PEFT's replicated adapter on MLX: four layers on three layers' arrays, each copy with its LoRA; PEFT's
    logits."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.manual_seed(1234)
    theirs = peft.get_peft_model(torch_llama(folder), peft.LoraConfig(**SPEC)).eval()
    theirs.save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(load_checkpoint(folder), tmp_path, backend="mlx")
    base = ours.base_model
    layers = base.model.layers
    assert len(layers) == 4 and base.args.num_hidden_layers == 4 and len(base.model.layer_types) == 4
    assert layers[1].mlp.up_proj.weight is layers[2].mlp.up_proj.weight  # copies share the base arrays
    assert layers[1].self_attn.q_proj.base_layer.weight is layers[2].self_attn.q_proj.base_layer.weight
    assert layers[1].self_attn.q_proj is not layers[2].self_attn.q_proj  # but carry their own adapters
    assert layers[2].args is base.args  # and read the model's one ModelArgs, which counts four layers
    assert len(ours.plan().layers) == 8  # q_proj and v_proj on every copy
    expected = torch_logits(theirs)
    assert rel_err(expected, mlx_logits(load_checkpoint(folder))) > 1e-3  # the adapter changes the logits
    assert rel_err(mlx_logits(ours), expected) <= TORCH_TOL


def test_mlx_folder_loads_in_peft(folder: Path, tmp_path: Path) -> None:
    """Our replicated MLX adapter (random A and B) saves PEFT's config and keys: PEFT loads it with our logits."""
    peft = pytest.importorskip("peft")
    ours = peftdecl.attach(load_checkpoint(folder), SPEC, backend="mlx", seed=3)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(torch_llama(folder), tmp_path).eval()
    assert theirs.peft_config["default"].layer_replication == LAYER_MAP
    assert rel_err(mlx_logits(ours), mlx_logits(load_checkpoint(folder))) > 1e-3
    assert rel_err(torch_logits(theirs), mlx_logits(ours)) <= TORCH_TOL


def test_each_copy_trains_its_own_lora_like_peft(folder: Path, tmp_path: Path) -> None:
    """MLX gradients of every copy's A and B (through mx.grad of the flat trainable mapping) equal PEFT's torch
    autograd gradients for the loss mean(logits²); float32 through different kernels: 1e-4 relative."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.manual_seed(1234)
    theirs = peft.get_peft_model(torch_llama(folder), peft.LoraConfig(**SPEC))
    theirs.save_pretrained(tmp_path)
    theirs(input_ids=torch.tensor(IDS)).logits.square().mean().backward()
    expected = {
        k.replace(".default", ""): p.grad.double().numpy()
        for k, p in theirs.base_model.model.named_parameters()
        if p.requires_grad
    }
    ours = peftdecl.load_adapter(load_checkpoint(folder), tmp_path, backend="mlx", is_trainable=True)

    def loss(params: dict[str, Any]) -> Any:
        ours.engine.update_parameters(params)
        return mx.mean(mx.square(ours(mx.array(IDS))))

    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()  # shared weights once
    grads = mx.grad(loss)(ours.trainable_parameters())
    assert set(grads) == set(expected) and len(grads) == 16  # A and B of q_proj and v_proj on four layers
    for key, grad in grads.items():
        assert rel_err(np.array(grad, dtype=np.float64), expected[key]) <= TORCH_TOL, key


SLIDING = {"sliding_window": 3, "num_hidden_layers": 3}
TYPES = ["full_attention", "sliding_attention", "full_attention"]


def test_replicated_model_is_mlx_lms_own_layout() -> None:
    """Replicating [[1, 3], [0, 2]] of a full/sliding/full Llama gives mlx-lm's own model built with layers
    1, 2, 0, 1: the same layer types, mask layers (fa_idx, swa_idx), caches and logits."""
    replicated = tiny_llama(**SLIDING, layer_types=TYPES)
    sources = [1, 2, 0, 1]
    assert replicate_layers(replicated, [(1, 3), (0, 2)]) == 4
    built = tiny_llama(seed=7, **{**SLIDING, "num_hidden_layers": 4}, layer_types=[TYPES[s] for s in sources])
    weights = {k: v for k, v in replicated.parameters().items() if k != "model"}
    built.update(weights)
    built.model.update({k: v for k, v in replicated.model.parameters().items() if k != "layers"})
    built.model.update({"layers": [replicated.model.layers[i].parameters() for i in range(4)]})
    assert replicated.args.num_hidden_layers == replicated.model.num_hidden_layers == 4
    assert replicated.model.layer_types == built.model.layer_types
    assert (replicated.model.fa_idx, replicated.model.swa_idx) == (built.model.fa_idx, built.model.swa_idx)
    assert [type(c).__name__ for c in replicated.make_cache()] == [
        type(c).__name__ for c in built.make_cache()
    ]
    ids = [[3, 9, 4, 1, 7, 2, 5]]
    assert rel_err(mlx_logits_of(replicated, ids), mlx_logits_of(built, ids)) <= 1e-6


def mlx_logits_of(model: Any, ids: list[list[int]]) -> np.ndarray:
    return np.array(model(mx.array(ids)), dtype=np.float64)


def decoded_in_chunks(model: Any, ids: list[int], chunk: int = 2) -> np.ndarray:
    """Logits of ``ids`` fed ``chunk`` tokens at a time through mlx-lm's KV caches for ``model`` (an mlx-lm
    model or an adapted one)."""
    from mlx_lm.models.cache import make_prompt_cache

    base = getattr(model, "base_model", model)
    cache = make_prompt_cache(base)
    assert len(cache) == len(base.layers)
    steps = [mlx_logits_of_cached(model, ids[i : i + chunk], cache) for i in range(0, len(ids), chunk)]
    return np.concatenate(steps)


def mlx_logits_of_cached(model: Any, ids: list[int], cache: list[Any]) -> np.ndarray:
    return np.array(model(mx.array([ids]), cache=cache), dtype=np.float64)[0]


FAMILIES = {  # mlx-lm model module, its arguments for three layers, the field counting layers
    "gpt2": (
        dict(n_ctx=64, n_embd=32, n_head=2, n_layer=3, n_positions=64, layer_norm_epsilon=1e-5),
        "n_layer",
    ),
    "qwen3": (
        dict(
            hidden_size=32,
            num_hidden_layers=3,
            intermediate_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        ),
        "num_hidden_layers",
    ),
    "gemma3_text": (
        dict(
            hidden_size=32,
            num_hidden_layers=4,
            intermediate_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            rms_norm_eps=1e-6,
            sliding_window=3,
            sliding_window_pattern=2,
        ),
        "num_hidden_layers",
    ),
}


def mlx_lm_model(family: str, seed: int = 0, **overrides: Any) -> Any:
    import importlib

    module = importlib.import_module(f"mlx_lm.models.{family}")
    mx.random.seed(seed)
    fields, _ = FAMILIES[family]
    model = module.Model(module.ModelArgs(model_type=family, vocab_size=64, **{**fields, **overrides}))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
def test_other_mlx_lm_families_replicate(family: str) -> None:
    """GPT-2 (its list at ``model.h``) and Qwen3 replicated by [[0, 2], [1, 3]] equal mlx-lm's own four-layer
    model holding layers 0, 1, 1, 2 (1e-6), and decode through their caches as they run whole (1e-5)."""
    count = FAMILIES[family][1]
    replicated = mlx_lm_model(family)
    assert replicate_layers(replicated, [(0, 2), (1, 3)]) == 4
    assert getattr(replicated.args, count) == 4
    built = mlx_lm_model(family, seed=7, **{count: 4})
    built.update(replicated.parameters())
    ids = [3, 9, 4, 1, 7, 2, 5, 8, 10]
    full = mlx_logits_of(replicated, [ids])[0]
    assert rel_err(full, mlx_logits_of(built, [ids])[0]) <= 1e-6
    assert rel_err(decoded_in_chunks(replicated, ids), full) <= 1e-5


def test_models_that_pick_caches_by_position_keep_their_pattern() -> None:
    """Gemma 3 alternates sliding and global attention by position: a map breaking that alternation is refused
    and leaves the model as it was; one keeping it (pairs of layers) decodes through its caches as it runs whole."""
    model = mlx_lm_model("gemma3_text")
    ids = [3, 9, 4, 1, 7, 2, 5, 8, 10]
    before = mlx_logits_of(model, [ids])
    with pytest.raises(
        TargetError, match=r"\$\.layer_replication: .* picks each layer's cache by its position"
    ):
        replicate_layers(model, [(0, 2), (1, 3)])
    assert len(model.layers) == model.args.num_hidden_layers == 4
    assert rel_err(mlx_logits_of(model, [ids]), before) == 0.0
    assert replicate_layers(model, [(0, 2), (0, 4)]) == 6
    assert rel_err(decoded_in_chunks(model, ids), mlx_logits_of(model, [ids])[0]) <= 1e-5


def test_generation_through_the_kv_cache_matches_the_full_forward() -> None:
    """With an adapter on every copy, decoding two tokens at a time through mlx-lm's caches (a rotating one for
    the sliding layers, whose masks come from the caches fa_idx and swa_idx name) gives the full-sequence logits."""
    # layers 1, 2, 0, 1: sliding, full, full, sliding, so the layers whose caches set the masks move
    spec = {**SPEC, "layer_replication": [[1, 3], [0, 2]]}
    ours = peftdecl.attach(tiny_llama(**SLIDING, layer_types=TYPES), spec, backend="mlx", seed=5)
    ids = [3, 9, 4, 1, 7, 2, 5, 8, 10]
    assert len(ours.base_model.layers) == 4
    assert rel_err(decoded_in_chunks(ours, ids), mlx_logits_of(ours, [ids])[0]) <= 1e-5


def test_writing_the_shared_base_weights_is_refused() -> None:
    """Copies share their base arrays: a merge, PiSSA's W - s·BA per copy or trained biases would give each copy
    its own."""
    ours = peftdecl.attach(tiny_llama(num_hidden_layers=3), SPEC, backend="mlx")
    with pytest.raises(PeftdeclError, match="cannot merge into a model whose layers were replicated"):
        ours.merge_and_unload()
    with pytest.raises(
        PeftdeclError, match=r"init_lora_weights: .*rewrites the base weight, which the copies"
    ):
        peftdecl.attach(
            tiny_llama(num_hidden_layers=3), {**SPEC, "init_lora_weights": "pissa"}, backend="mlx"
        )
    biased = tiny_llama(num_hidden_layers=3, attention_bias=True)
    with pytest.raises(PeftdeclError, match=r"\$\.bias: 'all': training base biases .* replicated"):
        peftdecl.attach(biased, {**SPEC, "bias": "all"}, backend="mlx")


def test_bad_layer_maps_are_refused_naming_the_field() -> None:
    with pytest.raises(
        TargetError, match=r"\$\.layer_replication\[0\]: \[1, 4\] is not a range of the model's 3"
    ):
        peftdecl.attach(
            tiny_llama(num_hidden_layers=3), {**SPEC, "layer_replication": [[1, 4]]}, backend="mlx"
        )
    from tests.mlx_models import Tiny

    with pytest.raises(TargetError, match="found no layer list"):
        peftdecl.attach(Tiny(), {**SPEC, "layer_replication": [[0, 1]]}, backend="mlx")


def test_numpy_reference_says_why_it_refuses() -> None:
    """The NumPy reference holds a state dict, no layer list: refused, naming the field, the reason, the way out."""
    if "numpy" not in selected_backends():
        pytest.skip("the NumPy backend is not selected")
    from peftdecl_mlx.inventory import numpy_model

    state, layer_types, facts = numpy_model(tiny_llama(num_hidden_layers=3))
    with pytest.raises(TargetError, match=r"\$\.layer_replication: .* no decoder layer list .* torch or mlx"):
        peftdecl.attach(state, SPEC, backend="numpy", layer_types=layer_types, **facts)


def test_mlx_lm_format_refuses_a_replicated_adapter(folder: Path, tmp_path: Path) -> None:
    """mlx-lm cannot copy layers, so its format lists layer_replication among what it cannot express."""
    from peftdecl.errors import AdapterFileError

    ours = peftdecl.attach(load_checkpoint(folder), SPEC, backend="mlx", seed=3)
    with pytest.raises(AdapterFileError, match="layer_replication"):
        ours.save(tmp_path / "x", format="mlx-lm")
    assert not (tmp_path / "x").exists()
