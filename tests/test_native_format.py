"""peftdecl's native layout keeps adapters exactly as they are in memory, for kinds whose HF files are lossy."""

from __future__ import annotations

import json

import numpy as np
import pytest

import peftdecl
from peftdecl.demo import llama_state_dict
from peftdecl.errors import AdapterFileError
from peftdecl.inspect import summarise
from tests.test_cli_kinds import FACTS

PROJECTED_PREFIX = {
    "peft_type": "PREFIX_TUNING",
    "num_virtual_tokens": 3,
    "prefix_projection": True,
    "encoder_hidden_size": 16,
    "task_type": "CAUSAL_LM",
}
ADALORA = {"peft_type": "ADALORA", "init_r": 4, "total_step": 10, "target_modules": ["q_proj"],
           "init_lora_weights": False}  # fmt: skip


@pytest.mark.parametrize("spec", [PROJECTED_PREFIX, ADALORA], ids=["prefix_projection", "adalora"])
def test_native_round_trip_is_exact(spec, tmp_path) -> None:
    model = peftdecl.attach(llama_state_dict(), spec, seed=4, **FACTS)
    model.add_adapter("second", {"peft_type": "LORA", "r": 2, "target_modules": ["v_proj"]}, seed=5)
    model.save(tmp_path, format="native")
    assert (
        json.loads((tmp_path / "peftdecl_adapter.json").read_text())["spec"]
        == model.spec("default").to_dict()
    )
    again = peftdecl.load_adapter(llama_state_dict(), tmp_path, **FACTS)
    again.load_adapter(tmp_path, "second")
    for name in ("default", "second"):
        ours, theirs = model.state_dict(name), again.state_dict(name)
        assert set(ours) == set(theirs)
        for key in ours:  # float32 file: equal to float32 rounding of the float64 values
            np.testing.assert_allclose(theirs[key], ours[key].astype(np.float32), rtol=0, atol=0)


def test_hf_files_of_a_projected_prefix_hold_only_the_table(tmp_path) -> None:
    model = peftdecl.attach(llama_state_dict(), PROJECTED_PREFIX, seed=4, **FACTS)
    model.save(tmp_path / "hf")
    model.save(tmp_path / "native", format="native")
    hf_keys = set(summarise(tmp_path / "hf").shared)
    assert hf_keys == {"prompt_embeddings"}
    assert len(model.state_dict()) > 1  # the MLP survives only in the native files


def test_corrupt_native_config_is_refused(tmp_path) -> None:
    model = peftdecl.attach(llama_state_dict(), {"peft_type": "LORA", "target_modules": ["q_proj"]}, **FACTS)
    model.save(tmp_path, format="native")
    (tmp_path / "peftdecl_adapter.json").write_text(json.dumps({"format": "peftdecl", "format_version": 9}))
    with pytest.raises(AdapterFileError, match="format_version 9 is not 1"):
        peftdecl.load_adapter(llama_state_dict(), tmp_path, **FACTS)
