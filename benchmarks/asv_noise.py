"""Run-to-run noise of the regression gate's benchmarks: the same code timed by asv RUNS times, side by side.

For each benchmark, the noise figure is max ÷ min over the runs' values (asv's value of each run: the median of
its samples for a time_* benchmark, the number returned for a track_* one): the largest ratio the gate could see
between two runs of identical code. FACTOR in benchmarks/regression_gate.py is chosen above the largest such
figure of the gated set. Each run also times the same calls as wall-clock time_* benchmarks (the dashboard's),
under the same load, for comparison. ``--default-threads`` leaves the BLAS its own thread count instead of one.

    nice -n 10 python benchmarks/asv_noise.py --runs 20 --out benchmarks/results/cpu/asv_noise.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import regression_gate  # benchmarks/regression_gate.py, beside this script

# the gated set and, for comparison, the same calls in wall-clock seconds
WALL_BENCH = (
    r"^bench_numpy_lora\.LoraLinear\.time_lora$|^bench_plan\.CompilePlan\.time_(compile_plan|load_spec)$"
)
GATED = re.compile(regression_gate.GATE_BENCH)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def others_cpu_s() -> float | None:
    """CPU seconds used so far by processes other than this one and its finished children (asv and the benchmark
    processes it starts), or None without /proc: growth during a run means the run shared the machine."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = sum(int(fields[i]) for i in (0, 1, 2, 5, 6, 7))  # user nice system irq softirq steal
    busy = ticks / os.sysconf("SC_CLK_TCK")
    mine = os.times()
    return busy - (mine.user + mine.system + mine.children_user + mine.children_system)


def summarise(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per benchmark: min, median and max of the run values and the noise figure max ÷ min."""
    summary = {}
    for name in sorted(runs[0]):
        values = sorted(run[name] for run in runs if name in run)
        summary[name] = {
            "min": values[0],
            "median": values[len(values) // 2],
            "max": values[-1],
            "max_over_min": values[-1] / values[0],
        }
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--default-threads", action="store_true", help="do not pin the BLAS to one thread")
    parser.add_argument("--out", type=Path, default=None, help="write raw values and summary here (JSON)")
    args = parser.parse_args()
    bench = f"{regression_gate.GATE_BENCH}|{WALL_BENCH}"
    runs: list[dict[str, float]] = []
    busy: list[float | None] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peftdecl-noise-") as tmp:
        for i in range(args.runs):
            before = others_cpu_s()
            work = Path(tmp) / f"run-{i}"
            runs.append(
                regression_gate.time_existing(work, pin_threads=not args.default_threads, bench=bench)
            )
            after = others_cpu_s()
            busy.append(None if before is None or after is None else round(after - before, 1))
    summary = summarise(runs)
    report = {
        "what": "asv run --environment existing of the same code, once per run; time_*: seconds, track_*: ratios",
        "command": " ".join(["nice -n 10 python", *sys.argv]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": sys.version.split()[0]},
        "blas_threads": "library default" if args.default_threads else "1",
        "gate_bench": regression_gate.GATE_BENCH,
        "gate_max_over_min": max(s["max_over_min"] for name, s in summary.items() if GATED.search(name)),
        "wall_s": round(time.perf_counter() - started, 1),
        "summary": summary,
        "runs": runs,
        "others_cpu_s_per_run": busy,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
