"""Checkpoint files: written atomically, read with weights_only=True so a file can never run code."""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import torch

FORMAT_VERSION = 1
TEMP_SUFFIX = ".tmp"  # temporary files are hidden (.NAME.RANDOM.tmp) and end with this


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read: missing, truncated, from a newer version, or carrying a pickle."""


class CheckpointWriteError(OSError):
    """A checkpoint (or another file of a run folder) that could not be written: the disk is full, the folder
    is read-only...

    The file it was to replace is untouched and no temporary file is left; errno is the system's.
    """

    def __init__(self, path: Path, cause: OSError, what: str = "checkpoint"):
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.path = Path(path)
        folder = self.path.parent
        if cause.errno in (errno.ENOSPC, errno.EDQUOT):
            try:
                free = f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free"
            except OSError:
                free = "free space unknown"
            full = "the disk is full" if cause.errno == errno.ENOSPC else "the disk quota is used up"
            self.message = (
                f"cannot write {what} {self.path}: {full} ({cause.strerror or 'no space left'}; "
                f"{free} in {folder}). Checkpoints already written are intact; free some space "
                "(or lower checkpoint.keep_last), then resume the run from its last.pt"
            )
        else:
            self.message = (
                f"cannot write {what} {self.path}: {cause.strerror or cause}. Checkpoints already written are intact"
            )

    def __str__(self) -> str:
        return self.message


class _KeepWriteErrors:
    """A file torch.save writes through that remembers the OSError of a failed write.

    torch's zip writer turns an exception raised by write() into a bare RuntimeError ("unexpected pos"), losing
    the errno that says why (ENOSPC); this keeps it so the caller can report the real cause.
    """

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self._fh.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name: str) -> Any:  # everything else is the file's own
        return getattr(self._fh, name)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save into a temporary file in the same folder, fsync, then rename over the final name.

    A process killed at any instant leaves either the old file or the new one, never half of one. A write that
    fails (a full disk) removes the temporary file, keeps the old one, and raises CheckpointWriteError.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise CheckpointWriteError(path, exc) from exc
    writer = None
    try:
        with os.fdopen(fd, "wb") as fh:
            writer = _KeepWriteErrors(fh)
            torch.save(obj, writer)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        cause = writer.error if writer is not None and writer.error is not None else exc
        if isinstance(cause, OSError) and not isinstance(cause, CheckpointWriteError):
            raise CheckpointWriteError(path, cause) from exc
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def torch_load_weights_only(path: str | os.PathLike) -> Any:
    """torch.load restricted to tensors and plain values: a pickle naming any other global is refused, never run."""
    with warnings.catch_warnings():
        # A raw pickle of a higher protocol only warns before it is refused: noise on a one-line error.
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)


def refused_pickle_reason(exc: BaseException) -> str:
    """What torch's weights-only unpickler refused, in a few words (its own text is long and suggests loading unsafely)."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if found:
        return f"it calls {found.group(1)}"
    found = re.search(r"Unsupported operand (\d+)", str(exc))
    if found:
        return f"it uses pickle opcode {found.group(1)}"
    return "it holds objects beyond tensors and plain values"


def check_format_version(data: dict[str, Any], path: str | os.PathLike, what: str = "checkpoint") -> None:
    """Refuse a checkpoint written by a newer Model Workbench: its fields may mean something this one does not know."""
    if "format_version" not in data:
        return  # a plain PyTorch dict, or a checkpoint from before the field existed
    version = data["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(
            f"{what} {path} has format version {version!r}, which is not a version number "
            f"(this Model Workbench reads versions 1 to {FORMAT_VERSION})"
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{what} {path} has format version {version}, newer than this Model Workbench "
            f"reads ({FORMAT_VERSION}); update the app to open it"
        )


def _first_sentence(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line.split(". ")[0].rstrip(".")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed writer left in a folder (.NAME.*.tmp); returns what was removed.

    Only a process that owns the folder may call this (a run folder being resumed): another writer's
    temporary file would go too.
    """
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for tmp in folder.glob(f".*{TEMP_SUFFIX}"):
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read one of our checkpoints (or any PyTorch dict of tensors and plain values) safely."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not exist"
            if not path.exists()
            else f"checkpoint {str(path)!r} is not a file"
        )
    try:
        data = torch_load_weights_only(path)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise CheckpointError(
                f"refusing to load {path}: {refused_pickle_reason(exc)}, a pickle that could run "
                "code; only tensors and plain values are read (see SECURITY.md)"
            ) from None
        raise CheckpointError(f"checkpoint {path} is damaged or not a PyTorch file: {_first_sentence(exc)}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        # A text file or other garbage can surface as any of these from torch's legacy reader.
        raise CheckpointError(
            f"checkpoint {path} is damaged or not a PyTorch file "
            f"(truncated by an interrupted copy?): {_first_sentence(exc)}"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(data).__name__}, not a checkpoint dictionary")
    check_format_version(data, path)
    return data
