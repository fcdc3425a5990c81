"""Bad adapter files get a clear error naming the file and key, and a failed save writes nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest

import peftdecl
from peftdecl.errors import AdapterFileError, PeftdeclError, SpecError


def test_roundtrip(saved) -> None:
    model, folder = saved
    again = peftdecl.load_adapter(dict(model.base_model), folder)
    x = np.ones((2, 4))
    np.testing.assert_allclose(again("a.q", x), model("a.q", x), rtol=1e-6)  # float32 file


def test_truncated_safetensors(saved) -> None:
    model, folder = saved
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(AdapterFileError, match=r"adapter_model\.safetensors: tensor .*truncated"):
        peftdecl.load_adapter(dict(model.base_model), folder)


def test_corrupt_header(saved) -> None:
    model, folder = saved
    (folder / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(AdapterFileError, match="corrupt safetensors header"):
        peftdecl.load_adapter(dict(model.base_model), folder)


def test_missing_and_misshaped_tensors_name_key_and_shape(saved) -> None:
    from safetensors.numpy import load_file, save_file

    model, folder = saved
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    del tensors["base_model.model.a.v.lora_B.weight"]
    tensors["base_model.model.a.q.lora_A.weight"] = np.zeros((3, 4), np.float32)
    save_file(tensors, weights)
    with pytest.raises(AdapterFileError) as info:
        peftdecl.load_adapter(dict(model.base_model), folder)
    message = str(info.value)
    assert "missing tensor a.v.lora_B.weight (expected shape [3, 2])" in message
    assert "tensor a.q.lora_A.weight has shape [3, 4], expected [2, 4]" in message


def test_config_kind_contradicted_by_tensors(saved) -> None:
    model, folder = saved
    config = json.loads((folder / "adapter_config.json").read_text())
    config = {"peft_type": "IA3", "target_modules": ["q", "v"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match=r"the config says IA3 but the tensors .* are LORA"):
        peftdecl.load_adapter(dict(model.base_model), folder)


def test_invalid_config_names_file_and_field(saved) -> None:
    model, folder = saved
    config = json.loads((folder / "adapter_config.json").read_text())
    config["r"] = "eight"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(SpecError, match=r"adapter_config\.json: \$\.r: expected an integer"):
        peftdecl.load_adapter(dict(model.base_model), folder)


def test_pickle_only_folder_is_refused(tmp_path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q"]}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(AdapterFileError, match="pickle"):
        peftdecl.load_adapter({"a.q.weight": np.zeros((2, 2))}, tmp_path)


def test_failed_save_leaves_the_folder_untouched(saved, monkeypatch) -> None:
    model, folder = saved
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    model.add_adapter("second", {"peft_type": "LORA", "r": 1, "target_modules": ["q"]})
    from peftdecl.formats import hf_peft

    calls = {"n": 0}
    original = hf_peft.write_adapter

    def fail_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return original(*args, **kwargs)

    monkeypatch.setattr(hf_peft, "write_adapter", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        model.save(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # staging removed


def test_unknown_layer_type_and_wrong_rank() -> None:
    with pytest.raises(PeftdeclError, match="unknown layer type 'dense'"):
        peftdecl.attach({"m.weight": np.zeros((2, 2))}, {"peft_type": "LORA", "target_modules": ["m"]},
                        layer_types={"m": "dense"})  # fmt: skip
    with pytest.raises(PeftdeclError, match="a conv2d weight has 4 dimensions"):
        peftdecl.attach({"m.weight": np.zeros((2, 2))}, {"peft_type": "LORA", "target_modules": ["m"]},
                        layer_types={"m": "conv2d"})  # fmt: skip
