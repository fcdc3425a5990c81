"""Helpers of the end-to-end training tests: a tiny model folder, a small text dataset and training files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import selected_backends


def needs(backend: str) -> None:
    """Skip unless ``backend`` is installed and selected (PEFTDECL_TEST_BACKENDS)."""
    if backend not in selected_backends():
        pytest.skip(f"the {backend} backend is not installed or not selected")
    if backend == "torch":
        pytest.importorskip("transformers")


def write_text_data(folder: Path, count: int = 24, seed: int = 0, valid: int = 6) -> tuple[Path, Path]:
    """``train.jsonl`` and ``valid.jsonl`` of short random lowercase strings of varied lengths ({"text"})."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def lines(n: int) -> str:
        rows = []
        for _ in range(n):
            length = int(rng.integers(5, 30))
            rows.append(json.dumps({"text": "".join(rng.choice(list("abcdefgh "), length))}))
        return "\n".join(rows) + "\n"

    (folder / "train.jsonl").write_text(lines(count))
    (folder / "valid.jsonl").write_text(lines(valid))
    return folder / "train.jsonl", folder / "valid.jsonl"


def train_file(
    tmp_path: Path, model: Path, data: tuple[Path, Path], adapter: dict[str, Any] | str, **training: Any
) -> dict[str, Any]:
    """A training-file mapping: 4 steps of batch 4, logging every step, AdamW at 1e-2, seed 0."""
    return {
        "model": str(model),
        "adapter": adapter,
        "data": {"train": str(data[0]), "valid": str(data[1]), "max_seq_length": 64},
        "output_dir": str(tmp_path / "run"),
        "training": {
            "learning_rate": 1e-2,
            "max_steps": 4,
            "per_device_train_batch_size": 4,
            "logging_steps": 1,
            "seed": 0,
            **training,
        },
    }


def losses(output_dir: Path) -> dict[int, float]:
    """step -> training loss from ``log.jsonl``."""
    records = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


LORA = {
    "peft_type": "LORA",
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["q_proj", "v_proj"],
    "lora_dropout": 0.0,
}
