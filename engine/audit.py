"""Dataset audit: duplicates, train/validation leakage, likely label errors, outliers, image problems, class balance.

One decode pass gives every image's pixel hash (exact duplicates), its size and brightness (image-property
problems) and its input for a pretrained backbone; the pooled embeddings (cached on disk per image, so a second
audit only decodes what changed) drive the rest:

- near duplicates: a nearest-neighbour index over the embeddings projected to a few dozen PCA dimensions finds
  candidates (a projection only shortens distances, so a true twin is still among the nearest), and the full
  embeddings confirm each pair; a pair is a near duplicate when its distance is under a fraction of the median
  nearest-neighbour distance of the dataset (the scale of "different images" in this embedding space), or when
  it is closer than that median and its pixels agree: both images brought to the same small greyscale size
  (the smaller one's, by area averaging) match up to a linear brightness/contrast change with a residual under
  a few percent of the image's own contrast. A resized or recompressed copy passes that pixel check; a different
  photograph or handwritten digit that the backbone happens to embed as closely does not. No all-pairs matrix
  is ever built;
- leakage: exact or near twins on both sides of the split;
- label errors: out-of-fold probabilities of a K-fold logistic-regression probe on the embeddings, ranked with
  cleanlab's confident learning (cleanlab.filter.find_label_issues);
- outliers: the mean distance to the nearest images of the same class, far above the class's own spread.

Images smaller than the backbone's input are first brought to the dataset's median size (an antialiased
downscale of the larger ones): a copy saved at another resolution then reaches the model as nearly the same
pixels, instead of through a different interpolation path. Nothing on disk changes but the audit's own cache
(engine.scan_cache.cache_root()/audit): findings are acted on through the project's corrections
(engine.corrections), never on the user's files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.config import ModelConfig, ProjectConfig
from engine.data import (
    DataError,
    DataSource,
    array_to_image,
    dataset_root,
    load_image,
    path_key,
    sample_keys,
    scan_source,
    split_indices,
)

AUDIT_VERSION = 2  # bump when what is cached means something else
FALLBACK_BACKBONE, FALLBACK_WEIGHTS = "timm/efficientnet_lite0", "BUNDLED"
MIN_INPUT = 64  # px: the smallest input the backbone is run at
PIXELS_PER_BATCH = 32 * 64 * 64  # 32 images at 64 px, or 2 at 224 px: Stop is checked between batches, and a
# batch of 64 took 1.7 s on 2 busy CPUs (the issue asks for Stop within a second)
KINDS = (
    "unreadable",
    "exact_duplicate",
    "near_duplicate",
    "leakage",
    "label_issue",
    "outlier",
    "image_property",
    "class_imbalance",
)

Progress = Callable[[str, int, int], None]


class AuditStopped(Exception):
    """The stop flag was set; nothing was written."""


@dataclass
class AuditOptions:
    folds: int = 5  # K of the K-fold linear probe
    neighbours: int = 10  # candidates per image from the index
    project_dims: int = 32  # PCA dimensions the index searches in
    near_factor: float = 0.4  # near duplicate: distance <= near_factor x the median nearest-neighbour distance
    pixel_factor: float = 1.0  # or distance <= pixel_factor x that median and the pixels agree (pixel_residual)
    pixel_residual: float = 0.05  # pixels agree: residual of a linear fit <= this share of the image's contrast
    outlier_z: float = 4.0  # outlier: robust z-score of the within-class kNN distance above this
    outlier_k: int = 5
    imbalance_ratio: float = 2.0  # largest / smallest class (training) from which the balance is a finding
    dark_p99: float = 0.2  # very dark: 99% of the pixels darker than this (0..1 luminance)
    uniform_std: float = 0.02  # nearly uniform: luminance standard deviation under this
    aspect_ratio: float = 3.0  # extreme aspect ratio: longer side / shorter side from this
    tiny_fraction: float = 0.25  # tiny: shorter side under this share of the dataset's median shorter side


@dataclass
class Finding:
    kind: str
    keys: list[str]  # image paths relative to the dataset (engine.data sample keys)
    score: float  # higher: more likely a problem (see README, "Dataset audit")
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """Names the finding across audits (for Keep): its kind and its images."""
        return f"{self.kind}:{'|'.join(sorted(self.keys))}"


@dataclass
class AuditReport:
    dataset: str
    fingerprint: str
    embedder: str
    samples: int
    train: int
    val: int
    class_names: list[str]
    findings: list[Finding]
    balance: dict[str, Any]
    leakage: dict[str, Any]
    notes: list[str]
    seconds: dict[str, float]
    from_cache: bool = False

    def of_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> AuditReport:
        findings = [Finding(**f) for f in data["findings"]]
        return AuditReport(**{**data, "findings": findings})


# ---------------------------------------------------------------------------------------------
# The samples: both sides of the split, with their keys


@dataclass
class _Samples:
    keys: list[str]
    side: list[str]  # "train" | "val"
    labels: np.ndarray  # class index per sample (classification), else -1
    class_names: list[str]
    task: str
    sources: list[tuple[DataSource, int]]  # (source, position) per sample
    skipped: list[tuple[str, str]]  # (key, reason) of files the scan could not use
    root: Path


def _gather(cfg: ProjectConfig, progress: Progress | None, check: Callable[[], None]) -> _Samples:
    d = cfg.data
    path = cfg.resolve(d.path)
    if path is None:
        raise DataError("data.path is empty: give the dataset's path (an image folder, a .csv or a .npz)")

    def scanning(done: int, total: int) -> None:
        check()  # Stop ends the scan too (its worker processes; the scan cache keeps what was checked)
        if progress is not None:
            progress("scan", done, total)

    source = scan_source(path, kind=d.kind, task=d.task, progress=scanning, single_class_ok=True)
    root = dataset_root(source.path, source.kind)
    keys = sample_keys(source, root)
    skipped = [(path_key(s.path, root), s.reason) for s in source.skipped]
    entries: list[tuple[str, str, Any, tuple[DataSource, int]]] = []
    if d.val_path:
        val_path = cfg.resolve(d.val_path)
        assert val_path is not None  # d.val_path is not empty
        val_source = scan_source(val_path, kind=d.kind, task=d.task, class_names=source.class_names, progress=scanning)
        entries += [(keys[i], "train", source.targets[i], (source, i)) for i in range(len(source))]
        val_keys = sample_keys(val_source, root, validation=True)
        entries += [(val_keys[i], "val", val_source.targets[i], (val_source, i)) for i in range(len(val_source))]
        skipped += [(path_key(s.path, root), s.reason) for s in val_source.skipped]
    else:
        train_idx, val_idx = split_indices(source.targets, d.task, d.val_fraction, d.split_seed)
        val_set = set(val_idx)
        entries += [
            (keys[i], "val" if i in val_set else "train", source.targets[i], (source, i)) for i in range(len(source))
        ]
    labels = np.array([int(t) if d.task == "classification" else -1 for _, _, t, _ in entries], dtype=np.int64).reshape(
        -1
    )
    return _Samples(
        keys=[e[0] for e in entries],
        side=[e[1] for e in entries],
        labels=labels,
        class_names=list(source.class_names),
        task=d.task,
        sources=[e[3] for e in entries],
        skipped=skipped,
        root=root,
    )


def _identity(source: DataSource, i: int) -> str:
    """What a cached row of one image is valid for: the file's path, size and time, or an array row's bytes."""
    if source.files is not None:
        p = source.files[i]
        st = os.stat(p)
        return f"f:{os.path.abspath(p)}:{st.st_size}:{st.st_mtime_ns}"
    assert source.array is not None  # a source holds files or an array
    row = np.ascontiguousarray(source.array[i])
    return (
        "a:" + hashlib.blake2b(row.tobytes() + repr((row.shape, str(row.dtype))).encode(), digest_size=16).hexdigest()
    )


def _record_unreadable(samples: _Samples, unreadable: dict[int, str]) -> None:
    """Image files the scan passed but the audit could not decode go into their dataset's scan cache, so the next
    scan (and training) lists them as skipped."""
    from engine.scan_cache import record_failures

    by_dataset: dict[Path, list[tuple[str, str]]] = {}
    for i, reason in unreadable.items():
        source, position = samples.sources[i]
        if source.files is not None and source.kind in ("folder", "csv"):
            by_dataset.setdefault(Path(source.path), []).append((str(source.files[position]), reason))
    for dataset, entries in by_dataset.items():
        record_failures(dataset, entries, when="the audit")


def _pixels(source: DataSource, i: int) -> np.ndarray:
    """The decoded image as HxWx3 uint8 (files) or HxWx3 in the array's dtype (archives)."""
    if source.files is not None:
        return np.asarray(load_image(source.files[i]))
    assert source.array is not None
    chw = array_to_image(source.array[i])  # uint8 or float32 CHW, 3 channels
    return np.ascontiguousarray(chw.permute(1, 2, 0).numpy())


def _short_side(source: DataSource, i: int) -> int:
    if source.files is not None:
        from PIL import Image

        try:
            with Image.open(source.files[i]) as img:
                return min(img.size)
        except Exception:  # noqa: BLE001 - the decode pass reports the file as unreadable
            return 0
    assert source.array is not None
    return int(min(source.array.shape[1:3]))


# ---------------------------------------------------------------------------------------------
# The embedder


@dataclass
class _Embedder:
    backbone: str
    weights: str
    size: int  # input side in pixels
    canonical: int | None  # shorter side the larger images are first brought down to, or None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    note: str

    @property
    def key(self) -> str:
        text = repr((AUDIT_VERSION, self.backbone, self.weights, self.size, self.canonical, self.mean, self.std))
        return hashlib.blake2b((text + self.interpolation).encode(), digest_size=12).hexdigest()

    def describe(self) -> str:
        shrink = f", images first brought to {self.canonical} px" if self.canonical else ""
        return f"{self.backbone} ({self.weights}) at {self.size} px{shrink}"


def _embedder(cfg: ProjectConfig, median_side: int) -> _Embedder:
    from engine.backbones import preprocess_for

    m = cfg.model
    note = ""
    backbone, weights = m.backbone, m.weights
    if weights is None:
        backbone, weights = FALLBACK_BACKBONE, FALLBACK_WEIGHTS
        note = (
            f"the project's backbone {m.backbone} has no pretrained weights (model.weights is null): "
            f"embeddings from {FALLBACK_BACKBONE} with its bundled ImageNet weights"
        )
    pre = preprocess_for(
        ModelConfig(backbone=backbone, weights=weights), cfg.data.model_copy(update={"keep_aspect": False})
    )
    crop = pre.crop_size
    size = crop
    if median_side and median_side * 4 < crop:
        # An 8-px digit upscaled to 224 px costs 12x the compute of 64 px and holds no more detail.
        size = min(crop, max(MIN_INPUT, 32 * math.ceil(median_side * 4 / 32)))
    canonical = median_side if 0 < median_side < size else None
    return _Embedder(backbone, weights, size, canonical, pre.mean, pre.std, pre.interpolation, note)


def _build_network(emb: _Embedder) -> Any:
    import torch
    from torch import nn

    from engine.backbones import build_model

    built = build_model(ModelConfig(backbone=emb.backbone, weights=emb.weights), 1)
    model = built.model
    parent, _, attr = built.head_name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())  # pooled pre-logit features
    model.eval()
    return model.to(memory_format=torch.channels_last)


def _model_input(pixels: np.ndarray, emb: _Embedder) -> Any:
    import torch
    import torchvision.transforms.v2.functional as F

    t = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)  # a writable copy (a decoded image may be read-only)
    mode = {"bilinear": F.InterpolationMode.BILINEAR, "nearest": F.InterpolationMode.NEAREST}.get(
        emb.interpolation, F.InterpolationMode.BICUBIC
    )
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    if emb.canonical is not None and min(t.shape[1:]) > emb.canonical:
        # Area averaging: a copy enlarged by a whole factor comes back to exactly its source's pixels.
        h, w = t.shape[1:]
        scale = emb.canonical / min(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        t = torch.nn.functional.interpolate(t[None], size=size, mode="area")[0]
    t = F.resize(t, emb.size, interpolation=mode, antialias=True)
    t = F.center_crop(t, [emb.size, emb.size])
    return F.normalize(t.clamp(0.0, 1.0), list(emb.mean), list(emb.std))


# ---------------------------------------------------------------------------------------------
# The disk cache


def cache_dir() -> Path:
    """Where audits keep embeddings, reports and Keep decisions: the workbench's cache folder, audit/."""
    from engine.scan_cache import cache_root

    return cache_root() / "audit"


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_text(path: Path, text: str) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    _atomic_write(path, write)


def _root_digest(root: Path) -> str:
    return hashlib.blake2b(str(root.resolve()).encode(), digest_size=10).hexdigest()


# Per image: width, height, mean luminance, luminance std, 99th percentile of luminance (0..1)
_STATS = 5
THUMB = 16  # px: the greyscale thumbnail the pixel check compares (an image's shorter side, if smaller)


def _per_image(
    samples: _Samples,
    emb: _Embedder,
    ids: list[str],
    folder: Path,
    progress: Progress | None,
    stop: threading.Event | None,
) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray, dict[int, str], bool]:
    """Embeddings, pixel hashes, stats and thumbnails of every sample: from the cache where its row is still valid."""
    n = len(ids)
    file = folder / f"embeddings-{emb.key}-{_root_digest(samples.root)}.npz"
    cached: dict[str, int] = {}
    old: Any = None
    if file.is_file():
        try:
            old = dict(np.load(file, allow_pickle=False))
            if "thumbs" not in old:
                raise KeyError("thumbs")
            cached = {str(k): j for j, k in enumerate(old["ids"].tolist())}
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed
            old, cached = None, {}
    todo = [i for i in range(n) if ids[i] not in cached]
    dims = int(old["emb"].shape[1]) if old is not None and len(old["emb"]) else 0
    hashes = [""] * n
    stats = np.zeros((n, _STATS), dtype=np.float32)
    thumbs = np.zeros((n, THUMB, THUMB), dtype=np.uint8)
    rows: dict[int, np.ndarray] = {}
    for i in range(n):
        j = cached.get(ids[i])
        if j is not None:
            hashes[i] = str(old["hashes"][j])
            stats[i] = old["stats"][j]
            thumbs[i] = old["thumbs"][j]
            rows[i] = old["emb"][j]
    unreadable: dict[int, str] = {}
    if todo:
        import torch

        model = _build_network(emb)
        batch = max(1, PIXELS_PER_BATCH // (emb.size * emb.size))
        if progress is not None:
            progress("embed", 0, len(todo))
        with torch.inference_mode():
            for start in range(0, len(todo), batch):
                if stop is not None and stop.is_set():
                    raise AuditStopped
                part = todo[start : start + batch]
                inputs, good = [], []
                for i in part:
                    try:
                        pixels = _pixels(*samples.sources[i])
                    except Exception as exc:  # noqa: BLE001 - listed as unreadable, never a crash
                        unreadable[i] = str(exc).strip() or type(exc).__name__
                        continue
                    hashes[i] = hashlib.blake2b(
                        repr((pixels.shape, str(pixels.dtype))).encode() + pixels.tobytes(), digest_size=16
                    ).hexdigest()
                    stats[i] = _image_stats(pixels)
                    thumbs[i] = thumbnail(pixels)
                    inputs.append(_model_input(pixels, emb))
                    good.append(i)
                if inputs:
                    x = torch.stack(inputs).contiguous(memory_format=torch.channels_last)
                    out = model(x).float().reshape(len(good), -1).numpy()
                    dims = out.shape[1]
                    for i, row in zip(good, out, strict=True):
                        rows[i] = row.astype(np.float16)
                if progress is not None:
                    progress("embed", min(start + batch, len(todo)), len(todo))
    embeddings = np.zeros((n, dims), dtype=np.float16)
    for i, row in rows.items():
        embeddings[i] = row
    if todo and (stop is None or not stop.is_set()):
        good_rows = [i for i in range(n) if i not in unreadable]
        keep_old = []
        if old is not None:  # rows of images not in this audit stay (another split, a file moved back)
            current = {ids[i] for i in good_rows}
            keep_old = [j for k, j in cached.items() if k not in current]

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(
                    fh,
                    ids=np.array([ids[i] for i in good_rows] + [str(old["ids"][j]) for j in keep_old]),
                    emb=np.concatenate([embeddings[good_rows], old["emb"][keep_old]])
                    if keep_old
                    else embeddings[good_rows],
                    hashes=np.array([hashes[i] for i in good_rows] + [str(old["hashes"][j]) for j in keep_old]),
                    stats=np.concatenate([stats[good_rows], old["stats"][keep_old]]) if keep_old else stats[good_rows],
                    thumbs=np.concatenate([thumbs[good_rows], old["thumbs"][keep_old]])
                    if keep_old
                    else thumbs[good_rows],
                )

        _atomic_write(file, write)
    return embeddings, hashes, stats, thumbs, unreadable, not todo


def _image_stats(pixels: np.ndarray) -> np.ndarray:
    values = pixels.astype(np.float32)
    if pixels.dtype == np.uint8:
        values /= 255.0
    lum = values @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    h, w = pixels.shape[:2]
    return np.array([w, h, lum.mean(), lum.std(), np.percentile(lum, 99)], dtype=np.float32)


def _luminance(pixels: np.ndarray) -> np.ndarray:
    values = pixels.astype(np.float32)
    if pixels.dtype == np.uint8:
        values /= 255.0
    out: np.ndarray = np.clip(values @ np.array([0.299, 0.587, 0.114], dtype=np.float32), 0.0, 1.0)
    return out


def _area(grey: np.ndarray, side: int) -> np.ndarray:
    """A greyscale image (0..1) brought to side x side px by area averaging (PIL's box filter)."""
    from PIL import Image

    if grey.shape == (side, side):
        return grey.astype(np.float32)
    return np.asarray(Image.fromarray(grey.astype(np.float32), mode="F").resize((side, side), Image.Resampling.BOX))


def thumbnail(pixels: np.ndarray) -> np.ndarray:
    """THUMB x THUMB uint8: the greyscale image area-averaged to s x s px, s = min(THUMB, its shorter side),
    in the top-left corner (s follows from the image's size, kept in its stats)."""
    h, w = pixels.shape[:2]
    side = max(1, min(THUMB, h, w))
    out = np.zeros((THUMB, THUMB), dtype=np.uint8)
    out[:side, :side] = np.round(_area(_luminance(pixels), side) * 255.0)
    return out


def pixel_residual(thumb_a: np.ndarray, side_a: int, thumb_b: np.ndarray, side_b: int) -> float:
    """How far two images' pixels are from the same picture: both thumbnails brought to the smaller one's size
    (area averaging again: a copy enlarged by a whole factor comes back to its source's pixels), then the residual
    of the best linear fit of one on the other (brightness and contrast may change), as a share of the image's
    own contrast: sqrt(1 - r^2) for a positive correlation r, 1 otherwise. A recompressed or resampled copy stays
    at a few percent; a different image of the same thing (another writer's 1) is well above."""
    side = max(1, min(side_a, side_b))
    a = _area(thumb_a[:side_a, :side_a].astype(np.float32) / 255.0, side).ravel()
    b = _area(thumb_b[:side_b, :side_b].astype(np.float32) / 255.0, side).ravel()
    a, b = a - a.mean(), b - b.mean()
    na, nb = float(np.sqrt(a @ a)), float(np.sqrt(b @ b))
    flat = 1e-3 * math.sqrt(a.size)  # an RMS contrast under 0.1% of full scale: a uniform image
    if na < flat or nb < flat:
        return 0.0 if na < flat and nb < flat else 1.0
    r = float(a @ b) / (na * nb)
    return math.sqrt(max(0.0, 1.0 - r * r)) if r > 0 else 1.0


# ---------------------------------------------------------------------------------------------
# Near-duplicate search: an index over projected embeddings, confirmed in full


def normalise(x: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Rows scaled to unit length, in float16 (half the memory; distances are computed in float32 per chunk)."""
    out = np.empty(x.shape, dtype=np.float16)
    for s in range(0, len(x), chunk):
        part = x[s : s + chunk].astype(np.float32)
        norms = np.linalg.norm(part, axis=1, keepdims=True)
        out[s : s + chunk] = part / np.maximum(norms, 1e-12)
    return out


def neighbour_candidates(
    unit: np.ndarray,
    k: int,
    dims: int,
    seed: int = 0,
    stop: threading.Event | None = None,
    exact_up_to: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest candidates of every row (indices, their exact distances), from an index in PCA space.

    unit: rows of unit length. The index (scikit-learn's NearestNeighbors) holds only the projected rows; each
    candidate's distance is then computed on the full rows, chunk by chunk.
    """
    from threadpoolctl import threadpool_limits

    # One BLAS/OpenMP thread: on a busy 2-CPU machine idle threads spinning for work made this 15x slower
    # (10 s against 0.65 s for 1,797 rows, measured here); the work is chunked small anyway.
    with threadpool_limits(limits=1):
        return _neighbour_candidates(unit, k, dims, seed, stop, EXACT_UP_TO if exact_up_to is None else exact_up_to)


def _neighbour_candidates(
    unit: np.ndarray, k: int, dims: int, seed: int, stop: threading.Event | None, exact_up_to: int
) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.decomposition import PCA

    n, d = unit.shape
    k = min(k, n - 1)
    if k < 1:
        return np.zeros((n, 0), dtype=np.int64), np.zeros((n, 0), dtype=np.float32)
    p = min(dims, d, n)
    rng = np.random.default_rng(seed)
    fit_rows = unit if n <= 20000 else unit[np.sort(rng.choice(n, 20000, replace=False))]
    pca = PCA(n_components=p, svd_solver="randomized", random_state=seed).fit(fit_rows.astype(np.float32))
    projected = np.empty((n, p), dtype=np.float32)
    for s in range(0, n, 8192):
        projected[s : s + 8192] = pca.transform(unit[s : s + 8192].astype(np.float32))
    if stop is not None and stop.is_set():
        raise AuditStopped
    candidates = _projected_neighbours(projected, k, seed, stop, exact_up_to)
    found = np.empty((n, k), dtype=np.int64)
    dist = np.empty((n, k), dtype=np.float32)
    step = 512  # rows per chunk: their candidates' full rows take 512 x k x d floats (26 MB at 1,280-d)
    for s in range(0, n, step):
        if stop is not None and stop.is_set():
            raise AuditStopped
        rows = np.arange(s, min(s + step, n))
        keep = candidates[rows]
        a = unit[rows].astype(np.float32)
        b = unit[keep].astype(np.float32)
        # unit rows: |a - b|^2 = |a|^2 + |b|^2 - 2 a.b, with the norms as stored (float16 rounding)
        dot = np.einsum("id,ikd->ik", a, b)
        sq = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=2) - 2.0 * dot
        exact = np.sqrt(np.maximum(sq, 0.0))
        order = np.argsort(exact, axis=1)
        found[rows] = np.take_along_axis(keep, order, axis=1)
        dist[rows] = np.take_along_axis(exact, order, axis=1)
    return found, dist


EXACT_UP_TO = 20000  # rows up to which the projected index is searched exhaustively


def _projected_neighbours(
    projected: np.ndarray, k: int, seed: int, stop: threading.Event | None, exact_up_to: int
) -> np.ndarray:
    """The k nearest other rows of every row in the projected space: exhaustive up to EXACT_UP_TO rows; beyond,
    an inverted-file index (k-means cells, each row searched in its 4 nearest cells), as faiss's IVF does."""
    from sklearn.neighbors import NearestNeighbors

    n = len(projected)
    if n <= exact_up_to:
        cells, probes = 1, 1
        assign = np.zeros((n, 1), dtype=np.int64)
    else:
        from sklearn.cluster import MiniBatchKMeans

        cells, probes = int(math.sqrt(n)), 4
        rng = np.random.default_rng(seed)
        sample = projected[rng.choice(n, min(n, 50 * cells), replace=False)]
        centres = MiniBatchKMeans(n_clusters=cells, n_init=1, random_state=seed, batch_size=4096).fit(sample)
        centres_ = centres.cluster_centers_.astype(np.float32)
        assign = np.empty((n, probes), dtype=np.int64)
        for s in range(0, n, 8192):
            part = projected[s : s + 8192]
            d = (part * part).sum(1)[:, None] - 2.0 * part @ centres_.T + (centres_ * centres_).sum(1)[None, :]
            near = np.argpartition(d, probes - 1, axis=1)[:, :probes]
            order = np.argsort(np.take_along_axis(d, near, axis=1), axis=1)
            assign[s : s + 8192] = np.take_along_axis(near, order, axis=1)
    home = assign[:, 0]
    width = probes * (k + 1)
    cand_idx = np.full((n, width), -1, dtype=np.int64)
    cand_d = np.full((n, width), np.inf, dtype=np.float32)
    for c in range(cells):
        if stop is not None and stop.is_set():
            raise AuditStopped
        members = np.flatnonzero(home == c)
        if not len(members):
            continue
        m = min(k + 1, len(members))
        index = NearestNeighbors(n_neighbors=m, algorithm="brute").fit(projected[members])
        for p in range(probes):
            queries = np.flatnonzero(assign[:, p] == c)
            for s in range(0, len(queries), 4096):
                q = queries[s : s + 4096]
                d, idx = index.kneighbors(projected[q])
                cand_idx[q, p * (k + 1) : p * (k + 1) + m] = members[idx]
                cand_d[q, p * (k + 1) : p * (k + 1) + m] = d
    cand_d[cand_idx == np.arange(n)[:, None]] = np.inf  # a row is not its own neighbour
    cand_d[cand_idx < 0] = np.inf
    best = np.argsort(cand_d, axis=1, kind="stable")[:, :k]
    out = np.take_along_axis(cand_idx, best, axis=1)
    missing = ~np.isfinite(np.take_along_axis(cand_d, best, axis=1))
    if missing.any():  # fewer than k others in a row's cells: another row fills in (its true distance is measured)
        other = np.repeat(((np.arange(n) + 1) % n)[:, None], k, axis=1)
        out[missing] = other[missing]
    return out


def near_pairs(found: np.ndarray, dist: np.ndarray, factor: float) -> tuple[list[tuple[int, int, float]], float]:
    """Pairs (i < j, distance) closer than factor x the median nearest-neighbour distance, and that threshold.

    Pairs at distance 0 (identical embeddings) are left in; the caller separates exact duplicates by pixels.
    """
    if found.shape[1] == 0:
        return [], 0.0
    nearest = dist[:, 0]
    positive = nearest[nearest > 1e-6]
    median = float(np.median(positive)) if len(positive) else 0.0
    threshold = factor * median
    out: dict[tuple[int, int], float] = {}
    rows, cols = np.nonzero(dist <= threshold)
    for i, c in zip(rows.tolist(), cols.tolist(), strict=True):
        j = int(found[i, c])
        a, b = (i, j) if i < j else (j, i)
        out[(a, b)] = float(dist[i, c])
    return [(a, b, v) for (a, b), v in sorted(out.items())], threshold


def _groups(n: int, pairs: Sequence[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = {}
    for i in {x for p in pairs for x in p}:
        members.setdefault(find(i), []).append(i)
    return sorted(sorted(g) for g in members.values())


# ---------------------------------------------------------------------------------------------
# Label issues and outliers


def out_of_fold_probabilities(
    features: np.ndarray, labels: np.ndarray, num_classes: int, folds: int, stop: threading.Event | None = None
) -> np.ndarray:
    """Predicted class probabilities of every sample from a logistic-regression probe that never saw it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    probs = np.zeros((len(labels), num_classes), dtype=np.float64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=0)
    for fit_idx, held_idx in splitter.split(features, labels):
        if stop is not None and stop.is_set():
            raise AuditStopped
        # One BLAS thread: the probe's matrices are small, and idle BLAS threads spinning for work took 17x
        # longer on a busy 2-CPU machine (1.9 s against 0.11 s per fit, measured here).
        with threadpool_limits(limits=1):
            scaler = StandardScaler().fit(features[fit_idx])
            probe = LogisticRegression(C=0.5, max_iter=300)
            probe.fit(scaler.transform(features[fit_idx]), labels[fit_idx])
            probs[np.ix_(held_idx, probe.classes_)] = probe.predict_proba(scaler.transform(features[held_idx]))
    return probs


def _projected(unit: np.ndarray, dims: int) -> np.ndarray:
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):  # see neighbour_candidates
        return _pca(unit, dims, PCA)


def _pca(unit: np.ndarray, dims: int, PCA: Any) -> np.ndarray:  # noqa: N803 - the class

    p = min(dims, unit.shape[1], max(len(unit) - 1, 1))
    fit = unit if len(unit) <= 20000 else unit[np.random.default_rng(0).choice(len(unit), 20000, replace=False)]
    pca = PCA(n_components=p, svd_solver="randomized", random_state=0).fit(fit.astype(np.float32))
    return pca.transform(unit.astype(np.float32)).astype(np.float32)


def _robust_z(values: np.ndarray) -> np.ndarray:
    median = np.median(values)
    mad = np.median(np.abs(values - median)) * 1.4826
    return (values - median) / (mad if mad > 1e-9 else 1e-9)


# ---------------------------------------------------------------------------------------------
# The audit


def _fingerprint(emb: _Embedder, ids: list[str], samples: _Samples, options: AuditOptions) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((emb.key, asdict(options), samples.class_names, samples.task)).encode())
    for key, ident, side, label in zip(samples.keys, ids, samples.side, samples.labels.tolist(), strict=True):
        h.update(f"{key}\0{ident}\0{side}\0{label}\n".encode())
    h.update(repr(samples.skipped).encode())
    return h.hexdigest()


def run_audit(
    cfg: ProjectConfig,
    *,
    options: AuditOptions | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    cache: Path | None = None,
    use_cached_report: bool = True,
    cached_only: bool = False,
) -> AuditReport | None:
    """Audit the project's dataset (both sides of its split, as scanned: corrections are shown per finding by
    finding_status, not applied here). Raises AuditStopped when stop is set, DataError for an unusable dataset.

    cached_only: return the cached report of the dataset as it is now, or None (nothing is computed).
    """
    opts = options or AuditOptions()
    folder = cache if cache is not None else cache_dir()
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    def check() -> None:
        if stop is not None and stop.is_set():
            raise AuditStopped

    samples = _gather(cfg, progress, check)
    check()
    n = len(samples.keys)
    ids = [_identity(*s) for s in samples.sources]
    sides = [_short_side(*s) for s in samples.sources]
    known = [v for v in sides if v > 0]
    emb = _embedder(cfg, int(np.median(known)) if known else 0)
    fingerprint = _fingerprint(emb, ids, samples, opts)
    report_file = folder / f"report-{fingerprint}.json"
    seconds["scan"] = time.perf_counter() - started
    if use_cached_report and report_file.is_file():
        try:
            report = AuditReport.from_dict(json.loads(report_file.read_text(encoding="utf-8")))
            report.from_cache = True
            return report
        except (ValueError, TypeError, KeyError):
            pass  # a damaged or older report: audit again
    if cached_only:
        return None
    check()

    t = time.perf_counter()
    embeddings, hashes, stats, thumbs, unreadable, reused = _per_image(samples, emb, ids, folder, progress, stop)
    seconds["embed"] = time.perf_counter() - t
    check()
    notes: list[str] = []
    if emb.note:
        notes.append(emb.note)
    findings: list[Finding] = []
    for key, reason in samples.skipped:
        findings.append(Finding("unreadable", [key], 1.0, {"reason": reason}))
    for i, reason in unreadable.items():
        findings.append(Finding("unreadable", [samples.keys[i]], 1.0, {"reason": reason}))
    _record_unreadable(samples, unreadable)
    good = np.array([i for i in range(n) if i not in unreadable], dtype=np.int64)

    def names(idx: Sequence[int]) -> list[str]:
        return [samples.keys[i] for i in idx]

    def label_of(i: int) -> str | None:
        return samples.class_names[samples.labels[i]] if samples.task == "classification" else None

    def members(idx: Sequence[int]) -> list[dict[str, Any]]:
        return [{"key": samples.keys[i], "split": samples.side[i], "label": label_of(i)} for i in idx]

    # Exact duplicates: the same decoded pixels.
    t = time.perf_counter()
    by_hash: dict[str, list[int]] = {}
    for i in good.tolist():
        by_hash.setdefault(hashes[i], []).append(i)
    exact_groups = [g for g in by_hash.values() if len(g) > 1]
    twin_groups: list[tuple[str, list[int], float]] = []
    for g in exact_groups:
        labels = {label_of(i) for i in g}
        findings.append(
            Finding("exact_duplicate", names(g), 1.0, {"members": members(g), "conflicting_labels": len(labels) > 1})
        )
        twin_groups.append(("exact", g, 1.0))

    # Near duplicates: the index, confirmed on full embeddings; exact copies are not reported twice.
    unit = normalise(embeddings[good]) if len(good) else np.zeros((0, 1), dtype=np.float16)
    if progress is not None:
        progress("index", 0, 1)
    found, dist = neighbour_candidates(unit, opts.neighbours, opts.project_dims, stop=stop)
    wide = max(opts.near_factor, opts.pixel_factor)
    pairs, wide_threshold = near_pairs(found, dist, wide)
    threshold = wide_threshold * opts.near_factor / wide if wide > 0 else 0.0
    sides = np.minimum(np.minimum(stats[:, 0], stats[:, 1]), THUMB).astype(np.int64)
    near: list[tuple[int, int, float, float]] = []  # (a, b, embedding distance, pixel residual)
    for a, b, d in pairs:
        i, j = int(good[a]), int(good[b])
        if hashes[i] == hashes[j]:
            continue  # an exact copy, reported as such
        residual = pixel_residual(thumbs[i], int(sides[i]), thumbs[j], int(sides[j]))
        if d <= threshold or residual <= opts.pixel_residual:
            near.append((i, j, d, residual))
    edge = {(a, b): (d, r) for a, b, d, r in near}
    for g in _groups(n, [(a, b) for a, b, _, _ in near]):
        inside = set(g)
        edges = [v for (a, b), v in edge.items() if a in inside and b in inside]
        loosest = max(d for d, _ in edges)
        similarity = 1.0 - loosest**2 / 2.0  # cosine similarity of the loosest link
        labels = {label_of(i) for i in g}
        findings.append(
            Finding(
                "near_duplicate",
                names(g),
                round(similarity, 6),
                {
                    "members": members(g),
                    "conflicting_labels": len(labels) > 1,
                    "distance": round(loosest, 6),
                    "pixel_residual": round(max(r for _, r in edges), 6),
                },
            )
        )
        twin_groups.append(("near", g, similarity))
    seconds["duplicates"] = time.perf_counter() - t
    if progress is not None:
        progress("index", 1, 1)
    check()

    # Leakage: twins on both sides of the split.
    val_total = sum(1 for i in good.tolist() if samples.side[i] == "val")
    leaking_val: set[int] = set()
    for how, g, similarity in twin_groups:
        train = [i for i in g if samples.side[i] == "train"]
        val = [i for i in g if samples.side[i] == "val"]
        if train and val:
            leaking_val.update(val)
            findings.append(
                Finding(
                    "leakage",
                    names(g),
                    round(similarity, 6),
                    {
                        "how": how,
                        "train_keys": names(train),
                        "val_keys": names(val),
                        "pairs": [[samples.keys[a], samples.keys[b]] for a in train for b in val],
                    },
                )
            )
    fraction = len(leaking_val) / val_total if val_total else 0.0
    leakage: dict[str, Any] = {
        "val_with_twin": len(leaking_val),
        "val_total": val_total,
        "fraction": round(fraction, 6),
        "val_keys": sorted(names(sorted(leaking_val))),
    }
    if leaking_val:
        notes.append(
            f"{len(leaking_val)} of {val_total} validation images ({100 * fraction:.1f}%) have a twin "
            "in training: validation accuracy counts them as seen, so it overstates accuracy on new images by up "
            f"to {100 * fraction:.1f} points"
        )

    # Label issues: K-fold linear probe + confident learning.
    t = time.perf_counter()
    features = _projected(unit, 128) if len(unit) > 2 else unit.astype(np.float32)
    labels_good = samples.labels[good] if len(good) else np.zeros(0, dtype=np.int64)
    present = np.unique(labels_good) if samples.task == "classification" else np.zeros(0, dtype=np.int64)
    if samples.task != "classification":
        notes.append(f"label checks skipped: data.task is '{samples.task}'; they need classification labels")
    elif len(present) < 2:
        only = samples.class_names[int(present[0])] if len(present) else "none"
        notes.append(
            f"label checks skipped: the dataset has one class ('{only}'); label errors and class balance need "
            "two or more classes"
        )
    else:
        counts = np.bincount(labels_good, minlength=len(samples.class_names))
        smallest = int(counts[present].min())
        folds = min(opts.folds, smallest)
        if folds < 2:
            notes.append(
                "label checks skipped: a class has a single readable image, too few for a K-fold probe (the "
                "smallest class needs 2 images)"
            )
        else:
            from cleanlab.filter import find_label_issues
            from cleanlab.rank import get_label_quality_scores

            if progress is not None:
                progress("labels", 0, 1)
            # cleanlab wants classes 0..K-1 all present: map the present classes onto that range
            remap = {int(c): j for j, c in enumerate(present.tolist())}
            dense = np.array([remap[int(v)] for v in labels_good], dtype=np.int64)
            probs = out_of_fold_probabilities(features, dense, len(present), folds, stop)
            probs = np.clip(probs, 1e-9, None)
            probs /= probs.sum(axis=1, keepdims=True)
            flagged = find_label_issues(dense, probs, return_indices_ranked_by="self_confidence")
            quality = get_label_quality_scores(dense, probs, method="self_confidence")
            for j in np.asarray(flagged).tolist():
                i = int(good[j])
                suggested = int(present[int(np.argmax(probs[j]))])
                findings.append(
                    Finding(
                        "label_issue",
                        [samples.keys[i]],
                        round(float(1.0 - quality[j]), 6),
                        {
                            "given": samples.class_names[samples.labels[i]],
                            "suggested": samples.class_names[suggested],
                            "suggested_probability": round(float(probs[j].max()), 6),
                            "split": samples.side[i],
                        },
                    )
                )
            if progress is not None:
                progress("labels", 1, 1)
    seconds["labels"] = time.perf_counter() - t
    check()

    # Outliers: far from the nearest images of their own class.
    t = time.perf_counter()
    groups: dict[int, list[int]] = {}
    for j, i in enumerate(good.tolist()):
        groups.setdefault(int(samples.labels[i]), []).append(j)
    from sklearn.neighbors import NearestNeighbors

    space = features[:, : min(64, features.shape[1])] if len(features) else features
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):  # see neighbour_candidates
        for cls, idx in groups.items():
            if len(idx) < opts.outlier_k + 2:
                continue
            x = space[idx]
            k = opts.outlier_k
            d_k, _ = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
            score = d_k[:, 1:].mean(axis=1)
            z = _robust_z(score)
            for local in np.flatnonzero(z > opts.outlier_z).tolist():
                i = int(good[idx[local]])
                findings.append(
                    Finding(
                        "outlier",
                        [samples.keys[i]],
                        round(float(z[local]), 4),
                        {"class": samples.class_names[cls] if cls >= 0 else None, "knn_distance": float(score[local])},
                    )
                )
    seconds["outliers"] = time.perf_counter() - t

    # Image properties.
    readable = stats[good] if len(good) else np.zeros((0, _STATS), dtype=np.float32)
    median_short = float(np.median(np.minimum(readable[:, 0], readable[:, 1]))) if len(readable) else 0.0
    if 0 < median_short < 32:
        notes.append(
            f"the images are small (median shorter side {median_short:g} px): the backbone sees them enlarged "
            f"to {emb.size} px"
        )
    for j, i in enumerate(good.tolist()):
        w, h, mean, std, p99 = (float(v) for v in readable[j])
        problems: list[tuple[str, float]] = []
        if std < opts.uniform_std:
            problems.append(("nearly_uniform", 1.0 - std / opts.uniform_std))
        if p99 < opts.dark_p99:
            problems.append(("very_dark", 1.0 - p99 / opts.dark_p99))
        if median_short and min(w, h) < opts.tiny_fraction * median_short:
            problems.append(("tiny", 1.0 - min(w, h) / (opts.tiny_fraction * median_short)))
        ratio = max(w, h) / max(min(w, h), 1.0)
        if ratio >= opts.aspect_ratio:
            problems.append(("extreme_aspect_ratio", ratio))
        for prop, score_ in problems:
            findings.append(
                Finding(
                    "image_property",
                    [samples.keys[i]],
                    round(float(score_), 4),
                    {"property": prop, "width": int(w), "height": int(h), "mean": round(mean, 4), "std": round(std, 4)},
                )
            )

    # Class balance.
    balance: dict[str, Any] = {}
    if samples.task == "classification" and len(present) >= 2:
        k_all = len(samples.class_names)
        all_counts = np.bincount(labels_good, minlength=k_all).tolist()
        train_mask = np.array([samples.side[i] == "train" for i in good.tolist()], dtype=bool)
        train_counts = np.bincount(labels_good[train_mask], minlength=k_all).tolist()
        nonzero = [c for c in train_counts if c > 0]
        ratio = max(nonzero) / min(nonzero) if nonzero else 1.0
        fixes = [
            {"loader.sampler.name": "weighted_random", "loader.sampler.weights": "balanced"},
            {"loss.class_weights": "balanced"},
        ]
        balance = {
            "classes": samples.class_names,
            "counts": all_counts,
            "train_counts": train_counts,
            "imbalance_ratio": round(ratio, 4),
            "fixes": fixes,
        }
        if ratio >= opts.imbalance_ratio:
            largest = samples.class_names[int(np.argmax(train_counts))]
            smallest_name = samples.class_names[int(np.argmin([c if c else 10**12 for c in train_counts]))]
            findings.append(
                Finding(
                    "class_imbalance",
                    [],
                    round(ratio, 4),
                    {"largest": largest, "smallest": smallest_name, "fixes": fixes},
                )
            )

    findings.sort(key=lambda f: (KINDS.index(f.kind), -f.score, f.keys))
    seconds["total"] = time.perf_counter() - started
    report = AuditReport(
        dataset=str(samples.root),
        fingerprint=fingerprint,
        embedder=emb.describe() + (" (embeddings from the cache)" if reused else ""),
        samples=n,
        train=sum(1 for s in samples.side if s == "train"),
        val=sum(1 for s in samples.side if s == "val"),
        class_names=samples.class_names,
        findings=findings,
        balance=balance,
        leakage=leakage,
        notes=notes
        + [
            f"near-duplicate threshold: embedding distance <= {threshold:.4f}, or <= {wide_threshold:.4f} with "
            f"pixels that agree (linear-fit residual <= {opts.pixel_residual:g} of the image's contrast)"
        ],
        seconds={k: round(v, 3) for k, v in seconds.items()},
    )
    check()
    _write_text(report_file, json.dumps(report.to_dict()))
    return report


# ---------------------------------------------------------------------------------------------
# Acting on findings: statuses against the project's corrections, and Keep decisions


def _keep_file(cfg: ProjectConfig, folder: Path | None = None) -> Path:
    from engine.corrections import root_of

    return (folder if folder is not None else cache_dir()) / f"keep-{_root_digest(root_of(cfg))}.json"


def kept_findings(cfg: ProjectConfig, folder: Path | None = None) -> set[str]:
    """Ids of the findings the user marked Keep (not an issue) for this project's dataset."""
    file = _keep_file(cfg, folder)
    try:
        return set(json.loads(file.read_text(encoding="utf-8")).get("kept", []))
    except (OSError, ValueError, AttributeError):
        return set()


def set_kept(cfg: ProjectConfig, finding_id: str, kept: bool = True, folder: Path | None = None) -> None:
    """Remember (or forget) that a finding is not an issue."""
    from engine.corrections import root_of

    ids = kept_findings(cfg, folder)
    if kept:
        ids.add(finding_id)
    else:
        ids.discard(finding_id)
    data = {"dataset": str(root_of(cfg)), "kept": sorted(ids)}
    _write_text(_keep_file(cfg, folder), json.dumps(data, indent=1))


def finding_status(finding: Finding, cfg: ProjectConfig, kept: set[str]) -> str:
    """open, kept, excluded (the project's corrections take the finding's problem out) or relabelled."""
    if finding.id in kept:
        return "kept"
    exclude = set(cfg.data.exclude)
    if finding.kind in ("exact_duplicate", "near_duplicate"):
        return "excluded" if sum(1 for k in finding.keys if k not in exclude) <= 1 else "open"
    if finding.kind == "leakage":
        val = finding.detail.get("val_keys", [])
        train = finding.detail.get("train_keys", [])
        return "excluded" if all(k in exclude for k in val) or all(k in exclude for k in train) else "open"
    if finding.kind == "label_issue":
        key = finding.keys[0]
        if key in exclude:
            return "excluded"
        return "relabelled" if key in cfg.data.relabel else "open"
    if finding.kind == "class_imbalance":
        fixed = cfg.loader.sampler.name == "weighted_random" or cfg.loss.class_weights is not None
        return "fixed" if fixed else "open"
    return "excluded" if finding.keys and all(k in exclude for k in finding.keys) else "open"


def image_for_key(cfg: ProjectConfig, key: str) -> np.ndarray:
    """The pixels (HxWx3) of the dataset image a sample key names: a file under the dataset root, or an archive row."""
    from engine.corrections import root_of

    root = root_of(cfg)
    if key.startswith(("#", "val#")):
        validation = key.startswith("val#")
        archive = cfg.resolve(cfg.data.val_path if validation else cfg.data.path)
        assert archive is not None  # a key of an archive row comes from a configured archive
        with np.load(archive, allow_pickle=False) as data:
            row = data["X"][int(key.split("#", 1)[1])]
        chw = array_to_image(row if row.ndim == 3 else row[..., None])
        pixels = chw.permute(1, 2, 0).numpy()
        if pixels.dtype != np.uint8:
            pixels = np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(pixels)
    return np.asarray(load_image(root / key))


def leakage_fix(report: AuditReport) -> list[str]:
    """The validation images to exclude so that no validation image has a twin in training."""
    return list(report.leakage.get("val_keys", []))


def report_json(report: AuditReport, cfg: ProjectConfig, folder: Path | None = None) -> dict[str, Any]:
    """The report as the CLI writes it: every finding with its kind, images, score and status."""
    kept = kept_findings(cfg, folder)
    data = report.to_dict()
    data["findings"] = [
        {
            "id": f.id,
            "kind": f.kind,
            "keys": f.keys,
            "score": f.score,
            "status": finding_status(f, cfg, kept),
            **f.detail,
        }
        for f in report.findings
    ]
    data["counts"] = {kind: len(report.of_kind(kind)) for kind in KINDS}
    return data
