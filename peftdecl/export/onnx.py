"""The merged causal LM as one ONNX graph (``input_ids [batch, sequence] -> logits [batch, sequence, vocab]``,
both axes dynamic, no KV cache), checked with onnxruntime against the framework's own logits.

The graph itself comes from the backend (torch: ``torch.onnx.export``); this module stages the file, runs the
check and moves the file into place only when the check passes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from peftdecl.errors import PeftdeclError
from peftdecl.export.staging import staged_files
from peftdecl.merged_checkpoint import refuse_prompt_adapters

if TYPE_CHECKING:
    from peftdecl.backend import Backend
    from peftdecl.model import AdaptedModel

ONNX_TOLERANCE = 1e-4
"""Largest |onnxruntime - framework| logit difference accepted (float32 graphs, reordered kernels)."""
SAMPLE_SHAPES = ((2, 7), (1, 11))
"""Check batches: two, of different batch and sequence sizes, so that a graph with fixed axes fails the check."""


def external_data_name(out: Path) -> str:
    """The file beside ``out`` that holds the weights when they are stored outside the graph."""
    return Path(out).name + ".data"


def sample_batches(vocab_size: int, seed: int = 0) -> list[np.ndarray]:
    """Random token ids (int64) of :data:`SAMPLE_SHAPES`."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, shape, dtype=np.int64) for shape in SAMPLE_SHAPES]


def onnx_max_error(path: Path, batches: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> float:
    """max |onnxruntime(path)(ids) - expected| over the batches (CPU execution provider)."""
    import onnxruntime  # type: ignore[import-untyped]  # it ships no type information

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    errors = []
    for ids, want in zip(batches, expected, strict=True):
        (got,) = session.run(["logits"], {"input_ids": ids})
        if got.shape != want.shape:
            raise PeftdeclError(
                f"{path}: onnxruntime gave logits of shape {got.shape}, expected {want.shape}"
            )
        errors.append(float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))))
    return max(errors)


def export_onnx(
    backend: Backend,
    model: AdaptedModel,
    out: Path,
    *,
    external_data: bool | None = None,
    tolerance: float = ONNX_TOLERANCE,
) -> float:
    """Merge ``model``'s active adapters into its base (the model is consumed), export it to ``out`` (absent; a
    ``.data`` file beside it holds the weights when ``external_data``, by default when they pass 1 GiB) and
    return the largest logit difference onnxruntime shows; over ``tolerance`` nothing is written."""
    out = Path(out)
    exporter = getattr(backend, "export_onnx", None)
    if exporter is None:
        raise PeftdeclError(f"backend {backend.name!r} cannot export ONNX (use --backend torch)")
    refuse_prompt_adapters(model)
    vocab = model.info.vocab_size
    if not vocab:
        raise PeftdeclError("the base model's vocabulary size is unknown; cannot build ONNX check batches")
    batches = sample_batches(vocab)
    with staged_files(out, companions=(external_data_name(out),)) as stage:
        staged = stage / out.name
        expected = exporter(model, staged, batches, external_data)
        error = onnx_max_error(staged, batches, expected)
        if not error <= tolerance:
            raise PeftdeclError(
                f"{out}: onnxruntime's logits differ from the model's by {error:.3g} (> {tolerance:g}); not written"
            )
    return error
