"""HF PEFT's own custom-model test matrix, run against peftdecl's torch backend (see tests/peft_matrix.py).

Each ``TEST_CASES`` row of a kind peftdecl claims is one test: PEFT wraps its tiny model with the row's config,
perturbs the adapter away from the identity and saves it; peftdecl loads the folder onto a fresh copy of the
model. The outputs on the row's inputs (eval mode, float32), then the outputs of both merge_and_unload models
(PEFT's unmerged output where PEFT cannot merge), must agree within OUTPUT_TOL, and the adapter's effect on them
(output - base output) within EFFECT_TOL; a merge both PEFT and peftdecl refuse (LoRA on a grouped conv) agrees.
A row peftdecl refuses with its own error is skipped with the error's text, so the count of refusals stays visible
(``-rs`` lists them); any other exception or mismatch fails.

Tally: passed = equal to PEFT, skipped = refused by peftdecl, failed (or xfailed) = wrong or crashed.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from peftdecl.errors import PeftdeclError  # noqa: E402
from tests.conftest import rel_err, selected_backends  # noqa: E402
from tests.peft_matrix import (  # noqa: E402
    MatrixUnavailableError,
    Row,
    claimed_rows,
    load_ours,
    peft_matrix,
    row_ids,
    run_peft,
)

pytestmark = pytest.mark.peft

if "torch" not in selected_backends():
    pytest.skip("the PEFT matrix runs on the torch backend, not selected here", allow_module_level=True)

try:
    MATRIX = peft_matrix()
except MatrixUnavailableError as exc:
    pytest.skip(f"PEFT's custom-model test matrix is unavailable: {exc}", allow_module_level=True)

OUTPUT_TOL = 1e-5  # float32 forward of the same weights; relative error over the whole output
# The adapter's effect on the output (adapted - base), ours against PEFT's. Its error is the outputs' float32
# rounding (≤ ~2e-6 relative here) over the effect's relative size, which is as small as 7e-6 where the kind
# bounds it (COFT's default eps 6e-5 keeps the rotation that close to the identity): up to ~3e-2 measured.
# A missing or wrong adapter gives ~1, so this proves the adapter is applied even where the effect is below
# OUTPUT_TOL.
EFFECT_TOL = 0.1

ROWS = claimed_rows(MATRIX)
CASES = [pytest.param(row, id=row_id) for row, row_id in zip(ROWS, row_ids(ROWS), strict=True)]


def as_array(output: Any) -> np.ndarray:
    """A model output (these tiny models return one tensor) as float64."""
    return output.detach().double().numpy()


def refused(step: str, exc: PeftdeclError, folder: Path) -> None:
    """Skip with peftdecl's error text (the temporary folder's path shortened to <folder>)."""
    TALLY["refused"] += 1
    text = str(exc).replace(str(folder), "<folder>")
    pytest.skip(f"peftdecl refuses ({step}): {type(exc).__name__}: {text}")


TALLY = {"run": 0, "equal": 0, "refused": 0}


@pytest.fixture(scope="module", autouse=True)
def print_tally(request: pytest.FixtureRequest) -> Any:
    """After the module, one line: rows equal to PEFT, refused by peftdecl and failed (the rest) of those run."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not TALLY["run"]:
        return  # a pytest-xdist worker has no terminal: its part of the tally is in the pass/skip counts
    failed = TALLY["run"] - TALLY["equal"] - TALLY["refused"]
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    # a teardown's output is otherwise captured, and lost
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        reporter.write_line(
            f"\nPEFT {MATRIX.version} custom-model matrix, kinds peftdecl claims: {TALLY['equal']} equal, "
            f"{TALLY['refused']} refused, {failed} failed of {TALLY['run']} rows run ({len(ROWS)} in the matrix)"
        )


def assert_like_peft(ours: np.ndarray, theirs: np.ndarray, base: np.ndarray) -> None:
    """Our output within OUTPUT_TOL of PEFT's, and our adapter's effect (output - base) within EFFECT_TOL."""
    assert rel_err(ours, theirs) <= OUTPUT_TOL
    assert rel_err(ours - base, theirs - base) <= EFFECT_TOL


@pytest.mark.parametrize("row", CASES)
def test_row_matches_peft(row: Row, tmp_path: Path) -> None:
    TALLY["run"] += 1
    theirs = run_peft(MATRIX, row, tmp_path)
    base = as_array(theirs.base)
    assert rel_err(as_array(theirs.adapted), base) > 0  # the perturbed adapter changes PEFT's output
    try:
        ours = load_ours(MATRIX, row, tmp_path)
    except PeftdeclError as exc:
        refused("load", exc, tmp_path)
    inputs = MATRIX.make_inputs()
    with torch.no_grad():
        adapted = as_array(ours(**inputs))
    assert_like_peft(adapted, as_array(theirs.adapted), base)
    try:
        merged_model = ours.merge_and_unload()
    except PeftdeclError as exc:
        if theirs.merged is None:  # PEFT refuses this merge too (grouped conv LoRA): the same answer
            TALLY["equal"] += 1
            return
        refused("merge_and_unload", exc, tmp_path)
    assert isinstance(merged_model, torch.nn.Module)
    merged_model.eval()
    with torch.no_grad():
        merged = as_array(merged_model(**inputs))
    # where PEFT cannot merge, its unmerged output is what a merge must reproduce
    expected = theirs.adapted if theirs.merged is None else theirs.merged
    assert_like_peft(merged, as_array(expected), base)
    TALLY["equal"] += 1
