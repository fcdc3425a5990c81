"""Training throughput of ``peftdecl train`` next to its peers, on the same model, data, adapter and batch.

    torch   ``peftdecl train`` (backend torch)   vs  PEFT + transformers ``Trainer``
    mlx     ``peftdecl train`` (backend mlx)     vs  ``mlx_lm.lora`` (its YAML config through its Python entry)

Every run is a fresh subprocess training a random tiny Llama (``peftdecl.train.tiny_model``) with LoRA (rank 16,
alpha 32, no dropout) on q/k/v/o/gate/up/down of every layer, AdamW at a constant learning rate, on text lines that
all tokenise to exactly ``seq`` tokens (end-of-sequence included), so every step of every tool sees the same
``batch × seq`` input and counts the same ``batch × (seq − 1)`` target tokens. Both sides pad rows to one more than
a multiple of 32 and feed ``ids[:, :-1]``, so the model computes on ``seq`` positions on both sides.

tokens/s = counted target tokens of steps ``warmup+1 … steps`` / wall time from the end of step ``warmup`` to the
end of the last step; "part median" is the median of the same rate over each ``warmup``-step part of that window
(less moved by a burst of another process on a shared machine). Each tool logs every ``warmup`` steps
(peftdecl's ``logging_steps``, Trainer's ``logging_steps``, mlx-lm's ``steps_per_report``), so logging costs the
same share of the window on every side.
The window's ends are read from peftdecl's log.jsonl (each record's ``tokens_per_second`` covers the steps since
the previous record), from a Trainer callback's ``on_step_end`` and from an mlx-lm callback's
``on_train_loss_report``. Nothing evaluates or saves inside the window: no validation data, checkpoints off
(Trainer ``save_strategy="no"``, mlx-lm ``save_every`` past the last step), Trainer's data loader in-process
(``dataloader_num_workers=0``), ``report_to="none"``, gradient checkpointing off everywhere. mlx-lm clips no
gradients, so the MLX pair runs with ``max_grad_norm: 0``; Trainer clips at 1.0 by default, so the torch pair
does.

Memory: the child's peak resident set (``resource.getrusage``) after training, and the peak device memory where
there is one (``torch.cuda.max_memory_allocated`` on CUDA, ``mx.get_peak_memory`` under MLX).

Overhead: one more ``peftdecl train`` run per backend at ``logging_steps: 1`` with a checkpoint every half of the
run reads ``summary.json``: ``overhead_seconds`` (batching, logging, checkpoints: the loop's time between steps)
over ``step_seconds`` (time inside the runtime's forward_backward and optimizer_step).

Sizes: MLX's Linux CPU build multiplies matrices about 100 times slower than torch's CPU kernels, so the MLX pair
uses a smaller model than the torch pair (see ``SIZES``).

    .venv/bin/python benchmarks/compare_train.py [--frameworks torch mlx] [--trials 3] [--device cpu|cuda]
        [--out benchmarks/results/cpu/train] [--quick]

``--quick`` trains a toy model for a few steps (seconds; a smoke test, its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from train_sides import (  # benchmarks/train_sides.py, beside this script
    ALPHA,
    RANK,
    TARGETS,
    Size,
    mlx_lm_config,
    peftdecl_file,
    run_side,
    write_inputs,
)

ROOT = Path(__file__).resolve().parent.parent


SIZES = {
    "torch": Size(
        hidden=512, layers=4, heads=8, kv_heads=4, intermediate=1536, seq=256, batch=4, warmup=4, steps=24
    ),
    "mlx": Size(
        hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384, seq=128, batch=4, warmup=4, steps=24
    ),
}
QUICK = Size(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, seq=32, batch=2, warmup=2, steps=6)
SIDES = {"torch": ("peftdecl", "trainer"), "mlx": ("peftdecl", "mlx_lm")}
PEER_NAME = {"trainer": "PEFT + Trainer", "mlx_lm": "mlx_lm.lora"}


# -- a child: one side's training run, printing one JSON line -------------------------------------------------
def child(args: argparse.Namespace) -> None:
    size = QUICK if args.quick else SIZES[args.framework]
    result = run_side(args.side, args.framework, Path(args.work), size, args.device, args.overhead)
    print("RESULT " + json.dumps(result), flush=True)


# -- the parent: runs, table, files -----------------------------------------------------------------------------
@dataclass
class Run:
    framework: str
    side: str
    trial: int
    result: dict


def run_child(
    framework: str, side: str, work: Path, args: argparse.Namespace, overhead: bool = False
) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--framework", framework]
    command += ["--work", str(work), "--device", args.device] + (["--quick"] if args.quick else [])
    command += ["--overhead"] if overhead else []
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=work, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(
            f"{framework}/{side} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :])


def fresh_work(root: Path, framework: str, size: Size, name: str) -> Path:
    """A fresh folder with the shared inputs (a run never sees another run's outputs)."""
    work = root / name
    work.mkdir()
    write_inputs(work, framework, size)
    return work


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "machine": f"{platform.machine()} {os.cpu_count()} CPUs"}
    from importlib.metadata import PackageNotFoundError, version

    for name in ("torch", "transformers", "peft", "mlx", "mlx-lm"):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        found["peftdecl commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=True
        ).stdout.strip()
    return found


def table(runs: list[Run], overhead: dict[str, list[float]], frameworks: list[str], quick: bool) -> list[str]:
    """Per side: medians over trials of the whole-window rate (with its range), of the median part rate, and of
    the peak memories; then the ratios ours/peer and the loop's overhead."""

    def values(framework: str, side: str, key: str) -> list[float]:
        found = [r.result.get(key) for r in runs if (r.framework, r.side) == (framework, side)]
        return [v for v in found if v is not None]

    def median(framework: str, side: str, key: str) -> float:
        found = values(framework, side, key)
        return statistics.median(found) if found else float("nan")

    lines = [
        f"{'framework':9} {'side':15} {'tokens/s':>9} {'range':>13} {'part median':>11} {'peak RSS MiB':>12} "
        f"{'peak dev MiB':>12}",
    ]
    ratios = []
    for framework in frameworks:
        for side in SIDES[framework]:
            rates = values(framework, side, "tokens_per_second")
            device = median(framework, side, "peak_device_mib")
            lines.append(
                f"{framework:9} {PEER_NAME.get(side, 'peftdecl train'):15} {statistics.median(rates):9.0f} "
                f"{f'{min(rates):.0f}–{max(rates):.0f}':>13} "
                f"{median(framework, side, 'median_window_tokens_per_second'):11.0f} "
                f"{median(framework, side, 'peak_rss_mib'):12.0f} {'-' if device != device else f'{device:.0f}':>12}"
            )
        ours, peer = SIDES[framework]
        ratio = median(framework, ours, "tokens_per_second") / median(framework, peer, "tokens_per_second")
        parts = median(framework, ours, "median_window_tokens_per_second") / median(
            framework, peer, "median_window_tokens_per_second"
        )
        rss = median(framework, ours, "peak_rss_mib") / median(framework, peer, "peak_rss_mib")
        ratios.append(
            f"{framework}: ours/peer tokens/s {ratio:.2f} (part medians {parts:.2f}); peak RSS {rss:.2f}"
        )
        if overhead.get(framework):
            fractions = overhead[framework]
            where = "(throughput run)" if quick else "at logging_steps 1 with 2 checkpoints"
            ratios.append(
                f"{framework}: loop overhead {where} = {statistics.median(fractions):.2%} "
                f"of step time (range {min(fractions):.2%}–{max(fractions):.2%})"
            )
    return [*lines, "", *ratios]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frameworks", nargs="+", choices=sorted(SIDES), default=None)
    parser.add_argument("--trials", type=int, default=3, help="runs of each side, interleaved (median shown)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="torch's device")
    parser.add_argument("--out", type=Path, default=None, help="write compare_train.txt/.json here")
    parser.add_argument("--quick", action="store_true", help="toy sizes, one trial: a smoke test")
    parser.add_argument("--child", choices=("peftdecl", "trainer", "mlx_lm"), help=argparse.SUPPRESS)
    parser.add_argument("--framework", choices=sorted(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--overhead", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.side = args.child
        child(args)
        return
    frameworks = args.frameworks or [f for f in SIDES if _available(f)]
    trials = 1 if args.quick else args.trials
    runs: list[Run] = []
    overhead: dict[str, list[float]] = {}
    began = time.time()
    with tempfile.TemporaryDirectory(prefix="compare_train_") as tmp:
        root = Path(tmp)
        for framework in frameworks:
            size = QUICK if args.quick else SIZES[framework]
            for trial in range(trials):
                sides = list(SIDES[framework])
                if trial % 2:  # alternate who goes first: drift on a shared machine hits both sides alike
                    sides.reverse()
                for side in sides:
                    work = fresh_work(root, framework, size, f"{framework}-{side}-{trial}")
                    result = run_child(framework, side, work, args)
                    runs.append(Run(framework, side, trial, result))
                    print(
                        f"{framework} {side} trial {trial}: {result['tokens_per_second']:.0f} tokens/s",
                        flush=True,
                    )
                if args.quick:  # no separate run: the throughput run's own summary (logging every warm-up)
                    result = next(
                        r.result for r in runs[::-1] if (r.framework, r.side) == (framework, "peftdecl")
                    )
                else:
                    work = fresh_work(root, framework, size, f"{framework}-overhead-{trial}")
                    result = run_child(framework, "peftdecl", work, args, overhead=True)
                overhead.setdefault(framework, []).append(result["overhead_seconds"] / result["step_seconds"])
    lines = table(runs, overhead, frameworks, args.quick)
    header = header_lines(args, frameworks, trials, time.time() - began)
    print("\n".join([*header, "", *lines]))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compare_train.txt").write_text("\n".join([*header, "", *lines]) + "\n")
        data = {
            "versions": versions(),
            "sizes": {f: asdict(QUICK if args.quick else SIZES[f]) for f in frameworks},
            "peftdecl_files": {
                f: peftdecl_file(Path("WORK"), f, SIZES[f], args.device, overhead=False) for f in frameworks
            },
            "mlx_lm_config": mlx_lm_config(Path("WORK"), SIZES["mlx"]) if "mlx" in frameworks else None,
            "runs": [asdict(r) for r in runs],
            "overhead_fraction": overhead,
        }
        (args.out / "compare_train.json").write_text(json.dumps(data, indent=2) + "\n")


def header_lines(args: argparse.Namespace, frameworks: list[str], trials: int, seconds: float) -> list[str]:
    found = versions()
    lines = [
        "# " + " ".join(["python", "benchmarks/compare_train.py", *sys.argv[1:]]),
        "# " + ", ".join(f"{k} {v}" for k, v in found.items()),
        f"# device {args.device}; {trials} trial(s) per side, interleaved; medians; {seconds:.0f} s in all; "
        f"load average at the end {os.getloadavg()[0]:.1f}",
    ]
    for framework in frameworks:
        s = QUICK if args.quick else SIZES[framework]
        lines.append(
            f"# {framework}: Llama hidden {s.hidden}, {s.layers} layers, {s.heads} heads ({s.kv_heads} kv), "
            f"MLP {s.intermediate}; LoRA r {RANK} alpha {ALPHA} on {'/'.join(TARGETS)}; batch {s.batch} × {s.seq} "
            f"tokens; {s.steps} steps, the first {s.warmup} untimed"
        )
    return lines


def _available(framework: str) -> bool:
    import importlib.util

    needed = ("torch", "transformers", "peft") if framework == "torch" else ("mlx", "mlx_lm")
    return all(importlib.util.find_spec(name) is not None for name in needed)


if __name__ == "__main__":
    main()
