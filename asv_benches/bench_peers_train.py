"""Training throughput (target tokens per second) of ``peftdecl train`` and of PEFT + transformers' ``Trainer``
on the same random tiny Llama, data, adapter and batch (torch, CPU, 2 threads).

Model: hidden 64, 2 layers, MLP 128, character tokenizer (``peftdecl.train.tiny_model``); text lines that
tokenise to exactly SEQ tokens; LoRA r 16, alpha 32, no dropout, on q/k/v/o/gate/up/down; AdamW, constant
learning rate, gradient clipping at 1.0 on both sides; batch 4. Each run trains STEPS steps and logs every
WINDOW; tokens/s is the median over the windows after the first of batch × (SEQ − 1) targets × WINDOW steps over
the window's wall time (the median: a burst of another process on a shared machine moves one window, not the
point).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

from ._peers import SMOKE, require, unsupported

SEQ, BATCH, WINDOW = 64, 4, 4
STEPS = 2 * WINDOW if SMOKE else 5 * WINDOW
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": TARGETS}
WORK = "train-inputs"


def write_inputs(work: Path) -> None:
    """The tiny model folder and train.jsonl (lines of SEQ − 1 characters, one token each, plus end of text)."""
    try:
        from peftdecl.train.tiny_model import build_tiny_llama
    except ImportError as exc:
        raise unsupported("peftdecl.train.tiny_model", exc) from exc
    build_tiny_llama(work / "model", seed=0, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
    rng = random.Random(0)
    lines = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(SEQ - 1)) for _ in range(8 * BATCH)
    ]
    (work / "data").mkdir(exist_ok=True)
    (work / "data" / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))


def peftdecl_config(work: Path, out: Path) -> dict[str, Any]:
    """The ``peftdecl train`` file of the run."""
    return {
        "model": str(work / "model"),
        "backend": "torch",
        "adapter": {"peft_type": "LORA", "task_type": "CAUSAL_LM", **ADAPTER},
        "data": {"train": str(work / "data" / "train.jsonl"), "format": "text", "max_seq_length": SEQ + 1},
        "training": {
            "learning_rate": 1e-4,
            "lr_scheduler_type": "constant",
            "max_steps": STEPS,
            "per_device_train_batch_size": BATCH,
            "max_grad_norm": 1.0,
            "optim": "adamw",
            "weight_decay": 0.0,
            "seed": 0,
            "logging_steps": WINDOW,
        },
        "output_dir": str(out),
    }


def check_peftdecl_train(work: Path) -> None:
    """Skip (NotImplementedError) at a commit whose ``peftdecl train`` lacks this file's format."""
    try:
        from peftdecl.cli import main  # noqa: F401
        from peftdecl.train.load import train_file_from_dict

        train_file_from_dict(peftdecl_config(work, work / "check"))
    except Exception as exc:
        raise unsupported("this `peftdecl train` file", exc) from exc


def peftdecl_rate(work: Path, out: Path) -> float:
    """Run ``peftdecl train``; the median tokens/s of the log records after the first (each record's rate covers
    the steps since the previous record)."""
    import yaml

    from peftdecl.cli import main

    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(peftdecl_config(work, out)))
    code = main(["train", str(path)])
    if code not in (0, None):
        raise RuntimeError(f"peftdecl train exited with {code}")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    rates = [float(r["tokens_per_second"]) for r in records if "tokens_per_second" in r]
    return statistics.median(rates[1:])


def trainer_rate(work: Path, out: Path) -> float:
    """Train with PEFT + ``Trainer``; the median tokens/s of the windows after the first, from the ends of steps
    WINDOW, 2·WINDOW, …, STEPS."""
    torch = require("torch")
    peft = require("peft", "HF PEFT")
    transformers = require("transformers")
    torch.manual_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(work / "model")
    model = transformers.AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **ADAPTER))
    rows = []
    for line in (work / "data" / "train.jsonl").read_text().splitlines():
        ids = [*tokenizer.encode(json.loads(line)["text"]), tokenizer.eos_token_id]
        rows.append({"input_ids": ids, "labels": ids, "attention_mask": [1] * len(ids)})
    ends: dict[int, float] = {}

    class StepEnds(transformers.TrainerCallback):  # type: ignore[misc,name-defined]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ends[state.global_step] = time.perf_counter()

    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=1e-4,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, logging_steps=WINDOW,
        save_strategy="no", eval_strategy="no", report_to="none", dataloader_num_workers=0, disable_tqdm=True,
        seed=0, use_cpu=True,
    )  # fmt: skip
    transformers.Trainer(model=model, args=args, train_dataset=rows,
                         data_collator=transformers.default_data_collator, callbacks=[StepEnds()]).train()  # fmt: skip
    tokens = WINDOW * BATCH * (len(rows[0]["input_ids"]) - 1)
    marks = range(WINDOW, STEPS + 1, WINDOW)
    return statistics.median(tokens / (ends[b] - ends[a]) for a, b in itertools.pairwise(marks))


class TrainTokensPerSecond:
    """Target tokens per second of a short LoRA training run on the tiny Llama (a few seconds per point)."""

    params = (["peftdecl", "peft_trainer"],)
    param_names = ("implementation",)
    timeout = 300

    def setup_cache(self) -> str:
        try:
            require("torch")
            write_inputs(Path(WORK))
        except NotImplementedError as exc:
            return str(exc)
        return ""

    def setup(self, missing: str, implementation: str) -> None:
        if missing:
            raise NotImplementedError(missing)
        torch = require("torch")
        if implementation == "peft_trainer":
            require("peft", "HF PEFT")
            require("accelerate")  # transformers' Trainer needs it
        else:
            check_peftdecl_train(Path(WORK))
        torch.set_num_threads(2)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.work = Path(WORK).resolve()

    def track_tokens_per_second(self, missing: str, implementation: str) -> float:
        out = self.work / f"out-{implementation}-{os.getpid()}"
        if implementation == "peftdecl":
            return peftdecl_rate(self.work, out)
        return trainer_rate(self.work, out)

    track_tokens_per_second.unit = "tokens/s"  # type: ignore[attr-defined]
