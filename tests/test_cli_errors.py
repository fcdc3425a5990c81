"""Every CLI command on bad input: one `error: ...` line naming the path, a non-zero exit, no traceback.

Exit codes: 2 for a PeftdeclError (bad input), 3 for any other exception (a bug: one line asking for a report).
These tests require 2, so an input that makes an exception escape from peftdecl fails here instead of being
hidden behind the CLI's catch-all."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import peftdecl
from peftdecl.cli import main
from peftdecl.demo import FACTS, llama_state_dict

SPEC = '{"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}'


def _missing(tmp: Path) -> Path:
    return tmp / "does-not-exist"


def _directory(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _garbage(tmp: Path) -> Path:
    path = tmp / "garbage.json"
    path.write_bytes(b"{{{ not json \x00\x01\x02 ]]]")
    return path


def _non_utf8(tmp: Path) -> Path:
    path = tmp / "latin1.yaml"
    path.write_bytes(b"peft_type: LORA\nr: 4\ntarget_modules: [caf\xe9]\n\xff\xfe")
    return path


def _huge(tmp: Path) -> Path:
    path = tmp / "huge.json"
    with open(path, "wb") as out:  # sparse: 64 MiB of NUL bytes that take no disk
        out.truncate(64 * 2**20)
    return path


def _deep(tmp: Path) -> Path:
    path = tmp / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    return path


def _long_name(tmp: Path) -> Path:
    return tmp / ("a" * 300)  # over NAME_MAX: stat() raises OSError (ENAMETOOLONG), not FileNotFoundError


def _link_loop(tmp: Path) -> Path:
    (tmp / "loop1").symlink_to(tmp / "loop2")
    (tmp / "loop2").symlink_to(tmp / "loop1")
    return tmp / "loop1"


BAD = {
    "long_name": _long_name,
    "link_loop": _link_loop,
    "missing": _missing,
    "directory": _directory,
    "garbage": _garbage,
    "non_utf8": _non_utf8,
    "huge": _huge,
    "deep": _deep,
}


def run(argv: list[str], capsys) -> tuple[int, str, list[str]]:
    start = time.perf_counter()
    code = main(argv)
    assert time.perf_counter() - start < 20, "a bad input must be refused quickly"
    captured = capsys.readouterr()
    return code, captured.out, captured.err.splitlines()


def assert_one_error(code: int, err: list[str], path: Path) -> None:
    assert code == 2, (code, err)
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and str(path) in err[0], err
    assert "Traceback" not in err[0]


@pytest.mark.parametrize("bad", sorted(BAD))
def test_inspect(bad: str, tmp_path, capsys) -> None:
    path = BAD[bad](tmp_path)
    code, out, err = run(["inspect", str(path)], capsys)
    assert_one_error(code, err, path)
    assert out == ""


@pytest.mark.parametrize("bad", sorted(BAD))
def test_convert(bad: str, tmp_path, capsys) -> None:
    path = BAD[bad](tmp_path)
    code, _, err = run(["convert", str(path), str(tmp_path / "out"), "--to", "hf"], capsys)
    assert_one_error(code, err, path)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", sorted(BAD))
def test_equiv_source(bad: str, tmp_path, capsys) -> None:
    path = BAD[bad](tmp_path)
    code, _, err = run(["equiv", str(path), "--model", str(tmp_path)], capsys)
    assert_one_error(code, err, path)


@pytest.mark.parametrize("bad", ["missing", "directory", "garbage", "long_name"])
def test_equiv_model(bad: str, tmp_path, capsys) -> None:
    path = BAD[bad](tmp_path)
    if bad == "garbage":  # a checkpoint folder whose weights file is garbage
        path = tmp_path / "ckpt"
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    code, _, err = run(["equiv", SPEC, "--model", str(path)], capsys)
    assert_one_error(code, err, path)


@pytest.mark.parametrize("bad", sorted(BAD))
def test_validate(bad: str, tmp_path, capsys) -> None:
    """validate lists problems per file (`FILE: FIELD: message` lines, exit 1) and never escapes."""
    path = BAD[bad](tmp_path)
    code, out, err = run(["validate", str(path)], capsys)
    assert code == 1 and err == [], (code, err)
    lines = out.splitlines()
    assert lines and all(line.startswith(f"{path}: ") for line in lines), lines


def test_convert_into_a_file_is_one_error(tmp_path, capsys) -> None:
    model = peftdecl.attach(llama_state_dict(), json_spec(), **FACTS)
    model.save(tmp_path / "src")
    target = tmp_path / "a-file"
    target.write_text("keep me")
    code, _, err = run(["convert", str(tmp_path / "src"), str(target), "--to", "mlx-lm"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert target.read_text() == "keep me"


def test_an_escaped_exception_is_one_line_with_a_report_hint(monkeypatch, tmp_path, capsys) -> None:
    import peftdecl.inspect

    def broken(folder):
        raise KeyError("bug")

    monkeypatch.setattr(peftdecl.inspect, "summarise_all", broken)
    code, _, err = run(["inspect", str(tmp_path)], capsys)
    assert code == 3 and len(err) == 1
    assert err[0].startswith("error: KeyError: 'bug'") and "bug in peftdecl" in err[0]


def test_a_multi_problem_error_is_one_line(tmp_path, capsys) -> None:
    spec = tmp_path / "bad.json"
    spec.write_text('{"peft_type": "LORA", "r": 0, "lora_alpha": "x", "target_modules": ["q_proj"]}')
    code, _, err = run(["equiv", str(spec), "--model", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and "$.r" in err[0] and "$.lora_alpha" in err[0], err


def json_spec() -> dict:
    return {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["equiv", SPEC, "--model", ".", "--seq-len", "0"], "--seq-len"),
        (["equiv", SPEC, "--model", ".", "--batch", "-1"], "--batch"),
        (["equiv", SPEC, "--model", ".", "--batch", "1000000000"], "--batch"),
        (["equiv", SPEC, "--model", ".", "--seed", "-1"], "--seed"),
        (["equiv", SPEC, "--model", ".", "--perturb", "nan"], "--perturb"),
        (["equiv", SPEC, "--model", ".", "--seq-len", "x"], "--seq-len"),
        (["convert", "a", "b", "--to", "hf", "--num-layers", "-3"], "--num-layers"),
        (["convert", "a", "b", "--to", "safetensors"], "--to"),
        (["inspect"], "directory"),
        (["no-such-command"], "command"),
    ],
)
def test_a_bad_command_line_is_one_error_line(argv: list[str], field: str, capsys) -> None:
    """Before: a negative batch or a zero sequence length reached NumPy/torch (ValueError, RuntimeError), a
    batch of 10⁹ a MemoryError, a sequence of 10⁵ ran for minutes; argparse printed usage on two lines."""
    code, out, err = run(argv, capsys)
    assert code == 2 and out == "", (code, out)
    assert len(err) == 1 and err[0].startswith("error: peftdecl") and field in err[0], err


@pytest.mark.parametrize("command", ["demo", "schema"])
@pytest.mark.parametrize("out", ["/dev/null/x", "file"])
def test_an_output_path_that_cannot_be_a_folder(command: str, out: str, tmp_path, capsys) -> None:
    """--out under a file (/dev/null/x) or an existing file: one error line (the folder is written by the
    formats' staged save for the demo and by peftdecl/schema.py for schemas)."""
    if out == "file":
        out = str(tmp_path / "a-file")
        Path(out).write_text("keep me")
    code, _, err = run([command, "--out", out], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and out in err[0], (code, err)
    if out.endswith("a-file"):
        assert Path(out).read_text() == "keep me"
