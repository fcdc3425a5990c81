"""The CuPy backend's LoRA, mixed-batch and DoRA kernels on a CUDA device (skipped without one).

Each kernel runs on fresh random inputs against the float64 NumPy reference formula: float32 (and float64)
within 1e-5 relative, bfloat16 within 2e-2 (its inputs rounded to bfloat16 first, so the error is the
kernel's accumulation and output rounding). Every buffer the kernels allocate is NaN-filled first (``cupy.empty``
is patched), so an element a kernel leaves unwritten shows. Sizes are odd (past every tile edge), ranks 1-128,
mixed batches hold several adapters of different ranks and base rows. Through the backend, LoRA, AdaLoRA and
DoRA outputs and gradients are compared with torch autograd of the reference formula in float64, and the
kernel path is asserted to have run (not the reference fallback).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")
from peftdecl_cupy._device import unavailable_reason  # noqa: E402

_why = unavailable_reason()
if _why:
    pytest.skip(f"no CUDA device for CuPy: {_why}", allow_module_level=True)

import peftdecl  # noqa: E402
from peftdecl.plan.kinds.dora import MAGNITUDE  # noqa: E402
from peftdecl_cupy import CupyBackend  # noqa: E402
from peftdecl_cupy.dispatch import KernelOps  # noqa: E402
from peftdecl_cupy.dora import CupyDora  # noqa: E402
from peftdecl_cupy.lowrank import CupyLowRank  # noqa: E402
from peftdecl_cupy.mixed import CupyMixed  # noqa: E402

TOL = {"float32": 1e-5, "float64": 1e-5, "bfloat16": 2e-2}
DTYPES = ["float32", "bfloat16", "float64"]
LOW = CupyLowRank()


def rel(actual: Any, expected: np.ndarray) -> float:
    """‖actual − expected‖ / ‖expected‖ (NaN anywhere gives NaN, which fails every ≤)."""
    actual = np.asarray(
        cupy.asnumpy(actual) if isinstance(actual, cupy.ndarray) else actual, dtype=np.float64
    )
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300))


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even), as uint16."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)


def device(x: np.ndarray, dtype: str) -> tuple[Any, np.ndarray]:
    """(the array on the device in ``dtype``, the float64 values it holds)."""
    if dtype == "bfloat16":
        bits = to_bf16_bits(x)
        return cupy.asarray(bits), from_bf16_bits(bits).astype(np.float64)
    on = cupy.asarray(x.astype(dtype))
    return on, cupy.asnumpy(on).astype(np.float64)


def values(x: Any, dtype: str) -> np.ndarray:
    host = cupy.asnumpy(x)
    return from_bf16_bits(host).astype(np.float64) if dtype == "bfloat16" else host.astype(np.float64)


@pytest.fixture(autouse=True)
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cupy.empty / empty_like is NaN-filled (bfloat16 bits: a quiet NaN)."""
    empty, empty_like = cupy.empty, cupy.empty_like

    def fill(a: Any) -> Any:
        if a.dtype == np.uint16:
            a.fill(0x7FC0)
        elif a.dtype.kind == "f":
            a.fill(np.nan)
        return a

    monkeypatch.setattr(cupy, "empty", lambda *s, **k: fill(empty(*s, **k)))
    monkeypatch.setattr(cupy, "empty_like", lambda *s, **k: fill(empty_like(*s, **k)))


SHAPES = [(1, 1, 1), (37, 5, 16), (301, 129, 33), (70, 200, 128), (129, 64, 7)]  # (tokens, K, rank)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "k", "rank"), SHAPES)
def test_shrink(tokens: int, k: int, rank: int, dtype: str) -> None:
    rng = np.random.default_rng(tokens + k + rank)
    x, xr = device(rng.normal(size=(tokens, k)), dtype)
    a, ar = device(rng.normal(size=(rank, k)), dtype)
    e = rng.uniform(0.5, 2.0, size=rank)
    u = LOW.shrink(x, a, 0.7, rank_scale=cupy.asarray(e))
    assert rel(u, 0.7 * (xr @ ar.T) * e) <= TOL[dtype]
    # A read through a transposed view (the backward's du = s·dy B)
    b, br = device(rng.normal(size=(k, rank)), dtype)
    assert rel(LOW.shrink(x, b.T), xr @ br) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "n", "rank"), SHAPES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_expand(tokens: int, n: int, rank: int, dtype: str, accumulate: bool) -> None:
    rng = np.random.default_rng(tokens * n + rank)
    acc = np.float64 if dtype == "float64" else np.float32
    u_host = rng.normal(size=(tokens, rank)).astype(acc)
    b, br = device(rng.normal(size=(n, rank)), dtype)
    if accumulate:
        y, yr = device(rng.normal(size=(tokens, n)), dtype)
    else:
        y, yr = cupy.empty((tokens, n), dtype=b.dtype), np.zeros((tokens, n))  # NaN-poisoned: never read
    LOW.expand(cupy.asarray(u_host), b, y, 1.3, accumulate=accumulate)
    assert rel(values(y, dtype), yr + 1.3 * u_host.astype(np.float64) @ br.T) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "n", "rank"), [*SHAPES, (4097, 65, 16)])
def test_outer(tokens: int, n: int, rank: int, dtype: str) -> None:
    rng = np.random.default_rng(tokens + 3 * n + rank)
    acc = np.float64 if dtype == "float64" else np.float32
    u_host = rng.normal(size=(tokens, rank)).astype(acc)
    x, xr = device(rng.normal(size=(tokens, n)), dtype)
    expected = 0.5 * u_host.astype(np.float64).T @ xr
    out = cupy.empty((rank, n), dtype=x.dtype)
    assert rel(values(LOW.outer(cupy.asarray(u_host), x, out, 0.5), dtype), expected) <= TOL[dtype]
    transposed = cupy.empty((n, rank), dtype=x.dtype)  # written through .T, as dB is
    LOW.outer(cupy.asarray(u_host), x, transposed.T, 0.5)
    assert rel(values(transposed, dtype), expected.T) <= TOL[dtype]


def test_stacked_shrink_reads_one_input_for_q_k_v() -> None:
    rng = np.random.default_rng(7)
    x = cupy.asarray(rng.normal(size=(33, 40)).astype(np.float32))
    mats = [cupy.asarray(rng.normal(size=(r, 40)).astype(np.float32)) for r in (8, 16, 3)]
    for u, a in zip(LOW.shrink_stacked(x, mats), mats, strict=True):
        assert rel(u, cupy.asnumpy(x).astype(np.float64) @ cupy.asnumpy(a).astype(np.float64).T) <= 1e-5


def mixed_case(dtype: str, rows: int, tokens_per_row: int, seed: int) -> tuple[Any, ...]:
    rng = np.random.default_rng(seed)
    k, n = 67, 131
    ranks = [1, 7, 16, 64, 128]
    adapters, host = [], []
    for i, r in enumerate(ranks):
        a, ar = device(rng.normal(size=(r, k)), dtype)
        b, br = device(rng.normal(size=(n, r)), dtype)
        adapters.append((a, b, 0.5 + i))
        host.append((ar, br, 0.5 + i))
    row_index = rng.integers(-1, len(ranks), size=rows).astype(np.int32)
    index = np.repeat(row_index, tokens_per_row)
    x, xr = device(rng.normal(size=(rows * tokens_per_row, k)), dtype)
    y, yr = device(rng.normal(size=(rows * tokens_per_row, n)), dtype)
    expected = yr.copy()
    for t, i in enumerate(index):
        if i >= 0:
            ar, br, s = host[i]
            expected[t] += s * (xr[t] @ ar.T) @ br.T
    return x, y, adapters, index, expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "tokens_per_row"), [(16, 67), (3, 200), (64, 1), (9, 1)])
def test_mixed_batch(dtype: str, rows: int, tokens_per_row: int) -> None:
    """Prefill shapes take the segmented kernels, decode shapes the gathered ones (planning.prefer_segments)."""
    x, y, adapters, index, expected = mixed_case(dtype, rows, tokens_per_row, rows + tokens_per_row)
    CupyMixed().run(x, y, adapters, index)
    assert rel(values(y, dtype), expected) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "k", "rank"), [(1, 1, 1), (97, 300, 16), (64, 33, 128), (5, 4096, 3)])
def test_dora_norm(dtype: str, rows: int, k: int, rank: int) -> None:
    rng = np.random.default_rng(rows + k + rank)
    w_host = rng.normal(size=(rows, k))
    b_host = rng.normal(size=(rows, rank))
    if rows > 2:  # a zero row of W + s·B A: n = 0 there, never a NaN
        w_host[1], b_host[1] = 0.0, 0.0
    w, wr = device(w_host, dtype)
    a, ar = device(rng.normal(size=(rank, k)), dtype)
    b, br = device(b_host, dtype)
    n = CupyDora(LOW).norm(w, a, b, 0.8)
    expected = np.linalg.norm(wr + 0.8 * br @ ar, axis=1)
    assert rel(n, expected) <= TOL[dtype]
    assert np.isfinite(cupy.asnumpy(n)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_dora_output(dtype: str, bias: bool) -> None:
    rng = np.random.default_rng(11)
    tokens, n_out, rank = 77, 131, 16
    acc = np.float64 if dtype == "float64" else np.float32
    u_host = rng.normal(size=(tokens, rank)).astype(acc)
    b, br = device(rng.normal(size=(n_out, rank)), dtype)
    y, yr = device(rng.normal(size=(tokens, n_out)), dtype)
    bias_d, bias_r = device(rng.normal(size=n_out), dtype) if bias else (None, np.zeros(n_out))
    m, mr = device(rng.uniform(0.5, 2.0, size=n_out), dtype)
    norm_host = rng.uniform(0.5, 2.0, size=n_out)
    norm_host[3] = 0.0  # g = 1 on a zero-norm row
    out, direction = CupyDora(LOW).output(
        cupy.asarray(u_host), b, y, bias_d, m, cupy.asarray(norm_host.astype(acc)), 0.6
    )
    d = yr - bias_r + 0.6 * u_host.astype(np.float64) @ br.T
    g = np.where(norm_host > 0, mr / np.where(norm_host > 0, norm_host, 1.0), 1.0)
    assert rel(values(direction, dtype), d) <= TOL[dtype]
    assert rel(values(out, dtype), bias_r + g * d) <= TOL[dtype]


# -- through the backend: outputs and gradients vs torch autograd of the reference formula -----------------------
def attach(spec: dict, rank: int, seed: int = 0) -> tuple[Any, dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    state = {"m.weight": rng.normal(size=(131, 67)), "m.bias": rng.normal(size=131)}
    model = peftdecl.attach(state, {**spec, "r": rank}, backend=CupyBackend(), dtype="float32", seed=seed)
    return model, state, rng.normal(size=(3, 41, 67))


def grads_of(model: Any, x: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    model.train()
    y, tape = model.engine.layer_forward("m", cupy.asarray(x.astype(np.float32)))
    grads = model.engine.layer_backward("m", tape, cupy.asarray(dy.astype(np.float32)))
    return cupy.asnumpy(y).astype(np.float64), {
        k: cupy.asnumpy(v).astype(np.float64) for k, v in grads.items() if v is not None
    }


def torch_grads(
    formula: Any, x: np.ndarray, dy: np.ndarray, params: dict[str, np.ndarray]
) -> tuple[np.ndarray, dict]:
    torch = pytest.importorskip("torch")
    leaves = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    y = formula(xt, leaves, torch)
    y.backward(torch.tensor(dy, dtype=torch.float64))
    return y.detach().numpy(), {"input": xt.grad.numpy(), **{k: t.grad.numpy() for k, t in leaves.items()}}


def trained(model: Any) -> dict[str, np.ndarray]:
    return {k: cupy.asnumpy(v).astype(np.float64) for k, v in model.trainable_parameters().items()}


def kernel_calls(model: Any, kind: str) -> dict[str, int]:
    ops = model.engine.kind_ops(kind)
    assert isinstance(ops, KernelOps)
    return ops.calls


@pytest.mark.parametrize("rank", [1, 16, 128])
def test_lora_layer_matches_torch_autograd(rank: int) -> None:
    spec = {"peft_type": "LORA", "lora_alpha": 2 * rank, "target_modules": ["m"], "init_lora_weights": False}
    model, state, x = attach(spec, rank)
    params = trained(model)
    dy = np.random.default_rng(5).normal(size=(3, 41, 131))
    y, grads = grads_of(model, x, dy)
    ka, kb = "m.lora_A.weight", "m.lora_B.weight"
    w, bias = state["m.weight"], state["m.bias"]

    def formula(xt: Any, p: dict, torch: Any) -> Any:
        return xt @ torch.tensor(w).T + torch.tensor(bias) + 2.0 * (xt @ p[ka].T) @ p[kb].T

    y_ref, g_ref = torch_grads(formula, x, dy, params)
    assert rel(y, y_ref) <= 1e-5
    for key in ("input", ka, kb):
        assert rel(grads[key], g_ref[key]) <= 1e-5, key
    assert kernel_calls(model, "lora") == {"record": 1, "backward": 1}


def test_adalora_matches_the_float64_reference() -> None:
    """Output and gradients (Q, Λ, P, input) against the NumPy backend's explicit float64 gradients (those are
    checked against torch autograd by the reference's own tests)."""
    spec = {"peft_type": "ADALORA", "init_r": 12, "target_r": 8, "lora_alpha": 24, "total_step": 10,
            "target_modules": ["m"], "init_lora_weights": False}  # fmt: skip
    rng = np.random.default_rng(0)
    state = {"m.weight": rng.normal(size=(131, 67)), "m.bias": rng.normal(size=131)}
    model = peftdecl.attach(state, spec, backend=CupyBackend(), dtype="float32")
    reference = peftdecl.attach(state, spec, backend="numpy")
    x, dy = rng.normal(size=(2, 45, 67)), rng.normal(size=(2, 45, 131))
    y, grads = grads_of(model, x, dy)
    y_ref, tape = reference.engine.layer_forward("m", x)
    expected = reference.engine.layer_backward("m", tape, dy)
    assert rel(y, np.asarray(y_ref)) <= 1e-5
    for key, value in expected.items():
        if value is not None:
            assert rel(grads[key], np.asarray(value)) <= 1e-5, key
    assert kernel_calls(model, "adalora") == {"delta_record": 1, "delta_backward": 1}


@pytest.mark.parametrize("rank", [2, 64])
def test_dora_layer_matches_torch_autograd(rank: int) -> None:
    spec = {"peft_type": "LORA", "use_dora": True, "lora_alpha": rank, "target_modules": ["m"],
            "init_lora_weights": False}  # fmt: skip
    model, state, x = attach(spec, rank)
    magnitude = model.trainable_parameters()[f"m.{MAGNITUDE}"]
    magnitude *= cupy.asarray(
        np.random.default_rng(3).uniform(0.5, 1.5, size=magnitude.shape).astype(np.float32)
    )
    params = trained(model)
    dy = np.random.default_rng(6).normal(size=(3, 41, 131))
    model.eval()  # the kernels' output pass runs without dropout: eval forward, then backward of its tape
    y_t, tape = model.engine.layer_forward("m", cupy.asarray(x.astype(np.float32)))
    grads = model.engine.layer_backward("m", tape, cupy.asarray(dy.astype(np.float32)))
    ka, kb, km = "m.lora_A.weight", "m.lora_B.weight", f"m.{MAGNITUDE}"
    w, bias = state["m.weight"], state["m.bias"]

    def formula(xt: Any, p: dict, torch: Any) -> Any:
        wt = torch.tensor(w)
        delta = p[kb] @ p[ka]
        n = torch.linalg.vector_norm(wt + delta, dim=1).detach()  # n held constant (the paper's §4.3)
        return torch.tensor(bias) + (p[km] / n) * (xt @ wt.T + (xt @ p[ka].T) @ p[kb].T)

    y_ref, g_ref = torch_grads(formula, x, dy, params)
    assert rel(y_t, y_ref) <= 1e-5
    for key in ("input", ka, kb, km):
        assert rel(cupy.asnumpy(grads[key]).astype(np.float64), g_ref[key]) <= 1e-5, key
    assert kernel_calls(model, "dora") == {
        "compose_output_record": 1,
        "compose_output_backward": 1,
        "weight_norm": 1,
    }


def test_mixed_batch_through_the_backend() -> None:
    rng = np.random.default_rng(0)
    state = {"m.weight": rng.normal(size=(131, 67))}
    base = {"peft_type": "LORA", "target_modules": ["m"], "init_lora_weights": False}
    models = [peftdecl.attach(state, {**base, "r": 4}, "a", backend=CupyBackend(), dtype="float32"),
              peftdecl.attach(state, {**base, "r": 4}, "a", backend="numpy")]  # fmt: skip
    for model in models:
        model.add_adapter("b", {**base, "r": 32}, seed=1)
        model.add_adapter("c", {**base, "r": 128}, seed=2)
        model.eval()
    names = ["b", "__base__", "a", "c", "a", "b", "c", "__base__"]
    for x in (rng.normal(size=(8, 70, 67)), rng.normal(size=(8, 67))):  # prefill and decode
        y = models[0].engine.layer_forward("m", cupy.asarray(x.astype(np.float32)), adapter_names=names)[0]
        expected = models[1].engine.layer_forward("m", x, adapter_names=names)[0]
        assert rel(y, np.asarray(expected)) <= 1e-5
    assert models[0].engine.mixed_calls == {"kernel": 2, "reference": 0}
