"""Hot-swapping LoRA adapters in place on torch against HF PEFT 0.21's ``utils/hotswap.py``.

Expected outputs come from independent loads: a fresh ``load_adapter`` of the second adapter in peftdecl, and PEFT's
own ``hotswap_adapter`` (and fresh load) on the same saved folders. Recompilation is counted by a custom
``torch.compile`` backend that records each graph dynamo hands it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import peftdecl
from peftdecl.errors import PeftdeclError
from tests.conftest import selected_backends

torch = pytest.importorskip("torch")

from tests.torch_mlp import Mlp, torch_mlp  # noqa: E402

peft = pytest.importorskip("peft")
from peft.utils.hotswap import hotswap_adapter as peft_hotswap  # noqa: E402
from peft.utils.hotswap import prepare_model_for_compiled_hotswap  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "torch" not in selected_backends():
    pytest.skip("the torch backend is not selected", allow_module_level=True)

TOL = 1e-6  # float32 outputs of the same function, computed in a different order (s folded into B)


def base(seed: int = 0) -> Mlp:
    return torch_mlp(seed).eval()


def save_peft(folder: Path, seed: int, **config: object) -> Path:
    """A PEFT LoRA adapter with random A and B (init_lora_weights=False) saved to ``folder``."""
    options = {"r": 4, "lora_alpha": 8, "target_modules": ["lin0", "lin1"], **config}
    model = base()
    torch.manual_seed(seed)  # after base(), which seeds 0 for the base weights
    model = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **options))  # type: ignore[arg-type]
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hotswap")
    return {
        "first": save_peft(root / "first", 1),
        "same": save_peft(root / "same", 2),
        "other": save_peft(root / "other", 3, r=2, lora_alpha=3),
        "one_layer": save_peft(root / "one_layer", 4, target_modules=["lin1"]),
        "rslora": save_peft(root / "rslora", 5, use_rslora=True),
        "dropout": save_peft(root / "dropout", 6, lora_dropout=0.1),
        "big": save_peft(root / "big", 7, r=8),
        "alpha": save_peft(root / "alpha", 8, lora_alpha=16),
        "pattern": save_peft(root / "pattern", 9, alpha_pattern={"lin1": 2}),
    }


X = torch.linspace(-1.0, 1.0, 5 * 12).reshape(5, 12)


def outputs(model: object) -> np.ndarray:
    with torch.no_grad():
        return model(X).detach().double().numpy()  # type: ignore[operator]


def fresh(folder: Path) -> np.ndarray:
    """The second adapter loaded on its own (the expected result of a swap)."""
    return outputs(peftdecl.load_adapter(base(), folder))


def peft_fresh(folder: Path) -> np.ndarray:
    return outputs(peft.PeftModel.from_pretrained(base(), folder))


def test_swap_equals_fresh_load_and_peft(folders: dict[str, Path]) -> None:
    ours = peftdecl.load_adapter(base(), folders["first"])
    params = {id(p) for p in ours.base_model.parameters()}
    ours.hotswap_adapter(folders["same"], "default")
    assert {id(p) for p in ours.base_model.parameters()} == params  # same parameter objects
    theirs = peft.PeftModel.from_pretrained(base(), folders["first"])
    peft_hotswap(theirs, folders["same"], adapter_name="default")
    assert np.abs(outputs(ours) - fresh(folders["same"])).max() <= TOL
    assert np.abs(outputs(ours) - outputs(theirs)).max() <= TOL
    assert np.abs(outputs(ours) - peft_fresh(folders["first"])).max() > 1e-3  # the swap changed something


def test_prepared_swap_of_other_rank_and_alpha(folders: dict[str, Path], tmp_path: Path) -> None:
    ours = peftdecl.load_adapter(base(), folders["first"])
    before = outputs(ours)
    ours.prepare_for_hotswap(target_rank=8)
    assert np.abs(outputs(ours) - before).max() <= TOL  # zero padding leaves ΔW unchanged
    ours.hotswap_adapter(folders["other"], "default")
    theirs = peft.PeftModel.from_pretrained(base(), folders["first"])
    prepare_model_for_compiled_hotswap(theirs, target_rank=8)
    peft_hotswap(theirs, folders["other"], adapter_name="default")
    assert np.abs(outputs(ours) - fresh(folders["other"])).max() <= TOL
    assert np.abs(outputs(ours) - outputs(theirs)).max() <= TOL
    ours.hotswap_adapter(folders["big"], "default")  # rank 8 fits the prepared rank exactly
    assert np.abs(outputs(ours) - fresh(folders["big"])).max() <= TOL
    ours.save(tmp_path / "saved")  # the prepared spec with the swapped values: PEFT loads the same function
    assert np.abs(peft_fresh(tmp_path / "saved") - fresh(folders["big"])).max() <= TOL


def test_prepare_keeps_per_layer_alphas(folders: dict[str, Path], tmp_path: Path) -> None:
    """alpha_pattern gives lin1 its own scaling; padding keeps both, and PEFT reads the prepared adapter back."""
    ours = peftdecl.load_adapter(base(), folders["pattern"])
    before = outputs(ours)
    ours.prepare_for_hotswap(target_rank=6)
    assert np.abs(outputs(ours) - before).max() <= TOL
    ours.save(tmp_path / "prepared")
    assert np.abs(peft_fresh(tmp_path / "prepared") - peft_fresh(folders["pattern"])).max() <= TOL
    with pytest.raises(PeftdeclError, match="alpha_pattern"):  # checked against the spec before padding
        ours.hotswap_adapter(folders["same"], "default")


def test_missing_layer_is_zeroed_as_in_peft(folders: dict[str, Path]) -> None:
    ours = peftdecl.load_adapter(base(), folders["first"])
    ours.hotswap_adapter(folders["one_layer"], "default")
    theirs = peft.PeftModel.from_pretrained(base(), folders["first"])
    peft_hotswap(theirs, folders["one_layer"], adapter_name="default")
    assert np.abs(outputs(ours) - fresh(folders["one_layer"])).max() <= TOL
    assert np.abs(outputs(ours) - outputs(theirs)).max() <= TOL


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        ("first", "other", "prepare_for_hotswap"),  # rank / alpha differ, not prepared
        ("first", "alpha", "rank/scaling 4/4 differ from the attached 4/2"),  # alpha only, not prepared
        ("one_layer", "first", "targets layers"),
        ("first", "rslora", "use_rslora"),
        ("first", "dropout", "lora_dropout"),
    ],
)
def test_refusals_leave_model_unchanged(
    folders: dict[str, Path], first: str, second: str, message: str
) -> None:
    ours = peftdecl.load_adapter(base(), folders[first])
    before, state = outputs(ours), ours.state_dict()
    with pytest.raises(PeftdeclError, match=message):
        ours.hotswap_adapter(folders[second], "default")
    assert np.array_equal(outputs(ours), before)
    assert all(np.array_equal(v, ours.state_dict()[k]) for k, v in state.items())


def test_refusals_of_rank_above_prepared_and_merged(folders: dict[str, Path]) -> None:
    ours = peftdecl.load_adapter(base(), folders["first"])
    ours.prepare_for_hotswap(target_rank=4)
    before = outputs(ours)
    with pytest.raises(PeftdeclError, match="exceeds the prepared rank 4"):
        ours.hotswap_adapter(folders["big"], "default")
    assert np.array_equal(outputs(ours), before)
    with pytest.raises(PeftdeclError, match="below adapter 'default'"):
        ours.prepare_for_hotswap(target_rank=2)
    ours.merge()
    with pytest.raises(PeftdeclError, match="merged"):
        ours.hotswap_adapter(folders["same"], "default")


def deltas(model: object) -> dict[str, np.ndarray]:
    """ΔW = s·B A of every adapted layer, from the model's exported arrays and its plan's scalings."""
    state = model.state_dict()  # type: ignore[attr-defined]
    return {
        lp.module: lp.scaling * state[lp.key("lora_B.weight")] @ state[lp.key("lora_A.weight")]
        for lp in model.plan().layers  # type: ignore[attr-defined]
    }


def test_numpy_backend_swaps(folders: dict[str, Path]) -> None:
    if "numpy" not in selected_backends():
        pytest.skip("the NumPy backend is not selected")
    state = {k: v.detach().numpy() for k, v in base().state_dict().items()}
    ours = peftdecl.load_adapter(state, folders["first"], backend="numpy")
    ours.prepare_for_hotswap(target_rank=8)
    for name in ("other", "same"):
        ours.hotswap_adapter(folders[name], "default")
        expected = deltas(peftdecl.load_adapter(state, folders[name], backend="numpy"))
        for module, delta in deltas(ours).items():
            assert np.abs(delta - expected[module]).max() <= 1e-12  # float64 reference, s folded into B


def test_mlx_backend_swaps(folders: dict[str, Path]) -> None:
    if "mlx" not in selected_backends():
        pytest.skip("the mlx backend is not selected")
    from tests.mlx_models import mlx_mlp, mx

    x = mx.random.normal((3, 12))
    ours = peftdecl.load_adapter(mlx_mlp()[0], folders["first"], backend="mlx")
    ours.prepare_for_hotswap(target_rank=8)
    ours.hotswap_adapter(folders["other"], "default")
    expected = np.array(peftdecl.load_adapter(mlx_mlp()[0], folders["other"], backend="mlx")(x))
    assert np.abs(np.array(ours(x)) - expected).max() <= 1e-5  # float32, s folded into B


class CountingBackend:
    """A torch.compile backend counting the graphs dynamo compiles (each recompilation adds one)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
        self.graphs += 1
        return gm.forward


def test_no_recompile_after_prepare(folders: dict[str, Path]) -> None:
    torch._dynamo.reset()
    ours = peftdecl.load_adapter(base(), folders["first"])
    ours.prepare_for_hotswap(target_rank=8)
    counter = CountingBackend()
    compiled = torch.compile(ours.base_model, backend=counter)
    with torch.no_grad():
        compiled(X)
        graphs = counter.graphs
        for name in ("other", "big", "same"):
            ours.hotswap_adapter(folders[name], "default")
            got = compiled(X).double().numpy()
            assert np.abs(got - fresh(folders[name])).max() <= TOL
    assert graphs >= 1 and counter.graphs == graphs  # not one recompilation over three swaps


def test_peft_without_prepare_recompiles_on_new_alpha(folders: dict[str, Path]) -> None:
    """PEFT's documented behaviour: unprepared, a swap changing the (float) scaling costs a recompilation."""
    torch._dynamo.reset()
    theirs = peft.PeftModel.from_pretrained(base(), folders["first"])
    counter = CountingBackend()
    compiled = torch.compile(theirs, backend=counter)
    with torch.no_grad():
        compiled(X)
        graphs = counter.graphs
        peft_hotswap(theirs, folders["same"], adapter_name="default")
        compiled(X)
        assert counter.graphs == graphs  # same rank and alpha: no recompilation
        peft_hotswap(theirs, folders["alpha"], adapter_name="default")  # alpha 16: s 2 -> 4, a new float
        got = compiled(X).double().numpy()
    assert counter.graphs > graphs
    assert np.abs(got - fresh(folders["alpha"])).max() <= TOL


def test_native_folder_and_optimizer_keep_working(folders: dict[str, Path], tmp_path: Path) -> None:
    """A peftdecl-layout folder swaps in too; an optimizer built before the swap trains the swapped values."""
    peftdecl.load_adapter(base(), folders["same"]).save(tmp_path / "native", format="native")
    ours = peftdecl.load_adapter(base(), folders["first"], is_trainable=True)
    optimizer = torch.optim.SGD(list(ours.trainable_parameters().values()), lr=0.1)
    ours.hotswap_adapter(tmp_path / "native", "default")
    assert np.abs(outputs(ours) - fresh(folders["same"])).max() <= TOL
    before = ours.state_dict()
    optimizer.zero_grad()
    ours(X).square().sum().backward()  # type: ignore[operator]
    optimizer.step()
    after = ours.state_dict()
    key = "lin1.lora_B.weight"
    assert np.abs(after[key] - before[key]).max() > 1e-4  # the live (swapped) parameter was stepped


class ConvEmbed(torch.nn.Module):
    """Embedding -> Conv1d -> Linear: the rank axes of lora_embedding_A/B and of conv A/B get padded."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.conv = torch.nn.Conv1d(8, 6, 3, padding=1)
        self.head = torch.nn.Linear(6, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        return self.head(torch.relu(h))


def test_embedding_and_conv_pad_and_swap(tmp_path: Path) -> None:
    def make() -> ConvEmbed:
        torch.manual_seed(0)
        return ConvEmbed().eval()

    def saved(folder: Path, seed: int, r: int, alpha: float) -> Path:
        model = make()
        torch.manual_seed(seed)
        config = peft.LoraConfig(
            r=r, lora_alpha=alpha, target_modules=["emb", "conv", "head"], init_lora_weights=False
        )
        peft.get_peft_model(model, config).save_pretrained(folder)
        return folder

    first, second = saved(tmp_path / "a", 1, 2, 4), saved(tmp_path / "b", 2, 3, 5)
    ids = torch.tensor([[1, 5, 7, 19], [0, 2, 3, 4]])

    def run(model: object) -> np.ndarray:
        with torch.no_grad():
            return model(ids).double().numpy()  # type: ignore[operator]

    ours = peftdecl.load_adapter(make(), first)
    ours.prepare_for_hotswap(target_rank=4)
    ours.hotswap_adapter(second, "default")
    assert np.abs(run(ours) - run(peftdecl.load_adapter(make(), second))).max() <= TOL
    assert np.abs(run(ours) - run(peft.PeftModel.from_pretrained(make(), second))).max() <= TOL


@pytest.mark.filterwarnings("ignore:.*invalid shape")  # PEFT 0.21 takes the 1-D lora_B.bias for a shard
def test_lora_bias_is_scaled_with_b(tmp_path: Path) -> None:
    """lora_B's bias is part of s·(B A x + b_B): a swap to another alpha folds s/s₀ into it as into B."""
    first = save_peft(tmp_path / "a", 11, lora_bias=True)
    second = save_peft(tmp_path / "b", 12, r=2, lora_alpha=5, lora_bias=True)
    ours = peftdecl.load_adapter(base(), first)
    ours.prepare_for_hotswap(target_rank=4)
    ours.hotswap_adapter(second, "default")
    assert np.abs(outputs(ours) - fresh(second)).max() <= TOL
    assert np.abs(outputs(ours) - peft_fresh(second)).max() <= TOL
    with pytest.raises(PeftdeclError, match="tensors"):  # a config without lora_bias lacks lora_B.bias
        ours.hotswap_adapter(save_peft(tmp_path / "c", 13), "default")
