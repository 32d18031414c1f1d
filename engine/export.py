"""Exporting a checkpoint's model to a deployable file, verified against PyTorch and described by a sidecar JSON."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torchvision
from torch import nn

from engine.checkpoints import load_checkpoint
from engine.restore import restore_model
from engine.run_lock import FolderBusyError, claim

if TYPE_CHECKING:
    from engine.config import ProjectConfig
    from engine.transforms import Preprocess

_SUFFIXES = {"torchscript": ".pt", "onnx": ".onnx", "state_dict": ".pth", "safetensors": ".safetensors", "pt2": ".pt2"}
FORMATS = tuple(_SUFFIXES)
_RUNTIMES = {
    "torchscript": "torch.jit.load",
    "onnx": "onnxruntime",
    "state_dict": "torch.load into a fresh model",
    "safetensors": "safetensors load_file into a fresh model",
    "pt2": "torch.export.load",
}
_POSTPROCESS = {"classification": "softmax", "multilabel": "sigmoid", "regression": "none"}
_INPUT_NAME, _OUTPUT_NAME = "input", "logits"
_RANDOM_SEED = 0


class ExportError(RuntimeError):
    """An export that cannot be made or failed its check; the message names the file or format and what is wrong."""


@dataclass
class ExportResult:
    format: str
    path: Path
    sidecar: Path
    max_abs_diff: float
    tolerance: float
    inputs: str  # what the check ran on: "validation batch of N images" or "random batch ... (why)"


def default_suffix(fmt: str) -> str:
    """The file suffix a format is usually saved with (.pt, .onnx, .pth, .safetensors, .pt2)."""
    _check_format(fmt)
    return _SUFFIXES[fmt]


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where the JSON describing an exported file lives: next to it, with .json appended (model.onnx.json)."""
    p = Path(path)
    return p.with_name(p.name + ".json")


def _check_format(fmt: str) -> None:
    if fmt not in _SUFFIXES:
        raise ExportError(f"unknown export format {fmt!r}; allowed: {', '.join(FORMATS)}")


def _check_packages(fmt: str) -> None:
    needed = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "safetensors": ("safetensors",)}.get(fmt, ())
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(
            f"{fmt} export needs the package(s) {', '.join(missing)}; "
            f"install them with: pip install {' '.join(missing)}"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# The destination


def _check_destination(out: Path, fmt: str, force: bool) -> None:
    """Refuse before any work: a missing or read-only folder, a folder as the file, or files we would overwrite."""
    folder = out.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ExportError(f"cannot write {out}: folder {folder} {what}; create it or choose another --out")
    if out.is_dir():
        raise ExportError(f"{out} is a folder; give a file path such as {out / ('model' + _SUFFIXES[fmt])}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {out}: folder {folder} is not writable; choose another --out")
    if not force:
        _refuse_existing(out)


def _refuse_existing(out: Path) -> None:
    for p in (out, sidecar_path(out)):
        if p.exists():
            raise ExportError(f"{p} exists; use --force to replace it")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename each staged file over its final name, the sidecar last, then make the renames durable.

    Files are staged under their final names so that references between them (ONNX external data)
    stay valid; each rename is atomic, so no half-written file ever appears under a final name.
    """
    sidecar = sidecar_path(out)
    staged = sorted(staging.iterdir(), key=lambda p: (p.name == sidecar.name, p.name == out.name, p.name))
    for p in staged:
        _fsync(p)
    for p in staged:
        os.replace(p, out.parent / p.name)
    try:
        _fsync(out.parent)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# Writers: (model, example input, path, log) -> extra sidecar fields; each writes one file (ONNX may add
# an external-data file next to it past 2 GB)


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    # TorchScript is deprecated upstream, but it is the format the user asked for, and the check proves the file.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def _write_torchscript(model: nn.Module, example: torch.Tensor, path: Path, log: Callable[[str], None]) -> dict:
    with _quiet_jit(), torch.no_grad():
        traced = torch.jit.trace(model, (example,), check_trace=False)  # the check runs it on real inputs
        torch.jit.save(traced, str(path))
    return {}


def _batch_dim() -> Any:  # a torch.export.Dim
    return torch.export.Dim("batch", min=1)


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path, log: Callable[[str], None]) -> dict:
    try:
        # The torch.export-based exporter (the default since PyTorch 2.9); external data only past 2 GB.
        program = torch.onnx.export(
            model,
            (example,),
            None,
            input_names=[_INPUT_NAME],
            output_names=[_OUTPUT_NAME],
            dynamo=True,
            dynamic_shapes=({0: _batch_dim()},),
            verbose=False,
        )
        assert program is not None  # f=None with dynamo=True returns the program
        program.save(str(path))
        exporter = "torch.export"
    except Exception as exc:  # noqa: BLE001 - some models only go through the older tracer
        log(
            f"the torch.export-based ONNX exporter failed ({_first_line(exc)}); retrying with the TorchScript-based one"
        )
        for p in path.parent.glob(f"{glob.escape(path.name)}*"):
            p.unlink()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=[_INPUT_NAME],
                output_names=[_OUTPUT_NAME],
                dynamo=False,
                opset_version=17,
                dynamic_axes={_INPUT_NAME: {0: "batch"}, _OUTPUT_NAME: {0: "batch"}},
            )
        exporter = "torchscript"
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"onnx_opset": opset, "onnx_exporter": exporter}


def _write_state_dict(model: nn.Module, example: torch.Tensor, path: Path, log: Callable[[str], None]) -> dict:
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    return {}


def _write_safetensors(model: nn.Module, example: torch.Tensor, path: Path, log: Callable[[str], None]) -> dict:
    from safetensors.torch import save_file

    # safetensors refuses tensors that share memory; a copy of each repeat keeps every key, so a plain
    # load_file + load_state_dict (strict) works without knowing which weights were tied.
    tensors, seen = {}, set()
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        storage = (value.untyped_storage().data_ptr(), value.untyped_storage().nbytes()) if value.numel() else None
        if storage is not None and storage in seen:
            value = value.clone()
        elif storage is not None:
            seen.add(storage)
        tensors[key] = value.contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return {}


def _write_pt2(model: nn.Module, example: torch.Tensor, path: Path, log: Callable[[str], None]) -> dict:
    program = torch.export.export(model, (example,), dynamic_shapes=({0: _batch_dim()},))
    with open(path, "wb") as fh:  # a buffer: torch.export only accepts paths ending in .pt2
        torch.export.save(program, fh)
    return {}


_WRITERS: dict[str, Callable[..., dict]] = {
    "torchscript": _write_torchscript,
    "onnx": _write_onnx,
    "state_dict": _write_state_dict,
    "safetensors": _write_safetensors,
    "pt2": _write_pt2,
}


# ---------------------------------------------------------------------------------------------
# Readers: load the file back with the runtime a user would use and run it: (path, x, ckpt) -> logits


def _run_torchscript(path: Path, x: torch.Tensor, ckpt: dict) -> torch.Tensor:
    with _quiet_jit(), torch.no_grad():
        return torch.jit.load(str(path), map_location="cpu")(x)


def _run_onnx(path: Path, x: torch.Tensor, ckpt: dict) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run([_OUTPUT_NAME], {_INPUT_NAME: x.numpy()})[0])


def _run_fresh(state: dict[str, torch.Tensor], x: torch.Tensor, ckpt: dict) -> torch.Tensor:
    # The checkpoint's config rebuilds the architecture; the exported tensors replace its weights (strictly).
    model = restore_model({**ckpt, "model_state_dict": state})[0]
    with torch.no_grad():
        return model(x)


def _run_state_dict(path: Path, x: torch.Tensor, ckpt: dict) -> torch.Tensor:
    return _run_fresh(torch.load(path, map_location="cpu", weights_only=True), x, ckpt)


def _run_safetensors(path: Path, x: torch.Tensor, ckpt: dict) -> torch.Tensor:
    from safetensors.torch import load_file

    return _run_fresh(load_file(str(path), device="cpu"), x, ckpt)


def _run_pt2(path: Path, x: torch.Tensor, ckpt: dict) -> torch.Tensor:
    with open(path, "rb") as fh:
        program = torch.export.load(fh)
    with torch.no_grad():
        return program.module()(x)


_READERS: dict[str, Callable[[Path, torch.Tensor, dict], torch.Tensor]] = {
    "torchscript": _run_torchscript,
    "onnx": _run_onnx,
    "state_dict": _run_state_dict,
    "safetensors": _run_safetensors,
    "pt2": _run_pt2,
}


# ---------------------------------------------------------------------------------------------
# The check's input


def _verification_batch(cfg: ProjectConfig, pre: Preprocess, batch_size: int) -> tuple[torch.Tensor, str]:
    """The first batch of the checkpoint's validation data, with eval transforms; else a seeded random one."""
    from torch.utils.data import DataLoader

    from engine.collate import get_collate
    from engine.data import prepare_data
    from engine.transforms import build_transforms

    path = cfg.resolve(cfg.data.path)
    try:
        data = prepare_data(cfg, pre)
        dataset, what = data.val, "validation"
        if dataset is None or len(dataset) == 0:
            # No validation split: the training images, but with the eval pipeline (no augmentation).
            dataset, what = data.train, "training"
            dataset.transform = build_transforms(pre, cfg.data.augment, train=False, keep_aspect=cfg.data.keep_aspect)
        loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=get_collate(cfg.loader.collate)
        )
        x = next(iter(loader))[0]
        inputs = f"{what} batch of {len(x)} image{'s' if len(x) != 1 else ''}"
        return x.to(torch.float32).contiguous(), inputs + (" (no validation set)" if what == "training" else "")
    except (ValueError, OSError, RuntimeError, StopIteration) as exc:  # DataError and ConfigError are ValueErrors
        if path is None or not Path(path).exists():
            why = f"dataset not found at {path}"
        else:
            why = f"dataset at {path} could not be read: {_first_line(exc)}"
    generator = torch.Generator().manual_seed(_RANDOM_SEED)
    x = torch.randn(batch_size, 3, pre.crop_size, pre.crop_size, generator=generator)
    return x, f"random batch of {batch_size} ({why})"


def _example(x: torch.Tensor) -> torch.Tensor:
    # Two samples: torch.export specialises a dimension of size 1, which would fix the batch size.
    return x[:2] if len(x) >= 2 else torch.cat([x, x])


# ---------------------------------------------------------------------------------------------
# The sidecar


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sidecar(
    fmt: str,
    out: Path,
    staged: Path,
    checkpoint: Path,
    ckpt: dict,
    cfg: ProjectConfig,
    class_names: list[str],
    pre: Preprocess,
    max_abs_diff: float,
    tolerance: float,
    inputs: str,
    extra: dict,
) -> dict[str, Any]:
    task = ckpt.get("task") or cfg.data.task
    versions = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__}
    if fmt == "onnx":
        versions.update(onnx=_version("onnx"), onnxruntime=_version("onnxruntime"))
    if fmt == "safetensors":
        versions["safetensors"] = _version("safetensors")
    info = {
        "format": fmt,
        "file": out.name,
        "sha256": _sha256(staged),
        "task": task,
        "class_names": list(class_names),
        "output": {"name": _OUTPUT_NAME, "postprocess": _POSTPROCESS.get(task, "none")},
        "input": {
            "name": _INPUT_NAME,
            "layout": "NCHW",
            "dtype": "float32",
            "normalize": "RGB scaled to [0, 1], then (x - mean) / std per channel",
        },
        "input_size": [3, pre.crop_size, pre.crop_size],
        "resize_size": pre.resize_size,
        "keep_aspect": bool(cfg.data.keep_aspect),
        "mean": list(pre.mean),
        "std": list(pre.std),
        "interpolation": pre.interpolation,
        "backbone": cfg.model.backbone,
        "source_checkpoint": str(checkpoint),
        "epoch": ckpt.get("epoch"),
        "max_abs_diff": max_abs_diff,
        "tolerance": tolerance,
        "verified_with": _RUNTIMES[fmt],
        "verified_on": inputs,
        "versions": versions,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    info.update(extra)
    return info


# ---------------------------------------------------------------------------------------------
# The export


def export_checkpoint(
    checkpoint: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike,
    *,
    force: bool = False,
    tolerance: float = 1e-3,
    batch_size: int = 8,
    log: Callable[[str], None] = lambda message: None,
) -> ExportResult:
    """Export a checkpoint's model as fmt to the file out, check it against PyTorch, and write out + ".json".

    The file is loaded back with the runtime a user would use and run on a validation batch; if its
    logits differ from the PyTorch model's by more than tolerance, nothing is written and ExportError
    is raised. An existing out (or its sidecar) is only replaced with force=True.
    """
    _check_format(fmt)
    _check_packages(fmt)
    if batch_size < 1:
        raise ExportError(f"batch_size = {batch_size}: the check needs at least 1 image")
    checkpoint = Path(checkpoint).expanduser().resolve()
    out = Path(out).expanduser().absolute()
    _check_destination(out, fmt, force)

    ckpt = load_checkpoint(checkpoint)
    model, cfg, class_names, pre = restore_model(ckpt, checkpoint)  # CheckpointError passes through as is
    model = model.to("cpu", torch.float32).eval()
    backbone = cfg.model.backbone
    log(f"Loaded {checkpoint.name}: {backbone}, epoch {ckpt.get('epoch')}, {len(class_names)} outputs")

    x, inputs = _verification_batch(cfg, pre, batch_size)
    log(f"Checking on a {inputs}")
    with torch.no_grad():
        reference = model(x)

    sidecar = sidecar_path(out)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except PermissionError:
        raise ExportError(f"cannot write {out}: folder {out.parent} is not writable; choose another --out") from None
    # Two exports to one file would each rename their own model and sidecar into place: a mixed pair.
    try:
        destination = claim(out.parent / f".{out.name}.lock", f"export {str(out)!r}", log=log)
    except FolderBusyError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ExportError(str(exc)) from None
    try:
        staged = staging / out.name
        log(f"Exporting {backbone} as {fmt}")
        try:
            extra = _WRITERS[fmt](model, _example(x), staged, log)
        except PermissionError as exc:
            raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from None
        except Exception as exc:  # noqa: BLE001 - any exporter failure means this model does not go to this format
            raise ExportError(f"{fmt} export of {backbone} failed: {_first_line(exc)}") from exc
        try:
            got = _READERS[fmt](staged, x, ckpt)
        except Exception as exc:  # noqa: BLE001 - a file its own runtime cannot run is a failed export
            raise ExportError(
                f"{fmt} export of {backbone} was written but {_RUNTIMES[fmt]} could not run it: {_first_line(exc)}"
            ) from exc
        if tuple(got.shape) != tuple(reference.shape):
            raise ExportError(
                f"{fmt} export of {backbone} gives logits of shape {tuple(got.shape)}, the PyTorch "
                f"model {tuple(reference.shape)}; nothing was written"
            )
        diff = float((got.double() - reference.double()).abs().max())
        scale = float(reference.abs().max()) if reference.numel() else 0.0
        # float32 carries about 7 significant digits: logits in the thousands differ by 1e-3 from rounding
        # alone, so the tolerance is absolute up to |logit| 1 and relative to the largest logit above it.
        allowed = tolerance * max(1.0, scale)
        if not diff <= allowed:  # NaN fails too
            raise ExportError(
                f"{fmt} export of {backbone} does not match the PyTorch model: max abs logit "
                f"difference {diff:.3g} > tolerance {allowed:.3g} ({tolerance:g} x max(1, largest "
                f"logit {scale:.3g})) on a {inputs}; nothing was written"
            )
        log(f"Verified with {_RUNTIMES[fmt]}: max abs logit difference {diff:.3g} (allowed {allowed:.3g})")
        info = _sidecar(fmt, out, staged, checkpoint, ckpt, cfg, class_names, pre, diff, tolerance, inputs, extra)
        (staging / sidecar.name).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if not force:  # something may have appeared there while we worked
            _refuse_existing(out)
        try:
            _move_into_place(staging, out)
        except PermissionError as exc:
            raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        destination.release()
        shutil.rmtree(staging, ignore_errors=True)
    log(f"Wrote {out} and {sidecar.name}")
    return ExportResult(format=fmt, path=out, sidecar=sidecar, max_abs_diff=diff, tolerance=tolerance, inputs=inputs)
