"""Whole-model I/O of the torch backend (peftdecl_torch.model_io) on a tiny Llama folder: loading and its errors,
greedy generation against transformers' own generate and an argmax loop, and the merged checkpoint (logits,
transformers and mlx-lm loading, shards, dtype, atomic writing).

Tolerances: merged-model logits vs the adapted model's ≤ 1e-5 (float32, the merge reorders the sums); mlx-lm's
float32 forward vs torch's ≤ 1e-4 (different kernels and accumulation order); bfloat16 weights vs float32 ≤ 2e-2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import rel_err, selected_backends

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
if "torch" not in selected_backends():
    pytest.skip("PEFTDECL_TEST_BACKENDS leaves torch out", allow_module_level=True)

from peftdecl.backend import get_backend  # noqa: E402
from peftdecl.errors import PeftdeclError  # noqa: E402
from peftdecl.model import AdaptedModel  # noqa: E402
from peftdecl.train.tiny_model import build_tiny_llama  # noqa: E402
from peftdecl_torch.model_io import generate, load_pretrained, save_merged  # noqa: E402

LOGITS_TOL = 1e-5  # float32 merged vs adapted
MLX_TOL = 1e-4  # mlx-lm's float32 kernels vs torch's
HALF_TOL = 2e-2  # bfloat16 weights

LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
PROMPTS = {
    "prompt_tuning": {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3},
    "prefix_tuning": {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3},
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    os.environ["HF_HUB_OFFLINE"] = "1"
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def adapted(folder: Path, spec: dict[str, Any], seed: int = 1) -> tuple[AdaptedModel, Any]:
    base, tokenizer = load_pretrained(folder, device="cpu", dtype="float32")
    model = AdaptedModel.create(get_backend("torch"), base, {"seed": seed})
    # a non-zero adapter, so that merged and unmerged differ from the base model
    model.add_adapter(
        "default", {**spec, "init_lora_weights": False} if spec["peft_type"] == "LORA" else spec, seed=seed
    )
    return model, tokenizer


def logits(model: Any, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits.double().numpy()


# -- loading ----------------------------------------------------------------------------------------------------
def test_load_gives_an_eval_model_and_its_tokenizer(folder: Path) -> None:
    model, tokenizer = load_pretrained(folder, device="auto", dtype="bfloat16")
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert tokenizer.decode(tokenizer.encode("abc", add_special_tokens=False)) == "abc"


def test_load_errors_name_the_problem(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(PeftdeclError, match=str(tmp_path / "absent")):
        load_pretrained(tmp_path / "absent", device="cpu", dtype="float32")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PeftdeclError, match=r"no config\.json"):
        load_pretrained(tmp_path / "empty", device="cpu", dtype="float32")
    with pytest.raises(PeftdeclError, match="dtype 'float64'"):
        load_pretrained(folder, device="cpu", dtype="float64")
    if not torch.cuda.is_available():
        with pytest.raises(PeftdeclError, match="no CUDA device"):
            load_pretrained(folder, device="cuda", dtype="float32")


# -- generation -------------------------------------------------------------------------------------------------
@pytest.mark.peft
def test_greedy_generation_equals_transformers_on_the_merged_model(folder: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model, tokenizer = adapted(folder, LORA)
    model.train()
    prompt = tokenizer.encode("the cat ", add_special_tokens=False)
    ours = generate(model, prompt, 12, None)
    assert model.base_model.training  # train mode restored
    model.save(tmp_path / "adapter")
    base, _ = load_pretrained(folder, device="cpu", dtype="float32")
    merged = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().eval()
    ids = torch.tensor([prompt])
    theirs = merged.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
        eos_token_id=None, pad_token_id=0,
    )[0, len(prompt) :].tolist()  # fmt: skip
    assert ours == theirs


@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_prompt_learning_generation_is_the_argmax_loop(kind: str, folder: Path) -> None:
    model, tokenizer = adapted(folder, PROMPTS[kind])
    model.eval()
    prompt = tokenizer.encode("hello", add_special_tokens=False)
    sequence = list(prompt)
    for _ in range(6):  # recompute the whole sequence each time: no cache involved
        sequence.append(int(logits(model, sequence)[0, -1].argmax()))
    expected = sequence[len(prompt) :]
    assert generate(model, prompt, 6, None) == expected
    # stopping at EOS: the first generated token as EOS ends the continuation right there, included
    assert generate(model, prompt, 6, expected[0]) == expected[:1]


# -- merged checkpoints -----------------------------------------------------------------------------------------
def safetensors_files(out: Path) -> list[Path]:
    return sorted(out.glob("*.safetensors"))


def test_merged_checkpoint_computes_like_the_adapted_model(folder: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model, tokenizer = adapted(folder, LORA)
    model.eval()
    ids = tokenizer.encode("a merged model", add_special_tokens=False)
    expected = logits(model, ids)
    base_logits = logits(load_pretrained(folder, device="cpu", dtype="float32")[0], ids)
    assert rel_err(base_logits, expected) > 1e-3  # the adapter changes the output
    out = tmp_path / "merged"
    save_merged(model, tokenizer, folder, out, None, max_shard_size=60_000)
    files = safetensors_files(out)
    assert len(files) > 1 and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert not any("lora" in name for name, _ in loaded.named_parameters())
    assert rel_err(logits(loaded, ids), expected) <= LOGITS_TOL


def test_merged_checkpoint_in_bfloat16(folder: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    model, tokenizer = adapted(folder, LORA)
    model.eval()
    ids = tokenizer.encode("half", add_special_tokens=False)
    expected = logits(model, ids)
    save_merged(model, tokenizer, folder, tmp_path / "merged", "bfloat16")
    for file in safetensors_files(tmp_path / "merged"):
        with safe_open(str(file), "pt") as handle:
            assert {handle.get_slice(k).get_dtype() for k in handle.keys()}  # noqa: SIM118  (safe_open is no dict) == {"BF16"}
    loaded, _ = load_pretrained(tmp_path / "merged", device="cpu", dtype="float32")
    assert rel_err(logits(loaded, ids), expected) <= HALF_TOL


def test_merged_checkpoint_loads_in_mlx_lm(folder: Path, tmp_path: Path) -> None:
    pytest.importorskip("mlx_lm")
    if "mlx" not in selected_backends():
        pytest.skip("PEFTDECL_TEST_BACKENDS leaves mlx out")
    import mlx.core as mx
    import mlx_lm

    model, tokenizer = adapted(folder, LORA)
    model.eval()
    ids = tokenizer.encode("mlx", add_special_tokens=False)
    expected = logits(model, ids)
    save_merged(model, tokenizer, folder, tmp_path / "merged", None)
    loaded, _ = mlx_lm.load(str(tmp_path / "merged"))
    theirs = np.array(loaded(mx.array([ids])).astype(mx.float32), dtype=np.float64)
    assert rel_err(theirs, expected) <= MLX_TOL


def test_merging_refuses_prompt_learning_and_busy_folders(folder: Path, tmp_path: Path) -> None:
    model, tokenizer = adapted(folder, PROMPTS["prompt_tuning"])
    with pytest.raises(PeftdeclError, match=r"no weights to merge"):
        save_merged(model, tokenizer, folder, tmp_path / "merged", None)
    assert not (tmp_path / "merged").exists()
    model, tokenizer = adapted(folder, LORA)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(PeftdeclError, match="not empty"):
        save_merged(model, tokenizer, folder, busy, None)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    with pytest.raises(PeftdeclError, match="dtype 'int8'"):
        save_merged(model, tokenizer, folder, tmp_path / "other", "int8")
    assert not (tmp_path / "other").exists()


def test_a_failed_merge_writes_nothing(folder: Path, tmp_path: Path) -> None:
    model, _ = adapted(folder, LORA)

    class Broken:
        def save_pretrained(self, directory: str) -> None:
            Path(directory, "tokenizer.json").write_text("half")
            raise OSError("disk full")

    empty = tmp_path / "out"
    empty.mkdir()  # an empty folder is accepted, and must survive a failure
    with pytest.raises(OSError, match="disk full"):
        save_merged(model, Broken(), folder, empty, None)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert not any(empty.iterdir())
