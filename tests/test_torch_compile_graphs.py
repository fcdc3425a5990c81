"""torch.compile sees one graph of a LoRA model outside mixed batches, and mixed batches still work compiled.

The torch layer reads the mixed-batch rows from a ContextVar, which dynamo cannot trace; it reads it only while a
mixed batch is in progress, so a compiled model otherwise has no graph break. Expected outputs: the eager model's
(per row: the model with that row's adapter active).
"""

from __future__ import annotations

import numpy as np
import pytest

import peftdecl
from tests.conftest import selected_backends

torch = pytest.importorskip("torch")

from tests.torch_mlp import torch_mlp  # noqa: E402

if "torch" not in selected_backends():
    pytest.skip("the torch backend is not selected", allow_module_level=True)

X = torch.linspace(-1.0, 1.0, 3 * 12).reshape(3, 12)
SPEC = {"peft_type": "LORA", "r": 4, "target_modules": ["lin0", "lin1"], "init_lora_weights": False}


def test_no_graph_break_outside_mixed_batches() -> None:
    model = peftdecl.attach(torch_mlp(0).eval(), SPEC, "a", "torch", seed=1)
    with torch.no_grad():
        model(X)  # an eager call first, then the traced one
        explained = torch._dynamo.explain(model.base_model)(X)
    assert explained.graph_break_count == 0, [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_count == 1


COMPILE_FIRST = """
import torch, peftdecl
from tests.torch_mlp import torch_mlp
model = peftdecl.attach(torch_mlp(0).eval(), {spec!r}, "a", "torch", seed=1)
with torch.no_grad():
    explained = torch._dynamo.explain(model.base_model)(torch.ones(3, 12))
print(explained.graph_count, explained.graph_break_count)
"""


def test_compiled_before_any_eager_call_is_one_graph() -> None:
    """A fresh process (no kind's ops imported yet) compiling before any eager call: the layer imports its kind's
    ops when the adapter is attached, not inside the traced forward (an import there breaks the graph)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    script = COMPILE_FIRST.format(spec=SPEC)
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.split()[-2:] == ["1", "0"], out.stdout + out.stderr  # one graph, no break


def test_compiled_mixed_batch_runs_each_row_through_its_adapter() -> None:
    """Compiled outside a mixed batch first (the count guard then holds 0), then run inside one, as the engine sets
    it up for ``model(x, adapter_names=...)``: the guard fails, dynamo recompiles, each row takes its adapter."""
    from peftdecl_torch.mixed_batch import mixed_rows

    torch._dynamo.reset()
    model = peftdecl.attach(torch_mlp(0).eval(), SPEC, "a", "torch", seed=1)
    model.add_adapter("b", SPEC, seed=2)
    names = ["a", "b", "a"]
    expected = []
    with torch.no_grad():
        for row, name in enumerate(names):
            model.set_adapter(name)
            expected.append(model(X[row : row + 1]).numpy())
        model.set_adapter("a")
        compiled = torch.compile(model.base_model, backend="eager")
        plain = compiled(X).numpy()
        with mixed_rows(names, model.engine.book, frozenset(), expand=False):
            got = compiled(X).numpy()
        after = compiled(X).numpy()
    assert np.abs(plain[1] - expected[1][0]).max() > 1e-4  # row 1 differs between adapters a and b
    assert np.abs(got - np.concatenate(expected)).max() <= 1e-6  # float32, the same arithmetic per row
    assert np.abs(after - plain).max() == 0  # outside the mixed batch again: the first graph, adapter a
