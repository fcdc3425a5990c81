"""Corrupted adapter folders: every entry point ends in a result or a PeftdeclError, never another exception or
a hang.

Valid folders in all three formats (HF PEFT, mlx-lm, peftdecl native) of LoRA, DoRA, AdaLoRA (with a pruned
rank), OFT (on an embedding too), VeRA and prompt tuning are saved by peftdecl on a tiny NumPy Llama; hypothesis
corrupts a copy (bytes of the tensor file or the JSON flipped, truncated, extended; JSON values swapped for other
types, huge, negative or NaN numbers, keys dropped; tensors dropped, renamed, reshaped or rewritten in another
dtype with ``safetensors.numpy``; files deleted or replaced by folders; stale files of another format or another
adapter added) and then calls ``peftdecl.load_adapter`` (plus one forward per adapted layer),
``peftdecl.inspect.summarise``, ``peftdecl inspect`` and ``peftdecl convert`` (LoRA, mlx-lm <-> HF).

CI runs a bounded number of examples (tests/fuzz_settings.py); the long run is

    PEFTDECL_FUZZ_EXAMPLES=10000 PEFTDECL_FUZZ_STATS=/tmp/fuzz-stats \\
        .venv/bin/pytest -q -n 2 -p no:cacheprovider tests/test_fuzz_folders.py

where PEFTDECL_FUZZ_STATS (a folder) collects one JSON line per input: entry point, outcome, seconds, peak
traced memory and the process's peak RSS; ``python tests/fuzz_run.py /tmp/fuzz-stats`` prints the totals
and each escaped exception with its smallest input. Add PEFTDECL_FUZZ_KEEP_GOING=1 to record escapes instead of
stopping at the first (the count the issue asks for), and PEFTDECL_FUZZ_DEADLINE_MS=60000 on a busy machine so
hypothesis' own deadline does not end the run; an input still running after PEFTDECL_FUZZ_HANG_S seconds
(default 20) is stopped and counted as a hang.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import peftdecl
from peftdecl.cli import main as cli_main
from peftdecl.errors import PeftdeclError
from peftdecl.formats.mlx_lm import convert_adapter
from peftdecl.inspect import summarise
from tests.folder_corruption import (
    FACTS,
    FILES,
    LORA_TEMPLATES,
    OPS,
    SPECS,
    STATE,
    TEMPLATES,
    _load_tensors,
    corrupted,
    template,
)
from tests.fuzz_run import run_entry
from tests.fuzz_settings import fuzz_settings


def _load_and_forward(folder: Path) -> None:
    model = peftdecl.load_adapter(STATE, folder, **FACTS)
    model.eval()
    for lp in model.plan().layers:
        info = model.info.layers[lp.module]
        embedding = info.type == "embedding"
        x = np.arange(min(3, info.in_features)) if embedding else np.ones((2, info.in_features))
        model(lp.module, x)


def _cli(argv: list[str]) -> None:
    """The CLI exits 0 or 2 (a PeftdeclError, one line on stderr); 3 means an escaped exception: re-raised."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli_main(argv)
    lines = err.getvalue().splitlines()
    if code == 3:
        raise AssertionError(f"peftdecl {' '.join(argv)}: an exception escaped: {lines}")
    assert code in (0, 2), code
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        raise _CliError(lines[0])


class _CliError(PeftdeclError):
    """The CLI's clean one-line error, counted as a clean error."""


CASE = st.tuples(st.sampled_from(TEMPLATES), st.lists(OPS, min_size=1, max_size=3))
LORA_CASE = st.tuples(st.sampled_from(LORA_TEMPLATES), st.lists(OPS, min_size=1, max_size=3))


def _check(entry: str, case: tuple, call: Callable[[Path, Path], Any]) -> None:
    (file_format, kind), ops = case
    work, folder = corrupted(file_format, kind, ops)
    try:
        run_entry(entry, case, lambda: call(folder, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


@fuzz_settings()
@given(CASE)
def test_load_adapter(case: tuple) -> None:
    _check("load_adapter", case, lambda folder, work: _load_and_forward(folder))


@fuzz_settings()
@given(CASE)
def test_inspect_summarise(case: tuple) -> None:
    _check("summarise", case, lambda folder, work: summarise(folder))


@fuzz_settings()
@given(CASE)
def test_cli_inspect(case: tuple) -> None:
    _check("cli_inspect", case, lambda folder, work: _cli(["inspect", str(folder)]))


@fuzz_settings()
@given(LORA_CASE)
def test_convert(case: tuple) -> None:
    to = "mlx-lm" if case[0][0] == "hf" else "hf"
    _check("convert", case, lambda folder, work: convert_adapter(folder, work / "out", to))


@fuzz_settings()
@given(LORA_CASE)
def test_cli_convert(case: tuple) -> None:
    to = "mlx-lm" if case[0][0] == "hf" else "hf"
    _check(
        "cli_convert",
        case,
        lambda folder, work: _cli(["convert", str(folder), str(work / "out"), "--to", to]),
    )


@pytest.mark.parametrize(("file_format", "kind"), TEMPLATES)
def test_templates_load(file_format: str, kind: str, tmp_path) -> None:
    """The uncorrupted folders load and inspect (otherwise every fuzzed input would be a trivial error)."""
    _load_and_forward(template(file_format, kind))
    assert summarise(template(file_format, kind)).format == file_format
    if (file_format, kind) in LORA_TEMPLATES:
        convert_adapter(
            template(file_format, kind), tmp_path / "out", "mlx-lm" if file_format == "hf" else "hf"
        )


FOUND = {
    # AdaLoRA's re-expansion of a pruned lora_B with a row missing: a NumPy broadcast ValueError before
    "adalora_pruned_b_short": (("hf", "adalora"), [("tensor_reshape", 1, "drop_row")]),
    # a 1-D VeRA projection: IndexError in the projection cut before
    "vera_flat_projection": (("hf", "vera"), [("tensor_reshape", 8, "flatten")]),
    "vera_scalar_projection": (("hf", "vera"), [("tensor_reshape", 8, "scalar")]),
}


@pytest.mark.parametrize("name", sorted(FOUND))
def test_inputs_the_fuzzer_found(name: str) -> None:
    (file_format, kind), ops = FOUND[name]
    work, folder = corrupted(file_format, kind, ops)
    try:
        with pytest.raises(PeftdeclError, match="has shape"):
            _load_and_forward(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _base_copy_key(file_format: str, kind: str) -> int:
    """Index (in sorted order) of the saved copy of the adapted embedding, model.embed_tokens.base_layer.weight."""
    loaded = _load_tensors(template(file_format, kind) / FILES[file_format][1])
    assert loaded is not None
    return next(i for i, k in enumerate(sorted(loaded[0])) if k.endswith("embed_tokens.base_layer.weight"))


@pytest.mark.parametrize(("file_format", "kind"), [("hf", "lora"), ("native", "lora"), ("hf", "oft")])
@pytest.mark.parametrize("how", ["transpose", "flatten", "scalar"])
def test_a_wrong_shaped_embedding_copy_is_refused(file_format: str, kind: str, how: str) -> None:
    """The embedding copy PEFT saves beside an adapted embedding replaces the base weight on load: a wrong
    shape must be refused there, not fail in the first forward (found by the fuzzer; loading is
    peftdecl/model.py's base-override path)."""
    ops = [("tensor_reshape", _base_copy_key(file_format, kind), how)]
    work, folder = corrupted(file_format, kind, ops)
    try:
        with pytest.raises(PeftdeclError):
            _load_and_forward(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("dropped", ["lora_B.weight", "lora_embedding_B"])
def test_convert_of_a_lora_missing_b_is_refused(dropped: str) -> None:
    """An HF LoRA file with a module's B tensor missing (found by the fuzzer; the model-free inventory is built in
    peftdecl/formats/mlx_lm.py)."""
    kind = "lora" if dropped == "lora_embedding_B" else "lora_linear"
    loaded = _load_tensors(template("hf", kind) / FILES["hf"][1])
    assert loaded is not None
    keys = sorted(loaded[0])
    ops = [
        ("tensor_drop", keys.index(k)) for k in reversed(keys) if k.endswith((dropped, "base_layer.weight"))
    ]
    work, folder = corrupted("hf", kind, ops)
    try:
        with pytest.raises(PeftdeclError):
            convert_adapter(folder, work / "out", "mlx-lm")
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("file_format", ["hf", "native", "mlx-lm"])
@pytest.mark.parametrize("how", ["nan", "inf"])
def test_a_non_finite_tensor_is_refused_by_name(file_format: str, how: str) -> None:
    work, folder = corrupted(file_format, "lora", [("tensor_values", 1, how)])
    try:
        with pytest.raises(PeftdeclError, match="NaN or infinite"):
            peftdecl.load_adapter(STATE, folder, **FACTS)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("dtype", ["int64", "bool", "complex64"])
def test_arrays_of_a_non_float_dtype_are_refused_by_name(dtype: str) -> None:
    model = peftdecl.attach(STATE, SPECS["lora"], **FACTS)
    arrays = {k: v.astype(dtype) for k, v in model.state_dict().items()}
    with pytest.raises(
        PeftdeclError, match=rf"tensor \S+ has dtype {dtype}, expected a floating-point dtype"
    ):
        model.add_adapter("b", SPECS["lora"], arrays=arrays)


def test_the_harness_lets_only_peftdecl_errors_pass(monkeypatch) -> None:
    """run_entry swallows a PeftdeclError, re-raises anything else, and stops a hang."""
    import time

    from tests import fuzz_run

    monkeypatch.delenv("PEFTDECL_FUZZ_STATS", raising=False)
    run_entry("x", (), lambda: (_ for _ in ()).throw(PeftdeclError("clean")))
    with pytest.raises(KeyError):
        run_entry("x", (), lambda: {}["missing"])
    monkeypatch.setattr(fuzz_run, "HANG_S", 0.2)
    with pytest.raises(fuzz_run.FuzzHangError):
        run_entry("x", (), lambda: time.sleep(5))
