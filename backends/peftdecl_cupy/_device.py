"""Whether a CUDA device is there for CuPy, asked without importing CuPy where there is no driver.

The driver (``libcuda.so.1``) is asked first through ctypes: on a machine without one, listing the backends
stays as cheap as a ``find_spec``. Only where the driver counts a device is CuPy imported and its runtime asked
(``cupy.cuda.runtime.getDeviceCount``), which also catches a CuPy built for a newer CUDA than the driver.
"""

from __future__ import annotations

import ctypes
import importlib.util


def driver_device_count() -> tuple[int, str]:
    """(devices the CUDA driver counts, "" or why it could not count)."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0, "no CUDA driver (libcuda.so.1 not found)"
    status = driver.cuInit(0)
    if status != 0:
        return 0, f"the CUDA driver did not initialise (CUresult {status})"
    count = ctypes.c_int(0)
    status = driver.cuDeviceGetCount(ctypes.byref(count))
    if status != 0:
        return 0, f"the CUDA driver could not count devices (CUresult {status})"
    return count.value, ""


def unavailable_reason() -> str:
    """ "" when CuPy imports and sees a CUDA device, else a one-line reason (never raises)."""
    if importlib.util.find_spec("cupy") is None:
        return "needs cupy (pip install 'peftdecl[cuda]')"
    count, why = driver_device_count()
    if why:
        return why
    if count == 0:
        return "no CUDA device"
    try:
        import cupy

        if int(cupy.cuda.runtime.getDeviceCount()) == 0:
            return "no CUDA device visible to CuPy"
    except Exception as exc:  # an import or runtime error is a reason to list, not a crash
        return f"CuPy cannot use the device: {type(exc).__name__}: {exc}"
    return ""
