"""The project file: every setting declared once (pydantic models), read from and written to JSON, validated once."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from engine.settings import (
    Applies,
    Finite,
    Number,
    bounds,
    fields,
    get_path,
    is_model,
    meta,
    range_text,
    replace_between,
    setting,
    table,
    type_name,
    unwrap,
)

SCHEMA_VERSION = 1

Task = Literal["classification", "multilabel", "regression"]
TASKS: tuple[str, ...] = get_args(Task)
DataKind = Literal["auto", "folder", "csv", "npz", "webdataset"]
DATA_KINDS: tuple[str, ...] = get_args(DataKind)
SamplerName = Literal["sequential", "random", "subset_random", "weighted_random", "distributed"]
SAMPLERS: tuple[str, ...] = get_args(SamplerName)
CollateName = Literal["default", "pad"]
COLLATES: tuple[str, ...] = get_args(CollateName)
DecodedCacheMode = Literal["auto", "on", "off"]
DECODED_CACHE_MODES: tuple[str, ...] = get_args(DecodedCacheMode)
DecodedCacheDisk = Literal["auto", "on", "off"]
DECODED_CACHE_DISK_MODES: tuple[str, ...] = get_args(DecodedCacheDisk)
LossName = Literal["cross_entropy", "mse", "bce_with_logits", "nll", "l1", "smooth_l1"]
LOSSES: tuple[str, ...] = get_args(LossName)
OptimizerName = Literal["sgd", "adam", "adamw", "rmsprop"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
ScheduleName = Literal["none", "step", "cosine", "onecycle", "plateau"]
SCHEDULES: tuple[str, ...] = get_args(ScheduleName)
FreezePreset = Literal["none", "head_only", "up_to"]
FREEZE_PRESETS: tuple[str, ...] = get_args(FreezePreset)
DeviceName = Literal["auto", "cpu", "cuda", "mps"]
DEVICES: tuple[str, ...] = get_args(DeviceName)
Monitor = Literal["val_loss", "val_accuracy", "train_loss", "train_accuracy"]
MONITORS: tuple[str, ...] = get_args(Monitor)
MonitorMode = Literal["auto", "min", "max"]
MONITOR_MODES: tuple[str, ...] = get_args(MonitorMode)
Precision = Literal["fp32", "fp16", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
DistBackend = Literal["auto", "nccl", "gloo"]
DIST_BACKENDS: tuple[str, ...] = get_args(DistBackend)
FeatureCacheMode = Literal["auto", "off"]
FEATURE_CACHE_MODES: tuple[str, ...] = get_args(FeatureCacheMode)

MONITOR_LABELS = {
    "val_loss": "validation loss",
    "val_accuracy": "validation accuracy",
    "train_loss": "training loss",
    "train_accuracy": "training accuracy",
}
MODE_LABELS = {"auto": "auto (higher accuracy, lower loss)", "min": "lower is better", "max": "higher is better"}
AUTO_ON_OFF = {None: "auto", True: "on", False: "off"}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a project: the field it is about (dotted, '' when none) and the sentence users read.

    The message names the field, the value and what is allowed; str() is the message.
    """

    path: str
    message: str

    def __str__(self) -> str:
        return self.message

    @classmethod
    def of(cls, message: str) -> Problem:
        """A problem from its sentence alone: the path is the field the sentence starts with, if it names one."""
        match = re.match(r"([a-z_]+(?:\.[a-z_]+)*)(?:\[\d+\])?(?: = |: | is )", message)
        top = match.group(1).split(".")[0] if match else ""
        return cls(match.group(1) if match and top in ProjectConfig.model_fields else "", message)


class ConfigError(ValueError):
    """One or more fields of a project are invalid; each problem names the field, the value and what is allowed."""

    def __init__(self, problems: Sequence[Problem | str], source: str | None = None):
        self.problems = [p if isinstance(p, Problem) else Problem.of(str(p)) for p in problems]
        self.source = source
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            text = f"invalid project{where}: {self.problems[0]}"
        else:
            text = f"invalid project{where} ({len(self.problems)} problems):\n" + "\n".join(
                f"  - {p}" for p in self.problems
            )
        super().__init__(text)


class Section(BaseModel):
    """A part of the project file: unknown keys refused, JSON types taken strictly (no "8" for 8)."""

    model_config = ConfigDict(strict=True, extra="forbid", validate_default=False)


NonNegative = Annotated[Finite, Field(ge=0)]
Positive = Annotated[Finite, Field(gt=0)]
Fraction = Annotated[Finite, Field(ge=0, lt=1)]
# Image size, mean and std give way to the preprocessing that pretrained weights were trained with.
BY_WEIGHTS = Applies("model.weights", (None,), hide=False, why="set by the chosen weights' own preprocessing")


class AugmentConfig(Section):
    horizontal_flip: bool = setting(
        False,
        group="input",
        label="Random horizontal flip",
        doc="random left-right flips",
        help="Mirror half of the training images left to right.",
    )
    rotation: Finite = setting(
        0.0,
        ge=0,
        le=180,
        group="input",
        label="Rotation",
        doc="maximum degrees either way; 0 turns it off",
        help="Rotate training images by a random angle up to this many degrees either way; 0 turns it off.",
        step=5.0,
        decimals=1,
        suffix="°",
        special="off",
    )
    random_resized_crop: bool = setting(
        False,
        group="input",
        label="Random resized crop",
        doc="random crops of random size and shape",
        help="Train on random crops of random size and shape, resized to the image size (not together with "
        "keeping the aspect ratio).",
    )
    color_jitter: Finite = setting(
        0.0,
        ge=0,
        le=1,
        group="input",
        label="Colour jitter",
        doc="brightness/contrast/saturation strength; 0 turns it off",
        help="Randomly change brightness, contrast and saturation by up to this share; 0 turns it off.",
        step=0.05,
        decimals=2,
        special="off",
    )


class DataConfig(Section):
    path: str = setting(
        "",
        doc="image folder, `.csv` or `.npz` (required); for `webdataset`, the tar shards: a brace pattern such as "
        "`shards/train-{000000..000009}.tar`, a space- or `::`-separated list, local paths or URLs",
    )
    kind: DataKind = setting(
        "auto",
        doc="`auto`: a folder is an image folder, .csv a CSV, .npz a NumPy archive; `webdataset`: tar shards "
        "streamed in order (`main.py shard` writes them), for datasets that do not fit on local disk",
    )
    task: Task = setting("classification", doc="what the labels are")
    val_path: str | None = setting(
        None, doc="a separate validation source of the same kind (shards: their own pattern); otherwise a split"
    )
    val_fraction: Finite = setting(
        0.2, ge=0, lt=1, doc="share of each class held out for validation (stratified), 0 for none"
    )
    split_seed: int = setting(0, doc="seed of the split")
    classes: list[str] = setting(
        default_factory=list,
        doc="`webdataset`: the class names in the order of the shards' `.cls` indices, when no `shards.json` "
        "(written by `main.py shard`) lies beside the shards; empty: from `shards.json`",
    )
    shuffle_buffer: int = setting(
        1000,
        ge=1,
        doc="`webdataset`: samples held in the shuffle buffer (shard order is shuffled too, from train.seed and "
        "the epoch); 1 reads each shard in order",
        applies=Applies("data.kind", ("webdataset",), why="only streamed shards are read through a shuffle buffer"),
    )
    image_size: int = setting(
        224,
        ge=8,
        le=4096,
        group="input",
        label="Image size",
        name="image_size",
        doc="resize/crop size when the weights bring no preprocessing",
        help="Images are resized and cropped to this many pixels a side when the weights bring no preprocessing "
        "of their own.",
        step=16,
        suffix=" px",
        applies=BY_WEIGHTS,
        effect="crop_size",
    )
    mean: list[NonNegative] = setting(
        default_factory=lambda: [0.485, 0.456, 0.406],
        group="input",
        label="Mean",
        doc="normalisation mean (1 or 3 values) when the weights bring none",
        help="Per-channel mean subtracted before the model (one value, or three for R, G, B); used when the "
        "weights bring no normalisation of their own.",
        applies=BY_WEIGHTS,
        effect="mean",
    )
    std: list[Positive] = setting(
        default_factory=lambda: [0.229, 0.224, 0.225],
        group="input",
        label="Std",
        doc="normalisation standard deviation (1 or 3 values) when the weights bring none",
        help="Per-channel standard deviation the images are divided by (one value, or three for R, G, B); "
        "used when the weights bring no normalisation of their own.",
        applies=BY_WEIGHTS,
        effect="std",
    )
    input_size: int | None = setting(
        None,
        ge=32,
        le=1024,
        group="input",
        label="Size with weights",
        doc="with pretrained weights: train, evaluate and export at this many pixels a side instead of the size "
        "the weights were trained at (null: theirs)",
        help="Pretrained weights come with the size they were trained at (224 px for most). A convolutional "
        "network takes any size: half the side is about a quarter of the compute, and small source images "
        "(scans, icons, 8x8 digits) lose little; photographs of scenes lose more the further below the "
        "weights' size. The resize keeps the weights' resize-to-crop ratio. "
        "Not for ViT-like models, whose position embeddings are sized for the weights' input.",
        special="the weights' own",
        step=16,
        low=17,  # the spin box's lowest value (16) stands for None, so its steps land on 32, 48, 64, ...
        suffix=" px",
        applies=Applies(
            "model.weights",
            (None,),
            negate=True,
            hide=False,
            why="without weights, Image size sets the size",
        ),
    )
    keep_aspect: bool = setting(
        False,
        group="input",
        label="Keep the aspect ratio (pad batches)",
        doc='resize the longer side only and zero-pad batches (needs `loader.collate: "pad"`)',
        help="Resize only the longer side so nothing is cropped or stretched; batches are then zero-padded, so "
        "the collate is switched to 'pad' along with it.",
        brings={"loader.collate": "pad"},
        note="Needs the 'pad' collate, which is chosen with it.",
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    exclude: list[str] = setting(
        default_factory=list,
        doc="images left out of training and validation, as paths relative to the dataset "
        "(`.npz` rows as `#12`); the files are never touched",
    )
    relabel: dict[str, str] = setting(
        default_factory=dict,
        doc="corrected labels: image path relative to the dataset -> class name (classification)",
    )


class ModelConfig(Section):
    backbone: str = setting(
        "resnet18",
        doc="any torchvision classification model, or `timm/NAME` for any of timm's (`main.py backbones` lists them)",
    )
    weights: str | None = setting(
        None,
        doc='`null` random init; torchvision: `"DEFAULT"` or an enum member such as `"IMAGENET1K_V1"` (from '
        'the torch hub cache; downloaded when online); timm: `"DEFAULT"` or a pretrained tag such as '
        '`"ra_in1k"` (from the Hugging Face cache; downloaded when online); `"BUNDLED"` for '
        "`timm/efficientnet_lite0`: ImageNet weights installed with the project, always offline",
    )
    weights_file: str | None = setting(
        None,
        doc="a local `.pt`/`.pth`/`.safetensors` state dict, loaded after the head is replaced; mismatches "
        "are reported",
    )
    freeze: FreezePreset = setting("none", doc="a freezing preset")
    freeze_up_to: str | None = setting(
        None,
        doc="this module and every one before it are frozen",
        applies=Applies("model.freeze", ("up_to",), enforce=True, why="set both or remove freeze_up_to"),
    )
    freeze_prefixes: list[str] = setting(
        default_factory=list,
        doc="module names frozen on top of the preset (`layer1` matches `layer1.0.conv1`, not `layer10`)",
    )
    unfreeze_prefixes: list[str] = setting(
        default_factory=list, doc="module names kept trainable whatever the above says"
    )
    train_frozen_batchnorm: bool = setting(
        False, doc="`false` keeps frozen BatchNorm layers in eval mode (running statistics untouched)"
    )


def _sampler(*names: str, enforce: bool = False) -> Applies:
    return Applies("loader.sampler.name", names, enforce=enforce)


class SamplerConfig(Section):
    name: SamplerName = setting(
        "random",
        group="sampler",
        label="Sampler",
        name="sampler",
        doc="which sampler draws the training samples; under torchrun each is split into per-process shares",
        help="Which samples each training epoch draws, and in what order.",
        choices={
            "sequential": "Sequential (dataset order)",
            "random": "Random (shuffled)",
            "subset_random": "Random subset (chosen positions)",
            "weighted_random": "Weighted random",
            "distributed": "Distributed (one share per process)",
        },
        hints={
            "sequential": "Every epoch reads the training set in the same order.",
            "random": "Every epoch draws the training set in a new random order.",
            "subset_random": "Every epoch draws only the listed training-set positions, in random order.",
            "weighted_random": "Samples are drawn in proportion to their weights, so rare classes can be drawn "
            "more often.",
            "distributed": "Each process trains on its own share of the data (also chosen automatically under "
            "torchrun).",
        },
    )
    replacement: bool | None = setting(
        None,
        group="sampler",
        label="Replacement",
        name="sampler_replacement",
        doc="draw with or without replacement; `null` is PyTorch's default (without for `random`, with for "
        "`weighted_random`)",
        help="With replacement a sample can be drawn more than once per epoch; the default is without for the "
        "random sampler and with for the weighted one.",
        choices={None: "default", True: "with replacement", False: "without replacement"},
        applies=_sampler("random", "weighted_random"),
    )
    num_samples: int | None = setting(
        None,
        ge=1,
        group="sampler",
        label="Samples per epoch",
        name="sampler_num_samples",
        doc="samples drawn per epoch; `null`: the training-set size",
        help="How many samples one epoch draws; the lowest setting draws as many as the training set holds.",
        special="all (the training-set size)",
        applies=_sampler("random", "weighted_random", enforce=True),
    )
    indices: list[int] | None = setting(
        None,
        group="sampler",
        label="Positions",
        name="sampler_indices",
        widget="positions",
        doc="training-set positions to draw from (default all)",
        help="Training-set positions (counted from 0) to draw from, as numbers and ranges such as '0-99, 200'; "
        "empty draws from all.",
        placeholder="all, or positions such as 0-99, 200",
        applies=_sampler("subset_random", enforce=True),
    )
    weights: str | list[Number] | None = setting(
        None,
        group="sampler",
        label="Weights",
        name="sampler_weights",
        widget="weights",
        doc='one weight per training sample, or `"balanced"` (rare classes drawn as often as common ones)',
        help="Balanced draws every class equally often; a list gives one weight per training sample.",
        choices={"balanced": "balanced (inverse class frequency)", "list": "from list"},
        placeholder="one weight per training sample: 1, 1, 0.5, …",
        note="One non-negative weight per training sample, in training-set order; larger weights are drawn more often.",
        special="type one weight per training sample in the box below, such as 1, 1, 0.5",
        applies=_sampler("weighted_random", enforce=True),
    )
    shuffle: bool = setting(
        True,
        group="sampler",
        label="Shuffle each share",
        name="sampler_shuffle",
        doc="shuffle each replica's share",
        applies=_sampler("distributed"),
        help="Shuffle the samples of every process's share each epoch.",
    )
    seed: int = setting(
        0,
        group="sampler",
        label="Shuffle seed",
        name="sampler_seed",
        widget="text",
        doc="seed of the distributed shuffle",
        applies=_sampler("distributed"),
        help="Seed of the distributed shuffle; every process must use the same one.",
    )
    num_replicas: int | None = setting(
        None,
        ge=1,
        group="sampler",
        label="Replicas",
        name="sampler_num_replicas",
        high=65536,
        doc="processes sharing the data; `null`: the world size (leave it so under torchrun)",
        help="How many processes share the data; the default is the number torchrun started.",
        special="world size (default)",
        applies=_sampler("distributed"),
    )
    rank: int | None = setting(
        None,
        ge=0,
        group="sampler",
        label="Rank",
        name="sampler_rank",
        high=65535,
        doc="this process's share; `null`: its rank (leave it so under torchrun)",
        help="Which share this process trains on, from 0; the default is the rank torchrun gave it.",
        special="this process's (default)",
        applies=_sampler("distributed"),
    )


class LoaderConfig(Section):
    batch_size: int = setting(
        32,
        ge=1,
        group="sampler",
        label="Batch size",
        high=1_000_000,
        doc="samples per batch",
        help="How many samples go through the model together before each optimizer step.",
    )
    num_workers: int | None = setting(
        None,
        ge=0,
        le=256,
        group="sampler",
        label="Workers",
        special="auto",
        doc="DataLoader worker processes; `null` chooses (see below), `0` loads in the training process",
        help="Processes that load and augment images in parallel; 0 loads them in the training process. Auto uses "
        "none when cached images need no augmentation; otherwise one per CPU but one when training on a GPU, "
        "a quarter of the CPUs when training on the CPU (at most 8).",
    )
    persistent_workers: bool | None = setting(
        None,
        group="sampler",
        label="Persistent",
        doc="keep workers between epochs; `null`: on when there are workers",
        help="Keep the worker processes alive from one epoch to the next instead of starting them again.",
        choices={None: "auto (on when there are workers)", True: "on", False: "off"},
    )
    pin_memory: bool | None = setting(
        None,
        group="sampler",
        label="Pin memory",
        doc="pinned host memory; `null`: on when training on CUDA",
        help="Page-locked host memory makes copies to a CUDA GPU faster; auto turns it on only for CUDA.",
        choices={None: "auto (on when training on CUDA)", True: "on", False: "off"},
    )
    decoded_cache: DecodedCacheMode = setting(
        "auto",
        group="sampler",
        label="Image cache",
        doc="keep decoded, resized images in memory (or on disk, see `loader.decoded_cache_disk`): `auto` (when "
        "they fit), `on` (also said when they do not), `off`",
        help="Decode and resize every image once and keep it in memory (or in a file on disk when it does not fit "
        "there), so each epoch runs only the random "
        "augmentation; with random resized crops, the crops come from the image presized to its shorter side.",
        choices={"auto": "auto (when it fits)", "on": "on", "off": "off"},
    )
    decoded_cache_max_mb: int | None = setting(
        None,
        ge=1,
        group="sampler",
        label="Cache limit",
        high=16_777_216,
        step=256,
        suffix=" MiB",
        special="auto (a quarter of free memory)",
        doc="the image cache's memory bound in MiB; `null`: a quarter of the memory available",
        help="The most memory the image cache may take; when the images would need more, they go to a "
        "memory-mapped file in the cache folder instead (Image cache on disk), or are decoded every epoch when "
        "that is off or the disk is full too (said in the run's log).",
    )
    decoded_cache_disk: DecodedCacheDisk = setting(
        "auto",
        group="sampler",
        label="Image cache on disk",
        doc="keep the image cache in a memory-mapped file in the cache folder ($MWB_CACHE_DIR or "
        "~/.cache/model-workbench), one copy per machine: `auto` (when the images pass the memory bound, under "
        "torchrun, or when the file exists already), `on`, `off`",
        help="Write the decoded images once to a file in the workbench's cache folder and map it, so every "
        "training process on this machine and their loader workers read one copy, and a later run on the same "
        "data and image size starts without decoding. Auto does so when the images do not fit the memory limit, "
        "when several torchrun processes share this machine, or when an earlier run left the file.",
        choices={"auto": "auto (when needed)", "on": "on", "off": "off"},
    )
    drop_last: bool = setting(
        False,
        group="sampler",
        label="Drop the last incomplete batch",
        doc="drop the last incomplete batch",
        help="Skip the final batch of an epoch when it is smaller than the batch size.",
    )
    shuffle: bool | None = setting(
        None,
        group="sampler",
        label="Shuffle",
        doc="DataLoader's shuffle flag",
        help="DataLoader's shuffle flag; only the random and sequential samplers go with it (off turns the random "
        "sampler into a sequential one).",
        choices={None: "auto (as the sampler does)", True: "on", False: "off (dataset order)"},
        applies=Applies(
            "loader.sampler.name",
            ("random", "sequential"),
            enforce=True,
            hide=False,
            why="PyTorch's DataLoader refuses shuffle together with another sampler, so the chosen "
            "sampler decides the order",
        ),
    )
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    collate: CollateName = setting(
        "default",
        group="input",
        label="Collate",
        doc="`default` stacks; `pad` zero-pads to the batch's largest image (also returns the original sizes)",
        help="How a batch is assembled: stacked (all images the same size) or zero-padded to the largest image of "
        "the batch.",
        choices={"default": "stack (images of one size)", "pad": "pad (zero-pad to the batch's largest image)"},
    )


def _loss(*names: str) -> Applies:
    return Applies("loss.name", names, enforce=True)


class LossConfig(Section):
    name: LossName = setting(
        "cross_entropy",
        group="loss",
        label="Loss",
        name="loss",
        doc="the loss; `cross_entropy`, `nll`, `mse`, `l1`, `smooth_l1` take classes (one-hot targets for the "
        "regressions), `bce_with_logits` multilabel",
        help="The function the training minimises; it has to fit the data's task.",
        choices={
            "cross_entropy": "Cross-entropy",
            "mse": "Mean squared error (MSE)",
            "bce_with_logits": "Binary cross-entropy with logits",
            "nll": "Negative log-likelihood (NLL)",
            "l1": "Mean absolute error (L1)",
            "smooth_l1": "Smooth L1 (Huber)",
        },
        hints={
            "cross_entropy": "The usual loss for single-label classification.",
            "mse": "Squared error; class targets become one-hot vectors.",
            "bce_with_logits": "One yes/no decision per output: the loss for multi-label tasks.",
            "nll": "Negative log-likelihood of the log-softmax of the outputs.",
            "l1": "Absolute error; class targets become one-hot vectors.",
            "smooth_l1": "Squared error near the target and absolute error beyond beta; less sensitive to outliers.",
        },
    )
    label_smoothing: Finite = setting(
        0.0,
        ge=0,
        lt=1,
        group="loss",
        label="Label smoothing",
        high=0.999,
        step=0.05,
        special="off",
        doc="cross-entropy label smoothing",
        help="Move this share of each target's probability onto the other classes, which discourages "
        "over-confident predictions.",
        applies=_loss("cross_entropy"),
    )
    class_weights: str | list[Number] | None = setting(
        None,
        group="loss",
        label="Class weights",
        widget="weights",
        doc='one per class, or `"balanced"`',
        help="Weigh each class's contribution to the loss: equally, inversely to how often it occurs, or by a "
        "typed list.",
        choices={None: "none (all equal)", "balanced": "balanced (inverse class frequency)", "list": "from list"},
        placeholder="one weight per class, in class order: 1, 2, 1, …",
        note="One non-negative weight per class, in the order of the class names.",
        special="type one weight per class in the box below, such as 1, 2, 1",
        applies=_loss("cross_entropy", "nll"),
    )
    beta: Finite = setting(
        1.0,
        gt=0,
        group="loss",
        label="Beta",
        name="loss_beta",
        widget="text",
        doc="where smooth L1 turns from squared to absolute error",
        help="Where smooth L1 changes from squared to absolute error; must be above 0.",
        applies=Applies("loss.name", ("smooth_l1",)),
    )


def _optimizer(*names: str) -> Applies:
    return Applies("optimizer.name", names)


class OptimizerConfig(Section):
    name: OptimizerName = setting(
        "adamw",
        group="optimizer",
        label="Optimizer",
        name="optimizer",
        doc="the optimizer",
        help="The algorithm that updates the weights from the gradients.",
        choices={"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop"},
    )
    lr: Finite = setting(
        1e-3,
        gt=0,
        group="optimizer",
        label="Learning rate",
        widget="text",
        placeholder="such as 1e-3",
        doc="learning rate (of the new head)",
        help="Step size of the optimizer for the new head, typed as a number such as 3e-4; must be above 0.",
    )
    weight_decay: Finite = setting(
        0.0,
        ge=0,
        group="optimizer",
        label="Weight decay",
        widget="text",
        doc="weight decay",
        help="Pull the weights towards zero by this factor each step (such as 1e-4); 0 turns it off.",
    )
    momentum: Finite | None = setting(
        None,
        ge=0,
        lt=1,
        group="optimizer",
        label="Momentum",
        low=-0.05,
        high=0.999,
        step=0.05,
        special="default",
        doc="`null` is 0.9 for SGD, 0 for RMSprop",
        help="How much of the previous update each step keeps; the lowest setting uses the default (0.9 for SGD, "
        "0 for RMSprop).",
        applies=_optimizer("sgd", "rmsprop"),
    )
    nesterov: bool = setting(
        False,
        group="optimizer",
        label="Nesterov momentum",
        doc="Nesterov momentum",
        help="Look ahead along the momentum before taking the gradient; needs a momentum above 0.",
        applies=_optimizer("sgd"),
    )
    betas: list[Fraction] = setting(
        default_factory=lambda: [0.9, 0.999],
        group="optimizer",
        label="Betas",
        doc="Adam's two decay rates",
        help="Decay rates of Adam's running averages of the gradient and its square, two numbers such as 0.9, 0.999.",
        applies=_optimizer("adam", "adamw"),
    )
    eps: Finite = setting(
        1e-8,
        gt=0,
        group="optimizer",
        label="Epsilon",
        widget="text",
        name="eps",
        doc="added to the denominator for numerical stability",
        help="A small number added to the denominator for numerical stability, such as 1e-8.",
        applies=_optimizer("adam", "adamw", "rmsprop"),
    )
    alpha: Finite = setting(
        0.99,
        ge=0,
        lt=1,
        group="optimizer",
        label="Alpha",
        high=0.9999,
        step=0.01,
        decimals=4,
        doc="RMSprop's smoothing constant",
        help="Smoothing constant of RMSprop's running average of squared gradients.",
        applies=_optimizer("rmsprop"),
    )
    backbone_lr_mult: Finite = setting(
        1.0,
        ge=0,
        group="optimizer",
        label="Backbone lr ×",
        widget="text",
        doc="the backbone's lr is `lr` times this; the new head uses `lr`",
        help="The pretrained backbone learns at the learning rate times this (such as 0.1); the new head uses the "
        "learning rate itself.",
    )
    layer_lr_decay: Finite = setting(
        1.0,
        gt=0,
        le=1,
        group="optimizer",
        label="Layer-wise lr decay",
        widget="text",
        doc="each block of the model (ResNet stages, EfficientNet blocks, ViT blocks, ConvNeXt stages) trains at this "
        "times the rate of the block above it, counted down from the head; `1` turns it off",
        help="Layer-wise learning-rate decay: the block next to the head learns at this times the head's rate, the "
        "one below it at this squared, and so on down to the stem (such as 0.7); 1 turns it off.",
    )
    lr_mult: dict[str, Positive] = setting(
        default_factory=dict,
        doc='per-module multipliers of the learning rate, such as `{"layer4": 0.3}` (the longest matching module '
        "name wins); on top of the above, and set from the Layers panel's Learning rate column",
        help="Multiply the learning rate of the modules under each name by its number (edited in the Layers panel).",
    )


def _schedule(*names: str) -> Applies:
    return Applies("schedule.name", names)


class ScheduleConfig(Section):
    name: ScheduleName = setting(
        "none",
        group="schedule",
        label="Schedule",
        name="schedule",
        doc="the learning-rate schedule",
        help="How the learning rate changes during the run.",
        choices={
            "none": "Constant",
            "step": "Step decay",
            "cosine": "Cosine annealing",
            "onecycle": "One-cycle",
            "plateau": "Reduce on plateau",
        },
        hints={
            "none": "The learning rate stays the same for the whole run.",
            "step": "The learning rate is multiplied by gamma every step_size epochs.",
            "cosine": "The learning rate follows a half cosine from its start down to eta_min over the run.",
            "onecycle": "The learning rate warms up to max_lr and anneals back down, updated after every batch.",
            "plateau": "The learning rate is multiplied by factor when the validation loss stops improving.",
        },
    )
    step_size: int = setting(
        10,
        ge=1,
        group="schedule",
        label="Step size",
        high=100_000,
        suffix=" epochs",
        doc="epochs between decays",
        applies=_schedule("step"),
        help="Multiply the learning rate by gamma after every this many epochs.",
    )
    gamma: Finite = setting(
        0.1,
        gt=0,
        group="schedule",
        label="Gamma",
        widget="text",
        doc="the decay factor",
        help="The factor the learning rate is multiplied by at each step, such as 0.1.",
        applies=_schedule("step"),
    )
    eta_min: Finite = setting(
        0.0,
        ge=0,
        group="schedule",
        label="Lowest lr",
        widget="text",
        doc="the lowest learning rate",
        applies=_schedule("cosine"),
        help="The learning rate the cosine reaches at the end of the run, such as 1e-6.",
    )
    max_lr: Finite | None = setting(
        None,
        gt=0,
        group="schedule",
        label="Peak lr",
        widget="text",
        placeholder="the optimizer's learning rate",
        doc="the peak learning rate; `null`: `optimizer.lr`",
        applies=_schedule("onecycle"),
        help="The highest learning rate of the cycle; empty uses the optimizer's learning rate.",
    )
    pct_start: Finite = setting(
        0.3,
        gt=0,
        lt=1,
        group="schedule",
        label="Warm-up share",
        low=0.001,
        high=0.999,
        step=0.05,
        doc="share of the steps spent warming up",
        applies=_schedule("onecycle"),
        help="The share of all steps spent rising to the peak learning rate.",
    )
    patience: int = setting(
        2,
        ge=0,
        group="schedule",
        label="Patience",
        name="plateau_patience",
        high=100_000,
        suffix=" epochs",
        doc="epochs without a better validation loss before a decay",
        help="Epochs without a better validation loss before the learning rate is lowered.",
        applies=_schedule("plateau"),
    )
    factor: Finite = setting(
        0.1,
        gt=0,
        lt=1,
        group="schedule",
        label="Factor",
        name="plateau_factor",
        low=0.001,
        high=0.999,
        step=0.05,
        doc="the decay factor on a plateau",
        applies=_schedule("plateau"),
        help="The factor the learning rate is multiplied by on a plateau.",
    )


class PhaseConfig(Section):
    """One phase of a run in phases (train.phases): its epochs and what changes when it begins.

    A field left null keeps the project's own setting (model.freeze..., optimizer.lr, schedule.name,
    data.augment), so a phase says only what it changes.
    """

    name: str = setting("", doc="a label for the log and the plots, such as `head` or `fine-tune`")
    epochs: int = setting(1, ge=1, doc="epochs of this phase")
    freeze: FreezePreset | None = setting(None, doc="the freezing preset of this phase; `null`: `model.freeze`")
    freeze_up_to: str | None = setting(
        None, doc='with `freeze: "up_to"`: this module and every one before it are frozen'
    )
    freeze_prefixes: list[str] | None = setting(None, doc="module names frozen on top; `null`: `model.freeze_prefixes`")
    unfreeze_prefixes: list[str] | None = setting(
        None, doc="module names kept trainable; `null`: `model.unfreeze_prefixes`"
    )
    lr: Finite | None = setting(None, gt=0, doc="the head's learning rate in this phase; `null`: see `lr_factor`")
    lr_factor: Finite | None = setting(
        None,
        gt=0,
        doc="this phase's learning rate is the previous phase's times this; with `lr` and this both `null`, "
        "`optimizer.lr`",
    )
    schedule: ScheduleName | None = setting(
        None, doc="the schedule over this phase's epochs (its settings from `schedule`); `null`: `schedule.name`"
    )
    augment: bool | None = setting(
        None, doc="`false` trains this phase on unaugmented images; `null` or `true`: as `data.augment` says"
    )
    layer_lr_decay: Finite | None = setting(
        None, gt=0, le=1, doc="this phase's layer-wise learning-rate decay; `null`: `optimizer.layer_lr_decay`"
    )


class TrainConfig(Section):
    epochs: int = setting(
        10,
        ge=1,
        group="training",
        label="Epochs",
        high=1_000_000,
        doc="number of epochs (a run in phases takes the sum of its phases' epochs instead)",
        help="How many passes over the training set the run makes.",
        applies=Applies(
            "train.phases", ([],), hide=False, why="the run is planned in phases: its length is their epochs' sum"
        ),
    )
    device: DeviceName = setting(
        "auto",
        group="training",
        label="Device",
        doc="`auto` takes cuda, then mps, then cpu",
        help="Where the run computes: auto takes a CUDA GPU, then Apple's MPS, then the CPU.",
    )
    seed: int = setting(
        0,
        ge=0,
        le=2**32 - 1,
        group="training",
        label="Seed",
        widget="text",
        doc="random seed of the run; a seeded CPU run is reproducible",
        help="Seeds every random number generator, so a CPU run with the same seed repeats exactly.",
    )
    deterministic: bool = setting(
        False,
        group="training",
        label="Deterministic algorithms",
        doc="`torch.use_deterministic_algorithms` during the run",
        help="Use only deterministic PyTorch algorithms (torch.use_deterministic_algorithms); slower, and an "
        "operation without one stops the run.",
    )
    precision: Precision = setting(
        "fp32",
        group="training",
        label="Precision",
        doc="`fp16` or `bf16` autocast (fp16 with a gradient scaler on CUDA)",
        help="Number format of the forward pass: fp16/bf16 autocast saves memory and time on a CUDA GPU.",
        choices={"fp32": "fp32 (full precision)", "fp16": "fp16 mixed precision", "bf16": "bf16 mixed precision"},
        note="Mixed precision pays off on CUDA (fp16 adds a gradient scaler there); on the CPU autocast runs too but "
        "rarely helps, and on MPS the run stays fp32.",
    )
    grad_clip_norm: Finite | None = setting(
        None,
        gt=0,
        group="training",
        label="Clip grad norm",
        widget="text",
        placeholder="off",
        doc="clip the gradient norm; `null`: off",
        help="Scale the gradients down when their overall norm exceeds this; empty turns clipping off.",
    )
    feature_cache: FeatureCacheMode = setting(
        "auto",
        group="training",
        label="Feature cache",
        doc="`auto`: when the frozen layers are the start of the forward pass and nothing is augmented, compute "
        "their output once and train the rest on it (see [Performance](#performance)); `off` recomputes",
        help="When the frozen layers are the start of the model and no augmentation is on, their output is computed "
        "once per image and later epochs train only the rest: much faster, same result.",
        choices={"auto": "auto (when it applies)", "off": "off (recompute)"},
        note="The run's log says whether the cache is used, where the model is cut, or why not.",
    )
    feature_cache_max_mb: int | None = setting(
        None,
        ge=1,
        group="training",
        label="Cache limit (MiB)",
        widget="text",
        placeholder="half the free memory",
        doc="memory bound of the cached features in MiB; `null`: half the memory available",
        help="The most memory the cached features may take; above it the run recomputes them every epoch. Empty: "
        "half of the memory available when the run starts.",
    )
    channels_last: bool | None = setting(
        None,
        group="training",
        label="Channels last",
        doc="channels-last (NHWC) weights and image batches; `null`: on for CUDA with a convolutional model",
        help="Store the model's weights and the image batches channels-last (NHWC): faster convolutions on a CUDA "
        "GPU's tensor cores, usually slower on the CPU.",
        choices={None: "auto (on for CUDA with a convolutional model)", True: "on", False: "off"},
    )
    compile: bool = setting(
        False,
        group="training",
        label="Compile the model (torch.compile)",
        doc="`torch.compile` the part that trains; if compiling fails the run logs why and trains eagerly",
        help="Compile the training forward pass: the first batch takes longer (seconds on a GPU, minutes on the "
        "CPU), later ones are faster. If compiling fails, the run says why and trains uncompiled.",
    )

    phases: list[PhaseConfig] = setting(
        default_factory=list,
        doc="train in phases (gradual unfreezing): each with its `epochs` and any of `freeze`, `freeze_up_to`, "
        "`freeze_prefixes`, `unfreeze_prefixes`, `lr` or `lr_factor`, `schedule`, `augment`, `layer_lr_decay`, "
        "`name`; a phase "
        "changes the frozen layers, rebuilds the optimizer and restarts the schedule; `[]`: one phase as above",
    )


SEVERAL = Applies("distributed.processes", above=1)


class DistributedConfig(Section):
    """Training in several processes with DistributedDataParallel (engine/distributed.py)."""

    processes: int = setting(
        1,
        ge=1,
        le=1024,
        group="distributed",
        label="Processes",
        suffix=" processes",
        special="1 (in the app)",
        doc="above 1, `main.py train` and the app run the project in that many processes through torchrun (one per "
        "GPU, or CPU processes); a run started by torchrun itself takes torchrun's count",
        help="Train in this many processes on this machine with DistributedDataParallel, started through torchrun: "
        "one process per GPU, or on the CPU several processes that share its cores (gloo). The batch size is "
        "per process, so every step trains on processes × batch size samples. 1 trains in the app's own "
        "process.",
    )
    backend: DistBackend = setting(
        "auto",
        group="distributed",
        label="Backend",
        name="dist_backend",
        applies=SEVERAL,
        doc="`auto`: nccl when every process has a GPU, else gloo",
        help="How the processes exchange gradients: nccl between CUDA GPUs, gloo on the CPU. Auto takes nccl when "
        "every process has a GPU.",
        choices={"auto": "auto (nccl on CUDA GPUs, else gloo)", "nccl": "nccl (CUDA GPUs)", "gloo": "gloo (CPU)"},
    )
    sync_batchnorm: bool = setting(
        False,
        group="distributed",
        label="Synchronise BatchNorm across processes",
        applies=SEVERAL,
        doc="BatchNorm statistics over every process's batch (`SyncBatchNorm`; GPUs only)",
        help="Compute BatchNorm statistics over all the processes' batches together (SyncBatchNorm) instead of each "
        "process's own: steadier with small per-process batches, at some communication cost. GPUs only.",
    )
    timeout_s: int = setting(
        300,
        ge=10,
        group="distributed",
        label="Timeout",
        name="dist_timeout",
        high=86_400,
        step=30,
        suffix=" s",
        applies=SEVERAL,
        doc="a process that waits this long for the others ends the run with an error",
        help="How long a process waits for the others (one that crashed or hangs) before the run ends with an error "
        "instead of waiting for ever.",
    )


class CheckpointConfig(Section):
    every_epoch: bool = setting(
        True,
        group="checkpoints",
        label="Keep a file per epoch",
        name="checkpoint_every_epoch",
        doc="keep `epoch-NNN.pt` files (`last.pt` and `best.pt` are always written)",
        help="Keep an epoch-NNN.pt checkpoint after every epoch (last.pt and best.pt are always written).",
    )
    keep_last: int = setting(
        3,
        ge=0,
        group="checkpoints",
        label="Keep last",
        name="checkpoint_keep_last",
        high=100_000,
        special="all",
        suffix=" files",
        doc="epoch files kept, newest first; `0` keeps them all",
        help="How many of the newest epoch files are kept; the lowest setting keeps them all.",
    )
    monitor: Monitor = setting(
        "val_loss",
        group="checkpoints",
        label="Best by",
        name="checkpoint_monitor",
        choices=MONITOR_LABELS,
        doc="what `best.pt` means",
        help="The metric that decides which epoch is saved as best.pt.",
    )
    mode: MonitorMode = setting(
        "auto",
        group="checkpoints",
        label="Better is",
        name="checkpoint_mode",
        choices=MODE_LABELS,
        doc="`auto` is max for accuracies, min for losses",
        help="Whether a lower or a higher value of that metric is better.",
    )


ENABLED = Applies("early_stopping.enabled", (True,), hide=False)


class EarlyStoppingConfig(Section):
    enabled: bool = setting(
        False,
        group="early_stopping",
        label="Stop when the metric stops improving",
        name="early_stopping",
        doc="turn early stopping on",
        help="End the run early once the watched metric has not improved for a while.",
    )
    monitor: Monitor = setting(
        "val_loss",
        group="early_stopping",
        label="Watch",
        name="es_monitor",
        choices=MONITOR_LABELS,
        applies=ENABLED,
        doc="the metric watched",
        help="The metric whose improvement keeps the run going.",
    )
    mode: MonitorMode = setting(
        "auto",
        group="early_stopping",
        label="Better is",
        name="es_mode",
        choices=MODE_LABELS,
        applies=ENABLED,
        doc="as for checkpoints",
        help="Whether a lower or a higher value of the metric is an improvement.",
    )
    patience: int = setting(
        5,
        ge=1,
        group="early_stopping",
        label="Patience",
        name="es_patience",
        high=100_000,
        suffix=" epochs",
        applies=ENABLED,
        doc="epochs without an improvement larger than `min_delta` before stopping",
        help="Epochs without an improvement before the run stops.",
    )
    min_delta: Finite = setting(
        0.0,
        ge=0,
        group="early_stopping",
        label="Min. change",
        name="es_min_delta",
        widget="text",
        applies=ENABLED,
        doc="the smallest change that counts",
        help="The smallest change of the metric that counts as an improvement; 0 counts any.",
    )
    per_phase: bool = setting(
        False,
        group="early_stopping",
        label="Per phase (a stop starts the next phase)",
        name="es_per_phase",
        applies=ENABLED,
        doc="with `train.phases`: patience counts within each phase and a stop ends that phase, the next one "
        "begins; `false`: across the run, a stop ends the run",
        help="In a run in phases, count the patience within each phase, and let a stop end only that phase (the "
        "next one starts at once) instead of the whole run.",
    )
    restore_best: bool = setting(
        False,
        group="early_stopping",
        label="Restore the best epoch's weights",
        name="es_restore_best",
        applies=ENABLED,
        doc="end with the weights of the best epoch by this monitor (`final.pt` then holds them)",
        help="End with the weights of the best epoch rather than those of the last one.",
    )


WandbMode = Literal["off", "offline", "online"]
WANDB_MODES: tuple[str, ...] = get_args(WandbMode)


class WandbConfig(Section):
    mode: WandbMode = setting(
        "off",
        doc="log each run to Weights & Biases: `offline` writes into the run folder (upload later with "
        "`wandb sync RUN/wandb/offline-run-*`), `online` uploads as it trains (after `wandb login`); needs the "
        "`wandb` extra",
    )
    project: str | None = setting(None, doc="the W&B project (default: the project's name)")
    entity: str | None = setting(None, doc="the W&B team or user (default: your default entity)")


class OutputConfig(Section):
    dir: str = setting("runs", doc="run folders are created inside, relative to the project file")
    run_name: str | None = setting(None, doc="default: the project's name and a timestamp")
    tensorboard: bool = setting(
        True,
        group="checkpoints",
        label="Write TensorBoard logs",
        doc="write TensorBoard event files in the run folder",
        help="Write TensorBoard event files (losses, accuracy, learning rate) into the run folder.",
    )
    wandb: WandbConfig = Field(default_factory=WandbConfig)


class ProjectConfig(Section):
    name: str = setting("untitled", doc="used for run folder names")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    schema_version: int = setting(SCHEMA_VERSION, doc="the file format's version")
    # Folder that relative paths are resolved against (the project file's folder); not saved.
    _base_dir: str = PrivateAttr(".")

    @property
    def base_dir(self) -> str:
        return self._base_dir

    @base_dir.setter
    def base_dir(self, value: str) -> None:
        self._base_dir = value

    def resolve(self, path: str | os.PathLike | None) -> Path | None:
        """A path from the project, made absolute against the project file's folder."""
        if path is None or path == "":
            return None
        p = Path(os.path.expanduser(str(path)))
        return p if p.is_absolute() else (Path(self.base_dir) / p).resolve()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def copy(self, **unsupported: Any) -> ProjectConfig:  # noqa: D102 - replaces pydantic's deprecated copy()
        if unsupported:  # pydantic's keywords (include, exclude, update, deep) are not offered
            raise TypeError(f"ProjectConfig.copy() takes no arguments (got {', '.join(unsupported)})")
        clone = from_dict(self.to_dict(), check_paths=False, check_catalog=False)
        clone.base_dir = self.base_dir
        return clone


# ---------------------------------------------------------------------------------------------
# Reading: JSON -> models; pydantic checks each field against its declaration, the messages are ours

_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number")


def _locate(loc: tuple) -> tuple[str, Any, list[Any]]:
    """(dotted path, declared type, its constraints) of a pydantic error location."""
    path, tp, metadata = "", ProjectConfig, []
    for part in loc:
        base = unwrap(tp)[0]
        if isinstance(part, str) and is_model(base) and part in base.model_fields:
            info = base.model_fields[part]
            path = f"{path}.{part}" if path else part
            tp, metadata = info.annotation, list(info.metadata)
        elif isinstance(part, int) and getattr(base, "__origin__", None) is list:
            path, tp, metadata = f"{path}[{part}]", base.__args__[0], []
        elif isinstance(part, str) and getattr(base, "__origin__", None) is dict:
            path, tp, metadata = f"{path}[{part!r}]", base.__args__[1], []
        else:
            break  # a union member's tag: the problem is the field's
    return path, tp, metadata + unwrap(tp)[1]


def _field_problems(exc: ValidationError) -> tuple[list[Problem], bool]:
    """The declaration's problems in our words, and whether every value at least has its declared type."""
    problems: list[Problem] = []
    seen: set[str] = set()
    typed = True
    for err in exc.errors():
        kind, value = err["type"], err["input"]
        path, tp, metadata = _locate(err["loc"])
        base = unwrap(tp)[0]
        if kind == "extra_forbidden":
            key = f"{path}.{err['loc'][-1]}" if path else str(err["loc"][-1])
            problems.append(Problem(key, f"{key}: unknown key (allowed: {', '.join(base.model_fields)})"))
            typed = False
            continue
        if path in seen:
            continue
        seen.add(path)
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind == "finite_number":
            text = f"{path} = {err['ctx']['value']}: must be a finite number"
        elif kind in _RANGE_ERRORS:
            text = f"{path} = {value!r}: must be {range_text(bounds(metadata))}"
        elif kind == "literal_error" and isinstance(value, str):
            text = f"{path} = {value!r}: unknown; allowed: {', '.join(base.__args__)}"
        else:
            text = f"{path} = {value!r}: expected {type_name(tp)}"
            typed = False
        problems.append(Problem(path, text))
    return problems, typed


def _unchecked(cls: type[BaseModel], data: dict) -> Any:
    """A model of values that have their types but not their ranges, so the cross-field rules can still speak."""
    values = {}
    for name, value in data.items():
        base = unwrap(cls.model_fields[name].annotation)[0]
        item = (getattr(base, "__args__", None) or (None,))[0] if getattr(base, "__origin__", None) is list else None
        if is_model(base):
            values[name] = _unchecked(base, value)
        elif isinstance(item, type) and issubclass(item, BaseModel) and isinstance(value, list):
            values[name] = [_unchecked(item, v) for v in value]  # train.phases: a list of sections
        else:
            values[name] = value
    return cls.model_construct(**values)


def run_epochs(cfg: ProjectConfig) -> int:
    """The epochs a run is planned for: the sum of its phases' epochs, or train.epochs without phases."""
    return sum(p.epochs for p in cfg.train.phases) if cfg.train.phases else cfg.train.epochs


def with_total_epochs(data: dict[str, Any], epochs: int) -> dict[str, Any]:
    """A project dict whose run lasts `epochs` in all: train.epochs, or in a run in phases its last phase
    lengthened (or shortened) by the difference, as `--epochs` means it."""
    train = dict(data.get("train", {}))
    phases = [dict(p) for p in train.get("phases") or []]
    if phases and all(isinstance(p.get("epochs", 1), int) for p in phases):
        planned = sum(p.get("epochs", 1) for p in phases)
        phases[-1]["epochs"] = phases[-1].get("epochs", 1) + epochs - planned
        train["phases"] = phases
    else:
        train["epochs"] = epochs
    return {**data, "train": train}


def from_dict(
    data: Any,
    *,
    base_dir: str | os.PathLike = ".",
    source: str | None = None,
    check_paths: bool = True,
    check_catalog: bool = True,
) -> ProjectConfig:
    """Build and validate a project from a JSON-shaped dict. Raises ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError([f"the project file must hold a JSON object, not {type(data).__name__}"], source)
    version = data.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConfigError(
            [Problem("schema_version", f"schema_version = {version!r}: expected a positive integer")], source
        )
    if version > SCHEMA_VERSION:
        raise ConfigError(
            [
                Problem(
                    "schema_version",
                    f"schema_version = {version}: this project was written by a "
                    f"newer Model Workbench (this one reads schema versions up to {SCHEMA_VERSION}); "
                    "update the app to open it",
                )
            ],
            source,
        )
    try:
        cfg = ProjectConfig.model_validate(data)
        problems: list[Problem] = []
    except ValidationError as exc:
        problems, typed = _field_problems(exc)
        if not typed:
            raise ConfigError(problems, source) from None
        cfg = _unchecked(ProjectConfig, data)
    cfg.base_dir = str(base_dir)
    problems += _rules(cfg, check_paths=check_paths, check_catalog=check_catalog)
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
    return from_dict(
        data, base_dir=p.resolve().parent, source=str(p), check_paths=check_paths, check_catalog=check_catalog
    )


def readme_table() -> str:
    """The README's project-file table, generated from the declarations above (`make docs` writes it)."""
    return table(ProjectConfig)


def write_readme_table(path: str | os.PathLike = "README.md") -> None:
    """Rewrite the table between the README's settings markers."""
    p = Path(path)
    p.write_text(replace_between(p.read_text(encoding="utf-8"), readme_table()), encoding="utf-8")


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
# Validation: the declarations' ranges and choices, then the rules that join several fields


def validate(cfg: ProjectConfig, *, check_paths: bool = True, check_catalog: bool = True) -> list[Problem]:
    """Every range, name and combination rule of a project; returns the problems found.

    check_catalog=False leaves out what needs the backbone catalog (the backbone's name, its weights, a ViT's
    patch size): the catalog imports PyTorch, torchvision and timm, which the app loads after its window shows.
    """
    try:
        ProjectConfig.model_validate(cfg.model_dump(warnings=False))
        problems: list[Problem] = []
    except ValidationError as exc:
        problems, typed = _field_problems(exc)
        if not typed:
            return problems
    return problems + _rules(cfg, check_paths=check_paths, check_catalog=check_catalog)


def _unused(cfg: ProjectConfig) -> list[Problem]:
    """Settings given where their `applies` rule says they are not used (only where that rule is enforced)."""
    out = []
    for path, info in fields(ProjectConfig):
        rule = meta(info).applies
        if rule is None or not rule.enforce:
            continue
        value = get_path(cfg, path)
        if value in (None, "") or value == info.get_default(call_default_factory=True) or rule.holds(cfg):
            continue
        why = f" ({rule.why})" if rule.why else ""
        out.append(
            Problem(
                path,
                f"{path} = {value!r} is only used with {rule.describe()}, not "
                f"{get_path(cfg, rule.path)!r}{why}; remove it",
            )
        )
    return out


def _path_exists(
    add: Callable[[str, str], None], cfg: ProjectConfig, where: str, value: str | None, *, required: bool
) -> None:
    if not value:
        if required:
            add(where, f"{where} is empty: give the dataset's path (an image folder, a .csv or a .npz)")
        return
    resolved = cfg.resolve(value)
    if resolved is not None and not resolved.exists():  # None only for an empty value, handled above
        add(where, f"{where} = {value!r}: no such file or folder ({resolved})")


def _shards_exist(
    add: Callable[[str, str], None], cfg: ProjectConfig, where: str, value: str | None, *, required: bool
) -> None:
    """data.kind = "webdataset": the pattern expands, and each local shard it names exists (URLs are opened later)."""
    from engine.shard_patterns import expand_pattern, is_remote  # free of PyTorch, as loading a project stays

    if not value or not value.strip():
        if required:
            add(where, f"{where} is empty: give the shards, such as shards/train-{{000000..000009}}.tar")
        return
    try:
        urls = expand_pattern(value)
    except ValueError as exc:
        add(where, f"{where} = {value!r}: not a valid shard pattern ({exc})")
        return
    for url in urls:
        resolved = None if is_remote(url) else cfg.resolve(url)
        if resolved is not None and not resolved.is_file():
            add(where, f"{where} = {value!r}: shard {resolved} does not exist")
            return


def _webdataset_rules(add: Callable[[str, str], None], cfg: ProjectConfig) -> None:
    """What streamed shards cannot do, refused by name before anything is read."""
    d, s = cfg.data, cfg.loader.sampler
    if d.val_fraction > 0 and not d.val_path:
        add(
            "data.val_fraction",
            f"data.val_fraction = {d.val_fraction:g} cannot split a stream of shards (data.kind = 'webdataset'): "
            "give the validation shards in data.val_path, or set data.val_fraction to 0 to train without validation",
        )
    if d.exclude or d.relabel:
        add(
            "data.exclude" if d.exclude else "data.relabel",
            "data.exclude and data.relabel name images by path, which streamed shards (data.kind = 'webdataset') "
            "do not look up; write the shards again from the corrected dataset (main.py shard)",
        )
    if s.name not in ("random", "sequential"):
        add(
            "loader.sampler.name",
            f"loader.sampler.name = '{s.name}' draws samples by position, which streamed shards "
            "(data.kind = 'webdataset') do not give; use 'random' (a shuffle buffer) or 'sequential'",
        )


def _rules(cfg: ProjectConfig, *, check_paths: bool, check_catalog: bool) -> list[Problem]:
    """The rules no single declaration can state: lengths, files, the catalog and combinations of fields."""
    p: list[Problem] = _unused(cfg)

    def add(path: str, message: str) -> None:
        p.append(Problem(path, message))

    d = cfg.data
    for name, values in (("data.mean", d.mean), ("data.std", d.std)):
        if len(values) not in (1, 3):
            add(name, f"{name} = {values!r}: give 1 or 3 values (one per RGB channel)")
    if check_paths:
        exists = _shards_exist if d.kind == "webdataset" else _path_exists
        exists(add, cfg, "data.path", d.path, required=True)
        exists(add, cfg, "data.val_path", d.val_path, required=False)
        _path_exists(add, cfg, "model.weights_file", cfg.model.weights_file, required=False)
    if d.kind == "webdataset":
        _webdataset_rules(add, cfg)
    if d.kind == "folder" and d.task != "classification":
        add(
            "data.task",
            f"data.task = {d.task!r}: an image folder labels by sub-folder, so only 'classification' "
            "is possible; use a CSV or .npz for multilabel or regression",
        )

    m = cfg.model
    if check_catalog:
        from engine.catalog import (  # imports torchvision (timm if named)
            backbone_problems,
            fixed_input_size,
            is_known,
            vit_patch_size,
        )

        p.extend(Problem.of(text) for text in backbone_problems(m.backbone, m.weights))
        patch = vit_patch_size(m.backbone) if is_known(m.backbone) else None
        if patch and m.weights is None and isinstance(d.image_size, int) and d.image_size % patch:
            add(
                "data.image_size",
                f"data.image_size = {d.image_size}: {m.backbone} cuts images into {patch}x{patch} "
                f"patches, so the size must be a multiple of {patch} (such as "
                f"{max(patch, d.image_size // patch * patch)})",
            )
        if m.weights is not None and d.input_size is not None and fixed_input_size(m.backbone):
            add(
                "data.input_size",
                f"data.input_size = {d.input_size}: {m.backbone} with pretrained weights takes only the size its "
                "weights were trained at (its position embeddings are sized for it); remove data.input_size",
            )
    if d.keep_aspect and d.augment.random_resized_crop:
        add(
            "data.augment.random_resized_crop",
            "data.augment.random_resized_crop = true crops to a square, which "
            "data.keep_aspect = true is there to avoid; turn one of them off",
        )
    if m.freeze == "up_to" and not m.freeze_up_to:
        add(
            "model.freeze_up_to", "model.freeze_up_to is empty: the 'up_to' preset needs a module name such as 'layer3'"
        )
    if m.weights and m.weights_file:
        add(
            "model.weights_file",
            "model.weights and model.weights_file are both set: choose the catalog's weights or a file",
        )

    lo = cfg.loader
    if lo.persistent_workers and lo.num_workers == 0:
        add(
            "loader.persistent_workers",
            "loader.persistent_workers = true needs worker processes, but "
            "loader.num_workers = 0; set num_workers above 0 or to null (auto), or "
            "persistent_workers to null",
        )
    if d.keep_aspect and lo.collate != "pad":
        add(
            "loader.collate",
            "data.keep_aspect = true needs loader.collate = 'pad' (images of different sizes are padded)",
        )
    s = lo.sampler
    if lo.shuffle is True and s.name == "sequential":
        add(
            "loader.shuffle",
            "loader.shuffle = true contradicts loader.sampler.name = 'sequential'; use sampler 'random' to shuffle",
        )
    if s.indices is not None and s.name == "subset_random":
        if not s.indices:
            add("loader.sampler.indices", "loader.sampler.indices = []: give at least one training-set position")
        elif min(s.indices) < 0:
            add("loader.sampler.indices", f"loader.sampler.indices: {min(s.indices)} is negative; positions start at 0")
    if s.name == "weighted_random":
        if s.weights is None:
            add(
                "loader.sampler.weights",
                "loader.sampler.weights is empty: the 'weighted_random' sampler needs "
                "'balanced' or one weight per training sample",
            )
        elif isinstance(s.weights, str) and s.weights != "balanced":
            add(
                "loader.sampler.weights",
                f"loader.sampler.weights = {s.weights!r}: give 'balanced' or a list of one weight per sample",
            )
        elif isinstance(s.weights, list):
            bad = [w for w in s.weights if not math.isfinite(w) or w < 0]
            if bad:
                add(
                    "loader.sampler.weights", f"loader.sampler.weights: {bad[0]!r} is not a finite, non-negative weight"
                )
            elif not any(w > 0 for w in s.weights):
                add("loader.sampler.weights", "loader.sampler.weights: every weight is 0, so no sample could be drawn")
        elif d.task != "classification":
            add(
                "loader.sampler.weights",
                "loader.sampler.weights = 'balanced' needs class labels (data.task = 'classification')",
            )
    if s.rank is not None and s.num_replicas is not None and s.rank >= s.num_replicas:
        add("loader.sampler.rank", f"loader.sampler.rank = {s.rank}: must be below num_replicas ({s.num_replicas})")

    lf = cfg.loss
    if isinstance(lf.class_weights, str) and lf.class_weights != "balanced":
        add("loss.class_weights", f"loss.class_weights = {lf.class_weights!r}: give 'balanced' or one weight per class")
    if isinstance(lf.class_weights, list):
        for i, w in enumerate(lf.class_weights):
            if not math.isfinite(w):
                add("loss.class_weights", f"loss.class_weights[{i}] = {w}: must be a finite number")
            elif w < 0:
                add("loss.class_weights", f"loss.class_weights[{i}] = {w!r}: must be >= 0")
    task_losses = {
        "classification": ("cross_entropy", "mse", "bce_with_logits", "nll", "l1", "smooth_l1"),
        "multilabel": ("bce_with_logits", "mse", "l1", "smooth_l1"),
        "regression": ("mse", "l1", "smooth_l1"),
    }
    if d.task in task_losses and lf.name in LOSSES and lf.name not in task_losses[d.task]:
        add(
            "loss.name",
            f"loss.name = {lf.name!r} does not fit data.task = {d.task!r}; allowed: {', '.join(task_losses[d.task])}",
        )

    o = cfg.optimizer
    if len(o.betas) != 2:
        add("optimizer.betas", f"optimizer.betas = {o.betas!r}: give two values, such as [0.9, 0.999]")
    if o.nesterov and o.name == "sgd" and o.momentum == 0:
        add("optimizer.nesterov", "optimizer.nesterov = true needs optimizer.momentum > 0")

    _phase_rules(add, cfg)

    c, e = cfg.checkpoint, cfg.early_stopping
    for where, monitor in (("checkpoint.monitor", c.monitor), ("early_stopping.monitor", e.monitor)):
        if isinstance(monitor, str) and monitor.endswith("accuracy") and d.task == "regression":
            add(where, f"{where} = {monitor!r}: a regression has no accuracy; use 'val_loss' or 'train_loss'")

    if not cfg.output.dir:
        add("output.dir", "output.dir is empty: give a folder for run folders, such as 'runs'")
    run_name = cfg.output.run_name
    if run_name is not None and (not run_name or any(ch in run_name for ch in "/\\:")):
        add("output.run_name", f"output.run_name = {run_name!r}: must be a non-empty name without / \\ or :")
    return p


def _phase_rules(add: Callable[[str, str], None], cfg: ProjectConfig) -> None:
    """train.phases: each phase's freeze spec, learning rate and augmentation make sense with the project's."""
    for i, ph in enumerate(cfg.train.phases):
        where = f"train.phases[{i}]"
        if ph.lr is not None and ph.lr_factor is not None:
            add(
                f"{where}.lr_factor",
                f"{where} gives both lr = {ph.lr:g} and lr_factor = {ph.lr_factor:g}: give one of them",
            )
        preset = ph.freeze if ph.freeze is not None else cfg.model.freeze
        up_to = ph.freeze_up_to if ph.freeze is not None else (ph.freeze_up_to or cfg.model.freeze_up_to)
        if ph.freeze_up_to is not None and preset != "up_to":
            add(
                f"{where}.freeze_up_to",
                f"{where}.freeze_up_to = {ph.freeze_up_to!r} is only used with freeze = 'up_to', not {preset!r}; "
                "set both or remove freeze_up_to",
            )
        elif preset == "up_to" and not up_to:
            add(
                f"{where}.freeze_up_to",
                f"{where}.freeze_up_to is empty: freeze = 'up_to' needs a module name such as 'layer3'",
            )
        if ph.augment is True and not any(
            (
                cfg.data.augment.horizontal_flip,
                cfg.data.augment.rotation,
                cfg.data.augment.random_resized_crop,
                cfg.data.augment.color_jitter,
            )
        ):
            add(
                f"{where}.augment",
                f"{where}.augment = true, but data.augment turns no augmentation on; turn one on (such as "
                "data.augment.horizontal_flip) or set augment to null",
            )
