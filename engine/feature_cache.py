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
project again (pressing Train twice in the app) skips the computation. In a run in phases, the next phase's cut is
planned when a phase sets up its cache: when that cut comes no later in the forward pass and everything before it is
frozen alike in both phases, the one pass over the data captures both cuts' outputs, and the next phase finds its
features in the process-level cache under the key its own setup computes.
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
    ahead: int = 0  # splits whose features for the next phase were computed in this phase's pass

    def reset(self) -> None:
        self.computed = self.reused = self.ahead = 0


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


def capture_with(model: nn.Module, boundary: str, also: str, inputs: torch.Tensor) -> tuple[Any, Any | None]:
    """The outputs of boundary and of also for inputs in one forward, which stops at boundary (it never runs past
    it); also's output is None when the forward had not reached it by then. also's output is a copy taken as it
    comes, so an in-place operation after it cannot change it."""
    early: list[Any] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        early.append(output.clone() if isinstance(output, torch.Tensor) else output)

    if also == boundary:
        out = capture(model, boundary, inputs)
        return out, out
    handle = model.get_submodule(also).register_forward_hook(hook)
    try:
        out = capture(model, boundary, inputs)
    finally:
        handle.remove()
    return out, early[0] if early else None


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
    # The phase whose pass computed these ahead of the phase they are for; cleared when that phase takes them, so
    # a later run that finds them says it reuses them.
    computed_in: str = ""

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
    computed_in: str = ""  # reused: the previous phase of this run computed them in its pass ("phase 1/2 (head)")

    def describe(self) -> str:
        if not self.reused:
            where = f"computed in {self.seconds:.1f} s"
        elif self.computed_in:
            where = f"computed in {self.computed_in}'s pass"
        else:
            where = "reused from an earlier run"
        return (
            f"Feature cache on: the frozen part up to {self.boundary.output} runs once per sample "
            f"({self.nbytes / 2**20:.1f} MiB, {where}); epochs train the rest"
        )


@dataclass
class Setup:
    """The outcome of setup(): a cache, or None and the line that says why not."""

    cache: FeatureCache | None
    message: str


@dataclass
class NextPhase:
    """The phase after the one being set up (a run in phases), so that one pass over the data computes its features
    too where they come out exactly as its own setup would compute them."""

    cfg: ProjectConfig  # the project that phase trains
    title: str  # how the log names it: "phase 2/2 (fine-tune)"
    current: str  # how the log names the phase being set up
    train_transform: Any  # the training images' pipeline in that phase
    # Puts the model in that phase's freeze for a with block, yielding that phase's frozen BatchNorm layers, and
    # afterwards puts every requires_grad flag and module mode back as it was.
    frozen: Callable[[], contextlib.AbstractContextManager[list[str]]]


@dataclass
class _Ahead:
    """The next phase's cut, its output for one sample, and the keys its own setup will look up, for the splits
    this phase's pass computes."""

    phase: NextPhase
    boundary: Boundary
    sample: torch.Tensor
    keys: dict[str, str]


def setup(
    cfg: ProjectConfig,
    parts: RunParts,
    *,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    stop_event: threading.Event | None = None,
    log: Callable[[str], None] = lambda m: None,
    on_failures: Callable[[list, str], None] = lambda failures, split: None,
    ahead: NextPhase | None = None,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> Setup:
    """Decide, verify and compute; never changes the model, the global RNGs or the loaders' generators.

    on_failures receives the unreadable image files met (engine/sample_failures.py) and their split. ahead: the next
    phase of a run in phases; when its features can be computed exactly in the same pass, they are, and go into the
    process-level cache for its setup to find (else the log says why not). progress gets (samples done, samples
    of the split) after each batch of the pass, split after split, each named in the log line before it."""
    started = time.perf_counter()
    reason = eligibility_problem(cfg)
    if reason is not None:
        return Setup(None, f"Feature cache off: {reason}")
    devices = [parts.device.index or 0] if parts.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return _setup(cfg, parts, autocast, stop_event, log, started, on_failures, ahead, progress)


def _key_base(
    cfg: ProjectConfig, model: nn.Module, boundary: Boundary, sample: torch.Tensor, device: torch.device
) -> str:
    """What the features after a cut depend on, besides the data: the model's frozen start, what is frozen, the
    precision and the device (the model in the freeze the features are computed for)."""
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
    return hashlib.blake2b("\0".join(key_parts).encode(), digest_size=20).hexdigest()


def _split_keys(base: str, splits: dict[str, Any]) -> dict[str, str | None]:
    """Each split's key in the process-level cache; None for a data set without a fingerprint (never cached)."""
    keys: dict[str, str | None] = {}
    for split, ds in splits.items():
        fp = dataset_fingerprint(ds)
        keys[split] = None if fp is None else f"{base}:{split}:{fp}"
    return keys


def _setup(
    cfg: ProjectConfig,
    parts: RunParts,
    autocast: Callable[[], Any],
    stop_event: threading.Event | None,
    log: Callable[[str], None],
    started: float,
    on_failures: Callable[[list, str], None],
    ahead: NextPhase | None = None,
    progress: Callable[[int, int], None] = lambda done, total: None,
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
    splits: dict[str, Any] = {"train": train_ds, **({"val": val_ds} if val_ds is not None else {})}
    need = per_sample * sum(len(ds) for ds in splits.values())
    bound = max_bytes(cfg)

    keys = _split_keys(_key_base(cfg, model, boundary, sample, device), splits)
    entries: dict[str, _Entry] = {}
    for split, key in keys.items():
        entry = process_cache.get(key)
        if entry is not None:
            entries[split] = entry
    missing = [s for s in keys if s not in entries]
    missing_bytes = sum(per_sample * len(splits[s]) for s in missing)
    if missing_bytes > bound:
        return Setup(
            None,
            f"Feature cache off: the features after {boundary.output} would take "
            f"{need / 2**20:.1f} MiB, over the bound of {bound / 2**20:.1f} MiB "
            "(train.feature_cache_max_mb; empty means half the available memory); training "
            "recomputes them every epoch",
        )
    plan: _Ahead | None = None
    if ahead is not None and missing:
        try:
            plan, why = _plan_ahead(parts, ahead, inputs, autocast, boundary, keys, missing, splits, need, bound)
        except Exception as exc:  # noqa: BLE001 - the next phase sets up its own cache as without a plan
            plan, why = None, f"planning its cut failed ({_first_line(exc)})"
        if why:
            log(f"Feature cache: {ahead.title}'s features are not computed in this pass: {why}")
    early: dict[str, _Entry] = {}
    for split in missing:
        ds = splits[split]
        also = plan if plan is not None and split in plan.keys else None
        log(
            f"Feature cache: computing the features after {boundary.output} for {len(ds)} {split} samples"
            + (f", and those after {also.boundary.output} for {also.phase.title}" if also is not None else "")
        )
        done = _compute(
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
            ahead=None if also is None else (also.boundary.output, also.sample),
            progress=_counted_for(progress, len(ds)),
        )
        if done is None:
            return Setup(None, "Feature cache off: stopped while computing features")
        entry, ahead_entry, lost = done
        entries[split] = entry
        stats.computed += 1
        process_cache.put(keys[split], entry, bound)
        if also is not None and ahead_entry is not None:
            ahead_entry.computed_in = also.phase.current
            early[split] = ahead_entry
            stats.ahead += 1
            process_cache.put(also.keys[split], ahead_entry, bound)
        elif also is not None:
            log(f"Feature cache: {also.phase.title}'s {split} features are not computed in this pass: {lost}")
    if plan is not None and early:
        log(
            f"Feature cache: {plan.phase.title}'s features after {plan.boundary.output} were computed in the same "
            f"pass ({sum(e.nbytes for e in early.values()) / 2**20:.1f} MiB, {' and '.join(early)})"
        )
    taken = [entries[s] for s in keys if s not in missing]
    stats.reused += len(taken)
    computed_in = next((e.computed_in for e in taken if e.computed_in), "")
    for e in taken:
        e.computed_in = ""  # taken by the phase they were for: a later run reuses them

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
        computed_in=computed_in,
    )
    return Setup(cache, cache.describe())


def _plan_ahead(
    parts: RunParts,
    nxt: NextPhase,
    inputs: torch.Tensor,
    autocast: Callable[[], Any],
    boundary: Boundary,
    keys: dict[str, str | None],
    missing: Sequence[str],
    splits: dict[str, Any],
    need: int,
    bound: int,
) -> tuple[_Ahead | None, str]:
    """The next phase's cut and keys when this phase's pass computes its features exactly as its own setup would,
    else None and why not ("" when there is nothing left to compute for it). The model's weights, requires_grad
    flags and module modes end as they were; the caller keeps the global random state.

    Exactly: the next cut is found and keyed by the code its setup runs, under its freeze; everything before it is
    frozen in this phase too, with every BatchNorm layer there in the same mode; this phase's forward reaches it no
    later than this phase's own cut; and on the probe batch this phase's forward gives there what the next phase's
    does. Weights that change before the next phase begins change its key, and its setup computes anew."""
    why = eligibility_problem(nxt.cfg)
    if why is not None:
        return None, why
    model, device = parts.model, parts.device
    if nxt.train_transform is not parts.data.train.transform:
        return None, "its training images go through another pipeline than this phase's"
    trains_now = {id(p) for p in model.parameters() if p.requires_grad}
    frozen_bn_now = set(parts.frozen_bn)
    modes = [(m, m.training) for m in model.modules()]
    try:
        with nxt.frozen() as next_bn:
            if all(p.requires_grad for p in model.parameters()):
                return None, "nothing is frozen in it"
            found, why = find_boundary(model, next_bn, inputs, autocast)
            if found is None:
                return None, f"it has no cut ({why})"
            why_not = _unlike_before(model, found, trains_now, frozen_bn_now, set(next_bn))
            if why_not is not None:
                return None, why_not
            _training_mode(model, next_bn)
            with torch.no_grad(), autocast():
                expected = capture(model, found.output, inputs)
            base = _key_base(nxt.cfg, model, found, expected[:1], device)
        _training_mode(model, parts.frozen_bn)
        with torch.no_grad(), autocast():
            _, got = capture_with(model, boundary.output, found.output, inputs)
    finally:
        for m, training in modes:
            m.training = training
    if got is None:
        return None, f"its cut ({found.output}) comes after this phase's ({boundary.output}) in the forward pass"
    if not _same(got, expected):
        return None, f"this phase's forward gives other features after {found.output} than that phase's"
    next_keys = _split_keys(base, splits)
    todo: dict[str, str] = {}
    for split in missing:
        key = next_keys[split]
        if key is None:
            return None, f"the {split} set has no fingerprint to find them by"
        if key != keys[split] and process_cache.get(key) is None:  # the same key: it reuses this phase's
            todo[split] = key
    if not todo:
        return None, ""
    extra = expected[0].numel() * expected.element_size() * sum(len(splits[s]) for s in todo)
    if need + extra > bound:
        return None, (
            f"with this phase's {need / 2**20:.1f} MiB they would take {(need + extra) / 2**20:.1f} MiB, over the "
            f"bound of {bound / 2**20:.1f} MiB (train.feature_cache_max_mb; empty means half the available memory)"
        )
    return _Ahead(nxt, found, expected[:1], todo), ""


def _unlike_before(
    model: nn.Module, boundary: Boundary, trains_now: set[int], frozen_bn_now: set[str], frozen_bn_next: set[str]
) -> str | None:
    """Why this phase's forward may give other features at the next phase's cut than that phase's own would: a
    parameter before the cut that trains in this phase, or a BatchNorm layer there in another mode; None if neither.
    The model is in the next phase's freeze."""
    modules = dict(model.named_modules())
    for name in boundary.replaced:  # every call before the cut is in one of them
        for pname, p in modules[name].named_parameters(prefix=name):
            if id(p) in trains_now:
                return f"{pname}, before its cut ({boundary.output}), trains in this phase"
        for sub, m in modules[name].named_modules(prefix=name):
            if isinstance(m, _BatchNorm) and (sub in frozen_bn_now) != (sub in frozen_bn_next):
                return f"the BatchNorm layer {sub}, before its cut ({boundary.output}), is frozen in one phase only"
    # Their containers stay in the suffix, and may use a parameter of their own before the cut (ViT's position
    # embedding): one frozen there must be frozen here too.
    for name in sorted({a for r in boundary.replaced for a in ["", *_ancestry(r)[:-1]]}):
        for pname, p in modules[name].named_parameters(prefix=name, recurse=False):
            if id(p) in trains_now and not p.requires_grad:
                return f"{pname}, frozen in it, trains in this phase"
    return None


def _for_split(report: Callable[[list, str], None], split: str) -> Callable[[list], None]:
    return lambda found: report(found, split)


def _counted_for(report: Callable[[int, int], None], total: int) -> Callable[[int], None]:
    """One split's count of samples done, out of its own (the log line before its pass names the split)."""
    return lambda done: report(done, total)


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
    ahead: tuple[str, torch.Tensor] | None = None,
    progress: Callable[[int], None] = lambda done: None,
) -> tuple[_Entry, _Entry | None, str] | None:
    """Boundary outputs of every sample in dataset order, in one preallocated CPU tensor, and the targets; None when
    stopped.

    training: in the mode training runs the model (frozen BatchNorm in eval), else in evaluation mode. ahead: another
    module reached no later than boundary and its output for one sample: its outputs are captured in the same
    forwards, as a second entry (None, and why, when a batch reaches boundary first). progress: samples done, after
    each batch.
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
    early = None if ahead is None else torch.empty((n, *ahead[1].shape[1:]), dtype=ahead[1].dtype)
    lost = ""
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
            inputs = batch[0].to(device, non_blocking=True)
            if ahead is None or early is None:
                out = capture(model, boundary, inputs)
            else:
                out, got = capture_with(model, boundary, ahead[0], inputs)
                if not isinstance(got, torch.Tensor) or got.shape[1:] != early.shape[1:]:
                    lost = (
                        f"a batch reached {boundary} before {ahead[0]}"
                        if got is None
                        else f"{ahead[0]}'s output changed shape"
                    )
                    early = None
                else:
                    early[at : at + got.shape[0]].copy_(got)
            features[at : at + out.shape[0]].copy_(out)
            at += out.shape[0]
            targets.append(batch[1])
            progress(at)
    if at != n:
        raise RuntimeError(f"computed {at} features for {n} samples")
    target = torch.cat(targets) if targets else torch.empty(0)
    return _Entry(features=features, targets=target), None if early is None else _Entry(early, target), lost
