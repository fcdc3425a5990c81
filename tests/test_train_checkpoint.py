"""Training checkpoints: atomic writes (a failure or a kill leaves no checkpoint-* and the previous one intact),
reading back, corrupt files named, latest, pruning, stale temporaries, and a real adapter that PEFT loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from peftdecl.errors import PeftdeclError
from peftdecl.formats import atomic
from peftdecl.train import checkpoint as ckpt
from peftdecl.train.checkpoint import (
    clean_stale_temporaries,
    latest_checkpoint,
    prune_checkpoints,
    read_checkpoint,
    write_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]


def fake_adapter(folder: Path) -> None:
    """Stands in for AdaptedModel.save: two files in the folder given."""
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}\n')
    (folder / "adapter_model.safetensors").write_bytes(b"not read by these tests")


def tensors(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {
        "optimizer.exp_avg.0": rng.normal(size=(3, 4)).astype(np.float32),
        "rng.torch": rng.integers(0, 255, size=16, dtype=np.uint8),
        "rng.numpy": np.array([step, 7], dtype=np.int64),
        "scalar": np.array(2.5, dtype=np.float64),
    }


def write(output_dir: Path, step: int, writer=fake_adapter) -> Path:
    return write_checkpoint(
        output_dir, step, writer, tensors(step), {"tokens": 10 * step, "loss": [1.5, 0.5]}
    )


def visible(output_dir: Path) -> list[str]:
    return sorted(p.name for p in output_dir.iterdir())


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    folder = write(tmp_path, 5)
    assert folder == tmp_path / "checkpoint-5"
    assert visible(tmp_path) == ["checkpoint-5"]  # no work folder left
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "training_state.safetensors",
    ]  # fmt: skip
    read_tensors, state = read_checkpoint(folder)
    expected = tensors(5)
    assert set(read_tensors) == set(expected)
    for key, value in expected.items():  # exact: safetensors stores the bytes
        assert read_tensors[key].dtype == value.dtype
        np.testing.assert_array_equal(read_tensors[key], value)
    assert state == {"tokens": 50, "loss": [1.5, 0.5], "step": 5, "checkpoint_format": ckpt.FORMAT_VERSION}


def test_same_step_is_replaced_whole(tmp_path: Path) -> None:
    write(tmp_path, 5)
    (tmp_path / "checkpoint-5" / "stray.txt").write_text("from the first write")

    def other_adapter(folder: Path) -> None:
        (folder / "adapter_config.json").write_text('{"peft_type": "IA3"}\n')

    write_checkpoint(tmp_path, 5, other_adapter, {"x": np.ones(2, np.float32)}, {"tokens": 1})
    folder = tmp_path / "checkpoint-5"
    assert visible(tmp_path) == ["checkpoint-5"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json", "trainer_state.json", "training_state.safetensors"
    ]  # fmt: skip
    assert "IA3" in (folder / "adapter_config.json").read_text()
    assert read_checkpoint(folder)[1]["tokens"] == 1


def test_same_step_replaced_without_exchange(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The two-rename fallback (file systems without RENAME_EXCHANGE) gives the same result."""
    monkeypatch.setattr(atomic, "USE_EXCHANGE", False)
    write(tmp_path, 5)
    write_checkpoint(tmp_path, 5, fake_adapter, {"x": np.ones(2, np.float32)}, {"tokens": 1})
    assert visible(tmp_path) == ["checkpoint-5"]
    assert read_checkpoint(tmp_path / "checkpoint-5")[1]["tokens"] == 1


def failing_adapter(folder: Path) -> None:
    fake_adapter(folder)
    raise RuntimeError("disk full while writing the adapter")


@pytest.mark.parametrize("where", ["adapter", "tensors", "state", "swap"])
def test_failure_leaves_previous_checkpoint_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    write(tmp_path, 5)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-5").iterdir()}

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("simulated failure")

    writer = failing_adapter if where == "adapter" else fake_adapter
    if where == "tensors":
        monkeypatch.setattr(ckpt, "write_safetensors", boom)
    elif where == "state":
        monkeypatch.setattr(ckpt, "atomic_write_text", boom)
    elif where == "swap":
        monkeypatch.setattr(ckpt, "swap_into_place", boom)
    for step in (5, 10):  # neither a replacement of step 5 nor a new step 10 may appear
        with pytest.raises((RuntimeError, OSError)):
            write(tmp_path, step, writer)
        assert visible(tmp_path) == ["checkpoint-5"]
        assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-5").iterdir()} == before
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-5"


def test_killed_write_leaves_only_a_hidden_temporary(tmp_path: Path) -> None:
    """A process killed mid-write (no cleanup runs) leaves a hidden work folder: ignored, then cleaned."""
    write(tmp_path, 5)
    script = textwrap.dedent(
        f"""
        import os, sys
        from pathlib import Path
        import numpy as np
        from peftdecl.train.checkpoint import write_checkpoint

        def die(folder):
            (folder / "adapter_config.json").write_text("{{}}")
            os._exit(3)

        write_checkpoint(Path({str(tmp_path)!r}), 10, die, {{"x": np.zeros(2, np.float32)}}, {{}})
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    names = visible(tmp_path)
    assert [n for n in names if n.startswith("checkpoint-")] == ["checkpoint-5"]
    assert len(names) == 2 and any(n.startswith(ckpt.WORK_PREFIX) for n in names)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-5"
    removed = clean_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [n for n in names if n.startswith(ckpt.WORK_PREFIX)]
    assert visible(tmp_path) == ["checkpoint-5"]
    read_checkpoint(tmp_path / "checkpoint-5")  # still complete


def test_clean_restores_a_checkpoint_moved_aside_by_an_interrupted_swap(tmp_path: Path) -> None:
    """Between the two renames of the fallback swap the checkpoint sits at .checkpoint-N.peftdecl-old-*."""
    write(tmp_path, 5)
    aside = tmp_path / f".checkpoint-5.{atomic.OLD}0123456789abcdef"
    os.rename(tmp_path / "checkpoint-5", aside)
    assert latest_checkpoint(tmp_path) is None
    clean_stale_temporaries(tmp_path)
    assert visible(tmp_path) == ["checkpoint-5"]
    assert read_checkpoint(tmp_path / "checkpoint-5")[1]["step"] == 5


def test_latest_ignores_incomplete_and_foreign_folders(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "absent") is None
    assert latest_checkpoint(tmp_path) is None
    write(tmp_path, 20)
    write(tmp_path, 100)
    (tmp_path / "checkpoint-300").mkdir()  # e.g. a transformers Trainer's, without our state files
    (tmp_path / "checkpoint-300" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-400").write_text("a file, not a folder")
    (tmp_path / "checkpoint-x500").mkdir()
    (tmp_path / f"{ckpt.WORK_PREFIX}feed").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-100"  # numeric order: 100 > 20


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        write(tmp_path, step)
    assert prune_checkpoints(tmp_path, None) == []
    removed = prune_checkpoints(tmp_path, 2)
    assert [p.name for p in removed] == ["checkpoint-10", "checkpoint-20"]
    assert visible(tmp_path) == ["checkpoint-30", "checkpoint-40"]
    assert prune_checkpoints(tmp_path, 2) == []
    assert [p.name for p in prune_checkpoints(tmp_path, 1)] == ["checkpoint-30"]
    assert visible(tmp_path) == ["checkpoint-40"]


def test_prune_never_removes_the_checkpoint_just_written(tmp_path: Path) -> None:
    """A run resumed from checkpoint-10 writes checkpoint-15 while an abandoned checkpoint-20 exists."""
    for step in (10, 20):
        write(tmp_path, step)
    old = (tmp_path / "checkpoint-20" / ckpt.STATE_FILE).stat().st_mtime_ns
    for step in (10, 20):  # make the earlier writes clearly older than the next one
        state = tmp_path / f"checkpoint-{step}" / ckpt.STATE_FILE
        os.utime(state, ns=(old - 10**9, old - 10**9))
    write(tmp_path, 15)
    removed = prune_checkpoints(tmp_path, 1)
    assert sorted(p.name for p in removed) == ["checkpoint-10", "checkpoint-20"]
    assert visible(tmp_path) == ["checkpoint-15"]


def test_corrupt_or_missing_files_are_named(tmp_path: Path) -> None:
    folder = write(tmp_path, 5)
    state_path, tensors_path = folder / ckpt.STATE_FILE, folder / ckpt.TENSORS_FILE
    good_state = state_path.read_text()
    cases = [
        (lambda: state_path.write_text("{not json"), state_path, "not valid JSON"),
        (lambda: state_path.write_text("[1, 2]"), state_path, "JSON object"),
        (lambda: state_path.write_text('{"step": 5}'), state_path, "checkpoint_format"),
        (lambda: state_path.write_text('{"step": -1, "checkpoint_format": 1}'), state_path, "'step'"),
        (lambda: state_path.unlink(), state_path, "missing"),
        (lambda: tensors_path.write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":1}'), tensors_path, ""),
        (lambda: tensors_path.write_bytes(tensors_path.read_bytes()[:-3]), tensors_path, ""),
        (lambda: tensors_path.unlink(), tensors_path, "missing"),
    ]
    good_tensors = tensors_path.read_bytes()
    for corrupt, named, words in cases:
        state_path.write_text(good_state)
        tensors_path.write_bytes(good_tensors)
        corrupt()
        with pytest.raises(PeftdeclError) as caught:
            read_checkpoint(folder)
        assert str(named) in str(caught.value)
        assert words in str(caught.value)
    with pytest.raises(PeftdeclError, match="no such folder"):
        read_checkpoint(tmp_path / "checkpoint-99")


def test_real_adapter_checkpoint_loads_in_peft(tmp_path: Path) -> None:
    """AdaptedModel.save as the adapter writer: PEFT loads checkpoint-STEP with every tensor (exact, float32)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from hf_models import tiny_llama

    import peftdecl

    spec = {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    ours = peftdecl.attach(tiny_llama(), spec, seed=3)
    folder = write_checkpoint(tmp_path, 7, ours.save, {"x": np.zeros(1, np.float32)}, {})
    assert visible(tmp_path) == ["checkpoint-7"]
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), folder)
    loaded = peft.get_peft_model_state_dict(theirs)
    from safetensors.numpy import load_file

    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert set(loaded) == set(saved)  # no missing or unexpected keys
    for key, value in saved.items():
        assert torch.equal(loaded[key], torch.from_numpy(value))
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
