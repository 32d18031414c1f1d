"""Evaluation of a trained model: accuracy, per-class metrics, confusion matrix and the hardest samples."""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, SequentialSampler

from engine.checkpoints import load_checkpoint
from engine.collate import get_collate
from engine.data import (
    ArrayDataset,
    DataError,
    EngineDataset,
    ImageFileDataset,
    array_to_tensor,
    load_image,
    prepare_data,
    scan_source,
    subset_dataset,
)
from engine.restore import restore_model
from engine.sample_failures import ReportingCollate, SampleFailure, batch_failures
from engine.samplers import plan_loader
from engine.trainer import pick_device
from engine.transforms import Preprocess, build_transforms

Progress = Callable[[int, int], None] | None
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Evaluation:
    """The results of one evaluation, as plain values (lists, floats, str): safe across threads and into JSON."""

    task: str
    class_names: list[str]
    samples: int
    loss: float | None  # mean per-sample loss: cross-entropy, BCE-with-logits (mean over labels) or MSE
    accuracy: float | None  # classification: top-1; multilabel: mean per-label accuracy; regression: None
    top5_accuracy: float | None  # only with at least 5 classes
    per_class: list[dict]  # {"class", "precision", "recall", "f1", "support"}; per label for multilabel
    macro_f1: float | None  # mean F1 over the classes that occur in the truth or the predictions
    confusion: list[list[int]]  # rows = true class, columns = predicted; [] unless classification
    hardest: list[dict]  # highest loss first: {"index", "path", "true", "predicted", "confidence", "loss"}
    data: str = ""  # which data was evaluated
    mae: float | None = None  # regression only
    rmse: float | None = None  # regression only
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}: samples the scan left out
    # {"path", "reason"}: image files that no longer decoded when evaluated (changed since the scan), left out
    unreadable: list[dict] = field(default_factory=list)
    # Single-label classification: every sample in dataset order, {"index", "path", "true", "predicted",
    # "confidence", "loss", "top": [[class, probability], ...] (the five most likely)}: what the confusion
    # matrix's cells are made of, so a front end can show the images behind any cell.
    predictions: list[dict] = field(default_factory=list)
    # Class activation maps written for the hardest samples (evaluate --cam): {"path", "class", "method",
    # "layer", "overlay", "map"}; overlay is a PNG, map the raw .npy (float32, the image's height x width, [0, 1]).
    cams: list[dict] = field(default_factory=list)
    cam_note: str = ""  # why maps were asked for but not written (a model without a spatial layer, another task)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite floats become null, since JSON has no NaN or Infinity."""
        return _finite(dataclasses.asdict(self))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


_HARDEST_KEYS = ("index", "path", "true", "predicted", "confidence", "loss")


def cell_samples(predictions: Sequence[dict], true: str | None, predicted: str | None) -> list[dict]:
    """The samples of one confusion-matrix cell (true class, predicted class), most telling first.

    A mistake cell is ordered by loss, highest first (the surest mistakes); the diagonal (true == predicted)
    by confidence, lowest first (the shakiest right answers). predicted=None gives every sample of a true
    class, and true=None every sample predicted as a class, both by loss. Ties keep dataset order.
    """
    rows = [
        r
        for r in predictions
        if (true is None or r["true"] == true) and (predicted is None or r["predicted"] == predicted)
    ]
    if true is not None and true == predicted:
        return sorted(rows, key=lambda r: r["confidence"])
    return sorted(rows, key=lambda r: -r["loss"])


def per_sample_loss(task: str) -> LossFn:
    """The unreduced loss used to rank samples: one value per sample."""
    if task == "classification":
        return lambda out, tgt: F.cross_entropy(out, tgt, reduction="none")
    if task == "multilabel":
        return lambda out, tgt: F.binary_cross_entropy_with_logits(out, tgt.to(out.dtype), reduction="none").mean(dim=1)
    return lambda out, tgt: (
        F.mse_loss(out, tgt.to(out.dtype).reshape(out.shape), reduction="none").reshape(out.shape[0], -1).mean(dim=1)
    )


def _ratio(num: float, den: float) -> float:
    # Undefined precision/recall (nothing predicted, nothing true) count as 0, never NaN.
    return float(num / den) if den > 0 else 0.0


def _per_class(names: Sequence[str], tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[list[dict], float | None]:
    rows, f1s = [], []
    for i, name in enumerate(names):
        precision = _ratio(tp[i], tp[i] + fp[i])
        recall = _ratio(tp[i], tp[i] + fn[i])
        f1 = _ratio(2 * precision * recall, precision + recall)
        rows.append({"class": name, "precision": precision, "recall": recall, "f1": f1, "support": int(tp[i] + fn[i])})
        # A class absent from both truth and predictions says nothing about the model (e.g. a separate
        # test folder holding only some classes), so it is left out of the macro average as scikit-learn does.
        if tp[i] + fp[i] + fn[i] > 0:
            f1s.append(f1)
    return rows, (float(np.mean(f1s)) if f1s else None)


def evaluate_model(
    model: torch.nn.Module,
    loader: DataLoader,
    *,
    task: str,
    class_names: Sequence[str],
    sample_names: Sequence[str],
    device: str | torch.device = "cpu",
    top_n: int = 20,
    loss_fn: LossFn | None = None,
    stop_event: threading.Event | None = None,
    progress: Progress = None,
) -> Evaluation | None:
    """Run a model over a loader once and compute every metric; None if stop_event is set midway.

    The loader must serve the samples in order (no shuffling): sample_names[i] names the i-th sample it
    yields. Batches may be (inputs, targets) or the pad collate's (inputs, targets, sizes); a ReportingCollate's
    batch may leave out samples whose image no longer decodes: they go into Evaluation.unreadable.
    loss_fn(outputs, targets) must return one loss per sample; the default suits the task.
    """
    device = torch.device(device)
    loss_fn = loss_fn or per_sample_loss(task)
    names = list(class_names)
    model.to(device).eval()
    outputs_all: list[torch.Tensor] = []
    targets_all: list[torch.Tensor] = []
    losses_all: list[torch.Tensor] = []
    total = len(loader)
    left_out: list[SampleFailure] = []  # image files that no longer decode (engine/sample_failures.py)
    with torch.inference_mode():
        for done, batch in enumerate(loader, start=1):
            if stop_event is not None and stop_event.is_set():
                return None
            left_out += [f for f in batch_failures(batch) if f.replaced_by is None]
            if not len(batch):  # every sample of the batch was left out
                if progress is not None:
                    progress(done, total)
                continue
            inputs = batch[0].to(device, non_blocking=True)
            targets = batch[1].to(device, non_blocking=True)
            outputs = model(inputs).float()
            # Kept on the CPU, one row per sample: small next to the images, and frees the device.
            losses_all.append(loss_fn(outputs, targets).float().reshape(-1).cpu())
            outputs_all.append(outputs.cpu())
            targets_all.append(targets.cpu())
            if progress is not None:
                progress(done, total)
    n = sum(len(t) for t in targets_all)
    gone = {f.index for f in left_out}
    positions = [i for i in range(len(sample_names)) if i not in gone]  # the dataset position of each result
    sample_names = [sample_names[i] for i in positions]
    if len(sample_names) != n:
        raise ValueError(f"{len(sample_names)} sample names for {n} evaluated samples")
    result = _metrics(task, names, sample_names, positions, outputs_all, targets_all, losses_all, top_n)
    result.unreadable = [f.as_dict() for f in left_out]
    return result


def _metrics(
    task: str,
    names: list[str],
    sample_names: Sequence[str],
    positions: Sequence[int],
    outputs_all: list[torch.Tensor],
    targets_all: list[torch.Tensor],
    losses_all: list[torch.Tensor],
    top_n: int,
) -> Evaluation:
    """Every metric from the outputs, targets and per-sample losses of the evaluated samples, in order; "index"
    is a sample's position in the dataset (positions), which samples left out shift from its result's."""
    n = sum(len(t) for t in targets_all)
    k = len(names)
    if n == 0:
        return Evaluation(
            task=task,
            class_names=names,
            samples=0,
            loss=None,
            accuracy=None,
            top5_accuracy=None,
            per_class=[],
            macro_f1=None,
            confusion=[],
            hardest=[],
        )
    out = torch.cat(outputs_all)
    tgt = torch.cat(targets_all)
    losses = torch.cat(losses_all).numpy().astype(np.float64)
    order = np.argsort(-losses, kind="stable")[: max(0, top_n)]  # ties keep dataset order

    if task == "classification":
        confidence, predicted = torch.softmax(out, dim=1).max(dim=1)
        t, p = tgt.numpy().astype(np.int64), predicted.numpy().astype(np.int64)
        confusion = np.bincount(t * k + p, minlength=k * k).reshape(k, k)
        tp = np.diag(confusion)
        per_class, macro_f1 = _per_class(names, tp, confusion.sum(axis=0) - tp, confusion.sum(axis=1) - tp)
        top5 = None
        if k >= 5:
            top5 = float((out.topk(5, dim=1).indices == tgt[:, None]).any(dim=1).double().mean())
        top_p, top_i = torch.softmax(out, dim=1).topk(min(5, k), dim=1)
        predictions = [
            {
                "index": positions[i],
                "path": sample_names[i],
                "true": names[t[i]],
                "predicted": names[p[i]],
                "confidence": float(confidence[i]),
                "loss": float(losses[i]),
                "top": [[names[int(c)], float(v)] for c, v in zip(top_i[i], top_p[i], strict=True)],
            }
            for i in range(n)
        ]
        hardest = [{key: predictions[i][key] for key in _HARDEST_KEYS} for i in order]
        return Evaluation(
            task=task,
            class_names=names,
            samples=n,
            loss=float(losses.mean()),
            accuracy=float((t == p).mean()),
            top5_accuracy=top5,
            per_class=per_class,
            macro_f1=macro_f1,
            confusion=confusion.tolist(),
            hardest=hardest,
            predictions=predictions,
        )

    if task == "multilabel":
        probs = torch.sigmoid(out).numpy().astype(np.float64)
        pred = out.numpy() > 0
        true = tgt.numpy() > 0.5
        tp = (pred & true).sum(axis=0)
        per_class, macro_f1 = _per_class(names, tp, (pred & ~true).sum(axis=0), (~pred & true).sum(axis=0))
        # Confidence of a multi-label prediction: the mean probability the model gives its own yes/no per label.
        confidence = np.where(pred, probs, 1.0 - probs).mean(axis=1)
        hardest = [
            {
                "index": positions[int(i)],
                "path": sample_names[i],
                "true": [names[j] for j in np.flatnonzero(true[i])],
                "predicted": [names[j] for j in np.flatnonzero(pred[i])],
                "confidence": float(confidence[i]),
                "loss": float(losses[i]),
            }
            for i in order
        ]
        return Evaluation(
            task=task,
            class_names=names,
            samples=n,
            loss=float(losses.mean()),
            accuracy=float((pred == true).mean()),
            top5_accuracy=None,
            per_class=per_class,
            macro_f1=macro_f1,
            confusion=[],
            hardest=hardest,
        )

    values = out.numpy().astype(np.float64).reshape(n, -1)
    truth = tgt.numpy().astype(np.float64).reshape(n, -1)
    err = values - truth
    hardest = [
        {
            "index": positions[int(i)],
            "path": sample_names[i],
            "true": truth[i].tolist(),
            "predicted": values[i].tolist(),
            "confidence": None,
            "loss": float(losses[i]),
        }
        for i in order
    ]
    return Evaluation(
        task=task,
        class_names=names,
        samples=n,
        loss=float(losses.mean()),
        accuracy=None,
        top5_accuracy=None,
        per_class=[],
        macro_f1=None,
        confusion=[],
        hardest=hardest,
        mae=float(np.abs(err).mean()),
        rmse=float(np.sqrt((err**2).mean())),
    )


def sample_names(dataset: EngineDataset) -> list[str]:
    """A name per sample a person can find again: the image path, or 'row i' of an .npz's kept images."""
    if isinstance(dataset, ImageFileDataset):
        return list(dataset.files.texts)
    if isinstance(dataset, ArrayDataset):
        rows = dataset.rows if dataset.rows is not None else range(len(dataset))
        return [f"row {r}" for r in rows]
    return [f"sample {i}" for i in range(len(dataset))]


def evaluate_checkpoint(
    checkpoint: str | os.PathLike | dict,
    *,
    data: str | os.PathLike | None = None,
    batch_size: int = 64,
    top_n: int = 20,
    device: str = "auto",
    progress: Progress = None,
    stop_event: threading.Event | None = None,
    source: str | os.PathLike | None = None,
    cam_dir: str | os.PathLike | None = None,
    cam_method: str = "gradcam",
) -> Evaluation | None:
    """Evaluate a checkpoint on its own validation data (data=None) or on a folder / CSV / .npz.

    With data=None the validation split is rebuilt from the checkpoint's config exactly as training made
    it (same split seed and fraction, or its val_path). Samples of a given source whose label is not one
    of the checkpoint's classes are skipped and listed in Evaluation.skipped. source names the file of an
    already loaded checkpoint in errors. cam_dir: also write a class activation map (cam_method) of each
    hardest sample there, for the class the model predicted (see write_cams).
    """
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    model, cfg, class_names, pre = restore_model(ckpt, source or (None if isinstance(checkpoint, dict) else checkpoint))
    task = ckpt.get("task") or cfg.data.task
    eval_tf = build_transforms(pre, cfg.data.augment, train=False, keep_aspect=cfg.data.keep_aspect)

    if data is None:
        if cfg.data.kind == "webdataset":
            from engine.webdataset_data import refuse_stream

            refuse_stream(cfg, "Evaluating the run's validation set (sample by sample, with its names)")
        prepared = prepare_data(cfg, pre)
        if prepared.class_names != class_names:
            raise DataError(
                f"{cfg.data.path}: the data now has the classes {prepared.class_names}, but the model "
                f"was trained on {class_names}; its validation split cannot be rebuilt "
                "(evaluate on a given folder with --data)"
            )
        if prepared.val is None or len(prepared.val) == 0:
            raise DataError(
                "the checkpoint's run had no validation set (data.val_fraction = 0 and no "
                "data.val_path); give the data to evaluate (--data)"
            )
        dataset = prepared.val
        skipped = prepared.val_source.skipped if prepared.val_source is not None else []
        where = (
            f"validation set {prepared.val_source.path}"
            if prepared.val_source is not None
            else f"validation split of {prepared.source.path}"
        )
    else:
        scanned = scan_source(Path(data).expanduser().resolve(), task=task, class_names=class_names)
        dataset = subset_dataset(scanned, range(len(scanned)), eval_tf)
        skipped = scanned.skipped
        where = str(scanned.path)
    description = f"{where} ({len(dataset)} samples" + (f", {len(skipped)} skipped)" if skipped else ")")

    if isinstance(dataset, ImageFileDataset):
        dataset.on_error = "drop"  # an image that no longer decodes is left out and reported, not stood in for
    dev = pick_device(device)
    # A plain sequential loader rather than the training one: every sample exactly once, in order (also
    # under torchrun), so sample_names line up with the outputs.
    plan = plan_loader(cfg.loader, cached=False, augmented=False, device_type=dev.type)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=SequentialSampler(dataset),
        num_workers=plan.workers,
        collate_fn=ReportingCollate(get_collate(cfg.loader.collate)),
        pin_memory=plan.pin_memory,
    )
    result = evaluate_model(
        model,
        loader,
        task=task,
        class_names=class_names,
        sample_names=sample_names(dataset),
        device=dev,
        top_n=top_n,
        stop_event=stop_event,
        progress=progress,
    )
    if result is not None:
        result.data = description
        result.skipped = [{"path": s.path, "reason": s.reason} for s in skipped]
        if result.unreadable:
            from engine.scan_cache import record_failures

            origin = getattr(dataset, "origin", "")
            if origin:  # the next scan lists them as skipped
                record_failures(Path(origin), [(u["path"], u["reason"]) for u in result.unreadable], when="evaluation")
        if cam_dir is not None and result.task != "classification":
            result.cam_note = f"no maps written: class activation maps are made for classification, not {task}"
        elif cam_dir is not None:
            from engine.cam import CamUnavailable

            try:
                result.cams = write_cams(
                    model,
                    dataset,
                    result.hardest,
                    Path(cam_dir),
                    pre=pre,
                    keep_aspect=cfg.data.keep_aspect,
                    class_names=class_names,
                    method=cam_method,
                    stop_event=stop_event,
                )
            except CamUnavailable as exc:
                result.cam_note = f"no maps written: {exc}"
    return result


def original_pixels(dataset: EngineDataset, index: int) -> np.ndarray:
    """A sample's image as stored (H x W x 3 uint8), before any resizing: what a map is laid over."""
    if isinstance(dataset, ImageFileDataset):
        return np.asarray(load_image(dataset.files[index]), dtype=np.uint8)
    if isinstance(dataset, ArrayDataset):
        row = dataset.array[index if dataset.rows is None else dataset.rows[index]]
        chw = array_to_tensor(row).clamp(0, 1)
        return np.rint(chw.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    raise TypeError(f"no stored image for a {type(dataset).__name__}")


def write_cams(
    model: torch.nn.Module,
    dataset: EngineDataset,
    samples: Sequence[dict],
    out_dir: Path,
    *,
    pre: Preprocess,
    keep_aspect: bool,
    class_names: Sequence[str],
    method: str = "gradcam",
    stop_event: threading.Event | None = None,
) -> list[dict]:
    """For each sample ({"index", "path", "predicted"}, as in Evaluation.hardest): the map of its predicted class
    as NNN-<stem>.npy (float32, the image's height x width, in [0, 1]) and NNN-<stem>.png (the overlay), NNN its
    rank. Returns the rows Evaluation.cams lists. Raises CamUnavailable when the model has no spatial layer.
    """
    from PIL import Image

    from engine.cam import activation_maps, map_to_image, overlay

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for rank, sample in enumerate(samples, start=1):
        if stop_event is not None and stop_event.is_set():
            break
        index = int(sample["index"])
        x = dataset[index][0]
        result = activation_maps(model, x, class_index=list(class_names).index(sample["predicted"]), method=method)
        pixels = original_pixels(dataset, index)
        cam = map_to_image(result.maps[0], pixels.shape[:2], pre, keep_aspect=keep_aspect)
        stem = f"{rank:03d}-{Path(str(sample['path'])).stem.replace(' ', '_')}"
        np.save(out_dir / f"{stem}.npy", cam.astype(np.float32))
        Image.fromarray(overlay(pixels, cam)).save(out_dir / f"{stem}.png")
        rows.append(
            {
                "path": sample["path"],
                "class": sample["predicted"],
                "method": method,
                "layer": result.layer,
                "overlay": str(out_dir / f"{stem}.png"),
                "map": str(out_dir / f"{stem}.npy"),
            }
        )
    return rows
