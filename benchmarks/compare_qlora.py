"""QLoRA: peak memory and time of one training step over a 4-bit base, next to PEFT + bitsandbytes and to a float
base on torch, and next to mlx-lm's LoRA over an ``nn.quantize``'d model on MLX.

    ours-nf4        peftdecl (torch) over transformers' 4-bit NF4 model (BitsAndBytesConfig, double quantisation,
                    float32 compute)
    peft-nf4        HF PEFT + bitsandbytes over the same folder and config
    ours-float32    peftdecl over the float32 base (the reference for the 4-bit memory saving)
    ours-bfloat16   peftdecl over a bfloat16 base (optional)
    peft-float32    PEFT over the float32 base (optional)
    ours-affine4    peftdecl (MLX) over the model ``nn.quantize``'d to 4 bits, group 64
    mlx_lm-affine4  mlx-lm's ``linear_to_lora_layers`` over the same quantised model

Each side runs in its own fresh process (``benchmarks/qlora_sides.py`` says what a step is and how memory is
read); with ``--trials`` > 1 the sides run again in reversed order, then forward, and so on, and the table shows
medians over trials. Each side's process runs with a fixed glibc mmap threshold (``MMAP_THRESHOLD``), so its peak
resident set counts live memory, not freed heap. Model folders (random weights, written once) live in ``--cache``.
The first-step losses of two sides over the same base must agree (see ``SAME_BASE``): the script checks it, and
exits non-zero when a side failed or a pair disagrees.

MLX's Linux CPU build multiplies far slower than torch's CPU kernels, so the MLX pair runs a smaller model
(``MLX_SIZES``), stated in the output; gradient checkpointing is off there.

    .venv/bin/python benchmarks/compare_qlora.py [--size 0.5b|small|tiny] [--sides ...] [--steps 3] [--warmup 1]
        [--trials 1] [--seq N] [--device cpu|cuda] [--threads N] [--mmap-threshold BYTES] [--cache DIR]
        [--out benchmarks/results/cpu/qlora]
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
import time
from pathlib import Path

from qlora_sides import (  # benchmarks/qlora_sides.py, beside this script
    ALPHA,
    LEARNING_RATE,
    MLX_SIDES,
    RANK,
    TARGETS,
    TORCH_SIDES,
    Shape,
    model_folder,
    run_mlx_side,
    run_torch_side,
)

ROOT = Path(__file__).resolve().parent.parent
SIZES = {
    "0.5b": Shape(hidden=1024, layers=24, heads=16, kv_heads=16, intermediate=4096, vocab=32000, seq=512),
    "small": Shape(hidden=512, layers=8, heads=8, kv_heads=8, intermediate=2048, vocab=32000, seq=256),
    "tiny": Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, seq=32),
}
MLX_SIZES = {
    "0.5b": Shape(hidden=512, layers=6, heads=8, kv_heads=8, intermediate=1536, vocab=8000, seq=128),
    "small": Shape(hidden=512, layers=6, heads=8, kv_heads=8, intermediate=1536, vocab=8000, seq=128),
    "tiny": SIZES["tiny"],
}
MMAP_THRESHOLD = 1 << 20
"""glibc serves allocations of at least this many bytes with their own mapping and unmaps them when freed. With
its default dynamic threshold, glibc raises the threshold after freeing a large block, so the 16 MiB float32 weights
bitsandbytes dequantises in every 4-bit matmul come from the heap afterwards and their freed space stays resident:
the peak resident set then counts ~0.7 GiB of free heap at 0.5 B. A fixed threshold makes it count live memory;
the same on every side."""
DEFAULT_SIDES = ("ours-nf4", "peft-nf4", "ours-float32", "ours-affine4", "mlx_lm-affine4")
SAME_BASE = (("ours-nf4", "peft-nf4"), ("ours-float32", "peft-float32"), ("ours-affine4", "mlx_lm-affine4"))
"""Pairs over the same base model: before the first update both adapters are the identity (B = 0), so the first
step's loss is the base model's on both sides."""
TOLERANCE_FIRST_LOSS = 1e-5  # the same base layers on both sides, float32 compute: summation order only


def child(args: argparse.Namespace) -> None:
    side: str = args.child
    if args.threads is not None and side not in MLX_SIDES:
        import torch

        torch.set_num_threads(args.threads)
    if side in MLX_SIDES:
        measured = run_mlx_side(side, Path(args.folder), args.seq, args.steps, args.warmup)
    else:
        measured = run_torch_side(side, Path(args.folder), args.seq, args.steps, args.warmup, args.device)
    print("RESULT " + json.dumps(measured.result()), flush=True)


def run_child(side: str, folder: Path, shape: Shape, args: argparse.Namespace) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--folder", str(folder)]
    command += ["--seq", str(shape.seq), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += ["--device", args.device] + ([] if args.threads is None else ["--threads", str(args.threads)])
    # this checkout's peftdecl and backends first, also when the script runs from a copy of the tree
    path = os.pathsep.join([str(ROOT), str(ROOT / "backends"), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stdout[-2000:] + "\n" + done.stderr[-4000:]).strip()
        return {"side": side, "failed": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1][len("RESULT ") :])


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "machine": f"{platform.machine()} {os.cpu_count()} CPUs"}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "mlx", "mlx-lm"):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        found["peftdecl commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=True
        ).stdout.strip()
    return found


def summarise(runs: list[dict]) -> dict[str, dict]:
    """Per side: medians over trials of the peak memories and of the median step time; the failures kept."""
    sides: dict[str, dict] = {}
    for run in runs:
        sides.setdefault(run["side"], {"runs": []})["runs"].append(run)
    for side, found in sides.items():
        good = [r for r in found["runs"] if "failed" not in r]
        if not good:
            found["failed"] = found["runs"][-1]["failed"]
            continue
        for key in (
            "baseline_rss_mib",
            "resident_before_step_mib",
            "anonymous_before_step_mib",
            "peak_rss_mib",
            "peak_above_baseline_mib",
            "peak_device_mib",
            "median_step_seconds",
            "median_cpu_seconds",
            "first_loss",
            "trainable",
            "base_bytes",
        ):
            values = [r[key] for r in good if r.get(key) is not None]
            found[key] = statistics.median(values) if values else None
        medians = [r["median_step_seconds"] for r in good]
        found["step_range"] = (min(medians), max(medians))
        found["notes"] = good[-1]["notes"]
        del sides[side]["runs"]
        sides[side]["trials"] = len(good)
    return sides


def _ratio(sides: dict[str, dict], ours: str, peer: str, key: str) -> float | None:
    a, b = sides.get(ours, {}).get(key), sides.get(peer, {}).get(key)
    return None if a is None or b is None or not b else a / b


def ratio_lines(sides: dict[str, dict]) -> tuple[list[str], dict[str, float]]:
    """The ratios the issue sets targets for, each with its target and whether it is met."""
    lines, found = [], {}
    memory = "peak_device_mib" if sides.get("ours-nf4", {}).get("peak_device_mib") else "peak_rss_mib"
    wanted = [
        ("memory ours-nf4 / ours-float32 (peak RSS)", "ours-nf4", "ours-float32", memory, 0.4),
        (
            "memory ours-nf4 / ours-float32 (peak above imports)",
            "ours-nf4",
            "ours-float32",
            "peak_above_baseline_mib",
            0.4,
        ),
        ("memory ours-nf4 / ours-bfloat16 (peak RSS)", "ours-nf4", "ours-bfloat16", memory, 0.4),
        ("memory ours-nf4 / peft-nf4 (peak RSS)", "ours-nf4", "peft-nf4", memory, 1.0),
        (
            "memory ours-nf4 / peft-nf4 (peak above imports)",
            "ours-nf4",
            "peft-nf4",
            "peak_above_baseline_mib",
            1.0,
        ),
        ("step time ours-nf4 / peft-nf4", "ours-nf4", "peft-nf4", "median_step_seconds", 1.0),
        ("CPU time per step ours-nf4 / peft-nf4", "ours-nf4", "peft-nf4", "median_cpu_seconds", 1.0),
        ("step time ours-nf4 / ours-float32", "ours-nf4", "ours-float32", "median_step_seconds", None),
        ("step time ours-float32 / peft-float32", "ours-float32", "peft-float32", "median_step_seconds", 1.0),
        (
            "MLX step time ours-affine4 / mlx_lm-affine4",
            "ours-affine4",
            "mlx_lm-affine4",
            "median_step_seconds",
            1.0,
        ),
        (
            "MLX peak memory ours-affine4 / mlx_lm-affine4",
            "ours-affine4",
            "mlx_lm-affine4",
            "peak_device_mib",
            1.0,
        ),
    ]
    for label, ours, peer, key, target in wanted:
        value = _ratio(sides, ours, peer, key)
        if value is None:
            continue
        found[label] = value
        verdict = (
            "" if target is None else f"  (target ≤ {target}: {'met' if value <= target else 'NOT met'})"
        )
        lines.append(f"{label}: {value:.3f}{verdict}")
    for ours_side, peer_side in SAME_BASE:
        ours, peer = sides.get(ours_side, {}), sides.get(peer_side, {})
        if ours.get("first_loss") is None or peer.get("first_loss") is None:
            continue
        gap = abs(ours["first_loss"] - peer["first_loss"]) / abs(peer["first_loss"])
        found[f"first loss {ours_side} vs {peer_side} (relative)"] = gap
        verdict = "ok" if gap <= TOLERANCE_FIRST_LOSS else "DIFFERENT"
        lines.append(
            f"first-step loss {ours_side} {ours['first_loss']:.6f} vs {peer_side} {peer['first_loss']:.6f}: "
            f"relative difference {gap:.1e} (≤ {TOLERANCE_FIRST_LOSS:g}: {verdict})"
        )
    return lines, found


def table(sides: dict[str, dict]) -> list[str]:
    def cell(value: float | None, form: str) -> str:
        return "-" if value is None else format(value, form)

    lines = [
        "| side | base MiB | resident before step MiB | of it anonymous MiB | peak RSS MiB | peak above imports MiB "
        "| peak device MiB "
        "| step s (median) | step s range over trials | CPU s per step | first loss | trainable |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for side, found in sides.items():
        if "failed" in found:
            reason = found["failed"].strip().splitlines()[-1][:160]
            lines.append(f"| {side} | failed: {reason} |||||||||||")
            continue
        low, high = found["step_range"]
        lines.append(
            f"| {side} | {found['base_bytes'] / 2**20:.0f} | {cell(found['resident_before_step_mib'], '.0f')} "
            f"| {cell(found['anonymous_before_step_mib'], '.0f')} "
            f"| {cell(found['peak_rss_mib'], '.0f')} | {cell(found['peak_above_baseline_mib'], '.0f')} "
            f"| {cell(found['peak_device_mib'], '.0f')} | {found['median_step_seconds']:.3f} | {low:.3f}–{high:.3f} "
            f"| {cell(found['median_cpu_seconds'], '.3f')} | {found['first_loss']:.5f} | {found['trainable']:.0f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    parser.add_argument("--sides", nargs="+", choices=TORCH_SIDES + MLX_SIDES, default=None)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process (median shown)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--trials", type=int, default=1, help="fresh processes per side, order alternating")
    parser.add_argument("--seq", type=int, default=None, help="tokens per step (default: the size's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="torch's device")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch's intra-op threads (default: torch's own); 1 makes the CPU seconds per step a measure of work "
        "on a busy machine, where waiting threads spin",
    )
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=MMAP_THRESHOLD,
        help="glibc's MALLOC_MMAP_THRESHOLD_ in the sides' processes (bytes); 0: glibc's own dynamic threshold",
    )
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "peftdecl-bench")
    parser.add_argument("--out", type=Path, default=None, help="write compare_qlora.json/.md here")
    parser.add_argument("--child", choices=TORCH_SIDES + MLX_SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    sides = list(args.sides or [s for s in DEFAULT_SIDES if _available(s)])
    shapes = {
        "torch": _with_seq(SIZES[args.size], args.seq),
        "mlx": _with_seq(MLX_SIZES[args.size], args.seq if args.size == "tiny" else None),
    }
    folders = {
        f: model_folder(args.cache, s) for f, s in shapes.items() if any(_framework(x) == f for x in sides)
    }
    began, runs = time.time(), []
    for trial in range(args.trials):
        order = sides if trial % 2 == 0 else sides[::-1]  # drift on a shared machine hits both pairs alike
        for side in order:
            framework = _framework(side)
            run = run_child(side, folders[framework], shapes[framework], args)
            run["trial"] = trial
            runs.append(run)
            shown = run.get("median_step_seconds")
            print(f"{side} trial {trial}: " + (f"{shown:.3f} s/step" if shown else "FAILED"), flush=True)
    summary = summarise(runs)
    ratios, ratio_values = ratio_lines(summary)
    header = header_lines(args, shapes, sides, time.time() - began)
    text = [*header, "", *table(summary), "", *(f"- {line}" for line in ratios)]
    print("\n".join(text))
    failures = [f"{side}: {found['failed']}" for side, found in summary.items() if "failed" in found]
    if failures:
        print("\nFAILED SIDES\n" + "\n\n".join(failures))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compare_qlora.md").write_text("\n".join(text) + "\n")
        data = {
            "versions": versions(),
            "shapes": {f: s.__dict__ | {"parameters": s.parameters()} for f, s in shapes.items()},
            "settings": {
                "rank": RANK,
                "alpha": ALPHA,
                "targets": TARGETS,
                "learning_rate": LEARNING_RATE,
                "steps": args.steps,
                "warmup": args.warmup,
                "trials": args.trials,
                "device": args.device,
                "threads": args.threads,
                "malloc_mmap_threshold": args.mmap_threshold or "glibc default",
            },
            "summary": summary,
            "ratios": ratio_values,
            "runs": runs,
        }
        (args.out / "compare_qlora.json").write_text(json.dumps(data, indent=2) + "\n")
    disagreeing = [
        k for k, v in ratio_values.items() if k.startswith("first loss") and v > TOLERANCE_FIRST_LOSS
    ]
    if failures or disagreeing:
        raise SystemExit(
            f"failed sides: {[f.split(':')[0] for f in failures]}; losses disagree: {disagreeing}"
        )


def header_lines(
    args: argparse.Namespace, shapes: dict[str, Shape], sides: list[str], seconds: float
) -> list[str]:
    found = versions()
    lines = [
        "# " + " ".join(["python", "benchmarks/compare_qlora.py", *sys.argv[1:]]),
        "",
        "- " + ", ".join(f"{k} {v}" for k, v in found.items()),
        f"- device {args.device}, torch threads {args.threads or 'default'}; {args.trials} trial(s) per side; "
        f"{args.warmup} warm-up + {args.steps} timed steps per process; MALLOC_MMAP_THRESHOLD_ "
        f"{args.mmap_threshold or 'glibc default'}; {seconds:.0f} s in all; load average at the end "
        f"{os.getloadavg()[0]:.1f}",
        f"- LoRA r {RANK}, alpha {ALPHA}, no dropout, on {'/'.join(TARGETS)}; AdamW lr {LEARNING_RATE}",
    ]
    if any(_framework(s) == "torch" for s in sides):
        lines.append(
            f"- torch: {shapes['torch'].describe()}; gradient checkpointing on; 4-bit: NF4, double quant, "
            "block 64, float32 compute; float sides keep float32 (bfloat16 only where named)"
        )
    if any(_framework(s) == "mlx" for s in sides):
        lines.append(
            f"- MLX: {shapes['mlx'].describe()}; nn.quantize 4 bits, group 64; no gradient checkpointing"
        )
    return lines


def _with_seq(shape: Shape, seq: int | None) -> Shape:
    return shape if seq is None else Shape(**(shape.__dict__ | {"seq": seq}))


def _framework(side: str) -> str:
    return "mlx" if side in MLX_SIDES else "torch"


def _available(side: str) -> bool:
    import importlib.util

    needed = (
        ("mlx", "mlx_lm") if _framework(side) == "mlx" else ("torch", "transformers", "peft", "bitsandbytes")
    )
    return all(importlib.util.find_spec(name) is not None for name in needed)


if __name__ == "__main__":
    main()
