"""peftdecl.quant.affine against MLX: ``quantize_affine``/``dequantize_affine`` give the packed codes, scales, biases
and dequantised weights of ``mx.quantize``/``mx.dequantize`` (mode ``"affine"``) exactly (np.array_equal, no
tolerance), for bits 1–8 and group sizes 32, 64 and 128, on float32, float16 and bfloat16 weights (bfloat16 held
as float32 values on our side, MLX's bfloat16 outputs read back as float32, which is exact), on random weights
(hypothesis: shapes, magnitudes from 1e-38 to 1e30) and on all-zero, constant, tiny and huge groups.

Without MLX: the codes unpack to what was packed, every dequantised weight lies within half a step of its input
(|w − ŵ| ≤ |s|/2, up to the rounding of s and β to the dtype), and bad input (non-finite values, shapes, schemes)
is refused with a PeftdeclError naming the shape or setting.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftdecl.errors import PeftdeclError
from peftdecl.quant.affine import (
    dequantize_affine,
    pack_codes,
    quantize_affine,
    round_to_bfloat16,
    unpack_codes,
)
from peftdecl.quant.scheme import QuantScheme
from tests.conftest import selected_backends

BITS = (1, 2, 3, 4, 5, 6, 8)  # mlx 0.32 takes 1 bit too
GROUPS = (32, 64, 128)
DTYPES = ("float32", "float16", "bfloat16")


@pytest.fixture(scope="module")
def mx():
    """mlx.core, or a skip when MLX is missing or PEFTDECL_TEST_BACKENDS leaves it out."""
    if "mlx" not in selected_backends():
        pytest.skip("PEFTDECL_TEST_BACKENDS leaves mlx out, or MLX is not installed")
    return pytest.importorskip("mlx.core")


def _as_dtype(w: np.ndarray, dtype: str) -> np.ndarray:
    """``w`` as our side takes it: float16 arrays, bfloat16 values in float32."""
    if dtype == "float16":
        return w.astype(np.float16)
    return round_to_bfloat16(w) if dtype == "bfloat16" else w.astype(np.float32)


def _to_numpy(mx, a) -> np.ndarray:
    return np.array(a.astype(mx.float32)) if a.dtype == mx.bfloat16 else np.array(a)


def assert_like_mlx(mx, w: np.ndarray, bits: int, group_size: int, dtype: str) -> None:
    """Our codes, scales, biases and dequantised weights equal MLX's bit for bit (no tolerance)."""
    ours_in = _as_dtype(w, dtype)
    theirs_in = mx.array(ours_in).astype(mx.bfloat16) if dtype == "bfloat16" else mx.array(ours_in)
    codes, scales, biases = mx.quantize(theirs_in, group_size=group_size, bits=bits)
    scheme = QuantScheme("affine", bits=bits, group_size=group_size)
    q = quantize_affine(ours_in, scheme, dtype=dtype)  # type: ignore[arg-type]
    where = f"{dtype}, {bits} bits, group {group_size}, shape {w.shape}"
    assert q.codes.dtype == np.uint32 and np.array_equal(q.codes, np.array(codes)), where
    assert q.scales.dtype == np.dtype(np.float16 if dtype == "float16" else np.float32), where
    assert np.array_equal(q.scales, _to_numpy(mx, scales)), where
    assert np.array_equal(q.extras["biases"], _to_numpy(mx, biases)), where
    if w.size:  # mx.dequantize cannot reshape an empty array (mlx 0.32)
        expected = _to_numpy(mx, mx.dequantize(codes, scales, biases, group_size=group_size, bits=bits))
        got = dequantize_affine(q)
        assert got.dtype == expected.dtype and np.array_equal(got, expected), where


def _weights(seed: int, shape: tuple[int, ...], group_size: int) -> np.ndarray:
    """Gaussian weights whose first groups are all zero, constant, one-sided and tiny."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    rows = w.reshape(-1, shape[-1])
    if shape[-1] >= 2 * group_size and rows.shape[0] >= 3:
        rows[0, :group_size] = 0.0
        rows[1, :group_size] = -0.3
        rows[2, :group_size] = np.abs(rows[2, :group_size])  # the max is the larger edge
        rows[0, group_size : 2 * group_size] *= 1e-20
    return w


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_float32_equals_mlx(mx, bits: int, group_size: int) -> None:
    assert_like_mlx(mx, _weights(bits * group_size, (4, 256), group_size), bits, group_size, "float32")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_equals_mlx(mx, dtype: str, bits: int) -> None:
    for group_size in GROUPS:
        assert_like_mlx(mx, _weights(bits, (3, 2, 128), group_size), bits, group_size, dtype)


def test_float32_input_rounded_to_bfloat16_like_mlx(mx) -> None:
    """A float32 array with dtype="bfloat16" is rounded as ``astype(mx.bfloat16)`` rounds it."""
    w = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    q = quantize_affine(w, QuantScheme("affine", bits=4, group_size=32), dtype="bfloat16")
    codes, scales, _ = mx.quantize(mx.array(w).astype(mx.bfloat16), group_size=32, bits=4)
    assert np.array_equal(q.codes, np.array(codes))
    assert np.array_equal(q.scales, _to_numpy(mx, scales))
    assert np.array_equal(round_to_bfloat16(w), _to_numpy(mx, mx.array(w).astype(mx.bfloat16)))


@pytest.mark.parametrize(
    "values",
    [
        [0.0] * 64,  # all zero: scale −1e-7, bias 0
        [-0.0] * 64,
        [2.5] * 64,  # constant: the bias holds it exactly
        [-7.0] * 64,
        [1e-45] * 32 + [-3e-45] * 32,  # subnormal
        [1e-38, -1e-38] * 32,
        [3e38] * 32 + [1e38] * 32,  # huge, same sign: the range stays finite
        [-3.3e38, -1e38] * 32,
        list(np.linspace(-1.0, 1.0, 64)),  # |min| = |max|: the max is the edge
        list(np.linspace(-1.0, 0.999, 64)),
    ],
    ids=[
        "zero",
        "neg-zero",
        "const",
        "neg-const",
        "subnormal",
        "tiny",
        "huge",
        "neg-huge",
        "sym",
        "min-edge",
    ],
)
def test_edge_groups_equal_mlx(mx, values: list[float]) -> None:
    w = np.array([values, values[::-1]], dtype=np.float32)
    for bits in BITS:
        for group_size in (32, 64):
            assert_like_mlx(mx, w, bits, group_size, "float32")


def test_constant_and_zero_groups_are_exact() -> None:
    """The edge rule stores a constant group's value as its bias: dequantising gives it back exactly (down to
    |c| ≥ 5e-8; below, c / 1e-7 rounds to code 0 and the group becomes 0, as ``tiny`` above checks in MLX)."""
    w = np.array(
        [[0.0] * 32 + [0.37] * 32, [-5.5] * 32 + [6e-8] * 32, [3e38] * 32 + [-1e-3] * 32], np.float32
    )
    for bits in BITS:
        q = quantize_affine(w, QuantScheme("affine", bits=bits, group_size=32))
        assert np.array_equal(dequantize_affine(q), w), bits
    tiny = np.full((1, 32), 4e-8, np.float32)
    assert not dequantize_affine(quantize_affine(tiny, QuantScheme("affine", group_size=32))).any()


finite_floats = st.floats(-1.0, 1.0, width=32, allow_subnormal=False)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    bits=st.sampled_from(BITS),
    group_size=st.sampled_from(GROUPS),
    dtype=st.sampled_from(DTYPES),
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    n_groups=st.integers(1, 3),
    exponent=st.integers(-38, 30),
)
def test_random_weights_equal_mlx(mx, data, bits, group_size, dtype, lead, n_groups, exponent) -> None:
    shape = (*lead, n_groups * group_size)
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) * 10.0 ** (exponent if dtype != "float16" else min(max(exponent, -4), 4))
    # a few exact repeats and zeros, so ties and shared extremes occur
    w.reshape(-1)[rng.integers(0, w.size, size=4)] = data.draw(finite_floats, label="repeat")
    assert_like_mlx(mx, w.astype(np.float32), bits, group_size, dtype)


def test_shapes_like_mlx(mx) -> None:
    """MLX accepts ≥ 2-D weights whose last axis the group divides (even with no rows) and rejects the rest; we
    accept and reject the same shapes, naming the shape."""
    scheme = QuantScheme("affine", bits=4, group_size=32)
    assert_like_mlx(mx, np.zeros((0, 64), np.float32), 4, 32, "float32")
    assert_like_mlx(mx, _weights(7, (2, 3, 2, 64), 32), 4, 32, "float32")
    assert_like_mlx(mx, _weights(8, (64, 4), 32).T.copy(), 4, 32, "float32")
    for shape in [(64,), (2, 48), (3, 33)]:
        with pytest.raises(ValueError):
            mx.quantize(mx.zeros(shape), group_size=32, bits=4)
        with pytest.raises(PeftdeclError, match=r"\(" + ", ".join(str(d) for d in shape)):
            quantize_affine(np.zeros(shape, np.float32), scheme)


def test_non_contiguous_input_equals_contiguous() -> None:
    w = np.random.default_rng(5).standard_normal((64, 6)).astype(np.float32)
    scheme = QuantScheme("affine", bits=3, group_size=32)
    a, b = quantize_affine(w.T, scheme), quantize_affine(np.ascontiguousarray(w.T), scheme)
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.scales, b.scales)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_refused(bad: float) -> None:
    w = np.ones((2, 64), np.float32)
    w[1, 5] = bad
    with pytest.raises(PeftdeclError, match=r"shape \(2, 64\).*inf or NaN"):
        quantize_affine(w, QuantScheme("affine", bits=4, group_size=32))


def test_range_overflow_refused(mx) -> None:
    """A group from −3e38 to 3e38 overflows max − min: MLX stores an infinite scale and dequantises it to NaN;
    we refuse it, naming the group."""
    w = np.array([[3e38, -3e38] * 16 + [1.0] * 32], np.float32)
    codes, scales, biases = mx.quantize(mx.array(w), group_size=32, bits=4)
    assert np.isnan(np.array(mx.dequantize(codes, scales, biases, group_size=32, bits=4))[0, :32]).all()
    with pytest.raises(PeftdeclError, match=r"group \(0, 0\) spans more than float32's range"):
        quantize_affine(w, QuantScheme("affine", bits=4, group_size=32))


@pytest.mark.parametrize(
    ("scheme", "message"),
    [
        (QuantScheme("affine", bits=7), "bits"),
        (QuantScheme("affine", group_size=16), "group_size"),
        (QuantScheme("nf4"), "affine"),
    ],
)
def test_bad_scheme_refused(scheme: QuantScheme, message: str) -> None:
    with pytest.raises(PeftdeclError, match=message):
        quantize_affine(np.zeros((1, 128), np.float32), scheme)


def test_bad_dtype_refused() -> None:
    scheme = QuantScheme("affine")
    with pytest.raises(PeftdeclError, match="float64"):
        quantize_affine(np.zeros((1, 64)), scheme)
    with pytest.raises(PeftdeclError, match="float16"):
        quantize_affine(np.zeros((1, 64), np.float16), scheme, dtype="bfloat16")


def test_inconsistent_quantized_refused() -> None:
    q = quantize_affine(np.ones((2, 64), np.float32), QuantScheme("affine", bits=4, group_size=32))
    broken = type(q)(q.scheme, q.codes[:, :4], q.scales, q.shape, q.extras)
    with pytest.raises(PeftdeclError, match=r"codes of shape \(2, 8\), got \(2, 4\)"):
        dequantize_affine(broken)


@pytest.mark.parametrize("bits", BITS)
def test_pack_round_trip(bits: int) -> None:
    """Packing is a bijection on codes: unpacking gives back every code, and code j of a row sits in bits
    j·b … j·b + b − 1 of the row's little-endian stream (checked bit by bit through Python ints)."""
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=(3, 64)).astype(np.uint8)
    words = pack_codes(codes, bits)
    assert words.dtype == np.uint32 and words.shape == (3, 64 * bits // 32)
    assert np.array_equal(unpack_codes(words, bits), codes)
    stream = sum(int(word) << (32 * i) for i, word in enumerate(words[1]))
    assert all((stream >> (j * bits)) & ((1 << bits) - 1) == codes[1, j] for j in range(64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
def test_codes_pick_the_nearest_grid_point(bits: int, dtype: str) -> None:
    """Independently of MLX: each weight dequantises to the nearest of its group's 2ᵇⁱᵗˢ points s·q + β (ties
    either way; float64 grid, slack: one unit of the dtype's rounding of s·q + β, 2⁻⁸ bfloat16, 2⁻¹¹ float16,
    2⁻²⁴ float32, relative to |s|·2ᵇⁱᵗˢ + |β|). For float32 from 2 bits up, the group's edge of larger magnitude
    comes back exactly (unless it is within 5e-8 of 0, where the 1e-7 floor on the step rounds it to code 0)."""
    w = _as_dtype(_weights(11 * bits, (4, 128), 32), dtype)
    q = quantize_affine(w, QuantScheme("affine", bits=bits, group_size=32), dtype=dtype)  # type: ignore[arg-type]
    w_hat = dequantize_affine(q).astype(np.float64).reshape(4, 4, 32)
    groups = np.asarray(w, np.float64).reshape(4, 4, 32)
    scales = np.asarray(q.scales, np.float64)[..., None]
    biases = np.asarray(q.extras["biases"], np.float64)[..., None]
    grid = scales[..., None] * np.arange(1 << bits) + biases[..., None]  # (4, 4, 1, 2^bits)
    nearest = np.abs(groups[..., None] - grid).min(axis=-1)
    unit = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24}[dtype]
    slack = 2 * unit * (np.abs(scales) * (1 << bits) + np.abs(biases))
    assert (np.abs(groups - w_hat) <= nearest + slack).all()
    if bits > 1 and dtype == "float32":
        lo, hi = groups.min(axis=-1), groups.max(axis=-1)
        edge = np.where(np.abs(lo) > np.abs(hi), lo, hi)
        assert ((w_hat == edge[..., None]).any(axis=-1) | (np.abs(edge) < 5e-8)).all()
        assert (np.abs(edge) < 5e-8).sum() == 2  # _weights' all-zero and 1e-20 groups
