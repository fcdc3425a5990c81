"""The README's fine-tuning example (examples/finetune/): its data, its generator, its model recipe and its
training file. Cheap checks only; the end-to-end run is tests/test_train_e2e.py's."""

from __future__ import annotations

import importlib.util
import json
import string
import sys
from pathlib import Path
from types import ModuleType

import pytest

from peftdecl.cli import main
from peftdecl.train.load import check_paths, load_train_file, resolve_adapter_spec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "finetune"
TRAIN_FILE = EXAMPLE / "train.yaml"


def script(name: str) -> ModuleType:
    """Import one of the example's scripts as a module (they are not in a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_data_lines_are_sorting_examples() -> None:
    make_data = script("make_data")
    train, valid = rows(EXAMPLE / "data" / "train.jsonl"), rows(EXAMPLE / "data" / "valid.jsonl")
    assert (len(train), len(valid)) == (make_data.TRAIN_EXAMPLES, make_data.VALID_EXAMPLES)
    for row in train + valid:
        assert set(row) == {"prompt", "completion"}
        word = row["prompt"].removesuffix("=")
        assert row["prompt"] == word + "=" and set(word) <= set(string.ascii_lowercase)
        assert 3 <= len(word) <= 6 and row["completion"] == "".join(sorted(word))
    # held out: no valid answer (= letter multiset) occurs in training
    assert not {r["completion"] for r in train} & {r["completion"] for r in valid}


def test_make_data_rewrites_identical_files(tmp_path: Path) -> None:
    script("make_data").main([str(tmp_path)])
    for name in ("train.jsonl", "valid.jsonl"):
        assert (tmp_path / name).read_bytes() == (EXAMPLE / "data" / name).read_bytes(), name


def test_make_model_builds_the_configured_llama(tmp_path: Path) -> None:
    make_model = script("make_model")
    make_model.main([str(tmp_path / "m")])
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    sizes = make_model.SIZES
    assert (config["hidden_size"], config["num_hidden_layers"]) == (sizes["hidden"], sizes["layers"])
    assert (config["num_attention_heads"], config["intermediate_size"]) == (
        sizes["heads"],
        sizes["intermediate"],
    )
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer.from_file(str(tmp_path / "m" / "tokenizer.json"))
    unk = tokenizer.token_to_id("<unk>")
    for text in ("abcdefghijklmnopqrstuvwxyz=", "qzdgzu="):  # every character of the data is one known token
        ids = tokenizer.encode(text).ids
        assert len(ids) == len(text) and unk not in ids


def test_train_file_validates_and_its_paths_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the README runs it from the repository root; its paths are relative to that
    config = load_train_file(TRAIN_FILE)
    assert config.data.mask_prompt and config.data.valid is not None and config.generation_check is not None
    assert config.training.eval_steps is not None and config.training.max_steps is not None
    spec = resolve_adapter_spec(config)
    assert spec.peft_type == "LORA"
    script("make_model").main([str(tmp_path / "model")])
    check_paths(load_train_file(TRAIN_FILE, [f"model={tmp_path / 'model'}"]))
    assert main(["validate", str(TRAIN_FILE)]) == 0


def test_adapter_targets_exist_in_the_model(tmp_path: Path) -> None:
    """Every target_modules name matches a layer of the built model (attached on the NumPy reference)."""
    from safetensors.numpy import load_file

    import peftdecl

    script("make_model").main([str(tmp_path / "m")])
    weights = load_file(str(tmp_path / "m" / "model.safetensors"))
    spec = peftdecl.load_spec(EXAMPLE / "adapter.yaml")
    model = peftdecl.attach(
        {k: v for k, v in weights.items() if k.endswith("proj.weight") or "lm_head" in k}, spec
    )
    targeted = {name.rsplit(".", 1)[-1] for name in model.plan().targets}
    assert targeted == set(spec.target_modules)  # type: ignore[attr-defined]


def test_examples_tokenise_within_max_seq_length(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from peftdecl.train.data import load_dataset

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ROOT)
    script("make_model").main([str(tmp_path / "m")])
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    config = load_train_file(TRAIN_FILE)
    for name in (config.data.train, config.data.valid):
        assert name is not None
        dataset = load_dataset(Path(name), tokenizer, config.data)
        assert dataset.truncated == 0
        first = dataset.examples[0]  # prompt masked: the loss starts after "word="
        assert first.offset == len(rows(Path(name))[0]["prompt"])
