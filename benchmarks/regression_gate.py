"""The asv regression gate: fail when a stable benchmark of the change is more than FACTOR times slower.

The gated set (GATE_BENCH) is three track_* benchmarks of the NumPy core that run in seconds:
``bench_numpy_lora.LoraLinearGate.track_lora_over_base`` (the reference LoRA Linear forward ÷ its bare base
product), ``bench_plan.CompilePlanGate.track_compile_plan_over_python`` (plan compilation for a 32-layer Llama)
and ``...track_load_spec_over_python`` (spec loading), the last two ÷ fixed pure-Python reference work. Each is a
ratio of CPU times taken call by call in one process (asv_benches/_gate.py), so that a slow spell of a shared
machine cancels out; each run pins the BLAS to one thread (PIN_THREADS), as a thread that waits for a descheduled
sibling spins.

FACTOR = 1.75, from run-to-run noise on this project's 2-core AMD EPYC VM, shared with other jobs and niced
(benchmarks/asv_noise.py, 20 runs of the same code, raw data in benchmarks/results/cpu/asv_noise.json): the
largest ratio between two runs was 1.47 (load_spec; 1.10 for the LoRA layer, 1.09 for compile_plan), where asv's
wall-clock medians of the same calls moved by up to 6.75x and the fastest call in CPU seconds by up to 2.16x
(asv_noise_cpu_seconds.json). 1.75 is 1.47 with a margin of about 1.2; it catches a change that makes one of
these paths 1.75x slower, and leaves finer steps to the dashboard (docs/performance.md, "Regression gate").

Two modes (exit status 0: no regression, 1: a gated benchmark regressed, 2: asv itself failed):

- ``continuous BASE HEAD`` (CI): ``asv continuous --factor FACTOR --bench GATE_BENCH BASE HEAD``, each commit
  built and installed into asv's own virtualenv (.asv/gate/, the wheel alone); asv exits 1 when a benchmark is
  more than FACTOR times higher (a track_* value carries no confidence interval, so this is the plain ratio).
- ``same-commit`` (tests, and CI's check that the gate fires): times the working tree twice in this Python
  (``asv run --environment existing``), the candidate with ``PEFTDECL_BENCH_SLOWDOWN=N`` (the LoRA benchmark
  repeats its call N times: the benchmark, never the library), and fails when candidate ÷ baseline > FACTOR.

Run from the repository root: ``python benchmarks/regression_gate.py continuous origin/main HEAD``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GATE_BENCH = r"^bench_numpy_lora\.LoraLinearGate\.|^bench_plan\.CompilePlanGate\."
FACTOR = 1.75
PIN_THREADS = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
MACHINE = "regression-gate"


def asv_env(slowdown: int = 1, pin_threads: bool = True) -> dict[str, str]:
    """The environment asv and its benchmark processes inherit (asv passes os.environ through). The gated
    benchmarks need the NumPy core alone, so asv's install command installs the wheel without torch, PEFT and MLX
    (PEFTDECL_ASV_DEPS=core, benchmarks/asv/install_env.py): minutes of downloads the gate does not need."""
    env = dict(os.environ)
    env.setdefault("PEFTDECL_ASV_DEPS", "core")
    if pin_threads:
        env.update(PIN_THREADS)
    env.pop("PEFTDECL_BENCH_SLOWDOWN", None)
    if slowdown != 1:
        env["PEFTDECL_BENCH_SLOWDOWN"] = str(slowdown)
    return env


def asv(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """Run ``python -m asv ARGS`` in the repository root, echoing its output; return its exit status and output."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "asv", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line)
    return proc.wait(), "".join(lines)


def scratch_config(work: Path) -> Path:
    """An asv.conf.json under WORK: the project's, with environments, results and HTML under WORK (the committed
    results stay as they are)."""
    from asv.util import load_json  # asv's own reader: asv.conf.json may hold // comments

    conf = load_json(str(ROOT / "asv.conf.json"), js_comments=True)
    conf.update(
        repo=str(ROOT),
        benchmark_dir=str(ROOT / conf.get("benchmark_dir", "benchmarks")),
        env_dir=str(work / "env"),
        results_dir=str(work / "results"),
        html_dir=str(work / "html"),
    )
    for key in ("build_command", "install_command", "uninstall_command"):  # asv's {conf_dir} would be WORK
        conf[key] = [command.replace("{conf_dir}", str(ROOT)) for command in conf.get(key, [])]
    work.mkdir(parents=True, exist_ok=True)
    path = work / "asv.conf.json"
    path.write_text(json.dumps(conf, indent=2))
    return path


def read_results(results_dir: Path) -> dict[str, float]:
    """Benchmark name -> asv's value (the median of its samples, in seconds) from the one result file there."""
    (path,) = [p for p in results_dir.rglob("*.json") if p.name not in ("machine.json", "benchmarks.json")]
    data = json.loads(path.read_text())
    column = data["result_columns"].index("result")
    values = {}
    for name, row in data["results"].items():
        value = row[column][0] if row[column] else None
        if isinstance(value, int | float):
            values[name] = float(value)
    return values


def time_existing(
    work: Path, slowdown: int = 1, pin_threads: bool = True, bench: str = GATE_BENCH
) -> dict[str, float]:
    """Time the gated set once in this Python against the working tree; results under WORK (fresh per call)."""
    work.mkdir(parents=True, exist_ok=True)
    config = scratch_config(work)
    env = asv_env(slowdown, pin_threads)
    env["HOME"] = str(work)  # asv keeps its machine file in ~/.asv-machine.json: a scratch one here
    common = ["--config", str(config), "--machine", MACHINE]
    if asv("machine", "--yes", "--machine", MACHINE, "--config", str(config), env=env)[0] != 0:
        raise RuntimeError("asv machine failed")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    run = ["run", *common, "--environment", f"existing:{sys.executable}", "--bench", bench]
    run += ["--set-commit-hash", head.stdout.strip(), "--record-samples", "--show-stderr"]
    if asv(*run, env=env)[0] != 0:
        raise RuntimeError("asv run failed")
    return read_results(work / "results")


def regressions(base: dict[str, float], cand: dict[str, float], factor: float) -> dict[str, float]:
    """The gated benchmarks whose candidate ÷ baseline exceeds FACTOR, with that ratio (missing ones count too)."""
    slower = {}
    for name, seconds in base.items():
        ratio = cand[name] / seconds if name in cand else float("inf")
        if ratio > factor:
            slower[name] = ratio
    return slower


def same_commit(factor: float, slowdown: int) -> int:
    """Baseline, then candidate with the slowdown switch, on this working tree; print the ratios; 1 on a regression."""
    with tempfile.TemporaryDirectory(prefix="peftdecl-gate-") as tmp:
        base = time_existing(Path(tmp) / "base")
        cand = time_existing(Path(tmp) / "cand", slowdown=slowdown)
    if not base:
        print("regression gate: no gated benchmark produced a result", file=sys.stderr)
        return 2
    slower = regressions(base, cand, factor)
    for name in sorted(base):
        ratio = cand.get(name, float("nan")) / base[name]
        print(f"{'REGRESSED' if name in slower else 'ok':>9}  {ratio:6.2f}x  {name}")
    verdict = "FAIL" if slower else "pass"
    print(f"regression gate (factor {factor}, PEFTDECL_BENCH_SLOWDOWN={slowdown}): {verdict}")
    return 1 if slower else 0


def continuous(base: str, head: str, factor: float) -> int:
    """asv continuous of BASE against HEAD in asv's virtualenvs, kept under .asv/gate/ (reused by the next run)."""
    config = scratch_config(ROOT / ".asv" / "gate")
    if not (Path.home() / ".asv-machine.json").exists() and asv("machine", "--yes", env=asv_env())[0] != 0:
        return 2
    run = ["continuous", "--config", str(config), "--factor", str(factor), "--bench", GATE_BENCH, "--split"]
    status, output = asv(*run, "--show-stderr", base, head, env=asv_env())
    # asv exits 1 on a regression and on its own errors alike; its verdict line tells them apart
    if "PERFORMANCE DECREASED" in output:
        return 1
    return 0 if status == 0 else 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--factor", type=float, default=FACTOR, help=f"allowed ratio (default {FACTOR})")
    modes = parser.add_subparsers(dest="mode", required=True)
    cont = modes.add_parser("continuous", help="compare two commits in asv's virtualenvs (CI)")
    cont.add_argument("base", nargs="?", default="origin/main")
    cont.add_argument("head", nargs="?", default="HEAD")
    same = modes.add_parser("same-commit", help="time this working tree twice in this Python (tests)")
    same.add_argument("--slowdown", type=int, default=1, help="PEFTDECL_BENCH_SLOWDOWN for the candidate run")
    args = parser.parse_args(argv)
    try:
        if args.mode == "continuous":
            return continuous(args.base, args.head, args.factor)
        return same_commit(args.factor, args.slowdown)
    except RuntimeError as err:
        print(f"regression gate: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
