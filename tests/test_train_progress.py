"""The run's log (JSON Lines, resume truncation), its progress display (plain lines off a terminal, a rich bar on
one) and the loss plot (a PNG matplotlib reads back)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from peftdecl.errors import PeftdeclError
from peftdecl.train.progress import LogFile, Progress, plot_losses, read_log


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_appends_one_object_per_line(tmp_path: Path) -> None:
    log = LogFile(tmp_path / "run" / "log.jsonl")
    log.write({"step": 1, "loss": 2.5, "learning_rate": 1e-4, "tokens": 30})
    log.write({"step": 2, "loss": float("nan"), "eval_loss": float("inf"), "tokens": 60})
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [  # read by the standard library's strict parser
        {"step": 1, "loss": 2.5, "learning_rate": 1e-4, "tokens": 30},
        {"step": 2, "loss": None, "eval_loss": None, "tokens": 60},  # NaN and inf are not JSON: null
    ]
    assert log.records() == [json.loads(line) for line in lines]


def test_log_resume_drops_records_after_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    first = LogFile(path)
    for step in range(0, 11):
        first.write({"step": step, "loss": 1.0 / (step + 1)})
    with open(path, "a") as handle:
        handle.write('{"step": 11, "lo')  # a write cut short by a kill
    resumed = LogFile(path, resume_step=6)
    assert [r["step"] for r in resumed.records()] == [0, 1, 2, 3, 4, 5, 6]
    resumed.write({"step": 7, "loss": 0.5})
    assert [r["step"] for r in read_log(path)] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert path.read_text().endswith('"loss": 0.5}\n')
    assert LogFile(path).records() == []  # a fresh run starts an empty log
    assert LogFile(tmp_path / "new.jsonl", resume_step=4).records() == []  # nothing to keep


def test_log_resume_from_a_checkpoints_history(tmp_path: Path) -> None:
    """A checkpoint copied into a fresh output_dir brings its log records; they replace whatever the file held."""
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "loss": 9.0}\n')  # another run's log: not this checkpoint's
    history = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4)]  # the checkpoint holds steps up to 4
    log = LogFile(path, resume_step=3, history=history)
    assert log.records() == history[:3]
    log.write({"step": 4, "loss": 0.2})
    assert [r["loss"] for r in read_log(path)] == [1.0, 0.5, 1.0 / 3, 0.2]
    assert LogFile(path, history=history).records() == []  # no resume: history is not used


def test_log_with_a_bad_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(PeftdeclError, match=re.escape(f"{path}:2")):
        LogFile(path, resume_step=2)
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(PeftdeclError, match=re.escape(f"{path}:2")):
        read_log(path)


def test_plain_lines_when_not_a_terminal() -> None:
    stream = io.StringIO()
    with Progress(10, 2, stream=stream) as progress:
        assert progress.plain  # StringIO is not a terminal
        progress.update(3, loss=2.0, learning_rate=1e-3)  # not a logging step: nothing printed
        assert stream.getvalue() == ""
        progress.update(4, loss=1.25, learning_rate=2.5e-4, tokens_per_second=12345.6, printed=True)
        progress.message("eval_loss 1.5 [best]")
        progress.update(5, printed=True)  # values not given keep their last value
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert re.fullmatch(
        r"step 4/10 \| loss 1\.2500 \| lr 2\.500e-04 \| 12,346 tok/s \| eta \d+:\d\d:\d\d", lines[0]
    )
    assert lines[1] == "eval_loss 1.5 [best]"
    assert lines[2].startswith("step 5/10 | loss 1.2500 | lr 2.500e-04 | 12,346 tok/s | eta ")
    assert "\x1b[" not in stream.getvalue()  # no terminal escapes in a file


def test_rich_bar_on_a_terminal() -> None:
    stream = FakeTerminal()
    with Progress(8, 0, stream=stream) as progress:
        assert not progress.plain  # isatty decides
        for step in range(1, 9):
            progress.update(step, loss=3.0 / step, learning_rate=1e-4 * step, tokens_per_second=100.0 * step)
        progress.message("held-out [exact] match 50%")  # printed as given: no rich markup
    shown = stream.getvalue()
    assert "\x1b[" in shown  # drawn with terminal control sequences
    assert "8/8" in shown and "loss 0.3750" in shown and "lr 8.000e-04" in shown and "800 tok/s" in shown
    assert "held-out [exact] match 50%" in shown


def test_plain_false_forces_the_bar_and_true_the_lines() -> None:
    forced_bar, forced_lines = io.StringIO(), FakeTerminal()
    with Progress(3, stream=forced_bar, plain=False) as progress:
        progress.update(3, loss=1.0)
    with Progress(3, stream=forced_lines, plain=True) as progress:
        progress.update(3, loss=1.0, printed=True)
    assert "\x1b[" in forced_bar.getvalue() and "3/3" in forced_bar.getvalue()
    assert forced_lines.getvalue().startswith("step 3/3 | loss 1.0000 | eta ")


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    log = LogFile(tmp_path / "log.jsonl")
    log.write({"step": 0, "eval_loss": 4.0, "tokens": 0})
    for step in range(1, 21):
        record = {"step": step, "loss": 4.0 / step, "tokens": 10 * step}
        if step % 10 == 0:
            record["eval_loss"] = 4.5 / step
        log.write(record)
    log.write({"step": 21, "loss": float("nan")})  # logged as null: skipped by the plot
    out = plot_losses(tmp_path / "log.jsonl", tmp_path / "plots" / "loss.png")
    assert out == tmp_path / "plots" / "loss.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(out)
    assert image.shape[:2] == (400, 700)  # 7 x 4 inches at 100 dpi
    assert len({tuple(px) for px in image.reshape(-1, image.shape[-1])[::97]}) > 3  # lines drawn, not blank
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["loss.png"]  # no temporary left


def test_plot_of_an_empty_log_still_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    LogFile(tmp_path / "log.jsonl")
    out = plot_losses(tmp_path / "log.jsonl", tmp_path / "loss.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
