"""Claims a folder (or an export's file) for one process at a time, so two runs never write into one place.

The claim is an exclusive `flock` on a lock file (FOLDER/.lock for a run folder), which holds the owner's process
id, host and command. The
operating system drops the lock when its process dies however it dies (SIGKILL included), so a lock file left by
a killed process is recognised as stale by the lock itself, not by guessing from process ids, and is taken over
with a message. A live owner's claim is refused with a message that names the folder and the owner's process.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no flock; exclusive creation of the lock file stands in (see _lock_fd)
    fcntl = None  # type: ignore[assignment]  # the module is absent here; _lock_fd and holder check for None

LOCK_FILE = ".lock"
# A parent process (the app) that holds a run folder's claim and starts torchrun on it names itself here, so
# the run's rank 0 writes into the folder its parent claimed for it instead of refusing it.
CLAIM_ENV = "MODEL_WORKBENCH_CLAIMED_BY"


class FolderBusyError(RuntimeError):
    """Another live process holds the folder's claim; the message names the folder and that process."""


def _describe(owner: dict[str, Any]) -> str:
    pid = owner.get("pid", "?")
    host = owner.get("host")
    since = owner.get("started")
    parts = [f"process {pid}"]
    if host and host != socket.gethostname():
        parts.append(f"on {host}")
    if since:
        parts.append(f"since {since}")
    command = owner.get("command")
    text = " ".join(parts)
    return f"{text} ({command})" if command else text


def read_owner(lock_file: str | os.PathLike) -> dict[str, Any]:
    """What a lock file says of its owner ({} when there is none or it is unreadable)."""
    try:
        data = json.loads(Path(lock_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class Claim:
    """One process's exclusive claim; release() (or the process's end) gives it up."""

    def __init__(self, lock_file: Path, fd: int | None, took_over: dict[str, Any] | None):
        self.lock_file = lock_file
        self._fd = fd
        self.took_over = took_over  # the owner whose stale lock this claim replaced, if any

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the folder up: the lock file is removed first, so nobody can lock a file that is going away."""
        if self._fd is None:
            return
        try:
            self.lock_file.unlink(missing_ok=True)
        except OSError:
            pass  # a folder made read-only meanwhile: the lock itself still goes with the descriptor
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a claim dropped without release() must not keep the folder locked
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None


def _lock_fd(path: Path) -> tuple[int, dict[str, Any] | None]:
    """An open descriptor holding the exclusive lock on path, and what the file said before (a stale owner).

    Loops when the file it locked was removed or replaced meanwhile (its owner released it between our open and
    our lock): a lock on an unlinked file would claim nothing.
    """
    while True:
        if fcntl is None:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raise FolderBusyError(str(path)) from None
            return fd, None
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderBusyError(str(path)) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        previous = os.read(fd, 65536)
        try:
            stale = json.loads(previous) if previous.strip() else None
        except ValueError:
            stale = {"pid": "?"}  # cut short by a kill while it was being written
        return fd, stale if isinstance(stale, dict) else None


def _owner_when_written(lock_file: Path, patience_s: float = 1.0) -> dict[str, Any]:
    """The owner's record, waiting briefly when the owner has locked the file but not written it yet (it does so
    right after locking: a refusal should name the process that holds the folder)."""
    deadline = time.monotonic() + patience_s
    while True:
        owner = read_owner(lock_file)
        if owner or time.monotonic() >= deadline:
            return owner
        time.sleep(0.01)


def claim(lock_file: str | os.PathLike, what: str, *, log: Callable[[str], None] | None = None) -> Claim:
    """Claim what lock_file guards for this process, or raise FolderBusyError naming the process that holds it.

    what names the guarded thing in messages ("run folder '/x/run'"). A lock left by a process that no longer
    runs is taken over, and log (default: stderr) says so.
    """
    path = Path(lock_file)
    try:
        fd, stale = _lock_fd(path)
    except FolderBusyError:
        owner = _owner_when_written(path)
        raise FolderBusyError(
            f"{what} is in use by {_describe(owner) if owner else 'another process'}; "
            "wait for it to finish or choose another"
        ) from None
    except OSError as exc:
        raise FolderBusyError(f"{what} cannot be claimed ({path}): {exc.strerror or exc}") from None
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200] if sys.argv else "",
    }
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
    except OSError:
        pass  # the lock is what counts; the record only makes the refusal message readable
    if stale:
        (log or (lambda m: print(m, file=sys.stderr, flush=True)))(
            f"{what}: taking over the lock left by {_describe(stale)}, which no longer runs"
        )
    return Claim(path, fd, stale)


def claim_folder(folder: str | os.PathLike, *, log: Callable[[str], None] | None = None) -> Claim:
    """This process's claim on a run folder (FOLDER/.lock); see claim()."""
    return claim(Path(folder) / LOCK_FILE, f"run folder {str(folder)!r}", log=log)


def holder(folder: str | os.PathLike) -> dict[str, Any] | None:
    """Who holds a run folder now: its owner's record while a live process has it claimed, else None.

    A look, not a claim: a shared lock taken and dropped at once (it fails while the owner holds its exclusive
    one), so a lock file left by a killed run reads as free.
    """
    return lock_holder(Path(folder) / LOCK_FILE)


def lock_holder(lock_file: str | os.PathLike) -> dict[str, Any] | None:
    """Who holds the claim a lock file guards (see holder): its owner's record, or None when nobody lives."""
    lock_file = Path(lock_file)
    if fcntl is None:
        return read_owner(lock_file) or None  # without flock, the file's presence is the claim
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _owner_when_written(lock_file) or {"pid": "?"}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def inherited_claim(folder: str | os.PathLike) -> Claim | None:
    """The claim a parent process made for us (CLAIM_ENV names its pid and it holds the folder's lock)."""
    holder = os.environ.get(CLAIM_ENV)
    if not holder:
        return None
    lock_file = Path(folder) / LOCK_FILE
    owner = read_owner(lock_file)
    if str(owner.get("pid")) != holder or owner.get("host") != socket.gethostname():
        return None
    return Claim(lock_file, None, None)


_claims: dict[Path, Claim] = {}  # the run folders this process writes into, with their locks


def claim_run_dir(run_dir: Path, *, log: Callable[[str], None] | None = None) -> None:
    """Claim run_dir for this process until release_run_dir (or the process ends); a live owner is refused.

    A torchrun child of the app writes into the folder the app claimed for it (run_lock.CLAIM_ENV).
    """
    if run_dir in _claims:
        return
    _claims[run_dir] = inherited_claim(run_dir) or claim_folder(run_dir, log=log)


def release_run_dir(run_dir: str | os.PathLike | None) -> None:
    """Give up this process's claim on run_dir (nothing happens when it holds none)."""
    if run_dir is None:
        return
    held = _claims.pop(Path(run_dir), None)
    if held is not None:
        held.release()
