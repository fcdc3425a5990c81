"""`peftdecl inspect` and `peftdecl validate` on a saved adapter of every kind (NumPy reference, no torch)."""

from __future__ import annotations

import pytest

import peftdecl
from peftdecl.cli import main
from peftdecl.demo import FACTS, llama_state_dict  # the demo's synthetic Llama and its facts
from peftdecl.kinds import kinds

QV = ["q_proj", "v_proj"]
BD = {"target_modules_bd_a": ["q_proj"], "target_modules_bd_b": ["v_proj"], "nblocks": 2}
ARROW = {"top_k": 1, "task_adapter_names": ["t0", "t1"]}
SPECS = {
    "lora": ({"peft_type": "LORA", "r": 4, "target_modules": QV}, "4"),
    "dora": ({"peft_type": "LORA", "r": 2, "use_dora": True, "target_modules": QV}, "2"),
    "adalora": ({"peft_type": "ADALORA", "init_r": 6, "total_step": 10, "target_modules": QV}, "6"),
    "ia3": ({"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]}, "-"),
    "loha": ({"peft_type": "LOHA", "r": 3, "target_modules": QV}, "3"),
    "lokr": ({"peft_type": "LOKR", "r": 8, "target_modules": QV}, "8"),
    "oft": ({"peft_type": "OFT", "r": 0, "oft_block_size": 16, "target_modules": QV}, "4×16"),
    "boft": ({"peft_type": "BOFT", "boft_block_size": 8, "target_modules": QV}, "1×8×8"),
    "vera": ({"peft_type": "VERA", "r": 16, "target_modules": QV}, "16"),
    "velora": ({"peft_type": "LORA", "r": 4, "target_modules": QV, "velora_config": {"num_groups": 4}}, "4"),
    "kasa": ({"peft_type": "LORA", "r": 4, "target_modules": QV, "kasa_config": {}}, "4"),
    "bdlora": ({"peft_type": "LORA", "r": 4, "target_modules": QV, "use_bdlora": BD}, "4"),
    "monteclora": ({"peft_type": "LORA", "r": 4, "target_modules": QV, "monteclora_config": {"num_samples": 2}}, "4"),
    "mica": ({"peft_type": "LORA", "r": 4, "target_modules": QV, "init_lora_weights": "mica"}, "4"),
    "alora": ({"peft_type": "LORA", "r": 4, "target_modules": QV, "alora_invocation_tokens": [3, 4]}, "4"),
    "arrow": ({"peft_type": "LORA", "r": 4, "target_modules": QV, "arrow_config": ARROW}, "4"),
    "trainable_tokens": ({"peft_type": "TRAINABLE_TOKENS", "token_indices": [1, 2]}, "-"),
    "prefix_tuning": ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 5, "task_type": "CAUSAL_LM"}, None),
    "prompt_tuning": ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 6, "task_type": "CAUSAL_LM"}, None),
}  # fmt: skip


ONLY_ON_OTHER_LAYERS = {"lora_mha": "nn.MultiheadAttention (tests/test_lora_mha.py inspects it)"}
"""Kinds the demo Llama has no layer for, and where they are inspected instead."""


def test_every_kind_is_inspected() -> None:
    # a new kind needs its inspect row here (and its rank reading)
    assert set(SPECS) | set(ONLY_ON_OTHER_LAYERS) == set(kinds())


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_inspect_and_validate_every_kind(kind, tmp_path, capsys) -> None:
    spec, rank = SPECS[kind]
    model = peftdecl.attach(llama_state_dict(), spec, **FACTS)
    model.save(tmp_path)
    assert main(["validate", str(tmp_path)]) == 0
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"kind        {spec['peft_type']}" in out
    # an Arrow router's file holds its own LoRA pair, not the experts it stacks (those are their own adapters)
    saved = sum(v.size for k, v in model.state_dict().items() if ".arrow_" not in k)
    assert f"parameters  {saved:,}" in out
    if rank is None:
        assert "shared      prompt_embeddings" in out
    else:
        line = next(s for s in out.splitlines() if s.startswith("model.layers.0.self_attn.q_proj ")
                    or s.startswith("model.layers.0.self_attn.k_proj ")
                    or s.startswith("model.embed_tokens "))  # fmt: skip
        assert line.split()[1] == rank
