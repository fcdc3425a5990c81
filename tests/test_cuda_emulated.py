"""The LoRA, mixed-batch and DoRA kernel sources run on the CPU through tests/cuda_emulator.py (g++, one OS
thread per CUDA thread), driven by the backend's own launch code (``CupyLowRank``, ``CupyMixed``, ``CupyDora``
with a NumPy stand-in for CuPy). What this checks: the sources' arithmetic and indexing (tiles, bounds past
odd sizes, strided operands, segments, the token split of the gradient sums) and the launches' grids and
arguments, against the float64 reference formula (float32 and float64 within 1e-5 relative, bfloat16 within
2e-2), every allocated buffer NaN-filled first. What it does not: the GPU itself (speed, memory model,
NVRTC) — tests/test_cuda_kernels_lora.py does that on a device. The last tests run the backend end to end on
the emulated kernels (the real kernel table, NumPy arrays) against the NumPy backend, gradients included.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests import cuda_emulator

if cuda_emulator.available():
    pytest.skip(str(cuda_emulator.available()), allow_module_level=True)

from peftdecl_cupy import dora as dora_wrappers
from peftdecl_cupy import lowrank, mixed

TOL = {"float32": 1e-5, "float64": 1e-5, "bfloat16": 2e-2}


@pytest.fixture(scope="module")
def libraries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder: Path = tmp_path_factory.mktemp("emulated")
    return {module: cuda_emulator.build(module, folder) for module in ("lora", "mixed_batch", "dora")}


@pytest.fixture(autouse=True)
def emulated(libraries: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The wrappers launch the emulated kernels on NumPy arrays; their allocations come NaN-filled."""
    shim = cuda_emulator.numpy_as_cupy()

    def poisoned(make: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            out = make(*args, **kwargs)
            out.fill(0x7FC0 if out.dtype == np.uint16 else np.nan)
            return out

        return run

    shim.empty, shim.empty_like = poisoned(np.empty), poisoned(np.empty_like)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cupy", shim)
    launch = lambda module, entry: cuda_emulator.EmulatedKernel(libraries[module], entry)  # noqa: E731
    for wrappers in (lowrank, mixed, dora_wrappers):
        monkeypatch.setattr(wrappers, "kernel", launch)
    monkeypatch.setattr(lowrank, "multiprocessors", lambda: 4)


def to_bf16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bfloat16 bits as uint16, their float64 values), rounding to nearest even."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return out, values(out, "bfloat16")


def values(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (np.asarray(x, dtype=np.uint32) << 16).view(np.float32).astype(np.float64)
    return np.asarray(x, dtype=np.float64)


def operand(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    if dtype == "bfloat16":
        return to_bf16(x)
    held = x.astype(dtype)
    return held, held.astype(np.float64)


def rel(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300))


def acc(dtype: str) -> type:
    return np.float64 if dtype == "float64" else np.float32


LOW = lowrank.CupyLowRank()
SHAPES = [(1, 1, 1), (37, 40, 33), (5, 70, 16)]  # (tokens, features, rank): past every tile edge


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize(("tokens", "k", "rank"), SHAPES)
def test_shrink(tokens: int, k: int, rank: int, dtype: str) -> None:
    rng = np.random.default_rng(tokens + k)
    x, xr = operand(rng.normal(size=(tokens, k)), dtype)
    a, ar = operand(rng.normal(size=(rank, k)), dtype)
    e = rng.uniform(0.5, 2.0, size=rank)
    assert rel(LOW.shrink(x, a, 0.7, rank_scale=e), 0.7 * (xr @ ar.T) * e) <= TOL[dtype]
    b, br = operand(rng.normal(size=(k, rank)), dtype)
    assert rel(LOW.shrink(x, b.T), xr @ br) <= TOL[dtype]  # A read through a transposed view


def test_q_k_v_share_one_shrink() -> None:
    rng = np.random.default_rng(9)
    x = rng.normal(size=(33, 40)).astype(np.float32)
    stacked = [rng.normal(size=(r, 40)).astype(np.float32) for r in (8, 16, 3)]
    for u, a in zip(LOW.shrink_stacked(x, stacked), stacked, strict=True):
        assert rel(u, x.astype(np.float64) @ a.T.astype(np.float64)) <= TOL["float32"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("tokens", "n", "rank"), SHAPES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_expand(tokens: int, n: int, rank: int, dtype: str, accumulate: bool) -> None:
    rng = np.random.default_rng(tokens * n + rank)
    u = rng.normal(size=(tokens, rank)).astype(acc(dtype))
    b, br = operand(rng.normal(size=(n, rank)), dtype)
    if accumulate:
        y, yr = operand(rng.normal(size=(tokens, n)), dtype)
    else:
        y, yr = sys.modules["cupy"].empty((tokens, n), dtype=b.dtype), np.zeros((tokens, n))
    LOW.expand(u, b, y, 1.3, accumulate=accumulate)
    assert rel(values(y, dtype), yr + 1.3 * u.astype(np.float64) @ br.T) <= TOL[dtype]
    # B read through a transposed view (the backward's dx = du A)
    a, ar = operand(rng.normal(size=(rank, n)), dtype)
    y2 = sys.modules["cupy"].empty((tokens, n), dtype=a.dtype)
    LOW.expand(u, a.T, y2, accumulate=False)
    assert rel(values(y2, dtype), u.astype(np.float64) @ ar) <= TOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("tokens", "n", "rank"), [(1, 1, 1), (300, 70, 33)])
def test_outer_with_the_token_sum_split(tokens: int, n: int, rank: int, dtype: str) -> None:
    rng = np.random.default_rng(tokens + n)
    u = rng.normal(size=(tokens, rank)).astype(acc(dtype))
    x, xr = operand(rng.normal(size=(tokens, n)), dtype)
    expected = 0.5 * u.astype(np.float64).T @ xr
    out = sys.modules["cupy"].empty((n, rank), dtype=x.dtype)  # written through .T, as dB is
    LOW.outer(u, x, out.T, 0.5)
    assert rel(values(out, dtype), expected.T) <= TOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("rows", "per_row"), [(3, 40), (6, 1)])  # segmented (prefill), gathered (decode)
def test_mixed_batch(dtype: str, rows: int, per_row: int) -> None:
    rng = np.random.default_rng(rows)
    k, n, ranks = 45, 70, [1, 7, 33]
    adapters, host = [], []
    for i, r in enumerate(ranks):
        (a, ar), (b, br) = operand(rng.normal(size=(r, k)), dtype), operand(rng.normal(size=(n, r)), dtype)
        adapters.append((a, b, 0.5 + i))
        host.append((ar, br, 0.5 + i))
    row_index = np.array([2, -1, 0, 1, 2, 0][:rows], dtype=np.int32)
    index = np.repeat(row_index, per_row)
    x, xr = operand(rng.normal(size=(rows * per_row, k)), dtype)
    y, yr = operand(rng.normal(size=(rows * per_row, n)), dtype)
    expected = yr.copy()
    for t, i in enumerate(index):
        if i >= 0:
            ar, br, s = host[i]
            expected[t] += s * (xr[t] @ ar.T) @ br.T
    mixed.CupyMixed().run(x, y, adapters, index)
    assert rel(values(y, dtype), expected) <= TOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dora_norm_and_output(dtype: str) -> None:
    rng = np.random.default_rng(5)
    rows, k, rank, tokens = 11, 37, 5, 9
    w_host, b_host = rng.normal(size=(rows, k)), rng.normal(size=(rows, rank))
    w_host[1], b_host[1] = 0.0, 0.0  # a zero row of W + s·B A: n = 0, g = 1
    (w, wr), (b, br) = operand(w_host, dtype), operand(b_host, dtype)
    a, ar = operand(rng.normal(size=(rank, k)), dtype)
    kernels = dora_wrappers.CupyDora(LOW)
    n = kernels.norm(w, a, b, 0.8)
    expected_n = np.linalg.norm(wr + 0.8 * br @ ar, axis=1)
    assert rel(n, expected_n) <= TOL[dtype] and n[1] == 0.0
    u = rng.normal(size=(tokens, rank)).astype(acc(dtype))
    (y, yr), (bias, bias_r) = (
        operand(rng.normal(size=(tokens, rows)), dtype),
        operand(rng.normal(size=rows), dtype),
    )
    m, mr = operand(rng.uniform(0.5, 2.0, size=rows), dtype)
    out, direction = kernels.output(u, b, y, bias, m, n, 0.8)
    d = yr - bias_r + 0.8 * u.astype(np.float64) @ br.T
    g = np.where(expected_n > 0, mr / np.where(expected_n > 0, expected_n, 1.0), 1.0)
    assert rel(values(direction, dtype), d) <= TOL[dtype]
    assert rel(values(out, dtype), bias_r + g * d) <= TOL[dtype]


# -- the backend end to end on the emulated kernels: the real table, wrappers and sources ----------------------
def engine_pair(spec: dict, dtype: str, seed: int = 0) -> tuple[Any, Any, np.ndarray]:
    """(the CuPy backend's model on NumPy arrays with the real kernel table, the NumPy backend's, an input)."""
    import peftdecl
    from peftdecl_cupy import CupyBackend

    rng = np.random.default_rng(seed)
    state = {"m.weight": rng.normal(size=(70, 45)), "m.bias": rng.normal(size=70)}
    ours = peftdecl.attach(state, spec, backend=CupyBackend(), xp=np, dtype=dtype, seed=seed)
    reference = peftdecl.attach(state, spec, backend="numpy", seed=seed)
    return ours, reference, rng.normal(size=(2, 9, 45))


def forward_backward(model: Any, x: np.ndarray, dy: np.ndarray) -> dict[str, np.ndarray]:
    y, tape = model.engine.layer_forward("m", x)
    grads = model.engine.layer_backward("m", tape, dy)
    return {"output": np.asarray(y, dtype=np.float64)} | {
        k: np.asarray(v, dtype=np.float64) for k, v in grads.items() if v is not None
    }


def kernel_calls(model: Any, kind: str) -> dict[str, int]:
    return dict(model.engine.kind_ops(kind).calls)


LORA = {"peft_type": "LORA", "r": 33, "lora_alpha": 16, "target_modules": ["m"], "init_lora_weights": False}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    ("spec", "kind", "expected_calls"),
    [
        (LORA, "lora", {"record": 1, "backward": 1}),
        (
            {**LORA, "use_dora": True},
            "dora",
            {"compose_output_record": 1, "compose_output_backward": 1, "weight_norm": 1},
        ),
        (
            {"peft_type": "ADALORA", "init_r": 6, "target_r": 4, "lora_alpha": 12, "total_step": 10,
             "target_modules": ["m"], "init_lora_weights": False},
            "adalora",
            {"delta_record": 1, "delta_backward": 1},
        ),
    ],
    ids=["lora", "dora", "adalora"],
)  # fmt: skip
def test_the_backend_on_emulated_kernels_matches_the_reference(
    spec: dict, kind: str, expected_calls: dict, dtype: str
) -> None:
    ours, reference, x = engine_pair(spec, dtype)
    dy = np.random.default_rng(1).normal(size=(2, 9, 70))
    result, expected = forward_backward(ours, x, dy), forward_backward(reference, x, dy)
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert rel(result[key], value) <= TOL[dtype], key
    assert kernel_calls(ours, kind) == expected_calls


@pytest.mark.parametrize("per_row", [40, 1])  # segmented, gathered
def test_mixed_batches_on_emulated_kernels_match_the_reference(per_row: int) -> None:
    ours, reference, _ = engine_pair({**LORA, "r": 4}, "float32")
    for seed, (name, rank) in enumerate((("b", 33), ("c", 1)), start=1):
        for model in (ours, reference):
            model.add_adapter(name, {**LORA, "r": rank}, seed=seed)
    names = ["c", "__base__", "default", "b", "c", "default"]
    x = np.random.default_rng(3).normal(size=(6, per_row, 45))
    for model in (ours, reference):
        model.eval()
    result = ours.engine.layer_forward("m", x, adapter_names=names)[0]
    expected = reference.engine.layer_forward("m", x, adapter_names=names)[0]
    assert rel(np.asarray(result, dtype=np.float64), expected) <= TOL["float32"]
    assert ours.engine.mixed_calls == {"kernel": 1, "reference": 0}
