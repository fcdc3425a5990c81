"""The MLX backend against the common contract: kind ops satisfy the Protocols of peftdecl.backend, trainable
parameters are the flat mapping every backend returns (and train like the model's own tree), the engine's seeded
generator makes dropout reproducible from its saved state, update_spec keeps the live arrays, and quantised base
layers are described in the inventory and refused at attach, naming the layer.

Tolerances: float32 results computed two ways in MLX ≤ 1e-6 relative; against the float64 reference ≤ 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest

import peftdecl
from peftdecl.errors import BackendError, PeftdeclError
from tests.assertions import assert_kind_ops_protocols, layer_kinds
from tests.conftest import rel_err
from tests.mlx_models import Tiny, mx, nn, tree_flatten, twin

LORA = {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "init_lora_weights": False}


def _kinds() -> list[str]:
    from peftdecl_mlx import MlxBackend

    return layer_kinds(MlxBackend.capabilities.kinds)


@pytest.mark.parametrize("kind", _kinds())
def test_every_kind_ops_satisfies_the_protocols(kind: str) -> None:
    from peftdecl_mlx.kinds import ops_for

    ops = ops_for(kind)
    assert_kind_ops_protocols(ops)


def _dropout_model(seed: int | None = None) -> peftdecl.AdaptedModel:
    options = {} if seed is None else {"seed": seed}
    spec = {**LORA, "lora_dropout": 0.5, "target_modules": ["q_proj", "down_proj"]}
    return peftdecl.attach(Tiny(), spec, seed=1, engine_options=options).train()


IDS = mx.array([[1, 5, 9, 2], [3, 3, 8, 0]])


def test_saved_generator_state_gives_the_same_dropout_masks() -> None:
    model = _dropout_model()
    state = model.get_rng_state()
    assert set(state) == {"key"} and state["key"].dtype == np.uint32
    first, second = np.array(model(IDS)), np.array(model(IDS))
    assert rel_err(first, second) > 1e-3  # each call draws new masks
    model.set_rng_state(state)
    assert np.array_equal(np.array(model(IDS)), first)
    assert np.array_equal(np.array(model(IDS)), second)
    # the engine option seeds the generator: the same seed, the same masks; another seed, others
    assert np.array_equal(np.array(_dropout_model(seed=7)(IDS)), np.array(_dropout_model(seed=7)(IDS)))
    assert rel_err(np.array(_dropout_model(seed=7)(IDS)), np.array(_dropout_model(seed=8)(IDS))) > 1e-3
    with pytest.raises(PeftdeclError, match="'key'"):
        model.set_rng_state({"key": np.zeros(3, np.uint32)})


def test_the_key_is_no_parameter_and_leaves_with_unload() -> None:
    from peftdecl_mlx.generator import KEY

    base = Tiny()
    before = {k for k, _ in tree_flatten(base.parameters())}
    model = _dropout_model()
    assert KEY in model.engine.model and all(
        KEY not in k for k, _ in tree_flatten(model.engine.model.parameters())
    )
    model = peftdecl.attach(base, {**LORA, "target_modules": ["q_proj"]})
    assert {k for k, _ in tree_flatten(model.merge_and_unload().parameters())} == before
    assert KEY not in base


SPEC_B = {**LORA, "target_modules": ["down_proj"], "modules_to_save": ["lm_head"]}


def _two_adapters(model: peftdecl.AdaptedModel) -> peftdecl.AdaptedModel:
    model.add_adapter("b", SPEC_B, seed=2)
    model.set_adapter(["a", "b"])
    return model


def test_flat_parameters_have_the_reference_keys() -> None:
    """Two adapters: keys "<adapter>/<IR key>", modules_to_save copies included, as the NumPy reference's."""
    ours, ref = twin(Tiny(), {**LORA, "target_modules": ["q_proj"]}, name="a")
    keys = set(_two_adapters(ours).trainable_parameters())
    assert keys == set(_two_adapters(ref).trainable_parameters())
    assert {"a/q_proj.lora_A.weight", "b/lm_head.weight"} <= keys


def test_flat_parameters_train_like_the_model_tree() -> None:
    """One SGD step on the flat mapping (mx.grad + optimizer.apply_gradients + update_parameters) equals one on the
    model's tree (nn.value_and_grad + optimizer.update), two adapters and a modules_to_save copy active."""
    import mlx.optimizers as optim

    flat, tree = (
        _two_adapters(peftdecl.attach(Tiny(), {**LORA, "target_modules": ["q_proj"]}, name="a", seed=1))
        for _ in range(2)
    )

    def loss(model: peftdecl.AdaptedModel) -> mx.array:
        return mx.mean(mx.square(model(IDS)))

    def flat_loss(params: dict) -> mx.array:
        flat.update_parameters(params)
        return loss(flat)

    params = flat.trainable_parameters()
    grads = mx.grad(flat_loss)(params)
    flat.update_parameters(optim.SGD(learning_rate=0.1).apply_gradients(grads, params))
    _, tree_grads = nn.value_and_grad(tree.engine.model, lambda: loss(tree))()
    optim.SGD(learning_rate=0.1).update(tree.engine.model, tree_grads)
    after_flat, after_tree = flat.trainable_parameters(), tree.trainable_parameters()
    assert set(after_flat) == set(after_tree) == set(params)
    for key, value in after_flat.items():
        assert rel_err(np.array(value), np.array(after_tree[key])) <= 1e-6, key
        assert rel_err(np.array(value), np.array(params[key])) > 0.0, key  # every tensor moved
    with pytest.raises(PeftdeclError, match="unknown keys"):
        flat.update_parameters({"q_proj.lora_A.weight": params["a/q_proj.lora_A.weight"]})


def test_update_spec_keeps_the_live_arrays() -> None:
    """update_spec (lora_alpha 6 -> 12): the same array objects stay in the model, and the output is that of a
    fresh model attached with the new spec and the same numbers."""
    ours = peftdecl.attach(Tiny(), {**LORA, "target_modules": ["q_proj"]}, seed=1).eval()
    before = ours.trainable_parameters()
    tree_before = dict(tree_flatten(ours.engine.model.trainable_parameters()))
    ours.update_spec(lora_alpha=12)
    after = ours.trainable_parameters()
    assert set(after) == set(before) and all(after[k] is v for k, v in before.items())
    assert all(v is tree_before[k] for k, v in tree_flatten(ours.engine.model.trainable_parameters()))
    spec = {**LORA, "lora_alpha": 12, "target_modules": ["q_proj"]}
    fresh = peftdecl.attach(Tiny(), spec)
    fresh.delete_adapter("default")
    fresh.add_adapter("default", spec, arrays=ours.state_dict(), activate=True)
    assert rel_err(np.array(ours(IDS)), np.array(fresh.eval()(IDS))) <= 1e-6
    old = peftdecl.attach(Tiny(), {**LORA, "target_modules": ["q_proj"]}, seed=1).eval()
    assert rel_err(np.array(ours(IDS)), np.array(old(IDS))) > 1e-3  # the new scaling took effect


class Quantised(nn.Module):
    """embed 16×64 and q_proj 64→64 quantised (group size 32, 4 bits); down_proj 64→32 left as it is."""

    def __init__(self) -> None:
        super().__init__()
        mx.random.seed(0)
        self.embed_tokens = nn.QuantizedEmbedding(16, 64, group_size=32, bits=4)
        self.q_proj = nn.QuantizedLinear(64, 64, bias=True, group_size=32, bits=4)
        self.down_proj = nn.Linear(64, 32)

    def __call__(self, ids: mx.array) -> mx.array:
        return self.down_proj(self.q_proj(self.embed_tokens(ids)))


def test_quantised_layers_are_described_and_adapted() -> None:
    from peftdecl_mlx import MlxBackend

    info = MlxBackend().inventory(Quantised())
    q, emb, down = info.layers["q_proj"], info.layers["embed_tokens"], info.layers["down_proj"]
    assert (q.type, q.in_features, q.out_features, q.bias) == ("linear", 64, 64, True)
    assert (emb.type, emb.in_features, emb.out_features) == ("embedding", 16, 64)
    assert q.quantization == emb.quantization == "mlx_affine" and down.quantization is None
    assert q.dtype == down.dtype == "float32"
    model = peftdecl.attach(Quantised(), {**LORA, "target_modules": ["q_proj", "embed_tokens"]})
    assert set(model.plan().targets) == {"q_proj", "embed_tokens"}
    base = model.engine.layer("q_proj").base_layer
    assert isinstance(base, nn.QuantizedLinear)  # adapted in place, never replaced by a float copy
    expected = mx.dequantize(base.weight, base.scales, base.biases, group_size=32, bits=4)
    assert np.array_equal(model.engine.base_weight("q_proj"), np.array(expected, dtype=np.float64))
    # MLX's floating-point modes have no QuantScheme: refused at attach, naming the layer and the mode
    mxfp4 = Quantised()
    mxfp4.q_proj = nn.QuantizedLinear(64, 64, bias=True, group_size=32, bits=4, mode="mxfp4")
    with pytest.raises(BackendError, match=r"^q_proj: the base layer is quantised \(mlx_mxfp4\)"):
        peftdecl.attach(mxfp4, {**LORA, "target_modules": ["q_proj"]})


def test_inventory_reads_the_base_dtype() -> None:
    from peftdecl_mlx import MlxBackend

    base = Tiny()
    base.set_dtype(mx.bfloat16)
    assert {li.dtype for li in MlxBackend().inventory(base).layers.values()} == {"bfloat16"}


def test_rank_allocator_runs_on_the_mlx_arrays_like_the_reference() -> None:
    """AdaLoRA's allocator on the live mx arrays, the NumPy reference's on float64 copies of the same numbers,
    both fed the same gradients: the same budgets and masks each step, and the model's own lora_E is masked."""
    from peftdecl_mlx.rank_allocator import MlxRankAllocator
    from peftdecl_numpy.rank_allocator import RankAllocator

    # masks at steps 4 and 6 (every deltaT after tinit), then the final one at 7 re-applied at 8, 9 and 10
    spec = {"peft_type": "ADALORA", "init_r": 4, "target_r": 2, "target_modules": ["q_proj", "down_proj"],
            "total_step": 10, "tinit": 2, "tfinal": 3, "deltaT": 2}  # fmt: skip
    ours, ref = twin(Tiny(), spec)
    allocators = MlxRankAllocator(ours.plan()), RankAllocator(ref.plan())
    rng = np.random.default_rng(0)
    masks = 0
    for step in range(1, 11):
        params, ref_params = ours.trainable_parameters(), ref.trainable_parameters()
        grads = {k: rng.normal(size=v.shape) for k, v in ref_params.items()}
        got = allocators[0].update_and_allocate(
            step, params, {k: mx.array(g, mx.float32) for k, g in grads.items()}
        )
        assert got == allocators[1].update_and_allocate(step, ref_params, grads), step
        masks += got[1] is not None
        for key, value in ours.trainable_parameters().items():
            assert rel_err(np.array(value), ref_params[key]) <= 1e-6, (step, key)
    assert masks == 6 and sum(map(sum, allocators[0].rank_pattern.values())) == 4
