"""Checkpoint files: written atomically, read with weights_only=True so a file can never run code."""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read: missing, truncated, from a newer version, or carrying a pickle."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save into a temporary file in the same folder, fsync, then rename over the final name.

    A process killed at any instant leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


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
