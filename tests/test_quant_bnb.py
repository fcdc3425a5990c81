"""peftdecl.quant.bnb4 and peftdecl.quant.int8 against bitsandbytes (>= 0.50, CPU): packed NF4/FP4 codes, absmax,
double-quantisation state (offset, nested codes, nested absmax) and dequantised weights equal
``quantize_4bit``/``dequantize_4bit`` exactly, and int8 codes, SCB, outlier columns and dequantised weights equal
``int8_vectorwise_quant``/``int8_vectorwise_dequant`` exactly (np.array_equal everywhere, no tolerance), on
float32, float16 and bfloat16 weights (bfloat16 held as float32 values on our side; bitsandbytes upcasts them
exactly), random shapes (hypothesis), sizes not divisible by the block, all-zero, tiny and huge blocks.

bitsandbytes 0.50.2's CPU ``dequantize_4bit`` kernel indexes absmax per row when the last dimension is a multiple
of 16 but not of the block size, so it does not invert its own ``quantize_4bit`` there; wherever the last dimension
is not a multiple of the block the reference is bitsandbytes' own pure-torch ``dequantize_4bit`` kernel.

Without bitsandbytes: every code is the table entry nearest to ``w / absmax`` and bad input (non-finite values,
schemes, shapes) is refused with a PeftdeclError naming what was wrong.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftdecl.errors import PeftdeclError
from peftdecl.quant.bnb4 import (
    FP4_CODE,
    NF4_CODE,
    block_absmax,
    dequantize_4bit,
    dynamic_map,
    quantize_4bit,
    torch_float32_sum,
)
from peftdecl.quant.int8 import dequantize_int8, quantize_int8
from peftdecl.quant.scheme import QuantScheme
from tests.conftest import selected_backends

KINDS = ("nf4", "fp4")
BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = ("float32", "float16", "bfloat16")
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def bnb():
    """(torch, bitsandbytes.functional), or a skip when either is missing or PEFTDECL_TEST_BACKENDS leaves torch
    out."""
    if "torch" not in selected_backends():
        pytest.skip("PEFTDECL_TEST_BACKENDS leaves torch out, or torch is not installed")
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("bitsandbytes.functional")
    return torch, functional


def _torch_dtype(torch, dtype: str):
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def _ours_and_theirs(torch, w: np.ndarray, dtype: str):
    """The weight as our side takes it (float16 array, or bfloat16 values in float32) and as a torch tensor."""
    theirs = torch.from_numpy(w.astype(np.float32)).to(_torch_dtype(torch, dtype))
    ours = theirs.numpy() if dtype == "float16" else theirs.float().numpy()
    return ours, theirs


def _bnb_dequantize_4bit(torch, functional, packed, state):
    """bitsandbytes' dequantised weight. Where the last dimension is not a multiple of the block, its pure-torch
    kernel, run eagerly: the CPU kernel misplaces absmax there (see top) or, for odd sizes, itself falls back to
    that kernel under torch.compile (slow to compile, same arithmetic)."""
    if state.shape[-1] % state.blocksize != 0:
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

        absmax = state.absmax
        if state.nested:
            absmax = functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        eager = _dequantize_4bit_compute.__wrapped__  # the function under bitsandbytes' torch.compile wrapper
        return eager(packed.reshape(-1), absmax, state.code, state.blocksize, state.shape, state.dtype)
    return functional.dequantize_4bit(packed, state)


def assert_like_bnb_4bit(
    bnb, w: np.ndarray, kind: str, block: int, double: bool, dtype: str = "float32"
) -> None:
    """Our packed codes, absmax (or nested state) and dequantised weights equal bitsandbytes' bit for bit."""
    torch, functional = bnb
    ours_in, theirs_in = _ours_and_theirs(torch, w, dtype)
    packed, state = functional.quantize_4bit(
        theirs_in, blocksize=block, quant_type=kind, compress_statistics=double
    )
    scheme = QuantScheme(kind, block_size=block, double_quant=double)
    q = quantize_4bit(ours_in, scheme, torch_threads=torch.get_num_threads())
    assert q.codes.dtype == np.uint8 and np.array_equal(q.codes, packed.numpy())
    assert np.array_equal(q.scales, state.absmax.numpy())
    assert np.array_equal(q.extras["quant_map"], state.code.numpy())
    if double:
        assert q.extras["offset"] == state.offset.numpy()
        assert np.array_equal(q.extras["nested_absmax"], state.state2.absmax.numpy())
        assert np.array_equal(q.extras["nested_quant_map"], state.state2.code.numpy())
    theirs_out = _bnb_dequantize_4bit(torch, functional, packed, state)
    ours_out = dequantize_4bit(q)
    assert ours_out.dtype == np.float32 and ours_out.shape == tuple(theirs_out.shape)
    # bitsandbytes dequantises to the input dtype: its float32 result rounded once (so compare after rounding ours)
    assert np.array_equal(
        torch.from_numpy(ours_out).to(theirs_out.dtype).float().numpy(), theirs_out.float().numpy()
    )


def _weights(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ---------------------------------------------------------------- tables


def test_code_tables_equal_bitsandbytes(bnb):
    _, functional = bnb
    assert np.array_equal(NF4_CODE, functional.get_4bit_type("nf4", device="cpu").numpy())
    assert np.array_equal(FP4_CODE, functional.get_4bit_type("fp4", device="cpu").numpy())
    assert np.array_equal(dynamic_map(), functional.create_dynamic_map().numpy())


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_float32_sum_equals_torch(bnb, threads):
    """The offset's float32 mean depends on torch's summation order (and thread count above 32768 values)."""
    torch, _ = bnb
    rng = np.random.default_rng(threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in (1, 7, 8, 9, 31, 64, 127, 255, 1000, 4097, 32768, 32769, 70001):
            values = np.abs(rng.standard_normal(n) * rng.uniform(0.1, 100)).astype(np.float32)
            assert torch_float32_sum(values, threads) == torch.from_numpy(values).sum().numpy(), n
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- 4-bit against bitsandbytes


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("block", BLOCKS)
def test_4bit_every_block_size(bnb, kind, double, block):
    rng = np.random.default_rng(block)
    for shape in [(96, 64), (33, 70), (7, 5), (257,), (1, 1)]:
        assert_like_bnb_4bit(bnb, _weights(rng, shape, 0.05), kind, block, double)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_4bit_input_dtypes(bnb, dtype, kind):
    rng = np.random.default_rng(1)
    for shape, double in [((64, 128), True), ((40, 72), False), ((3, 31), True)]:
        assert_like_bnb_4bit(bnb, _weights(rng, shape, 2.0), kind, 64, double, dtype)


@FEW
@given(
    shape=st.tuples(st.integers(1, 48), st.integers(1, 300)),
    kind=st.sampled_from(KINDS),
    block=st.sampled_from((32, 64, 128, 256)),
    double=st.booleans(),
    log_scale=st.floats(-30, 30),
    seed=st.integers(0, 2**32 - 1),
)
def test_4bit_random_shapes(bnb, shape, kind, block, double, log_scale, seed):
    w = _weights(np.random.default_rng(seed), shape, 10.0**log_scale)
    assert_like_bnb_4bit(bnb, w, kind, block, double)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("double", [False, True])
def test_4bit_zero_tiny_and_huge_blocks(bnb, kind, double):
    rng = np.random.default_rng(7)
    w = _weights(rng, (12, 96), 1.0)
    w[0] = 0.0  # whole blocks of zeros (absmax 0)
    w[1, :40] = 1e-40  # subnormal absmax: its reciprocal overflows, 0 · inf gives NaN codes
    w[1, 40:] = 0.0
    w[2] = 3e36  # huge, though the absmax values still sum to a finite float32 (see the next test)
    w[3, ::2] = -3e36
    w[4, 5] = 3e38  # near float32's largest value
    w[-1, -8:] = 0.0  # zeros in the last block
    assert_like_bnb_4bit(bnb, w, kind, 64, double)
    assert_like_bnb_4bit(bnb, np.zeros((3, 70), np.float32), kind, 64, double)  # last partial block all zero
    assert_like_bnb_4bit(bnb, np.full((5, 64), -2.5, np.float32), kind, 64, double)  # constant absmax


def test_double_quant_overflow_refused(bnb):
    """Absmax values summing past float32's range: bitsandbytes stores an infinite offset and dequantises to
    non-finite values; we refuse with the reason instead (without double quantisation both agree)."""
    torch, functional = bnb
    w = np.ones((12, 96), np.float32)
    w[2] = 3e38
    packed, state = functional.quantize_4bit(torch.from_numpy(w), quant_type="nf4", compress_statistics=True)
    assert not bool(functional.dequantize_4bit(packed, state).isfinite().all())
    with pytest.raises(PeftdeclError, match=r"double quantisation .* shape \(12, 96\) overflows float32"):
        quantize_4bit(w, QuantScheme("nf4", double_quant=True))
    assert_like_bnb_4bit(bnb, w, "nf4", 64, False)


def test_4bit_offset_over_many_blocks(bnb):
    """More than 32768 absmax values: torch sums them on several threads; the offset still agrees."""
    rng = np.random.default_rng(3)
    assert_like_bnb_4bit(bnb, _weights(rng, (1024, 2112), 0.02), "nf4", 64, True)


# ---------------------------------------------------------------- int8 against bitsandbytes


def assert_like_bnb_int8(bnb, w: np.ndarray, threshold: float, dtype: str = "float32") -> None:
    torch, functional = bnb
    ours_in, theirs_in = _ours_and_theirs(torch, w, dtype)
    codes, scb, outlier_cols = functional.int8_vectorwise_quant(theirs_in.clone(), threshold=threshold)
    q = quantize_int8(ours_in, QuantScheme("int8", threshold=threshold))
    assert q.codes.dtype == np.int8 and np.array_equal(q.codes, codes.numpy())
    assert np.array_equal(q.scales, scb.numpy())
    expected_cols = np.zeros(0, np.int64) if outlier_cols is None else outlier_cols.numpy()
    assert np.array_equal(q.extras["outlier_cols"], expected_cols)
    assert np.array_equal(dequantize_int8(q), functional.int8_vectorwise_dequant(codes, scb).numpy())


@FEW
@given(
    shape=st.tuples(st.integers(1, 40), st.integers(1, 200)),
    threshold=st.sampled_from((0.0, 0.5, 2.0, 6.0)),
    dtype=st.sampled_from(DTYPES),
    log_scale=st.floats(-3, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_int8_random_shapes(bnb, shape, threshold, dtype, log_scale, seed):
    w = _weights(np.random.default_rng(seed), shape, 10.0**log_scale)
    assert_like_bnb_int8(bnb, w, threshold, dtype)


def test_int8_zero_tiny_and_huge_rows(bnb):
    w = _weights(np.random.default_rng(2), (6, 50), 1.0)
    w[0] = 0.0  # SCB 0: 0 · inf
    w[1] = 1e-40  # 127 / SCB overflows
    w[2, 3] = 3e38
    w[3] = np.arange(50, dtype=np.float32) - 24.5  # halves: the factor is exactly 1 when SCB is 127 ...
    w[3, 0] = 127.0  # ... so every entry is a tie, rounded half to even (-24.5 -> -24, -23.5 -> -24)
    for threshold in (0.0, 1.5):
        assert_like_bnb_int8(bnb, w, threshold)
    assert_like_bnb_int8(bnb, np.array([[0.25, -3.0, 7.0]], np.float32), 2.0)  # one row: outliers keep codes


# ---------------------------------------------------------------- without bitsandbytes


@pytest.mark.parametrize("kind", KINDS)
def test_4bit_codes_are_nearest_table_entries(kind):
    """Independent of bitsandbytes: each code is an entry of T nearest to w / absmax (ties either side), and the
    double-quantised absmax stays within one nested step of the exact absmax."""
    rng = np.random.default_rng(5)
    w = _weights(rng, (33, 100), 0.3)
    exact = quantize_4bit(w, QuantScheme(kind, block_size=64))
    table = NF4_CODE if kind == "nf4" else FP4_CODE
    packed = exact.codes.reshape(-1)
    codes = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)[: w.size]
    absmax = np.repeat(exact.scales, 64)[: w.size]
    ratio = w.reshape(-1).astype(np.float64) / absmax
    chosen = np.abs(ratio - table[codes])
    best = np.abs(ratio[:, None] - table[None, :]).min(axis=1)
    assert np.all(chosen <= best + 1e-6)  # float32 rounding of w / absmax
    nested = quantize_4bit(w, QuantScheme(kind, block_size=64, double_quant=True))
    # half the dynamic map's widest gap (0.0140625, near ±1) plus the lookup table's step 2/65535, times the
    # nested absmax (here one nested block), plus float32 rounding
    nested_absmax = np.abs(exact.scales - nested.extras["offset"]).max()
    bound = nested_absmax * (0.0140625 / 2 + 2 / 65535) * (1 + 1e-5)
    assert np.all(np.abs(block_absmax(nested).astype(np.float64) - exact.scales) <= bound)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_weights_refused(bad):
    w = np.ones((4, 64), np.float32)
    w[2, 5] = bad
    with pytest.raises(PeftdeclError, match=r"non-finite.*\(2, 5\)"):
        quantize_4bit(w, QuantScheme("nf4"))
    with pytest.raises(PeftdeclError, match=r"non-finite.*\(2, 5\)"):
        quantize_int8(w, QuantScheme("int8"))


def test_bad_schemes_and_shapes_refused():
    w = np.ones((4, 64), np.float32)
    with pytest.raises(PeftdeclError, match="block_size 100"):
        quantize_4bit(w, QuantScheme("nf4", block_size=100))
    with pytest.raises(PeftdeclError, match="'int8' is not 'nf4' or 'fp4'"):
        quantize_4bit(w, QuantScheme("int8"))
    with pytest.raises(PeftdeclError, match="'nf4' is not 'int8'"):
        quantize_int8(w, QuantScheme("nf4"))
    with pytest.raises(PeftdeclError, match="must be 2-D"):
        quantize_int8(np.ones(8, np.float32), QuantScheme("int8"))
    with pytest.raises(PeftdeclError, match="empty"):
        quantize_4bit(np.zeros((0, 64), np.float32), QuantScheme("fp4"))
    with pytest.raises(PeftdeclError, match="dtype int32"):
        quantize_4bit(np.ones((2, 64), np.int32), QuantScheme("fp4"))
