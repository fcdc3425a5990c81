"""Hot-swapping LoRA adapters on MLX under ``mx.compile``: new arrays take the old ones' slots, no retrace.

A compiled function counts its traces with a Python side effect (Python only runs while MLX traces). Expected
outputs come from a fresh MLX load of the swapped-in adapter, and for mlx-lm folders from mlx-lm's own
``load_adapters``. The adapter folders are written by the NumPy reference (HF layout) and by mlx-lm's LoRA layers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import peftdecl
from peftdecl.errors import PeftdeclError
from tests.conftest import selected_backends

if "mlx" not in selected_backends():
    pytest.skip("the mlx backend is not selected", allow_module_level=True)

from tests.mlx_models import mlx_mlp, mx, tiny_llama, tree_flatten

TOL = 1e-5  # float32: the same function, with s₀·(B s/s₀) A in place of s B A and zero-padded ranks


def save_hf(folder: Path, seed: int, r: int = 4, alpha: float = 8, **config: object) -> Path:
    """An HF-layout LoRA adapter for the MLP with random A and B, written by the NumPy reference."""
    state = mlx_mlp()[1]
    spec = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["lin0", "lin1"], **config}
    model = peftdecl.attach(state, spec, backend="numpy")
    rng = np.random.default_rng(seed)
    arrays = {k: rng.normal(size=v.shape) * 0.3 for k, v in model.state_dict().items()}
    model.delete_adapter("default")
    model.add_adapter("default", spec, arrays=arrays, activate=True)
    model.save(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mlx_hotswap")
    return {
        "first": save_hf(root / "first", 1),
        "same": save_hf(root / "same", 2),
        "other": save_hf(root / "other", 3, r=2, alpha=3),
        "big": save_hf(root / "big", 4, r=8, alpha=2),
        "one_layer": save_hf(root / "one_layer", 5, target_modules=["lin1"]),
        "rslora": save_hf(root / "rslora", 6, use_rslora=True),
        "dropout": save_hf(root / "dropout", 7, lora_dropout=0.1),
    }


X = mx.array(np.linspace(-1.0, 1.0, 3 * 12, dtype=np.float32).reshape(3, 12))


def compiled(model: Any) -> tuple[Callable[[mx.array], mx.array], list[int]]:
    """``mx.compile`` of the model's call over its state, and a list counting the traces."""
    traces = [0]

    def run(x: mx.array) -> mx.array:
        traces[0] += 1  # a Python side effect: runs only while MLX traces the function
        out: mx.array = model(x)
        return out

    return mx.compile(run, inputs=model.state, outputs=model.state), traces


def fresh(folder: Path) -> np.ndarray:
    """The adapter in ``folder`` loaded on its own into a fresh MLP: what a swap must give."""
    return np.array(peftdecl.load_adapter(mlx_mlp()[0], folder, backend="mlx")(X))


def tree_slots(model: Any) -> list[tuple[str, tuple[int, ...], Any]]:
    """(key, shape, dtype) of every array of the model's parameter tree, in its flattening order."""
    return [(k, tuple(v.shape), v.dtype) for k, v in tree_flatten(model.parameters())]


def test_swaps_of_other_ranks_and_alphas_do_not_retrace(folders: dict[str, Path]) -> None:
    base = mlx_mlp()[0]
    ours = peftdecl.load_adapter(base, folders["first"], backend="mlx")
    ours.prepare_for_hotswap(target_rank=8)
    layer = ours.engine.layer("lin0")
    tree = tree_slots(base)
    run, traces = compiled(base)
    assert np.abs(np.array(run(X)) - fresh(folders["first"])).max() <= TOL
    for name in ("other", "big", "one_layer", "same"):
        ours.hotswap_adapter(folders[name], "default")
        assert np.abs(np.array(run(X)) - fresh(folders[name])).max() <= TOL, name
    assert traces == [1]  # four swaps, one trace
    assert ours.engine.layer("lin0") is layer and tree_slots(base) == tree  # same modules, same slots


def test_other_adapter_on_the_same_layers_keeps_its_place(folders: dict[str, Path]) -> None:
    """A rebuilt adapter would be re-inserted after "b" and the compiled graph, which binds the flattened state
    by position, would read b's arrays as default's (same shapes after padding: silently wrong)."""
    base = mlx_mlp()[0]
    ours = peftdecl.load_adapter(base, folders["first"], backend="mlx")
    ours.load_adapter(folders["same"], "b")
    ours.prepare_for_hotswap(target_rank=8)
    run, traces = compiled(base)
    run(X)
    ours.hotswap_adapter(folders["other"], "default")
    assert np.abs(np.array(run(X)) - fresh(folders["other"])).max() <= TOL
    ours.set_adapter("b")
    assert np.abs(np.array(base(X)) - fresh(folders["same"])).max() <= TOL  # b untouched
    assert traces == [1]


def test_unprepared_swap_of_same_rank_and_alpha(folders: dict[str, Path]) -> None:
    base = mlx_mlp()[0]
    ours = peftdecl.load_adapter(base, folders["first"], backend="mlx")
    run, traces = compiled(base)
    run(X)
    ours.hotswap_adapter(folders["same"], "default")
    assert np.abs(np.array(run(X)) - fresh(folders["same"])).max() <= TOL
    assert traces == [1]


def test_slots_keep_the_adapter_dtype(folders: dict[str, Path]) -> None:
    base = mlx_mlp()[0]
    ours = peftdecl.load_adapter(base, folders["first"], backend="mlx", adapter_dtype="bfloat16")
    ours.prepare_for_hotswap(target_rank=8)
    tree = tree_slots(base)
    run, traces = compiled(base)
    run(X)
    ours.hotswap_adapter(folders["other"], "default")
    expected = peftdecl.load_adapter(mlx_mlp()[0], folders["other"], backend="mlx", adapter_dtype="bfloat16")
    # bf16 adapter arrays: B·(s/s₀) rounds to bf16 where the fresh load rounds B (relative 2⁻⁸ per factor)
    got, want = np.array(run(X).astype(mx.float32)), np.array(expected(X).astype(mx.float32))
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()
    assert tree_slots(base) == tree and traces == [1]


def sgd_step(model: Any, optimizer: Any) -> Callable[[mx.array], mx.array]:
    """One SGD step on Σ y² through ``nn.value_and_grad`` and the optimizer (not compiled)."""
    import mlx.nn as nn

    grad = nn.value_and_grad(model, lambda m, x: (m(x) ** 2).sum())

    def step(x: mx.array) -> mx.array:
        loss, grads = grad(model, x)
        optimizer.update(model, grads)
        return loss

    return step


def test_compiled_training_step_trains_the_swapped_values(folders: dict[str, Path]) -> None:
    """A training step compiled over the model's and the optimizer's state steps the swapped-in arrays."""
    import mlx.optimizers as optim

    base = mlx_mlp()[0]
    ours = peftdecl.load_adapter(base, folders["first"], backend="mlx", is_trainable=True)
    optimizer = optim.SGD(learning_rate=0.1)
    optimizer.init(base.trainable_parameters())
    traces = [0]
    plain = sgd_step(base, optimizer)

    def counted(x: mx.array) -> mx.array:
        traces[0] += 1
        return plain(x)

    state = [base.state, optimizer.state]
    step = mx.compile(counted, inputs=state, outputs=state)
    step(X)
    ours.hotswap_adapter(folders["same"], "default")
    step(X)
    fresh_base = mlx_mlp()[0]
    expected = peftdecl.load_adapter(fresh_base, folders["same"], backend="mlx", is_trainable=True)
    fresh_optimizer = optim.SGD(learning_rate=0.1)
    fresh_optimizer.init(fresh_base.trainable_parameters())
    sgd_step(fresh_base, fresh_optimizer)(X)
    unstepped = peftdecl.load_adapter(mlx_mlp()[0], folders["same"], backend="mlx").state_dict()
    got, want = ours.state_dict(), expected.state_dict()
    assert all(np.abs(got[k] - want[k]).max() <= TOL for k in want)  # one step from the swapped values
    assert all(np.abs(got[k] - unstepped[k]).max() > 1e-3 for k in want)  # and the step moved every tensor
    assert traces == [1]


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        ("one_layer", "first", "targets layers"),
        ("first", "rslora", "use_rslora"),
        ("first", "dropout", "lora_dropout"),
        ("first", "other", "prepare_for_hotswap"),
    ],
)
def test_refusals_leave_model_and_compiled_function_unchanged(
    folders: dict[str, Path], first: str, second: str, message: str
) -> None:
    base = mlx_mlp()[0]
    ours = peftdecl.load_adapter(base, folders[first], backend="mlx")
    run, traces = compiled(base)
    before, state = np.array(run(X)), ours.state_dict()
    with pytest.raises(PeftdeclError, match=message):
        ours.hotswap_adapter(folders[second], "default")
    assert np.array_equal(np.array(run(X)), before) and traces == [1]
    assert all(np.array_equal(v, ours.state_dict()[k]) for k, v in state.items())


def test_rank_above_prepared_is_refused(folders: dict[str, Path]) -> None:
    ours = peftdecl.load_adapter(mlx_mlp()[0], folders["first"], backend="mlx")
    ours.prepare_for_hotswap(target_rank=4)
    state = ours.state_dict()
    with pytest.raises(PeftdeclError, match="exceeds the prepared rank 4"):
        ours.hotswap_adapter(folders["big"], "default")
    assert all(np.array_equal(v, ours.state_dict()[k]) for k, v in state.items())


# -- mlx-lm adapter folders ----------------------------------------------------------------------------------
KEYS = ["self_attn.q_proj", "self_attn.v_proj"]


def save_mlx_lm(folder: Path, seed: int, rank: int, scale: float) -> Path:
    """An adapter folder as ``mlx_lm.lora`` writes it: mlx-lm's LoRA layers, their trainable arrays (random B)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = tiny_llama()
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": rank, "scale": scale, "dropout": 0.0, "keys": KEYS})
    mx.random.seed(seed)
    arrays = dict(tree_flatten(model.trainable_parameters()))
    arrays = {k: mx.random.normal(v.shape) * 0.2 if k.endswith("lora_b") else v for k, v in arrays.items()}
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "adapters.safetensors"), arrays)
    config = {"fine_tune_type": "lora", "num_layers": 2}
    config["lora_parameters"] = {"rank": rank, "scale": scale, "dropout": 0.0, "keys": KEYS}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_mlx_lm_folders_swap_under_compile(tmp_path: Path) -> None:
    from mlx_lm.tuner.utils import load_adapters

    first = save_mlx_lm(tmp_path / "first", 1, rank=4, scale=2.0)
    second = save_mlx_lm(tmp_path / "second", 2, rank=2, scale=5.0)
    ids = mx.array([[1, 5, 9, 2, 7]])
    base = tiny_llama()
    ours = peftdecl.load_adapter(base, first, backend="mlx")
    ours.prepare_for_hotswap(target_rank=4)
    run, traces = compiled(base)
    expected_first = np.array(load_adapters(tiny_llama(), str(first))(ids))
    assert np.abs(np.array(run(ids)) - expected_first).max() <= TOL
    ours.hotswap_adapter(second, "default")
    expected = np.array(load_adapters(tiny_llama(), str(second))(ids))  # mlx-lm's own loader
    assert np.abs(np.array(run(ids)) - expected).max() <= TOL
    assert np.abs(expected - expected_first).max() > 1e-3  # the swap changed something
    assert traces == [1]


def test_numpy_swap_equals_mlx_and_torch(folders: dict[str, Path]) -> None:
    """The NumPy reference's (rebuilding) swap gives the same function as MLX's in-place one and torch's."""
    if "numpy" not in selected_backends():
        pytest.skip("the NumPy backend is not selected")
    base, state = mlx_mlp()
    reference = peftdecl.load_adapter(state, folders["first"], backend="numpy")
    reference.prepare_for_hotswap(target_rank=8)
    reference.hotswap_adapter(folders["other"], "default")
    ours = peftdecl.load_adapter(base, folders["first"], backend="mlx")
    ours.prepare_for_hotswap(target_rank=8)
    ours.hotswap_adapter(folders["other"], "default")
    x = np.array(X, dtype=np.float64)
    expected = reference("lin1", np.maximum(reference("lin0", x), 0.0))  # the MLP, one layer at a time
    assert np.abs(np.array(ours(X)) - expected).max() <= TOL  # float32 MLX vs float64 reference
    if "torch" not in selected_backends():
        return
    torch = pytest.importorskip("torch")
    from tests.torch_mlp import torch_mlp

    model = torch_mlp(0).eval()
    model.load_state_dict({k: torch.from_numpy(v).float() for k, v in state.items()})
    theirs = peftdecl.load_adapter(model, folders["first"])
    theirs.prepare_for_hotswap(target_rank=8)
    theirs.hotswap_adapter(folders["other"], "default")
    with torch.no_grad():
        got = theirs(torch.from_numpy(x).float()).double().numpy()  # type: ignore[operator]
    assert np.abs(got - expected).max() <= TOL  # float32 torch vs float64 reference
