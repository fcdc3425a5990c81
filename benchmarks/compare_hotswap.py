"""peftdecl's hotswap_adapter next to HF PEFT's under torch.compile: swap time, compiled forward, recompilations.

The model is transformers' LlamaForCausalLM from a LlamaConfig (default: 8 layers, hidden 1024, 16 heads,
intermediate 2752 as in Llama, vocabulary 256), float32, CPU. Three PEFT LoRA adapters on q_proj, k_proj, v_proj,
o_proj are saved to disk: ``first`` (r 16, alpha 32), ``second`` (r 8, alpha 24) and ``third`` (r 32, alpha 16).
Each side loads ``first`` (peftdecl: ``load_adapter``; PEFT: ``PeftModel.from_pretrained``), prepares for swaps of
other ranks and alphas (``prepare_for_hotswap(target_rank=32)``; PEFT: ``prepare_model_for_compiled_hotswap``),
runs once eagerly on 4 tokens (unless ``--compile-first``: peftdecl resolves its kinds' ops on the first call,
an import dynamo cannot trace, so compiling first costs graph breaks), is compiled with ``torch.compile`` and run
once; then ``second`` and ``third`` are swapped in turn ``--swaps`` times
(peftdecl: ``model.hotswap_adapter(folder, "default")``; PEFT: ``peft.utils.hotswap.hotswap_adapter``), each swap
timed as one whole call (reading the folder included), each followed by timed compiled forwards on
``--tokens`` tokens. The compile backend wraps Inductor (``--compile-backend``) and counts the graphs dynamo hands
it: after the first compilation the count must not grow (0 recompilations). Each compiled output after a swap is
checked against PEFT's eager model freshly loaded from the swapped folder.

    .venv/bin/python benchmarks/compare_hotswap.py [--layers 8] [--hidden 1024] [--tokens 128] [--swaps 8]
        [--forwards 5] [--threads 2] [--compile-first] [--compile-backend inductor|aot_eager|eager]
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
import transformers
from peft.utils.hotswap import hotswap_adapter as peft_hotswap
from peft.utils.hotswap import prepare_model_for_compiled_hotswap

import peftdecl

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
ADAPTERS = {"first": (16, 32), "second": (8, 24), "third": (32, 16)}  # name -> (r, lora_alpha)
TARGET_RANK = max(r for r, _ in ADAPTERS.values())


class CountingBackend:
    """A torch.compile backend that counts the graphs dynamo compiles, then hands each to ``inner``."""

    def __init__(self, inner: str) -> None:
        self.inner = inner
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        self.graphs += 1
        if self.inner == "eager":
            return gm.forward
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(self.inner)(gm, example_inputs)


def base_model(args: argparse.Namespace) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11008 // 4096,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def save_adapters(base: torch.nn.Module, root: Path) -> dict[str, Path]:
    """The three adapters with random A and B, saved by PEFT."""
    folders = {}
    for seed, (name, (rank, alpha)) in enumerate(ADAPTERS.items(), start=1):
        torch.manual_seed(seed)
        config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)
        model = peft.get_peft_model(copy.deepcopy(base), config)
        model.save_pretrained(root / name)
        folders[name] = root / name
    return folders


def logits(model: Any, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=ids).logits.double().numpy()  # type: ignore[no-any-return]


def prepared(
    which: str, base: torch.nn.Module, folders: dict[str, Path], args: argparse.Namespace
) -> dict[str, Any]:
    """``first`` loaded and prepared on one side, compiled (not yet run): the compiled module, its swap, its counter."""
    if which == "peftdecl":
        adapted = peftdecl.load_adapter(copy.deepcopy(base), folders["first"])
        adapted.prepare_for_hotswap(target_rank=TARGET_RANK)
        module = adapted.base_model

        def swap(folder: Path) -> None:
            adapted.hotswap_adapter(folder, "default")

    else:
        module = peft.PeftModel.from_pretrained(copy.deepcopy(base), folders["first"])
        prepare_model_for_compiled_hotswap(module, target_rank=TARGET_RANK)

        def swap(folder: Path) -> None:
            peft_hotswap(module, str(folder), adapter_name="default")

    if not args.compile_first:  # peftdecl resolves kinds' ops on first use, which dynamo cannot trace
        logits(module, torch.zeros((1, 4), dtype=torch.long))
    counter = CountingBackend(args.compile_backend)
    return {"compiled": torch.compile(module, backend=counter), "swap": swap, "counter": counter}


def measure(
    sides: dict[str, dict[str, Any]], folders: dict[str, Path], ids: torch.Tensor, args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Compile each side (first call), then ``args.swaps`` rounds: in a random side order, swap (``second`` and
    ``third`` in turn) and run the compiled model ``args.forwards`` times. Times, graph counts, outputs."""
    results: dict[str, dict[str, Any]] = {}
    for which, state in sides.items():
        start = time.perf_counter()
        logits(state["compiled"], ids)
        results[which] = {
            "compile_s": time.perf_counter() - start,
            "graphs": state["counter"].graphs,
            "swaps": [],
            "forwards": [],
            "outputs": {},
        }
    order = random.Random(0)
    for index in range(args.swaps):
        name = ("second", "third")[index % 2]
        for which in order.sample(list(sides), len(sides)):
            state, result = sides[which], results[which]
            start = time.perf_counter()
            state["swap"](folders[name])
            result["swaps"].append(time.perf_counter() - start)
            result["outputs"][name] = logits(state["compiled"], ids)
            times = []
            for _ in range(args.forwards):
                start = time.perf_counter()
                logits(state["compiled"], ids)
                times.append(time.perf_counter() - start)
            result["forwards"].append(statistics.median(times))
    for which, result in results.items():
        result["recompiles"] = sides[which]["counter"].graphs - result["graphs"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--swaps", type=int, default=8, help="swap rounds, alternating second and third")
    parser.add_argument("--forwards", type=int, default=5, help="timed compiled forwards after each swap")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--compile-first",
        action="store_true",
        help="no eager call before compiling (see the module docstring)",
    )
    parser.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager", "eager"])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    base = base_model(args)
    ids = torch.randint(0, 256, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as root:
        folders = save_adapters(base, Path(root))
        expected = {  # PEFT's eager model freshly loaded from each folder
            name: logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), folders[name]), ids)
            for name in ("second", "third")
        }
        torch._dynamo.reset()
        sides = {which: prepared(which, base, folders, args) for which in ("PEFT", "peftdecl")}
        results = measure(sides, folders, ids, args)
    first = ", compiled on the first call" if args.compile_first else ", compiled after one eager call"
    print(
        f"torch {torch.__version__}, peft {peft.__version__}, {args.threads} threads, torch.compile backend "
        f"{args.compile_backend} (counted{first}); Llama {args.layers} layers, hidden {args.hidden}, {args.tokens} "
        f"tokens; LoRA on {','.join(TARGETS)} ({4 * args.layers} layers) prepared to rank {TARGET_RANK}, swaps "
        f"alternate r 8 / alpha 24 and r 32 / alpha 16 ({args.swaps} swaps, {args.forwards} forwards each)"
    )
    header = (
        f"{'side':9} | {'compile+1st s':>13} | {'graphs':>6} | {'swap ms':>8} | {'fwd ms':>7} | "
        f"{'recompiles':>10} | {'max |Δlogit| vs fresh PEFT':>26}"
    )
    print(header)
    print("-" * len(header))
    for which, result in results.items():
        error = max(float(np.abs(result["outputs"][n] - expected[n]).max()) for n in result["outputs"])
        print(
            f"{which:9} | {result['compile_s']:13.1f} | {result['graphs']:6d} | "
            f"{1e3 * statistics.median(result['swaps']):8.1f} | {1e3 * statistics.median(result['forwards']):7.1f} | "
            f"{result['recompiles']:10d} | {error:26.1e}"
        )
    ours, theirs = results["peftdecl"], results["PEFT"]
    for what in ("swaps", "forwards"):  # per round: both sides ran under that round's load
        ratios = sorted(o / t for o, t in zip(ours[what], theirs[what], strict=True))
        print(
            f"peftdecl/PEFT {what[:-1]}: median {statistics.median(ratios):.3f} over {len(ratios)} rounds "
            f"(range {ratios[0]:.3f}-{ratios[-1]:.3f})"
        )
    print("swap: one whole call, reading the folder from disk, on both sides; fwd: median compiled forward")


if __name__ == "__main__":
    main()
