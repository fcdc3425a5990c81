"""What the regression gate's benchmarks share: the fastest of several calls in CPU seconds, and the slowdown switch.

asv reports the median of its samples, and on a shared 2-core machine the median of a wall-clock time moves with
the load of other processes (up to 6x between runs of the same code, benchmarks/results/cpu/asv_noise*.json).
The gate's benchmarks therefore report min over calls of the CPU time of one call: another process taking the
CPU, a cold cache after a context switch or a garbage collection only ever add time, so the fastest call is the
least disturbed measure of the code itself.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable


def slowdown() -> int:
    """How many times a gated benchmark repeats its work: PEFTDECL_BENCH_SLOWDOWN, 1 when unset (the switch
    that shows the gate fires; it slows the benchmark, never the library)."""
    return max(1, int(os.environ.get("PEFTDECL_BENCH_SLOWDOWN", "1")))


def fastest_cpu_seconds(call: Callable[[], object], calls: int) -> float:
    """min over CALLS calls of the CPU seconds (time.process_time) one call of CALL takes."""
    best = math.inf
    for _ in range(calls):
        start = time.process_time()
        call()
        best = min(best, time.process_time() - start)
    return best
