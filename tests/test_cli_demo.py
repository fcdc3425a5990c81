"""`peftdecl demo`: every check it prints states a tolerance and can fail (a broken component makes it exit 1),
and the only folder it names is one that exists after the command."""

from __future__ import annotations

import re

import numpy as np
import pytest

import peftdecl
from peftdecl.cli import main
from peftdecl.demo import llama_state_dict
from peftdecl.formats import hf_peft

ZERO_INIT_DORA = "peft_type: LORA\nr: 4\nuse_dora: true\ntarget_modules: [q_proj, v_proj]\n"


def rows(out: str) -> dict[str, str]:
    """step -> its whole table line."""
    return {line.split()[0]: line for line in out.splitlines()[2:] if line.strip()}


def test_default_demo_passes_with_a_tolerance_on_every_check(capsys) -> None:
    assert main(["demo"]) == 0
    table = rows(capsys.readouterr().out)
    for step in ("forward", "reload", "merge"):
        assert table[step].endswith(" ok"), table[step]
        assert re.search(r"\((tol|need) [^)]*\d", table[step]), table[step]
    assert table["total"].endswith(" ok")


def test_zero_initialised_dora_is_perturbed_so_the_forward_check_means_something(tmp_path, capsys) -> None:
    spec = tmp_path / "dora.yaml"
    spec.write_text(ZERO_INIT_DORA)
    assert main(["demo", "--spec", str(spec)]) == 0
    line = rows(capsys.readouterr().out)["forward"]
    change = float(re.search(r"by ([0-9.e+-]+)", line).group(1))
    assert change >= 1e-3 and "0.00e+00" not in line


def test_without_out_no_path_is_claimed(capsys) -> None:
    assert main(["demo"]) == 0
    line = rows(capsys.readouterr().out)["save"]
    assert "temporary folder, deleted" in line and "/" not in line.split("bytes)")[1]


def test_out_keeps_the_folder_it_names(tmp_path, capsys) -> None:
    out = tmp_path / "kept"
    assert main(["demo", "--out", str(out)]) == 0
    assert str(out) in rows(capsys.readouterr().out)["save"]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()


def test_a_corrupted_save_fails_the_reload_check(monkeypatch, capsys) -> None:
    original = hf_peft.write_safetensors

    def scaled(path, tensors, metadata):  # every saved number 1% off
        return original(path, {k: v * np.float32(1.01) for k, v in tensors.items()}, metadata)

    monkeypatch.setattr(hf_peft, "write_safetensors", scaled)
    assert main(["demo"]) == 1
    table = rows(capsys.readouterr().out)
    assert table["reload"].endswith("FAIL") and table["total"].endswith("FAIL")


def test_a_wrong_merge_fails_the_merge_check(monkeypatch, capsys) -> None:
    original = peftdecl.AdaptedModel.merge_and_unload

    def base_only(self):  # "merges" nothing into the projections: their base weights come back
        merged = dict(original(self))
        base = llama_state_dict()
        merged.update({k: base[k] for k in merged if k.endswith("_proj.weight")})
        return merged

    monkeypatch.setattr(peftdecl.AdaptedModel, "merge_and_unload", base_only)
    assert main(["demo"]) == 1
    assert rows(capsys.readouterr().out)["merge"].endswith("FAIL")


def test_an_adapter_that_changes_nothing_fails_the_forward_check(monkeypatch, tmp_path, capsys) -> None:
    from peftdecl import equiv

    monkeypatch.setattr(equiv, "perturbed", lambda arrays, trainable, scale, seed: dict(arrays))
    spec = tmp_path / "dora.yaml"
    spec.write_text(ZERO_INIT_DORA)  # B = 0: without the perturbation the adapter changes nothing
    assert main(["demo", "--spec", str(spec)]) == 1
    assert rows(capsys.readouterr().out)["forward"].endswith("FAIL")


@pytest.mark.parametrize("text", ["peft_type: PROMPT_TUNING\nnum_virtual_tokens: 4\ntask_type: CAUSAL_LM\n"])
def test_a_spec_without_layers_is_one_error_line(text, tmp_path, capsys) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    assert main(["demo", "--spec", str(spec)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
