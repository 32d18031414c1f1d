"""Checkpoint files: written atomically, read with weights_only=True so a file can never run code."""
from __future__ import annotations

import errno
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

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
            self.message = (f"cannot write {what} {self.path}: {full} ({cause.strerror or 'no space left'}; "
                            f"{free} in {folder}). Checkpoints already written are intact; free some space "
                            "(or lower checkpoint.keep_last), then resume the run from its last.pt")
        else:
            self.message = (f"cannot write {what} {self.path}: {cause.strerror or cause}. "
                            "Checkpoints already written are intact")

    def __str__(self) -> str:
        return self.message


class _KeepWriteErrors:
    """A file torch.save writes through that remembers the OSError of a failed write.

    torch's zip writer turns an exception raised by write() into a bare RuntimeError ("unexpected pos"), losing
    the errno that says why (ENOSPC); this keeps it so the caller can report the real cause.
    """

    def __init__(self, fh):
        self._fh = fh
        self.error: OSError | None = None

    def write(self, data) -> int:
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


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed writer left in a folder (.NAME.*.tmp); returns what was removed.

    Only a process that owns the folder may call this (a run folder being resumed): another writer's
    temporary file would go too.
    """
    removed = []
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
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist" if not path.exists()
                              else f"checkpoint {str(path)!r} is not a file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"refusing to load {path}: it holds Python objects beyond tensors and plain values "
                              f"(a pickle that could run code). Details: {str(exc).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        # A text file or other garbage can surface as any of these from torch's legacy reader.
        raise CheckpointError(f"checkpoint {path} is damaged or not a PyTorch file "
                              f"(truncated by an interrupted copy?): {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(data).__name__}, not a checkpoint dictionary")
    version = data.get("format_version", FORMAT_VERSION)
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}, newer than this Model Workbench "
                              f"reads ({FORMAT_VERSION}); update the app to open it")
    return data


def restore_model(ckpt: dict[str, Any]):
    """The trained model a checkpoint describes, rebuilt from its config and loaded strictly, in eval mode.

    Returns (model, config, class_names, preprocess). No pretrained weights are fetched: the
    checkpoint's own tensors replace them.
    """
    from engine.backbones import build_model, preprocess_for
    from engine.config import from_dict

    for key in ("model_state_dict", "config", "class_names"):
        if key not in ckpt:
            raise CheckpointError(f"this file has no '{key}': it is not a Model Workbench checkpoint "
                                  "(a bare state dict can be used as model.weights_file instead)")
    cfg = from_dict(ckpt["config"], check_paths=False)
    pre = preprocess_for(cfg.model, cfg.data)
    model_cfg = cfg.copy().model
    model_cfg.weights = None
    model_cfg.weights_file = None
    built = build_model(model_cfg, len(ckpt["class_names"]), image_size=pre.crop_size)
    try:
        built.model.load_state_dict(ckpt["model_state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"the checkpoint's weights do not fit {cfg.model.backbone}: "
                              f"{str(exc).splitlines()[0]}") from None
    built.model.eval()
    return built.model, cfg, list(ckpt["class_names"]), pre
