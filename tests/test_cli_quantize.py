"""``peftdecl quantize`` through the CLI entry point: the flags choose the layout (read back from the written
folder: the quant-state JSON bitsandbytes writes, the SCB rows, mlx-lm's config), and bad combinations exit 2 with
one ``error:`` line naming the flags, leaving no folder behind. The layouts themselves are compared with
transformers and mlx-lm in test_quant_folder.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from peftdecl.cli import main
from peftdecl.quant.folder import check_quantized_folder, read_tensor_bytes, tensor_headers
from peftdecl.train.tiny_model import build_tiny_llama

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), hidden=64, layers=1, intermediate=128)


def _quant_state(folder: Path, kind: str) -> dict:
    key = f"{Q}.weight.quant_state.bitsandbytes__{kind}"
    return json.loads(read_tensor_bytes(tensor_headers(folder)[key], key))


def test_default_4bit_is_nf4(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "nf4"
    assert main(["quantize", "--model", str(tiny), "--out", str(out), "--bits", "4"]) == 0
    assert check_quantized_folder(out) == "bnb_4bit"
    state = _quant_state(out, "nf4")
    assert (state["quant_type"], state["blocksize"], "nested_offset" in state) == ("nf4", 64, False)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["bnb_4bit_compute_dtype"] == "float32" and config["load_in_4bit"] is True
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    printed = capsys.readouterr().out
    assert "bnb_4bit" in printed and "7 weights quantised" in printed


def test_fp4_double_quant_compute_dtype(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "fp4"
    argv = ["quantize", "--model", str(tiny), "--out", str(out), "--bits", "4", "--type", "fp4"]
    assert main([*argv, "--double-quant", "--compute-dtype", "bfloat16"]) == 0
    state = _quant_state(out, "fp4")
    assert state["quant_type"] == "fp4" and state["nested_blocksize"] == 256
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["bnb_4bit_use_double_quant"], config["bnb_4bit_compute_dtype"]) == (True, "bfloat16")


def test_default_8bit_is_int8(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "int8"
    assert main(["quantize", "--model", str(tiny), "--out", str(out), "--bits", "8"]) == 0
    headers = tensor_headers(out)
    assert (headers[f"{Q}.weight"].dtype, headers[f"{Q}.SCB"].shape) == ("I8", (64,))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["load_in_8bit"] is True


def test_affine_through_the_installed_entry_point(tiny: Path, tmp_path: Path) -> None:
    """``python -m peftdecl.cli`` in a fresh process: exit status and output as a user sees them."""
    out = tmp_path / "mlx"
    argv = ["quantize", "--model", str(tiny), "--out", str(out), "--bits", "3", "--type", "affine"]
    done = subprocess.run(
        [sys.executable, "-m", "peftdecl.cli", *argv, "--group-size", "32"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "mlx_affine" in done.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 3, "mode": "affine"}
    # 64 inputs at 3 bits: 6 uint32 words per row; the embedding is quantised too (mlx-lm's predicate)
    assert tensor_headers(out)[f"{Q}.weight"].shape == (64, 6)
    assert tensor_headers(out)["model.embed_tokens.weight"].dtype == "U32"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--bits", "8", "--type", "nf4"], "--bits 8 --type nf4: nf4 is 4-bit; for 8 bits use --type int8"),
        (["--bits", "4", "--type", "int8"], "--bits 4 --type int8: int8 is 8-bit"),
        (["--bits", "3"], "--bits 3: bitsandbytes has 4 and 8 bits; for 3 bits add --type affine"),
        (["--bits", "4", "--group-size", "32"], "--group-size: bitsandbytes nf4 has fixed blocks of 64"),
        (["--bits", "8", "--double-quant"], "--double-quant: applies to 4-bit bitsandbytes"),
        (["--bits", "8", "--compute-dtype", "float16"], "--compute-dtype: applies to 4-bit bitsandbytes"),
        (["--bits", "4", "--type", "affine", "--double-quant"], "--double-quant: a bitsandbytes setting"),
        (["--bits", "7"], "argument --bits: invalid choice: 7"),
        (
            ["--bits", "4", "--type", "affine", "--group-size", "48"],
            "argument --group-size: invalid choice: 48",
        ),
    ],
)
def test_bad_flags_exit_2(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(tiny), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_bad_folders_exit_2(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    done = tmp_path / "done"
    assert main(["quantize", "--model", str(tiny), "--out", str(done), "--bits", "8"]) == 0
    capsys.readouterr()
    cases = [
        (done, tmp_path / "again", f"{done}: already quantised (bnb_8bit); quantise a float checkpoint"),
        (tiny, done, f"--out {done}: exists and is not an empty folder"),
        (tiny, tiny, f"--out {tiny}: is the --model folder"),
        (tmp_path / "absent", tmp_path / "x", f"--model {tmp_path / 'absent'}: not a folder"),
        (tmp_path, tmp_path / "y", f"{tmp_path / 'config.json'}: not found"),
    ]
    for model, out, message in cases:
        assert main(["quantize", "--model", str(model), "--out", str(out), "--bits", "4"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "again").exists() and not (tmp_path / "x").exists()
