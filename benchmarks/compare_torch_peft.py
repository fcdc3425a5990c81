"""peftdecl's torch layers next to HF PEFT's, per adapter kind, as ratios to the plain frozen layer.

One nn.Linear d×d (default 1024) on T tokens (default 2048), float32, r = 16 (VeRA r = 256, OFT/BOFT blocks of 32),
non-trivial adapter weights. The base layer, PEFT's layer and peftdecl's layer are timed in blocks, in a random
order, over several rounds (see ``median_times``); the table shows medians as ratios to the base layer:

    forward            y = layer(x) under torch.no_grad()
    forward+backward   y = layer(x); y.backward(dy), gradients w.r.t. the input and the adapter parameters

Memory: the bytes autograd keeps alive between forward and backward beyond the layer's input, output and
parameters (counted with torch.autograd.graph.saved_tensors_hooks, one count per distinct storage). This is what a
layer adds to a training step's activation memory; transient buffers inside forward or backward are not counted.

    .venv/bin/python benchmarks/compare_torch_peft.py [--kinds lora dora ...] [--repeats 21] [--threads 2] [--trials 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import peftdecl

KINDS = ("lora", "dora", "adalora", "ia3", "loha", "lokr", "oft", "boft", "vera")


def configs(kind: str, r: int) -> tuple[object, dict]:
    """(PEFT config, peftdecl spec) for one kind on the module ``m``."""
    import peft

    target = ["m"]
    if kind in ("lora", "dora"):
        fields = dict(
            r=r, lora_alpha=2 * r, target_modules=target, init_lora_weights=False, use_dora=kind == "dora"
        )
        return peft.LoraConfig(**fields), {"peft_type": "LORA", **fields}
    if kind == "adalora":
        fields = dict(init_r=r, target_r=r // 2, total_step=100, lora_alpha=2 * r, target_modules=target)
        return peft.AdaLoraConfig(**fields), {"peft_type": "ADALORA", **fields}
    if kind == "ia3":
        fields = dict(target_modules=target, feedforward_modules=[], init_ia3_weights=False)
        return peft.IA3Config(**fields), {"peft_type": "IA3", **fields}
    if kind in ("loha", "lokr"):
        fields = dict(r=r, alpha=2 * r, target_modules=target, init_weights=False)
        cls = peft.LoHaConfig if kind == "loha" else peft.LoKrConfig
        return cls(**fields), {"peft_type": kind.upper(), **fields}
    if kind == "oft":
        fields = dict(r=0, oft_block_size=32, target_modules=target, init_weights=False)
        return peft.OFTConfig(**fields), {"peft_type": "OFT", **fields}
    if kind == "boft":
        fields = dict(
            boft_block_size=32, boft_n_butterfly_factor=1, target_modules=target, init_weights=False
        )
        return peft.BOFTConfig(**fields), {"peft_type": "BOFT", **fields}
    if kind == "vera":
        fields = dict(r=256, target_modules=target, init_weights=False)
        return peft.VeraConfig(**fields), {"peft_type": "VERA", **fields}
    raise KeyError(kind)


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.m = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)


def build(kind: str, dim: int, r: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(plain frozen Linear, PEFT's layer, peftdecl's layer), all on the same base weights."""
    import peft

    torch.manual_seed(0)
    base = nn.Linear(dim, dim)
    base.requires_grad_(False)
    peft_config, spec = configs(kind, r)
    theirs = peft.get_peft_model(Holder(_copy(base)), peft_config).base_model.model.m
    ours = peftdecl.attach(Holder(_copy(base)), spec, seed=0)
    with (
        torch.no_grad()
    ):  # non-trivial values for tensors a fresh adapter leaves at zero (PEFT's and ours alike)
        gen = torch.Generator().manual_seed(1)
        for param in (
            *[p for p in theirs.parameters() if p.requires_grad],
            *ours.trainable_parameters().values(),
        ):
            param.add_(0.01 * torch.randn(param.shape, generator=gen))
    for layer in (base, theirs, ours.engine.layer("m")):
        layer.train()
    return base, theirs, ours.engine.layer("m")


def _copy(layer: nn.Linear) -> nn.Linear:
    clone = nn.Linear(layer.in_features, layer.out_features)
    clone.load_state_dict(layer.state_dict())
    return clone


def forward(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            layer(x)

    return run


def forward_backward(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    params = [p for p in layer.parameters() if p.requires_grad]
    xg = x.clone().requires_grad_(True)

    def run() -> None:
        xg.grad = None
        for p in params:
            p.grad = None
        layer(xg).backward(dy)

    return run


def median_times(calls: list[Callable[[], None]], repeats: int, rounds: int = 3) -> list[float]:
    """Median seconds of each call. Each round runs every call in a block of repeats/rounds timed calls after one
    untimed call, blocks in a fresh random order: a block measures a layer in steady state (what another layer left
    behind in the allocator and caches is paid by the untimed call), and the rounds spread drift on a shared
    machine over all layers alike."""
    order = random.Random(0)
    samples: list[list[float]] = [[] for _ in calls]
    per_block = max(1, -(-repeats // rounds))
    for _ in range(rounds):
        for i in order.sample(range(len(calls)), len(calls)):
            calls[i]()
            for _ in range(per_block):
                start = time.perf_counter()
                calls[i]()
                samples[i].append(time.perf_counter() - start)
    return [statistics.median(s) for s in samples]


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd holds for backward beyond the layer's input, output and parameters."""
    known = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in layer.parameters()}
    known |= {b.untyped_storage().data_ptr() for b in layer.buffers()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    xg = x.clone().requires_grad_(True)
    known.add(xg.untyped_storage().data_ptr())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(xg)
    known.add(y.untyped_storage().data_ptr())
    return sum(n for ptr, n in seen.items() if ptr not in known)


def measure(kind: str, args: argparse.Namespace) -> dict[str, float]:
    """Ratios to the base layer and saved-tensor MiB for one kind, in this process."""
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.dim, generator=gen)
    dy = torch.randn(args.tokens, args.dim, generator=gen)
    base, theirs, ours = build(kind, args.dim, args.rank)
    fwd = median_times([forward(m, x, dy) for m in (base, theirs, ours)], args.repeats)
    fb = median_times([forward_backward(m, x, dy) for m in (base, theirs, ours)], args.repeats)
    return {
        "fwd_peft": fwd[1] / fwd[0],
        "fwd_ours": fwd[2] / fwd[0],
        "fb_peft": fb[1] / fb[0],
        "fb_ours": fb[2] / fb[0],
        "mem_peft": saved_bytes(theirs, x) / 2**20,
        "mem_ours": saved_bytes(ours, x) / 2**20,
        "base_fwd_ms": fwd[0] * 1e3,
        "base_fb_ms": fb[0] * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--trials", type=int, default=3, help="runs per kind; the least disturbed one is shown"
    )
    parser.add_argument(
        "--one", choices=KINDS, help=argparse.SUPPRESS
    )  # internal: measure one kind, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    print(
        f"torch {torch.__version__}, {args.threads} threads, Linear {args.dim}x{args.dim}, {args.tokens} tokens, "
        f"float32, median of {args.repeats}; each kind in fresh processes"
    )
    header = (
        f"{'kind':8} | {'fwd PEFT':>8} {'fwd ours':>8} {'ours/PEFT':>9} | "
        f"{'f+b PEFT':>8} {'f+b ours':>8} {'ours/PEFT':>9} | {'saved MiB PEFT':>14} {'ours':>6}"
    )
    print(header)
    print("-" * len(header))
    for kind in args.kinds:
        # a fresh process per kind: the allocator's state after one kind's runs skews the next kind's timings
        command = [sys.executable, __file__, "--one", kind, *sys.argv[1:]]
        trials = []
        for _ in range(args.trials):
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            trials.append(json.loads(done.stdout.strip().splitlines()[-1]))
        # other work on a shared machine slows a trial down as a whole: keep the one whose base layer ran fastest
        r = min(trials, key=lambda t: t["base_fwd_ms"] + t["base_fb_ms"])
        print(
            f"{kind:8} | {r['fwd_peft']:8.3f} {r['fwd_ours']:8.3f} {r['fwd_ours'] / r['fwd_peft']:9.3f} | "
            f"{r['fb_peft']:8.3f} {r['fb_ours']:8.3f} {r['fb_ours'] / r['fb_peft']:9.3f} | "
            f"{r['mem_peft']:14.2f} {r['mem_ours']:6.2f}   (base {r['base_fwd_ms']:.1f} / {r['base_fb_ms']:.1f} ms)",
            flush=True,
        )
    print(
        f"ratios are × the plain frozen Linear in the same process; of {args.trials} trials per kind the one with the "
        "fastest base layer is shown; saved MiB: see the module docstring"
    )


if __name__ == "__main__":
    main()
