"""The torchvision model catalog: building a backbone, its pretrained or file weights, its new head and its preprocessing."""
from __future__ import annotations

import difflib
import functools
import os
import pickle
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import Tensor, nn

from engine.config import DataConfig, ModelConfig
from engine.transforms import Preprocess

# A backbone the user will recognise, shown when the name they typed is unknown.
_EXAMPLES = ("resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "vit_b_16")
# Checkpoint layouts that wrap the state dict: ours and PyTorch's recipe, Lightning and others, timm/DeiT.
_WRAPPER_KEYS = ("model_state_dict", "state_dict", "model")
# Families whose builders take aux_logits / init_weights (they warn, or build unused aux heads, otherwise).
_AUX_FAMILIES = ("googlenet", "inception_v3")
_CONNECT_TIMEOUT_S = 10


class WeightsError(RuntimeError):
    """Pretrained weights are unavailable or do not fit; the message says which and what to do instead."""


# ---------------------------------------------------------------------------------------------
# The catalog


@functools.lru_cache(maxsize=1)
def _catalog() -> tuple[str, ...]:
    # module= keeps to image classification (no detection, segmentation, video, quantized models).
    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def list_backbones() -> list[str]:
    """Names of the torchvision classification models, sorted."""
    return list(_catalog())


def _weights_enum(backbone: str):
    try:
        return torchvision.models.get_model_weights(backbone)
    except (ValueError, KeyError):
        return None


def weight_names(backbone: str) -> list[str]:
    """The pretrained weights a backbone offers: "DEFAULT" first, then the enum members."""
    enum = _weights_enum(backbone)
    if enum is None:
        return []
    # Iterating an Enum skips aliases, so DEFAULT (an alias of the best member) is added by hand.
    return ["DEFAULT"] + [w.name for w in enum]


def _close(word: str, options: list[str]) -> list[str]:
    return difflib.get_close_matches(word, options, n=3, cutoff=0.6)


def backbone_problems(backbone: str, weights: str | None) -> list[str]:
    """Config validation for model.backbone and model.weights; an empty list when both are known."""
    names = list_backbones()
    if backbone not in names:
        close = _close(backbone, names)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        examples = ", ".join(e for e in _EXAMPLES if e in names)
        return [f"model.backbone = {backbone!r}: unknown; {hint}allowed: one of the {len(names)} "
                f"torchvision classification models (e.g. {examples})"]
    if weights is None:
        return []
    allowed = weight_names(backbone)
    if weights not in allowed:
        close = _close(weights, allowed) or [a for a in allowed if a.lower() == str(weights).lower()]
        hint = f"; did you mean {close[0]}?" if close else ""
        return [f"model.weights = {weights!r}: not a weight of {backbone}; allowed: {', '.join(allowed)} "
                f"or null for random init{hint}"]
    return []


def _weight(backbone: str, weights: str):
    return _weights_enum(backbone)[weights]


def _cache_path(weight) -> Path:
    # The same place torch.hub.load_state_dict_from_url looks; read each time so TORCH_HOME is honoured.
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(weight.url).path)


def weights_status(backbone: str, weights: str | None) -> str:
    """"none" (random init), "cached" (in the torch hub cache) or "download" (needs the network). Never downloads."""
    if weights is None:
        return "none"
    return "cached" if _cache_path(_weight(backbone, weights)).is_file() else "download"


def preprocess_for(model_cfg: ModelConfig, data_cfg: DataConfig) -> Preprocess:
    """What the model expects of its input: the weights' own recipe, else the project's settings."""
    if model_cfg.weights is not None:
        t = _weight(model_cfg.backbone, model_cfg.weights).transforms()
        crop = int(t.crop_size[0])
        # Keeping aspect means no crop: the longer side goes to the size the weights were trained at.
        resize = crop if data_cfg.keep_aspect else int(t.resize_size[0])
        return Preprocess(resize_size=resize, crop_size=crop, mean=tuple(float(v) for v in t.mean),
                          std=tuple(float(v) for v in t.std), interpolation=t.interpolation.value)
    mean = list(data_cfg.mean) * 3 if len(data_cfg.mean) == 1 else list(data_cfg.mean)
    std = list(data_cfg.std) * 3 if len(data_cfg.std) == 1 else list(data_cfg.std)
    return Preprocess(resize_size=data_cfg.image_size, crop_size=data_cfg.image_size,
                      mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
                      interpolation="bilinear")


# ---------------------------------------------------------------------------------------------
# Weight files


@dataclass
class LoadReport:
    """How a weights file fitted a model."""

    loaded: int
    missing: list[str] = field(default_factory=list)  # in the model, not in the file: left as built
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model: ignored
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, file shape, model shape)

    @property
    def total(self) -> int:
        """Tensors the model has (loaded + missing + shape-mismatched)."""
        return self.loaded + len(self.missing) + len(self.mismatched)

    def summary(self) -> str:
        def some(names: list[str]) -> str:
            return ", ".join(names[:5]) + (f", ... ({len(names) - 5} more)" if len(names) > 5 else "")

        def shape(s: tuple) -> str:
            return "x".join(str(d) for d in s) or "scalar"

        parts = [f"loaded {self.loaded} of {self.total} tensors"]
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} of another shape, kept as built: " + some(
                [f"{k} (file {shape(f)}, model {shape(m)})" for k, f, m in self.mismatched]))
        if self.missing:
            parts.append(f"{len(self.missing)} not in the file, kept as built: {some(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} in the file but not in the model, ignored: "
                         f"{some(self.unexpected)}")
        return "; ".join(parts)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from .safetensors or a torch file (read with weights_only=True, never arbitrary pickles)."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file {str(p)!r} does not exist")
    if p.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            data = load_file(str(p), device="cpu")
        except Exception as exc:  # SafetensorError is not importable under a stable name
            raise WeightsError(f"weights file {p.name} is truncated or not a safetensors file ({exc})") from None
    else:
        try:
            data = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "weights only" in str(exc).lower():
                raise WeightsError(
                    f"refusing to load {p.name}: it holds Python objects beyond tensors (a pickle that could "
                    "run code); export it as a state dict (torch.save(model.state_dict(), ...)) or safetensors"
                ) from None
            raise WeightsError(f"weights file {p.name} is corrupt or not a PyTorch file ({exc})") from None
        except Exception as exc:  # zip, EOF and key errors all mean a damaged or foreign file
            first = str(exc).split(".")[0].strip() or type(exc).__name__
            raise WeightsError(f"weights file {p.name} is truncated, corrupt or not a PyTorch file ({first})") from None
    for key in _WRAPPER_KEYS:
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict):
        raise WeightsError(f"weights file {p.name} holds a {type(data).__name__}, not a state dict "
                           "(a mapping of names to tensors)")
    bad = [k for k, v in data.items() if not isinstance(v, Tensor)]
    if bad:
        raise WeightsError(f"weights file {p.name} is not a plain state dict: {len(bad)} entries are not tensors "
                           f"(e.g. {bad[0]!r}); save model.state_dict() instead")
    # DistributedDataParallel saves every key under "module."; strip it only when all keys have it.
    if data and all(k.startswith("module.") for k in data):
        data = {k[len("module."):]: v for k, v in data.items()}
    return data


def load_weights_file(model: nn.Module, path: str | os.PathLike, backbone: str | None = None) -> LoadReport:
    """Load the tensors of a file that fit the model (same name and shape) and report the rest."""
    p = Path(path)
    incoming = load_state_dict_file(p)
    own = model.state_dict()
    fit, mismatched = {}, []
    for key, tensor in incoming.items():
        if key in own:
            if tuple(tensor.shape) == tuple(own[key].shape):
                fit[key] = tensor
            else:
                mismatched.append((key, tuple(tensor.shape), tuple(own[key].shape)))
    if not fit:
        what = backbone or type(model).__name__
        raise WeightsError(f"{p.name} does not fit {what}: none of its {len(incoming)} tensors match; "
                           "is it for another architecture?")
    model.load_state_dict(fit, strict=False)
    mismatched_keys = {k for k, _, _ in mismatched}
    return LoadReport(
        loaded=len(fit),
        missing=[k for k in own if k not in fit and k not in mismatched_keys],
        unexpected=[k for k in incoming if k not in own],
        mismatched=mismatched,
    )


# ---------------------------------------------------------------------------------------------
# Building


@dataclass
class BuiltModel:
    model: nn.Module
    head_name: str  # dotted module name of the new head (for freezing and parameter groups)
    weights_desc: str  # for the log: where the weights came from
    report: LoadReport | None = None  # set when a weights file was loaded


def replace_head(model: nn.Module, num_outputs: int) -> str:
    """Swap the classifier head for a fresh one with num_outputs; returns its dotted module name."""
    # The last nn.Linear in registration order is the output layer for every torchvision classifier
    # (fc, classifier[-1], heads.head, head, classifier; checked against all of list_backbones()).
    # Only SqueezeNet has no Linear: its head is the 1x1 Conv2d in `classifier`, followed by ReLU and pooling.
    name, old = None, None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name, old = n, m
    if old is None:
        for n, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                name, old = n, m
    if old is None:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv2d layer to use as a classifier head")
    kw = {"bias": old.bias is not None, "device": old.weight.device, "dtype": old.weight.dtype}
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_outputs, **kw)
    else:
        new = nn.Conv2d(old.in_channels, num_outputs, kernel_size=old.kernel_size, stride=old.stride,
                        padding=old.padding, **kw)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)
    return name


def _ensure_downloaded(backbone: str, weights: str, weight) -> None:
    cache = _cache_path(weight)
    advice = "Train from random init (model.weights: null), or import a weights file (model.weights_file)"
    try:
        # A short HEAD first: offline, this fails in seconds instead of hanging in the download.
        with urllib.request.urlopen(urllib.request.Request(weight.url, method="HEAD"),
                                    timeout=_CONNECT_TIMEOUT_S):
            pass
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise WeightsError(f"pretrained weights {backbone} {weights} are not in the cache ({cache}) and cannot "
                           f"be downloaded ({reason}). {advice}") from None
    try:
        weight.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:
        raise WeightsError(f"pretrained weights {backbone} {weights} could not be downloaded to {cache} ({exc}). "
                           f"{advice}") from None


def vit_patch_size(backbone: str) -> int | None:
    """The patch size of a torchvision ViT (vit_b_16 -> 16), None for other families."""
    if backbone.startswith("vit_"):
        return int(backbone.rsplit("_", 1)[1])
    return None


def build_model(model_cfg: ModelConfig, num_outputs: int, *,
                resolve: Callable[[str], Path] = lambda p: Path(p), image_size: int | None = None) -> BuiltModel:
    """The backbone with its pretrained or file weights and a new head for num_outputs.

    image_size matters only for a random-init ViT, whose position embeddings are sized for it.
    """
    name = model_cfg.backbone
    kwargs: dict = {}
    if model_cfg.weights is None and image_size is not None and vit_patch_size(name):
        kwargs["image_size"] = image_size
    weight = None
    if model_cfg.weights is not None:
        weight = _weight(name, model_cfg.weights)
        status = weights_status(name, model_cfg.weights)
        if status == "download":
            _ensure_downloaded(name, weight.name, weight)
        kwargs["weights"] = weight
        # With weights, torchvision forces aux_logits/init_weights itself (passing them raises) and drops
        # googlenet's aux heads after loading; inception's are dropped below.
    elif name in _AUX_FAMILIES:
        kwargs.update(aux_logits=False, init_weights=True)
    try:
        model = torchvision.models.get_model(name, **kwargs)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
        if weight is None:
            raise
        raise WeightsError(f"pretrained weights {name} {weight.name} in the cache ({_cache_path(weight)}) cannot "
                           f"be read ({str(exc).splitlines()[0]}); delete the file to download it again, "
                           "or train from random init (model.weights: null)") from None
    if getattr(model, "AuxLogits", None) is not None:
        # The aux classifier only matters for the original ImageNet recipe; dropping it keeps the output a tensor.
        model.aux_logits = False
        model.AuxLogits = None
    head_name = replace_head(model, num_outputs)
    if weight is not None:
        desc = f"ImageNet weights {weight.name} ({'downloaded' if status == 'download' else 'cached'})"
    else:
        desc = "random init"
    report = None
    if model_cfg.weights_file:
        path = resolve(model_cfg.weights_file)
        report = load_weights_file(model, path, backbone=name)
        desc = f"file {Path(path).name} ({report.loaded} of {report.total} tensors)"
    return BuiltModel(model=model, head_name=head_name, weights_desc=desc, report=report)
