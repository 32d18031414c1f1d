"""Class activation maps (Grad-CAM and variants, through the grad-cam library): where in an image a model looked.

The target layer is found by probing the model once: the last module, in execution order, whose output is a
spatial feature map (a convolutional N x C x H x W map, a channels-last N x H x W x C one, or a transformer's
tokens on a square grid) and whose gradient with respect to the chosen output is not zero there. That is
ResNet's layer4, EfficientNet's last block or head convolution, ConvNeXt's last stage; for a ViT it is the
input of the last block's attention, since everything after the attention works on each token alone and only
the class token reaches the head. The model is left as it was found: weights, gradients, requires_grad flags
and training mode.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.transforms import Preprocess

METHODS = ("gradcam", "gradcam++", "layercam")
METHOD_LABELS = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "layercam": "LayerCAM"}
_MAX_PREFIX_TOKENS = 8  # class, distillation and register tokens ahead of a ViT's patch tokens


class CamUnavailable(ValueError):
    """A map cannot be made for this model or layer; the message says why in plain words."""


@dataclass(frozen=True)
class TargetLayer:
    """A module whose output is a spatial map, and how to read it as N x C x H x W."""

    name: str  # the module's name in model.named_modules()
    layout: str  # "nchw", "nhwc" or "tokens"
    prefix_tokens: int = 0  # tokens: how many come before the patch grid
    grid: tuple[int, int] = (0, 0)  # the map's height and width at the probed input size

    def reshape_transform(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if self.layout == "nchw":
            return None
        if self.layout == "nhwc":
            return lambda t: t.permute(0, 3, 1, 2)
        k = self.prefix_tokens

        def tokens_to_map(t: torch.Tensor) -> torch.Tensor:
            patches = t[:, k:, :]
            side = math.isqrt(patches.shape[1])
            return patches.reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)

        return tokens_to_map


@dataclass
class CamResult:
    """Maps for a batch: each float32 in [0, 1] at the model's input size, for the class it was made for."""

    maps: np.ndarray  # (N, H, W)
    class_index: list[int]
    probabilities: np.ndarray  # (N, classes): softmax of the model's outputs
    layer: str
    method: str


def _spatial_layout(shape: Sequence[int]) -> tuple[str, tuple[int, int], int] | None:
    """(layout, (h, w), prefix tokens) when an output of this shape is a map of a square input, else None."""
    if len(shape) == 4:
        _, a, b, c = shape
        # A square input gives a (near) square map: that tells channels-first from channels-last, and keeps out
        # 4-D tensors that are no map at all (a transformer's heads x tokens x width).
        if abs(b - c) <= 1 and b * c > 1 and a != b:
            return "nchw", (b, c), 0
        if abs(a - b) <= 1 and a * b > 1 and c != b:
            return "nhwc", (a, b), 0
        return None
    if len(shape) == 3:
        tokens = shape[1]
        side = math.isqrt(tokens)
        if side > 1 and tokens - side * side <= _MAX_PREFIX_TOKENS:
            return "tokens", (side, side), tokens - side * side
    return None


def _probe(model: nn.Module, size: int, class_index: int | None = None) -> list[tuple[str, TargetLayer, bool, int]]:
    """Every module output that is a spatial map, in execution order: (name, layer, has gradient, width)."""
    found: list[tuple[str, TargetLayer, torch.Tensor, int]] = []
    handles = []

    def hook(name: str) -> Callable[..., None]:
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            layout = _spatial_layout(tuple(output.shape))
            if layout is None:
                return
            kind, grid, prefix = layout
            output.retain_grad()
            width = output.shape[3] if kind == "nhwc" else output.shape[2] if kind == "tokens" else output.shape[1]
            found.append((name, TargetLayer(name, kind, prefix, grid), output, int(width)))

        return record

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook(name)))
    try:
        device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, 3, size, size, generator=gen).to(device).requires_grad_(True)
        out = model(x)
        logits = out.reshape(1, -1)
        target = int(logits.argmax()) if class_index is None else class_index
        logits[0, target].backward()
    finally:
        for h in handles:
            h.remove()
    rows = []
    for name, layer, output, width in found:
        grad = output.grad
        if grad is None:
            has = False
        elif layer.layout == "tokens":
            has = bool(grad[:, layer.prefix_tokens :].abs().sum() > 0)
        else:
            has = bool(grad.abs().sum() > 0)
        rows.append((name, layer, has, width))
    return rows


@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Whatever a map's backward pass does to the model is undone: gradients, requires_grad and training mode."""
    params = list(model.parameters())
    grads = [p.grad for p in params]
    flags = [p.requires_grad for p in params]
    training = [m.training for m in model.modules()]
    for p in params:
        p.grad = None  # a backward pass here makes new tensors rather than adding into the stored ones
    try:
        yield
    finally:
        for p, g, f in zip(params, grads, flags, strict=True):
            p.grad = g
            p.requires_grad_(f)
        for m, t in zip(model.modules(), training, strict=True):
            m.train(t)


_layer_cache: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, str | None], TargetLayer]] = (
    weakref.WeakKeyDictionary()
)
_cache_lock = threading.Lock()


def _plain(model: nn.Module) -> nn.Module:
    # A DataParallel / DDP wrapper or a compiled module: probe the model inside, whose names the layer tree shows.
    inner = getattr(model, "_orig_mod", model)
    return getattr(inner, "module", inner)


def target_layer(model: nn.Module, input_size: int, layer: str | None = None) -> TargetLayer:
    """The layer maps are taken from: `layer` (a name from model.named_modules()) or the automatic choice.

    Raises CamUnavailable when the model (or the named layer) has no spatial feature map to read.
    """
    model = _plain(model)
    key = (int(input_size), layer)
    with _cache_lock:
        cached = _layer_cache.get(model, {}).get(key)
    if cached is not None:
        return cached
    names = dict(model.named_modules())
    if layer is not None and layer not in names:
        raise CamUnavailable(f"the model has no layer named {layer!r}")
    with untouched(model), torch.enable_grad():
        model.eval()
        rows = _probe(model, int(input_size))
    if layer is not None:
        hits = [r for r in rows if r[0] == layer]
        if not hits:
            raise CamUnavailable(
                f"layer {layer!r} does not give a spatial feature map at {input_size} px input "
                "(pick a convolutional block, a stage or a transformer block's norm)"
            )
        chosen = hits[-1][1]
    else:
        useful = [r for r in rows if r[2]]
        # Tokens: keep the model's own embedding width (that of its last token output), so a block's qkv
        # projection (three widths) is not taken.
        widths = [r[3] for r in rows if r[1].layout == "tokens"]
        if widths:
            useful = [r for r in useful if r[1].layout != "tokens" or r[3] == widths[-1]]
        if not useful:
            raise CamUnavailable(
                f"no layer of this {type(model).__name__} gives a spatial feature map at {input_size} px input "
                "that the prediction depends on, so class activation maps are not available for this model"
            )
        chosen = useful[-1][1]
    with _cache_lock:
        _layer_cache.setdefault(model, {})[key] = chosen
    return chosen


def spatial_layers(model: nn.Module, input_size: int) -> list[str]:
    """Names of the layers a map can be taken from at this input size, in execution order (for a layer picker)."""
    model = _plain(model)
    with untouched(model), torch.enable_grad():
        model.eval()
        rows = _probe(model, int(input_size))
    seen: dict[str, None] = {}
    for name, _layer, has, _width in rows:
        if has:
            seen.setdefault(name)
    return list(seen)


def _method(name: str) -> Any:
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM

    classes = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "layercam": LayerCAM}
    if name not in classes:
        raise ValueError(f"CAM method {name!r}: must be one of {', '.join(METHODS)}")
    return classes[name]


def activation_maps(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    class_index: int | Sequence[int] | None = None,
    method: str = "gradcam",
    layer: str | None = None,
) -> CamResult:
    """Maps for a batch of preprocessed images (N x 3 x S x S, as the evaluation transform makes them).

    class_index: the class each map explains (one for all, one per image, or None for the predicted class).
    Works on frozen models: the input asks for gradients, so they reach the target layer through any frozen
    part; the model's own state is restored afterwards (see untouched).
    """
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam_class = _method(method)
    plain = _plain(model)
    if inputs.ndim == 3:
        inputs = inputs.unsqueeze(0)
    n = inputs.shape[0]
    chosen = target_layer(plain, int(inputs.shape[-1]), layer)
    module = dict(plain.named_modules())[chosen.name]
    device = next(plain.parameters()).device
    x = inputs.detach().to(device).float().requires_grad_(True)
    with untouched(plain), torch.enable_grad():
        cam = cam_class(plain, [module], reshape_transform=chosen.reshape_transform())
        try:
            if class_index is None:
                targets = None  # the library takes each image's top output: no extra forward pass here
            else:
                wanted = [int(class_index)] * n if isinstance(class_index, int) else [int(i) for i in class_index]
                if len(wanted) != n:
                    raise ValueError(f"{len(wanted)} classes for {n} images")
                if min(wanted) < 0:
                    raise ValueError(f"class index {min(wanted)} is negative")
                targets = [ClassifierOutputTarget(c) for c in wanted]
            try:
                maps = cam(x, targets)
            except IndexError:
                raise ValueError(f"class index {class_index} is out of range for this model's outputs") from None
            logits = cam.outputs.detach().float().reshape(n, -1)
        finally:
            cam.activations_and_grads.release()
    classes = [int(i) for i in logits.argmax(dim=1)] if class_index is None else wanted
    maps = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0)
    return CamResult(
        maps=np.clip(maps, 0.0, 1.0),
        class_index=classes,
        probabilities=torch.softmax(logits, dim=1).cpu().numpy().astype(np.float64),
        layer=chosen.name,
        method=method,
    )


def map_to_image(cam: np.ndarray, image_size: tuple[int, int], pre: Preprocess, *, keep_aspect: bool) -> np.ndarray:
    """A map at the model's input size laid back over the original image: float32 (height, width) in [0, 1].

    The evaluation transform resizes the shorter side to pre.resize_size and takes a centre crop of
    pre.crop_size (or, keeping the aspect, scales the longer side and crops nothing); outside the crop the
    model saw nothing, so the map is 0 there.
    """
    height, width = int(image_size[0]), int(image_size[1])
    t = torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32))[None, None]
    if keep_aspect:
        out = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        return out.clamp(0, 1).numpy().astype(np.float32)
    scale = pre.resize_size / max(min(height, width), 1)
    side = max(int(round(pre.crop_size / scale)), 1)  # the crop's side in original pixels
    big = F.interpolate(t, size=(side, side), mode="bilinear", align_corners=False)[0, 0]
    out = torch.zeros(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + side, height), min(left + side, width)
    out[y0:y1, x0:x1] = big[y0 - top : y1 - top, x0 - left : x1 - left]
    return out.clamp(0, 1).numpy().astype(np.float32)


def overlay(pixels: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image (H x W x 3 uint8) with the map (H x W in [0, 1]) laid over it in the jet colour map."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    if cam.shape != pixels.shape[:2]:
        t = torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32))[None, None]
        cam = F.interpolate(t, size=pixels.shape[:2], mode="bilinear", align_corners=False)[0, 0].numpy()
    rgb = pixels[..., :3].astype(np.float32) / 255.0
    return np.asarray(show_cam_on_image(rgb, np.clip(cam, 0, 1), use_rgb=True, image_weight=1.0 - alpha))
