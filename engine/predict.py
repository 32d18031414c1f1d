"""Predicting one image with a trained checkpoint, preprocessed exactly as evaluation preprocesses its data."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from engine.checkpoints import CheckpointError, load_checkpoint
from engine.data import DataError, array_to_image, load_image, to_rgb
from engine.restore import restore_model
from engine.transforms import Preprocess, build_transforms

ImageInput = str | os.PathLike | Image.Image | np.ndarray


def read_image(image: ImageInput) -> Image.Image | torch.Tensor:
    """The image as the evaluation datasets hand it to their transform: PIL RGB for files, a tensor for arrays.

    Raises DataError naming the file and what is wrong when it cannot be decoded.
    """
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise DataError(f"an image array has shape {image.shape}; expected (H, W) or (H, W, C) with C 1, 3 or 4")
        return array_to_image(image)  # as ArrayDataset serves a .npz row
    if isinstance(image, Image.Image):
        # The conversion load_image applies to a file, so an image already in memory is read the same way.
        return to_rgb(ImageOps.exif_transpose(image))
    path = Path(os.path.expanduser(str(image)))
    try:
        if path.is_dir():
            raise DataError(f"{path} is a folder, not an image file")
        if path.is_file() and path.stat().st_size == 0:
            raise DataError(f"cannot read image {path}: empty file (0 bytes)")
        return load_image(path)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"cannot read image {path}: no such file") from None
    except UnidentifiedImageError:
        raise DataError(f"cannot read image {path}: not an image, or a format Pillow cannot read") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the file is unusable
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot read image {path}: {reason}") from None


class Predictor:
    """A restored model with its class names and evaluation preprocessing; predict() scores one image."""

    def __init__(
        self,
        model: torch.nn.Module,
        class_names: Sequence[str],
        task: str,
        transform: Callable,
        *,
        device: str | torch.device = "cpu",
        info: dict[str, Any] | None = None,
        pre: Preprocess | None = None,
        keep_aspect: bool = False,
    ):
        self.pre = pre  # the evaluation preprocessing: lays a class activation map back over the image
        self.keep_aspect = keep_aspect
        # One caller at a time: a map's backward pass hooks the model, which a prediction on another thread
        # must not run through.
        self._lock = threading.Lock()
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.class_names = list(class_names)
        self.task = task
        self.transform = transform
        self.info = dict(info or {})

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Predictor:
        """Load a Model Workbench checkpoint; raises CheckpointError saying why when it cannot be used."""
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - torch.load's unpickler raises KeyError and more on some junk files
            raise CheckpointError(
                f"checkpoint {path} is damaged or not a PyTorch file: {type(exc).__name__}: {exc}"
            ) from None
        try:
            model, cfg, class_names, pre = restore_model(ckpt, path)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - a config or model the checkpoint describes but this build cannot make
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"checkpoint {path}: its model cannot be rebuilt: {reason}") from None
        task = ckpt.get("task") or cfg.data.task
        # The transform evaluate_checkpoint builds, so a prediction here equals evaluation's for the same image.
        transform = build_transforms(pre, cfg.data.augment, train=False, keep_aspect=cfg.data.keep_aspect)
        epoch = ckpt.get("epoch")
        info = {
            "checkpoint": str(Path(path).resolve()),
            "backbone": cfg.model.backbone,
            "task": task,
            "epoch": int(epoch) if isinstance(epoch, (int, float)) else None,
            "image_size": pre.crop_size,
            "num_classes": len(class_names),
        }
        return cls(
            model,
            class_names,
            task,
            transform,
            device=device,
            info=info,
            pre=pre,
            keep_aspect=cfg.data.keep_aspect,
        )

    def scores(self, image: ImageInput) -> np.ndarray:
        """Per output: softmax probability (classification), sigmoid probability (multilabel) or raw value."""
        x = self.transform(read_image(image))
        with self._lock, torch.inference_mode():
            out = self.model(x.unsqueeze(0).to(self.device)).float().reshape(-1).cpu()
        if self.task == "classification":
            out = torch.softmax(out, dim=0)
        elif self.task == "multilabel":
            out = torch.sigmoid(out)
        return out.numpy().astype(np.float64)

    def activation_map(
        self,
        image: ImageInput,
        *,
        class_name: str | None = None,
        method: str = "gradcam",
        layer: str | None = None,
    ) -> dict[str, Any]:
        """A class activation map of one image for class_name (None: the predicted class), as plain values:
        {"map": float32 (height, width) in [0, 1] over the image as stored, "pixels": its RGB uint8 pixels,
        "class", "layer", "method", "probabilities": [(class, p), ...] most likely first}.

        Raises engine.cam.CamUnavailable when the model (or the layer) has no spatial feature map.
        """
        from engine.cam import activation_maps, map_to_image

        if self.pre is None:
            raise ValueError("this predictor was made without its preprocessing; load it with from_checkpoint")
        decoded = read_image(image)
        if isinstance(decoded, Image.Image):
            pixels = np.asarray(decoded.convert("RGB"), dtype=np.uint8)
        else:  # an array row as a CHW tensor, uint8 or float in [0, 1]
            chw = decoded.float() / 255.0 if decoded.dtype == torch.uint8 else decoded.float().clamp(0, 1)
            pixels = np.rint(chw.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        if class_name is not None and class_name not in self.class_names:
            raise ValueError(f"class {class_name!r} is not one of the model's classes {self.class_names}")
        index = None if class_name is None else self.class_names.index(class_name)
        with self._lock:
            result = activation_maps(self.model, self.transform(decoded), class_index=index, method=method, layer=layer)
        probs = result.probabilities[0]
        order = np.argsort(-probs, kind="stable")
        return {
            "map": map_to_image(result.maps[0], pixels.shape[:2], self.pre, keep_aspect=self.keep_aspect),
            "pixels": pixels,
            "class": self.class_names[result.class_index[0]],
            "layer": result.layer,
            "method": result.method,
            "probabilities": [(self.class_names[i], float(probs[i])) for i in order],
        }

    def spatial_layers(self) -> list[str]:
        """The layers a map can be taken from, in execution order (see engine.cam.spatial_layers)."""
        from engine.cam import spatial_layers

        size = self.pre.crop_size if self.pre is not None else int(self.info.get("image_size") or 224)
        with self._lock:
            return spatial_layers(self.model, size)

    def predict(self, image: ImageInput) -> list[tuple[str, float]]:
        """(class name, probability) pairs, most likely first; for regression (output name, value) in output order.

        image: an image file's path, a PIL image, or an (H, W[, C]) array as stored in a .npz.
        """
        values = self.scores(image)
        pairs = [(name, float(v)) for name, v in zip(self.class_names, values, strict=True)]
        if self.task == "regression":
            return pairs
        order = np.argsort(-values, kind="stable")  # ties keep the class order
        return [pairs[i] for i in order]
