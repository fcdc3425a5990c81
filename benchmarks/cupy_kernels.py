"""Times the CuPy backend's LoRA, mixed-batch and DoRA kernels against the same math in plain CuPy, on a GPU.

    python benchmarks/cupy_kernels.py [--dim 4096] [--tokens 8192] [--rank 16] [--dtype float32]

Each row: milliseconds (median of --repeats timed runs after a warm-up, CUDA events) and the ratio to the
frozen base layer (x Wᵀ + b) in the same run. "kernels" rows are the backend's launches (base GEMM by cuBLAS,
then the fused shrink/expand); "cupy" rows are the reference's CuPy expressions (what runs without kernels).
Mixed batches: 16 sequences × 512 tokens over 8 adapters (prefill) and 64 sequences × 1 token over 32 adapters
(decode), against a loop over the adapters. float32 only: CuPy has no bfloat16 GEMM for the base layer.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import cupy
import numpy as np

from peftdecl_cupy.dora import CupyDora
from peftdecl_cupy.lowrank import CupyLowRank
from peftdecl_cupy.mixed import CupyMixed


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()
    cupy.cuda.Device().synchronize()
    times = []
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    d, t, r, dt = args.dim, args.tokens, args.rank, np.float32
    rng = cupy.random.default_rng(0)
    x = rng.standard_normal((t, d), dtype=dt)
    w, bias = rng.standard_normal((d, d), dtype=dt) / d**0.5, rng.standard_normal(d, dtype=dt)
    a, b = rng.standard_normal((r, d), dtype=dt), rng.standard_normal((d, r), dtype=dt)
    m = cupy.ones(d, dtype=dt)
    low, dora, mixed = CupyLowRank(), CupyDora(CupyLowRank()), CupyMixed()
    s = 2.0

    def lora_kernels() -> None:
        y = x @ w.T + bias
        low.expand(low.shrink(x, a), b, y, s)

    def lora_backward_kernels() -> None:
        dy = x  # any [t, d] gradient
        grad_b, grad_a = cupy.empty_like(b), cupy.empty_like(a)
        low.outer(low.shrink(x, a), dy, grad_b.T, s)
        du = low.shrink(dy, b.T, s)
        low.outer(du, x, grad_a)
        dx = dy @ w
        low.expand(du, a.T, dx, accumulate=True)

    def dora_kernels() -> None:
        n = dora.norm(w, a, b, s)
        dora.output(low.shrink(x, a), b, x @ w.T + bias, bias, m, n, s)

    def dora_cupy() -> None:
        n = cupy.sqrt(((w + s * b @ a) ** 2).sum(axis=1))
        y = x @ w.T
        _ = bias + (m / n) * (y + s * (x @ a.T) @ b.T)

    rows = [
        ("base layer  x Wᵀ + b", lambda: x @ w.T + bias),
        ("LoRA forward, kernels", lora_kernels),
        ("LoRA forward, cupy", lambda: x @ w.T + bias + s * (x @ a.T) @ b.T),
        ("LoRA backward (dA, dB, dx), kernels", lora_backward_kernels),
        (
            "LoRA backward (dA, dB, dx), cupy",
            lambda: (s * x.T @ (x @ a.T), (s * x @ b).T @ x, x @ w + (s * x @ b) @ a),
        ),
        ("DoRA forward, kernels", dora_kernels),
        ("DoRA forward, cupy", dora_cupy),
    ]
    for label, sequences, per, count in (
        ("prefill 16×512, 8 adapters", 16, 512, 8),
        ("decode 64×1, 32 adapters", 64, 1, 32),
    ):
        xs = rng.standard_normal((sequences * per, d), dtype=dt)
        adapters = [
            (rng.standard_normal((r, d), dtype=dt), rng.standard_normal((d, r), dtype=dt), s)
            for _ in range(count)
        ]
        index = np.repeat(np.arange(sequences) % count, per).astype(np.int32)

        def kernel_path(xs=xs, adapters=adapters, index=index) -> None:
            mixed.run(xs, xs @ w.T, adapters, index)

        def loop_path(xs=xs, adapters=adapters, index=index) -> None:
            y = xs @ w.T
            for i, (ai, bi, si) in enumerate(adapters):
                rows_i = cupy.asarray(np.flatnonzero(index == i))
                y[rows_i] += si * (xs[rows_i] @ ai.T) @ bi.T

        rows += [(f"mixed {label}: base", lambda xs=xs: xs @ w.T), (f"mixed {label}: kernels", kernel_path),
                 (f"mixed {label}: loop", loop_path)]  # fmt: skip
    base_ms = timed(rows[0][1], args.repeats)
    print(
        f"{cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}: dim {d}, tokens {t}, rank {r}, float32"
    )
    print(f"{'case':<44} {'ms':>9} {'× base':>8}")
    reference = base_ms
    for label, fn in rows:
        ms = timed(fn, args.repeats)
        if label.endswith(": base"):
            reference = ms
        print(f"{label:<44} {ms:9.3f} {ms / (reference if label.startswith('mixed') else base_ms):8.2f}")


if __name__ == "__main__":
    main()
