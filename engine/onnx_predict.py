"""Classify images with an exported ONNX model, using only onnxruntime, Pillow and numpy.

Model Workbench writes this file as predict.py next to every ONNX export; it needs nothing from Model
Workbench (no PyTorch). It reads the preprocessing from the export's sidecar (MODEL.onnx.json):

    python predict.py photo.jpg                   # the only .onnx in this folder
    python predict.py photos/ --model best.int8.onnx --top 3
    python predict.py photos/ --json > predictions.json

Each image gets one line: its path, then the answer (classification: the top classes and their
probabilities; multilabel: every label with probability >= 0.5; regression: each output's value),
tab-separated. A folder is searched recursively for image files, in sorted order.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
BATCH = 32


class PredictError(Exception):
    """Bad input: the message names the file or option and what is wrong."""


def load_rgb(path: Path) -> Image.Image:
    """The image decoded as RGB and turned upright by its EXIF orientation (16-bit greys scaled, not clipped)."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(img).astype(np.float32) / 257.0
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    elif img.mode == "F":  # no fixed range: stretch what is there, as the app does
        values = np.nan_to_num(np.asarray(img, dtype=np.float32))
        lo, hi = float(values.min()), float(values.max())
        if lo < 0.0 or hi > 1.0:
            values = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
        img = Image.fromarray(np.rint(values * 255).astype(np.uint8))
    elif img.mode in ("P", "PA"):
        img = img.convert("RGBA") if img.mode == "PA" or "transparency" in img.info else img
    return img.convert("RGB")


def _resized_size(width: int, height: int, size: int, keep_aspect: bool) -> tuple[int, int]:
    """(width, height) after the resize: the shorter side to size (the longer one with keep_aspect), as torchvision."""
    if keep_aspect:
        long_side = max(width, height)
        if width >= height:
            return size, max(1, int(size * height / long_side))
        return max(1, int(size * width / long_side)), size
    short_side = min(width, height)
    if width <= height:
        return size, int(size * height / short_side)
    return int(size * width / short_side), size


def _resize(img: Image.Image, width: int, height: int, interpolation: str) -> np.ndarray:
    if interpolation == "nearest":
        # torchvision's nearest: source index floor(i * in / out), not Pillow's pixel centres.
        pixels = np.asarray(img)
        rows = np.minimum((np.arange(height) * (pixels.shape[0] / height)).astype(np.int64), pixels.shape[0] - 1)
        cols = np.minimum((np.arange(width) * (pixels.shape[1] / width)).astype(np.int64), pixels.shape[1] - 1)
        return pixels[rows][:, cols]
    if interpolation not in _RESAMPLE:
        raise PredictError(f"the sidecar's interpolation {interpolation!r} is not bilinear, bicubic or nearest")
    # Antialiased like torchvision's Resize(antialias=True); values agree to within one grey level.
    return np.asarray(img.resize((width, height), _RESAMPLE[interpolation]))


def _centre_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision's CenterCrop: zero-pad an image smaller than the crop, then cut the middle."""
    h, w = pixels.shape[:2]
    if h < height or w < width:
        top, left = max(0, (height - h) // 2), max(0, (width - w) // 2)
        padded = np.zeros((max(h, height), max(w, width), pixels.shape[2]), dtype=pixels.dtype)
        padded[top : top + h, left : left + w] = pixels
        pixels, (h, w) = padded, padded.shape[:2]
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return pixels[top : top + height, left : left + width]


def preprocess(img: Image.Image, meta: dict[str, Any]) -> np.ndarray:
    """One RGB image as the model's float32 CHW input, following the sidecar (resize, crop, scale, normalise)."""
    _, height, width = meta["input_size"]
    keep_aspect = bool(meta.get("keep_aspect"))
    new_w, new_h = _resized_size(img.width, img.height, int(meta["resize_size"]), keep_aspect)
    pixels = _resize(img, new_w, new_h, meta.get("interpolation", "bilinear"))
    if not keep_aspect:
        pixels = _centre_crop(pixels, height, width)
    mean = np.asarray(meta["mean"], dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(meta["std"], dtype=np.float32).reshape(3, 1, 1)
    x = (pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0) - mean) / std
    if keep_aspect:  # the pad collate's zero padding at the bottom and right, after normalising
        out = np.zeros((3, height, width), dtype=np.float32)
        out[:, : x.shape[1], : x.shape[2]] = x[:, :height, :width]
        x = out
    return np.ascontiguousarray(x, dtype=np.float32)


def answer(logits: np.ndarray, meta: dict[str, Any], top: int) -> list[tuple[str, float]]:
    """(name, value) pairs for one image: the top classes, the labels at or above 0.5, or the raw outputs."""
    names = list(meta["class_names"])
    postprocess = meta.get("output", {}).get("postprocess", "softmax")
    values = logits.astype(np.float64)
    if postprocess == "softmax":
        e = np.exp(values - values.max())
        probs = e / e.sum()
        order = np.argsort(-probs, kind="stable")[:top]
        return [(names[i], float(probs[i])) for i in order]
    if postprocess == "sigmoid":
        probs = 1.0 / (1.0 + np.exp(-values))
        return [(names[i], float(probs[i])) for i in np.flatnonzero(probs >= 0.5)]
    return [(name, float(v)) for name, v in zip(names, values, strict=True)]


def find_model(folder: Path) -> Path:
    models = sorted(p for p in folder.glob("*.onnx") if p.with_name(p.name + ".json").is_file())
    if len(models) == 1:
        return models[0]
    if not models:
        raise PredictError(f"no exported .onnx model with its .json sidecar in {folder}; pass --model")
    raise PredictError(
        f"{len(models)} models in {folder} ({', '.join(p.name for p in models)}); choose one with --model"
    )


def image_files(target: Path) -> list[Path]:
    if target.is_dir():
        return sorted(p for p in target.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if target.is_file():
        return [target]
    raise PredictError(f"{target}: no such file or folder")


def _batches(paths: Sequence[Path], meta: dict[str, Any]) -> Iterator[tuple[list[Path], np.ndarray | None, str]]:
    """(paths, input batch, "") for images that decode; ([path], None, reason) for one that does not."""
    done: list[Path] = []
    inputs: list[np.ndarray] = []
    for path in paths:
        try:
            x = preprocess(load_rgb(path), meta)
        except (OSError, ValueError) as exc:  # Pillow's UnidentifiedImageError is an OSError
            yield [path], None, f"cannot read image: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}"
            continue
        done.append(path)
        inputs.append(x)
        if len(inputs) == BATCH:
            yield done, np.stack(inputs), ""
            done, inputs = [], []
    if inputs:
        yield done, np.stack(inputs), ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Classify images with an exported ONNX model (onnxruntime).")
    parser.add_argument("images", help="an image file, or a folder searched recursively for images")
    parser.add_argument("--model", help="the .onnx file (default: the only one next to this script)")
    parser.add_argument("--top", type=int, default=1, help="classes to show per image (classification; default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of tab-separated lines")
    args = parser.parse_args(argv)
    try:
        if args.top < 1:
            raise PredictError(f"--top {args.top}: must be 1 or more")
        model = Path(args.model) if args.model else find_model(Path(__file__).resolve().parent)
        sidecar = model.with_name(model.name + ".json")
        if not model.is_file():
            raise PredictError(f"--model {model}: no such file")
        if not sidecar.is_file():
            raise PredictError(f"{sidecar} is missing: it holds the preprocessing and class names of {model.name}")
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        paths = image_files(Path(args.images))
        if not paths:
            raise PredictError(f"{args.images}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    except (PredictError, ValueError) as exc:
        print(f"predict.py: {exc}", file=sys.stderr)
        return 2

    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    input_name = meta.get("input", {}).get("name", "input")
    output_name = meta.get("output", {}).get("name", "logits")
    results: list[dict[str, Any]] = []
    failed = 0
    for batch_paths, x, problem in _batches(paths, meta):
        if x is None:
            failed += 1
            print(f"{batch_paths[0]}: {problem}", file=sys.stderr)
            continue
        logits = np.asarray(session.run([output_name], {input_name: x})[0])
        for path, row in zip(batch_paths, logits, strict=True):
            pairs = answer(row, meta, args.top)
            if args.json:
                results.append({"path": str(path), "answer": [{"name": n, "value": v} for n, v in pairs]})
            else:
                print("\t".join([str(path)] + [f"{n}\t{v:.4f}" for n, v in pairs]), flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
