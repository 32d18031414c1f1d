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
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torchvision
from torch import nn

from engine.checkpoints import load_checkpoint
from engine.restore import restore_model
from engine.run_lock import FolderBusyError, claim

if TYPE_CHECKING:
    from engine.config import ProjectConfig
    from engine.data import EngineDataset
    from engine.transforms import Preprocess

Runner = Callable[[torch.Tensor], torch.Tensor]  # a loaded exported model: an input batch in, its logits out

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
QUANTIZE = ("int8",)  # what --quantize accepts; ONNX only (ONNX Runtime's quantization)
PREDICT_SCRIPT = "predict.py"  # written next to every ONNX export
CALIBRATION_IMAGES = 128  # training images static int8 quantization calibrates its activation ranges on
_REPORT_BATCH = 32  # the report's batch for accuracy and for throughput


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
    quantize: str | None = None  # "int8", or None for the model's own float32
    report: dict[str, Any] = field(default_factory=dict)  # the deployment report, as in the sidecar's "report"
    predict_script: Path | None = None  # DIR/predict.py (ONNX exports)


def default_suffix(fmt: str, quantize: str | None = None) -> str:
    """The file suffix a format is usually saved with (.pt, .onnx, .pth, .safetensors, .pt2; .int8.onnx)."""
    _check_format(fmt)
    _check_quantize(fmt, quantize)
    return (f".{quantize}" if quantize else "") + _SUFFIXES[fmt]


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where the JSON describing an exported file lives: next to it, with .json appended (model.onnx.json)."""
    p = Path(path)
    return p.with_name(p.name + ".json")


def _check_format(fmt: str) -> None:
    if fmt not in _SUFFIXES:
        raise ExportError(f"unknown export format {fmt!r}; allowed: {', '.join(FORMATS)}")


def _check_quantize(fmt: str, quantize: str | None) -> None:
    if quantize is None:
        return
    if quantize not in QUANTIZE:
        raise ExportError(f"unknown --quantize value {quantize!r}; allowed: {', '.join(QUANTIZE)}")
    if fmt != "onnx":
        raise ExportError(
            f"--quantize {quantize} needs --format onnx (ONNX Runtime quantizes the model); "
            f"a {fmt} export cannot be quantized: leave out --quantize or choose --format onnx"
        )


def _predict_script_source() -> bytes:
    return (Path(__file__).with_name("onnx_predict.py")).read_bytes()


def writes_predict_script(fmt: str) -> bool:
    """Whether an export in this format also writes DIR/predict.py (ONNX: it runs on onnxruntime alone)."""
    return fmt == "onnx"


def replaced_files(out: str | os.PathLike, fmt: str) -> list[Path]:
    """The existing files an export to out would replace: the file, its sidecar, a predict.py that differs."""
    out = Path(out)
    found = [p for p in (out, sidecar_path(out)) if p.exists()]
    script = out.parent / PREDICT_SCRIPT
    if writes_predict_script(fmt) and script.exists():
        try:
            same = script.is_file() and script.read_bytes() == _predict_script_source()
        except OSError:
            same = False
        if not same:
            found.append(script)
    return found


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
    if writes_predict_script(fmt) and out.name == PREDICT_SCRIPT:
        raise ExportError(
            f"{out}: an ONNX export writes {PREDICT_SCRIPT} next to the model; give the model another name"
        )
    if not force:
        _refuse_existing(out, fmt)


def _refuse_existing(out: Path, fmt: str) -> None:
    for p in replaced_files(out, fmt):
        if p.name == PREDICT_SCRIPT:
            raise ExportError(f"{p} exists and is not the predict.py this export writes; use --force to replace it")
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
# Loaders: load the file back once with the runtime a user would use: (path, ckpt) -> a runner, logits out


def _load_torchscript(path: Path, ckpt: dict) -> Runner:
    with _quiet_jit():
        module = torch.jit.load(str(path), map_location="cpu")

    def run(x: torch.Tensor) -> torch.Tensor:
        with _quiet_jit(), torch.no_grad():
            return module(x)

    return run


def _load_onnx(path: Path, ckpt: dict) -> Runner:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(session.run([_OUTPUT_NAME], {_INPUT_NAME: x.numpy()})[0]))

    return run


def _fresh_model(state: dict[str, torch.Tensor], ckpt: dict) -> Runner:
    # The checkpoint's config rebuilds the architecture; the exported tensors replace its weights (strictly).
    model = restore_model({**ckpt, "model_state_dict": state})[0].eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return run


def _load_state_dict(path: Path, ckpt: dict) -> Runner:
    return _fresh_model(torch.load(path, map_location="cpu", weights_only=True), ckpt)


def _load_safetensors(path: Path, ckpt: dict) -> Runner:
    from safetensors.torch import load_file

    return _fresh_model(load_file(str(path), device="cpu"), ckpt)


def _load_pt2(path: Path, ckpt: dict) -> Runner:
    with open(path, "rb") as fh:
        module = torch.export.load(fh).module()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return run


_LOADERS: dict[str, Callable[[Path, dict], Runner]] = {
    "torchscript": _load_torchscript,
    "onnx": _load_onnx,
    "state_dict": _load_state_dict,
    "safetensors": _load_safetensors,
    "pt2": _load_pt2,
}


def _pytorch_runner(model: nn.Module) -> Runner:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return run


# ---------------------------------------------------------------------------------------------
# The data: the check's batch, the report's evaluation set, the calibration images


@dataclass
class _Data:
    check: EngineDataset | None  # validation set (else the training images with eval transforms); None: unreadable
    what: str  # "validation" or "training"
    train: EngineDataset | None  # the training images with the eval pipeline (no augmentation): int8 calibration
    why_not: str  # why there is no data ("" when there is)
    collate: Callable


def _data(cfg: ProjectConfig, pre: Preprocess) -> _Data:
    from engine.collate import get_collate
    from engine.data import prepare_data
    from engine.transforms import build_transforms

    collate = get_collate(cfg.loader.collate)
    path = cfg.resolve(cfg.data.path)
    try:
        data = prepare_data(cfg, pre)
    except (ValueError, OSError, RuntimeError) as exc:  # DataError and ConfigError are ValueErrors
        if path is None or not Path(path).exists():
            why = f"dataset not found at {path}"
        else:
            why = f"dataset at {path} could not be read: {_first_line(exc)}"
        return _Data(None, "", None, why, collate)
    # The training images with the eval pipeline (no augmentation): calibration, and the check without a val split.
    train = data.train
    train.transform = build_transforms(pre, cfg.data.augment, train=False, keep_aspect=cfg.data.keep_aspect)
    if data.val is not None and len(data.val) > 0:
        return _Data(data.val, "validation", train, "", collate)
    return _Data(train, "training", train, "", collate)


def _loader(dataset: Any, batch_size: int, collate: Callable) -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate)


def _verification_batch(data: _Data, pre: Preprocess, batch_size: int) -> tuple[torch.Tensor, str]:
    """The first batch of the checkpoint's validation data, with eval transforms; else a seeded random one."""
    why = data.why_not
    if data.check is not None:
        try:
            x = next(iter(_loader(data.check, batch_size, data.collate)))[0]
            inputs = f"{data.what} batch of {len(x)} image{'s' if len(x) != 1 else ''}"
            extra = " (no validation set)" if data.what == "training" else ""
            return x.to(torch.float32).contiguous(), inputs + extra
        except (ValueError, OSError, RuntimeError, StopIteration) as exc:
            why = f"dataset could not be read: {_first_line(exc)}"
    generator = torch.Generator().manual_seed(_RANDOM_SEED)
    x = torch.randn(batch_size, 3, pre.crop_size, pre.crop_size, generator=generator)
    return x, f"random batch of {batch_size} ({why})"


def _calibration_batches(data: _Data, count: int) -> tuple[list[np.ndarray], str]:
    """Up to count training images spread evenly over the training set, as float32 batches; else why none."""
    if data.train is None or len(data.train) == 0:
        return [], data.why_not or "no training images"
    from torch.utils.data import Subset

    n = min(count, len(data.train))
    indices = sorted({int(i) for i in np.linspace(0, len(data.train) - 1, n).round()})
    try:
        batches = [
            batch[0].to(torch.float32).contiguous().numpy()
            for batch in _loader(Subset(data.train, indices), 16, data.collate)
        ]
    except (ValueError, OSError, RuntimeError) as exc:
        return [], f"the training images could not be read: {_first_line(exc)}"
    return batches, ""


def _example(x: torch.Tensor) -> torch.Tensor:
    # Two samples: torch.export specialises a dimension of size 1, which would fix the batch size.
    return x[:2] if len(x) >= 2 else torch.cat([x, x])


# ---------------------------------------------------------------------------------------------
# int8 quantization (ONNX Runtime)


def _quantize_int8(
    fp32: Path, out: Path, calibration: list[np.ndarray], why_no_calibration: str, log: Callable[[str], None]
) -> dict[str, Any]:
    """Quantize the float32 ONNX file fp32 into out: static (QDQ, calibrated) when there are calibration images,
    else (or when static fails) dynamic; returns the sidecar's "quantization" description."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = fp32.with_name("preprocessed.onnx")
    try:
        # Shape inference and graph optimisation (BatchNorm folded into Conv), as ONNX Runtime recommends first.
        quant_pre_process(str(fp32), str(source))
    except Exception as exc:  # noqa: BLE001 - the optimisation is optional; quantize the exported graph as it is
        log(f"ONNX Runtime's pre-processing for quantization failed ({_first_line(exc)}); quantizing the graph as is")
        source = fp32

    class _Reader(CalibrationDataReader):  # onnxruntime's base class (untyped: Any to mypy)
        def __init__(self) -> None:
            self._batches = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {_INPUT_NAME: batch}

    why = why_no_calibration
    if calibration:
        images = sum(len(b) for b in calibration)
        log(f"Quantizing to int8 (static, calibrated on {images} training images)")
        # Ranges from the 99.999th percentile, so a few outlying activations do not stretch the scale; min/max
        # where the percentile histogram cannot be made (it fails on some tiny graphs).
        methods = [(CalibrationMethod.Percentile, "99.999th percentile"), (CalibrationMethod.MinMax, "min/max")]
        try:
            for i, (method, described) in enumerate(methods):
                try:
                    quantize_static(
                        str(source),
                        str(out),
                        _Reader(),
                        quant_format=QuantFormat.QDQ,
                        per_channel=True,
                        # 7-bit weights: x86 AVX2 int8 kernels (VPMADDUBSW) saturate with full-range weights; on
                        # the digits default that cost 35 accuracy points, reduce_range about none.
                        reduce_range=True,
                        activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8,
                        calibrate_method=method,
                    )
                    break
                except Exception as exc:  # noqa: BLE001 - try the next calibration method, then dynamic
                    if i == len(methods) - 1:
                        raise
                    log(f"{described} calibration failed ({_first_line(exc)}); calibrating with min/max")
                    for p in out.parent.glob(f"{glob.escape(out.name)}*"):
                        p.unlink()
            return {
                "dtype": "int8",
                "method": "static",
                "format": "QDQ (QuantizeLinear / DequantizeLinear around each quantized operator)",
                "weights": "int8 with a 7-bit range (reduce_range), per output channel",
                "activations": f"int8, ranges calibrated ({described} of the calibration images)",
                "calibration": f"{images} training images with the evaluation preprocessing",
                "tool": "onnxruntime.quantization.quantize_static",
            }
        except Exception as exc:  # noqa: BLE001 - any quantizer failure: fall back to dynamic, and say so
            why = f"static quantization failed: {_first_line(exc)}"
            for p in out.parent.glob(f"{glob.escape(out.name)}*"):
                p.unlink()
    log(f"Quantizing to int8 (dynamic: {why})")
    quantize_dynamic(str(source), str(out), per_channel=True, weight_type=QuantType.QInt8)
    return {
        "dtype": "int8",
        "method": "dynamic",
        "why_not_static": why,
        "weights": "int8, per output channel",
        "activations": "quantized at run time from each input's range",
        "tool": "onnxruntime.quantization.quantize_dynamic",
    }


# ---------------------------------------------------------------------------------------------
# The deployment report


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _median_seconds(run: Runner, x: torch.Tensor, *, budget_s: float, max_reps: int) -> tuple[float, int]:
    """Median wall time of run(x) after one warm-up: at least 3 repetitions, more while within budget_s."""
    run(x)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def _timings(run: Runner, x1: torch.Tensor, x32: torch.Tensor) -> dict[str, Any]:
    one, reps_one = _median_seconds(run, x1, budget_s=0.5, max_reps=50)
    many, reps_many = _median_seconds(run, x32, budget_s=1.0, max_reps=10)
    return {
        "latency_ms_batch1": round(one * 1000.0, 4),
        "throughput_batch32": round(len(x32) / many, 2),  # images per second
        "repetitions": {"batch1": reps_one, "batch32": reps_many},
    }


def _file_size(path: Path) -> int:
    """The file's bytes, with an ONNX file's external-data files next to it (name*) counted too."""
    return sum(p.stat().st_size for p in path.parent.glob(f"{glob.escape(path.name)}*") if p.is_file())


def _metric_name(task: str) -> str:
    return {"multilabel": "mean per-label accuracy", "regression": "mean absolute error"}.get(task, "top-1 accuracy")


class _Score:
    """Running totals of one model's metric over the evaluation set (evaluate_checkpoint's definitions)."""

    def __init__(self, task: str):
        self.task, self.total, self.count = task, 0.0, 0

    def add(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        logits = logits.double()
        if self.task == "classification":
            self.total += float((logits.argmax(dim=1) == target.long()).sum())
            self.count += len(target)
        elif self.task == "multilabel":
            self.total += float(((logits > 0) == (target > 0.5)).double().sum())
            self.count += target.numel()
        else:
            self.total += float((logits - target.double().reshape(logits.shape)).abs().sum())
            self.count += logits.numel()

    def value(self) -> float | None:
        return self.total / self.count if self.count else None


def _deployment_report(
    exported: Runner,
    reference: Runner,
    task: str,
    data: _Data,
    x: torch.Tensor,
    file_size: int,
    runtime: str,
    log: Callable[[str], None],
    baseline: tuple[str, Runner, int] | None = None,
) -> dict[str, Any]:
    """Accuracy of the exported model against PyTorch's over the evaluation set, the largest logit difference,
    file size, and CPU latency (batch 1) and throughput (batch 32) of both; baseline adds another file's figures."""
    report: dict[str, Any] = {"metric": _metric_name(task)}
    ours, theirs = _Score(task), _Score(task)
    agree = seen = 0
    max_diff = 0.0
    if data.check is not None:
        total = len(data.check)
        log(f"Report: evaluating on the {data.what} set ({total} images)")
        try:
            for batch in _loader(data.check, _REPORT_BATCH, data.collate):
                images, target = batch[0].to(torch.float32).contiguous(), batch[1]
                got, want = exported(images), reference(images)
                max_diff = max(max_diff, float((got.double() - want.double()).abs().max()))
                ours.add(got, target)
                theirs.add(want, target)
                if task == "classification":
                    agree += int((got.argmax(dim=1) == want.argmax(dim=1)).sum())
                seen += len(images)
                log(f"Report: {seen}/{total} {data.what} images")
        except (ValueError, OSError, RuntimeError) as exc:
            report["why_not_evaluated"] = f"the {data.what} images could not be read: {_first_line(exc)}"
            ours, theirs, seen = _Score(task), _Score(task), 0
    else:
        report["why_not_evaluated"] = data.why_not
    if seen:
        extra = " (no validation set)" if data.what == "training" else ""
        report["evaluated_on"] = f"{data.what} set of {seen} image{'s' if seen != 1 else ''}{extra}"
        report["max_abs_logit_diff"] = max_diff
        if task == "classification":
            report["top1_agreement"] = agree / seen
    else:
        report["evaluated_on"] = None
        # No labelled data: the largest difference on the check's batch is all there is.
        report["max_abs_logit_diff"] = float((exported(x).double() - reference(x).double()).abs().max())
    exported_metric, pytorch_metric = ours.value(), theirs.value()
    if exported_metric is not None and pytorch_metric is not None and task != "regression":
        report["difference_points"] = round((exported_metric - pytorch_metric) * 100.0, 4)
    elif exported_metric is not None and pytorch_metric is not None:
        report["difference"] = exported_metric - pytorch_metric

    x1 = x[:1].contiguous()
    x32 = x.repeat((_REPORT_BATCH + len(x) - 1) // len(x), 1, 1, 1)[:_REPORT_BATCH].contiguous()
    log(f"Report: timing {runtime} on this machine's CPU")
    report["exported"] = {"runtime": runtime, "metric": exported_metric, "size_bytes": file_size}
    report["exported"].update(_timings(exported, x1, x32))
    log("Report: timing the PyTorch checkpoint on this machine's CPU")
    report["pytorch"] = {"runtime": f"PyTorch {torch.__version__}", "metric": pytorch_metric}
    report["pytorch"].update(_timings(reference, x1, x32))
    if baseline is not None:
        name, run, size = baseline
        log(f"Report: timing the {name} on this machine's CPU")
        report["baseline"] = {"name": name, "size_bytes": size, **_timings(run, x1, x32)}
        report["size_ratio"] = round(file_size / size, 4) if size else None
        report["latency_ratio"] = round(
            report["exported"]["latency_ms_batch1"] / report["baseline"]["latency_ms_batch1"], 4
        )
    report["cpu"] = {
        "name": _cpu_name(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "timing": "median wall time after one warm-up run; batch 1 for latency, batch 32 for throughput",
    }
    return report


def format_report(report: dict[str, Any]) -> list[str]:
    """The deployment report as short lines for people (the CLI prints them, the dialog shows them)."""
    lines = []
    metric = report.get("metric", "accuracy")
    ours, theirs = report.get("exported", {}), report.get("pytorch", {})
    if report.get("evaluated_on"):
        if "difference_points" in report:
            lines.append(
                f"{metric} on the {report['evaluated_on']}: {ours['metric'] * 100:.2f}% exported, "
                f"{theirs['metric'] * 100:.2f}% PyTorch ({report['difference_points']:+.2f} points)"
            )
        else:
            lines.append(
                f"{metric} on the {report['evaluated_on']}: {ours['metric']:.4g} exported, "
                f"{theirs['metric']:.4g} PyTorch"
            )
        if "top1_agreement" in report:
            lines.append(f"top-1 agrees with PyTorch on {report['top1_agreement'] * 100:.2f}% of the images")
    else:
        lines.append(f"{metric}: not evaluated ({report.get('why_not_evaluated', 'no data')})")
    lines.append(f"largest logit difference from PyTorch: {report.get('max_abs_logit_diff', float('nan')):.3g}")
    size = ours.get("size_bytes")
    if size is not None:
        text = f"file size: {size / 1e6:.2f} MB"
        if report.get("baseline") and report.get("size_ratio") is not None:
            text += f" ({report['size_ratio']:.2f}x the {report['baseline']['name']})"
        lines.append(text)
    timed = [("exported", ours), ("PyTorch", theirs)]
    if report.get("baseline"):
        timed.append((report["baseline"]["name"], report["baseline"]))
    for who, figures in timed:
        if "latency_ms_batch1" in figures:
            lines.append(
                f"{who}: {figures['latency_ms_batch1']:.2f} ms per image at batch 1, "
                f"{figures['throughput_batch32']:.1f} images/s at batch 32"
            )
    cpu = report.get("cpu")
    if cpu:
        lines.append(f"timed on {cpu['name']} ({cpu['logical_cpus']} logical CPUs), median of repetitions")
    return lines


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
    tolerance: float | None,
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


def _check_logits(
    got: torch.Tensor, reference: torch.Tensor, what: str, tolerance: float | None, inputs: str
) -> tuple[float, float]:
    """(max abs difference, allowed); raises when the shapes differ or (with a tolerance) the logits do."""
    if tuple(got.shape) != tuple(reference.shape):
        raise ExportError(
            f"{what} gives logits of shape {tuple(got.shape)}, the PyTorch "
            f"model {tuple(reference.shape)}; nothing was written"
        )
    diff = float((got.double() - reference.double()).abs().max())
    if not np.isfinite(diff):
        raise ExportError(f"{what} gives non-finite logits on a {inputs}; nothing was written")
    if tolerance is None:
        return diff, float("inf")
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    # float32 carries about 7 significant digits: logits in the thousands differ by 1e-3 from rounding
    # alone, so the tolerance is absolute up to |logit| 1 and relative to the largest logit above it.
    allowed = tolerance * max(1.0, scale)
    if not diff <= allowed:
        raise ExportError(
            f"{what} does not match the PyTorch model: max abs logit "
            f"difference {diff:.3g} > tolerance {allowed:.3g} ({tolerance:g} x max(1, largest "
            f"logit {scale:.3g})) on a {inputs}; nothing was written"
        )
    return diff, allowed


def _run_written(fmt: str, path: Path, ckpt: dict, x: torch.Tensor, what: str) -> tuple[Runner, torch.Tensor]:
    """Load the written file with its own runtime and run it on x; a file that runtime cannot run is a failed
    export."""
    try:
        runner = _LOADERS[fmt](path, ckpt)
        return runner, runner(x)
    except Exception as exc:  # noqa: BLE001 - any runtime failure: this file is not a usable export
        raise ExportError(f"{what} was written but {_RUNTIMES[fmt]} could not run it: {_first_line(exc)}") from exc


def export_checkpoint(
    checkpoint: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike,
    *,
    force: bool = False,
    tolerance: float = 1e-3,
    batch_size: int = 8,
    quantize: str | None = None,
    calibration_images: int = CALIBRATION_IMAGES,
    log: Callable[[str], None] = lambda message: None,
) -> ExportResult:
    """Export a checkpoint's model as fmt to the file out, check it against PyTorch, and write out + ".json".

    The file is loaded back with the runtime a user would use and run on a validation batch; if its
    logits differ from the PyTorch model's by more than tolerance, nothing is written and ExportError
    is raised. With quantize="int8" (ONNX only) the float32 ONNX file is checked that way, then quantized
    by ONNX Runtime (static, calibrated on calibration_images training images; dynamic where static does
    not apply); the int8 file must run and give logits of the right shape, and its differences from
    PyTorch are reported, not bounded. Every export's sidecar holds a deployment report (accuracy
    against PyTorch's on the validation set, size, CPU latency and throughput). An ONNX export also
    writes DIR/predict.py. An existing out, sidecar or different predict.py is only replaced with force=True.
    """
    _check_format(fmt)
    _check_quantize(fmt, quantize)
    _check_packages(fmt)
    if batch_size < 1:
        raise ExportError(f"batch_size = {batch_size}: the check needs at least 1 image")
    if quantize and calibration_images < 1:
        raise ExportError(f"calibration_images = {calibration_images}: static quantization needs at least 1 image")
    checkpoint = Path(checkpoint).expanduser().resolve()
    out = Path(out).expanduser().absolute()
    _check_destination(out, fmt, force)

    ckpt = load_checkpoint(checkpoint)
    model, cfg, class_names, pre = restore_model(ckpt, checkpoint)  # CheckpointError passes through as is
    model = model.to("cpu", torch.float32).eval()
    backbone = cfg.model.backbone
    task = ckpt.get("task") or cfg.data.task
    log(f"Loaded {checkpoint.name}: {backbone}, epoch {ckpt.get('epoch')}, {len(class_names)} outputs")

    data = _data(cfg, pre)
    x, inputs = _verification_batch(data, pre, batch_size)
    log(f"Checking on a {inputs}")
    pytorch = _pytorch_runner(model)
    reference = pytorch(x)

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
    work = Path(tempfile.mkdtemp(prefix="model-workbench-export-")) if quantize else None
    try:
        staged = staging / out.name
        # int8: the float32 file is made and checked first, in a working folder of its own.
        written = work / "float32.onnx" if work is not None else staged
        log(f"Exporting {backbone} as {fmt}")
        try:
            extra = _WRITERS[fmt](model, _example(x), written, log)
        except PermissionError as exc:
            raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from None
        except Exception as exc:  # noqa: BLE001 - any exporter failure means this model does not go to this format
            raise ExportError(f"{fmt} export of {backbone} failed: {_first_line(exc)}") from exc
        what = f"{fmt} export of {backbone}"
        runner, got = _run_written(fmt, written, ckpt, x, what)
        diff, allowed = _check_logits(got, reference, what, tolerance, inputs)
        log(f"Verified with {_RUNTIMES[fmt]}: max abs logit difference {diff:.3g} (allowed {allowed:.3g})")

        baseline: tuple[str, Runner, int] | None = None
        if quantize:
            float32_diff = diff
            calibration, why = _calibration_batches(data, calibration_images)
            try:
                extra["quantization"] = _quantize_int8(written, staged, calibration, why, log)
            except Exception as exc:  # noqa: BLE001 - a quantizer failure means no int8 file for this model
                raise ExportError(f"int8 quantization of {backbone} failed: {_first_line(exc)}") from exc
            baseline = ("float32 ONNX file", runner, _file_size(written))
            what = f"int8 {what}"
            runner, got = _run_written(fmt, staged, ckpt, x, what)
            # Quantization changes the logits by design: the report measures how much; the check only bounds shape.
            diff = _check_logits(got, reference, what, None, inputs)[0]
            extra["quantization"].update(float32_max_abs_diff=float32_diff, float32_tolerance=tolerance)
            log(f"int8 file runs in onnxruntime: max abs logit difference {diff:.3g} on the check's batch")

        report = _deployment_report(
            runner, pytorch, task, data, x, _file_size(staged), _RUNTIMES[fmt], log, baseline=baseline
        )
        for line in format_report(report):
            log(f"Report: {line}")
        extra["report"] = report
        info = _sidecar(
            fmt,
            out,
            staged,
            checkpoint,
            ckpt,
            cfg,
            class_names,
            pre,
            diff,
            None if quantize else tolerance,
            inputs,
            extra,
        )
        script = out.parent / PREDICT_SCRIPT
        if writes_predict_script(fmt):
            source = _predict_script_source()
            if not (script.is_file() and script.read_bytes() == source):  # the same script is left as it is
                (staging / PREDICT_SCRIPT).write_bytes(source)
        (staging / sidecar.name).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if not force:  # something may have appeared there while we worked
            _refuse_existing(out, fmt)
        try:
            _move_into_place(staging, out)
        except PermissionError as exc:
            raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        destination.release()
        shutil.rmtree(staging, ignore_errors=True)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    log(f"Wrote {out} and {sidecar.name}" + (f" (and {PREDICT_SCRIPT})" if writes_predict_script(fmt) else ""))
    return ExportResult(
        format=fmt,
        path=out,
        sidecar=sidecar,
        max_abs_diff=diff,
        tolerance=tolerance,
        inputs=inputs,
        quantize=quantize,
        report=report,
        predict_script=script if writes_predict_script(fmt) else None,
    )
