"""The CuPy backend without a device: its dispatch, its host-side planning, and its reference path.

(a) Dispatch: the backend's engine on NumPy arrays (``xp=numpy``) with a table of fake kernels (NumPy products
    standing in for the CUDA launches) routes each op as designed, and falls back to the reference where a
    kernel does not cover the case or is absent; results equal the NumPy backend's (float64, tolerance 1e-12:
    the same math, only the order of sums may differ).
(b) Planning: in tests/test_cupy_planning.py.
(c) With no kernels at all, the engine is the NumPy reference: equal to the NumPy backend to the last bit.
Not here: the kernels themselves (tests/test_cuda_kernels_lora.py on a GPU, tests/test_cuda_emulated.py on the CPU).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import peftdecl
from peftdecl_cupy import CupyBackend
from peftdecl_cupy.dispatch import KernelOps
from peftdecl_cupy.table import MIXED, kernel_table
from peftdecl_numpy.xp_ops import to_numpy
from tests.conftest import rel_err
from tests.layer_cases import KINDS

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-12


class FakeLowRank:
    """NumPy stand-ins for the low-rank kernels (same contract: in-place expand, strided outputs)."""

    def accepts(self, *arrays: Any) -> bool:
        return all(isinstance(a, np.ndarray) for a in arrays)

    def shrink(self, x: Any, a: Any, alpha: float = 1.0, rank_scale: Any = None) -> Any:
        u = alpha * (x @ a.T)
        return u if rank_scale is None else u * np.reshape(rank_scale, (1, -1))

    def expand(self, u: Any, b: Any, y: Any, alpha: float = 1.0, accumulate: bool = True) -> Any:
        y[...] = (y if accumulate else 0.0) + alpha * (u @ b.T)
        return y

    def outer(self, u: Any, x: Any, out: Any, alpha: float = 1.0, accumulate: bool = False) -> Any:
        out[...] = (out if accumulate else 0.0) + alpha * (u.T @ x)
        return out


class FakeMixed:
    def __init__(self) -> None:
        self.indices: list[np.ndarray] = []

    def accepts(self, *arrays: Any) -> bool:
        return all(isinstance(a, np.ndarray) for a in arrays)

    def run(self, x: Any, y: Any, adapters: list, index: Any) -> Any:
        self.indices.append(np.asarray(index))
        for t, i in enumerate(index):
            if i >= 0:
                a, b, s = adapters[i]
                y[t] += s * (x[t] @ a.T) @ b.T
        return y


class FakeDora:
    def accepts(self, *arrays: Any) -> bool:
        return all(isinstance(a, np.ndarray) for a in arrays)

    def norm(self, weight: Any, a: Any, b: Any, s: float) -> Any:
        return np.sqrt(np.sum((weight + s * b @ a) ** 2, axis=1))  # formed densely: an independent formula

    def output(self, u: Any, b: Any, y: Any, bias: Any, m: Any, n: Any, s: float) -> Any:
        bias = 0.0 if bias is None else bias
        g = np.where(n > 0, m / np.where(n > 0, n, 1.0), 1.0)
        direction = y - bias + s * u @ b.T
        return bias + g * direction, direction


def fake_table() -> dict:
    return kernel_table(FakeLowRank(), FakeMixed(), FakeDora())


def attach(
    kind: str, layer: str, backend: Any, fields: dict | None = None, **options: Any
) -> tuple[Any, Any]:
    """``kind`` on tests/layer_cases.py's ``layer`` in float64, and an input for it."""
    entry, case = KINDS[kind], KINDS[kind].layers[layer]
    rng = np.random.default_rng(0)
    spec = {**entry.spec, **(entry.layer_fields or {}).get(layer, {}), **(fields or {})}
    model = peftdecl.attach(
        case.random_state(rng), spec, backend=backend, layer_types=case.layer_types(), seed=0, **options
    )
    if entry.prepare is not None:
        entry.prepare(model, spec, rng)
    return model, case.random_input(rng)


def cupy_on_numpy(kind: str, layer: str, fields: dict | None = None, kernels: Any = None) -> tuple[Any, Any]:
    table = fake_table() if kernels is None else kernels
    return attach(kind, layer, CupyBackend(), fields, xp=np, dtype="float64", kernels=table)


def train_step(model: Any, x: Any) -> dict[str, np.ndarray]:
    """Training forward and backward, then an eval forward: every array as NumPy."""
    model.train()
    y, tape = model.engine.layer_forward("m", x)
    dy = np.random.default_rng(1).normal(size=tuple(y.shape))
    out = {
        f"grad {k}": to_numpy(v)
        for k, v in model.engine.layer_backward("m", tape, dy).items()
        if v is not None
    }
    out["train output"] = to_numpy(y)
    model.eval()
    out["eval output"] = to_numpy(model("m", x))
    return out


def assert_same(result: dict, expected: dict, tol: float = TOL) -> None:
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert rel_err(result[key], value) <= tol, key


def calls(model: Any, kind: str) -> dict[str, int]:
    ops = model.engine.kind_ops(kind)
    assert isinstance(ops, KernelOps)
    return ops.calls


# the reference's record calls delta_record on the proxy, which falls back too
FALLBACK = {
    "record:reference": 2,
    "delta_record:reference": 2,
    "backward:reference": 1,
    "delta_backward:reference": 1,
}


# -- (a) dispatch ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_runs_its_kernels_forward_and_backward(dropout: float) -> None:
    fields = {"lora_dropout": dropout}
    model, x = cupy_on_numpy("lora", "linear", fields)
    result = train_step(model, x)
    # the fake kernels are NumPy products, so only the order of sums differs; dropout masks come from the
    # same seeded generator in the same order (the override draws them where the reference would)
    assert_same(result, train_step(*attach("lora", "linear", "numpy", fields)))
    # without dropout dh is added into dy W by the backward override; with it the reference's backward runs
    # and calls the delta_backward override
    expected = {"record": 2, "backward": 1} if dropout == 0 else {"record": 2, "backward:reference": 1}
    assert calls(model, "lora") == expected | ({} if dropout == 0 else {"delta_backward": 1})


@pytest.mark.parametrize(
    ("layer", "fields"), [("conv2d", {}), ("embedding", {}), ("linear", {"lora_bias": True})]
)
def test_lora_falls_back_where_no_kernel_covers_the_case(layer: str, fields: dict) -> None:
    model, x = cupy_on_numpy("lora", layer, fields)
    assert_same(train_step(model, x), train_step(*attach("lora", layer, "numpy", fields)))
    assert calls(model, "lora") == FALLBACK


def test_a_kind_without_kernels_runs_the_reference_ops_themselves() -> None:
    from peftdecl_numpy.kinds import ops_for

    fields = {"feedforward_modules": []}
    model, x = cupy_on_numpy("ia3", "linear", fields)
    assert model.engine.kind_ops("ia3") is ops_for("ia3")
    assert_same(train_step(model, x), train_step(*attach("ia3", "linear", "numpy", fields)))


def test_a_missing_table_entry_falls_back_for_that_kind_only() -> None:
    table = fake_table()
    del table["lora"]
    model, x = cupy_on_numpy("lora", "linear", kernels=table)
    assert not isinstance(model.engine.kind_ops("lora"), KernelOps)
    assert_same(train_step(model, x), train_step(*attach("lora", "linear", "numpy")))


def test_kernels_refusing_the_arrays_fall_back() -> None:
    """The real kernel sets accept CuPy arrays only: on NumPy arrays every op takes the reference."""
    from peftdecl_cupy.engine import default_kernels

    model, x = cupy_on_numpy("lora", "linear", kernels=default_kernels())
    assert_same(train_step(model, x), train_step(*attach("lora", "linear", "numpy")))
    assert calls(model, "lora") == FALLBACK


def test_fused_off_runs_no_kernel_at_all() -> None:
    """EngineOptions.fused = False (PEFTDECL_FUSED=0) is the reference's CuPy path: an empty kernel table."""
    model, x = attach(
        "lora", "linear", CupyBackend(), xp=np, dtype="float64", engine_options={"fused": False}
    )
    assert model.engine.kernels == {}
    assert not isinstance(model.engine.kind_ops("lora"), KernelOps)
    assert_same(train_step(model, x), train_step(*attach("lora", "linear", "numpy")), tol=0.0)


def test_adalora_forward_runs_the_scaled_shrink() -> None:
    fields = {"lora_dropout": 0.3}
    model, x = cupy_on_numpy("adalora", "linear", fields)
    assert_same(train_step(model, x), train_step(*attach("adalora", "linear", "numpy", fields)))
    # record is the reference's, calling delta_record on the proxy: the override runs inside it
    assert calls(model, "adalora") == {"delta_record": 2, "delta_backward": 1}


def test_dora_norm_and_output_pass_run_their_kernels() -> None:
    model, x = cupy_on_numpy("dora", "linear")
    assert_same(train_step(model, x), train_step(*attach("dora", "linear", "numpy")))
    assert calls(model, "dora") == {
        "compose_output_record": 2,
        "compose_output_backward": 1,
        "weight_norm": 2,
    }


def test_dora_with_dropout_in_training_falls_back_for_the_output_pass() -> None:
    fields = {"lora_dropout": 0.3}
    model, x = cupy_on_numpy("dora", "linear", fields)
    assert_same(train_step(model, x), train_step(*attach("dora", "linear", "numpy", fields)))
    # training: the reference output pass and backward (the norm still from its kernel); eval: the kernels
    assert calls(model, "dora") == {
        "compose_output_record:reference": 1,
        "compose_output_backward:reference": 1,
        "compose_output_record": 1,
        "weight_norm": 2,
    }


def test_the_reference_methods_self_calls_reach_the_overrides() -> None:
    """record is not overridden for AdaLoRA; AdditiveKind.record calls self.delta_record, which must be the
    override (the proxy binds the reference's functions to itself)."""
    seen: list[str] = []

    def delta_record(ops: Any, lp: Any, layer: Any, p: Any, x: Any) -> Any:
        seen.append("override")
        return NotImplemented

    model, x = cupy_on_numpy("adalora", "linear", kernels={"adalora": {"delta_record": delta_record}})
    model.eval()
    model("m", x)
    assert seen == ["override"]


def mixed_model(kinds: dict[str, str], layer: str = "linear") -> tuple[Any, Any, Any]:
    """Adapters (name -> kind) on one model for the CuPy engine (fakes, NumPy) and one for the NumPy backend."""
    models = []
    fakes = FakeMixed()
    table = {**fake_table(), MIXED: kernel_table(FakeLowRank(), fakes, FakeDora())[MIXED]}
    for backend, options in (
        (CupyBackend(), {"xp": np, "dtype": "float64", "kernels": table}),
        ("numpy", {}),
    ):
        case = KINDS["lora"].layers[layer]
        rng = np.random.default_rng(0)
        model = peftdecl.attach(
            case.random_state(rng), KINDS["lora"].spec, "first", backend=backend, **options
        )
        for seed, (name, kind) in enumerate(kinds.items(), start=1):
            rank = {"r": 1 + seed} if kind == "lora" else {}  # LoRA adapters of different ranks
            model.add_adapter(name, {**KINDS[kind].spec, **rank}, seed=seed)
        model.eval()
        models.append(model)
    return models[0], models[1], fakes


def test_mixed_batches_of_lora_adapters_run_the_mixed_kernel() -> None:
    cupy_model, numpy_model, fakes = mixed_model({"second": "lora", "third": "lora"})
    names = ["second", "__base__", "first", "second", "third", "first"]
    x = np.random.default_rng(2).normal(size=(6, 4, 5))  # 6 rows of 4 tokens
    result = cupy_model.engine.layer_forward("m", x, adapter_names=names)[0]
    expected = numpy_model.engine.layer_forward("m", x, adapter_names=names)[0]
    assert rel_err(to_numpy(result), to_numpy(expected)) <= TOL
    assert cupy_model.engine.mixed_calls == {"kernel": 1, "reference": 0}
    # adapters numbered in first-appearance order; each row's 4 tokens carry its index, base rows -1
    assert fakes.indices[0].tolist() == np.repeat([0, -1, 1, 0, 2, 1], 4).tolist()


def test_mixed_batches_with_another_kind_or_in_training_fall_back() -> None:
    cupy_model, numpy_model, _ = mixed_model({"hadamard": "loha"})
    names = ["hadamard", "first", "__base__"]
    x = np.random.default_rng(3).normal(size=(3, 5))
    result = cupy_model.engine.layer_forward("m", x, adapter_names=names)[0]
    expected = numpy_model.engine.layer_forward("m", x, adapter_names=names)[0]
    assert rel_err(to_numpy(result), to_numpy(expected)) <= TOL
    cupy_model.train()
    cupy_model.engine.layer_forward("m", x, adapter_names=["first", "first", "__base__"])
    assert cupy_model.engine.mixed_calls == {"kernel": 0, "reference": 2}


def test_mixed_batches_still_refuse_unknown_adapter_names() -> None:
    cupy_model, _, _ = mixed_model({})
    with pytest.raises(peftdecl.PeftdeclError, match="nope"):
        cupy_model.engine.layer_forward("m", np.zeros((2, 5)), adapter_names=["nope", "first"])


# -- (c) the reference path ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "layer"), [("lora", "linear"), ("dora", "conv2d"), ("loha", "linear"), ("oft", "linear")]
)
def test_without_kernels_the_engine_is_the_numpy_reference(kind: str, layer: str) -> None:
    fields = {"lora_dropout": 0.3} if kind in ("lora", "dora") else {}
    result = train_step(*cupy_on_numpy(kind, layer, fields, kernels={}))
    expected = train_step(*attach(kind, layer, "numpy", fields))
    assert_same(result, expected, tol=0.0)


# -- the backend's listing -------------------------------------------------------------------------------------
def test_without_a_device_the_backend_is_listed_unavailable_with_the_reason() -> None:
    from peftdecl_cupy._device import driver_device_count

    if driver_device_count()[0]:
        pytest.skip("a CUDA device is present")
    entry = peftdecl.backends()["cupy"]
    assert not entry.available and entry.reason
    assert entry.capabilities is not None and entry.capabilities.name == "cupy"
    with pytest.raises(peftdecl.BackendError, match="unavailable"):
        peftdecl.get_backend("cupy")


def test_importing_the_backend_imports_neither_cupy_nor_torch() -> None:
    code = (
        "import sys, peftdecl, peftdecl_cupy\n"
        "peftdecl.backends()\n"
        "print(sorted(m for m in ('cupy', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_several_adapters_on_a_layer_compose_as_in_the_reference() -> None:
    """compose.forward reads each kind's ``composition`` (a static method on DoRA): the proxy must hand it over
    unbound; LoRA's delta_record and DoRA's output pass run their (fake) kernels inside the composition."""
    models = []
    for backend, options in (
        (CupyBackend(), {"xp": np, "dtype": "float64", "kernels": fake_table()}),
        ("numpy", {}),
    ):
        case = KINDS["lora"].layers["linear"]
        model = peftdecl.attach(case.random_state(np.random.default_rng(0)), KINDS["lora"].spec, "plain",
                                backend=backend, **options)  # fmt: skip
        model.add_adapter("scaled", {**KINDS["dora"].spec, "lora_dropout": 0.2}, seed=1)
        model.set_adapter(["plain", "scaled"])
        models.append(model)
    x = np.random.default_rng(4).normal(size=(4, 5))
    assert_same(train_step(models[0], x), train_step(models[1], x))
    assert calls(models[0], "lora").get("delta_record") == 2
    assert calls(models[0], "dora").get("compose_output_record") == 1  # eval; training has dropout


def test_a_state_dict_of_cupy_arrays_is_the_backends_and_is_read_on_the_host() -> None:
    """Recognised by the arrays' type (no CuPy import); a stand-in with CuPy's module name and ``get()``."""
    from peftdecl_cupy import on_host

    device_array = type("ndarray", (), {"__module__": "cupy._core.core", "get": lambda self: np.ones((2, 3))})
    state = {"m.weight": device_array(), "m.bias": np.zeros(2)}
    assert CupyBackend().accepts({"m.weight": device_array()})
    assert not CupyBackend().accepts({"m.weight": np.ones((2, 3))}) and not CupyBackend().accepts({})
    host = on_host(state)
    assert isinstance(host["m.weight"], np.ndarray) and host["m.bias"] is state["m.bias"]
