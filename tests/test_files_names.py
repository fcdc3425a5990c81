"""Adapter names are one path component: nothing is read or written outside the saved folder because of a name;
mlx-lm configs with a NaN or infinite scale are refused."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

import peftdecl
from peftdecl.errors import AdapterFileError, PeftdeclError
from peftdecl.formats import hf_peft, mlx_lm, native
from peftdecl.names import check_adapter_name

STATE = {"a.q.weight": np.ones((6, 4)), "a.v.weight": np.ones((3, 4))}
LORA = {"peft_type": "LORA", "r": 2, "target_modules": ["q", "v"], "init_lora_weights": False}

BAD_NAMES = {
    "../evil": "one path component",
    "..": "'.' or '..'",
    ".": "'.' or '..'",
    "": "must not be empty",
    "/tmp/abs": "one path component",
    "a/b": "one path component",
    "a\\b": "one path component",
    "nul\x00": "control characters",
    "tab\t": "control characters",
    "é" * 128: "at most 255",
    ".hidden": "must not start with '.'",
    "\ud800": "lone surrogate",
}


@pytest.mark.parametrize("name", sorted(BAD_NAMES), ids=repr)
def test_bad_names_are_refused_with_the_rule(name) -> None:
    with pytest.raises(PeftdeclError, match=f"adapter name .*{BAD_NAMES[name]}"):
        check_adapter_name(name)


@pytest.mark.parametrize("name", [3, None, b"x", Path("x")], ids=repr)
def test_non_strings_are_refused(name) -> None:
    with pytest.raises(PeftdeclError, match="expected a string"):
        check_adapter_name(name)


@pytest.mark.parametrize("name", ["default", "second", "my adapter", "日本語", "a" * 255, "x.y", "-"])
def test_ordinary_names_pass(name) -> None:
    assert check_adapter_name(name) == name


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name", ["../evil", "..", ".", "", "/abs/evil"])
def test_add_adapter_refuses_path_names(tmp_path, name) -> None:
    model = peftdecl.attach(dict(STATE), LORA)
    with pytest.raises(PeftdeclError, match="adapter name"):
        model.add_adapter(name.replace("/abs", str(tmp_path)), LORA)


@pytest.mark.parametrize("fmt", ["hf", "native", "mlx-lm"])
@pytest.mark.parametrize("name", ["../evil", "..", ".", ""])
def test_writers_never_write_outside_the_folder(tmp_path, fmt, name) -> None:
    # the writers check names themselves: convert and direct calls do not pass through AdaptedModel
    model = peftdecl.attach(dict(STATE), LORA)
    plan = model.plan()
    payload = {"default": (plan, model.state_dict(), None), name: (plan, model.state_dict(), None)}
    work = tmp_path / "work"
    work.mkdir()
    write = {"hf": lambda: hf_peft.write_adapters(work / "ad", payload),
             "native": lambda: native.write_adapters(work / "ad", payload, np.float32),
             "mlx-lm": lambda: mlx_lm.write_adapters(work / "ad", payload)}[fmt]  # fmt: skip
    with pytest.raises(PeftdeclError, match="adapter name"):
        write()
    assert tree(tmp_path) == {"work"}


def test_load_adapter_refuses_a_name_that_reaches_a_sibling(tmp_path) -> None:
    model = peftdecl.attach(dict(STATE), LORA)
    model.save(tmp_path / "x")  # the sibling "../x" would name
    (tmp_path / "folder").mkdir()
    for name in ("../x", "..", "", str(tmp_path / "x")):
        with pytest.raises(PeftdeclError, match="adapter name"):
            peftdecl.load_adapter(dict(STATE), tmp_path / "folder", name=name)


def test_a_sub_adapter_link_pointing_outside_is_never_written_through(tmp_path) -> None:
    model = peftdecl.attach(dict(STATE), LORA)
    model.add_adapter("second", LORA, seed=1)
    model.save(tmp_path / "ad")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    for entry in (tmp_path / "ad" / "second").iterdir():
        entry.unlink()
    (tmp_path / "ad" / "second").rmdir()
    os.symlink(outside, tmp_path / "ad" / "second")
    with pytest.raises(AdapterFileError, match=r"ad/second: is not an adapter file or sub-adapter"):
        model.save(tmp_path / "ad")
    assert tree(outside) == {"precious.txt"}
    assert (tmp_path / "ad" / "second").is_symlink()


def test_a_name_equal_to_a_file_of_the_folder_is_refused(tmp_path) -> None:
    model = peftdecl.attach(dict(STATE), LORA)
    model.add_adapter("adapter_config.json", LORA, seed=1)
    with pytest.raises(AdapterFileError, match="name of a file of the saved folder"):
        model.save(tmp_path / "ad")
    assert not (tmp_path / "ad").exists()


@pytest.mark.parametrize(
    "field, value, rule",
    [
        ("scale", math.nan, "scale must be a finite number"),
        ("scale", math.inf, "scale must be a finite number"),
        ("scale", -math.inf, "scale must be a finite number"),
        ("scale", "2.0", "scale must be a finite number"),
        ("scale", True, "scale must be a finite number"),
        ("dropout", math.nan, "dropout must be a finite number"),
        ("dropout", 1.5, r"dropout must be in \[0, 1\)"),
        ("rank", 2.0, "rank must be an integer from 1"),
        ("rank", 0, "rank must be an integer from 1"),
        ("rank", 2**64, "rank must be an integer from 1"),
        ("rank", "2", "rank must be an integer from 1"),
    ],
)
def test_mlx_lm_config_values_must_be_finite_and_whole(tmp_path, field, value, rule) -> None:
    model = peftdecl.attach(dict(STATE), LORA)
    model.save(tmp_path / "ad", format="mlx-lm")
    config_path = tmp_path / "ad" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["lora_parameters"][field] = value
    config_path.write_text(json.dumps(config))  # json writes NaN and Infinity, as mlx-lm's json.dump would
    with pytest.raises(AdapterFileError, match=rf"adapter_config\.json: lora_parameters\.{rule}"):
        peftdecl.load_adapter(dict(STATE), tmp_path / "ad")


@pytest.mark.parametrize("config", ["[1, 2]", '"text"', "\udcff"])
def test_mlx_lm_config_that_is_no_object_is_refused(tmp_path, config) -> None:
    model = peftdecl.attach(dict(STATE), LORA)
    model.save(tmp_path / "ad", format="mlx-lm")
    (tmp_path / "ad" / "adapter_config.json").write_bytes(config.encode("utf-8", "surrogateescape"))
    with pytest.raises(
        AdapterFileError, match=r"adapter_config\.json: (expected a JSON object|not UTF-8 text)"
    ):
        peftdecl.load_adapter(dict(STATE), tmp_path / "ad")


def test_mlx_lm_lora_b_must_be_a_matrix(tmp_path) -> None:
    from safetensors.numpy import load_file, save_file

    model = peftdecl.attach(dict(STATE), LORA)
    model.save(tmp_path / "ad", format="mlx-lm")
    weights = tmp_path / "ad" / "adapters.safetensors"
    tensors = load_file(weights)
    tensors["a.q.lora_b"] = tensors["a.q.lora_b"][:, 0].copy()  # [r] instead of [r, out]
    save_file(tensors, weights)
    with pytest.raises(
        AdapterFileError, match=r"a\.q\.lora_a \[4, 2\] / lora_b \[2\] do not have the configured rank"
    ):
        peftdecl.load_adapter(dict(STATE), tmp_path / "ad")
    with pytest.raises(AdapterFileError, match="do not have the configured rank"):
        mlx_lm.convert_adapter(tmp_path / "ad", tmp_path / "hf", to="hf")


def test_convert_names_a_lora_module_missing_its_b(tmp_path) -> None:
    from safetensors.numpy import load_file, save_file

    model = peftdecl.attach(dict(STATE), LORA)
    model.save(tmp_path / "ad")
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    tensors = load_file(weights)
    del tensors["base_model.model.a.v.lora_B.weight"]
    save_file(tensors, weights)
    with pytest.raises(AdapterFileError, match=r"adapter_model\.safetensors: a\.v has no lora_B\.weight"):
        mlx_lm.convert_adapter(tmp_path / "ad", tmp_path / "mlx", to="mlx-lm")


@pytest.mark.parametrize("folder", ["a" * 5000, "x\x00y"], ids=["too_long", "nul"])
def test_a_folder_path_the_os_cannot_look_up_is_a_clean_error(folder) -> None:
    with pytest.raises(AdapterFileError, match=r"cannot be read as an adapter folder|no such adapter folder"):
        peftdecl.load_adapter(dict(STATE), folder)


@pytest.mark.parametrize(
    "fmt, config", [("mlx-lm", "adapter_config.json"), ("native", "peftdecl_adapter.json")]
)
def test_oversized_configs_are_refused_before_reading(tmp_path, fmt, config) -> None:
    model = peftdecl.attach(dict(STATE), LORA)
    model.save(tmp_path / "ad", format=fmt)
    with open(tmp_path / "ad" / config, "r+b") as handle:
        handle.truncate(17 * 1024 * 1024)  # sparse: no 17 MB written
    with pytest.raises(AdapterFileError, match=rf"{config}: 17825792 bytes; a config may have 16777216"):
        peftdecl.load_adapter(dict(STATE), tmp_path / "ad")
