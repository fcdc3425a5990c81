"""A save replaces the whole adapter folder in one step: killed at any point it leaves the old adapter or the new
one, complete and exactly; concurrent savers leave one complete adapter; stale files never survive.

Kill trials: a handful in CI; the documented slow run raises them,

    PEFTDECL_KILL_TRIALS=50 .venv/bin/pytest -q -s -p no:cacheprovider tests/test_files_atomic.py -k kill_9

and prints the outcomes (old / new, and how many kills landed mid-save, seen by the litter they left).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import peftdecl
from peftdecl.errors import AdapterFileError
from peftdecl.formats import atomic
from peftdecl.formats.mlx_lm import convert_adapter
from peftdecl.formats.registry import is_adapter_dir
from peftdecl.formats.safetensors_io import read_safetensors
from tests.assertions import lora_spec

REPO = Path(__file__).resolve().parents[1]
STATE = {
    "a.q.weight": np.linspace(-1, 1, 24).reshape(6, 4),
    "a.v.weight": np.linspace(0, 1, 12).reshape(3, 4),
}
KILL_TRIALS = int(os.environ.get("PEFTDECL_KILL_TRIALS", "4"))
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def old_model() -> peftdecl.AdaptedModel:
    """The adapter on disk before the save: alpha 4, plus a sub-adapter the new save does not have."""
    model = peftdecl.attach(dict(STATE), lora_spec(["q", "v"], r=2, alpha=4), seed=1)
    model.add_adapter("second", {"peft_type": "LORA", "r": 1, "target_modules": ["q"]}, seed=2)
    return model


def new_model() -> peftdecl.AdaptedModel:
    """The adapter being saved: same shapes, other values and scaling (a mix would load silently wrong)."""
    return peftdecl.attach(dict(STATE), lora_spec(["q", "v"], r=2, alpha=16), seed=3)


def snapshot(folder: Path) -> dict[str, object] | None:
    """Every file under ``folder`` (relative path -> bytes, or a tensor file's tensors and metadata, since
    safetensors orders metadata keys differently from one process to the next); None if the folder is missing."""
    if not folder.is_dir():
        return None
    return {str(p.relative_to(folder)): content(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def content(path: Path) -> object:
    if path.suffix != ".safetensors":
        return path.read_bytes()
    tensors, metadata = read_safetensors(path)
    return metadata, {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in tensors.items()}


def litter(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, dict[str, object]]:
    root = tmp_path_factory.mktemp("refs")
    refs = {}
    for label, build, fmt in [("old", old_model, "hf"), ("new", new_model, "hf"), ("old-mlx", old_model, "mlx-lm"),
                              ("new-native", new_model, "native")]:  # fmt: skip
        build().save(root / label, format=fmt)
        refs[label] = snapshot(root / label)
    return refs


def restore(folder: Path, files: dict[str, object]) -> None:
    from safetensors.numpy import save_file

    if folder.exists():
        shutil.rmtree(folder)
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            (folder / rel).write_bytes(data)
        else:
            metadata, tensors = data  # type: ignore[misc]
            arrays = {
                k: np.frombuffer(raw, dtype).reshape(shape) for k, (dtype, shape, raw) in tensors.items()
            }
            save_file(arrays, folder / rel, metadata=metadata or None)


def assert_loads_as(folder: Path, which: str) -> None:
    """The folder loads, and computes as the model it is a snapshot of."""
    loaded = peftdecl.load_adapter(dict(STATE), folder)
    expected = (old_model if which.startswith("old") else new_model)()
    x = np.linspace(-2, 2, 8).reshape(2, 4)
    np.testing.assert_allclose(loaded("a.q", x), expected("a.q", x), rtol=1e-6)


def save_steps(tmp_path: Path, fmt: str) -> list[str]:
    """The labelled points of one save over an existing folder, in order."""
    labels: list[str] = []
    folder = tmp_path / "probe"
    old_model().save(folder)
    original = atomic._step
    atomic._step = labels.append
    try:
        new_model().save(folder, format=fmt)
    finally:
        atomic._step = original
    shutil.rmtree(folder)
    return labels


def crash_in_child(folder: Path, fmt: str, at: int, exchange: bool) -> int:
    """Fork; the child saves the new adapter and dies (os._exit, no cleanup) at step ``at``; its exit code.

    The model is built before the fork, so the child only writes files (no thread pools needed after fork)."""
    model = new_model()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            count = [0]

            def step(label: str) -> None:
                count[0] += 1
                if count[0] == at:
                    os._exit(17)

            atomic._step = step
            atomic.USE_EXCHANGE = exchange
            model.save(folder, format=fmt)
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"the saving child hung at step {at}")


@needs_fork
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two_renames"])
@pytest.mark.parametrize("old, new, fmt", [("old", "new", "hf"), ("old-mlx", "new-native", "native")])
def test_a_crash_at_every_step_leaves_old_or_new_exactly(
    tmp_path, references, exchange, old, new, fmt
) -> None:
    labels = save_steps(tmp_path, fmt)
    assert labels[0] == "locked" and "swapped" in labels and labels[-1] == "done"
    if not exchange:
        labels.insert(labels.index("swapped"), "moved-old")
    folder = tmp_path / "ad"
    users = {"notes.txt": b"mine", "checkpoint-1/state.json": b"{}"}  # kept whatever the outcome
    for at, label in enumerate(labels, start=1):
        restore(folder, {**references[old], **users})
        assert crash_in_child(folder, fmt, at, exchange) == 17, label
        swapped = at >= labels.index("swapped") + 1
        expected = {**references[new if swapped else old], **users}
        state = snapshot(folder)
        if label == "moved-old":  # the one window of the two-rename fallback: no folder until recovery
            assert state is None
        else:
            assert state == expected, label
        atomic.recover(folder)  # what the next save does first
        assert snapshot(folder) == expected, label
        assert litter(folder) == [], label
        assert_loads_as(folder, new if swapped else old)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two_renames"])
def test_an_exception_at_every_step_leaves_old_or_new_and_no_litter(
    tmp_path, references, monkeypatch, exchange
):
    monkeypatch.setattr(atomic, "USE_EXCHANGE", exchange)
    labels = save_steps(tmp_path, "hf")
    folder = tmp_path / "ad"
    for at in range(1, len(labels) + 1):
        restore(folder, references["old"])
        count = [0]

        def step(label: str, at: int = at, count: list[int] = count) -> None:
            count[0] += 1
            if count[0] == at:
                raise RuntimeError(f"injected at {label}")

        monkeypatch.setattr(atomic, "_step", step)
        with pytest.raises(RuntimeError, match="injected"):
            new_model().save(folder)
        monkeypatch.setattr(atomic, "_step", lambda label: None)
        swapped = at >= labels.index("swapped") + 1
        assert snapshot(folder) == references["new" if swapped else "old"], labels[at - 1]
        assert litter(folder) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_renameat2_swaps_two_folders_here(tmp_path) -> None:
    # so the renameat2 cases above run the one-step swap, not the fallback
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / name).write_text(name)
    assert atomic._exchange(tmp_path / "a", tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b"]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["a"]


def test_the_folder_holds_exactly_the_new_save(tmp_path, references) -> None:
    folder = tmp_path / "ad"
    restore(folder, references["old-mlx"])  # another format, and a sub-adapter
    (folder / "second" / "README.md").write_text("model card")  # HF PEFT writes one beside each adapter
    (folder / "second" / ".DS_Store").write_bytes(b"\0")  # macOS Finder's, in any folder it shows
    (folder / ".DS_Store").write_bytes(b"\0")
    new_model().save(folder)
    assert snapshot(folder) == references["new"]
    assert_loads_as(folder, "new")


def test_convert_replaces_the_destination_whole(tmp_path, references) -> None:
    restore(tmp_path / "src", references["new"])
    restore(tmp_path / "dst", references["old"])
    convert_adapter(tmp_path / "src", tmp_path / "dst", to="mlx-lm")
    assert set(snapshot(tmp_path / "dst")) == {"adapter_config.json", "adapters.safetensors"}


def test_the_users_files_are_kept_and_only_the_old_adapter_goes(tmp_path, references) -> None:
    """A Trainer-style output folder: the save replaces the adapter files and the old sub-adapter, and keeps the
    tokenizer file, a checkpoint folder (adapter files inside it included), a README and a link as they were."""
    folder = tmp_path / "out"
    users = {
        "tokenizer.json": b"{}",
        "README.md": b"# my run",
        "checkpoint-500/adapter_config.json": b"{}",
        "checkpoint-500/trainer_state.json": b"{}",
    }
    restore(folder, {**references["old"], **users})
    os.symlink("tokenizer.json", folder / "tok-link")
    inode = os.stat(folder / "tokenizer.json").st_ino
    new_model().save(folder)
    after = snapshot(folder)
    assert {k: v for k, v in after.items() if k in references["new"]} == references["new"]
    assert {k: v for k, v in after.items() if k not in references["new"]} == {**users, "tok-link": b"{}"}
    assert "second/adapter_config.json" not in after  # the old sub-adapter went with the old folder
    assert os.readlink(folder / "tok-link") == "tokenizer.json"
    assert os.stat(folder / "tokenizer.json").st_ino == inode  # carried by a hard link, not rewritten
    assert litter(folder) == []
    assert_loads_as(folder, "new")


def test_a_sub_adapter_named_like_a_users_folder_is_refused(tmp_path, references) -> None:
    folder = tmp_path / "out"
    restore(folder, {**references["new"], "second/plot.png": b"\x89PNG"})
    before = snapshot(folder)
    with pytest.raises(AdapterFileError, match=r"out/second: is not an adapter file or sub-adapter"):
        old_model().save(folder)  # it has a sub-adapter "second"
    assert snapshot(folder) == before and litter(folder) == []


def test_empty_folder_accepted_file_and_link_targets_refused(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    new_model().save(tmp_path / "empty")
    assert is_adapter_dir(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterFileError, match="exists and is not a folder"):
        new_model().save(tmp_path / "file")
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(AdapterFileError, match="is a symbolic link"):
        new_model().save(tmp_path / "link")
    assert list((tmp_path / "real").iterdir()) == []


def test_the_working_folder_is_not_swapped_away(tmp_path, references, monkeypatch) -> None:
    folder = tmp_path / "ad"
    restore(folder, references["old"])
    monkeypatch.chdir(folder / "second")
    for where in (".", "..", folder):
        with pytest.raises(AdapterFileError, match="current working folder"):
            new_model().save(where)
    assert snapshot(folder) == references["old"]


def test_a_folder_that_cannot_be_made_is_a_clean_error(tmp_path) -> None:
    (tmp_path / "file").write_text("keep")
    for where in (tmp_path / "file" / "ad", tmp_path / ("n" * 250)):
        with pytest.raises(
            AdapterFileError, match=r"cannot save here|cannot create the (new folder|lock file)"
        ):
            new_model().save(where)
    assert (tmp_path / "file").read_text() == "keep"


def test_leftovers_of_a_crashed_save_are_no_adapter_and_go_at_the_next_save(tmp_path, references) -> None:
    folder = tmp_path / "ad"
    restore(folder, references["old"])
    stale = [tmp_path / ".ad.peftdecl-staging-0123", tmp_path / ".ad.peftdecl-old-4567"]
    for path in stale:
        restore(path, references["new"])  # complete adapters, as a crash after the swap leaves one
    (tmp_path / ".ad.peftdecl-lock").write_text("")  # a lock file a killed saver left behind
    assert snapshot(folder) == references["old"]  # loaders look inside the folder only
    with pytest.raises(peftdecl.PeftdeclError, match="adapter name"):  # and no name reaches a hidden sibling
        peftdecl.load_adapter(dict(STATE), tmp_path, name=".ad.peftdecl-staging-0123")
    new_model().save(folder)
    assert snapshot(folder) == references["new"] and litter(folder) == []


def test_a_save_between_reading_config_and_tensors_is_noticed(tmp_path, references, monkeypatch) -> None:
    from peftdecl.formats import hf_peft

    folder = tmp_path / "ad"
    restore(folder, references["old"])
    original, calls = hf_peft.load_spec, []

    def read_config_then_save(path):
        spec = original(path)
        calls.append(path)
        if len(calls) == 1:  # a concurrent save lands between the config and the tensors
            new_model().save(folder)
        return spec

    monkeypatch.setattr(hf_peft, "load_spec", read_config_then_save)
    assert_loads_as(folder, "new")  # not the old alpha with the new tensors
    assert len(calls) == 2


def test_a_folder_moved_aside_by_an_interrupted_save_is_named(tmp_path, references) -> None:
    restore(tmp_path / ".ad.peftdecl-old-0a1b", references["old"])
    with pytest.raises(
        AdapterFileError, match=r"ad: no such adapter folder; an interrupted save left .*recover"
    ):
        peftdecl.load_adapter(dict(STATE), tmp_path / "ad")
    atomic.recover(tmp_path / "ad")
    assert snapshot(tmp_path / "ad") == references["old"]


# -- processes ------------------------------------------------------------------------------------------------
SAVER = """
import sys
from tests.test_files_atomic import new_model, old_model
folder, fmt, mode = sys.argv[1], sys.argv[2], sys.argv[3]
models = [old_model(), new_model()]
print("ready", flush=True)
count = int(mode) if mode != "forever" else None
i = 0
while count is None or i < count:
    models[i % 2 if count is None else int(sys.argv[4])].save(folder, format=fmt)
    i += 1
"""


def saver(folder: Path, mode: str, which: int = 0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", SAVER, str(folder), "hf", mode, str(which)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs kill -9")
def test_kill_9_at_random_times_leaves_old_or_new(tmp_path, references) -> None:
    outcomes: Counter[str] = Counter()
    rng = random.Random(int(os.environ.get("PEFTDECL_KILL_SEED", "0")))
    folder = tmp_path / "ad"
    for _ in range(KILL_TRIALS):
        restore(folder, references["old"])
        proc = saver(folder, "forever")
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = snapshot(folder)
        which = "old" if state == references["old"] else "new" if state == references["new"] else None
        assert which is not None, sorted(state or {})
        outcomes[which] += 1
        outcomes["mid-save (litter left)"] += bool([n for n in litter(folder) if "lock" not in n])
        assert_loads_as(folder, which)
        atomic.recover(folder)
        assert snapshot(folder) == references[which] and litter(folder) == []
    print(f"\nkill -9 trials: {KILL_TRIALS}; outcomes: {dict(outcomes)}")
    assert outcomes["old"] + outcomes["new"] == KILL_TRIALS


def test_two_concurrent_writers_leave_one_complete_adapter(tmp_path, references) -> None:
    folder = tmp_path / "ad"
    writers = [saver(folder, "25", which) for which in (0, 1)]
    for proc in writers:
        proc.wait(timeout=120)
        assert proc.returncode == 0
    assert snapshot(folder) in (references["old"], references["new"])
    assert litter(folder) == []
