"""Shared setup of the peer benchmarks: one adapted torch Linear built by peftdecl or by HF PEFT, and a short
interleaved timing loop for ratios measured in one process.

Nothing heavy is imported at module level: asv imports every module of the suite to discover benchmarks, also
in environments without torch, PEFT or MLX. ``require`` turns a missing package into the NotImplementedError
that asv shows as a skipped benchmark.

Every side computes its products through torch's own library (the frozen nn.Linear or F.linear inside the
adapter layers) on 2 threads: the ratios measure what an adapter adds, not a different GEMM.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

THREADS = 2
SMOKE = os.environ.get("PEFTDECL_ASV_SMOKE") == "1"
"""Set by tests/test_asv_benches.py: tiny shapes and one short timing round, so every body runs in seconds."""
DIM = 64 if SMOKE else 512
TOKENS = 32 if SMOKE else 512
RANK = 16
KINDS = ("lora", "dora", "adalora", "ia3", "loha", "lokr", "oft", "boft", "vera")
NOT_TRIVIAL = 0.01
"""Scale of the random values added to every trainable adapter tensor (a fresh LoRA's B is zero, …), so the
adapter's arithmetic is not skipped or trivially cheap on either side."""


def require(module: str, what: str | None = None) -> Any:
    """Import ``module``, or raise the NotImplementedError asv reports as a skip."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise NotImplementedError(f"{what or module} is not installed") from exc


def unsupported(what: str, exc: BaseException) -> NotImplementedError:
    """The skip for an older peftdecl that lacks an API or a kind (asv runs this suite against old commits)."""
    return NotImplementedError(f"{what} is not available at this commit ({type(exc).__name__}: {exc})")


def fields(kind: str, dim: int = DIM) -> dict[str, Any]:
    """The adapter's fields on module ``m``, the same for peftdecl's spec and PEFT's config class.

    r = 16 (VeRA 256 capped at the width, OFT and BOFT blocks of 32), non-zero initialisation where the kind
    offers it."""
    target = ["m"]
    block = min(32, dim // 2)
    table: dict[str, dict[str, Any]] = {
        "lora": {"r": RANK, "lora_alpha": 2 * RANK, "init_lora_weights": False},
        "dora": {"r": RANK, "lora_alpha": 2 * RANK, "init_lora_weights": False, "use_dora": True},
        "adalora": {"init_r": RANK, "target_r": RANK // 2, "total_step": 100, "lora_alpha": 2 * RANK},
        "ia3": {"feedforward_modules": [], "init_ia3_weights": False},
        "loha": {"r": RANK, "alpha": 2 * RANK, "init_weights": False},
        "lokr": {"r": RANK, "alpha": 2 * RANK, "init_weights": False},
        "oft": {"r": 0, "oft_block_size": block, "init_weights": False},
        "boft": {"boft_block_size": block, "boft_n_butterfly_factor": 1, "init_weights": False},
        "vera": {"r": min(256, dim), "init_weights": False},
    }
    return {**table[kind], "target_modules": target}


PEFT_TYPE = {"lora": "LORA", "dora": "LORA", "adalora": "ADALORA", "ia3": "IA3", "loha": "LOHA",
             "lokr": "LOKR", "oft": "OFT", "boft": "BOFT", "vera": "VERA"}  # fmt: skip
PEFT_CONFIG = {"lora": "LoraConfig", "dora": "LoraConfig", "adalora": "AdaLoraConfig", "ia3": "IA3Config",
               "loha": "LoHaConfig", "lokr": "LoKrConfig", "oft": "OFTConfig", "boft": "BOFTConfig",
               "vera": "VeraConfig"}  # fmt: skip


def _holder(torch: Any, layer: Any) -> Any:
    holder = torch.nn.Sequential()
    holder.add_module("m", layer)
    return holder


def _perturb(torch: Any, params: list[Any]) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in params:
            param.add_(NOT_TRIVIAL * torch.randn(param.shape, generator=gen).to(param))


def torch_layer(kind: str, implementation: str, dim: int = DIM) -> Any:
    """One Linear dim×dim (bias, float32, seed 0) as ``frozen`` (the plain layer, no gradient for its weight),
    ``peftdecl`` (peftdecl.attach's layer) or ``peft`` (HF PEFT's layer), in training mode."""
    torch = require("torch")
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    base = torch.nn.Linear(dim, dim).requires_grad_(False)
    if implementation == "frozen":
        return base.train()
    if implementation == "peft":
        peft = require("peft", "HF PEFT")
        config = getattr(peft, PEFT_CONFIG[kind])(**fields(kind, dim))
        theirs = peft.get_peft_model(_holder(torch, base), config).base_model.model.m
        _perturb(torch, [p for p in theirs.parameters() if p.requires_grad])
        return theirs.train()
    import peftdecl

    try:
        model = peftdecl.attach(
            _holder(torch, base), {"peft_type": PEFT_TYPE[kind], **fields(kind, dim)}, seed=0
        )
        params = list(model.trainable_parameters().values())
        ours = model.engine.layer("m")
    except NotImplementedError:
        raise
    except Exception as exc:  # an older commit without this kind on torch, or without this API
        raise unsupported(f"peftdecl's torch {kind}", exc) from exc
    _perturb(torch, params)
    return ours.train()


def torch_calls(layer: Any, tokens: int = TOKENS, dim: int = DIM) -> dict[str, Callable[[], None]]:
    """``forward`` (y = layer(x) under no_grad) and ``forward_backward`` (y.backward(dy): gradients w.r.t. x
    and the trainable parameters) on fixed random x, dy (seed 0)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, dim, generator=gen)
    dy = torch.randn(tokens, dim, generator=gen)
    xg = x.clone().requires_grad_(True)
    params = [p for p in layer.parameters() if p.requires_grad]

    def forward() -> None:
        with torch.no_grad():
            layer(x)

    def forward_backward() -> None:
        xg.grad = None
        for param in params:
            param.grad = None
        layer(xg).backward(dy)

    return {"forward": forward, "forward_backward": forward_backward}


def others_busy() -> int | None:
    """CPU time (jiffies) that other processes have used so far, None where /proc is missing (Linux only)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        mine = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    busy = sum(int(fields[i]) for i in (0, 1, 2, 5, 6, 7))  # user nice system irq softirq steal
    return busy - int(mine[11]) - int(mine[12])


def min_times(
    calls: list[Callable[[], None]], rounds: int = 5, block: int = 2, retries: int = 3
) -> list[float]:
    """Seconds per call of each of ``calls``: the fastest single call over ``rounds`` rounds of ``block`` calls.

    Each round runs every call once untimed, then ``block`` times timed, the calls in a rotated order, so slow
    drift on a shared machine touches all of them alike. Another process taking the CPU only ever adds time, so
    the fastest call is the least disturbed one; a block during which other processes used the CPU (more than
    one jiffy, from /proc/stat) is timed again, up to ``retries`` times."""
    if SMOKE:
        rounds, block, retries = 1, 1, 0
    best = [float("inf")] * len(calls)
    for round_ in range(rounds):
        shift = round_ % len(calls)
        for i in [*range(shift, len(calls)), *range(shift)]:
            for attempt in range(retries + 1):
                calls[i]()
                before = others_busy()
                for _ in range(block):
                    began = time.perf_counter()
                    calls[i]()
                    best[i] = min(best[i], time.perf_counter() - began)
                after = others_busy()
                if before is None or after is None or after - before <= 1 or attempt == retries:
                    break
                time.sleep(0.05)
    return best
