"""One side of ``compare_train.py``'s training-throughput comparison: the shared workload (model shape, data,
``peftdecl train`` file, mlx_lm.lora config) and the runs that set up, train and time one tool in a child process.

    peftdecl   ``peftdecl train`` on torch or MLX; the window's ends come from its log.jsonl
    trainer    PEFT + transformers ``Trainer``; the window's ends come from an ``on_step_end`` callback
    mlx_lm     ``mlx_lm.lora``'s training loop; the window's ends come from an ``on_train_loss_report`` callback

``run_side`` returns one side's rates (see ``_window``) and peak memories; ``compare_train.py`` starts each side
in a fresh process and reads them back.
"""

from __future__ import annotations

import itertools
import json
import random
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLX_KEYS = tuple(f"self_attn.{t}" for t in TARGETS[:4]) + tuple(f"mlp.{t}" for t in TARGETS[4:])
RANK, ALPHA, LEARNING_RATE, SEED = 16, 32, 1.0e-4, 0


@dataclass(frozen=True)
class Size:
    """A benchmark shape: the model (build_tiny_llama's arguments), the sequence length and the schedule."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    seq: int
    batch: int
    warmup: int
    """Steps before the timed window; also every tool's logging interval."""
    steps: int
    """All steps, warm-up included (a multiple of ``warmup``)."""

    def model(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("hidden", "layers", "heads", "kv_heads", "intermediate")}


# -- the shared inputs ------------------------------------------------------------------------------------------
def write_inputs(work: Path, framework: str, size: Size) -> None:
    """The model folder and a data folder (train.jsonl: text lines of ``seq − 1`` characters, one token each)."""
    from peftdecl.train.tiny_model import build_tiny_llama

    build_tiny_llama(work / "model", seed=SEED, **size.model())
    rng = random.Random(SEED)
    alphabet = "abcdefghijklmnopqrstuvwxyz     "
    lines = ["".join(rng.choice(alphabet) for _ in range(size.seq - 1)) for _ in range(8 * size.batch)]
    (work / "data").mkdir()
    (work / "data" / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))


def peftdecl_file(work: Path, framework: str, size: Size, device: str, *, overhead: bool) -> dict:
    """The ``peftdecl train`` file of a throughput run (or, with ``overhead``, of the overhead run)."""
    return {
        "model": str(work / "model"),
        "backend": framework,
        "device": device,
        "adapter": {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": RANK,
            "lora_alpha": ALPHA,
            "lora_dropout": 0.0,
            "target_modules": list(TARGETS),
        },
        "data": {
            "train": str(work / "data" / "train.jsonl"),
            "format": "text",
            "max_seq_length": size.seq + 1,
        },
        "training": {
            "learning_rate": LEARNING_RATE,
            "lr_scheduler_type": "constant",
            "max_steps": size.steps,
            "per_device_train_batch_size": size.batch,
            "max_grad_norm": 1.0 if framework == "torch" else 0.0,
            "optim": "adamw",
            "weight_decay": 0.0,
            "seed": SEED,
            "logging_steps": 1 if overhead else size.warmup,
            **({"save_steps": size.steps // 2} if overhead else {}),
        },
        "output_dir": str(work / ("out-overhead" if overhead else "out")),
    }


def mlx_lm_config(work: Path, size: Size) -> dict:
    """mlx_lm.lora's YAML config for the same run."""
    return {
        "model": str(work / "model"),
        "train": True,
        "data": str(work / "data"),
        "fine_tune_type": "lora",
        "optimizer": "adamw",
        "optimizer_config": {"adamw": {"weight_decay": 0.0}},
        "seed": SEED,
        "num_layers": size.layers,
        "batch_size": size.batch,
        "iters": size.steps,
        "learning_rate": LEARNING_RATE,
        "steps_per_report": size.warmup,
        "steps_per_eval": size.steps + 1,
        "save_every": size.steps + 1,
        "adapter_path": str(work / "out-mlx-lm"),
        "max_seq_length": size.seq + 1,
        "grad_checkpoint": False,
        "lora_parameters": {"rank": RANK, "scale": ALPHA / RANK, "dropout": 0.0, "keys": list(MLX_KEYS)},
    }


# -- one training run of one side ----------------------------------------------------------------------------
def _peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / 1024 / (1024 if sys.platform == "darwin" else 1)


def _window(size: Size, ends: dict[int, float]) -> dict:
    """Rates from the times at which steps ``warmup, 2·warmup, …, steps`` ended: over the whole window, and the
    median over its ``warmup``-step parts (less moved by a burst of another process on a shared machine)."""
    marks = list(range(size.warmup, size.steps + 1, size.warmup))
    if any(step not in ends for step in marks):
        raise RuntimeError(f"the ends of steps {marks} were not all seen (saw {sorted(ends)})")
    per_step = size.batch * (size.seq - 1)
    parts = [size.warmup * per_step / (ends[b] - ends[a]) for a, b in itertools.pairwise(marks)]
    tokens = (size.steps - size.warmup) * per_step
    seconds = ends[size.steps] - ends[size.warmup]
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "window_tokens_per_second": parts,
        "median_window_tokens_per_second": statistics.median(parts),
    }


def child_peftdecl(work: Path, framework: str, size: Size, device: str, overhead: bool) -> dict:
    from peftdecl.cli import main as cli_main

    path = work / ("train-overhead.yaml" if overhead else "train.yaml")
    path.write_text(yaml.safe_dump(peftdecl_file(work, framework, size, device, overhead=overhead)))
    code = cli_main(["train", str(path)])
    if code not in (0, None):
        raise RuntimeError(f"peftdecl train exited with {code}")
    out = work / ("out-overhead" if overhead else "out")
    summary = json.loads((out / "summary.json").read_text())
    result: dict = {"step_seconds": summary["step_seconds"], "overhead_seconds": summary["overhead_seconds"]}
    if not overhead:
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
        first = next(r for r in records if r["step"] == size.warmup)
        ends, previous = {size.warmup: 0.0}, first
        for record in records[
            records.index(first) + 1 :
        ]:  # a rate covers the steps since the previous record
            ends[record["step"]] = ends[previous["step"]] + (
                (record["tokens"] - previous["tokens"]) / record["tokens_per_second"]
            )
            previous = record
        result |= _window(size, ends)
        counted = records[-1]["tokens"] - first["tokens"]
        if counted != result["tokens"]:
            raise RuntimeError(
                f"peftdecl counted {counted} target tokens in the window, expected {result['tokens']}"
            )
    result["peak_device_mib"] = _device_peak(framework, device)
    return result


def child_trainer(work: Path, size: Size, device: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS), task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config)
    rows = []
    for line in (work / "data" / "train.jsonl").read_text().splitlines():
        ids = [*tokenizer.encode(json.loads(line)["text"]), tokenizer.eos_token_id]
        assert len(ids) == size.seq, (len(ids), size.seq)
        rows.append({"input_ids": ids, "labels": ids, "attention_mask": [1] * len(ids)})
    ends: dict[int, float] = {}

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if device == "cuda":
                torch.cuda.synchronize()
            ends[state.global_step] = time.perf_counter()

    args = TrainingArguments(
        output_dir=str(work / "out-trainer"),
        max_steps=size.steps,
        per_device_train_batch_size=size.batch,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=size.warmup,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=SEED,
        use_cpu=device == "cpu",
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=default_data_collator,
        callbacks=[StepEnds()],
    )
    trainer.train()
    result = _window(size, ends)
    result["optim"] = str(args.optim)
    result["peak_device_mib"] = _device_peak("torch", device)
    return result


def child_mlx_lm(work: Path, size: Size) -> dict:
    import types

    import mlx.core as mx
    import numpy as np
    from mlx_lm import lora
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import load_dataset
    from mlx_lm.utils import load

    path = work / "mlx_lm.yaml"
    path.write_text(yaml.safe_dump(mlx_lm_config(work, size)))
    # what mlx_lm.lora's main() does with `-c mlx_lm.yaml`: the file's values over CONFIG_DEFAULTS
    options = dict(lora.CONFIG_DEFAULTS) | yaml.safe_load(path.read_text())
    args = types.SimpleNamespace(**options)
    ends: dict[int, float] = {}

    class ReportTimes(TrainingCallback):
        def on_train_loss_report(self, train_info: dict) -> None:
            ends[int(train_info["iteration"])] = time.perf_counter()

    np.random.seed(args.seed)  # as lora.run() does; run() itself would replace our callback
    model, tokenizer = load(args.model)
    train_set, valid_set, _ = load_dataset(args, tokenizer)
    lora.train_model(args, model, train_set, valid_set, ReportTimes())
    result = _window(size, ends)
    result["peak_device_mib"] = mx.get_peak_memory() / 2**20
    return result


def _device_peak(framework: str, device: str) -> float | None:
    if framework == "mlx":
        import mlx.core as mx

        return mx.get_peak_memory() / 2**20
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return None


def run_side(side: str, framework: str, work: Path, size: Size, device: str, overhead: bool) -> dict:
    """Train and time one side (``peftdecl``, ``trainer`` or ``mlx_lm``) on the inputs in ``work``; add the
    process's peak resident set to its result."""
    if side == "peftdecl":
        result = child_peftdecl(work, framework, size, device, overhead)
    elif side == "trainer":
        result = child_trainer(work, size, device)
    else:
        result = child_mlx_lm(work, size)
    result["peak_rss_mib"] = _peak_rss_mib()
    return result
