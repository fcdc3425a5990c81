"""``peftdecl train`` end to end on a tiny local Llama: resume, accumulation, data parallelism, torch vs MLX,
every kind, the final adapter in PEFT, bad inputs. Tolerances are stated at each comparison."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from train_runs import LORA, losses, needs, train_file, write_text_data

from peftdecl.errors import DataError, PeftdeclError, TrainConfigError
from peftdecl.train.load import load_train_file
from peftdecl.train.loop import Summary, train
from peftdecl.train.tiny_model import build_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(
        tmp_path_factory.mktemp("tiny"), hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_text_data(tmp_path_factory.mktemp("data"))


def run(tmp_path: Path, model_dir: Path, data: tuple[Path, Path], adapter: object = LORA, *, backend: str = "torch",
        resume: object = None, top: dict | None = None, **training: object) -> tuple[Path, Summary]:  # fmt: skip
    """Train with the training fields given (top-level fields in ``top``); (output_dir, summary)."""
    mapping = train_file(tmp_path, model_dir, data, adapter, **training)  # type: ignore[arg-type]
    mapping |= {"backend": backend, **(top or {})}
    config = load_train_file(mapping)
    summary = train(config, resume=resume)  # type: ignore[arg-type]
    return Path(config.output_dir), summary


def rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


# -- resume ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("backend", "tolerance"), [("torch", 1e-6), ("mlx", 1e-5)])
def test_resume_equals_uninterrupted(tmp_path, model_dir, data, backend, tolerance):
    needs(backend)
    adapter = {**LORA, "lora_dropout": 0.1}  # dropout: the generator's state must travel too
    straight, _ = run(tmp_path / "a", model_dir, data, adapter, max_steps=6, save_steps=3, backend=backend)
    interrupted = tmp_path / "b" / "run"
    interrupted.mkdir(parents=True)
    shutil.copytree(straight / "checkpoint-3", interrupted / "checkpoint-3")  # as if killed after step 3
    resumed, _ = run(
        tmp_path / "b", model_dir, data, adapter, max_steps=6, save_steps=3, backend=backend, resume=True
    )
    ours, theirs = losses(resumed), losses(straight)
    assert sorted(ours) == [1, 2, 3, 4, 5, 6]  # the log keeps steps 1-3 of the checkpointed run
    assert rel([ours[s] for s in (4, 5, 6)], [theirs[s] for s in (4, 5, 6)]) <= tolerance


# -- accumulation, data parallelism, torch vs MLX ----------------------------------------------------------
def test_accumulation_equals_a_larger_batch(tmp_path, model_dir, data):
    needs("torch")
    big, _ = run(tmp_path / "big", model_dir, data, per_device_train_batch_size=4)
    small, _ = run(
        tmp_path / "small", model_dir, data, per_device_train_batch_size=2, gradient_accumulation_steps=2
    )
    steps = [1, 2, 3, 4]
    # float32; micro-batches pad to other lengths than the big batch, so sums run in another order
    assert rel([losses(small)[s] for s in steps], [losses(big)[s] for s in steps]) <= 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_processes_equal_one(tmp_path, model_dir, data):
    needs("torch")
    one, _ = run(tmp_path / "one", model_dir, data, per_device_train_batch_size=4)
    mapping = train_file(tmp_path / "two", model_dir, data, LORA, per_device_train_batch_size=2) | {
        "backend": "torch"
    }
    path = tmp_path / "two.json"
    path.write_text(json.dumps(mapping))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(_free_port()), "-m", "peftdecl", "train", str(path)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    two = Path(mapping["output_dir"])
    steps = [1, 2, 3, 4]
    assert rel([losses(two)[s] for s in steps], [losses(one)[s] for s in steps]) <= 1e-5  # gloo, CPU, float32
    assert sorted(p.name for p in two.iterdir() if p.name.startswith("adapter")) == ["adapter"]


@pytest.mark.parametrize(
    "adapter",
    [
        LORA,
        {**LORA, "use_dora": True},
        {
            "peft_type": "IA3",
            "target_modules": ["k_proj", "v_proj", "down_proj"],
            "feedforward_modules": ["down_proj"],
        },
    ],
    ids=["lora", "dora", "ia3"],
)
def test_torch_and_mlx_give_the_same_first_losses(tmp_path, model_dir, data, adapter):
    needs("torch")
    needs("mlx")
    adapter = {**adapter, "init_lora_weights": False} if adapter["peft_type"] == "LORA" else adapter
    on_torch, _ = run(tmp_path / "torch", model_dir, data, adapter, max_steps=5)
    on_mlx, _ = run(tmp_path / "mlx", model_dir, data, adapter, backend="mlx", max_steps=5)
    steps = [1, 2, 3, 4, 5]
    assert rel([losses(on_mlx)[s] for s in steps], [losses(on_torch)[s] for s in steps]) <= 1e-3


# -- outputs ------------------------------------------------------------------------------------------------
def test_outputs_log_plot_summary_and_peft_loadable_adapter(tmp_path, model_dir, data, capsys):
    needs("torch")
    pytest.importorskip("peft")

    out, summary = run(tmp_path, model_dir, data, eval_steps=2, save_steps=2, save_total_limit=1,
                       top={"save_formats": ["hf", "mlx-lm"]})  # fmt: skip
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss" in r]
    assert [r["step"] for r in trained] == [1, 2, 3, 4]
    assert all({"step", "loss", "learning_rate", "tokens"} <= set(r) for r in trained)
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 4]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]  # save_total_limit 1
    assert json.loads((out / "summary.json").read_text())["steps"] == 4 == summary.steps
    assert (out / "adapter-mlx-lm" / "adapters.safetensors").is_file()
    printed = capsys.readouterr().out
    assert "eval_loss" in printed and "step 4" in printed  # plain lines: stdout is not a terminal here
    assert_loads_in_peft(model_dir, out / "adapter")
    assert_loads_in_peft(model_dir, out / "checkpoint-4")  # a checkpoint is an HF PEFT adapter folder too


def assert_loads_in_peft(model_dir: Path, adapter: Path) -> None:
    """peft.PeftModel loads ``adapter`` with no missing adapter key and no unexpected key."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    result = model.load_adapter(str(adapter), adapter_name="again")
    # PEFT loads a prompt table outside the module tree and always lists it as unexpected (peft's own quirk)
    assert not [k for k in result.unexpected_keys if not k.endswith("prompt_embeddings")]
    assert not [k for k in result.missing_keys if ".again" in k or "again." in k]


# -- every kind ------------------------------------------------------------------------------------------------
TARGETS = ["q_proj", "v_proj"]
KIND_SPECS = {
    "lora": LORA,
    "dora": {**LORA, "use_dora": True},
    "adalora": {
        "peft_type": "ADALORA",
        "init_r": 4,
        "target_r": 2,
        "target_modules": TARGETS,
        "tinit": 1,
        "tfinal": 1,
        "deltaT": 1,
        "total_step": 4,
    },
    "ia3": {"peft_type": "IA3", "target_modules": TARGETS, "feedforward_modules": []},
    "loha": {"peft_type": "LOHA", "r": 2, "alpha": 4, "target_modules": TARGETS},
    "lokr": {"peft_type": "LOKR", "r": 2, "alpha": 4, "target_modules": TARGETS},
    "oft": {"peft_type": "OFT", "r": 0, "oft_block_size": 4, "target_modules": TARGETS},
    "boft": {"peft_type": "BOFT", "boft_block_size": 4, "target_modules": TARGETS},
    "vera": {"peft_type": "VERA", "r": 4, "target_modules": TARGETS},
    "prefix_tuning": {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 2},
    "prompt_tuning": {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 2},
}


@pytest.mark.parametrize("kind", sorted(KIND_SPECS))
def test_every_kind_trains_and_loads_in_peft(tmp_path, model_dir, data, kind):
    needs("torch")
    out, summary = run(tmp_path, model_dir, data, KIND_SPECS[kind], max_steps=4, learning_rate=5e-2)
    trained = losses(out)
    assert summary.final_loss is not None and trained[4] < trained[1]  # it learns (a high rate, 4 steps)
    assert_loads_in_peft(model_dir, out / "adapter")


def test_adalora_allocates_inside_the_loop_and_saves_its_rank_pattern(tmp_path, model_dir, data):
    needs("torch")
    spec = {**KIND_SPECS["adalora"], "total_step": 1000}  # replaced by the run's own length (6)
    out, _ = run(tmp_path, model_dir, data, spec, max_steps=6)
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["total_step"] == 6
    pattern = saved["rank_pattern"]
    assert pattern and all(len(kept) == 4 for kept in pattern.values())  # init_r 4 triplets per matrix
    assert sum(sum(kept) for kept in pattern.values()) == 2 * len(
        pattern
    )  # the final budget: target_r 2 each


# -- bad input fails before anything is written --------------------------------------------------------------
def _fails(tmp_path: Path, mapping: dict, error: type[Exception], *needles: str) -> None:
    with pytest.raises(error) as caught:
        train(load_train_file(mapping))
    for needle in needles:
        assert needle in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_bad_inputs_fail_naming_what_is_wrong_and_write_nothing(tmp_path, model_dir, data):
    needs("torch")
    good = train_file(tmp_path, model_dir, data, LORA) | {"backend": "torch"}
    with pytest.raises(TrainConfigError) as caught:
        load_train_file({**good, "training": {**good["training"], "learning_rte": 1.0}})
    assert "$.training.learning_rte" in str(caught.value)
    _fails(tmp_path, {**good, "model": str(tmp_path / "nowhere")}, PeftdeclError, "nowhere")
    _fails(tmp_path, {**good, "data": {**good["data"], "train": str(tmp_path / "none.jsonl")}}, PeftdeclError,
           "none.jsonl")  # fmt: skip
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"txt": "wrong key"}\n')
    _fails(tmp_path, {**good, "data": {**good["data"], "train": str(broken)}}, DataError, "broken.jsonl:2")
    _fails(tmp_path, {**good, "adapter": {**LORA, "r": 0}}, TrainConfigError, "$.adapter.r")


def test_long_sequences_are_truncated_with_a_warning_and_counted(tmp_path, model_dir, data):
    needs("torch")
    long_file = tmp_path / "long.jsonl"
    long_file.write_text("".join(json.dumps({"text": "abcdefgh" * 20}) + "\n" for _ in range(8)))
    with pytest.warns(UserWarning, match="truncated"):
        out, summary = run(tmp_path, model_dir, (long_file, data[1]), max_steps=1)
    assert summary.truncated == 8
    assert json.loads((out / "summary.json").read_text())["truncated"] == 8
    first = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert first == {"step": 0, "truncated_train": 8, "truncated_valid": 0}


# -- companion commands ------------------------------------------------------------------------------------
def test_merge_and_generate_commands(tmp_path, model_dir, data, capsys):
    needs("torch")
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    import peftdecl
    from peftdecl.cli import main

    out, _ = run(tmp_path, model_dir, data, {**LORA, "init_lora_weights": False})
    merged = tmp_path / "merged"
    assert (
        main(["merge", "--model", str(model_dir), "--adapter", str(out / "adapter"), "--out", str(merged)])
        == 0
    )
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    adapted = peftdecl.load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), out / "adapter")
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits.numpy()
        got = AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits.numpy()
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) <= 1e-5  # float32
    assert (merged / "tokenizer.json").is_file()
    capsys.readouterr()
    args = ["generate", "--model", str(model_dir), "--adapter", str(out / "adapter"), "--prompt", "abc"]
    assert main([*args, "--max-tokens", "5"]) == 0
    text = capsys.readouterr().out
    assert len(text.rstrip("\n")) <= 5 * 4  # at most five tokens, each one character (or a special's name)


def test_train_command_reads_overrides(tmp_path, model_dir, data):
    needs("torch")
    from peftdecl.cli import main

    path = tmp_path / "train.json"
    path.write_text(json.dumps(train_file(tmp_path, model_dir, data, LORA) | {"backend": "torch"}))
    assert main(["train", str(path), "--set", "training.max_steps=2", "--set", "training.eval_steps=1"]) == 0
    assert sorted(losses(tmp_path / "run")) == [1, 2]
    assert main(["train", str(path), "--set", "training.max_steps=zero"]) == 2


def test_an_mlx_lm_lora_config_trains_unchanged(tmp_path, model_dir, data):
    needs("torch")
    import yaml

    folder = data[0].parent  # holds train.jsonl and valid.jsonl, as mlx_lm.lora's --data expects
    config = {
        "model": str(model_dir),
        "train": True,
        "data": str(folder),
        "fine_tune_type": "lora",
        "num_layers": 2,
        "batch_size": 4,
        "iters": 3,
        "learning_rate": 1e-3,
        "steps_per_report": 1,
        "steps_per_eval": 3,
        "adapter_path": str(tmp_path / "adapters"),
        "max_seq_length": 64,
        "lora_parameters": {
            "keys": ["self_attn.q_proj", "self_attn.v_proj"],
            "rank": 4,
            "scale": 2.0,
            "dropout": 0.0,
        },
    }
    path = tmp_path / "lora_config.yaml"
    path.write_text(yaml.safe_dump(config))
    from peftdecl.cli import main

    assert main(["train", str(path), "--set", "backend=torch"]) == 0
    out = tmp_path / "adapters"
    assert sorted(losses(out)) == [1, 2, 3]
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 8  # mlx-lm's scale is alpha / r
    assert (out / "adapter-mlx-lm" / "adapters.safetensors").is_file()
    assert_loads_in_peft(model_dir, out / "adapter")
