"""Trainable tokens on MLX models that tie the output head to the embeddings (mlx-lm's ``embed_tokens.as_linear``).

HF PEFT ties the head to the embeddings' trained rows, so the adapted model must equal the same model whose table
has rows t replaced by d, built here by editing the weight directly. float32 on both sides; the head sums x Wᵀ and
x Dᵀ apart where the edited model computes x W'ᵀ, so the comparison allows 1e-5 relative.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import peftdecl
from tests.conftest import rel_err, selected_backends

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

if "mlx" not in selected_backends():
    pytest.skip("the MLX backend is not selected", allow_module_level=True)

from tests.mlx_models import tiny_llama  # noqa: E402

TOL = 1e-5
IDS = mx.array([[1, 2, 3, 5, 60], [0, 2, 7, 60, 4]])
EMBED = "model.embed_tokens"


def edited(rows: list[int], values: np.ndarray) -> Any:
    """The same tied model with its table's rows replaced by hand (what the adapter must compute)."""
    model = tiny_llama(tie_word_embeddings=True)
    table = np.array(model.model.embed_tokens.weight)
    table[rows] = values
    model.model.embed_tokens.weight = mx.array(table)
    return model


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        (
            {"peft_type": "TRAINABLE_TOKENS", "token_indices": [2, 60], "init_weights": False},
            f"{EMBED}.trainable_tokens_delta",
        ),
        (
            {
                "peft_type": "LORA",
                "target_modules": ["q_proj"],
                "init_lora_weights": True,
                "trainable_token_indices": [2, 60],
            },
            f"{EMBED}.token_adapter.trainable_tokens_delta",
        ),
    ],
)
def test_tied_head_reads_the_trained_rows(spec: dict[str, Any], key: str) -> None:
    ours = peftdecl.attach(tiny_llama(tie_word_embeddings=True), spec, seed=3)
    rows = np.array(ours.trainable_parameters()[key])
    if spec["peft_type"] == "LORA":  # LoRA's rows start as the table's own: move them away from it
        rows = rows + 0.5
        ours.delete_adapter("default")
        arrays = {**ours_arrays(spec), key: rows}
        ours.add_adapter("default", spec, arrays=arrays, activate=True)
    expected = np.array(edited([2, 60], rows)(IDS))
    assert rel_err(np.array(ours(IDS)), expected) <= TOL
    assert rel_err(np.array(ours.merge_and_unload()(IDS)), expected) <= TOL


def ours_arrays(spec: dict[str, Any]) -> dict[str, np.ndarray]:
    """The seeded initial tensors of ``spec`` on the tied model (LoRA's B is zero: only the tokens act)."""
    model = peftdecl.attach(tiny_llama(tie_word_embeddings=True), spec, seed=3)
    return {k: np.array(v) for k, v in model.state_dict().items()}
