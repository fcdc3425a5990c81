"""Everything a run needs before its first step, checked before anything is written: the training file, the
backend, the model and tokenizer, the data, the adapter (fresh or from a checkpoint) and the runtime."""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import msgspec

from peftdecl._json import JsonObject
from peftdecl.backend import Backend, get_backend
from peftdecl.errors import DataError, PeftdeclError, TrainConfigError
from peftdecl.model import AdaptedModel
from peftdecl.spec import SpecBase, load_spec
from peftdecl.train.batching import BatchOrder
from peftdecl.train.config import TrainFile
from peftdecl.train.data import Dataset, load_dataset
from peftdecl.train.load import check_paths, resolve_adapter_spec
from peftdecl.train.runtime import Tokenizer, TrainingBackend, TrainingRuntime

ADAPTER_NAME = "default"


@dataclass
class Run:
    """A prepared run: its file, backend, adapted model, runtime, data and step plan."""

    config: TrainFile
    backend: Backend
    model: AdaptedModel
    tokenizer: Tokenizer
    runtime: TrainingRuntime
    train: Dataset
    valid: Dataset | None
    order: BatchOrder
    total_steps: int
    global_batch: int


def default_backend() -> str:
    """mlx on Apple silicon, torch elsewhere."""
    apple = platform.system() == "Darwin" and platform.machine() == "arm64"
    return "mlx" if apple else "torch"


def training_backend(config: TrainFile) -> Backend:
    """The backend named by the file (or the platform's default), which must implement TrainingBackend."""
    name = config.backend or default_backend()
    backend = get_backend(name)
    if not isinstance(backend, TrainingBackend):
        raise PeftdeclError(f"backend {name!r} cannot train: it lacks load_pretrained/training_runtime")
    return backend


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) in a single process."""
    import os

    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def total_steps(config: TrainFile, order: BatchOrder) -> int:
    """max_steps, or num_train_epochs passes over the global batches (at least one step)."""
    training = config.training
    if training.max_steps is not None:
        return training.max_steps
    return max(1, math.ceil(training.num_train_epochs * order.steps_per_epoch))


def with_run_length(spec: SpecBase, steps: int) -> SpecBase:
    """AdaLoRA's budget schedule runs over the run's own length: ``total_step`` becomes the number of steps."""
    if spec.peft_type == "ADALORA" and getattr(spec, "total_step", None) != steps:
        return spec.replace(total_step=steps)
    return spec


def prepare(config: TrainFile, checkpoint: tuple[JsonObject, dict[str, object]] | None = None) -> Run:
    """Check the file's paths and adapter, load the model, tokenise the data, attach the adapter (from the
    checkpoint's arrays when resuming) and build the runtime. Writes nothing."""
    check_paths(config)
    spec = resolve_adapter_spec(config)
    backend = training_backend(config)
    trainer = cast(TrainingBackend, backend)
    # passed only when set, so that a backend written before quantised bases still loads plain models
    quantized = {} if config.quantization is None else {"quantization": config.quantization}
    base, tokenizer = trainer.load_pretrained(
        Path(config.model_path), device=config.device, dtype=config.dtype, **quantized
    )
    train = load_dataset(Path(config.data.train), tokenizer, config.data)
    valid = load_dataset(Path(config.data.valid), tokenizer, config.data) if config.data.valid else None
    _, world_size = world()
    training = config.training
    global_batch = training.per_device_train_batch_size * training.gradient_accumulation_steps * world_size
    try:
        order = BatchOrder([len(e.tokens) for e in train.examples], global_batch, training.seed)
    except DataError as exc:
        raise DataError(f"{config.data.train}: {exc}") from None
    steps = total_steps(config, order)
    model = AdaptedModel.create(backend, base, {"seed": training.seed})
    if checkpoint is None:
        model.add_adapter(ADAPTER_NAME, with_run_length(spec, steps), seed=training.seed, activate=True)
    else:
        saved_spec, arrays = checkpoint
        model.add_adapter(ADAPTER_NAME, load_spec(saved_spec), arrays=cast(dict, arrays), activate=True)
    model.train()
    runtime = trainer.training_runtime(model, tokenizer, config)
    return Run(config, backend, model, tokenizer, runtime, train, valid, order, steps, global_batch)


def spec_json(model: AdaptedModel) -> JsonObject:
    """The live adapter's spec as JSON data (AdaLoRA's pruned rank_pattern included), for checkpoints."""
    return model.spec(ADAPTER_NAME).to_dict()


def check_resumable(config: TrainFile, state: JsonObject) -> None:
    """A checkpoint resumes only the run it came from: the same global batch composition and seed."""
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise PeftdeclError("checkpoint's trainer_state.json has no 'config'")
    mine = msgspec.to_builtins(config)
    for section, key in (("training", "seed"), ("data", "train"), ("data", "max_seq_length")):
        before, now = saved.get(section, {}).get(key), mine[section][key]
        if before is not None and before != now:
            raise TrainConfigError(
                [(f"$.{section}.{key}", f"is {now!r} but the checkpoint was trained with {before!r}")]
            )
