"""Frozen-backbone feature cache: run the frozen start of the network once per sample, train the rest on the result.

When the frozen part of a model is a prefix of its forward pass and the training images are not augmented, every
epoch computes exactly the same prefix output for a sample. This module finds that prefix (the leading module calls
without a trainable parameter), cuts the model at a module boundary, verifies on a real batch that the rest of the
network applied to the boundary output gives what the whole model gives, computes the boundary output once for the
training and validation sets, and serves it in the same batches the image loaders would have drawn: the project's
own batch sampler and its generator are reused, so a cached run sees exactly the batches of an uncached one and a
checkpoint's loader state stays valid.

The suffix model shares every parameter and submodule with the real model (only the modules on the path to the
cut are shallow copies), so the optimizer, checkpoints and evaluation keep working on the real, full model.
Computed features are kept in a small process-level cache keyed by everything they depend on, so training the same
project again (pressing Train twice in the app) skips the computation.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import BatchSampler

from engine.config import ProjectConfig
from engine.freezing import set_frozen_batchnorm_eval
from engine.machine import available_memory_bytes
from engine.sample_failures import batch_failures
from engine.transforms import augmentations_on

if TYPE_CHECKING:
    from engine.data import EngineDataset
    from engine.trainer import RunParts

# When the available memory cannot be read (not Linux), the bound that train.feature_cache_max_mb = null means.
FALLBACK_MAX_MB = 2048
# How many cut points are tried (longest first) before giving up; each costs a few forwards of one small batch.
MAX_CANDIDATES = 6
# Full model vs suffix on the same features: the same operations on the same numbers, so all but equal.
VERIFY_RTOL, VERIFY_ATOL = 1e-5, 1e-6


class _Stop(Exception):
    """Raised by a forward hook at the cut, so the rest of the forward pass is skipped."""


@dataclass
class CacheStats:
    """How often features were computed and reused in this process (read by tests and the benchmark)."""

    computed: int = 0  # splits whose features were computed (train and validation count one each)
    reused: int = 0  # splits whose features came from the process-level cache

    def reset(self) -> None:
        self.computed = self.reused = 0


stats = CacheStats()


# ---------------------------------------------------------------------------------------------
# Eligibility


def eligibility_problem(cfg: ProjectConfig) -> str | None:
    """Why the project's settings rule the cache out, or None; the model itself is checked by find_boundary."""
    if cfg.train.feature_cache == "off":
        return "train.feature_cache = 'off'"
    if cfg.data.kind == "webdataset":
        return "the data is streamed from shards (data.kind = 'webdataset'), read in order once per epoch"
    on = augmentations_on(cfg.data.augment)
    if on:
        return (
            "train augmentation is on ("
            + ", ".join(f"data.augment.{n}" for n in on)
            + "), so every epoch sees different images"
        )
    if cfg.data.keep_aspect:
        return "data.keep_aspect = true pads each batch to its own size, so features depend on the batch"
    if cfg.model.train_frozen_batchnorm:
        return "model.train_frozen_batchnorm = true updates the frozen layers' BatchNorm statistics every batch"
    return None


def max_bytes(cfg: ProjectConfig) -> int:
    """The memory bound: train.feature_cache_max_mb, or half of the memory available now."""
    if cfg.train.feature_cache_max_mb is not None:
        return int(cfg.train.feature_cache_max_mb * 2**20)
    from engine.distributed import local_processes

    available = available_memory_bytes()
    # several processes on this machine each cache the whole data set: they share the bound
    return (available // 2 if available is not None else FALLBACK_MAX_MB * 2**20) // local_processes()


# ---------------------------------------------------------------------------------------------
# Finding the cut


@dataclass
class Boundary:
    """Where the model is cut: the top-most modules replaced in the suffix, and the one whose output is the feature."""

    replaced: list[str]
    output: str


def _trainable(module: nn.Module, recurse: bool) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=recurse))


def _frozen_call(module: nn.Module) -> bool:
    """A call that gives the same output for a sample every epoch as far as parameters go: no trainable parameter
    of its own, and not a BatchNorm normalising with batch statistics."""
    if _trainable(module, recurse=False):
        return False
    return not (isinstance(module, _BatchNorm) and module.training)


def record_calls(model: nn.Module, inputs: torch.Tensor) -> tuple[list[str], int]:
    """Names of the modules (root excluded) in the order their forward starts, for one forward of inputs, and
    the number of leading calls that drew no random numbers (dropout, drop-path and the like draw some)."""
    calls: list[str] = []
    state = [_rng_states(inputs.device)]
    random_from: list[int | None] = [None]

    def pre_hook(_module: nn.Module, _inputs: Any, name: str) -> None:
        if random_from[0] is None:
            now = _rng_states(inputs.device)
            if not _equal_states(now, state[0]):
                random_from[0] = max(len(calls) - 1, 0)  # the previous call (or code of its own) drew
            state[0] = now
        calls.append(name)

    hooks = []
    try:
        for name, module in model.named_modules():
            if name:
                hooks.append(module.register_forward_pre_hook(lambda m, i, name=name: pre_hook(m, i, name)))
        with torch.no_grad():
            model(inputs)
    finally:
        for h in hooks:
            h.remove()
    return calls, len(calls) if random_from[0] is None else random_from[0]


def _rng_states(device: torch.device) -> list[torch.Tensor]:
    """The random states a forward on device draws from (dropout on a GPU uses the GPU's generator)."""
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _equal_states(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def candidate_boundaries(model: nn.Module, calls: Sequence[str], limit: int | None = None) -> list[Boundary]:
    """Module-aligned cuts inside the frozen prefix of calls (and within its first `limit` calls), longest first."""
    modules = dict(model.named_modules())
    k = next((i for i, name in enumerate(calls) if not _frozen_call(modules[name])), len(calls))
    if limit is not None:
        k = min(k, limit)
    # For each module: the last position at which it or a descendant is called (-1 if never).
    last: dict[str, int] = {}
    first: dict[str, int] = {}
    count: dict[str, int] = {}
    for pos, name in enumerate(calls):
        count[name] = count.get(name, 0) + 1
        first.setdefault(name, pos)
        for prefix in _ancestry(name):
            last[prefix] = pos
    trainable = {name: _trainable(m, recurse=True) for name, m in modules.items() if name}
    names = [n for n in modules if n]  # pre-order: a module's descendants follow it
    out: list[Boundary] = []
    for j in range(k, 0, -1):
        # The top-most modules that are called, finish before position j and hold no trainable parameter.
        replaced: list[str] = []
        for name in names:
            if replaced and _under(name, replaced[-1:]):
                continue
            if name in first and last[name] < j and not trainable[name]:
                replaced.append(name)
        # Every call before j must be inside a replaced module, or be a container of one (it stays in the
        # suffix and runs its replaced children as identities); the last replaced module must end at j - 1.
        chosen = set(replaced)
        containers = {a for name in replaced for a in _ancestry(name)[:-1]}
        if not replaced or not all(
            calls[p] in containers or any(a in chosen for a in _ancestry(calls[p])) for p in range(j)
        ):
            continue
        boundary = max(replaced, key=lambda n: first[n])
        if last[boundary] != j - 1 or count[boundary] != 1:
            continue
        out.append(Boundary(replaced=replaced, output=boundary))
    return out


def _ancestry(name: str) -> list[str]:
    """A dotted module name and its ancestors' names (root excluded): a.b.c -> a, a.b, a.b.c."""
    parts = name.split(".")
    return [".".join(parts[:depth]) for depth in range(1, len(parts) + 1)]


def _under(name: str, tops: Sequence[str]) -> bool:
    return any(name == t or name.startswith(t + ".") for t in tops)


def build_suffix(model: nn.Module, replaced: Sequence[str]) -> nn.Module:
    """The model with the replaced modules swapped for nn.Identity, sharing all else with model (never mutated).

    Modules on the path from the root to a replaced module are shallow copies with their own _modules dict;
    everything below them, parameters and buffers included, is the real model's.
    """
    root = _shallow(model)
    for name in replaced:
        owner = root
        parts = name.split(".")
        for part in parts[:-1]:
            child = owner._modules[part]
            assert child is not None  # replaced names are paths to submodules
            if not getattr(child, "_feature_cache_copy", False):
                child = _shallow(child)
                owner._modules[part] = child
            owner = child
        owner._modules[parts[-1]] = nn.Identity()
    return root


def _shallow(module: nn.Module) -> nn.Module:
    clone = copy.copy(module)
    clone._modules = OrderedDict(module._modules)
    object.__setattr__(clone, "_feature_cache_copy", True)
    return clone


def capture(model: nn.Module, boundary: str, inputs: torch.Tensor) -> Any:
    """The output of the boundary module for inputs; the forward stops there."""
    got: list[Any] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        got.append(output)
        raise _Stop

    handle = model.get_submodule(boundary).register_forward_hook(hook)
    try:
        model(inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not got:
        raise RuntimeError(f"the forward pass never reached {boundary}")
    return got[0]


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Every generator seeded alike, and put back as it was afterwards."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
        torch.manual_seed(seed)
        yield


def _training_mode(model: nn.Module, frozen_bn: Sequence[str]) -> None:
    model.train()
    set_frozen_batchnorm_eval(model, list(frozen_bn))


def _same(a: Any, b: Any, rtol: float = VERIFY_RTOL, atol: float = VERIFY_ATOL) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol)
    if a is None or b is None:
        return a is b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], rtol, atol) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return all(_same(x, y, rtol, atol) for x, y in zip(a, b, strict=True))
    try:
        return type(a) is type(b) and bool(a == b)
    except (RuntimeError, TypeError, ValueError):
        return False


def verify(
    model: nn.Module,
    frozen_bn: Sequence[str],
    boundary: Boundary,
    inputs: torch.Tensor,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> str | None:
    """None when the cut is exact on inputs, else why not. The model's running statistics may move (in training
    mode), so pass a copy of the real model."""
    _training_mode(model, frozen_bn)
    name = boundary.output
    try:
        with torch.no_grad(), autocast():
            # The whole model, and the rest of it from the boundary output: the same result. The output is
            # captured with the forward stopped there (a later in-place operation would change it otherwise)
            # and the suffix gets copies (its first operation may be in place).
            features = capture(model, name, inputs)
            if not isinstance(features, torch.Tensor) or not features.is_floating_point():
                return f"{name} does not output one floating-point tensor"
            with _seeded(3):
                full = model(inputs)
            suffix = build_suffix(model, boundary.replaced)
            with _seeded(3):
                cut = suffix(features.clone())
    except Exception as exc:  # noqa: BLE001 - a cut the forward pass does not fit is just not usable
        return f"the rest of the model cannot start from {name}'s output ({_first_line(exc)})"
    if not _same(full, cut):
        return f"the rest of the model does not start from {name}'s output alone"
    with torch.no_grad(), autocast():
        # The frozen part: the same output whatever the random state, without drawing random numbers, and
        # per sample (a batch of half the samples gives the same rows).
        with _seeded(1):
            before = _rng_states(inputs.device)
            again = capture(model, name, inputs)
            drew = not _equal_states(before, _rng_states(inputs.device))
        if drew or not torch.equal(again, features):
            return f"the frozen part up to {name} is random in training mode (dropout or drop-path)"
        if inputs.shape[0] >= 2:
            half = inputs.shape[0] // 2
            if not _same(capture(model, name, inputs[:half]), features[:half], rtol=1e-4, atol=1e-5):
                return f"the frozen part up to {name} mixes the samples of a batch"
        # Evaluation mode, in which validation features are computed and validation runs.
        model.eval()
        suffix.eval()
        evaluated = capture(model, name, inputs)
        full_eval = model(inputs)
        cut_eval = suffix(evaluated.clone())
        _training_mode(model, frozen_bn)
        suffix.train()
    if not _same(full_eval, cut_eval):
        return f"the rest of the model in evaluation mode does not start from {name}'s output alone"
    # The same gradients for every trainable parameter: one used functionally before the cut would get none.
    with autocast(), _seeded(3):
        full = model(inputs)
    full_grads = _gradients(model, full)
    with autocast(), _seeded(3):
        cut = suffix(features.clone())
    if not _same(full_grads, _gradients(model, cut)):
        return f"a trainable parameter is used before {name}"
    return None


def _gradients(model: nn.Module, output: Any) -> list[Any]:
    """Gradients of every trainable parameter for a fixed weighting of the output (None where none flows)."""
    out = output if isinstance(output, torch.Tensor) else next(t for t in output if isinstance(t, torch.Tensor))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    if out.requires_grad:
        weights = torch.cos(torch.arange(out.numel(), device=out.device, dtype=torch.float32)).reshape(out.shape)
        (out.float() * weights).sum().backward()
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    return grads


def find_boundary(
    model: nn.Module,
    frozen_bn: Sequence[str],
    inputs: torch.Tensor,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> tuple[Boundary | None, str]:
    """The longest verified cut, or None and why there is none. The model is not changed (a copy runs)."""
    twin = copy.deepcopy(model)  # forwards in training mode move running statistics: keep the real ones
    _training_mode(twin, frozen_bn)
    with autocast(), _seeded(0):
        calls, random_from = record_calls(twin, inputs)
    candidates = candidate_boundaries(twin, calls, random_from)  # in training mode, as frozen BatchNorm runs
    if not candidates:
        modules = dict(twin.named_modules())
        first = next((n for n in calls if not _frozen_call(modules[n])), None)
        if random_from < len(calls) and (first is None or calls.index(first) > random_from):
            return None, f"the frozen part draws random numbers in training mode from {calls[random_from]} on"
        return None, "nothing is frozen at the start of the forward pass" + (f" ({first} trains)" if first else "")
    reasons: list[str] = []
    failed_in: list[str] = []  # containers a cut inside of failed: a deeper cut in them would fail alike
    for boundary in candidates:
        if len(reasons) == MAX_CANDIDATES:
            break
        if any(boundary.output.startswith(c + ".") for c in failed_in):
            continue
        reason = verify(twin, frozen_bn, boundary, inputs, autocast)
        if reason is None:
            return boundary, ""
        reasons.append(reason)
        parent = boundary.output.rpartition(".")[0]
        if parent:  # the root is the container of every cut: keep trying there
            failed_in.append(parent)
    more = len(reasons) - 1
    return None, reasons[0] + (f"; {more} shorter cut{'s' if more > 1 else ''} failed too" if more else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Fingerprints and the process-level cache


def dataset_fingerprint(dataset: Any) -> str | None:
    """What a dataset's samples and targets are, as a digest; None for a kind of dataset this does not know."""
    h = hashlib.blake2b(digest_size=20)
    source = getattr(dataset, "source", None)
    if source is not None:  # a decoded-image cache of another dataset: that dataset, then its per-item steps
        inner = dataset_fingerprint(source)
        if inner is None:
            return None
        h.update(f"{type(dataset).__name__}\0{inner}\0{dataset.transform!r}".encode())
        return h.hexdigest()
    files = getattr(dataset, "files", None)
    array = getattr(dataset, "array", None)
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    if files is not None:
        h.update(b"files")
        for path in files:
            try:
                st = os.stat(path)
            except OSError:
                return None
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    elif array is not None:
        import numpy as np

        arr = np.ascontiguousarray(array)
        h.update(f"array{arr.shape}{arr.dtype}".encode())
        h.update(arr.data.cast("B"))
        h.update(repr(getattr(dataset, "rows", None)).encode())
    else:
        return None
    h.update(repr(list(targets)).encode())
    h.update(repr(getattr(dataset, "transform", None)).encode())
    return h.hexdigest()


def module_digest(model: nn.Module, names: Sequence[str]) -> str:
    """A digest of the parameters and buffers of the named modules (their names, shapes, dtypes and values)."""
    h = hashlib.blake2b(digest_size=20)
    for name in names:
        for key, tensor in model.get_submodule(name).state_dict().items():
            t = tensor.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}.{key}{tuple(t.shape)}{t.dtype}".encode())
            if t.numel():
                h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


@dataclass
class _Entry:
    features: torch.Tensor
    targets: Any

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()


class _ProcessCache:
    """Computed features by fingerprint, least recently used first out when over the bound."""

    def __init__(self) -> None:
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str | None) -> _Entry | None:
        if key is None:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: str | None, entry: _Entry, bound: int) -> None:
        if key is None:
            return
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > 1 and self.nbytes > bound:
                self._entries.popitem(last=False)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


process_cache = _ProcessCache()


def clear() -> None:
    """Forget every computed feature in this process."""
    process_cache.clear()


# ---------------------------------------------------------------------------------------------
# Computing and serving


class FeatureBatches:
    """Batches of cached features drawn by a loader's own batch sampler, as the loader itself would draw them.

    The image DataLoader draws one number from its generator each time an iterator is created (all of them, or
    only the first with persistent workers) before the sampler uses the same generator; drawing it here too keeps
    the generator, which checkpoints save, in the same state as in an uncached run.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, features: torch.Tensor, targets: torch.Tensor):
        self.batch_sampler: BatchSampler = loader.batch_sampler  # type: ignore[assignment]  # build_loader always sets one
        self.generator = loader.generator
        self._draw_once = bool(getattr(loader, "persistent_workers", False)) and loader.num_workers > 0
        self._drawn = False
        self.features = features
        self.targets = targets

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        if not (self._draw_once and self._drawn):
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
            self._drawn = True
        features, targets = self.features, self.targets
        for indices in self.batch_sampler:
            index = torch.as_tensor(indices, dtype=torch.long)
            yield features.index_select(0, index), targets.index_select(0, index)


@dataclass
class FeatureCache:
    """An active cache: the suffix model and the feature batches that stand in for the image loaders."""

    suffix: nn.Module
    boundary: Boundary
    train: FeatureBatches
    val: FeatureBatches | None
    nbytes: int
    reused: bool
    seconds: float  # spent finding the cut and computing (or fetching) the features

    def describe(self) -> str:
        where = "reused from an earlier run" if self.reused else f"computed in {self.seconds:.1f} s"
        return (
            f"Feature cache on: the frozen part up to {self.boundary.output} runs once per sample "
            f"({self.nbytes / 2**20:.1f} MiB, {where}); epochs train the rest"
        )


@dataclass
class Setup:
    """The outcome of setup(): a cache, or None and the line that says why not."""

    cache: FeatureCache | None
    message: str


def setup(
    cfg: ProjectConfig,
    parts: RunParts,
    *,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    stop_event: threading.Event | None = None,
    log: Callable[[str], None] = lambda m: None,
    on_failures: Callable[[list, str], None] = lambda failures, split: None,
) -> Setup:
    """Decide, verify and compute; never changes the model, the global RNGs or the loaders' generators.

    on_failures receives the unreadable image files met (engine/sample_failures.py) and their split."""
    started = time.perf_counter()
    reason = eligibility_problem(cfg)
    if reason is not None:
        return Setup(None, f"Feature cache off: {reason}")
    devices = [parts.device.index or 0] if parts.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return _setup(cfg, parts, autocast, stop_event, log, started, on_failures)


def _setup(
    cfg: ProjectConfig,
    parts: RunParts,
    autocast: Callable[[], Any],
    stop_event: threading.Event | None,
    log: Callable[[str], None],
    started: float,
    on_failures: Callable[[list, str], None],
) -> Setup:
    model, device = parts.model, parts.device
    if all(p.requires_grad for p in model.parameters()):
        return Setup(None, "Feature cache off: nothing is frozen (model.freeze), so every layer trains")
    loader = parts.train_loader
    train_ds = parts.data.train
    val_ds = parts.data.val if parts.val_loader is not None else None
    collate = loader.collate_fn
    n_probe = min(len(train_ds), 4)
    if n_probe == 0:
        return Setup(None, "Feature cache off: the training set is empty")
    try:
        probe = collate([train_ds[i] for i in range(n_probe)])
        on_failures(batch_failures(probe), "train")
        inputs = probe[0].to(device)
    except Exception as exc:  # noqa: BLE001 - the normal loader reports a data problem better
        return Setup(None, f"Feature cache off: a probe batch could not be built ({_first_line(exc)})")
    try:
        boundary, why = find_boundary(model, parts.frozen_bn, inputs, autocast)
    except Exception as exc:  # noqa: BLE001 - the model cannot take the inputs: the first batch will say why
        return Setup(None, f"Feature cache off: the model fails on a probe batch ({_first_line(exc)})")
    if boundary is None:
        return Setup(None, f"Feature cache off: {why}")

    _training_mode(model, parts.frozen_bn)
    with torch.no_grad(), autocast():
        sample = capture(model, boundary.output, inputs[:1])
    per_sample = sample[0].numel() * sample.element_size()
    n_val = len(val_ds) if val_ds is not None else 0
    need = per_sample * (len(train_ds) + n_val)
    bound = max_bytes(cfg)

    key_parts = [
        cfg.model.backbone,
        type(model).__name__,
        boundary.output,
        ",".join(boundary.replaced),
        module_digest(model, boundary.replaced),
        ",".join(n for n, p in model.named_parameters() if not p.requires_grad),
        cfg.train.precision,
        device.type,
        repr(tuple(sample.shape[1:])),
        str(sample.dtype),
    ]
    base = hashlib.blake2b("\0".join(key_parts).encode(), digest_size=20).hexdigest()

    entries: dict[str, _Entry] = {}
    keys: dict[str, str | None] = {}
    for split, ds in (("train", train_ds), ("val", val_ds)):
        if ds is None:
            continue
        fp = dataset_fingerprint(ds)
        keys[split] = None if fp is None else f"{base}:{split}:{fp}"
        entry = process_cache.get(keys[split])
        if entry is not None:
            entries[split] = entry
    missing = [s for s in keys if s not in entries]
    missing_bytes = sum(per_sample * (len(train_ds) if s == "train" else n_val) for s in missing)
    if missing_bytes > bound:
        return Setup(
            None,
            f"Feature cache off: the features after {boundary.output} would take "
            f"{need / 2**20:.1f} MiB, over the bound of {bound / 2**20:.1f} MiB "
            "(train.feature_cache_max_mb; empty means half the available memory); training "
            "recomputes them every epoch",
        )
    for split in missing:
        ds = train_ds if split == "train" else val_ds
        assert ds is not None  # "val" is missing only when there is a validation set
        log(f"Feature cache: computing the features after {boundary.output} for {len(ds)} {split} samples")
        entry = _compute(
            model,
            parts.frozen_bn,
            boundary.output,
            ds,
            loader,
            cfg.loader.batch_size,
            device,
            autocast,
            stop_event,
            len(ds),
            sample,
            training=split == "train",
            on_failures=_for_split(on_failures, split),
        )
        if entry is None:
            return Setup(None, "Feature cache off: stopped while computing features")
        entries[split] = entry
        stats.computed += 1
        process_cache.put(keys[split], entry, bound)
    stats.reused += len(keys) - len(missing)

    train = FeatureBatches(loader, entries["train"].features, entries["train"].targets)
    val = (
        FeatureBatches(parts.val_loader, entries["val"].features, entries["val"].targets)
        if "val" in entries and parts.val_loader is not None
        else None
    )
    cache = FeatureCache(
        suffix=build_suffix(model, boundary.replaced),
        boundary=boundary,
        train=train,
        val=val,
        nbytes=sum(e.nbytes for e in entries.values()),
        reused=not missing,
        seconds=time.perf_counter() - started,
    )
    return Setup(cache, cache.describe())


def _for_split(report: Callable[[list, str], None], split: str) -> Callable[[list], None]:
    return lambda found: report(found, split)


def _compute(
    model: nn.Module,
    frozen_bn: Sequence[str],
    boundary: str,
    dataset: EngineDataset,
    loader: torch.utils.data.DataLoader,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], Any],
    stop_event: threading.Event | None,
    n: int,
    sample: torch.Tensor,
    *,
    training: bool,
    on_failures: Callable[[list], None] = lambda failures: None,
) -> _Entry | None:
    """Boundary outputs of every sample in dataset order, in one preallocated CPU tensor, and the targets.

    training: in the mode training runs the model (frozen BatchNorm in eval), else in evaluation mode.
    """
    generator = torch.Generator()
    generator.manual_seed(0)  # a private generator: the global RNG and the run's loader stay untouched
    workers = loader.num_workers
    ordered = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=loader.collate_fn,
        generator=generator,
        worker_init_fn=loader.worker_init_fn if workers else None,
        pin_memory=device.type == "cuda",
    )
    features = torch.empty((n, *sample.shape[1:]), dtype=sample.dtype)
    targets: list[Any] = []
    if training:
        _training_mode(model, frozen_bn)
    else:
        model.eval()
    at = 0
    with torch.no_grad(), autocast():
        for batch in ordered:
            if stop_event is not None and stop_event.is_set():
                return None
            on_failures(batch_failures(batch))
            out = capture(model, boundary, batch[0].to(device, non_blocking=True))
            features[at : at + out.shape[0]].copy_(out)
            at += out.shape[0]
            targets.append(batch[1])
    if at != n:
        raise RuntimeError(f"computed {at} features for {n} samples")
    return _Entry(features=features, targets=torch.cat(targets) if targets else torch.empty(0))
