"""peftdecl's torch layers next to HF PEFT's, per adapter kind, as ratios to the plain frozen layer.

One nn.Linear d×d (default 1024) on T tokens (default 2048), float32, r = 16 (VeRA r = 256, OFT/BOFT blocks of 32),
non-trivial adapter weights. The base layer, PEFT's layer and peftdecl's layer are timed in the same process, in
blocks, in a random order, over several rounds (see ``median_times``); the table shows medians as ratios to the
base layer:

    forward            y = layer(x) under torch.no_grad()
    forward+backward   y = layer(x); y.backward(dy), gradients w.r.t. the input and the adapter parameters

Equal footing: the frozen layer, PEFT's layer and peftdecl's layer compute their products through the same
library (torch's own ops: the base layer or ``torch.nn.functional.linear``), so each ratio is what the adapter adds.

Stability on a shared machine: a block during which other processes used the CPU (Linux: /proc/stat minus this
process) is thrown away and timed again; each kind runs in several fresh processes ("trials") and the table shows
the median over the trials of each ratio, with the range of ours/PEFT over the trials. (Showing the trial whose
base layer ran fastest, as this script once did, biases every ratio upwards: a base that was fast by chance sits
in every denominator.)

Page faults: on this kind of VM a first touch of a fresh page costs about 2 µs, so an 8 MiB temporary that the C
allocator hands back to the system and takes again costs several ms per call, about as much as the adapter
arithmetic itself. Whether that happens depends on glibc's trim/mmap thresholds and on the allocation history,
not only on the layer. "flt" columns give the median minor faults per call. ``--steady-malloc`` runs the trials
with glibc's MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ raised, so freed memory stays mapped and the ratios
measure the arithmetic and memory traffic alone.

Memory: the bytes autograd keeps alive between forward and backward beyond the layer's input, output and
parameters (counted with torch.autograd.graph.saved_tensors_hooks, one count per distinct storage). This is what a
layer adds to a training step's activation memory; transient buffers inside forward or backward are not counted.

    .venv/bin/python benchmarks/compare_torch_peft.py [--kinds lora dora ...] [--rounds 9] [--block 3]
        [--threads 2] [--trials 3] [--steady-malloc] [--device cuda] [--dtype bfloat16] [--in-process]

On a GPU (``--device cuda``) every timed call ends with ``torch.cuda.synchronize()``, TF32 stays off (float32 is
float32), and the table adds the peak CUDA memory of one forward+backward beyond what was allocated before it.
``--in-process`` measures all kinds in one process (the CUDA caching allocator does not carry the CPU allocator's
history effects, and each fresh process costs seconds of imports). PEFT's BOFT would compile a CUDA extension
with ninja on first use; the script keeps it on its torch.block_diag fallback, which gives the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from _machine import minor_faults, others_busy  # benchmarks/_machine.py, beside this script
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


def build(
    kind: str, dim: int, r: int, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(plain frozen Linear, PEFT's layer, peftdecl's layer), all on the same base weights; adapters stay float32
    on a half-precision base, as both libraries keep them."""
    import peft
    from peft.tuners.boft import layer as boft_layer

    if device != "cpu":
        boft_layer._FBD_CUDA = False  # see the module docstring
    torch.manual_seed(0)
    base = nn.Linear(dim, dim).to(device, dtype)
    base.requires_grad_(False)
    peft_config, _ = configs(kind, r)
    wrapped = peft.get_peft_model(Holder(_copy(base)), peft_config)
    theirs = wrapped.base_model.model.m
    with torch.no_grad():  # non-trivial values for the tensors a fresh adapter leaves at zero
        gen = torch.Generator().manual_seed(1)
        for param in theirs.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn(param.shape, generator=gen).to(param))
    with tempfile.TemporaryDirectory() as folder:  # ours reads PEFT's file: the same numbers on both sides
        wrapped.save_pretrained(folder)
        ours = peftdecl.load_adapter(Holder(_copy(base)), folder, is_trainable=True)  # timed while training
    for layer in (base, theirs, ours.engine.layer("m")):
        layer.train()
    return base, theirs, ours.engine.layer("m")


def _copy(layer: nn.Linear) -> nn.Linear:
    clone = nn.Linear(layer.in_features, layer.out_features).to(layer.weight)
    clone.load_state_dict(layer.state_dict())
    return clone


def _synchronize(x: torch.Tensor) -> Callable[[], None]:
    return torch.cuda.synchronize if x.is_cuda else lambda: None


def forward(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    sync = _synchronize(x)

    def run() -> None:
        with torch.no_grad():
            layer(x)
        sync()

    return run


def forward_backward(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    params = [p for p in layer.parameters() if p.requires_grad]
    xg = x.clone().requires_grad_(True)
    sync = _synchronize(x)

    def run() -> None:
        xg.grad = None
        for p in params:
            p.grad = None
        layer(xg).backward(dy)
        sync()

    return run


def disagreement(theirs: nn.Module, ours: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> float:
    """Largest relative difference between PEFT's and peftdecl's output and input gradient at this shape."""
    results = []
    for layer in (theirs, ours):
        xg = x.clone().requires_grad_(True)
        y = layer(xg)
        y.backward(dy)
        results.append((y.detach().double(), xg.grad.double()))
        for p in layer.parameters():
            p.grad = None
    return max(float((a - b).norm() / b.norm()) for a, b in zip(*results, strict=True))


def peak_mib(run: Callable[[], None]) -> float:
    """Peak CUDA memory of one call beyond what was allocated before it (MiB)."""
    run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    run()
    return (torch.cuda.max_memory_allocated() - start) / 2**20


def median_times(
    calls: list[Callable[[], None]], rounds: int, block: int, retries: int = 20, watch_cpu: bool = True
) -> tuple[list[float], list[list[float]], list[float], int]:
    """Time each call: (median seconds, per-round block medians, median faults per call, blocks redone).

    Each round runs every call in a block of ``block`` timed calls after one untimed call, blocks in a fresh
    random order: a block measures a layer in steady state (what another layer left behind in the allocator and
    caches is paid by the untimed call), and the rounds spread drift on a shared machine over all layers alike.
    A block during which other processes used more than one jiffy of CPU is timed again (up to ``retries``
    times; not with ``watch_cpu=False``, for GPU timings, which other processes' CPU use barely touches)."""
    order = random.Random(0)
    samples: list[list[float]] = [[] for _ in calls]
    per_round: list[list[float]] = [[] for _ in calls]
    faults: list[list[int]] = [[] for _ in calls]
    redone = 0
    for _ in range(rounds):
        for i in order.sample(range(len(calls)), len(calls)):
            for attempt in range(retries + 1):
                calls[i]()
                before, times, flts = others_busy(), [], []
                for _ in range(block):
                    f0 = minor_faults()
                    start = time.perf_counter()
                    calls[i]()
                    times.append(time.perf_counter() - start)
                    flts.append(minor_faults() - f0)
                after = others_busy()
                if (
                    not watch_cpu
                    or before is None
                    or after is None
                    or after - before <= 1
                    or attempt == retries
                ):
                    break
                redone += 1
                time.sleep(0.05)
            samples[i].extend(times)
            per_round[i].append(statistics.median(times))
            faults[i].extend(flts)
    return (
        [statistics.median(s) for s in samples],
        per_round,
        [statistics.median(f) for f in faults],
        redone,
    )


def _spread(per_round: list[list[float]], layer: int) -> list[float]:
    """Quartiles of the per-round ratio layer / base (index 0)."""
    ratios = [t / base for t, base in zip(per_round[layer], per_round[0], strict=True)]
    return statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3


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


def measure(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Ratios to the base layer and saved-tensor MiB for one kind, in this process."""
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.dim, generator=gen).to(args.device, dtype)
    dy = torch.randn(args.tokens, args.dim, generator=gen).to(args.device, dtype)
    base, theirs, ours = build(kind, args.dim, args.rank, args.device, dtype)
    layers = (base, theirs, ours)
    fwd, fwd_rounds, fwd_flt, fwd_redone = median_times(
        [forward(m, x, dy) for m in layers], args.rounds, args.block, watch_cpu=not x.is_cuda
    )
    fb, fb_rounds, fb_flt, fb_redone = median_times(
        [forward_backward(m, x, dy) for m in layers],
        args.rounds,
        args.block,
        watch_cpu=not x.is_cuda,
    )
    peaks = (
        [peak_mib(forward_backward(m, x, dy)) for m in (base, theirs, ours)] if x.is_cuda else [0.0, 0.0, 0.0]
    )
    return {
        "peak_mib": peaks,
        "rel_err": disagreement(theirs, ours, x, dy),
        "fwd_peft": fwd[1] / fwd[0],
        "fwd_ours": fwd[2] / fwd[0],
        "fb_peft": fb[1] / fb[0],
        "fb_ours": fb[2] / fb[0],
        "fwd_ours_quartiles": _spread(fwd_rounds, 2),
        "fb_ours_quartiles": _spread(fb_rounds, 2),
        "fwd_faults": fwd_flt,
        "fb_faults": fb_flt,
        "redone_blocks": fwd_redone + fb_redone,
        "mem_peft": saved_bytes(theirs, x) / 2**20,
        "mem_ours": saved_bytes(ours, x) / 2**20,
        "base_fwd_ms": fwd[0] * 1e3,
        "base_fb_ms": fb[0] * 1e3,
    }


STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**32)}
"""glibc tunables (read at process start) that keep freed memory mapped: no page faults on reuse."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=9, help="blocks per layer (medians over all blocks)")
    parser.add_argument("--block", type=int, default=3, help="timed calls per block")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trials", type=int, default=3, help="fresh processes per kind (medians shown)")
    parser.add_argument(
        "--steady-malloc", action="store_true", help="glibc keeps freed memory mapped (see the docstring)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--in-process", action="store_true", help="all kinds and trials in this process")
    parser.add_argument(
        "--one", choices=KINDS, help=argparse.SUPPRESS
    )  # internal: measure one kind, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    env = {**os.environ, **(STEADY_MALLOC if args.steady_malloc else {})}
    on_gpu = args.device.startswith("cuda")
    where = torch.cuda.get_device_name() if on_gpu else f"{args.threads} threads"
    print(
        f"torch {torch.__version__}, {where}, Linear {args.dim}x{args.dim}, {args.tokens} tokens, "
        f"{args.dtype} base, median of {args.rounds}x{args.block} calls; {args.trials} trials per kind "
        f"{'in this process' if args.in_process else 'in fresh processes'}; "
        f"allocator: {'steady (glibc thresholds raised)' if args.steady_malloc else 'glibc defaults'}"
    )
    header = (
        f"{'kind':8} | {'fwd PEFT':>8} {'fwd ours':>8} {'ours/PEFT':>9} {'range':>11} | "
        f"{'f+b PEFT':>8} {'f+b ours':>8} {'ours/PEFT':>9} {'range':>11} | {'saved MiB PEFT':>14} {'ours':>6} | "
        f"{'flt f+b base/PEFT/ours':>22}"
    )
    print(header)
    print("-" * len(header))
    for kind in args.kinds:
        # a fresh process per kind: the allocator's state after one kind's runs skews the next kind's timings
        command = [sys.executable, __file__, "--one", kind, *sys.argv[1:]]
        trials = []
        for _ in range(args.trials):
            if args.in_process:
                trials.append(measure(kind, args))
                continue
            done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
            trials.append(json.loads(done.stdout.strip().splitlines()[-1]))
        # each column is the median over the trials; picking one trial by its base time would bias the ratios (a
        # trial whose base layer happened to run fast shows every ratio too high)
        med = {
            key: statistics.median(t[key] for t in trials)
            for key in ("fwd_peft", "fwd_ours", "fb_peft", "fb_ours")
        }
        fwd_vs = sorted(t["fwd_ours"] / t["fwd_peft"] for t in trials)
        fb_vs = sorted(t["fb_ours"] / t["fb_peft"] for t in trials)
        fb_ours = sorted(t["fb_ours"] for t in trials)
        r = sorted(trials, key=lambda t: t["fb_ours"])[len(trials) // 2]  # the median trial, for the details
        faults = "/".join(f"{f:g}" for f in r["fb_faults"][:3])
        peaks = f"; ours vs PEFT rel err {r['rel_err']:.1e}" + (
            "; peak f+b MiB base/PEFT/ours " + "/".join(f"{m:.1f}" for m in r["peak_mib"])
            if r["peak_mib"][0]
            else ""
        )
        print(
            f"{kind:8} | {med['fwd_peft']:8.3f} {med['fwd_ours']:8.3f} {statistics.median(fwd_vs):9.3f} "
            f"{fwd_vs[0]:5.3f}-{fwd_vs[-1]:5.3f} | "
            f"{med['fb_peft']:8.3f} {med['fb_ours']:8.3f} {statistics.median(fb_vs):9.3f} "
            f"{fb_vs[0]:5.3f}-{fb_vs[-1]:5.3f} | "
            f"{r['mem_peft']:14.2f} {r['mem_ours']:6.2f} | {faults:>22}   "
            f"(f+b ours over trials {fb_ours[0]:.3f}-{fb_ours[-1]:.3f}, per-round quartiles of the median trial "
            f"{'/'.join(f'{q:.3f}' for q in r['fb_ours_quartiles'])}; base {r['base_fwd_ms']:.1f} / "
            f"{r['base_fb_ms']:.2f} ms; {sum(t['redone_blocks'] for t in trials)} blocks redone{peaks})",
            flush=True,
        )
    print(
        f"ratios are × the plain frozen Linear in the same process, medians over {args.trials} trials per kind; "
        "range = ours/PEFT over the trials; all products through torch's own library (equal footing); "
        "flt = median minor page faults per call (median trial); saved MiB: see the module docstring"
    )


if __name__ == "__main__":
    main()
