"""Model-level behaviour of the torch backend: wrapping, freezing, several adapters, mixed batches (and their
failures), merging and unloading, dropout, half-precision bases, files, and the fused LoRA autograd Function.

Tolerances: float64 internal consistency ≤ 1e-10; float32 against the float64 NumPy reference ≤ 1e-5;
bfloat16/float16 bases ≤ 2e-2; the fused Function's backward is checked by torch.autograd.gradcheck (float64
finite differences).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peftdecl
from peftdecl.errors import BackendError, PeftdeclError
from tests.assertions import lora_spec
from tests.conftest import rel_err

torch = pytest.importorskip("torch")
nn = torch.nn

from peftdecl_torch import TorchBackend  # noqa: E402
from peftdecl_torch.inventory import numpy_model  # noqa: E402
from peftdecl_torch.kinds import lora as torch_lora  # noqa: E402
from peftdecl_torch.layer import AdaptedLayer  # noqa: E402
from peftdecl_torch.mixed_batch import ADAPTER_NAMES  # noqa: E402
from peftdecl_torch.saved import SavedModule  # noqa: E402

LORA = lora_spec(["a", "b"], r=3, alpha=6)
ADDITIVE = {
    "lora": {**LORA, "r": 2},
    "adalora": {
        "peft_type": "ADALORA",
        "init_r": 3,
        "target_r": 2,
        "total_step": 10,
        "target_modules": ["a", "b"],
        "init_lora_weights": False,
    },
    "loha": {"peft_type": "LOHA", "r": 2, "target_modules": ["a", "b"], "init_weights": False},
    "lokr": {"peft_type": "LOKR", "r": 2, "target_modules": ["a", "b"], "init_weights": False},
    "vera": {"peft_type": "VERA", "r": 4, "target_modules": ["a", "b"], "init_weights": False},
}
DORA = {**LORA, "use_dora": True}
IA3 = {"peft_type": "IA3", "target_modules": ["a", "b"], "feedforward_modules": [], "init_ia3_weights": False}


class Tiny(nn.Module):
    """y = b(tanh(a(x))) plus a head kept for modules_to_save."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)
        self.head = nn.Linear(4, 3)
        self.to(dtype)

    def forward(self, x):
        return self.head(self.b(torch.tanh(self.a(x))))


def inputs(batch: int = 4, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 5, 8, generator=torch.Generator().manual_seed(seed)).to(dtype)


def run(model, x, **kwargs):
    with torch.no_grad():
        return model(x, **kwargs)


def test_listing_backends_does_not_import_torch_and_accepts_only_modules() -> None:
    code = (
        "import sys, peftdecl; e = peftdecl.backends()['torch']; "
        "assert e.available and 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    backend = TorchBackend()
    assert backend.accepts(Tiny()) and not backend.accepts({"m.weight": np.zeros((2, 2))})
    assert peftdecl.backends()["torch"].capabilities.requires == ("torch",)


def test_attach_wraps_in_place_freezes_the_base_and_trains_only_adapters() -> None:
    base = Tiny()
    model = peftdecl.attach(base, LORA, seed=1)
    assert model.base_model is base and isinstance(base.a, AdaptedLayer) and isinstance(base.b, AdaptedLayer)
    params = model.trainable_parameters()
    assert set(params) == {f"{m}.lora_{t}.weight" for m in "ab" for t in "AB"}
    assert all(p.requires_grad and p.dtype == torch.float32 for p in params.values())
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    assert trainable == {
        "a.lora_A.default.weight",
        "a.lora_B.default.weight",
        "b.lora_A.default.weight",
        "b.lora_B.default.weight",
    }
    model.add_adapter("other", ADDITIVE["loha"], seed=2)
    assert not any(p.requires_grad for p in model.engine.trainable_parameters(("other",)).values())
    model.set_adapter("other")
    assert all(p.requires_grad for p in model.trainable_parameters().values())
    assert not any(p.requires_grad for p in params.values())


def test_bad_options_and_double_wrapping_are_refused() -> None:
    with pytest.raises(BackendError, match="layer_types"):
        peftdecl.attach(Tiny(), LORA, layer_types={"a": "linear"})
    base = Tiny()
    peftdecl.attach(base, LORA)
    with pytest.raises(BackendError, match="already carries peftdecl adapters"):
        peftdecl.attach(base, LORA)


@pytest.mark.parametrize("kinds", [("lora", "loha"), ("vera", "adalora", "lokr")], ids=["2", "3"])
def test_several_active_additive_adapters_sum_their_contributions(kinds) -> None:
    model = peftdecl.attach(Tiny(torch.float64), ADDITIVE[kinds[0]], name=kinds[0], seed=1)
    for i, kind in enumerate(kinds[1:]):
        model.add_adapter(kind, ADDITIVE[kind], seed=2 + i)
    x = inputs(dtype=torch.float64)
    layer = model.engine.layer("a")
    with torch.no_grad(), model.disable_adapters():
        base = layer(x)
    deltas = []
    for kind in kinds:
        model.set_adapter(kind)
        with torch.no_grad():
            deltas.append(layer(x) - base)
    model.set_adapter(list(kinds))
    with torch.no_grad():
        assert rel_err(layer(x).numpy(), (base + sum(deltas)).numpy()) <= 1e-10


def test_several_active_adapters_of_other_kinds_compose_in_active_order() -> None:
    # IA3 on an attention-type layer scales the output built so far: LoRA's contribution too when it comes
    # after LoRA, not when it comes before (peftdecl.composition; PEFT parity in test_torch_multi_active.py)
    model = peftdecl.attach(Tiny(torch.float64), LORA, seed=1)
    model.add_adapter("ia3", IA3, seed=2)
    layer, x = model.engine.layer("a"), inputs(dtype=torch.float64)
    scale = torch.from_numpy(model.state_dict("ia3")["a.ia3_l"]).reshape(-1)
    with torch.no_grad(), model.disable_adapters():
        base = layer(x)
    with torch.no_grad():
        lora = layer(x)
        model.set_adapter(["default", "ia3"])
        assert rel_err(layer(x).numpy(), (lora * scale).numpy()) <= 1e-12
        model.set_adapter(["ia3", "default"])
        assert rel_err(layer(x).numpy(), (base * scale + lora - base).numpy()) <= 1e-12


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_mixed_batch_rows_equal_single_adapter_runs(training: bool) -> None:
    model = peftdecl.attach(Tiny(torch.float64), ADDITIVE["lora"], name="lora", seed=1)
    for i, kind in enumerate(list(ADDITIVE)[1:]):
        model.add_adapter(kind, ADDITIVE[kind], seed=2 + i)
    model.train(training)
    names = ["vera", "__base__", "lora", "loha", "adalora", "lokr", "lora"]
    x = inputs(batch=len(names), dtype=torch.float64)
    mixed = run(model, x, adapter_names=names)
    for kind in ADDITIVE:
        model.set_adapter(kind)
        single = run(model, x)
        rows = [i for i, n in enumerate(names) if n == kind]
        assert rel_err(mixed[rows].numpy(), single[rows].numpy()) <= 1e-12
    with model.disable_adapters():
        assert torch.equal(mixed[1], run(model, x)[1])


def test_mixed_batch_trains_each_row_with_its_adapter() -> None:
    model = peftdecl.attach(Tiny(), LORA, seed=1)
    model.add_adapter("other", ADDITIVE["lora"], seed=2)
    model.set_adapter(["default", "other"])
    model(inputs(batch=2), adapter_names=["other", "other"]).sum().backward()
    grads = {k: p.grad for k, p in model.trainable_parameters().items()}
    assert set(grads) == {f"{n}/{k}" for n in ("default", "other") for k in model.state_dict(n)}
    assert all(g is None for k, g in grads.items() if k.startswith("default/"))
    assert all(g.abs().sum() > 0 for k, g in grads.items() if k.startswith("other/"))


def test_failing_mixed_batch_calls_leave_no_state_behind() -> None:
    model = peftdecl.attach(Tiny(), LORA, seed=1)
    model.add_adapter("dora", DORA, seed=3)
    x = inputs(batch=3)
    plain = run(model, x)
    with pytest.raises(PeftdeclError, match="batch size 3"):  # raised inside the model's forward
        run(model, x, adapter_names=["default", "__base__"])
    with pytest.raises(PeftdeclError, match="unknown adapters"):
        run(model, x, adapter_names=["default", "typo", "default"])
    with pytest.raises(PeftdeclError, match="dora"):
        run(model, x, adapter_names=["dora", "default", "default"])
    with pytest.raises(PeftdeclError, match="list of adapter names"):
        run(model, x, adapter_names="default")
    assert ADAPTER_NAMES.get() is None
    assert torch.equal(run(model, x), plain)  # PEFT keeps applying the stale names here (issue #3475)
    model.merge()
    with pytest.raises(PeftdeclError, match="merged"):
        run(model, x, adapter_names=["default"] * 3)


def test_disable_merge_unmerge_and_merge_and_unload() -> None:
    base = Tiny()
    base.head.weight.requires_grad_(False)  # a flag the user chose: restored after unloading
    reference = Tiny()
    model = peftdecl.attach(base, LORA, seed=1)
    x = inputs()
    adapted = run(model, x)
    with model.disable_adapters():
        assert torch.equal(run(model, x), run(reference, x))
    weight = model.base_weight("a").copy()
    model.merge()
    assert rel_err(run(model, x).numpy(), adapted.numpy()) <= 1e-6  # float32: merged vs unmerged forward
    model.unmerge()
    assert rel_err(model.base_weight("a"), weight) <= 1e-7
    plain = model.merge_and_unload()
    assert plain is base and type(plain.a) is nn.Linear and type(plain.b) is nn.Linear
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == {
        n: n != "head.weight" for n, _ in reference.named_parameters()
    }
    assert rel_err(run(plain, x).numpy(), adapted.numpy()) <= 1e-6


def test_delete_adapter_restores_the_original_layers() -> None:
    base = Tiny()
    original = base.a
    model = peftdecl.attach(base, LORA, seed=1)
    model.add_adapter("other", {**LORA, "target_modules": ["a"]}, seed=2)
    model.delete_adapter("default")
    assert isinstance(base.a, AdaptedLayer) and base.b is not None and type(base.b) is nn.Linear
    model.delete_adapter("other")
    assert base.a is original


def test_dropout_follows_train_and_eval_and_keeps_the_mean() -> None:
    model = peftdecl.attach(Tiny(torch.float64), {**LORA, "lora_dropout": 0.5}, seed=1)
    layer = model.engine.layer("a")
    x = inputs(batch=1, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        eval_out = layer(x)
        model.train()
        state = model.engine.get_rng_state()
        first = layer(x)
        assert not torch.equal(layer(x), first)  # the engine's generator moved on
        model.engine.set_rng_state(state)
        torch.manual_seed(5)  # torch's global generator plays no part in the masks
        assert torch.equal(layer(x), first)
        assert rel_err(first.numpy(), eval_out.numpy()) > 1e-3
        draws = torch.stack([layer(x) for _ in range(2000)])
        model.eval()
        assert torch.equal(layer(x), eval_out)
    # inverted dropout keeps the expectation: the mean of the draws approaches the eval output
    spread = draws.std(0) / 2000**0.5
    assert torch.all((draws.mean(0) - eval_out).abs() <= 5 * spread + 1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize(
    "spec",
    [
        LORA,
        DORA,
        IA3,
        ADDITIVE["loha"],
        ADDITIVE["vera"],
        {"peft_type": "OFT", "oft_block_size": 4, "r": 0, "target_modules": ["a"], "init_weights": False},
    ],
    ids=["lora", "dora", "ia3", "loha", "vera", "oft"],
)
def test_half_precision_bases_keep_float32_adapters(dtype, spec) -> None:
    base = Tiny(dtype)
    state, layer_types, facts = numpy_model(base)  # the half-precision weights, exactly, in float64
    reference = peftdecl.attach(state, spec, layer_types=layer_types, seed=4, backend="numpy", **facts)
    model = peftdecl.attach(base, spec, seed=4)
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters().values())
    x = inputs(batch=2).to(dtype)
    y = model.engine.layer("a")(x)
    assert y.dtype == dtype
    expected = reference("a", x.double().numpy())
    assert rel_err(y.detach().double().numpy(), expected) <= 2e-2
    y.float().sum().backward()
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32
        for k, p in model.trainable_parameters().items()
        if k.startswith("a.")
    )


def test_modules_to_save_copies_train_save_and_unload() -> None:
    base = Tiny()
    original_head = base.head
    model = peftdecl.attach(base, {**LORA, "modules_to_save": ["head"]}, seed=1)
    assert isinstance(base.head, SavedModule)
    params = model.trainable_parameters()
    assert {"head.weight", "head.bias"} <= set(params) and params["head.weight"] is not original_head.weight
    with torch.no_grad():
        params["head.weight"].add_(1.0)
    x = inputs()
    with model.disable_adapters():
        assert torch.equal(base.head(x[..., :4]), original_head(x[..., :4]))
    exported = model.state_dict()
    assert np.array_equal(exported["head.weight"], params["head.weight"].detach().numpy())
    plain = model.merge_and_unload()
    assert type(plain.head) is nn.Linear and torch.equal(plain.head.weight, params["head.weight"])


def test_files_round_trip_between_torch_and_numpy(tmp_path) -> None:
    model = peftdecl.attach(Tiny(), DORA, seed=2)
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.add_(0.1)
    model.save(tmp_path)
    state, layer_types, facts = numpy_model(Tiny())
    reference = peftdecl.load_adapter(state, tmp_path, layer_types=layer_types, backend="numpy", **facts)
    again = peftdecl.load_adapter(Tiny(), tmp_path)
    x = inputs()
    for module in ("a", "b"):
        xm = x if module == "a" else torch.tanh(run(again.engine.layer("a"), x))
        expected = reference(module, xm.double().numpy())
        assert rel_err(run(again.engine.layer(module), xm).numpy(), expected) <= 1e-5
        assert rel_err(run(model.engine.layer(module), xm).numpy(), expected) <= 1e-5


@pytest.mark.parametrize("save_shrink", [False, True])
@pytest.mark.parametrize("layout", ["linear", "gpt2_conv1d"])
def test_fused_lora_function_gradcheck(save_shrink: bool, layout: str) -> None:
    gen = torch.Generator().manual_seed(0)

    def tensor(*shape, grad=True):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=grad)

    weight = (
        tensor(6, 5, grad=False) if layout == "linear" else tensor(5, 6, grad=False)
    )  # [out, in] | [in, out]
    args = (
        tensor(2, 3, 5),
        weight,
        tensor(6, grad=False),
        tensor(2, 5),
        tensor(6, 2),
        tensor(6),
        1.5,
        layout == "gpt2_conv1d",
        save_shrink,
    )
    assert torch.autograd.gradcheck(torch_lora.LoraLinearFunction.apply, args)


@settings(max_examples=12, deadline=None)
@given(
    d_in=st.sampled_from([4, 6, 8, 12]),
    d_out=st.integers(1, 9),
    r=st.integers(1, 5),
    kind=st.sampled_from(["lora", "dora", "loha", "lokr", "oft", "vera"]),
    seed=st.integers(0, 2**16),
)
def test_forward_gradients_and_merge_property(d_in, d_out, r, kind, seed) -> None:
    specs = {
        "lora": {**LORA, "r": r, "use_rslora": True},
        "dora": {**DORA, "r": r},
        "loha": {"peft_type": "LOHA", "r": r, "init_weights": False},
        "lokr": {"peft_type": "LOKR", "r": r, "init_weights": False, "decompose_both": True},
        "oft": {"peft_type": "OFT", "r": 0, "oft_block_size": 2 if d_in % 4 else 4, "init_weights": False},
        "vera": {"peft_type": "VERA", "r": r, "init_weights": False},
    }
    spec = {**specs[kind], "target_modules": ["m"]}
    torch.manual_seed(seed)
    base = nn.Sequential()
    base.add_module("m", nn.Linear(d_in, d_out).double())
    state, layer_types, facts = numpy_model(base)
    reference = peftdecl.attach(state, spec, layer_types=layer_types, seed=seed, backend="numpy", **facts)
    model = peftdecl.attach(base, spec, seed=seed)
    x = torch.randn(3, d_in, dtype=torch.float64, requires_grad=True)
    y = model(x)
    expected, tape = reference.engine.layer_forward("m", x.detach().numpy())
    assert rel_err(y.detach().numpy(), expected) <= 1e-10
    dy = np.random.default_rng(seed).normal(size=expected.shape)
    grads = reference.engine.layer_backward("m", tape, dy)
    y.backward(torch.from_numpy(dy))
    for key, p in model.trainable_parameters().items():
        assert rel_err(p.grad.numpy(), grads[key]) <= 1e-9, key
    assert rel_err(x.grad.numpy(), grads["input"]) <= 1e-10
    model.merge()
    assert rel_err(run(model, x).numpy(), expected) <= 1e-10


def test_adalora_orthogonal_regularizer_matches_numpy() -> None:
    from peftdecl_numpy.kinds.adalora import orthogonal_regularizer as numpy_regularizer
    from peftdecl_torch.kinds.adalora import orthogonal_regularizer

    spec = {**ADDITIVE["adalora"], "rank_pattern": {"a.lora_E": [True, False, True]}}
    model = peftdecl.attach(Tiny(torch.float64), spec, seed=3)
    params = model.trainable_parameters()
    value = orthogonal_regularizer(model.plan(), params)
    value.backward()
    expected, grads = numpy_regularizer(model.plan(), {k: p.detach().numpy() for k, p in params.items()})
    assert rel_err(value.item(), expected) <= 1e-12
    for key, grad in grads.items():
        assert rel_err(params[key].grad.numpy(), grad) <= 1e-10, key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_layers_follow_the_base_device() -> None:
    base = Tiny().cuda()
    model = peftdecl.attach(base, DORA, seed=1)
    assert all(p.is_cuda for p in model.trainable_parameters().values())
    x = inputs().cuda()
    y = model(x)
    y.sum().backward()
    cpu = peftdecl.attach(Tiny(), DORA, seed=1)
    assert rel_err(y.detach().cpu().numpy(), run(cpu, x.cpu()).numpy()) <= 1e-5


def _extra_saved_bytes(layer, x) -> int:
    """Bytes autograd keeps for backward beyond the layer's input, output, parameters and buffers."""
    known = {t.untyped_storage().data_ptr() for t in (x, *layer.parameters(), *layer.buffers())}
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    known.add(y.untyped_storage().data_ptr())
    return sum(n for ptr, n in seen.items() if ptr not in known)


def test_dora_keeps_only_o_out_beyond_its_input_and_output() -> None:
    tokens, d_in, d_out, r = 64, 32, 24, 4
    base = nn.Sequential()
    base.add_module("m", nn.Linear(d_in, d_out))
    spec = {"peft_type": "LORA", "r": r, "target_modules": ["m"], "init_lora_weights": False}
    dora = peftdecl.attach(base, {**spec, "use_dora": True}, seed=1).engine.layer("m")
    base2 = nn.Sequential()
    base2.add_module("m", nn.Linear(d_in, d_out))
    lora = peftdecl.attach(base2, spec, seed=1).engine.layer("m")
    x = torch.randn(tokens, d_in, requires_grad=True)
    assert _extra_saved_bytes(lora, x) <= tokens * r * 4  # x Aᵀ
    assert _extra_saved_bytes(dora, x) <= d_out * 4  # the detached norm n
