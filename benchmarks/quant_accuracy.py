"""Quantisation error of every weight codec peftdecl reads, on Gaussian and on trained-like weights.

The codecs are peftdecl's NumPy ones (``peftdecl.quant``), which give the same codes and values as bitsandbytes
0.50.2 (``quantize_4bit``/``dequantize_4bit``, ``int8_vectorwise_quant``) and MLX 0.32 (``mx.quantize``/
``mx.dequantize``) bit for bit (tests/test_quant_*.py), so no library is needed here.

For a weight W and its round trip Q(W) = dequantize(quantize(W)), two numbers per codec and weight:

    relative Frobenius error   ‖W − Q(W)‖_F / ‖W‖_F
    max abs error              max |W − Q(W)|   (weights of standard deviation 0.02, as Llama initialises them)

and the storage in bits per weight as the codec stores it (codes, scales, nested scales; the 16- and 256-entry
tables left out). Weights (``--rows`` × ``--cols``, seed 0):

    gaussian       N(0, 0.02²)
    student-t      Student's t with 4 degrees of freedom, scaled to standard deviation 0.02 (heavy tails)
    row-spread     Gaussian rows, each row's scale multiplied by exp(N(0, 0.5²)) (output channels of unequal size)
    outlier-cols   Gaussian with 16 input columns (of 4096: 0.4 %) ten times larger
    trained-like   all three at once: t(4) entries, row spread, outlier columns

The int8 row-wise codec is run with threshold 0 (every weight coded): the LLM.int8 threshold picks outlier
*activation* columns at run time and does not change how the weight is stored. MLX affine is run on float32
weights (float32 scales and biases); a bfloat16 model stores them in bfloat16, which halves their overhead and adds
bfloat16 rounding (the "bfloat16 rounding" row shows that alone).

    .venv/bin/python benchmarks/quant_accuracy.py [--rows 1024] [--cols 4096] [--out benchmarks/results/cpu/qlora]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from peftdecl.quant.affine import dequantize_affine, quantize_affine, round_to_bfloat16
from peftdecl.quant.bnb4 import dequantize_4bit, quantize_4bit
from peftdecl.quant.int8 import dequantize_int8, quantize_int8
from peftdecl.quant.scheme import Quantized, QuantScheme

STD = 0.02
T_DOF = 4
OUTLIER_COLUMNS, OUTLIER_FACTOR = 16, 10.0
ROW_SPREAD = 0.5
TABLES = ("quant_map", "nested_quant_map")  # fixed code tables, not per-weight storage


def weights(rows: int, cols: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The five float32 test weights (see the module docstring)."""
    rng = np.random.default_rng(seed)
    t = rng.standard_t(T_DOF, (rows, cols)) * STD / np.sqrt(T_DOF / (T_DOF - 2))
    row_scale = np.exp(rng.normal(0.0, ROW_SPREAD, (rows, 1)))
    outliers = np.ones((1, cols))
    outliers[0, rng.choice(cols, min(OUTLIER_COLUMNS, cols), replace=False)] = OUTLIER_FACTOR
    gaussian = rng.normal(0.0, STD, (rows, cols))
    found = {
        "gaussian": gaussian,
        "student-t": t,
        "row-spread": rng.normal(0.0, STD, (rows, cols)) * row_scale,
        "outlier-cols": rng.normal(0.0, STD, (rows, cols)) * outliers,
        "trained-like": t * row_scale * outliers,
    }
    return {name: w.astype(np.float32) for name, w in found.items()}


def _round_trip(
    quantize: Callable[[np.ndarray], Quantized], dequantize: Callable[[Quantized], np.ndarray]
) -> Callable[[np.ndarray], tuple[np.ndarray, float]]:
    def run(w: np.ndarray) -> tuple[np.ndarray, float]:
        q = quantize(w)
        stored = q.codes.nbytes + q.scales.nbytes
        stored += sum(v.nbytes for k, v in q.extras.items() if k not in TABLES and k != "outlier_cols")
        return np.asarray(dequantize(q), np.float32), 8.0 * stored / w.size

    return run


def codecs() -> dict[str, Callable[[np.ndarray], tuple[np.ndarray, float]]]:
    """Every codec by its table name: a function from W to (Q(W), bits per weight)."""
    found: dict[str, Callable[[np.ndarray], tuple[np.ndarray, float]]] = {}
    for kind in ("nf4", "fp4"):
        for double in (False, True):
            scheme = QuantScheme(kind, block_size=64, double_quant=double)
            name = f"{kind.upper()} block 64" + (", double quant" if double else "")
            found[name] = _round_trip(lambda w, s=scheme: quantize_4bit(w, s), dequantize_4bit)
    int8 = QuantScheme("int8", threshold=0.0)
    found["int8 row-wise (LLM.int8 weight)"] = _round_trip(lambda w: quantize_int8(w, int8), dequantize_int8)
    for bits in (4, 8):
        for group in (32, 64, 128):
            scheme = QuantScheme("affine", bits=bits, group_size=group)
            found[f"MLX affine {bits}-bit, group {group}"] = _round_trip(
                lambda w, s=scheme: quantize_affine(w, s, dtype="float32"), dequantize_affine
            )
    found["bfloat16 rounding (no quantisation)"] = lambda w: (round_to_bfloat16(w), 16.0)
    return found


def errors(w: np.ndarray, q: np.ndarray) -> dict[str, float]:
    """Relative Frobenius error and max abs error of ``q`` against ``w`` (in float64)."""
    diff = w.astype(np.float64) - q.astype(np.float64)
    return {
        "relative_frobenius": float(np.linalg.norm(diff) / np.linalg.norm(w.astype(np.float64))),
        "max_abs": float(np.abs(diff).max()),
    }


def measure(rows: int, cols: int) -> dict[str, dict]:
    """{codec: {"bits_per_weight": b, "<weight>": {"relative_frobenius": …, "max_abs": …}, …}}."""
    tests = weights(rows, cols)
    found: dict[str, dict] = {}
    for name, run in codecs().items():
        entry: dict = {}
        for label, w in tests.items():
            q, bits = run(w)
            entry[label] = errors(w, q)
            entry["bits_per_weight"] = bits
        found[name] = entry
    return found


def markdown(results: dict[str, dict], rows: int, cols: int) -> list[str]:
    """Two Markdown tables (codecs × weights): relative Frobenius error, then max abs error."""
    scale = {label: float(np.abs(w).max()) for label, w in weights(rows, cols).items()}
    labels = list(scale)
    lines = [f"Weights {rows} × {cols}, float32, seed 0. Relative Frobenius error ‖W − Q(W)‖ / ‖W‖:", ""]
    head = "| codec | bits/weight | " + " | ".join(labels) + " |"
    rule = "| --- | ---: | " + " | ".join("---:" for _ in labels) + " |"
    lines += [head, rule]
    for name, entry in results.items():
        cells = " | ".join(f"{entry[label]['relative_frobenius']:.4f}" for label in labels)
        lines.append(f"| {name} | {entry['bits_per_weight']:.3f} | {cells} |")
    lines += ["", "Max abs error max |W − Q(W)| (the weights' standard deviation is 0.02):", "", head, rule]
    for name, entry in results.items():
        cells = " | ".join(f"{entry[label]['max_abs']:.2e}" for label in labels)
        lines.append(f"| {name} | {entry['bits_per_weight']:.3f} | {cells} |")
    largest = " | ".join(f"{scale[label]:.2e}" for label in labels)
    lines.append(f"| *for scale: max \\|W\\| itself* | 32 | {largest} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=4096, help="a multiple of 128 (MLX's largest group)")
    parser.add_argument("--out", type=Path, default=None, help="write quant_accuracy.md/.json here")
    args = parser.parse_args()
    results = measure(args.rows, args.cols)
    lines = [
        "# python benchmarks/quant_accuracy.py "
        + " ".join(f"--{k} {v}" for k, v in (("rows", args.rows), ("cols", args.cols))),
        "",
        *markdown(results, args.rows, args.cols),
    ]
    print("\n".join(lines))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "quant_accuracy.md").write_text("\n".join(lines) + "\n")
        data = {"rows": args.rows, "cols": args.cols, "results": results}
        (args.out / "quant_accuracy.json").write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
