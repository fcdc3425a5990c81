"""LoRA's LoftQ initialisation (init_lora_weights='loftq' with loftq_config) against HF PEFT 0.21.2.

PEFT's ``loftq_init`` quantises with bitsandbytes and then moves to "cuda" (or "xpu") unconditionally, so on a
machine without a GPU it cannot run as shipped. These tests run PEFT's own function with that one device constant
swapped for "cpu" (:func:`peft_loftq_on_cpu`: the same code object, ``co_consts`` edited), so the reference is
PEFT's algorithm with bitsandbytes' CPU codecs. Two CPU-only facts shape the cases:
- bitsandbytes 0.50.2's CPU NF4 dequantisation (AVX-512 kernel) reads absmax per row when the last dimension is a
  multiple of 16 but not of 64 (documented in peftdecl.quant.bnb4), so here in_features are 64 or not a multiple
  of 16; on a GPU, :func:`test_peft_on_cuda_equals_the_numpy_codecs` runs PEFT as shipped, any shape.
- PEFT's LoraConfig refuses 'loftq' without scipy installed (it does not use it): the tests build PEFT's config
  plain and switch it to LoftQ afterwards (what its __post_init__ would produce), and answer PEFT's scipy check
  while it loads a saved LoftQ config.

Tolerances: Q (the new base weight) is bit-identical after one iteration (the same codec on the same float32
weight); after more, the target W − B A differs by float32 rounding (PEFT's float32 SVD against float64 here),
which moves block absmax values by an ulp or so: ≤ 1e-6 relative. A and B come from an SVD of W − Q: equal up to
the sign of each singular pair (LAPACK builds differ), compared after aligning it, to 1e-4 relative (PEFT's float32
SVD of a residual whose singular values are close together; B A itself agrees to ~1e-7).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import peftdecl
from peftdecl.errors import SpecError, TargetError
from peftdecl.inits.loftq import loftq_factors, quantization_roundtrip
from peftdecl.lora_init import weight_initialised
from peftdecl.plan import LayerInfo, ModelInfo, compile_plan
from peftdecl.spec import load_spec
from tests.conftest import rel_err, selected_backends

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGETS = ["lin0", "lin1"]
Q_TOL_ITERATED = 1e-6  # Q after several iterations: block absmax moved by float32 rounding of W − B A
FACTOR_TOL = 1e-4  # A, B: float32 SVD (PEFT) against float64, aligned signs
OUT_TOL = 1e-5  # outputs of float32 models


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = torch.nn.Linear(64, 40)  # in 64: whole NF4 blocks per row
        self.lin1 = torch.nn.Linear(
            40, 25
        )  # in 40 (not a multiple of 16); 1000 weights: a partial last block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def base_model(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def peft_loftq_on_cpu() -> Any:
    """PEFT's ``loftq_init`` with its compute device "cuda" replaced by "cpu" (nothing else changed)."""
    from peft.utils import loftq_utils

    original = loftq_utils.loftq_init
    inner = getattr(original, "__wrapped__", original)  # under torch.no_grad
    code = inner.__code__.replace(
        co_consts=tuple("cpu" if c == "cuda" else c for c in inner.__code__.co_consts)
    )
    patched = types.FunctionType(
        code, inner.__globals__, inner.__name__, inner.__defaults__, inner.__closure__
    )
    return torch.no_grad()(patched)


@pytest.fixture
def peft_on_cpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import peft.tuners.lora.layer as lora_layer

    monkeypatch.setattr(lora_layer, "loftq_init", peft_loftq_on_cpu())
    real_find_spec = importlib.util.find_spec

    def find_spec(
        name: str, *args: Any
    ) -> Any:  # PEFT's LoftQ config check asks for scipy, which it never uses
        return real_find_spec("numpy") if name == "scipy" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    yield


def config(bits: int = 4, iters: int = 1, **extra: object) -> dict[str, object]:
    return {
        "r": 4,
        "lora_alpha": 8,  # s = 2: PEFT's LoftQ factors carry no 1/s, so the model computes Q + 2·B A
        "target_modules": TARGETS,
        "init_lora_weights": "loftq",
        "loftq_config": {"loftq_bits": bits, "loftq_iter": iters},
        **extra,
    }


def peft_config(cfg: dict[str, object]) -> Any:
    """PEFT's LoraConfig for ``cfg`` (built plain, then switched to LoftQ: see the module docstring)."""
    built = peft.LoraConfig(**{**cfg, "init_lora_weights": True, "loftq_config": {}})
    built.init_lora_weights, built.loftq_config = "loftq", dict(cfg["loftq_config"])  # type: ignore[call-overload]
    return built


def peft_tensors(model: Any, module: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    layer = getattr(model.base_model.model, module)
    return tuple(  # type: ignore[return-value]
        t.detach().double().numpy()
        for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.base_layer.weight)
    )


def aligned(a: np.ndarray, b: np.ndarray, peft_a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A and B with singular pair i negated where its row of A points away from PEFT's (B A is unchanged)."""
    signs = np.where(np.sum(a * peft_a, axis=1) < 0, -1.0, 1.0)
    return a * signs[:, None], b * signs[None, :]


def assert_like_peft(values: dict[str, np.ndarray], base_weight: Any, theirs: Any, iters: int) -> None:
    for module in TARGETS:
        a, b, w = peft_tensors(theirs, module)
        ours_a, ours_b = aligned(values[f"{module}.lora_A.weight"], values[f"{module}.lora_B.weight"], a)
        assert rel_err(ours_a, a) <= FACTOR_TOL
        assert rel_err(ours_b, b) <= FACTOR_TOL
        q = np.asarray(base_weight(module))
        if iters == 1:
            assert np.array_equal(q, w)  # bit-identical: the same NF4 / int8 codec on the same float32 weight
        else:
            assert rel_err(q, w) <= Q_TOL_ITERATED


def needs_torch_backend() -> None:
    if "torch" not in selected_backends():
        pytest.skip("the torch backend is not selected")


@pytest.mark.parametrize(("bits", "iters"), [(4, 1), (4, 2), (8, 1), (8, 2)])
def test_torch_backend_equals_peft(peft_on_cpu: None, bits: int, iters: int) -> None:
    needs_torch_backend()
    base = base_model()
    cfg = config(bits, iters)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(cfg))
    ours = peftdecl.attach(copy.deepcopy(base), {"peft_type": "LORA", **cfg}, backend="torch")
    assert_like_peft(ours.state_dict(), ours.engine.base_weight, theirs, iters)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(ours(x).numpy(), theirs(x).numpy()) <= OUT_TOL


@pytest.mark.parametrize("bits", [4, 8])
def test_numpy_reference_equals_peft(peft_on_cpu: None, bits: int) -> None:
    base = base_model(1)
    cfg = config(bits)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(cfg))
    state = {k: v.detach().double().numpy() for k, v in base.state_dict().items()}
    ours = peftdecl.attach(state, {"peft_type": "LORA", **cfg}, backend="numpy")
    assert_like_peft(ours.state_dict(), ours.engine.base_weight, theirs, 1)


def test_loftq_reduces_the_quantisation_error() -> None:
    """The point of LoftQ, independent of PEFT: ‖W − (Q + B A)‖ < ‖W − Q‖, and more iterations do not undo it."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 64)).astype(np.float32).astype(np.float64)
    plain_error = np.linalg.norm(w - quantization_roundtrip(w, 4))
    for iters in (1, 3):
        a, b, q = loftq_factors(w, 8, 4, iters)
        assert np.linalg.norm(w - q - b @ a) < 0.95 * plain_error


def test_q_survives_quantising_the_saved_base_again() -> None:
    """LoftQ's recipe saves the base with W = Q and loads it quantised (NF4, blocks of 64, no double quantisation):
    that quantisation gives Q back exactly, so Q + s·B A is what the quantised model computes."""
    rng = np.random.default_rng(3)
    # 1000 weights: a partial last block
    w = rng.standard_normal((25, 40)).astype(np.float32).astype(np.float64)
    q = loftq_factors(w, 4, 4, 2)[2]
    assert np.array_equal(quantization_roundtrip(q, 4), q)
    assert not np.array_equal(quantization_roundtrip(w, 4), w)  # W itself does move


def test_dora_magnitude_follows_q_and_the_factors_as_in_peft(peft_on_cpu: None) -> None:
    """PEFT initialises DoRA's m = ‖Q + s·B A‖ per row after LoftQ has set Q, A and B."""
    needs_torch_backend()
    base = base_model(2)
    cfg = config(use_dora=True)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(cfg))
    ours = peftdecl.attach(copy.deepcopy(base), {"peft_type": "LORA", **cfg}, backend="torch")
    values = ours.state_dict()
    for module in TARGETS:
        layer = getattr(theirs.base_model.model, module)
        magnitude = layer.lora_magnitude_vector["default"].weight.detach().double().numpy()
        key = next(k for k in values if k.startswith(f"{module}.") and "magnitude" in k)
        assert rel_err(values[key], magnitude) <= FACTOR_TOL  # through A and B: their float32 SVD tolerance
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_err(ours(x).numpy(), theirs(x).numpy()) <= OUT_TOL


def _perturb(model: Any, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # away from the initial values, so that the comparison shows the adapter
                param.add_(0.1 * torch.randn(param.shape, generator=gen))


def test_peft_saved_adapter_loads_in_peftdecl(peft_on_cpu: None, tmp_path: Path) -> None:
    """PEFT keeps init_lora_weights 'loftq' in the saved config and runs LoftQ again on load (W becomes Q); the
    adapter's A and B come from the file. peftdecl does the same on a float base."""
    needs_torch_backend()
    base = base_model(3)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(config()))
    _perturb(theirs, 4)
    theirs.save_pretrained(tmp_path / "ad")
    ours = peftdecl.load_adapter(copy.deepcopy(base), tmp_path / "ad", backend="torch")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad")
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert rel_err(ours(x).numpy(), theirs(x).numpy()) <= OUT_TOL
        assert rel_err(reloaded(x).numpy(), theirs(x).numpy()) <= OUT_TOL
    for module in TARGETS:
        assert np.array_equal(ours.engine.base_weight(module), peft_tensors(theirs, module)[2])


def test_peftdecl_saved_adapter_loads_in_peft(peft_on_cpu: None, tmp_path: Path) -> None:
    needs_torch_backend()
    base = base_model(4)
    cfg = config(iters=2)
    ours = peftdecl.attach(copy.deepcopy(base), {"peft_type": "LORA", **cfg}, backend="torch")
    _perturb(ours.get_base_model(), 6)
    ours.save_pretrained(tmp_path / "ad")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad")
    assert theirs.peft_config["default"].init_lora_weights == "loftq"
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert rel_err(theirs(x).numpy(), base(x).numpy()) > 1e-3  # the perturbed adapter shows
        assert rel_err(theirs(x).numpy(), ours(x).numpy()) <= OUT_TOL  # Q of 2 iterations: ≤ 1e-6 apart


def _plan(layer: LayerInfo, **extra: object) -> Any:
    info = ModelInfo(layers={"m": layer}, modules=("m",))
    return compile_plan(load_spec({"peft_type": "LORA", **config(), "target_modules": ["m"], **extra}), info)


@pytest.mark.parametrize(
    ("layer", "needle"),
    [
        (LayerInfo("embedding", 10, 8), "linear layers only"),
        (LayerInfo("conv2d", 3, 4, kernel_size=(3, 3)), "linear layers only"),
        (LayerInfo("gpt2_conv1d", 8, 6), "linear layers only"),
        (LayerInfo("linear", 8, 6, quantization="bnb_4bit"), "already quantised"),
    ],
)
def test_what_peft_cannot_initialise_is_refused(layer: LayerInfo, needle: str) -> None:
    """PEFT 0.21 crashes on embeddings, convolutions (a TypeError: LoftQ called without its config), gives
    factors of the transposed weight on GPT-2's Conv1D, and re-quantises an already quantised weight."""
    plan = _plan(layer)
    with pytest.raises(TargetError, match=needle):
        weight_initialised(plan, {"m.lora_A.weight": np.zeros(1)}, lambda _m: np.ones(layer.weight_shape))


def test_loading_onto_a_quantised_base_leaves_it_alone() -> None:
    """The adapter was made for the quantised model: loading it there changes no base weight."""
    plan = _plan(LayerInfo("linear", 8, 6, quantization="bnb_4bit"))
    assert weight_initialised(plan, {}, lambda _m: np.ones((6, 8)))[1] == {}


@pytest.mark.parametrize(
    ("extra", "path"),
    [
        ({"loftq_config": {}}, r"\$\.loftq_config"),
        ({"loftq_config": {"loftq_bits": 3}}, r"\$\.loftq_config\.loftq_bits"),
        ({"loftq_config": {"loftq_iter": 0}}, r"\$\.loftq_config\.loftq_iter"),
        ({"loftq_config": {"bits": 4}}, r"\$\.loftq_config\.bits"),
    ],
)
def test_bad_loftq_config_is_a_spec_error(extra: dict[str, object], path: str) -> None:
    with pytest.raises(SpecError, match=path):
        load_spec({"peft_type": "LORA", **config(), **extra})


def test_adalora_refuses_loftq_as_peft() -> None:
    spec = {"peft_type": "ADALORA", "total_step": 10, "loftq_config": {"loftq_bits": 4}}
    with pytest.raises(SpecError, match=r"\$\.loftq_config"):
        load_spec(spec)


def test_replace_lora_weights_loftq_equals_peft(tmp_path: Path) -> None:
    """PEFT's replace_lora_weights_loftq on a bitsandbytes NF4 model (its one-step LoftQ from the float checkpoint,
    run on the CPU as loftq_init is) against peftdecl's; a callback that says no keeps a layer's old factors."""
    needs_torch_backend()
    from peft.utils import loftq_utils

    from peftdecl.train.tiny_model import build_tiny_llama
    from tests.test_torch_bnb import quantized

    folder = build_tiny_llama(tmp_path / "tiny", hidden=64, layers=1, intermediate=128)
    inner = loftq_utils._loftq_init_new
    inner = getattr(inner, "__wrapped__", inner)
    code = inner.__code__.replace(
        co_consts=tuple("cpu" if c == "cuda" else c for c in inner.__code__.co_consts)
    )
    patched = torch.no_grad()(types.FunctionType(code, inner.__globals__, inner.__name__, inner.__defaults__))
    targets = ["q_proj", "v_proj"]
    theirs = peft.get_peft_model(quantized(folder, "nf4"), peft.LoraConfig(r=4, target_modules=targets))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loftq_utils, "_loftq_init_new", patched)
        loftq_utils.replace_lora_weights_loftq(theirs, model_path=str(folder))
    spec = {"peft_type": "LORA", "r": 4, "target_modules": targets}
    ours = peftdecl.attach(quantized(folder, "nf4"), spec, backend="torch")
    before = ours.state_dict()
    refused = "model.layers.0.self_attn.v_proj"
    peftdecl.replace_lora_weights_loftq(
        ours, model_path=folder, callback=lambda _m, module: module != refused
    )
    values = ours.state_dict()
    for module in ("model.layers.0.self_attn.q_proj", refused):
        layer = theirs.base_model.model.get_submodule(module)
        a = layer.lora_A["default"].weight.detach().double().numpy()
        b = layer.lora_B["default"].weight.detach().double().numpy()
        got_a, got_b = values[f"{module}.lora_A.weight"], values[f"{module}.lora_B.weight"]
        if module == refused:
            assert np.array_equal(got_a, before[f"{module}.lora_A.weight"])
            assert not got_b.any()  # still LoRA's B = 0
            continue
        got_a, got_b = aligned(got_a, got_b, a)
        assert rel_err(got_a, a) <= FACTOR_TOL
        assert rel_err(got_b, b) <= FACTOR_TOL


def test_mlx_backend_equals_the_numpy_reference() -> None:
    """The same LoftQ on MLX (float32 weights): Q bit-identical, A and B to float32 storage, outputs alike."""
    if "mlx" not in selected_backends():
        pytest.skip("the mlx backend is not selected")
    from tests.mlx_models import mlx_mlp, mx

    model, state = mlx_mlp((64, 40, 25))
    spec = {"peft_type": "LORA", **config(8, 2)}
    reference = peftdecl.attach(state, spec, backend="numpy")
    ours = peftdecl.attach(model, spec, backend="mlx")
    expected = reference.state_dict()
    for key, value in ours.state_dict().items():
        assert rel_err(value, expected[key]) <= 1e-6  # float32 storage of the same float64 factors
    for module in TARGETS:
        assert np.array_equal(ours.engine.base_weight(module), reference.engine.base_weight(module))

    def layer(module: str, h: np.ndarray) -> np.ndarray:  # the float64 reference's Q + s·B A and the bias
        delta = 2.0 * expected[f"{module}.lora_B.weight"] @ expected[f"{module}.lora_A.weight"]
        return h @ (reference.engine.base_weight(module) + delta).T + state[f"{module}.bias"]

    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    want = layer("lin1", np.maximum(layer("lin0", x.astype(np.float64)), 0.0))
    assert rel_err(np.array(ours(mx.array(x))), want) <= OUT_TOL


@pytest.mark.parametrize("shape", [(40, 64), (32, 48), (25, 40)])
def test_peft_on_cuda_equals_the_numpy_codecs(shape: tuple[int, int]) -> None:
    """PEFT's loftq_init as shipped (bitsandbytes on CUDA) against loftq_factors: Q bit-identical after one
    iteration, A and B to FACTOR_TOL after aligning signs. Skipped without a CUDA device."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: PEFT's LoftQ runs bitsandbytes on CUDA")
    from peft.utils.loftq_utils import loftq_init

    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    for bits in (4, 8):
        q, a, b = (t.detach().double().cpu().numpy() for t in loftq_init(weight.cuda(), bits, 4, num_iter=1))
        ours_a, ours_b, ours_q = loftq_factors(weight.double().numpy(), 4, bits, 1)
        assert np.array_equal(ours_q, q)
        ours_a, ours_b = aligned(ours_a, ours_b, a)
        assert rel_err(ours_a, a) <= FACTOR_TOL
        assert rel_err(ours_b, b) <= FACTOR_TOL
