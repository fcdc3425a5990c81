"""What a run shows and leaves behind: the JSON Lines log (:class:`LogFile`), the progress display
(:class:`Progress`: a rich bar on a terminal, plain lines otherwise) and the loss plot (:func:`plot_losses`).

Per-step cost is kept to a few microseconds: the bar is redrawn by rich's refresh thread at most
:data:`REFRESHES_PER_SECOND` times a second, never by :meth:`Progress.update` itself.
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, TextIO

from peftdecl._json import JsonObject, JsonValue
from peftdecl.errors import PeftdeclError
from peftdecl.formats.atomic import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    import rich.progress

REFRESHES_PER_SECOND = 8.0
"""Redraws of the rich bar per second (its own thread; an update only stores the values)."""


# -- the log ----------------------------------------------------------------------------------------------------
def _finite(value: JsonValue) -> JsonValue:
    """NaN and ±inf as null: JSON has no such numbers, and a diverged loss must not make the log unreadable."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_log(path: Path) -> list[JsonObject]:
    """The records of a JSON Lines log. A last line without its newline that does not parse (a write cut short by
    a kill) is dropped; any other bad line is a :class:`PeftdeclError` naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise PeftdeclError(f"{path}: cannot be read ({exc})") from None
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # no newline after it: the last write was interrupted
                break
            raise PeftdeclError(f"{path}:{number}: not a JSON object ({exc})") from None
        if not isinstance(record, dict):
            raise PeftdeclError(f"{path}:{number}: not a JSON object")
        records.append(record)
    return records


class LogFile:
    """``log.jsonl``: one JSON object per logged step, appended and flushed as it is written.

    ``resume_step`` N > 0 keeps the records with ``step`` ≤ N (what was logged up to the checkpoint resumed from;
    the file is rewritten atomically) and appends after them; None or 0 starts an empty log. ``history``, when
    given with ``resume_step``, is where those records come from instead of the file (a checkpoint's own copy of
    the log, so that a checkpoint moved to a new output_dir resumes with its log)."""

    def __init__(
        self,
        path: Path,
        *,
        resume_step: int | None = None,
        history: Sequence[Mapping[str, JsonValue]] | None = None,
    ) -> None:
        self.path = Path(path)
        kept: list[Mapping[str, JsonValue]] = []
        if resume_step:
            earlier = read_log(self.path) if history is None else history
            kept = [r for r in earlier if not _after(r, resume_step)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, "".join(_line(r) for r in kept))

    def write(self, record: Mapping[str, JsonValue]) -> None:
        """Append ``record`` as one line (non-finite floats as null) and flush it to the file."""
        # opened per record: a log line is written every logging step at most, and no handle outlives the run
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(_line(record))

    def records(self) -> list[JsonObject]:
        """Every record written so far, in order."""
        return read_log(self.path)


def _after(record: Mapping[str, JsonValue], step: int) -> bool:
    value = record.get("step")
    return isinstance(value, (int, float)) and value > step


def _line(record: Mapping[str, JsonValue]) -> str:
    return json.dumps({k: _finite(v) for k, v in record.items()}, allow_nan=False) + "\n"


# -- the progress display ---------------------------------------------------------------------------------------
def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except (OSError, ValueError):  # a closed or detached stream
        return False


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """The run's progress: a rich bar (step/total, loss, learning rate, tokens/s, ETA) when ``stream`` is a
    terminal, otherwise plain lines, printed on :meth:`update` ``(printed=True)`` and :meth:`message`.

    ``plain`` None decides by ``stream.isatty()``; False forces the bar (rendered as on a terminal), True the
    lines. Without rich installed the lines are used. Use it as a context manager (the bar lives inside)."""

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        *,
        stream: TextIO | None = None,
        plain: bool | None = None,
    ) -> None:
        self.total_steps = total_steps
        self.start_step = start_step
        self.stream: TextIO = stream if stream is not None else sys.stdout
        self.plain = not _is_terminal(self.stream) if plain is None else plain
        self.step = start_step
        self.loss: float | None = None
        self.learning_rate: float | None = None
        self.tokens_per_second: float | None = None
        self._began = time.perf_counter()
        self._bar: rich.progress.Progress | None = None
        self._task: rich.progress.TaskID | None = None
        if not self.plain:
            try:
                self._bar, self._task = self._make_bar()
            except ImportError:  # rich is in the optional "train" extra
                self.plain = True

    def _make_bar(self) -> tuple[rich.progress.Progress, rich.progress.TaskID]:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        console = Console(file=self.stream, force_terminal=True)
        to_stdout = self.stream is sys.stdout
        bar = RichProgress(
            TextColumn("[bold]step"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.fields[values]}", markup=False),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            refresh_per_second=REFRESHES_PER_SECOND,
            redirect_stdout=to_stdout,
            redirect_stderr=to_stdout,
        )
        task = bar.add_task("train", total=self.total_steps, completed=self.start_step, values="")
        return bar, task

    def __enter__(self) -> Progress:
        self._began = time.perf_counter()
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(
        self,
        step: int,
        *,
        loss: float | None = None,
        learning_rate: float | None = None,
        tokens_per_second: float | None = None,
        printed: bool = False,
    ) -> None:
        """Record that ``step`` optimizer steps are done (values left None keep their last value); in plain mode
        ``printed`` also prints them as one line."""
        self.step = step
        if loss is not None:
            self.loss = loss
        if learning_rate is not None:
            self.learning_rate = learning_rate
        if tokens_per_second is not None:
            self.tokens_per_second = tokens_per_second
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=step, values=self._values())
        elif printed:
            self._write(f"step {step}/{self.total_steps} | {self._values()} | eta {_duration(self.eta())}")

    def message(self, text: str) -> None:
        """Print ``text`` as a line (above the bar when there is one)."""
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            self._write(text)

    def eta(self) -> float:
        """Seconds left at the mean pace of the steps done since the start (0 before the first step)."""
        done = self.step - self.start_step
        if done <= 0:
            return 0.0
        return (time.perf_counter() - self._began) / done * max(0, self.total_steps - self.step)

    def _values(self) -> str:
        parts = []
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.learning_rate is not None:
            parts.append(f"lr {self.learning_rate:.3e}")
        if self.tokens_per_second is not None:
            parts.append(f"{self.tokens_per_second:,.0f} tok/s")
        return " | ".join(parts)

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()


# -- the plot ---------------------------------------------------------------------------------------------------
def _number(value: JsonValue) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _series(records: list[JsonObject], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for record in records:
        step, value = _number(record.get("step")), _number(record.get(key))
        if step is not None and value is not None and math.isfinite(value):
            steps.append(step)
            values.append(value)
    return steps, values


def plot_losses(log_path: Path, out: Path) -> Path:
    """Plot ``loss`` and ``eval_loss`` against ``step`` from a ``log.jsonl`` into the PNG ``out`` (written
    atomically); return ``out``. Needs matplotlib (the "train" extra); no global pyplot state is touched."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PeftdeclError(
            f"{out}: plotting the losses needs matplotlib (pip install 'peftdecl[train]')"
        ) from None
    records = read_log(Path(log_path))
    figure = Figure(figsize=(7.0, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    train_steps, train_losses = _series(records, "loss")
    eval_steps, eval_losses = _series(records, "eval_loss")
    if train_steps:
        axes.plot(train_steps, train_losses, label="train loss", linewidth=1.2)
    if eval_steps:
        axes.plot(eval_steps, eval_losses, label="eval loss", marker="o", linewidth=1.5)
    if not (train_steps or eval_steps):
        axes.text(0.5, 0.5, "no losses logged", ha="center", va="center", transform=axes.transAxes)
    else:
        axes.legend()
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buffer.getvalue())
    return out
