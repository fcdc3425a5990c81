"""Adapters over MLX's quantised layers (``nn.QuantizedLinear`` / ``QuantizedEmbedding``, affine mode) on a tiny
mlx-lm Llama (hidden 64, 2 layers) quantised by ``nn.quantize`` as ``mlx_lm.convert -q`` does.

Expected numbers come from independent code: mlx-lm's ``LoRALinear`` / ``DoRALinear`` over the same quantised layers
(outputs, gradients, ``fuse()``), ``mx.quantize`` / ``mlx_lm.utils.dequantize_model``, the same adapters over the
float model holding the dequantised weights, the float64 NumPy reference on those weights, and ``mlx_lm.load``.

Tolerances (float32): ≤ 1e-5 relative wherever the same math runs two ways (mlx-lm's DoRA multiplies by the
dequantised weight where ours runs ``mx.quantized_matmul``: the same numbers summed in another order, ~1e-7).
Re-quantised merges are compared code for code, scales and biases bit for bit (both sides round W + (s·B) A and
m / n in the same order); dequantised merges against mlx-lm's ``fuse(dequantize=True)`` bit for bit too.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import rel_err, selected_backends

mx = pytest.importorskip("mlx.core")
if "mlx" not in selected_backends():
    pytest.skip("PEFTDECL_TEST_BACKENDS excludes mlx", allow_module_level=True)

import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import peftdecl  # noqa: E402
from peftdecl.errors import BackendError  # noqa: E402
from peftdecl.quant.requantize import RequantizationWarning  # noqa: E402
from tests.mlx_models import assert_vjp_like_reference, tiny_llama  # noqa: E402

TOL = 1e-5
IDS = mx.array([[3, 17, 42, 9, 60, 5], [33, 1, 8, 12, 23, 23]])
SCHEMES = [(4, 64), (8, 32)]
TARGETS = ["q_proj", "v_proj"]
LAYERS = [f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in TARGETS]


def quantized_llama(bits: int = 4, group_size: int = 64, **kwargs: object) -> nn.Module:
    """The tiny Llama with every linear and embedding layer quantised (deterministic: the same model each call)."""
    model = tiny_llama(seed=0, hidden_size=64, intermediate_size=128)
    nn.quantize(model, group_size=group_size, bits=bits, **kwargs)
    mx.eval(model.parameters())
    return model


def dequantized(model: nn.Module) -> nn.Module:
    """A float copy of ``model`` holding its dequantised weights (mlx-lm's own dequantize_model)."""
    from mlx_lm.utils import dequantize_model

    return dequantize_model(copy.deepcopy(model))


def logits(model: object) -> np.ndarray:
    out = model(IDS)  # type: ignore[operator]
    mx.eval(out)
    return np.array(out)


def module(model: nn.Module, name: str) -> nn.Module:
    node = model
    for part in name.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def loss_and_grads(model: nn.Module) -> tuple[float, dict[str, np.ndarray]]:
    """Σ logits ⊙ a fixed random cotangent, and the gradients of the model's trainable arrays."""
    cotangent = mx.array(np.random.default_rng(3).normal(size=(2, 6, 64)).astype(np.float32))
    loss, grads = nn.value_and_grad(model, lambda: mx.sum(model(IDS) * cotangent))()
    mx.eval(loss, grads)
    return float(loss), {k: np.array(v) for k, v in tree_flatten(grads)}


def lora_spec(kind: str) -> dict[str, object]:
    # alpha / r = 1.5: not a power of two, so the scaling's rounding shows where the two sides order it differently
    return {"peft_type": "LORA", "r": 4, "lora_alpha": 6, "init_lora_weights": False, "target_modules": TARGETS,
            "use_dora": kind == "dora"}  # fmt: skip


def fused_tree(model: nn.Module, dequantize: bool = False) -> dict[str, object]:
    """mlx-lm's fuse step (``mlx_lm.fuse``): every adapter wrapper replaced by its fused layer."""
    from mlx.utils import tree_unflatten

    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    return tree_unflatten(fused)


def ours_and_mlx_lm(
    kind: str, bits: int = 4, group_size: int = 64, load: Callable[[], nn.Module] | None = None
) -> tuple[peftdecl.AdaptedModel, nn.Module]:
    """Our adapter and mlx-lm's LoRALinear / DoRALinear over the same quantised layers, holding the same numbers;
    ``load`` makes the quantised model (default: :func:`quantized_llama` with ``bits`` and ``group_size``)."""
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear

    load = load or (lambda: quantized_llama(bits, group_size))
    ours = peftdecl.attach(load(), lora_spec(kind), seed=2)
    state = ours.state_dict()
    theirs = load()
    theirs.freeze()
    scale = ours.plan().layers[0].scaling
    for name in LAYERS:
        parent, _, leaf = name.rpartition(".")
        wrapper = (DoRALinear if kind == "dora" else LoRALinear).from_base(
            module(theirs, name), r=4, scale=scale
        )
        wrapper.lora_a = mx.array(state[f"{name}.lora_A.weight"].T)
        wrapper.lora_b = mx.array(state[f"{name}.lora_B.weight"].T)
        if kind == "dora":
            wrapper.m = mx.array(state[f"{name}.lora_magnitude_vector"])
        module(theirs, parent)[leaf] = wrapper
    return ours, theirs


@pytest.mark.parametrize(("bits", "group_size"), SCHEMES)
@pytest.mark.parametrize("kind", ["lora", "dora", "dora_factored_norm"])
def test_lora_and_dora_equal_mlx_lm_over_quantized_linear(
    kind: str, bits: int, group_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if (
        kind == "dora_factored_norm"
    ):  # the norm large layers take: ‖W‖² cached, W Aᵀ from the quantised product
        from peftdecl_mlx.kinds import dora

        monkeypatch.setattr(dora, "FORM_LIMIT", 0)
        kind = "dora"
    ours, theirs = ours_and_mlx_lm(kind, bits, group_size)
    assert isinstance(ours.engine.layer(LAYERS[0]).base_layer, nn.QuantizedLinear)
    assert rel_err(logits(ours), logits(theirs)) <= TOL
    loss, grads = loss_and_grads(ours.engine.model)
    their_loss, their_grads = loss_and_grads(theirs)
    assert loss == pytest.approx(their_loss, rel=TOL)
    names = {"lora_A.weight": "lora_a", "lora_B.weight": "lora_b", "lora_magnitude_vector": "m"}
    assert len(grads) == len(their_grads) == len(LAYERS) * (3 if kind == "dora" else 2)
    for key, grad in grads.items():
        layer, _, tensor = key.partition(".adapters.default.")
        theirs_grad = their_grads[f"{layer}.{names[tensor]}"]
        assert rel_err(grad, theirs_grad if tensor == "lora_magnitude_vector" else theirs_grad.T) <= TOL, key


@pytest.mark.parametrize(("bits", "group_size"), SCHEMES)
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merge_requantizes_as_mlx_lm_fuse(kind: str, bits: int, group_size: int) -> None:
    ours, theirs = ours_and_mlx_lm(kind, bits, group_size)
    with pytest.warns(RequantizationWarning) as record:
        merged = ours.merge_and_unload()
    assert sorted({str(w.message).split(":")[0] for w in record}) == sorted(LAYERS)
    for name in LAYERS:
        fused, mine = module(theirs, name).fuse(), module(merged, name)
        assert isinstance(mine, nn.QuantizedLinear)
        assert (mine.group_size, mine.bits) == (fused.group_size, fused.bits) == (group_size, bits)
        for key in ("weight", "scales", "biases"):  # exact: the same rounding order (module docstring)
            assert np.array_equal(np.array(mine[key]), np.array(fused[key])), (name, key)
    assert rel_err(logits(merged), logits(theirs.update_modules(fused_tree(theirs)))) <= TOL


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_dequantized_unload_equals_mlx_lm_fuse_dequantize(kind: str) -> None:
    from mlx_lm.utils import dequantize_model

    ours, theirs = ours_and_mlx_lm(kind, 4, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizationWarning)
        merged = ours.merge_and_unload(dequantize=True)
    for name in LAYERS:
        fused, mine = module(theirs, name).fuse(dequantize=True), module(merged, name)
        assert type(mine) is nn.Linear
        assert np.array_equal(np.array(mine.weight), np.array(fused.weight)), name
        module(theirs, name.rpartition(".")[0])[name.rpartition(".")[2]] = fused
    # every quantised layer became a float one, adapted or not (the embedding and lm_head included)
    assert not [
        n for n, m in merged.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    ]
    assert rel_err(logits(merged), logits(dequantize_model(theirs))) <= TOL


def test_unmerge_restores_the_codes_exactly() -> None:
    ours = peftdecl.attach(quantized_llama(), lora_spec("dora"), seed=2)
    before = {
        k: np.array(v) for k, v in tree_flatten(module(ours.engine.model, LAYERS[0]).base_layer.parameters())
    }
    y = logits(ours)
    with pytest.warns(RequantizationWarning):
        ours.merge_adapter()
    assert (
        rel_err(logits(ours), y) <= 0.2
    )  # re-quantised: 4-bit rounding of W′ (it is not the unmerged model)
    ours.unmerge_adapter()
    after = dict(tree_flatten(module(ours.engine.model, LAYERS[0]).base_layer.parameters()))
    assert set(after) == set(before) and all(np.array_equal(np.array(after[k]), before[k]) for k in before)
    assert rel_err(logits(ours), y) <= TOL


SPECS = {
    "lora_embedding": {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "init_lora_weights": False,
                       "target_modules": ["embed_tokens", "q_proj"]},
    "dora_embedding": {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True, "init_lora_weights": False,
                       "target_modules": ["embed_tokens", "q_proj"]},
    "adalora": {"peft_type": "ADALORA", "init_r": 4, "target_r": 2, "total_step": 10, "init_lora_weights": False,
                "target_modules": ["q_proj", "down_proj"]},
    "ia3": {"peft_type": "IA3", "target_modules": ["q_proj", "down_proj"], "feedforward_modules": ["down_proj"],
            "init_ia3_weights": False},
    "vera": {"peft_type": "VERA", "r": 4, "target_modules": ["q_proj", "v_proj"], "init_weights": False},
    "loha": {"peft_type": "LOHA", "r": 4, "alpha": 4, "init_weights": False, "target_modules": ["q_proj"]},
    "lokr": {"peft_type": "LOKR", "r": 4, "alpha": 4, "init_weights": False, "target_modules": ["q_proj"]},
    "oft": {"peft_type": "OFT", "r": 0, "oft_block_size": 8, "init_weights": False,
            "target_modules": ["embed_tokens", "q_proj"]},
    "boft": {"peft_type": "BOFT", "boft_block_size": 8, "init_weights": False, "target_modules": ["q_proj"]},
}  # fmt: skip


def twins(
    spec: dict[str, object],
) -> tuple[peftdecl.AdaptedModel, peftdecl.AdaptedModel, peftdecl.AdaptedModel]:
    """(ours over the quantised model, ours over its dequantised float copy, the NumPy reference on those weights),
    holding the same adapter numbers: the reference's seeded initialisation, trainable tensors perturbed."""
    from peftdecl.equiv import perturbed
    from peftdecl_mlx.inventory import numpy_model

    quant = quantized_llama(4, 32)
    dense = dequantized(quant)
    state, layer_types, facts = numpy_model(dense)
    ref = peftdecl.attach(state, spec, seed=1, layer_types=layer_types, **facts)
    trainable = {k for k, p in ref.plan().param_specs().items() if p.role == "trainable"}
    arrays = perturbed(ref.state_dict(), trainable, 0.1, 1)
    ref.delete_adapter("default")
    ref.add_adapter("default", spec, arrays=arrays, activate=True)
    sides = []
    for model in (quant, dense):
        side = peftdecl.attach(model, spec, seed=1)
        side.delete_adapter("default")
        side.add_adapter("default", spec, arrays=arrays, activate=True)
        sides.append(side)
    return sides[0], sides[1], ref


@pytest.mark.parametrize("case", sorted(SPECS))
def test_every_kind_over_quantized_layers_equals_the_dequantized_float_model(case: str) -> None:
    ours, dense, ref = twins(SPECS[case])
    adapted = list(ours.engine.layers)
    assert all(ours.engine.layer(n).quantized for n in adapted)
    assert rel_err(logits(ours), logits(dense)) <= TOL
    grads, dense_grads = loss_and_grads(ours.engine.model)[1], loss_and_grads(dense.engine.model)[1]
    assert grads.keys() == dense_grads.keys() and grads
    for key in grads:
        assert rel_err(grads[key], dense_grads[key]) <= TOL, key
    # one layer against the float64 reference on the dequantised weight: output, input and adapter gradients
    for lp in ref.plan().layers[:2]:
        linear = lp.layer.type == "linear"
        x = (
            np.random.default_rng(0).normal(size=(2, 3, lp.layer.in_features))
            if linear
            else np.array([[3, 9, 60]])
        )
        assert_vjp_like_reference(ours, ref, lp.module, x, TOL)
    # merging re-quantises what the float model's merge gives, code for code (the same W + ΔW, then mx.quantize)
    with pytest.warns(RequantizationWarning):
        merged = ours.merge_and_unload()
    dense_merged = dense.merge_and_unload()
    for name in adapted:
        mine, float_layer = module(merged, name), module(dense_merged, name)
        requantized = mx.quantize(float_layer.weight, group_size=mine.group_size, bits=mine.bits)
        for got, expected in zip((mine.weight, mine.scales, mine.biases), requantized, strict=True):
            assert np.array_equal(np.array(got), np.array(expected)), name


def test_parameter_counts_count_a_quantized_weight_once() -> None:
    """As PEFT counts a 4-bit weight: its elements, not its packed words, scales or biases."""
    quant = quantized_llama(4, 32)
    ours = peftdecl.attach(quant, lora_spec("lora"), seed=2)
    dense = peftdecl.attach(dequantized(quantized_llama(4, 32)), lora_spec("lora"), seed=2)
    assert ours.get_nb_trainable_parameters() == dense.get_nb_trainable_parameters()
    # r (in + out) for q_proj (64 -> 64) and v_proj (64 -> 32) in each of the 2 blocks
    assert ours.get_nb_trainable_parameters()[0] == 2 * 4 * ((64 + 64) + (64 + 32))


def test_a_floating_point_quantisation_mode_is_refused_naming_the_layer() -> None:
    model = quantized_llama(4, 32, mode="mxfp4")
    with pytest.raises(BackendError, match=r"model\.layers\.0\.self_attn\.q_proj.*mlx_mxfp4"):
        peftdecl.attach(model, lora_spec("lora"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a float tiny Llama folder, the same converted by ``mlx_lm.convert -q`` with 4 bits, groups of 64)."""
    from mlx_lm import convert

    from peftdecl.train.tiny_model import build_tiny_llama

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("folders")
    plain = build_tiny_llama(root / "plain", hidden=64, layers=2)
    convert(str(plain), str(root / "q4"), quantize=True, q_group_size=64, q_bits=4)
    return plain, root / "q4"


@pytest.mark.parametrize("source", ["quantized_folder", "quantized_in_memory"])
@pytest.mark.parametrize("dequantize", [False, True], ids=["requantized", "dequantized"])
def test_merged_folder_loads_in_mlx_lm_as_its_fuse_writes_it(folders, source, dequantize, tmp_path) -> None:
    import mlx_lm
    from mlx_lm.utils import dequantize_model

    from peftdecl_mlx.model_io import save_merged

    plain, q4 = folders
    folder = q4 if source == "quantized_folder" else plain

    def load() -> nn.Module:
        model = mlx_lm.load(str(folder))[0]
        if source == "quantized_in_memory":
            nn.quantize(model, group_size=64, bits=4)
        return model

    ours, theirs = ours_and_mlx_lm("dora", load=load)
    theirs.update_modules(fused_tree(theirs, dequantize))
    if dequantize:  # mlx_lm.fuse --dequantize: the fused layers, then every other quantised layer
        theirs = dequantize_model(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizationWarning)
        save_merged(ours, None, folder, tmp_path / "out", None, dequantize=dequantize)  # type: ignore[arg-type]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    back = mlx_lm.load(str(tmp_path / "out"))[0]
    q_proj = back.model.layers[0].self_attn.q_proj
    if dequantize:
        assert "quantization" not in config and "quantization_config" not in config
        assert type(q_proj) is nn.Linear
    else:  # mlx_lm.fuse's default: the quantised layers stay quantised, config.json says how
        assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
        assert isinstance(q_proj, nn.QuantizedLinear) and (q_proj.bits, q_proj.group_size) == (4, 64)
    assert rel_err(logits(back), logits(theirs)) <= TOL


@pytest.mark.parametrize(("bits", "group_size"), SCHEMES)
def test_a_saved_head_base_weight_keeps_the_quantised_codes(
    bits: int, group_size: int, tmp_path: Path
) -> None:
    """PEFT's files carry a targeted ``lm_head``'s base weight (here dequantised); loading it back over the same
    quantised model keeps the layer's codes (re-quantising them would move them) and gives the saved model's
    logits (≤ 1e-5: the same arrays). 8 bits in groups of 32 is a scheme whose re-quantisation moves them."""
    spec = {**lora_spec("lora"), "target_modules": ["q_proj", "lm_head"]}
    trained = peftdecl.attach(quantized_llama(bits, group_size), spec)
    trained.save_pretrained(tmp_path / "adapter")
    from safetensors.numpy import load_file

    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lm_head.base_layer.weight") for k in saved), sorted(saved)
    fresh = quantized_llama(bits, group_size)
    before = {k: np.array(getattr(fresh.lm_head, k)) for k in ("weight", "scales", "biases")}
    loaded = peftdecl.load_adapter(fresh, tmp_path / "adapter")
    head = module(loaded.base_model, "lm_head")
    head = getattr(head, "base_layer", head)
    for key, value in before.items():
        assert np.array_equal(np.array(getattr(head, key)), value), key
    assert rel_err(logits(loaded), logits(trained)) <= TOL


def quantized_bf16_llama() -> nn.Module:
    """The tiny Llama cast to bfloat16 before quantising, as ``mlx_lm.convert --dtype bfloat16 -q`` makes it."""
    model = tiny_llama(seed=0, hidden_size=64, intermediate_size=128)
    model.set_dtype(mx.bfloat16)
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_lora_and_dora_equal_mlx_lm_over_a_bfloat16_quantized_model(kind: str) -> None:
    """bfloat16 scales and activations. LoRA runs mlx-lm's products in mlx-lm's order: equal logits (≤ 1e-6).
    DoRA forms its norm in another order, and bfloat16 rounding moves the whole model's logits by ~2e-2 from the
    same model in float32 on both sides: ours must be no further from that float32 model than mlx-lm's (×1.1,
    measured 0.0194 vs 0.0199) and within 3e-2 of mlx-lm's (measured 0.0204)."""
    ours, theirs = ours_and_mlx_lm(kind, load=quantized_bf16_llama)
    assert module(ours.engine.model, LAYERS[0]).base_layer.scales.dtype == mx.bfloat16
    got = np.array(ours(IDS).astype(mx.float32))
    expected = np.array(theirs(IDS).astype(mx.float32))
    if kind == "lora":
        assert rel_err(got, expected) <= 1e-6
        return
    theirs.set_dtype(mx.float32)  # the same layers and adapter in float32: what both sides round
    in_float32 = np.array(theirs(IDS))
    assert rel_err(got, in_float32) <= 1.1 * rel_err(expected, in_float32)
    assert rel_err(got, expected) <= 3e-2


def test_lora_on_a_quantized_embedding_equals_mlx_lm_lora_embedding() -> None:
    """LoRA on ``model.embed_tokens`` stored as ``QuantizedEmbedding``: logits equal mlx-lm's ``LoRAEmbedding``
    over the same layer with the same numbers (PEFT's A [r, rows] and B [dims, r] are mlx-lm's lora_a and lora_b
    transposed; ≤ 1e-5)."""
    from mlx_lm.tuner.lora import LoRAEmbedding

    spec = {"peft_type": "LORA", "r": 4, "lora_alpha": 6, "init_lora_weights": False,
            "target_modules": ["embed_tokens"]}  # fmt: skip
    ours = peftdecl.attach(quantized_llama(), spec, seed=2)
    state = ours.state_dict()
    name = "model.embed_tokens"
    assert isinstance(ours.engine.layer(name).base_layer, nn.QuantizedEmbedding)
    theirs = quantized_llama()
    wrapper = LoRAEmbedding.from_base(module(theirs, name), r=4, scale=ours.plan().layers[0].scaling)
    wrapper.lora_a = mx.array(state[f"{name}.lora_embedding_A"].T)
    wrapper.lora_b = mx.array(state[f"{name}.lora_embedding_B"].T)
    theirs.model.embed_tokens = wrapper
    assert rel_err(logits(ours), logits(theirs)) <= TOL
