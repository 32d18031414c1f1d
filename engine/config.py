"""The project file: typed dataclasses for a whole run, read from and written to JSON, validated once."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

SCHEMA_VERSION = 1

TASKS = ("classification", "multilabel", "regression")
DATA_KINDS = ("auto", "folder", "csv", "npz")
SAMPLERS = ("sequential", "random", "subset_random", "weighted_random", "distributed")
COLLATES = ("default", "pad")
DECODED_CACHE_MODES = ("auto", "on", "off")
LOSSES = ("cross_entropy", "mse", "bce_with_logits", "nll", "l1", "smooth_l1")
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("none", "step", "cosine", "onecycle", "plateau")
FREEZE_PRESETS = ("none", "head_only", "up_to")
DEVICES = ("auto", "cpu", "cuda", "mps")
MONITORS = ("val_loss", "val_accuracy", "train_loss", "train_accuracy")
MONITOR_MODES = ("auto", "min", "max")
PRECISIONS = ("fp32", "fp16", "bf16")
DIST_BACKENDS = ("auto", "nccl", "gloo")
FEATURE_CACHE_MODES = ("auto", "off")


class ConfigError(ValueError):
    """One or more fields of a project are invalid; each problem names the field, the value and what is allowed."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            text = f"invalid project{where}: {self.problems[0]}"
        else:
            text = f"invalid project{where} ({len(self.problems)} problems):\n" + "\n".join(
                f"  - {p}" for p in self.problems
            )
        super().__init__(text)


@dataclass
class AugmentConfig:
    horizontal_flip: bool = False
    rotation: float = 0.0  # maximum degrees either way; 0 turns it off
    random_resized_crop: bool = False
    color_jitter: float = 0.0  # brightness/contrast/saturation strength; 0 turns it off


@dataclass
class DataConfig:
    path: str = ""
    kind: str = "auto"  # auto: a folder is an image folder, .csv a CSV, .npz a NumPy archive
    task: str = "classification"
    val_path: str | None = None  # a separate validation source of the same kind; else a split
    val_fraction: float = 0.2
    split_seed: int = 0
    image_size: int = 224  # used when the weights do not bring their own preprocessing
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    keep_aspect: bool = False  # resize the longer side only and zero-pad batches (loader.collate "pad")
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    weights: str | None = None  # None: random init; "DEFAULT" or a weight enum member such as "IMAGENET1K_V1"
    weights_file: str | None = None  # a local .pt/.pth/.safetensors state dict loaded after the head is replaced
    freeze: str = "none"  # a preset: none, head_only, up_to
    freeze_up_to: str | None = None  # module name for the "up_to" preset (that module is frozen too)
    freeze_prefixes: list[str] = field(default_factory=list)  # frozen in addition to the preset
    unfreeze_prefixes: list[str] = field(default_factory=list)  # trainable whatever the above says
    train_frozen_batchnorm: bool = False  # False: frozen BatchNorm layers stay in eval mode


@dataclass
class SamplerConfig:
    name: str = "random"
    replacement: bool | None = None  # None: PyTorch's default (random: False, weighted_random: True)
    num_samples: int | None = None
    indices: list[int] | None = None  # subset_random: positions in the training set; default all
    weights: str | list[float] | None = None  # weighted_random: one per training sample, or "balanced"
    shuffle: bool = True  # distributed
    seed: int = 0  # distributed
    num_replicas: int | None = None  # distributed; default the world size
    rank: int | None = None  # distributed; default this process's rank


@dataclass
class LoaderConfig:
    batch_size: int = 32
    # DataLoader worker processes; None: auto (0 when the decoded-image cache serves un-augmented data or
    # train.deterministic asks for an exact resume; else, training on a GPU, one per usable CPU but one, and
    # training on the CPU a quarter of the CPUs; at most 8)
    num_workers: int | None = None
    persistent_workers: bool | None = None  # keep workers between epochs; None: on when there are workers
    pin_memory: bool | None = None  # None: on when training on CUDA
    # Decode and resize every image once and keep the uint8 result in memory: "auto" (when it fits the
    # bound), "on" (also said when it does not fit) or "off". With random_resized_crop the cache keeps the
    # image presized (shorter side at the resize size) and the random crops come from that presized image.
    decoded_cache: str = "auto"
    decoded_cache_max_mb: int | None = None  # the cache's memory bound in MiB; None: a quarter of free memory
    drop_last: bool = False
    shuffle: bool | None = None  # DataLoader's flag; cannot be combined with a sampler other than its own
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    collate: str = "default"


@dataclass
class LossConfig:
    name: str = "cross_entropy"
    label_smoothing: float = 0.0
    class_weights: str | list[float] | None = None  # cross_entropy / nll: per class, or "balanced"
    beta: float = 1.0  # smooth_l1


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float | None = None  # sgd (default 0.9), rmsprop (default 0)
    nesterov: bool = False  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw
    eps: float = 1e-8
    alpha: float = 0.99  # rmsprop
    backbone_lr_mult: float = 1.0  # the backbone's lr is lr * this; the new head uses lr


@dataclass
class ScheduleConfig:
    name: str = "none"
    step_size: int = 10  # step
    gamma: float = 0.1  # step
    eta_min: float = 0.0  # cosine
    max_lr: float | None = None  # onecycle; default optimizer.lr
    pct_start: float = 0.3  # onecycle
    patience: int = 2  # plateau
    factor: float = 0.1  # plateau


@dataclass
class TrainConfig:
    epochs: int = 10
    device: str = "auto"
    seed: int = 0
    deterministic: bool = False
    precision: str = "fp32"  # mixed precision on CUDA: fp16 or bf16
    grad_clip_norm: float | None = None
    # auto: when the frozen layers are the start of the forward pass and nothing is augmented, compute their
    # output once per sample and train the rest on it (engine/feature_cache.py); off: always recompute.
    feature_cache: str = "auto"
    feature_cache_max_mb: int | None = None  # memory bound of the cached features in MiB; None: half the free RAM
    # Channels-last (NHWC) memory format for the model and its 4-D inputs: faster convolutions on CUDA tensor
    # cores. None (auto): on for CUDA when the model has 2-D convolutions, off elsewhere.
    channels_last: bool | None = None
    compile: bool = False  # torch.compile the training forward; falls back to eager if compiling fails


@dataclass
class DistributedConfig:
    """Training in several processes with DistributedDataParallel (engine/distributed.py)."""

    # Processes on this machine: above 1, `main.py train` and the app start the run through torchrun. A run
    # launched by torchrun itself takes its process count from torchrun and ignores this.
    processes: int = 1
    backend: str = "auto"  # auto: nccl when every process has a GPU, else gloo
    sync_batchnorm: bool = False  # BatchNorm statistics computed over every process's batch (GPUs only)
    timeout_s: int = 300  # a process that waits this long for the others ends the run with an error


@dataclass
class CheckpointConfig:
    every_epoch: bool = True  # keep epoch-NNN.pt files (last.pt and best.pt are always written)
    keep_last: int = 3  # epoch files kept, newest first; 0 keeps them all
    monitor: str = "val_loss"  # what "best" means
    mode: str = "auto"  # auto: max for accuracies, min for losses


@dataclass
class EarlyStoppingConfig:
    enabled: bool = False
    monitor: str = "val_loss"
    mode: str = "auto"
    patience: int = 5  # epochs without an improvement larger than min_delta before stopping
    min_delta: float = 0.0
    restore_best: bool = False  # end with the best epoch's weights rather than the last epoch's


@dataclass
class OutputConfig:
    dir: str = "runs"  # run folders are created inside, relative to the project file
    run_name: str | None = None  # default: the project's name and a timestamp
    tensorboard: bool = True  # TensorBoard event files in RUN/tensorboard


@dataclass
class ProjectConfig:
    name: str = "untitled"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    schema_version: int = SCHEMA_VERSION
    # Folder that relative paths are resolved against (the project file's folder); not saved.
    base_dir: str = field(default=".", metadata={"saved": False})

    def resolve(self, path: str | os.PathLike | None) -> Path | None:
        """A path from the project, made absolute against the project file's folder."""
        if path is None or path == "":
            return None
        p = Path(os.path.expanduser(str(path)))
        return p if p.is_absolute() else (Path(self.base_dir) / p).resolve()

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    def copy(self) -> ProjectConfig:
        clone = from_dict(self.to_dict(), check_paths=False, check_catalog=False)
        clone.base_dir = self.base_dir
        return clone


# ---------------------------------------------------------------------------------------------
# Reading: JSON -> dataclasses, with type checks that name the field


def _to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {
            f.name: _to_dict(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if f.metadata.get("saved", True)
        }
    if isinstance(obj, list):
        return [_to_dict(v) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_type_name(inner)}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Value from JSON checked against a field's annotation; problems are appended, not raised."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            out = _convert(value, arg, where, trial)
            if not trial:
                return out
        problems.append(f"{where} = {value!r}: expected {_type_name(tp)}")
        return None
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{where} = {value!r}: expected {_type_name(tp)}")
            return []
        return [_convert(v, inner, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a class, not an instance
        if not isinstance(value, dict):
            problems.append(f"{where} = {value!r}: expected an object with the keys "
                            f"{', '.join(f.name for f in _saved_fields(tp))}")
            return tp()
        return _build(tp, value, where, problems)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
            return float(value)  # JSON has no NaN literal; the range checks below refuse it by name
    elif tp is str:
        if isinstance(value, str):
            return value
    problems.append(f"{where} = {value!r}: expected {_type_name(tp)}")
    return None


def _saved_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("saved", True)]


def _build(cls: type, data: dict, where: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in _saved_fields(cls)}
    unknown = sorted(set(data) - set(fields))
    for key in unknown:
        problems.append(f"{where + '.' if where else ''}{key}: unknown key (allowed: {', '.join(fields)})")
    kwargs = {}
    for name in fields:
        if name in data:
            path = f"{where}.{name}" if where else name
            before = len(problems)
            value = _convert(data[name], hints[name], path, problems)
            if len(problems) == before:
                kwargs[name] = value
    return cls(**kwargs)


def from_dict(data: Any, *, base_dir: str | os.PathLike = ".", source: str | None = None,
              check_paths: bool = True, check_catalog: bool = True) -> ProjectConfig:
    """Build and validate a project from a JSON-shaped dict. Raises ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError([f"the project file must hold a JSON object, not {type(data).__name__}"], source)
    version = data.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConfigError([f"schema_version = {version!r}: expected a positive integer"], source)
    if version > SCHEMA_VERSION:
        raise ConfigError([f"schema_version = {version}: this project was written by a newer Model Workbench "
                           f"(this one reads schema versions up to {SCHEMA_VERSION}); update the app to open it"],
                          source)
    problems: list[str] = []
    cfg = _build(ProjectConfig, data, "", problems)
    cfg.base_dir = str(base_dir)
    if not problems:
        problems.extend(validate(cfg, check_paths=check_paths, check_catalog=check_catalog))
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_project(path: str | os.PathLike, *, check_paths: bool = True, check_catalog: bool = True) -> ProjectConfig:
    """Read a project file; relative paths in it are taken from the file's folder."""
    p = Path(path)
    if not p.exists():
        raise ConfigError([f"project file {str(p)!r} does not exist"])
    if p.is_dir():
        raise ConfigError([f"project file {str(p)!r} is a folder; expected a .json file"])
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"project file {str(p)!r} cannot be read: {exc}"]) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError([f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"], str(p)) from None
    return from_dict(data, base_dir=p.resolve().parent, source=str(p), check_paths=check_paths,
                     check_catalog=check_catalog)


def save_project(cfg: ProjectConfig, path: str | os.PathLike) -> None:
    """Write the project as JSON (atomically, so a crash never leaves half a file)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(cfg.to_dict(), fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)


# ---------------------------------------------------------------------------------------------
# Validation: value ranges and names, once, here


def _choice(problems: list[str], where: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        problems.append(f"{where} = {value!r}: unknown; allowed: {', '.join(allowed)}")


def _number(problems: list[str], where: str, value: float | int | None, *, low: float | None = None,
            high: float | None = None, low_open: bool = False, high_open: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        problems.append(f"{where} = {value}: must be a finite number")
        return
    lo_bad = low is not None and (value <= low if low_open else value < low)
    hi_bad = high is not None and (value >= high if high_open else value > high)
    if lo_bad or hi_bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        problems.append(f"{where} = {value!r}: must be {' and '.join(s for s in (lo, hi) if s)}")


def _path_exists(problems: list[str], cfg: ProjectConfig, where: str, value: str | None, *,
                 required: bool) -> None:
    if not value:
        if required:
            problems.append(f"{where} is empty: give the dataset's path (an image folder, a .csv or a .npz)")
        return
    resolved = cfg.resolve(value)
    assert resolved is not None  # value is not empty
    if not resolved.exists():
        problems.append(f"{where} = {value!r}: no such file or folder ({resolved})")


def validate(cfg: ProjectConfig, *, check_paths: bool = True, check_catalog: bool = True) -> list[str]:
    """Every range, name and combination rule of a project; returns the problems found.

    check_catalog=False leaves out what needs the backbone catalog (the backbone's name, its weights, a ViT's
    patch size): the catalog imports PyTorch, torchvision and timm, which the app loads after its window shows.
    """
    p: list[str] = []
    d = cfg.data
    _choice(p, "data.kind", d.kind, DATA_KINDS)
    _choice(p, "data.task", d.task, TASKS)
    _number(p, "data.val_fraction", d.val_fraction, low=0.0, high=1.0, high_open=True)
    _number(p, "data.image_size", d.image_size, low=8, high=4096)
    for name, values in (("data.mean", d.mean), ("data.std", d.std)):
        if len(values) not in (1, 3):
            p.append(f"{name} = {values!r}: give 1 or 3 values (one per RGB channel)")
        for i, v in enumerate(values):
            _number(p, f"{name}[{i}]", v, low=0.0 if name == "data.mean" else 0.0,
                    low_open=name == "data.std")
    a = d.augment
    _number(p, "data.augment.rotation", a.rotation, low=0.0, high=180.0)
    _number(p, "data.augment.color_jitter", a.color_jitter, low=0.0, high=1.0)
    if check_paths:
        _path_exists(p, cfg, "data.path", d.path, required=True)
        _path_exists(p, cfg, "data.val_path", d.val_path, required=False)
        _path_exists(p, cfg, "model.weights_file", cfg.model.weights_file, required=False)
    if d.kind == "folder" and d.task != "classification":
        p.append(f"data.task = {d.task!r}: an image folder labels by sub-folder, so only 'classification' "
                 "is possible; use a CSV or .npz for multilabel or regression")

    m = cfg.model
    if check_catalog:
        from engine.backbones import backbone_problems, list_backbones, vit_patch_size  # the catalog's knowledge

        p.extend(backbone_problems(m.backbone, m.weights))
        patch = vit_patch_size(m.backbone) if m.backbone in list_backbones() else None
        if patch and m.weights is None and d.image_size % patch:
            p.append(f"data.image_size = {d.image_size}: {m.backbone} cuts images into {patch}x{patch} patches, "
                     f"so the size must be a multiple of {patch} (such as "
                     f"{max(patch, d.image_size // patch * patch)})")
    _choice(p, "model.freeze", m.freeze, FREEZE_PRESETS)
    if m.freeze_up_to and m.freeze != "up_to":
        p.append(f"model.freeze_up_to = {m.freeze_up_to!r} is only used with model.freeze = 'up_to' "
                 f"(now {m.freeze!r}); set both or remove freeze_up_to")
    if d.keep_aspect and d.augment.random_resized_crop:
        p.append("data.augment.random_resized_crop = true crops to a square, which data.keep_aspect = true "
                 "is there to avoid; turn one of them off")
    if m.freeze == "up_to" and not m.freeze_up_to:
        p.append("model.freeze_up_to is empty: the 'up_to' preset needs a module name such as 'layer3'")
    if m.weights and m.weights_file:
        p.append("model.weights and model.weights_file are both set: choose the catalog's weights or a file")

    lo = cfg.loader
    _number(p, "loader.batch_size", lo.batch_size, low=1)
    _number(p, "loader.num_workers", lo.num_workers, low=0, high=256)
    if lo.persistent_workers and lo.num_workers == 0:
        p.append("loader.persistent_workers = true needs worker processes, but loader.num_workers = 0; "
                 "set num_workers above 0 or to null (auto), or persistent_workers to null")
    _choice(p, "loader.decoded_cache", lo.decoded_cache, DECODED_CACHE_MODES)
    _number(p, "loader.decoded_cache_max_mb", lo.decoded_cache_max_mb, low=1)
    _choice(p, "loader.collate", lo.collate, COLLATES)
    if d.keep_aspect and lo.collate != "pad":
        p.append("data.keep_aspect = true needs loader.collate = 'pad' (images of different sizes are padded)")
    s = lo.sampler
    _choice(p, "loader.sampler.name", s.name, SAMPLERS)
    if lo.shuffle is not None and s.name not in ("random", "sequential"):
        p.append(f"loader.shuffle = {lo.shuffle!r} cannot be combined with loader.sampler.name = {s.name!r} "
                 "(PyTorch's DataLoader refuses shuffle together with a sampler); remove loader.shuffle")
    if lo.shuffle is True and s.name == "sequential":
        p.append("loader.shuffle = true contradicts loader.sampler.name = 'sequential'; "
                 "use sampler 'random' to shuffle")
    if s.num_samples is not None:
        _number(p, "loader.sampler.num_samples", s.num_samples, low=1)
        if s.name not in ("random", "weighted_random"):
            p.append(f"loader.sampler.num_samples is only used by the 'random' and 'weighted_random' samplers, "
                     f"not {s.name!r}")
    if s.indices is not None:
        if s.name != "subset_random":
            p.append(f"loader.sampler.indices is only used by the 'subset_random' sampler, not {s.name!r}")
        elif not s.indices:
            p.append("loader.sampler.indices = []: give at least one training-set position")
        elif min(s.indices) < 0:
            p.append(f"loader.sampler.indices: {min(s.indices)} is negative; positions start at 0")
    if s.weights is not None:
        if s.name != "weighted_random":
            p.append(f"loader.sampler.weights is only used by the 'weighted_random' sampler, not {s.name!r}")
        elif isinstance(s.weights, str) and s.weights != "balanced":
            p.append(f"loader.sampler.weights = {s.weights!r}: give 'balanced' or a list of one weight per sample")
        elif isinstance(s.weights, list):
            bad = [w for w in s.weights if not math.isfinite(w) or w < 0]
            if bad:
                p.append(f"loader.sampler.weights: {bad[0]!r} is not a finite, non-negative weight")
            elif not any(w > 0 for w in s.weights):
                p.append("loader.sampler.weights: every weight is 0, so no sample could be drawn")
    elif s.name == "weighted_random":
        p.append("loader.sampler.weights is empty: the 'weighted_random' sampler needs 'balanced' "
                 "or one weight per training sample")
    if s.name == "weighted_random" and isinstance(s.weights, str) and d.task != "classification":
        p.append("loader.sampler.weights = 'balanced' needs class labels (data.task = 'classification')")
    if s.num_replicas is not None:
        _number(p, "loader.sampler.num_replicas", s.num_replicas, low=1)
    if s.rank is not None:
        _number(p, "loader.sampler.rank", s.rank, low=0)
        if s.num_replicas is not None and s.rank >= s.num_replicas:
            p.append(f"loader.sampler.rank = {s.rank}: must be below num_replicas ({s.num_replicas})")

    lf = cfg.loss
    _choice(p, "loss.name", lf.name, LOSSES)
    _number(p, "loss.label_smoothing", lf.label_smoothing, low=0.0, high=1.0, high_open=True)
    _number(p, "loss.beta", lf.beta, low=0.0, low_open=True)
    if lf.label_smoothing and lf.name != "cross_entropy":
        p.append(f"loss.label_smoothing is only used by 'cross_entropy', not {lf.name!r}")
    if lf.class_weights is not None:
        if lf.name not in ("cross_entropy", "nll"):
            p.append(f"loss.class_weights is only used by 'cross_entropy' and 'nll', not {lf.name!r}")
        if isinstance(lf.class_weights, str) and lf.class_weights != "balanced":
            p.append(f"loss.class_weights = {lf.class_weights!r}: give 'balanced' or one weight per class")
        if isinstance(lf.class_weights, list):
            for i, w in enumerate(lf.class_weights):
                _number(p, f"loss.class_weights[{i}]", w, low=0.0)
    task_losses = {"classification": ("cross_entropy", "mse", "bce_with_logits", "nll", "l1", "smooth_l1"),
                   "multilabel": ("bce_with_logits", "mse", "l1", "smooth_l1"),
                   "regression": ("mse", "l1", "smooth_l1")}
    if d.task in task_losses and lf.name in LOSSES and lf.name not in task_losses[d.task]:
        p.append(f"loss.name = {lf.name!r} does not fit data.task = {d.task!r}; "
                 f"allowed: {', '.join(task_losses[d.task])}")

    o = cfg.optimizer
    _choice(p, "optimizer.name", o.name, OPTIMIZERS)
    _number(p, "optimizer.lr", o.lr, low=0.0, low_open=True)
    _number(p, "optimizer.weight_decay", o.weight_decay, low=0.0)
    _number(p, "optimizer.momentum", o.momentum, low=0.0, high=1.0, high_open=True)
    _number(p, "optimizer.eps", o.eps, low=0.0, low_open=True)
    _number(p, "optimizer.alpha", o.alpha, low=0.0, high=1.0, high_open=True)
    _number(p, "optimizer.backbone_lr_mult", o.backbone_lr_mult, low=0.0)
    if len(o.betas) != 2:
        p.append(f"optimizer.betas = {o.betas!r}: give two values, such as [0.9, 0.999]")
    for i, b in enumerate(o.betas):
        _number(p, f"optimizer.betas[{i}]", b, low=0.0, high=1.0, high_open=True)
    if o.nesterov and o.name == "sgd" and o.momentum == 0:
        p.append("optimizer.nesterov = true needs optimizer.momentum > 0")

    sc = cfg.schedule
    _choice(p, "schedule.name", sc.name, SCHEDULES)
    _number(p, "schedule.step_size", sc.step_size, low=1)
    _number(p, "schedule.gamma", sc.gamma, low=0.0, low_open=True)
    _number(p, "schedule.eta_min", sc.eta_min, low=0.0)
    _number(p, "schedule.max_lr", sc.max_lr, low=0.0, low_open=True)
    _number(p, "schedule.pct_start", sc.pct_start, low=0.0, high=1.0, low_open=True, high_open=True)
    _number(p, "schedule.patience", sc.patience, low=0)
    _number(p, "schedule.factor", sc.factor, low=0.0, high=1.0, low_open=True, high_open=True)

    t = cfg.train
    _number(p, "train.epochs", t.epochs, low=1)
    _choice(p, "train.device", t.device, DEVICES)
    _number(p, "train.seed", t.seed, low=0, high=2**32 - 1)
    _choice(p, "train.precision", t.precision, PRECISIONS)
    _number(p, "train.grad_clip_norm", t.grad_clip_norm, low=0.0, low_open=True)
    _choice(p, "train.feature_cache", t.feature_cache, FEATURE_CACHE_MODES)
    _number(p, "train.feature_cache_max_mb", t.feature_cache_max_mb, low=1)
    if t.channels_last is not None and not isinstance(t.channels_last, bool):
        p.append(f"train.channels_last = {t.channels_last!r}: expected true, false or null (auto: on for CUDA "
                 "with a convolutional model)")
    if not isinstance(t.compile, bool):
        p.append(f"train.compile = {t.compile!r}: expected true or false")

    dd = cfg.distributed
    _number(p, "distributed.processes", dd.processes, low=1, high=1024)
    _choice(p, "distributed.backend", dd.backend, DIST_BACKENDS)
    if not isinstance(dd.sync_batchnorm, bool):
        p.append(f"distributed.sync_batchnorm = {dd.sync_batchnorm!r}: expected true or false")
    _number(p, "distributed.timeout_s", dd.timeout_s, low=10)

    c = cfg.checkpoint
    _number(p, "checkpoint.keep_last", c.keep_last, low=0)
    _choice(p, "checkpoint.monitor", c.monitor, MONITORS)
    _choice(p, "checkpoint.mode", c.mode, MONITOR_MODES)
    e = cfg.early_stopping
    _choice(p, "early_stopping.monitor", e.monitor, MONITORS)
    _choice(p, "early_stopping.mode", e.mode, MONITOR_MODES)
    _number(p, "early_stopping.patience", e.patience, low=1)
    _number(p, "early_stopping.min_delta", e.min_delta, low=0.0)
    for where, monitor in (("checkpoint.monitor", c.monitor), ("early_stopping.monitor", e.monitor)):
        if monitor.endswith("accuracy") and d.task == "regression":
            p.append(f"{where} = {monitor!r}: a regression has no accuracy; use 'val_loss' or 'train_loss'")

    if not cfg.output.dir:
        p.append("output.dir is empty: give a folder for run folders, such as 'runs'")
    if cfg.output.run_name is not None and (not cfg.output.run_name or
                                            any(c in cfg.output.run_name for c in "/\\:")):
        p.append(f"output.run_name = {cfg.output.run_name!r}: must be a non-empty name without / \\ or :")
    return p
