"""What the regression gate's benchmarks share: a CPU-time ratio to reference work, and the slowdown switch.

asv reports the median of its samples, and on this project's shared 2-core VM the median of a wall-clock time
moved up to 7.6x between runs of the same code; the fastest call in CPU seconds still moved up to 2.2x, because
for minutes at a time the whole CPU ran at about half speed (another tenant on the core's other hardware thread,
benchmarks/results/cpu/asv_noise*.json). Such a slow spell slows any work alike, so each gate benchmark reports
its code's CPU time divided by that of fixed reference work timed in the same process, the two interleaved call
by call; the fastest call of each is taken, since preemption, cold caches and garbage collection only add time.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

LAYER_NAMES = [
    f"model.layers.{i}.{part}.{proj}"
    for i in range(32)
    for part, proj in [("self_attn", p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    + [("mlp", p) for p in ("gate_proj", "up_proj", "down_proj")]
]


def slowdown() -> int:
    """How many times a gated benchmark repeats its work: PEFTDECL_BENCH_SLOWDOWN, 1 when unset (the switch
    that shows the gate fires; it slows the benchmark, never the library)."""
    return max(1, int(os.environ.get("PEFTDECL_BENCH_SLOWDOWN", "1")))


def python_reference() -> None:
    """Fixed pure-Python work of the kind plan compilation does (about 1 ms): split 224 layer names, key a dict
    by them and sort it, twelve times over. Standard library only, so that no change of peftdecl moves it."""
    for _ in range(12):
        table = {}
        for name in LAYER_NAMES:
            parts = name.split(".")
            table[name] = (parts[-1], int(parts[2]), len(name))
        sorted(table, key=table.__getitem__)


def cpu_ratio(call: Callable[[], object], reference: Callable[[], object], rounds: int) -> float:
    """min over ROUNDS of the CPU seconds (time.process_time) of one CALL ÷ the same for REFERENCE, the two
    called alternately so that a slow spell of the machine falls on both."""
    best_call = best_reference = math.inf
    for _ in range(rounds):
        start = time.process_time()
        call()
        middle = time.process_time()
        reference()
        end = time.process_time()
        best_call = min(best_call, middle - start)
        best_reference = min(best_reference, end - middle)
    return best_call / best_reference
