"""``torch.onnx.export`` of a merged causal LM (``peftdecl export --format onnx``).

torch's dynamo exporter (``dynamo=True``, needs ``onnxscript``) is used: it traces with symbolic batch and sequence
sizes, where the legacy TorchScript tracer bakes Python-side shape tests of transformers' masking code into the
graph as constants (and fails on ``aten::diff`` without an explicit attention mask)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import nn

from peftdecl.errors import PeftdeclError

if TYPE_CHECKING:
    from peftdecl.model import AdaptedModel

EXTERNAL_DATA_BYTES = 1 << 30
"""Weights above this go to a ``.data`` file beside the graph (protobuf caps one file at 2 GiB)."""


class LogitsOnly(nn.Module):
    """``input_ids -> logits`` of a transformers causal LM, without cache or other outputs."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.lm(input_ids=input_ids, use_cache=False).logits)


def export_onnx(
    model: AdaptedModel, path: Path, batches: Sequence[np.ndarray], external_data: bool | None
) -> list[np.ndarray]:
    """Merge and unload ``model`` (consumed), write its float32 ONNX graph to ``path`` with dynamic batch and
    sequence axes, and return its torch logits on ``batches`` (the reference for the onnxruntime check)."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's dependency; named here for a clear error)
    except ImportError:
        raise PeftdeclError(
            "ONNX export needs onnx, onnxscript and onnxruntime: pip install 'peftdecl[export]'"
        ) from None
    merged = cast(nn.Module, model.merge_and_unload()).float().eval().cpu()
    wrapper = LogitsOnly(merged).eval()
    inputs = [torch.as_tensor(ids, dtype=torch.long) for ids in batches]
    with torch.no_grad():
        expected = [wrapper(ids).numpy() for ids in inputs]
    if external_data is None:
        external_data = sum(p.numel() * p.element_size() for p in merged.parameters()) > EXTERNAL_DATA_BYTES
    axes = {"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}}
    progress = io.StringIO()  # the exporter prints its steps; errors still raise
    with torch.no_grad(), contextlib.redirect_stdout(progress):
        torch.onnx.export(
            wrapper,
            (inputs[0],),
            str(path),
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_shapes=axes,
            dynamo=True,
            external_data=external_data,
        )
    return expected
