"""Build the example's base model: a random tiny Llama with a one-token-per-character tokenizer (no download).

    python examples/finetune/make_model.py runs/tiny-model

Needs only NumPy, safetensors and tokenizers (no torch, no MLX), so it serves both backends.
"""

from __future__ import annotations

import sys

from peftdecl.train.tiny_model import build_tiny_llama

SIZES = {"hidden": 128, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 256}
"""About 0.3M base parameters: small enough to train in a minute on two CPU cores."""


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: make_model.py OUT_DIR")
    folder = build_tiny_llama(argv[0], seed=0, **SIZES)
    print(f"wrote a random tiny Llama ({', '.join(f'{k} {v}' for k, v in SIZES.items())}) to {folder}")


if __name__ == "__main__":
    main(sys.argv[1:])
