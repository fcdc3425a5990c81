"""The training loop: global batches in a seeded order, accumulation and data parallelism weighted by counted
tokens, the schedule, logging, evaluation, atomic checkpoints and the final adapter.

The loss of a step is Σ counted cross-entropy / counted tokens of the whole global batch, so k accumulated
micro-batches, or N processes, give the numbers of one k·N-times-larger batch.
"""

from __future__ import annotations

import io
import json
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import msgspec
import numpy as np

from peftdecl._json import JsonObject, JsonValue
from peftdecl.errors import PeftdeclError
from peftdecl.formats.atomic import atomic_write_text
from peftdecl.train.batching import epoch_of, eval_batches, micro_batches
from peftdecl.train.checkpoint import (
    clean_stale_temporaries,
    latest_checkpoint,
    prune_checkpoints,
    read_checkpoint,
    write_checkpoint,
)
from peftdecl.train.config import TrainFile
from peftdecl.train.generation_check import GenerationScore, score_generation
from peftdecl.train.progress import LogFile, Progress, plot_losses
from peftdecl.train.schedules import learning_rate, warmup_steps_for
from peftdecl.train.setup import Run, check_resumable, prepare, spec_json

ADAPTER_PREFIX = "adapter."
"""Prefix of the live adapter arrays inside a checkpoint's training_state.safetensors."""
FINAL_FOLDERS = {"hf": "adapter", "mlx-lm": "adapter-mlx-lm"}
"""Where each requested format of the final adapter is written, under output_dir."""


@dataclass
class Summary:
    """What a finished run reports (also written to output_dir/summary.json)."""

    steps: int
    tokens: int
    final_loss: float | None
    eval_loss: float | None
    truncated: int
    train_seconds: float
    step_seconds: float
    """Time inside the runtime's forward_backward and optimizer_step."""
    overhead_seconds: float
    """The loop's own time between steps: batching, logging, checkpoints (evaluation excluded)."""
    eval_seconds: float
    peak_memory: int | None
    generation: dict[str, float] = field(default_factory=dict)

    @property
    def overhead_fraction(self) -> float:
        return self.overhead_seconds / self.step_seconds if self.step_seconds else 0.0


def find_checkpoint(output_dir: Path, resume: str | Path | bool | None) -> Path | None:
    """The checkpoint a ``--resume`` names: the folder given, or output_dir's latest; None without --resume."""
    if resume is None or resume is False:
        return None
    if resume is True:
        found = latest_checkpoint(output_dir)
        if found is None:
            raise PeftdeclError(f"--resume: {output_dir} holds no complete checkpoint-STEP folder")
        return found
    folder = Path(resume)
    if not folder.is_dir():
        raise PeftdeclError(f"--resume: {folder} is not a folder")
    return folder


def train(
    config: TrainFile, *, resume: str | Path | bool | None = None, stream: TextIO | None = None
) -> Summary:
    """Run ``config`` to its last step (continuing from a checkpoint with ``resume``); rank 0 writes."""
    stream = stream or sys.stdout
    output_dir = Path(config.output_dir)
    checkpoint_dir = find_checkpoint(output_dir, resume)
    saved: tuple[dict, JsonObject] | None = None
    checkpoint = None
    if checkpoint_dir is not None:
        tensors, state = read_checkpoint(checkpoint_dir)
        check_resumable(config, state)
        spec = state.get("adapter_spec")
        if not isinstance(spec, dict):
            raise PeftdeclError(f"{checkpoint_dir / 'trainer_state.json'}: no 'adapter_spec'")
        arrays = {k[len(ADAPTER_PREFIX) :]: v for k, v in tensors.items() if k.startswith(ADAPTER_PREFIX)}
        checkpoint = (spec, arrays)
        saved = ({k: v for k, v in tensors.items() if not k.startswith(ADAPTER_PREFIX)}, state)
    run = prepare(config, checkpoint)  # type: ignore[arg-type]
    try:
        return _Loop(run, output_dir, saved, stream).run()
    finally:
        run.runtime.close()


class _Loop:
    def __init__(
        self, run: Run, output_dir: Path, saved: tuple[dict, JsonObject] | None, stream: TextIO
    ) -> None:
        self.run_ = run
        self.config = run.config
        self.training = run.config.training
        self.output_dir = output_dir
        self.stream = stream
        self.writer = run.runtime.rank == 0
        self.start_step = 0
        self.tokens = 0
        self.before: dict[str, float] = {}
        self.history: list | None = None
        """The log records up to the checkpoint a resume starts from (the checkpoint carries its own copy)."""
        self.log: LogFile | None = None
        if saved is not None:
            tensors, state = saved
            if state.get("global_batch") != run.global_batch:
                raise PeftdeclError(
                    f"the checkpoint was trained with a global batch of {state.get('global_batch')} sequences, "
                    f"this run has {run.global_batch} (per_device_train_batch_size × accumulation × processes)"
                )
            run.runtime.load_state(tensors, state.get("runtime", {}))
            self.start_step = int(state["step"])
            self.tokens = int(state.get("tokens", 0))
            self.before = dict(state.get("generation_before", {}))
            history = state.get("log_history")
            self.history = history if isinstance(history, list) else None
        self.warmup = warmup_steps_for(self.training, run.total_steps)
        self.step_seconds = 0.0
        self.eval_seconds = 0.0
        self.last_eval: float | None = None

    # -- pieces ---------------------------------------------------------------------------------------------
    def lr(self, step: int) -> float:
        t = self.training
        return learning_rate(
            step,
            scheduler=t.lr_scheduler_type,
            base_lr=t.learning_rate,
            warmup_steps=self.warmup,
            total_steps=self.run_.total_steps,
            kwargs=t.lr_scheduler_kwargs,
        )

    def evaluate(self) -> float | None:
        """Token-weighted mean cross-entropy over data.valid (all processes' shares summed)."""
        run = self.run_
        if run.valid is None:
            return None
        began = time.perf_counter()
        rt = run.runtime
        total, count = 0.0, 0
        for batch in eval_batches(
            run.valid, self.training.per_device_eval_batch_size, rt.rank, rt.world_size
        ):
            total += rt.eval_loss(batch)
            count += batch.token_count()
        total, count_f = rt.all_reduce_sum([total, float(count)])
        self.eval_seconds += time.perf_counter() - began
        self.last_eval = total / count_f if count_f else float("nan")
        return self.last_eval

    def generation(self, progress: Progress, when: str) -> dict[str, float]:
        check = self.config.generation_check
        if check is None or not self.writer:
            return {}
        began = time.perf_counter()
        score: GenerationScore = score_generation(self.run_, check)
        self.eval_seconds += time.perf_counter() - began
        progress.message(
            f"held-out exact match {when} training: {score.exact_match:.1%} ({score.count} examples)"
        )
        for prompt, produced, expected in score.samples:
            progress.message(f"  prompt {prompt!r} -> {produced!r} (expected {expected!r})")
        return {"exact_match": score.exact_match, "count": float(score.count)}

    def checkpoint(self, step: int) -> None:
        run = self.run_
        tensors, runtime_state = run.runtime.state()
        if not self.writer:
            return
        arrays = {ADAPTER_PREFIX + k: np.ascontiguousarray(v) for k, v in run.model.state_dict().items()}
        state: JsonObject = {
            "step": step,
            "epoch": epoch_of(step, run.order.steps_per_epoch),
            "tokens": self.tokens,
            "global_batch": run.global_batch,
            "total_steps": run.total_steps,
            "config": msgspec.to_builtins(self.config),
            "adapter_spec": spec_json(run.model),
            "runtime": runtime_state,
            "generation_before": self.before,
            "log_history": self.log.records() if self.log is not None else [],
        }
        write_checkpoint(self.output_dir, step, run.model.save, {**tensors, **arrays}, state)
        prune_checkpoints(self.output_dir, self.training.save_total_limit)

    # -- the loop -------------------------------------------------------------------------------------------
    def run(self) -> Summary:
        run, t = self.run_, self.training
        rt = run.runtime
        if self.writer:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            clean_stale_temporaries(self.output_dir)
        log = None
        if self.writer:
            log = LogFile(self.output_dir / "log.jsonl", resume_step=self.start_step, history=self.history)
        self.log = log
        started = time.perf_counter()
        window_loss, window_steps, window_tokens, window_began = 0.0, 0, 0, time.perf_counter()
        last_loss: float | None = None
        quiet = io.StringIO()  # other processes train silently
        stream = self.stream if self.writer else quiet
        with Progress(run.total_steps, self.start_step, stream=stream) as progress:
            if self.start_step == 0:
                cut = {name: d.truncated for name, d in (("train", run.train), ("valid", run.valid)) if d}
                if any(cut.values()):  # the warning was issued while reading; the log keeps the count
                    self._record(log, progress, {"step": 0, **{f"truncated_{k}": n for k, n in cut.items()}})
                self.before = self.generation(progress, "before")
                first_eval = self.evaluate()
                if first_eval is not None:
                    self._record(log, progress, {"step": 0, "eval_loss": first_eval, "tokens": 0})
            overhead_began, eval_before_steps = time.perf_counter(), self.eval_seconds
            window_began, window_eval = overhead_began, self.eval_seconds
            for step in range(self.start_step, run.total_steps):
                batch_indices = run.order.indices(step)
                micro = micro_batches(
                    run.train, batch_indices, t.per_device_train_batch_size, rt.rank, rt.world_size,
                    self.config.data.max_seq_length,
                )  # fmt: skip
                local = sum(mb.token_count() for mb in micro)
                (counted,) = rt.all_reduce_sum([float(local)]) if rt.world_size > 1 else (float(local),)
                lr = self.lr(step)
                share = 1.0 / (len(micro) * rt.world_size)
                step_began = time.perf_counter()
                loss_sum = sum(rt.forward_backward(mb, 1.0 / counted, share) for mb in micro)
                grad_norm = rt.optimizer_step(lr, step)
                self.step_seconds += time.perf_counter() - step_began
                (loss_sum,) = rt.all_reduce_sum([loss_sum]) if rt.world_size > 1 else (loss_sum,)
                loss = loss_sum / counted
                last_loss = loss
                done = step + 1
                self.tokens += int(counted)
                window_loss += loss
                window_steps += 1
                window_tokens += int(counted)
                record: dict[str, JsonValue] = {}
                if done % t.logging_steps == 0 or done == run.total_steps:
                    # evaluation inside the window is not training time
                    elapsed = time.perf_counter() - window_began - (self.eval_seconds - window_eval)
                    record = {
                        "step": done,
                        "epoch": round(epoch_of(done, run.order.steps_per_epoch), 4),
                        "loss": window_loss / window_steps,
                        "learning_rate": lr,
                        "grad_norm": grad_norm,
                        "tokens": self.tokens,
                        "tokens_per_second": window_tokens / elapsed if elapsed > 0 else 0.0,
                    }
                    window_loss, window_steps, window_tokens, window_began = 0.0, 0, 0, time.perf_counter()
                    window_eval = self.eval_seconds
                eval_due = t.eval_steps is not None and (done % t.eval_steps == 0 or done == run.total_steps)
                if eval_due or (run.valid is not None and done == run.total_steps):
                    record = {
                        **(record or {"step": done, "tokens": self.tokens}),
                        "eval_loss": self.evaluate(),
                    }
                if record:
                    self._record(log, progress, record)
                speed = record.get("tokens_per_second")
                progress.update(
                    done,
                    loss=loss,
                    learning_rate=lr,
                    tokens_per_second=speed if isinstance(speed, float) else None,
                )
                if t.save_steps is not None and done % t.save_steps == 0:
                    self.checkpoint(done)
            overhead_total = time.perf_counter() - overhead_began
            loop_eval_seconds = self.eval_seconds - eval_before_steps
            after = self.generation(progress, "after")
        summary = Summary(
            steps=run.total_steps,
            tokens=self.tokens,
            final_loss=last_loss,
            eval_loss=self.last_eval,
            truncated=run.train.truncated,
            train_seconds=time.perf_counter() - started,
            step_seconds=self.step_seconds,
            overhead_seconds=max(0.0, overhead_total - self.step_seconds - loop_eval_seconds),
            eval_seconds=self.eval_seconds,
            peak_memory=rt.peak_memory(),
            generation={f"{k}_before": v for k, v in self.before.items()}
            | {f"{k}_after": v for k, v in after.items()},
        )
        if self.writer:
            self._finish(summary)
        return summary

    def _record(self, log: LogFile | None, progress: Progress, record: dict[str, JsonValue]) -> None:
        if log is not None:
            log.write(record)
        progress.message(_plain(record))

    def _finish(self, summary: Summary) -> None:
        run = self.run_
        for fmt in self.config.save_formats:
            run.model.save(self.output_dir / FINAL_FOLDERS[fmt], format=fmt)
        log_path = self.output_dir / "log.jsonl"
        if log_path.exists():
            try:
                plot_losses(log_path, self.output_dir / "loss.png")
            except PeftdeclError as exc:  # matplotlib missing: the run itself succeeded
                warnings.warn(f"loss.png not written: {exc}", stacklevel=2)
        data = asdict(summary) | {"overhead_fraction": summary.overhead_fraction}
        atomic_write_text(self.output_dir / "summary.json", json.dumps(data, indent=2) + "\n")


def _plain(record: dict[str, JsonValue]) -> str:
    """One log record as ``key value`` pairs, numbers shortened."""
    parts = []
    for key, value in record.items():
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)


def run_from_file(
    path: str | Path, overrides: Sequence[str] = (), resume: str | Path | bool | None = None
) -> Summary:
    """``peftdecl train FILE``: load and check the file, then :func:`train`."""
    from peftdecl.train.load import load_train_file

    return train(load_train_file(Path(path), overrides), resume=resume)
