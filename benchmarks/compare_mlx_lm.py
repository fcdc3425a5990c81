"""peftdecl's MLX LoRA and DoRA layers next to mlx-lm's LoRALinear and DoRALinear, as ratios to the plain nn.Linear.

One nn.Linear d×d (default 256) on T tokens (default 256), float32, r = 16, the same non-zero adapter numbers in
both libraries (checked equal before timing). Each repeat times every layer in turn, so drift on a shared machine
hits all of them alike; the table shows medians as ratios to the plain layer:

    forward            mx.eval(layer(x))
    forward+backward   mx.eval of the loss Σ layer(x) ⊙ dy and its gradients w.r.t. x and the adapter arrays
                       (the plain layer: w.r.t. x only, its weight is frozen)

On Linux, mlx[cpu] is slow (a 256×256×256 float32 matmul takes milliseconds), so the default shapes are small;
on Apple silicon pass larger ones (--dim 4096 --tokens 2048).

    .venv/bin/python benchmarks/compare_mlx_lm.py [--dim 256] [--tokens 256] [--rank 16] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

import peftdecl


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
    scale = 2.0
    spec = {"peft_type": "LORA", "r": rank, "lora_alpha": scale * rank, "use_dora": kind == "dora",
            "target_modules": ["m"], "init_lora_weights": False}  # fmt: skip
    ours_model = peftdecl.attach(Holder(_linear(dim)), spec, seed=0)
    ours = ours_model.engine.layer("m")
    arrays = ours_model.state_dict()
    cls = DoRALinear if kind == "dora" else LoRALinear
    theirs = cls.from_base(_linear(dim), r=rank, scale=scale)
    theirs.lora_a = mx.array(arrays["m.lora_A.weight"].T)
    theirs.lora_b = mx.array(arrays["m.lora_B.weight"].T)
    if kind == "dora":
        theirs.m = mx.array(arrays["m.lora_magnitude_vector"])
    theirs.linear.freeze()
    for layer in (ours, theirs):
        layer.eval()
    return theirs, ours


def forward_fn(layer: nn.Module, x: mx.array) -> Callable[[], None]:
    return lambda: mx.eval(layer(x))


def backward_fn(layer: nn.Module, x: mx.array, dy: mx.array) -> Callable[[], None]:
    params = layer.trainable_parameters()

    def loss(p, inputs):
        layer.update(p)
        return mx.sum(layer(inputs) * dy)

    grad = mx.value_and_grad(loss, argnums=(0, 1))
    return lambda: mx.eval(grad(params, x))


def base_backward_fn(layer: nn.Module, x: mx.array, dy: mx.array) -> Callable[[], None]:
    grad = mx.value_and_grad(lambda inputs: mx.sum(layer(inputs) * dy))
    return lambda: mx.eval(grad(x))


def timed(fn: Callable[[], None], inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--inner", type=int, default=5)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((args.tokens, args.dim)), mx.float32)
    dy = mx.array(rng.standard_normal((args.tokens, args.dim)), mx.float32)
    base = _linear(args.dim)
    base.freeze()
    layers = {"nn.Linear": base}
    for kind in ("lora", "dora"):
        theirs, ours = build(kind, args.dim, args.rank)
        agreement = float(mx.linalg.norm(theirs(x) - ours(x)) / mx.linalg.norm(theirs(x)))
        if agreement > 1e-5:
            raise SystemExit(f"{kind}: mlx-lm and peftdecl disagree (relative {agreement:.1e}); not timing")
        layers[f"mlx-lm {'DoRALinear' if kind == 'dora' else 'LoRALinear'}"] = theirs
        layers[f"peftdecl {kind}"] = ours
    fns = {
        name: (
            forward_fn(layer, x),
            base_backward_fn(layer, x, dy) if name == "nn.Linear" else backward_fn(layer, x, dy),
        )
        for name, layer in layers.items()
    }
    samples: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in fns}
    for fwd, bwd in fns.values():  # warm-up
        fwd()
        bwd()
    for _ in range(args.repeats):
        for name, (fwd, bwd) in fns.items():
            samples[name][0].append(timed(fwd, args.inner))
            samples[name][1].append(timed(bwd, args.inner))
    base_f, base_b = (statistics.median(s) for s in samples["nn.Linear"])
    print(f"MLX {mx.__version__} on {mx.default_device()}, float32, Linear {args.dim}×{args.dim}, "
          f"{args.tokens} tokens, r={args.rank}; medians of {args.repeats} repeats × {args.inner} calls")  # fmt: skip
    print(f"{'layer':<22} {'forward ms':>11} {'× base':>7} {'fwd+bwd ms':>11} {'× base':>7}")
    for name, (fwd, bwd) in samples.items():
        f, b = statistics.median(fwd), statistics.median(bwd)
        print(f"{name:<22} {f * 1e3:>11.3f} {f / base_f:>7.2f} {b * 1e3:>11.3f} {b / base_b:>7.2f}")


if __name__ == "__main__":
    main()
