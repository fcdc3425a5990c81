"""The few array operations the reference needs beyond the array API standard, in one place.

The reference's math runs on any array-API namespace ``xp`` (NumPy by default, ``array_api_strict``, torch through
array_api_compat, CuPy). What the standard lacks — einsum, scatter-add, Kronecker products, padding — lives here,
each with a generic version written in standard operations and the namespace's own where it has one (NumPy's
``einsum``/``kron``/``add.at``, torch's and CuPy's ``einsum``). These are the hot paths a backend built on the
reference replaces with its library's kernels; the math modules stay as they are.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence
from types import EllipsisType, ModuleType
from typing import Any

import array_api_compat
import numpy as np
import numpy.typing as npt

Array = Any
"""An array of the namespace in use (NumPy, CuPy, array_api_strict ...): the standard has no common type."""
Namespace = ModuleType
"""An array-API namespace module (its functions are looked up by name, so typed loosely by ModuleType)."""


def namespace(*arrays: Array) -> Namespace:
    """The array-API namespace of ``arrays`` (NumPy arrays get array_api_compat's NumPy namespace)."""
    return array_api_compat.array_namespace(*arrays)


def resolve(xp: Namespace | None) -> Namespace:
    """``xp`` made standard-compliant (a bare ``numpy`` or ``cupy`` module is wrapped); NumPy when None."""
    if xp is None:
        xp = np
    return array_api_compat.array_namespace(xp.zeros(0))


def is_numpy(xp: Namespace) -> bool:
    return bool(array_api_compat.is_numpy_namespace(xp))


def to_numpy(x: Array) -> np.ndarray:
    """A host NumPy copy of ``x`` in its own dtype."""
    if isinstance(x, np.ndarray):
        return np.array(x)
    if hasattr(x, "get"):  # CuPy: device to host
        return np.array(x.get())
    if hasattr(x, "detach"):  # torch, wherever the tensor lives
        return np.array(x.detach().cpu().numpy())
    return np.array(np.from_dlpack(x))


def einsum(subscripts: str, *operands: Array, optimize: bool = False) -> Array:
    """Einstein summation; the namespace's own where it has one (``optimize`` picks NumPy's contraction order),
    else every operand broadcast over all indices, multiplied and summed (fine for the reference's small
    contractions)."""
    xp = namespace(*operands)
    own = getattr(xp, "einsum", None)
    if own is not None:
        return own(subscripts, *operands, optimize=optimize) if is_numpy(xp) else own(subscripts, *operands)
    inputs, output = _expand_ellipsis(subscripts, operands)
    letters = list(dict.fromkeys("".join(inputs)))
    product = None
    for labels, operand in zip(inputs, operands, strict=True):
        term = _broadcast_to_letters(xp, operand, labels, letters)
        product = term if product is None else product * term
    assert product is not None
    summed = tuple(i for i, letter in enumerate(letters) if letter not in output)
    if summed:
        product = xp.sum(product, axis=summed)
    kept = [letter for letter in letters if letter in output]
    return xp.permute_dims(product, tuple(kept.index(letter) for letter in output))


def _expand_ellipsis(subscripts: str, operands: Sequence[Array]) -> tuple[list[str], str]:
    left, _, output = subscripts.replace(" ", "").partition("->")
    inputs = left.split(",")
    spare = [c for c in string.ascii_letters if c not in subscripts]
    width = max(
        (op.ndim - len(s.replace("...", "")) for s, op in zip(inputs, operands, strict=True)), default=0
    )
    fill = "".join(spare[:width])
    expanded = []
    for labels, operand in zip(inputs, operands, strict=True):
        own = operand.ndim - len(labels.replace("...", ""))
        expanded.append(labels.replace("...", fill[width - own :]) if "..." in labels else labels)
    return expanded, output.replace("...", fill)


def _broadcast_to_letters(xp: Namespace, x: Array, labels: str, letters: list[str]) -> Array:
    order = sorted(range(len(labels)), key=lambda i: letters.index(labels[i]))
    x = xp.permute_dims(x, tuple(order))
    present = {labels[i]: x.shape[n] for n, i in enumerate(order)}
    return xp.reshape(x, tuple(present.get(letter, 1) for letter in letters))


def take_rows(table: Array, indices: Array) -> Array:
    """``table[indices]`` for integer ``indices`` of any shape (an embedding lookup)."""
    xp = namespace(table, indices)
    flat = xp.take(table, xp.reshape(indices, (-1,)), axis=0)
    return xp.reshape(flat, (*indices.shape, *table.shape[1:]))


def add_at_rows(target: Array, indices: Array, values: Array) -> Array:
    """``target`` with ``values[i]`` added to row ``indices[i]`` (repeated indices accumulate): the embedding
    gradient. NumPy scatters; elsewhere a one-hot product does it in standard operations."""
    xp = namespace(target, values)
    flat = xp.reshape(indices, (-1,))
    rows = xp.reshape(values, (flat.shape[0], -1))
    if is_numpy(xp):
        out = target.copy()
        np.add.at(out, flat, rows)
        return out
    one_hot = xp.astype(
        xp.reshape(flat, (-1, 1)) == xp.reshape(xp.arange(target.shape[0], dtype=flat.dtype), (1, -1)),
        target.dtype,
    )
    return target + xp.reshape(xp.matrix_transpose(one_hot) @ rows, target.shape)


def kron(a: Array, b: Array) -> Array:
    """The Kronecker product; operands of unequal rank get leading unit axes, as ``np.kron``."""
    xp = namespace(a, b)
    # NumPy's and CuPy's own; torch.kron refuses some strided operands of unequal rank, so it takes the generic path
    if is_numpy(xp) or array_api_compat.is_cupy_namespace(xp):
        return xp.kron(a, b)
    nd = max(a.ndim, b.ndim)
    a = xp.reshape(a, (1,) * (nd - a.ndim) + tuple(a.shape))
    b = xp.reshape(b, (1,) * (nd - b.ndim) + tuple(b.shape))
    # K[i·|b| + j] = a[i] · b[j] along every axis: interleave the axes of a and b, multiply, merge pairs
    a_full = xp.reshape(a, tuple(d for n in a.shape for d in (n, 1)))
    b_full = xp.reshape(b, tuple(d for n in b.shape for d in (1, n)))
    return xp.reshape(a_full * b_full, tuple(m * n for m, n in zip(a.shape, b.shape, strict=True)))


def pad_spatial(x: Array, padding: Sequence[int]) -> Array:
    """Zero padding of every axis after the first two by ``padding[i]`` on both sides."""
    if not any(padding):
        return x
    xp = namespace(x)
    shape = (*x.shape[:2], *(n + 2 * p for n, p in zip(x.shape[2:], padding, strict=True)))
    out = xp.zeros(shape, dtype=x.dtype)
    out[spatial(slice(p, p + n) for p, n in zip(padding, x.shape[2:], strict=True))] = x
    return out


def spatial(slices: Iterable[slice]) -> tuple[slice, ...]:
    """The index ``[:, :, *slices]``: every sample and channel, ``slices`` over the spatial axes."""
    return (slice(None), slice(None), *slices)


def kernel_at(offset: Iterable[int]) -> tuple[EllipsisType | int, ...]:
    """The index ``[..., *offset]``: one kernel position of a convolution weight."""
    return (Ellipsis, *offset)


def swap_last(x: Array) -> Array:
    """Each matrix of a stack [..., m, n] transposed."""
    return namespace(x).matrix_transpose(x)


def eye_like(x: Array, n: int) -> Array:
    """The identity [n, n] in ``x``'s namespace and dtype."""
    xp = namespace(x)
    return xp.eye(n, dtype=x.dtype)


def from_host(xp: Namespace, value: npt.ArrayLike, dtype: object = None) -> Array:
    """A host value (NumPy array, list, scalar) as an array of ``xp``."""
    return xp.asarray(np.asarray(value) if not isinstance(value, (bool, int, float)) else value, dtype=dtype)
