"""The peftdecl command: validate, schema, inspect, demo."""

from __future__ import annotations

import json

import numpy as np

import peftdecl
from peftdecl.cli import main


def test_validate_prints_one_line_per_error(tmp_path, capsys) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("peft_type: LORA\nr: 4\n")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"peft_type": "LORA", "r": 0, "target_modules": ["q", 1]}))
    assert main(["validate", str(good), str(bad)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{good}: ok (LORA)"
    assert f"{bad}: $.r: must be >= 1, got 0" in lines
    assert any(line.startswith(f"{bad}: $.target_modules: expected") for line in lines)
    assert main(["validate", str(good)]) == 0


def test_schema_check_detects_staleness(tmp_path, capsys) -> None:
    assert main(["schema", "--out", str(tmp_path)]) == 0
    from peftdecl.schema import main as schema_main

    assert schema_main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "lora.schema.json").write_text("{}")
    assert schema_main(["--check", "--out", str(tmp_path)]) == 1
    assert "lora.schema.json" in capsys.readouterr().err


def test_inspect_prints_kind_targets_and_ranks(tmp_path, capsys) -> None:
    state = {"m.q.weight": np.zeros((6, 4)), "m.v.weight": np.zeros((3, 4))}
    model = peftdecl.attach(state, {"peft_type": "LORA", "r": 2, "target_modules": ["q", "v"],
                                    "rank_pattern": {"v": 1}})  # fmt: skip
    model.add_adapter("extra", {"peft_type": "LORA", "r": 3, "target_modules": ["q"]})
    model.save(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "kind        LORA" in out
    assert "parameters  " + f"{2 * 4 + 6 * 2 + 1 * 4 + 3 * 1:,}" in out
    assert "dtype       float32" in out
    q_line = next(line for line in out.splitlines() if line.startswith("m.q "))
    v_line = next(line for line in out.splitlines() if line.startswith("m.v "))
    assert q_line.split()[1] == "2" and v_line.split()[1] == "1"
    assert out.count("folder      ") == 2  # the default adapter and the "extra" sub-folder


def test_demo_runs_and_passes(capsys) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "reload" in out and "FAIL" not in out
