"""peftdecl's add_weighted_adapter next to HF PEFT's on a Llama-shaped model: seconds per call in the same process.

The model is transformers' LlamaForCausalLM from a LlamaConfig (default: 32 layers, hidden 1024, 16 heads,
intermediate 2752 = hidden × 11008 / 4096 as in Llama 7B, vocabulary 256), float32. Four LoRA adapters (r 16,
lora_alpha 32, 16, 8, 32, random A and B: ``init_lora_weights=False``) target q_proj, k_proj, v_proj and o_proj
of every layer (128 layers of 1024×1024). PEFT makes them; peftdecl gets the same tensors: on the torch backend
(a copy of the same base model) and on the NumPy backend (the targeted weights as a state dict). Each combination
type is then timed as one whole call, ``add_weighted_adapter(["a0".."a3"], weights, "m", combination_type=...,
density=0.5)`` (a new adapter on every targeted layer, PEFT's injection of its modules included), followed by an
untimed ``delete_adapter("m")``; each round runs the sides in a fresh random order and the table shows medians
over the rounds.

Libraries: PEFT computes in float32 torch (MKL, LAPACK's SVD of each 1024×1024 ΔW); peftdecl computes the
combination in float64 NumPy (OpenBLAS) on both backends, then copies the result into the backend's tensors.
Both get ``--threads`` threads (torch.set_num_threads; OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS
set before the libraries load). Agreement: the new adapter's B A (svd, cat) or its factors (the other
deterministic types) against PEFT's, the largest relative Frobenius error over the layers; DARE's masks are drawn
differently on each side (not compared).

    .venv/bin/python benchmarks/compare_combine.py [--layers 32] [--hidden 1024] [--rank 16]
        [--types svd ties cat linear dare_linear] [--backends torch numpy] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALPHAS = [32, 16, 8, 32]
WEIGHTS = [0.5, 0.3, -0.2, 0.4]
TYPES = ("svd", "ties", "cat", "linear", "dare_linear", "ties_svd", "magnitude_prune", "dare_ties")
DETERMINISTIC = ("svd", "ties", "cat", "linear", "ties_svd", "magnitude_prune")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--types", nargs="+", default=["svd", "ties", "cat", "linear", "dare_linear"], choices=TYPES
    )
    parser.add_argument("--backends", nargs="+", default=["torch", "numpy"], choices=["torch", "numpy"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def pin_threads(threads: int) -> None:
    """Re-run this script with the BLAS thread variables set: OpenBLAS reads them once, when NumPy loads."""
    wanted = {name: str(threads) for name in THREAD_VARIABLES}
    if any(os.environ.get(name) != value for name, value in wanted.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **wanted})


def build(args: argparse.Namespace) -> dict[str, Any]:
    """PEFT's model holding the four adapters, and peftdecl's models holding the same tensors."""
    import peft
    import torch
    import transformers

    import peftdecl

    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11008 // 4096,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()
    names = [f"a{i}" for i in range(len(ALPHAS))]
    configs = [
        dict(r=args.rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)
        for alpha in ALPHAS
    ]
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**configs[0]), adapter_name=names[0])
    for name, fields in zip(names[1:], configs[1:], strict=True):
        theirs.add_adapter(name, peft.LoraConfig(**fields))
    sides: dict[str, Any] = {"PEFT": theirs}
    targeted = {key: value for key, value in base.state_dict().items() if key.split(".")[-2] in TARGETS}
    for backend in args.backends:
        model: object = base
        if backend == "numpy":  # only the targeted weights: the base is not read by a combination
            model = {key: value.numpy() for key, value in targeted.items()}
        ours = None
        for name, fields in zip(names, configs, strict=True):
            spec = {"peft_type": "LORA", **fields}
            if ours is None:
                ours = peftdecl.attach(model, spec, "init", backend)
                ours.delete_adapter("init")
            ours.add_adapter(name, spec, arrays=factors(theirs, name))
        sides[backend] = ours
    return {"sides": sides, "names": names}


def factors(peft_model: Any, name: str) -> dict[str, Any]:
    """One adapter's A and B of every layer, as float32 NumPy arrays keyed as peftdecl and PEFT's files key them."""
    out = {}
    for module_name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and name in module.lora_A:
            out[f"{module_name}.lora_A.weight"] = module.lora_A[name].weight.detach().numpy()
            out[f"{module_name}.lora_B.weight"] = module.lora_B[name].weight.detach().numpy()
    return out


def combiner(model: Any, names: list[str], kind: str) -> Callable[[], None]:
    def run() -> None:
        model.add_weighted_adapter(names, WEIGHTS, "m", combination_type=kind, density=0.5)

    return run


def disagreement(expected: dict[str, Any], got: dict[str, Any], kind: str) -> float:
    """Largest relative Frobenius error over the layers: of B A for svd/cat, else of each factor."""
    import numpy as np

    worst = 0.0
    for key in (k for k in expected if k.endswith("lora_A.weight")):
        b_key = key.replace("lora_A", "lora_B")
        pairs = (
            [(expected[b_key] @ expected[key], got[b_key] @ got[key])]
            if kind in ("svd", "cat") or kind.endswith("_svd")
            else [(expected[key], got[key]), (expected[b_key], got[b_key])]
        )
        for want, have in pairs:
            want, have = np.asarray(want, np.float64), np.asarray(have, np.float64)
            worst = max(worst, float(np.linalg.norm(have - want) / np.linalg.norm(want)))
    return worst


def exported(side: str, model: Any) -> dict[str, Any]:
    if side == "PEFT":
        return {k: v.astype("float64") for k, v in factors(model, "m").items()}
    return dict(model.engine.export("m"))


def measure(built: dict[str, Any], kind: str, rounds: int) -> dict[str, Any]:
    """Median seconds per side over ``rounds``, the agreement with PEFT, and other processes' CPU share."""
    from _machine import others_busy  # benchmarks/_machine.py, beside this script

    sides, names = built["sides"], built["names"]
    times: dict[str, list[float]] = {side: [] for side in sides}
    busy: list[float] = []
    errors: dict[str, float] = {}
    order = random.Random(kind)
    for round_index in range(rounds):
        results = {}
        for side in order.sample(list(sides), len(sides)):
            run = combiner(sides[side], names, kind)
            before = others_busy()
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            after = others_busy()
            times[side].append(elapsed)
            if before is not None and after is not None:
                busy.append((after - before) / os.sysconf("SC_CLK_TCK") / elapsed)
            if round_index == 0 and kind in DETERMINISTIC:
                results[side] = exported(side, sides[side])
            sides[side].delete_adapter("m")
        for side, arrays in results.items():
            if side != "PEFT":
                errors[side] = disagreement(results["PEFT"], arrays, kind)
    ratios = {  # per round: both sides ran under that round's load
        side: sorted(t / p for t, p in zip(times[side], times["PEFT"], strict=True)) for side in sides
    }
    return {
        "median": {side: statistics.median(t) for side, t in times.items()},
        "ratio": {side: statistics.median(r) for side, r in ratios.items()},
        "range": {side: (r[0], r[-1]) for side, r in ratios.items()},
        "errors": errors,
        "others_cores": statistics.median(busy) if busy else float("nan"),
    }


def main() -> None:
    args = parse()
    pin_threads(args.threads)
    import numpy as np
    import peft
    import torch

    torch.set_num_threads(args.threads)
    built = build(args)
    blas = "MKL" if torch.backends.mkl.is_available() else "torch's BLAS"
    numpy_blas = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {}).get("name", "?")
    print(
        f"torch {torch.__version__} ({blas}), peft {peft.__version__}, numpy {np.__version__} ({numpy_blas}), "
        f"{args.threads} threads each; Llama {args.layers} layers, hidden {args.hidden}; 4 LoRA adapters r "
        f"{args.rank} on {','.join(TARGETS)} ({4 * args.layers} layers); median of {args.rounds} calls"
    )
    columns = [side for side in built["sides"] if side != "PEFT"]
    header = f"{'type':15} | {'PEFT s':>8} | " + " | ".join(
        f"{side + ' s':>9} {side + '/PEFT':>11} {'range':>13} {'rel err':>8}" for side in columns
    )
    print(header + " | others' CPU")
    print("-" * (len(header) + 14))
    for kind in args.types:
        result = measure(built, kind, args.rounds)
        peft_s = result["median"]["PEFT"]
        cells = []
        for side in columns:
            error = result["errors"].get(side)
            low, high = result["range"][side]
            cells.append(
                f"{result['median'][side]:9.3f} {result['ratio'][side]:11.3f} {low:6.3f}-{high:6.3f} "
                f"{f'{error:.1e}' if error is not None else 'n/a':>8}"
            )
        print(
            f"{kind:15} | {peft_s:8.3f} | " + " | ".join(cells) + f" | {result['others_cores']:.2f} cores",
            flush=True,
        )
    print(
        "seconds per add_weighted_adapter call (medians); ratio: median over the rounds of the round's peftdecl "
        "time / PEFT time (< 1: peftdecl faster), range over the rounds; rel err: the new adapter "
        "against PEFT's (B A for svd/cat, factors otherwise; n/a: DARE's masks differ); others' CPU: median "
        "cores other processes used during the timed calls"
    )


if __name__ == "__main__":
    main()
