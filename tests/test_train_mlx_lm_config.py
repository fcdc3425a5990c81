"""An ``mlx_lm.lora`` config read as a training file, checked against mlx-lm itself: its defaults and options, its
optimizers' defaults, its learning-rate schedules (against transformers' ``get_scheduler``), and the layers its
``linear_to_lora_layers`` adapts and their scale (against PEFT on the same tiny model).

Tolerances: mlx-lm's schedules are evaluated in float32: per-step learning rates agree with transformers' float64
ones to a relative 1e-6 of the peak rate (float32's 6e-8 rounding, a few operations deep).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from peftdecl.errors import TrainConfigError
from peftdecl.train.load import block_linears, load_train_file
from peftdecl.train.mlx_lm_config import (
    _OPTIMIZER_OPTIONS,
    DATASET_KEYS,
    KNOWN_KEYS,
    MLX_LM_DEFAULTS,
    from_mlx_lm,
    is_mlx_lm_config,
)

SCHEDULE_TOL = 1e-6
LLAMA = {"num_hidden_layers": 4}

# mlx-lm's example lora_config.yaml (examples/ in its repository), with its commented-out options left out
EXAMPLE = """
model: "mlx_model"
train: true
fine_tune_type: lora
optimizer: adamw
data: "data"
seed: 0
num_layers: 2
batch_size: 4
iters: 1000
val_batches: 25
learning_rate: 1e-5
steps_per_report: 10
steps_per_eval: 200
resume_adapter_file: null
adapter_path: "adapters"
save_every: 100
test: false
test_batches: 100
max_seq_length: 2048
grad_checkpoint: false
lora_parameters:
  keys: ["self_attn.q_proj", "self_attn.v_proj"]
  rank: 8
  scale: 20.0
  dropout: 0.0
"""


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    """A working directory with data/{train,valid}.jsonl (paths are relative to it, as for mlx_lm.lora)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for name in ("train.jsonl", "valid.jsonl"):
        (tmp_path / "data" / name).write_text('{"text": "a"}\n')
    return tmp_path


def refused(data: dict[str, object], model_config: dict[str, object] | None = LLAMA) -> dict[str, str]:
    with pytest.raises(TrainConfigError) as caught:
        from_mlx_lm(data, model_config)
    return dict(caught.value.problems)


def test_mlx_lms_example_config_maps_option_by_option(folder) -> None:
    mapped = from_mlx_lm(yaml.safe_load(EXAMPLE), LLAMA)
    assert mapped == {
        "model": "mlx_model",
        "adapter": {
            "peft_type": "LORA",
            "r": 8,
            "lora_alpha": 160,  # scale 20 = lora_alpha / r
            "lora_dropout": 0.0,
            "target_modules": ["self_attn.q_proj", "self_attn.v_proj"],
            "layers_to_transform": [2, 3],  # the last num_layers of 4 blocks
        },
        "data": {
            "format": "auto",
            "mask_prompt": False,
            "max_seq_length": 2048,
            "train": "data/train.jsonl",
            "valid": "data/valid.jsonl",
        },
        "training": {
            "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "max_steps": 1000,
            "logging_steps": 10,
            "save_steps": 100,
            "seed": 0,
            "gradient_checkpointing": False,
            "max_grad_norm": 0.0,  # mlx-lm does not clip
            "optim": "adamw",
            "adam_beta1": 0.9,
            "adam_beta2": 0.999,
            "adam_epsilon": 1e-8,
            "weight_decay": 0.01,  # mlx's AdamW default
            "learning_rate": 1e-5,
            "lr_scheduler_type": "constant",
            "eval_steps": 200,
        },
        "output_dir": "adapters",
        "save_formats": ["hf", "mlx-lm"],
    }
    Path("mlx_model").mkdir()
    Path("mlx_model/config.json").write_text('{"num_hidden_layers": 4}')
    Path("lora.yaml").write_text(EXAMPLE)
    config = load_train_file("lora.yaml", ["training.max_steps=5"])  # --set uses the training file's names
    assert config.training.max_steps == 5 and config.training.learning_rate == 1e-5
    assert config.adapter["layers_to_transform"] == [2, 3]  # type: ignore[index]


def test_absent_options_take_mlx_lms_defaults(folder) -> None:
    linears = ["self_attn.q_proj", "mlp.up_proj"]  # the model's block linears: mlx-lm's default keys
    mapped = from_mlx_lm({"model": "m", "data": "data"}, {"num_hidden_layers": 20}, linears)
    assert mapped["adapter"] == {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 160,
        "lora_dropout": 0.0,
        "target_modules": sorted(linears),
        "layers_to_transform": list(range(4, 20)),  # the last 16 of 20 blocks
    }
    training = mapped["training"]
    assert training["max_steps"] == 1000 and training["learning_rate"] == 1e-5 and training["seed"] == 0
    assert training["adam_beta1"] == 0.9 and training["weight_decay"] == 0.0  # mlx's Adam: no weight decay
    assert mapped["output_dir"] == "adapters"
    # every block: PEFT's all-linear; some blocks and no readable weights: the keys are asked for
    assert from_mlx_lm({"model": "m", "data": "data", "num_layers": -1}, None)["adapter"][
        "target_modules"
    ] == ("all-linear")
    assert (
        "not listable"
        in refused({"model": "m", "data": "data"}, {"num_hidden_layers": 20})["$.lora_parameters.keys"]
    )


def test_the_defaults_are_mlx_lms_own() -> None:
    lora = pytest.importorskip("mlx_lm.lora")
    assert lora.CONFIG_DEFAULTS == MLX_LM_DEFAULTS


def test_every_mlx_lm_option_is_known() -> None:
    lora = pytest.importorskip("mlx_lm.lora")
    datasets = pytest.importorskip("mlx_lm.tuner.datasets")
    options = {action.dest for action in lora.build_parser()._actions if action.dest != "help"}
    assert options <= KNOWN_KEYS, options - KNOWN_KEYS
    # the dataset options mlx-lm reads from the config with getattr(config/args, "name", default)
    read = dict(re.findall(r'getattr\(\w+, "(\w+)", "?([\w]*)"?\)', inspect.getsource(datasets)))
    assert {name for name in read if name.endswith("_feature")} == set(DATASET_KEYS)
    assert all(read[name] == default for name, default in DATASET_KEYS.items())
    assert "hf_dataset" in read and "mask_prompt" in read


def test_optimizer_defaults_are_mlxs() -> None:
    optimizers = pytest.importorskip("mlx.optimizers")
    classes = {"adam": optimizers.Adam, "adamw": optimizers.AdamW, "sgd": optimizers.SGD}
    for name, options in _OPTIMIZER_OPTIONS.items():
        parameters = inspect.signature(classes[name]).parameters
        assert {k: parameters[k].default for k in parameters if k != "learning_rate"} == options, name


def test_optimizer_options_map() -> None:
    config = {"model": "m", "data": ".", "num_layers": -1, "optimizer": "adamw",
              "optimizer_config": {"adamw": {"betas": [0.8, 0.95], "eps": "1e-6", "weight_decay": 0.05,
                                             "bias_correction": True}, "sgd": {"momentum": 0.9}}}  # fmt: skip
    training = from_mlx_lm(config, None)["training"]
    assert (training["optim"], training["adam_beta1"], training["adam_beta2"]) == ("adamw", 0.8, 0.95)
    assert (training["adam_epsilon"], training["weight_decay"]) == (1e-6, 0.05)
    config.update(optimizer="sgd", optimizer_config={"sgd": {"weight_decay": 0.1}})
    training = from_mlx_lm(config, None)["training"]
    assert (training["optim"], training["weight_decay"]) == ("sgd", 0.1)


# learning-rate schedules: mlx-lm's build_schedule against transformers' get_scheduler


def mlx_rates(schedule: dict[str, object], steps: int) -> np.ndarray:
    utils = pytest.importorskip("mlx_lm.tuner.utils")
    mx = pytest.importorskip("mlx.core")
    function = utils.build_schedule(schedule)
    # mlx optimizers evaluate the schedule at their step count before incrementing it: 0 for the first update
    return np.array([float(function(mx.array(step))) for step in range(steps)])


def transformers_rates(training: dict[str, object], steps: int) -> np.ndarray:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=float(training["learning_rate"]))  # type: ignore[arg-type]
    scheduler = transformers.get_scheduler(
        training["lr_scheduler_type"],  # type: ignore[arg-type]
        optimizer,
        num_warmup_steps=int(training.get("warmup_steps", 0)),  # type: ignore[call-overload]
        num_training_steps=steps,
        scheduler_specific_kwargs=training.get("lr_scheduler_kwargs", {}),
    )
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return np.array(rates)


SCHEDULES = {
    "cosine_over_the_run": {"name": "cosine_decay", "arguments": [1e-3, 40]},
    "cosine_longer_than_the_run": {"name": "cosine_decay", "arguments": [1e-3, 100, 0.0]},
    "linear_to_zero": {"name": "linear_schedule", "arguments": [1e-3, 0.0, 40]},
    "linear_to_a_floor": {"name": "linear_schedule", "arguments": [1e-3, 1e-4, 40]},
    "flat_line": {"name": "linear_schedule", "arguments": [1e-3, 1e-3, 40], "warmup": 0},
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_mapped_schedules_give_mlx_lms_rates_at_every_step(name: str) -> None:
    steps = 40
    schedule = SCHEDULES[name]
    config = {"model": "m", "data": ".", "num_layers": -1, "iters": steps, "lr_schedule": schedule}
    training = from_mlx_lm(config, None)["training"]
    expected = mlx_rates(schedule, steps)
    got = transformers_rates(training, steps)
    assert np.max(np.abs(got - expected)) / expected[0] <= SCHEDULE_TOL, (name, got, expected)


def test_warm_up_is_refused_because_the_two_schedules_differ() -> None:
    schedule = {"name": "cosine_decay", "arguments": [1e-3, 36], "warmup": 4}
    expected = mlx_rates(schedule, 40)
    nearest = transformers_rates(
        {"learning_rate": 1e-3, "lr_scheduler_type": "cosine", "warmup_steps": 4}, 40
    )
    assert np.allclose(expected[:5], nearest[:5]) and not np.isclose(expected[5], nearest[5], rtol=1e-3)
    config = {"model": "m", "data": ".", "num_layers": -1, "iters": 40, "lr_schedule": schedule}
    assert "one step longer" in refused(config)["$.lr_schedule.warmup"]


@pytest.mark.parametrize(
    ("schedule", "path", "fragment"),
    [
        (
            {"name": "cosine_decay", "arguments": [1e-3, 20]},
            "$.lr_schedule.arguments[1]",
            "cosine rises again",
        ),
        (
            {"name": "cosine_decay", "arguments": [1e-3, 40, 1e-5]},
            "$.lr_schedule.arguments[2]",
            "non-zero end",
        ),
        ({"name": "linear_schedule", "arguments": [1e-3, 0.0, 30]}, "$.lr_schedule.arguments", "exactly"),
        ({"name": "linear_schedule", "arguments": [1e-4, 1e-3, 40]}, "$.lr_schedule.arguments", "end < init"),
        (
            {"name": "exponential_decay", "arguments": [1e-3, 0.9]},
            "$.lr_schedule",
            "no transformers equivalent",
        ),
        ({"name": "cosine_decay", "arguments": "x"}, "$.lr_schedule.arguments", "expected a list"),
        (
            {"name": "cosine_decay", "arguments": [1e-3, 40], "decay": 1},
            "$.lr_schedule.decay",
            "not an mlx-lm",
        ),
    ],
)
def test_schedules_without_an_exact_equivalent_are_refused(schedule, path: str, fragment: str) -> None:
    config = {"model": "m", "data": ".", "num_layers": -1, "iters": 40, "lr_schedule": schedule}
    found = refused(config)
    assert fragment in found[path], found


# the adapted layers and their scale: mlx-lm's linear_to_lora_layers against PEFT on the same model


@pytest.mark.parametrize(
    ("fine_tune_type", "num_layers", "keys"),
    [
        ("lora", 1, None),
        ("lora", -1, ["self_attn.q_proj", "mlp.down_proj"]),
        ("dora", 2, ["self_attn.v_proj"]),
    ],
)
def test_mlx_lm_and_peft_adapt_the_same_layers_with_the_same_scale(
    tmp_path, fine_tune_type: str, num_layers: int, keys: list[str] | None
) -> None:
    pytest.importorskip("mlx.core")
    mlx_utils = pytest.importorskip("mlx_lm.utils")
    tuner = pytest.importorskip("mlx_lm.tuner.utils")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peftdecl.train.tiny_model import build_tiny_llama

    model_dir = tmp_path / "model"
    build_tiny_llama(model_dir, hidden=32, layers=2)
    lora_parameters: dict[str, object] = {"rank": 4, "scale": 2.5, "dropout": 0.1}
    if keys is not None:
        lora_parameters["keys"] = keys
    config = {"model": str(model_dir), "data": str(tmp_path), "fine_tune_type": fine_tune_type,
              "num_layers": num_layers, "lora_parameters": lora_parameters}  # fmt: skip
    spec = from_mlx_lm(config, {"num_hidden_layers": 2}, block_linears(str(model_dir)))["adapter"]

    mlx_model, _ = mlx_utils.load(str(model_dir))
    mlx_model.freeze()
    tuner.linear_to_lora_layers(
        mlx_model, num_layers, dict(lora_parameters), use_dora=fine_tune_type == "dora"
    )
    mlx_adapted = {name: module for name, module in mlx_model.named_modules() if hasattr(module, "lora_a")}

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    peft_config = peft.LoraConfig(**{k: v for k, v in spec.items() if k != "peft_type"})
    peft_model = peft.get_peft_model(base, peft_config)
    peft_adapted = {
        name.removeprefix("base_model.model."): module
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})
    }
    assert set(mlx_adapted) == set(peft_adapted) and mlx_adapted
    for name, module in mlx_adapted.items():
        assert float(module.scale) == peft_adapted[name].scaling["default"], name  # exact: 2.5 both ways
        assert 1.0 - module.dropout._p_1 == pytest.approx(
            peft_adapted[name].lora_dropout["default"].p, abs=1e-12
        )
        assert (type(module).__name__ == "DoRALinear") == bool(peft_adapted[name].use_dora["default"])


# refused and accepted options


@pytest.mark.parametrize(
    ("options", "path", "fragment"),
    [
        ({"fine_tune_type": "full"}, "$.fine_tune_type", "not full weights"),
        ({"test": True}, "$.test", "does not evaluate a test split"),
        ({"train": False}, "$.train", "always trains"),
        ({"resume_adapter_file": "a.safetensors"}, "$.resume_adapter_file", "--resume"),
        ({"report_to": "wandb"}, "$.report_to", "no tracking service"),
        ({"trust_remote_code": True}, "$.trust_remote_code", "never runs code"),
        ({"optimizer": "muon"}, "$.optimizer", "no equivalent"),
        ({"optimizer": "adafactor"}, "$.optimizer", "no equivalent"),
        ({"optimizer": "sgd", "optimizer_config": {"sgd": {"momentum": 0.9}}}, "$.optimizer_config.sgd.momentum",
         "no momentum"),
        ({"optimizer_config": {"adam": {"weight_decay": 0.1}}}, "$.optimizer_config.adam.weight_decay", "honoured"),
        ({"data": "mlx-community/WikiSQL"}, "$.data", "Hugging Face dataset"),
        ({"hf_dataset": {"path": "billsum"}}, "$.hf_dataset", "local JSON Lines"),
        ({"prompt_feature": "input"}, "$.prompt_feature", "fixed key 'prompt'"),
        ({"lora_parameters": {"rank": 8, "alpha": 16}}, "$.lora_parameters.alpha", "not an mlx-lm LoRA option"),
        ({"lora_parameters": {"rank": 8, "dropout": 0.0}}, "$.lora_parameters.scale", "is required"),
        ({"num_layers": 9}, "$.num_layers", "the model has 4"),
        ({"iters": 0}, "$.iters", "expected an integer >= 1"),
        ({"itres": 5}, "$.itres", "did you mean 'iters'"),
    ],
)  # fmt: skip
def test_options_without_an_equivalent_are_refused_by_name(folder, options, path: str, fragment: str) -> None:
    found = refused({"model": "m", "data": "data", "num_layers": -1, **options})
    assert fragment in found.get(path, ""), found


def test_no_op_values_are_accepted(folder) -> None:
    config = {
        "model": "m",
        "data": "data",
        "num_layers": 4,
        "train": True,
        "test": False,
        "test_batches": 7,
        "val_batches": 3,  # bounds only mlx-lm's eval; peftdecl evaluates all of valid.jsonl
        "resume_adapter_file": None,
        "report_to": None,
        "project_name": "p",
        "trust_remote_code": False,
        "config": None,
        "clear_cache_threshold": 0,
        "text_feature": "text",
        "chat_feature": "messages",
        "optimizer_config": {"muon": {"momentum": 0.9}, "adam": {}},
    }
    assert from_mlx_lm(config, LLAMA)["model"] == "m"


def test_grad_accumulation_turns_iterations_into_optimizer_steps(folder) -> None:
    config = {"model": "m", "data": "data", "num_layers": -1, "iters": 21, "grad_accumulation_steps": 3,
              "steps_per_report": 3, "steps_per_eval": 6, "save_every": 9}  # fmt: skip
    training = from_mlx_lm(config, None)["training"]
    assert (training["max_steps"], training["logging_steps"], training["eval_steps"]) == (7, 1, 2)
    assert training["save_steps"] == 3 and training["gradient_accumulation_steps"] == 3
    config["steps_per_report"] = 4
    assert "not a whole number of steps" in refused(config)["$.steps_per_report"]


def test_without_valid_jsonl_there_is_no_evaluation(folder) -> None:
    (folder / "data" / "valid.jsonl").unlink()
    mapped = from_mlx_lm({"model": "m", "data": "data", "num_layers": -1}, None)
    assert "valid" not in mapped["data"] and "eval_steps" not in mapped["training"]


def test_num_layers_needs_the_models_block_count(folder) -> None:
    config = {"model": "m", "data": "data", "num_layers": 2}
    assert "num_hidden_layers" in refused(config, None)["$.num_layers"]
    assert (
        "16 (mlx-lm's default 16, as the file sets none)"
        in refused({"model": "m", "data": "data"}, None)["$.num_layers"]
    )
    assert (
        "layers_to_transform" not in from_mlx_lm({**config, "num_layers": 0}, None)["adapter"]
    )  # all blocks
    assert "layers_to_transform" not in from_mlx_lm({**config, "num_layers": 4}, LLAMA)["adapter"]


def test_the_model_is_required_and_errors_name_the_file(folder) -> None:
    assert "not a local model folder" in refused({"data": "data", "iters": 5})["$.model"]
    Path("bad.yaml").write_text("model: m\ndata: data\nfine_tune_type: full\nnum_layers: -1\n")
    with pytest.raises(TrainConfigError) as caught:
        load_train_file("bad.yaml")
    assert caught.value.source == "bad.yaml"
    assert [path for path, _ in caught.value.problems] == ["$.fine_tune_type"]


def test_detection() -> None:
    assert is_mlx_lm_config({"model": "m", "data": "folder"})
    assert is_mlx_lm_config({"iters": 5})
    assert not is_mlx_lm_config({"model": "m", "data": {"train": "t.jsonl"}})
    assert not is_mlx_lm_config({"model": "m", "data": "d", "output_dir": "o"})  # a (broken) training file
    assert not is_mlx_lm_config({"peft_type": "LORA"}) and not is_mlx_lm_config({"model": "m"})
