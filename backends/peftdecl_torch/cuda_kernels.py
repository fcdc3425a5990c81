"""Where the torch backend runs a CuPy kernel instead of its torch ops: the switch, the availability decision and
the hook the kind modules put on the functions a kernel replaces.

A kind module marks a torch function with ``@cuda_kernels.replaces("name")`` (one line). Each call then asks the
implementation registered under that name (:mod:`peftdecl_torch.cuda_paths`) first; it returns the result through
the kernels (:mod:`peftdecl_torch.cuda_functions`, autograd Functions over DLPack views, no copies), or
``NotImplemented`` for a case its kernel does not cover (CPU tensors, an unsupported dtype, a block or rank past
the kernel's limits, a convolution), and the torch function runs as before. Under ``torch.compile`` the torch
function runs (dynamo cannot trace a CuPy launch; the graph keeps no break).

Availability is decided once per process: the switch ``PEFTDECL_CUDA_KERNELS`` (``0`` forces the torch path; read
once, :func:`refresh` re-reads it), CuPy importable, and each kernel source present (:mod:`peftdecl_cupy`); the
per-call checks are the tensors' device and dtypes, which cost no synchronisation.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    from peftdecl_torch.cuda_functions import Kernels

F = TypeVar("F", bound=Callable[..., Any])

ENV = "PEFTDECL_CUDA_KERNELS"
DEVICE_TYPE = "cuda"
"""The device whose tensors the kernels take (the dispatch tests set "cpu" to drive a fake kernel object)."""

MODULES = ("oft", "boft", "ia3", "vera", "loha", "lokr", "nf4", "lora", "dora", "mixed_batch")
"""The kernel sources (``backends/peftdecl_cupy/kernels/<name>.cu``) the hooks launch."""

_STATE: dict[str, Any] = {}
_OVERRIDE: list[Kernels] = []  # a kernel object installed by :func:`use_kernels` (tests)


def refresh() -> None:
    """Forget the cached decisions (the switch, CuPy's presence, the kernel object): the next call decides again."""
    _STATE.clear()


def switched_on() -> bool:
    """``PEFTDECL_CUDA_KERNELS`` is not ``0`` (default on), read once."""
    if "on" not in _STATE:
        _STATE["on"] = os.environ.get(ENV, "1").strip() not in ("0", "false", "no", "off")
    return bool(_STATE["on"])


def kernels() -> Kernels | None:
    """The kernel object the hooks call, or None where there is none (switch off, no CuPy, no sources)."""
    if not switched_on():
        return None
    if _OVERRIDE:
        return _OVERRIDE[-1]
    if "kernels" not in _STATE:
        _STATE["kernels"] = _cupy_kernels()
    found: Kernels | None = _STATE["kernels"]
    return found


def _cupy_kernels() -> Kernels | None:
    if importlib.util.find_spec("cupy") is None or importlib.util.find_spec("peftdecl_cupy") is None:
        return None
    try:
        from peftdecl_cupy._modules import KERNEL_DIR
        from peftdecl_torch.cuda_bridge import CupyKernels

        if not all((KERNEL_DIR / f"{name}.cu").is_file() for name in MODULES):
            return None
        return CupyKernels()
    except Exception:  # a broken CuPy install means the torch path, not a crash
        return None


class use_kernels:  # noqa: N801  (used as a context manager, like torch.no_grad)
    """Route the hooks to ``kernels`` inside the ``with`` block (a test double with the same methods)."""

    def __init__(self, kernels: Kernels) -> None:
        self._kernels = kernels

    def __enter__(self) -> Kernels:
        _OVERRIDE.append(self._kernels)
        return self._kernels

    def __exit__(self, *exc: object) -> None:
        _OVERRIDE.remove(self._kernels)


def _compiling() -> bool:
    return bool(torch.compiler.is_compiling())


def on_device(*tensors: torch.Tensor | None) -> bool:
    """Every given tensor lives on the kernels' device (None entries are skipped)."""
    return all(t is None or t.device.type == DEVICE_TYPE for t in tensors)


def replaces(name: str) -> Callable[[F], F]:
    """Decorator: the implementation registered as ``name`` runs first; the decorated torch function runs when
    there is no kernel object or the implementation returns ``NotImplemented``."""

    def wrap(torch_path: F) -> F:
        @functools.wraps(torch_path)
        def run(*args: Any, **kwargs: Any) -> Any:
            # dynamo cannot trace CuPy launches (nor the availability checks: environment, file stats): a
            # compiled graph keeps the torch path with no break; a first tensor argument elsewhere than the
            # kernels' device settles it without asking the path
            if _compiling():
                return torch_path(*args, **kwargs)
            kern = kernels()
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if kern is not None and (first is None or on_device(first)):
                from peftdecl_torch.cuda_paths import PATHS

                result = PATHS[name](kern, *args, **kwargs)
                if result is not NotImplemented:
                    return result
            return torch_path(*args, **kwargs)

        return run  # type: ignore[return-value]

    return wrap
