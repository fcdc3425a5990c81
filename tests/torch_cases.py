"""Named adapter cases on one torch layer, for the torch-only tests (fused functions, several active adapters,
devices): the specs are the kind registry's examples (``peftdecl.kinds``) plus tests/layer_cases.py's
SPEC_VARIANTS, built with the float64 NumPy reference beside them. Every kind on every backend:
tests/test_backend_kinds.py.

The same spec and seed on both backends give identical initial numbers (the core initialises in NumPy), and the
torch layer is built from the same base weights; float32 relative error ≤ 1e-5, float64 ≤ 1e-10.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import peftdecl
from peftdecl.kinds import kinds
from tests.layer_cases import SPEC_VARIANTS

torch = pytest.importorskip("torch")
nn = torch.nn

from peftdecl_torch.inventory import numpy_model  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
LAYERS = ("linear", "embedding", "conv1d", "conv2d", "conv2d_1x1", "gpt2_conv1d")

# lora_bias: PEFT has none on embeddings; the 1×1 conv has no base bias
NO_BIAS_ON = ("embedding", "conv2d_1x1")


def layer_type(layer: str) -> str:
    return "conv2d" if layer.startswith("conv2d") else layer


def _cases() -> dict[str, tuple[dict[str, Any], tuple[str, ...]]]:
    named = {name: (name, {}) for name, decl in kinds().items() if decl.layer_types}
    out = {}
    for name, (kind, fields) in {**named, **SPEC_VARIANTS}.items():
        decl = kinds()[kind]
        layers = tuple(lay for lay in LAYERS if layer_type(lay) in decl.layer_types)
        if fields.get("lora_bias"):
            layers = tuple(lay for lay in layers if lay not in NO_BIAS_ON)
        if not layers:  # a kind of other layer types only (lora_mha: tests/test_lora_mha.py)
            continue
        out[name] = ({**decl.examples[layer_type(layers[0])], **fields}, layers)
    return out


CASES = _cases()
"""Case name -> (spec targeting ``m``, the layers of :func:`make_layer` it runs on)."""
PAIRS = [(case, layer) for case, (_, layers) in CASES.items() for layer in layers]


def make_layer(layer: str) -> tuple[nn.Module, tuple[int, ...] | None]:
    """A base layer and its input shape (None: integer token ids)."""
    torch.manual_seed(0)
    if layer == "linear":
        return nn.Linear(8, 6), (3, 2, 8)
    if layer == "embedding":
        return nn.Embedding(11, 8), None
    if layer == "conv1d":
        return nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 9)
    if layer == "conv2d":
        return nn.Conv2d(4, 6, 3, padding=1), (2, 4, 5, 5)
    if layer == "conv2d_1x1":
        return nn.Conv2d(8, 6, 1), (2, 8, 3, 3)
    if layer == "gpt2_conv1d":
        conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
        return conv1d(6, 8), (3, 2, 8)
    raise KeyError(layer)


class Holder(nn.Module):
    """One layer named ``m``, called on the input."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.m = layer

    def forward(self, x: Any) -> Any:
        return self.m(x)


def available(case: str, layer: str) -> str | None:
    """None when both the NumPy and the torch backend run the case, else why not."""
    kind = peftdecl.load_spec(CASES[case][0]).kind
    for name in ("numpy", "torch"):
        entry = peftdecl.backends()[name]
        reason = entry.capabilities.why_not(kind, layer_type(layer)) if entry.capabilities else entry.reason
        if reason:
            return reason
    return None


def build(case: str, layer: str, dtype: Any, seed: int = 3, device: str = "cpu") -> tuple[Any, Any, Any, Any]:
    """(torch model on ``device``, NumPy reference model, float64 input, the same input for torch)."""
    base, x_shape = make_layer(layer)
    base = Holder(base).to(dtype)
    state, layer_types, facts = numpy_model(base)
    spec = CASES[case][0]
    reference = peftdecl.attach(state, spec, layer_types=layer_types, seed=seed, backend="numpy", **facts)
    ours = peftdecl.attach(base.to(device), spec, seed=seed)
    rng = np.random.default_rng(seed)
    if x_shape is None:
        x = rng.integers(0, 11, size=(3, 4))
        return ours, reference, x, torch.tensor(x, device=device)
    x = rng.normal(size=x_shape).astype(np.float32).astype(np.float64)  # representable in float32
    return ours, reference, x, torch.tensor(x, dtype=dtype, device=device, requires_grad=True)
