"""Kernels in front of the reference's kind ops, Thinc-style: a small table per kind of methods to override.

An override has the reference method's signature with the reference ops first: ``fn(ref, lp, layer, p, ...)``.
It returns the method's result, or ``NotImplemented`` when its kernel does not cover the case (a convolution,
an unsupported dtype, a rank past the kernel's limit); the reference method then runs. Every other method, and
every method the reference calls on itself, resolves through the :class:`KernelOps` proxy, so a reference method
that calls ``self.delta_record`` reaches the override too. Nothing here imports CuPy: the tests drive it with a
fake table on NumPy arrays.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Mapping
from typing import Any

from peftdecl_numpy.kinds.base import NumpyOps

Override = Callable[..., Any]
"""``fn(reference_ops, *args)`` -> the reference method's result, or ``NotImplemented``."""
KernelTable = Mapping[str, Mapping[str, Override]]
"""kind -> {method name -> override}."""


class KernelOps:
    """The ops of one kind: ``overrides`` first, the reference's methods (bound to this proxy) otherwise.

    ``calls`` counts, per method, how often an override ran its kernel (``"<method>"``) or fell back to the
    reference (``"<method>:reference"``): what the dispatch tests read."""

    def __init__(self, reference: NumpyOps, overrides: Mapping[str, Override]) -> None:
        self._reference = reference
        self._overrides = dict(overrides)
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        # only reached for names not set on the proxy itself: the kind's methods and attributes
        override = self._overrides.get(name)
        method = getattr(type(self._reference), name, None)
        if override is not None:
            return self._with_fallback(name, override, method)
        # a plain method is bound to this proxy, so its self-calls come back here; a static or class method,
        # a property or a data attribute is the reference's own
        raw = inspect.getattr_static(type(self._reference), name, None)
        if isinstance(raw, types.FunctionType):
            return types.MethodType(raw, self)
        return getattr(self._reference, name)

    def _with_fallback(self, name: str, override: Override, method: Any) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            result = override(self, *args, **kwargs)
            if result is not NotImplemented:
                self.calls[name] = self.calls.get(name, 0) + 1
                return result
            self.calls[f"{name}:reference"] = self.calls.get(f"{name}:reference", 0) + 1
            return method(self, *args, **kwargs)

        return run

    def reference(self, name: str) -> Callable[..., Any]:
        """The reference's own ``name``, bound to this proxy (an override calls it for the part it does not
        replace)."""
        return types.MethodType(getattr(type(self._reference), name), self)

    def __repr__(self) -> str:
        return f"KernelOps({type(self._reference).__name__}, overrides={sorted(self._overrides)})"


def kernel_ops(reference: NumpyOps, table: KernelTable, kind: str) -> NumpyOps | KernelOps:
    """``reference`` with ``table[kind]`` in front, or ``reference`` itself when the table has nothing for it."""
    overrides = table.get(kind)
    return KernelOps(reference, overrides) if overrides else reference
