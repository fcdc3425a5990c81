"""peftdecl's MLX LoRA and DoRA layers next to mlx-lm's LoRALinear and DoRALinear, as ratios to the plain nn.Linear.

One nn.Linear d×d with bias (default 256) on T tokens (default 256), float32, r = 16, scale s = 2, dropout 0.
Both libraries hold the same non-zero adapter numbers on copies of the same base weights; before timing, the
outputs and every gradient are checked equal (relative error ≤ 1e-5), so both sides do the same work:

    forward            mx.eval(layer(x)), eval mode (peftdecl's DoRA reuses its weight norm while W, A, B are
                       unchanged, as at inference; mlx-lm's recomputes it every call)
    forward+backward   mx.eval of the loss L = Σ layer(x) ⊙ dy and of dL/dx and dL/d(A, B[, m]), training mode
                       (the plain layer: L and dL/dx only, its weight is frozen)

peftdecl runs x (W + s·B A)ᵀ instead of x Wᵀ + s·(x Aᵀ) Bᵀ where forming W + s·B A costs fewer multiply-adds
(peftdecl_mlx.kinds._fused.merge_pays; DoRA also whenever it has just formed it for its norm): at the default
shape its LoRA and DoRA forward and its DoRA training step take the merged product, its LoRA training step the
low-rank one; at --dim 1024 --tokens 512 only DoRA's training step does.

``--compile`` times every function (forward, and value_and_grad for forward+backward) under ``mx.compile``, as
mlx-lm's trainer runs its step: the Python that builds each graph runs once per shape instead of every call.

Timing, for a noisy shared machine: in each round every (layer, mode) pair runs one untimed call then a block of
``--block`` timed calls, the pairs in a fresh random order; a block during which other processes used the CPU
(Linux: /proc/stat minus this process) is timed again, up to ``--retries`` times; the header counts the blocks
redone and those kept although disturbed, with the load average before and after. A trial is one fresh process;
its numbers are the medians of all its blocks. The table shows, per layer, milliseconds from the median trial and
the median over the trials of the ratio to nn.Linear in the same trial; below it, per kind, the median and the
range over the trials of ours / mlx-lm (range below 1 everywhere: ours was faster in every trial).

mlx[cpu] on Linux multiplies with the netlib reference BLAS, whose speed depends on operand layout: the "x·Wᵀ,
[in,out] copy" row times the plain product with an [in, out]-contiguous right operand instead of the transposed
[out, in] weight that nn.Linear (and both adapter layers) use, for scale; neither library uses it. Both adapter
layers run their frozen product with the same MLX matmul as nn.Linear.

    .venv/bin/python benchmarks/compare_mlx_lm.py [--dim 256] [--tokens 256] [--rank 16] [--rounds 7]
        [--block 3] [--trials 3]
    .venv/bin/python benchmarks/compare_mlx_lm.py --dim 1024 --tokens 512 --rounds 5 --block 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from _machine import others_busy  # benchmarks/_machine.py, beside this script
from mlx.utils import tree_flatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

import peftdecl

SCALE = 2.0
AGREE = 1e-5


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.m = layer

    def __call__(self, x: mx.array) -> mx.array:
        return self.m(x)


def _linear(dim: int) -> nn.Linear:
    mx.random.seed(0)
    layer = nn.Linear(dim, dim)
    mx.eval(layer.parameters())
    return layer


def build(kind: str, dim: int, rank: int) -> tuple[nn.Module, nn.Module]:
    """(mlx-lm's layer, peftdecl's layer) on copies of the same base Linear, with the same adapter numbers."""
    spec = {"peft_type": "LORA", "r": rank, "lora_alpha": SCALE * rank, "use_dora": kind == "dora",
            "lora_dropout": 0.0, "target_modules": ["m"], "init_lora_weights": False}  # fmt: skip
    ours_model = peftdecl.attach(Holder(_linear(dim)), spec, seed=0)
    ours = ours_model.engine.layer("m")
    arrays = ours_model.state_dict()
    cls = DoRALinear if kind == "dora" else LoRALinear
    theirs = cls.from_base(_linear(dim), r=rank, dropout=0.0, scale=SCALE)
    theirs.lora_a = mx.array(arrays["m.lora_A.weight"].T)
    theirs.lora_b = mx.array(arrays["m.lora_B.weight"].T)
    if kind == "dora":
        # a magnitude away from ‖W + s·B A‖ so that g ≠ 1 and its gradient is not trivial, the same on both sides
        magnitude = arrays["m.lora_magnitude_vector"] * np.linspace(0.5, 1.5, dim, dtype=np.float32)
        theirs.m = mx.array(magnitude)
        ours.adapters["default"]["lora_magnitude_vector"] = mx.array(magnitude)
    theirs.linear.freeze()
    mx.eval(theirs.parameters(), ours.parameters())
    return theirs, ours


def _grad_step(layer: nn.Module, x: mx.array, dy: mx.array, compiled: bool = False) -> Callable[[], Any]:
    """value_and_grad of Σ layer(x) ⊙ dy w.r.t. x and the layer's trainable arrays (x only if there are none),
    under ``mx.compile`` if asked."""
    params = layer.trainable_parameters()
    wrap = mx.compile if compiled else (lambda fn: fn)
    if not tree_flatten(params):
        grad = wrap(mx.value_and_grad(lambda inputs: mx.sum(layer(inputs) * dy)))
        return lambda: grad(x)

    def loss(p: Any, inputs: mx.array) -> mx.array:
        layer.update(p)
        return mx.sum(layer(inputs) * dy)

    grad = wrap(mx.value_and_grad(loss, argnums=(0, 1)))
    return lambda: grad(params, x)


def _gradients(kind: str, layer: nn.Module, step: Callable[[], Any]) -> dict[str, np.ndarray]:
    """Named gradients in one layout (mlx-lm's: A as [in, r], B as [r, out]) for the agreement check."""
    _, (params, dx) = step()
    flat = dict(tree_flatten(params))
    out = {"x": np.array(dx)}
    if "lora_a" in flat:
        out.update(a=np.array(flat["lora_a"]), b=np.array(flat["lora_b"]))
        if "m" in flat:
            out["m"] = np.array(flat["m"])
    else:
        out.update(a=np.array(flat["adapters.default.lora_A.weight"]).T)
        out["b"] = np.array(flat["adapters.default.lora_B.weight"]).T
        if kind == "dora":
            out["m"] = np.array(flat["adapters.default.lora_magnitude_vector"])
    return out


def _check_agree(kind: str, theirs: nn.Module, ours: nn.Module, x: mx.array, dy: mx.array) -> None:
    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    errors = {"y": rel(np.array(ours(x)), np.array(theirs(x)))}
    mine, ref = (
        _gradients(kind, ours, _grad_step(ours, x, dy)),
        _gradients(kind, theirs, _grad_step(theirs, x, dy)),
    )
    if set(mine) != set(ref):
        raise SystemExit(f"{kind}: different trainable sets, ours {sorted(mine)} vs mlx-lm {sorted(ref)}")
    errors.update({f"d{k}": rel(mine[k], ref[k]) for k in ref})
    worst = max(errors.values())
    if worst > AGREE:
        raise SystemExit(f"{kind}: mlx-lm and peftdecl disagree ({errors}); not timing")


def median_times(
    calls: dict[str, Callable[[], None]], rounds: int, block: int, retries: int
) -> tuple[dict[str, float], int, int]:
    """Median seconds per call over all blocks; the number of blocks redone because other processes used the
    CPU meanwhile, and of blocks kept although they did (after ``retries`` tries)."""
    order = random.Random(0)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    names, redone, contended = list(calls), 0, 0
    for _ in range(rounds):
        for name in order.sample(names, len(names)):
            for attempt in range(retries + 1):
                calls[name]()  # untimed: pays for what the previous layer left in caches and the allocator
                before, times = others_busy(), []
                for _ in range(block):
                    start = time.perf_counter()
                    calls[name]()
                    times.append(time.perf_counter() - start)
                after = others_busy()
                if before is None or after is None or after - before <= 1:
                    break
                if attempt == retries:
                    contended += 1
                    break
                redone += 1
                time.sleep(0.05)
            samples[name].extend(times)
    return {name: statistics.median(s) for name, s in samples.items()}, redone, contended


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Median seconds of every (layer, mode) in this process, after the agreement checks."""
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((args.tokens, args.dim)), mx.float32)
    dy = mx.array(rng.standard_normal((args.tokens, args.dim)), mx.float32)
    base = _linear(args.dim)
    base.freeze()
    w_in_out = mx.contiguous(base.weight.T)
    forward: dict[str, nn.Module] = {"nn.Linear": base}
    training: dict[str, nn.Module] = {"nn.Linear": base}
    for kind in args.kinds:
        theirs, ours = build(kind, args.dim, args.rank)
        _check_agree(kind, theirs, ours, x, dy)
        forward |= {f"mlx-lm {kind}": theirs.eval(), f"peftdecl {kind}": ours.eval()}
        theirs, ours = build(kind, args.dim, args.rank)
        training |= {f"mlx-lm {kind}": theirs.train(), f"peftdecl {kind}": ours.train()}
    calls: dict[str, Callable[[], None]] = {
        "fwd x·Wᵀ, [in,out] copy": lambda: mx.eval(mx.addmm(base.bias, x, w_in_out))
    }
    for name, layer in forward.items():
        run = mx.compile(layer.__call__) if args.compile else layer
        calls[f"fwd {name}"] = lambda run=run: mx.eval(run(x))
    for name, layer in training.items():
        step = _grad_step(layer, x, dy, args.compile)
        calls[f"f+b {name}"] = lambda step=step: mx.eval(step())
    times, redone, contended = median_times(calls, args.rounds, args.block, args.retries)
    return {"times": times, "redone": redone, "contended": contended}


def _table(trials: list[dict[str, Any]], args: argparse.Namespace) -> None:
    layers = ["nn.Linear", "x·Wᵀ, [in,out] copy"]
    layers += [f"{lib} {kind}" for kind in args.kinds for lib in ("mlx-lm", "peftdecl")]

    def ratio(trial: dict[str, Any], mode: str, name: str) -> float | None:
        key = f"{mode} {name}"
        return trial["times"][key] / trial["times"][f"{mode} nn.Linear"] if key in trial["times"] else None

    mid = sorted(trials, key=lambda t: t["times"]["f+b nn.Linear"])[len(trials) // 2]
    print(f"{'layer':<22} | {'fwd ms':>8} {'× base':>7} | {'f+b ms':>8} {'× base':>7}")
    print("-" * 60)
    for name in layers:
        cells = []
        for mode in ("fwd", "f+b"):
            key = f"{mode} {name}"
            if key not in mid["times"]:
                cells.append(f"{'':>8} {'':>7}")
                continue
            med = statistics.median(ratio(t, mode, name) for t in trials)
            cells.append(f"{mid['times'][key] * 1e3:8.3f} {med:7.3f}")
        print(f"{name:<22} | {cells[0]} | {cells[1]}")
    print()
    print(f"{'ours / mlx-lm':<14} | {'fwd median':>10} {'range':>13} | {'f+b median':>10} {'range':>13}")
    for kind in args.kinds:
        cells = []
        for mode in ("fwd", "f+b"):
            vs = sorted(
                t["times"][f"{mode} peftdecl {kind}"] / t["times"][f"{mode} mlx-lm {kind}"] for t in trials
            )
            cells.append(f"{statistics.median(vs):10.3f} {vs[0]:6.3f}-{vs[-1]:6.3f}")
        print(f"{kind:<14} | {cells[0]} | {cells[1]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--kinds", nargs="+", default=["lora", "dora"], choices=["lora", "dora"])
    parser.add_argument("--rounds", type=int, default=7, help="blocks per (layer, mode) in one trial")
    parser.add_argument("--block", type=int, default=3, help="timed calls per block")
    parser.add_argument("--trials", type=int, default=3, help="fresh processes")
    parser.add_argument("--retries", type=int, default=3, help="re-timings of a block others disturbed")
    parser.add_argument("--compile", action="store_true", help="every timed function under mx.compile")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: one trial, JSON out
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args)))
        return
    command = [sys.executable, __file__, "--one", *(argv if argv is not None else sys.argv[1:])]
    load_before = os.getloadavg()
    trials = []
    for _ in range(args.trials):
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(done.stderr or done.stdout)
        trials.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        f"MLX {mx.__version__} on {mx.default_device()}, float32, Linear {args.dim}×{args.dim} with bias, "
        f"{args.tokens} tokens, r={args.rank}, s={SCALE:g}, dropout 0{', mx.compile' if args.compile else ''}; "
        f"{args.trials} trials × {args.rounds} "
        f"rounds × {args.block} calls; ms from the median trial; load average {load_before[0]:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after; {sum(t['redone'] for t in trials)} blocks redone, "
        f"{sum(t['contended'] for t in trials)} kept while other processes ran"
    )
    _table(trials, args)


if __name__ == "__main__":
    main()
