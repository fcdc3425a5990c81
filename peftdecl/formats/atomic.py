"""Atomic writes: single files by rename, whole adapter folders by building a new folder and swapping it in.

A save (:func:`staged_directory`) never changes the target folder file by file. Under an exclusive lock it builds
the complete new folder in a hidden sibling ``.<name>.peftdecl-staging-<random>``, fsyncs every file and folder,
then swaps the two folders in one step: ``renameat2(RENAME_EXCHANGE)`` on Linux, ``renamex_np(RENAME_SWAP)`` on
macOS, or where neither is available two renames (target -> ``.<name>.peftdecl-old-<random>``, staging -> target),
between which a crash leaves the folder missing until the next save restores it. A reader therefore sees the old
adapter or the new one, complete, and the folder holds exactly what the new save wrote (stale files of another
format and old sub-adapters go with the old folder). Leftover siblings of a crashed save are removed, under the
lock, by the next save of that folder. Readers decorated with :func:`consistent_read` redo a read during which the
folder was swapped, so a load racing a save gets one save's files, never the old config with the new tensors.

Rules, so that a save can never destroy anything but an adapter:

* the old folder's adapter files and old sub-adapters are dropped; every other entry (a tokenizer, a Trainer's
  checkpoints) is carried into the new folder before the swap (:mod:`peftdecl.formats.folder_policy`);
* a target that is a symbolic link is refused (peftdecl would otherwise replace the link, or write where it
  points); links inside the target are the user's: carried over as links, never followed;
* the current working folder (or one above it) is refused: the swap would leave the process in a deleted folder;
* the lock is ``flock`` on the hidden sibling ``.<name>.peftdecl-lock``, removed when the save ends; two
  concurrent savers of one folder run one after the other and leave one complete adapter. Without ``fcntl``
  (Windows) there is no lock.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from peftdecl.errors import AdapterFileError
from peftdecl.formats.folder_policy import ADAPTER_FILES, carry_over, users_entries
from peftdecl.names import check_adapter_name

STAGING, OLD, LOCK = "peftdecl-staging-", "peftdecl-old-", "peftdecl-lock"
DEFAULT_ADAPTER = "default"
T = TypeVar("T")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _step(f"wrote {path.name}")


def atomic_write_text(path: Path, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _step(label: str) -> None:
    """A point of the save sequence; tests replace this to crash a save exactly there."""


def consistent_read(read: Callable[[Path], T]) -> Callable[[Path], T]:
    """Wrap a folder reader so that its files all come from one save: a save swapping the folder while they
    are read (say between the config and the tensors) changes the folder's identity, and the read is redone."""

    @functools.wraps(read)
    def wrapper(folder: Path) -> T:
        for _ in range(READ_ATTEMPTS):
            before = _identity(folder)
            try:
                result = read(folder)
            except OSError as exc:  # a file that vanished or cannot be read: a file error, named
                raise AdapterFileError(f"{folder}: cannot read the adapter ({exc})") from None
            if _identity(folder) == before:
                return result
        raise AdapterFileError(
            f"{folder}: changed {READ_ATTEMPTS} times while being read; is a save looping?"
        )

    return wrapper


READ_ATTEMPTS = 5


def _identity(folder: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(folder)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def adapter_folder(stage: Path, name: str) -> Path:
    """The folder adapter ``name`` is written to inside a staging folder (created; the default is the stage)."""
    if name == DEFAULT_ADAPTER:
        return stage
    check_adapter_name(name)
    if name in ADAPTER_FILES:
        raise AdapterFileError(f"adapter name {name!r} is the name of a file of the saved folder")
    folder = stage / name
    folder.mkdir(exist_ok=True)
    return folder


@contextlib.contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; when the body returns, it replaces ``target`` whole.

    If the body raises, ``target`` is untouched and the staging folder is removed. See the module docstring for
    what may be replaced, the lock, and crash recovery."""
    with _os_errors(target, "cannot save here"):
        target = _absolute(Path(target))
        parent, name = target.parent, target.name
        parent.mkdir(parents=True, exist_ok=True)
    with _locked(parent / f".{name}.{LOCK}"):
        _step("locked")
        _recover(target)
        _step("cleaned")
        _check_replaceable(target)
        stage = parent / f".{name}.{STAGING}{secrets.token_hex(8)}"
        with _os_errors(target, "cannot create the new folder beside it"):
            os.mkdir(stage)
            if os.path.isdir(target):  # the new folder keeps the old one's permissions
                os.chmod(stage, stat.S_IMODE(os.stat(target).st_mode))
        try:
            yield stage
            _step("staged")
            carry_over(target, stage)
            _step("carried")
            fsync_tree(stage)
            _step("synced")
            swap_into_place(stage, target)
        finally:
            _remove(stage)  # after a swap: the old folder; after an error: the partial new one
        _step("removed-old")
        fsync_dir(parent)
    _step("done")


@contextlib.contextmanager
def _os_errors(target: Path, what: str) -> Iterator[None]:
    """Report an OSError of preparing a save (a parent that is a file, no permission, a name too long) as an
    AdapterFileError naming the folder; errors while writing the files themselves propagate as they are."""
    try:
        yield
    except OSError as exc:
        raise AdapterFileError(
            f"{target}: {what} ({exc.strerror or exc}: {exc.filename or target})"
        ) from None


def _absolute(target: Path) -> Path:
    """``target`` with its parent's links resolved and its own name kept (so a link there is seen, not followed)."""
    if target.name in ("", ".", ".."):
        target = target.resolve()
    if not target.name:
        raise AdapterFileError(f"{target}: cannot save an adapter over a file-system root")
    return target.parent.resolve() / target.name


def _check_replaceable(target: Path) -> None:
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise AdapterFileError(
            f"{target}: is a symbolic link (to {os.readlink(target)}); peftdecl does not save through links — "
            "save to the folder it points to, or remove the link"
        )
    if not stat.S_ISDIR(mode):
        raise AdapterFileError(
            f"{target}: exists and is not a folder; refusing to replace it with an adapter"
        )
    with contextlib.suppress(OSError):
        cwd = Path.cwd()
        if cwd == target or target in cwd.parents:  # the swap would leave this process in a deleted folder
            raise AdapterFileError(
                f"{target}: is (or holds) the current working folder; a save replaces the whole folder — "
                "save from outside it"
            )
    users_entries(target)  # refuses what could not be carried over, before anything is written


def _siblings(target: Path, kind: str) -> list[Path]:
    prefix = f".{target.name}.{kind}"
    return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix))


def _recover(target: Path) -> None:
    """Undo what a crashed save left: restore a folder the two-rename swap had moved aside, remove litter."""
    old = _siblings(target, OLD)
    if old and not os.path.lexists(target):
        # the crash fell between the two renames: the newest moved-aside folder is the last complete save
        newest = max(old, key=lambda p: p.stat().st_mtime)
        os.rename(newest, target)
        fsync_dir(target.parent)
    for leftover in _siblings(target, STAGING) + _siblings(target, OLD):
        _remove(leftover)


def recover(target: Path) -> None:
    """Repair the litter of a crashed save of ``target`` now, rather than at its next save."""
    target = _absolute(Path(target))
    with _locked(target.parent / f".{target.name}.{LOCK}"):
        _recover(target)


def _remove(path: Path) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def fsync_dir(folder: Path) -> None:
    """fsync one folder, so that renames inside it survive a crash."""
    if sys.platform == "win32":  # folders cannot be opened for fsync there
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (folders after their contents)."""
    for here, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(here, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(here))


def swap_into_place(stage: Path, target: Path) -> None:
    """Put ``stage`` at ``target``; afterwards ``stage`` holds the old folder (if there was one)."""
    if not os.path.lexists(target):
        os.rename(stage, target)
        _step("swapped")
        return
    if _exchange(stage, target):
        _step("swapped")
        return
    old = target.parent / f".{target.name}.{OLD}{secrets.token_hex(8)}"
    os.rename(target, old)
    try:
        _step("moved-old")
        os.rename(stage, target)
    except BaseException:
        os.rename(old, target)  # put the old adapter back; a crash instead is undone by the next save
        raise
    os.rename(old, stage)  # so the caller removes it like the exchanged folder
    _step("swapped")


# the flags that swap two paths atomically: renameat2's (Linux 3.15+, glibc 2.28+; see rename(2)) and
# renamex_np's (macOS 10.12+)
_RENAME_EXCHANGE, _RENAME_SWAP, _AT_FDCWD = 2, 2, -100
USE_EXCHANGE = sys.platform.startswith("linux") or sys.platform == "darwin"
"""False makes every save use the two-rename swap (tests set it to exercise that path)."""


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step; False where the OS or file system cannot (the caller falls back)."""
    if not USE_EXCHANGE:
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if sys.platform == "darwin":
            swap = libc.renamex_np
            swap.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
            args: tuple = (os.fsencode(a), os.fsencode(b), _RENAME_SWAP)
        else:
            swap = libc.renameat2
            swap.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            args = (_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    except (OSError, AttributeError):  # no such function in this C library
        return False
    if swap(*args) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
        return False
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``lock`` (created, and removed on exit while still held)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    while True:
        with _os_errors(lock, "cannot create the lock file"):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # a previous holder may have unlinked the file between our open and our lock: lock the current one
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)
