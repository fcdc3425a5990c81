"""peftdecl's ``AdapterPool`` next to HF PEFT serving a mixed batch, and adapter load latency from disk.

A Llama-shaped ``LlamaForCausalLM`` built from a config (random weights, seed 0; default hidden 256, 4 layers,
8 heads / 4 KV heads, MLP 688, vocab 2048), LoRA r 16, alpha 32 on q/k/v/o/gate/up/down, random non-zero A and B
(PEFT's ``init_lora_weights=False``), saved by PEFT. One batch of 16 rows × 16 tokens, 2 rows per adapter over 8
adapters, float32 on the CPU under ``torch.inference_mode``. Timed in the same process, in blocks, in a random order
over several rounds (medians; a block during which other processes used the CPU is timed again, twice at most):

    base            the plain model on the batch (no adapter): the floor every adapted forward sits on
    pool            ``pool(ids, adapter_names=rows)``: peftdecl's mixed batch, all 8 adapters resident (hits)
    PEFT mixed      ``peft_model(ids, adapter_names=rows)``: PEFT's own mixed-batch forward
    PEFT loop       per adapter: ``set_adapter(a)``, then the forward of that adapter's rows (8 forwards)
    peftdecl loop   the same loop through peftdecl's ``set_adapter`` (for reference)

Load latency (each load takes an adapter that is not attached; the files are in the OS page cache after the first
pass, as on a server that reads the same adapters again):

    pool miss       read + validate + attach inside the pool (its ``stats.load_seconds`` per load; the pool is full,
                    so each load also detaches the least recently used adapter)
    pool request    the whole first request for that adapter: the miss plus a forward of one row
    PEFT            ``peft_model.load_adapter(folder, name)`` (the untimed ``delete_adapter`` keeps it at 8)

Before timing, the pool's logits are checked against PEFT's mixed batch and PEFT's loop (relative error ≤ 1e-4,
float32); the script exits non-zero when they disagree.

    .venv/bin/python benchmarks/compare_pool.py [--rounds 5] [--block 2] [--loads 12] [--threads 2]
        [--out benchmarks/results/pool_cpu] [--quick] [--device cuda] [--rows 16] [--seq 16] [--adapters 8]

``--device cuda`` times the same calls on a GPU (each call then waits for the device), where the torch backend
runs each layer's mixed batch in one launch of the CuPy mixed-batch kernels (``PEFTDECL_CUDA_KERNELS=0``: its
torch loop); ``--seq 1`` times one decode step's shape.

``--quick``: toy sizes and one round (seconds; a smoke test, its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from compare_torch_peft import median_times  # benchmarks/compare_torch_peft.py, beside this script

import peftdecl

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32
AGREEMENT_TOL = 1e-4  # float32 logits of the same function, summed in other orders


def sizes(args: argparse.Namespace) -> dict[str, int]:
    if args.quick:
        return dict(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64, vocab=64, seq=8)
    return dict(
        hidden=args.hidden,
        layers=args.layers,
        heads=8,
        kv_heads=4,
        intermediate=args.intermediate,
        vocab=2048,
        seq=args.seq,
    )


def base_model(size: dict[str, int]) -> Any:
    config = transformers.LlamaConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"],
        intermediate_size=size["intermediate"],
        max_position_embeddings=max(256, size["seq"]),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def save_adapters(model: Any, root: Path, count: int) -> list[str]:
    """``count`` PEFT LoRA adapters of ``model`` (random A and B) saved as ``root/p00``, ``root/p01``, ..."""
    names = []
    for i in range(count):
        torch.manual_seed(100 + i)
        config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
        peft.get_peft_model(copy.deepcopy(model), config).save_pretrained(root / f"p{i:02d}")
        names.append(f"p{i:02d}")
    return names


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def grouped(rows: list[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(rows):
        groups.setdefault(name, []).append(i)
    return groups


def looped(
    model: Any, set_adapter: Callable[[str], None], ids: torch.Tensor, rows: list[str]
) -> torch.Tensor:
    """One ``set_adapter`` and forward per adapter group, the logits put back in row order."""
    out = None
    for name, index in grouped(rows).items():
        set_adapter(name)
        logits = model(ids[index]).logits
        if out is None:
            out = logits.new_empty((len(rows), *logits.shape[1:]))
        out[index] = logits
    assert out is not None
    return out


def waited(call: Callable[[], Any]) -> Callable[[], None]:
    """``call`` then a wait for the device, so that a GPU call is timed to its end."""

    def run() -> None:
        call()
        torch.cuda.synchronize()

    return run


def load_latencies(
    args: argparse.Namespace, pool: Any, theirs: Any, root: Path, spare: list[str]
) -> dict[str, Any]:
    """Median seconds of a pool miss, of a whole first request, and of PEFT's load_adapter, over ``spare``."""
    one = torch.zeros((1, 4), dtype=torch.long, device=args.device)
    miss, request, peft_load = [], [], []
    for name in spare:
        loaded_before = pool.stats.load_seconds
        start = time.perf_counter()
        pool(one, adapter_names=[name])
        request.append(time.perf_counter() - start)
        miss.append(pool.stats.load_seconds - loaded_before)
        start = time.perf_counter()
        theirs.load_adapter(str(root / name), adapter_name=name)
        peft_load.append(time.perf_counter() - start)
        theirs.delete_adapter(name)
    return {
        "pool_miss_s": statistics.median(miss),
        "pool_request_s": statistics.median(request),
        "peft_load_adapter_s": statistics.median(peft_load),
        "loads": len(spare),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block", type=int, default=2)
    parser.add_argument("--loads", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/pool_cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.block, args.loads = 1, 1, 2
    torch.set_num_threads(args.threads)
    size = sizes(args)
    model = base_model(size).to(args.device)
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    names = save_adapters(model, root, args.adapters + args.loads)
    serving, spare = names[: args.adapters], names[args.adapters :]
    rows = [serving[i % len(serving)] for i in range(args.rows)]
    ids = torch.randint(
        0, size["vocab"], (args.rows, size["seq"]), generator=torch.Generator().manual_seed(1)
    ).to(args.device)

    pool = peftdecl.AdapterPool(copy.deepcopy(model), len(serving), root)
    theirs = peft.PeftModel.from_pretrained(
        copy.deepcopy(model), str(root / serving[0]), adapter_name=serving[0]
    )
    for name in serving[1:]:
        theirs.load_adapter(str(root / name), adapter_name=name)
    theirs.eval()
    ours_loop = peftdecl.AdaptedModel.create(peftdecl.get_backend("torch"), copy.deepcopy(model))
    for name in serving:
        ours_loop.load_adapter(root / name, name)

    with torch.inference_mode():
        mixed_pool = pool(ids, adapter_names=rows).logits
        errors = {
            "pool vs PEFT mixed": rel_err(mixed_pool, theirs(ids, adapter_names=rows).logits),
            "pool vs PEFT loop": rel_err(mixed_pool, looped(theirs, theirs.set_adapter, ids, rows)),
            "pool vs peftdecl loop": rel_err(mixed_pool, looped(ours_loop, ours_loop.set_adapter, ids, rows)),
        }
        if max(errors.values()) > AGREEMENT_TOL:
            sys.exit(f"disagreement above {AGREEMENT_TOL}: {errors}")
        if rel_err(mixed_pool, model(ids).logits) < 1e-3:
            sys.exit("the adapters do not change the logits: the agreement check would prove nothing")
        calls = {
            "base": lambda: model(ids),
            "pool": lambda: pool(ids, adapter_names=rows),
            "PEFT mixed": lambda: theirs(ids, adapter_names=rows),
            "PEFT loop": lambda: looped(theirs, theirs.set_adapter, ids, rows),
            "peftdecl loop": lambda: looped(ours_loop, ours_loop.set_adapter, ids, rows),
        }
        started = time.perf_counter()
        gpu = torch.device(args.device).type == "cuda"
        timed = [waited(call) for call in calls.values()] if gpu else list(calls.values())
        medians, _, _, redone = median_times(timed, args.rounds, args.block, retries=2, watch_cpu=not gpu)
        forward = dict(zip(calls, medians, strict=True))
        loads = load_latencies(args, pool, theirs, root, spare)
        elapsed = time.perf_counter() - started
    tmp.cleanup()
    report(args, size, errors, forward, loads, redone, elapsed, pool.stats)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else device


def report(
    args: argparse.Namespace,
    size: dict[str, int],
    errors: dict[str, float],
    forward: dict[str, float],
    loads: dict[str, Any],
    redone: int,
    elapsed: float,
    stats: Any,
) -> None:
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    header = (
        f"compare_pool: torch {torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}, "
        f"{args.threads} threads, {os.cpu_count()} CPUs ({machine}), {device_name(args.device)}, CUDA kernels "
        f"{os.environ.get('PEFTDECL_CUDA_KERNELS', '1')}; Llama hidden {size['hidden']}, {size['layers']} "
        f"layers, {size['heads']}/{size['kv_heads']} heads, MLP {size['intermediate']}, vocab {size['vocab']}; "
        f"LoRA r {RANK} alpha {ALPHA} on {len(TARGETS)} projections; batch {args.rows} rows x {size['seq']} tokens "
        f"over {args.adapters} adapters; {args.rounds} rounds x {args.block} calls ({redone} blocks redone)"
    )
    lines = [
        header,
        "",
        "| forward (mixed batch) | median ms | / base | pool / this |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, seconds in forward.items():
        lines.append(
            f"| {name} | {seconds * 1e3:.2f} | {seconds / forward['base']:.2f} | {forward['pool'] / seconds:.2f} |"
        )
    lines += [
        "",
        f"| load from disk ({loads['loads']} loads, median) | ms | / PEFT load_adapter |",
        "| --- | ---: | ---: |",
    ]
    for key, label in [
        ("pool_miss_s", "pool miss (read + attach)"),
        ("pool_request_s", "pool first request (miss + 1-row forward)"),
        ("peft_load_adapter_s", "PEFT load_adapter"),
    ]:
        lines.append(
            f"| {label} | {loads[key] * 1e3:.2f} | {loads[key] / loads['peft_load_adapter_s']:.2f} |"
        )
    lines += [
        "",
        "agreement (relative error of logits): " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()),
    ]
    lines.append(f"pool stats: {stats}; timed part took {elapsed:.0f} s")
    text = "\n".join(lines)
    print(text)
    if args.quick:
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    record = {
        "header": header,
        "sizes": size,
        "forward_median_s": forward,
        "ratios": {
            "pool / PEFT loop": forward["pool"] / forward["PEFT loop"],
            "pool / PEFT mixed": forward["pool"] / forward["PEFT mixed"],
            "pool / base": forward["pool"] / forward["base"],
            "pool miss / PEFT load_adapter": loads["pool_miss_s"] / loads["peft_load_adapter_s"],
        },
        "loads": loads,
        "agreement_rel_err": errors,
        "blocks_redone": redone,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
