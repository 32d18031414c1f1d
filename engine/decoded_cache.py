"""The decoded-image cache: decode and resize every image once, keep the tensors, and run only the per-item steps.

A split's pipeline is cut in two (engine.transforms.split_transforms): the deterministic part (decode, RGB,
CHW tensor, resize, centre crop) runs once per image while the cache is filled, up front, in threads (Pillow's
decoders and torch's resize release the GIL); the rest (random augmentation, scaling to float, normalisation)
runs on every draw. Without augmentation an item is exactly the tensor the uncached dataset gives.

The images of a split live in one tensor (N, C, H, W) when they share a size, or in one flat buffer with
offsets when they do not (keep_aspect, presizing of non-square images). DataLoader workers forked from the
training process then share those pages copy-on-write: there is no Python object per image whose reference
count would make each worker copy its page.

When the images pass the memory bound, or several torchrun processes share the machine (each would hold its
own copy: memory is not shared across processes that torchrun started, only across forked workers), they go to
a memory-mapped file in the cache folder instead (see "On disk" below): one file per split, dataset and
preprocessing, written once by whichever process comes first and mapped by all the others.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from engine.config import ProjectConfig
from engine.data import (
    ArrayDataset,
    EngineDataset,
    ImageFileDataset,
    PreparedData,
    Progress,
    array_to_image,
    target_tensor,
)
from engine.machine import available_memory_bytes
from engine.scan_cache import cache_root
from engine.transforms import Preprocess, split_transforms

MIB = 1024 * 1024
FALLBACK_BOUND_MB = 1024  # the bound when the free memory cannot be read
FREE_MEMORY_SHARE = 0.25  # auto bound: this share of the memory available now


class DecodedImageDataset(EngineDataset):
    """A split's images decoded and resized once; each item is (per_item(image), target tensor)."""

    transform: Callable  # the per-item steps, always set

    def __init__(
        self,
        images: torch.Tensor | None,
        flat: torch.Tensor | None,
        offsets: np.ndarray | None,
        shapes: np.ndarray | None,
        targets: Sequence,
        per_item: Callable,
        task: str,
        names: Sequence[str],
        source: Any = None,
    ):
        self.images = images  # (N, C, H, W) when every image has the same size
        self.flat = flat  # otherwise every image's values one after another ...
        self.offsets = offsets  # ... image i at flat[offsets[i]:offsets[i + 1]] ...
        self.shapes = shapes  # ... shaped (C, H, W) = shapes[i]
        self.targets = list(targets)
        self.transform = per_item
        self.task = task
        self.names = list(names)  # the image path or "row i" of each item, as the source dataset names them
        self.source = source  # the dataset decoded (what the feature cache's fingerprint describes)
        self.backing: Path | None = None  # the cache file the images are mapped from, when they are on disk

    def __getstate__(self) -> dict[str, Any]:
        # A worker started by spawn or forkserver maps the file again rather than receiving a pickled copy of it
        # (torch's pickler would copy mapped tensors into shared memory: one more copy per loader).
        state = dict(self.__dict__)
        if self.backing is not None:
            state.update(images=None, flat=None, offsets=None, shapes=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.backing is not None:
            self.images, self.flat, self.offsets, self.shapes = _map_images(self.backing, _read_footer(self.backing))
        self.failures: list = []  # image files that no longer decoded while filling (engine/sample_failures.py)

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def nbytes(self) -> int:
        held = self.images if self.images is not None else self.flat
        assert held is not None  # one of the two layouts holds the images
        return held.numel() * held.element_size()

    def image(self, index: int) -> torch.Tensor:
        """The cached (decoded, resized) image, before the per-item steps."""
        if self.images is not None:
            return self.images[index]
        assert (
            self.flat is not None and self.offsets is not None and self.shapes is not None
        )  # the variable-size layout
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.flat[start:end].view(*(int(v) for v in self.shapes[index]))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.image(index)), target_tensor(self.targets[index], self.task)


# ---------------------------------------------------------------------------------------------
# Memory


def memory_bound(max_mb: int | None) -> tuple[int, str]:
    """(bound in bytes, how it was chosen) for loader.decoded_cache_max_mb."""
    if max_mb is not None:
        return int(max_mb) * MIB, f"loader.decoded_cache_max_mb = {max_mb}"
    from engine.distributed import local_processes

    free = available_memory_bytes()
    share = local_processes()  # several processes on this machine each hold a cache
    each = f", shared by {share} processes" if share > 1 else ""
    if free is None:
        return FALLBACK_BOUND_MB * MIB // share, f"{FALLBACK_BOUND_MB} MiB, as the free memory is unknown{each}"
    return int(free * FREE_MEMORY_SHARE) // share, f"a quarter of the {free / MIB:,.0f} MiB of memory available{each}"


def _itemsize(dataset: Dataset) -> int:
    if isinstance(dataset, ArrayDataset) and dataset.array.dtype != np.uint8:
        return 4  # 16-bit and float arrays stay float32, so nothing is rounded
    return 1


# ---------------------------------------------------------------------------------------------
# Filling


class CacheTooLarge(Exception):
    """The images decoded so far already overrun the bound (wide images presized by their shorter side)."""


def _decoder(
    dataset: Dataset, fixed: Callable, failures: list | None = None
) -> tuple[Callable[[int], torch.Tensor], list[str]]:
    """A function giving item i decoded and through the fixed steps (what the cache keeps), and a name per item;
    image files that no longer decode go into failures (see _raw_getter)."""
    read, names = _raw_getter(dataset, failures)

    def one(i: int) -> torch.Tensor:
        return fixed(read(i)).as_subclass(torch.Tensor)

    return one, names


def _threads(threads: int | None) -> int:
    if threads:
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 16))


def _raw_getter(dataset: Dataset, failures: list | None = None) -> tuple[Callable[[int], object], list[str]]:
    """A function giving item i as the pipeline takes it (PIL image or array tensor), and a name per item.

    An image file that no longer decodes is replaced by the dataset's stand-in for it (as training would serve
    it); what was met goes into failures (engine/sample_failures.py)."""
    if isinstance(dataset, ImageFileDataset):

        def read(i: int) -> object:
            _, image, met = dataset.read(i, stand_in=True)
            if met and failures is not None:
                failures.extend(met)  # list.extend is atomic: the filling threads share the list
            return image

        return read, list(dataset.files.texts)
    if isinstance(dataset, ArrayDataset):
        rows = dataset.rows if dataset.rows is not None else range(len(dataset))
        return (lambda i: array_to_image(dataset.array[rows[i]])), [f"row {r}" for r in rows]
    raise TypeError(f"no decoded-image cache for {type(dataset).__name__}")


def decode_dataset(
    dataset: EngineDataset,
    fixed: Callable,
    per_item: Callable,
    *,
    fixed_size: bool,
    bound: int | None = None,
    progress: Progress = None,
    threads: int | None = None,
) -> DecodedImageDataset:
    """Run `fixed` over every item of an ImageFileDataset or ArrayDataset in threads and keep the results.

    fixed_size: every output has the same shape (a centre crop), so the results go straight into one
    preallocated tensor. Raises CacheTooLarge when variable-size results pass `bound` bytes.
    """
    failures: list = []
    one, names = _decoder(dataset, fixed, failures)
    n = len(dataset)
    threads = _threads(threads)
    step = max(1, n // 100)

    if n == 0:
        return DecodedImageDataset(
            torch.empty(0, 3, 1, 1, dtype=torch.uint8), None, None, None, [], per_item, dataset.task, [], source=dataset
        )
    first = one(0)
    if fixed_size:
        images = torch.empty((n, *first.shape), dtype=first.dtype)
        images[0] = first

        def put(i: int) -> None:
            images[i] = one(i)

        with ThreadPoolExecutor(threads) as pool:
            for done, _ in enumerate(pool.map(put, range(1, n)), start=2):
                if progress is not None and (done % step == 0 or done == n):
                    progress(done, n)
        done_ds = DecodedImageDataset(
            images, None, None, None, dataset.targets, per_item, dataset.task, names, source=dataset
        )
        done_ds.failures = failures
        return done_ds

    parts: list[torch.Tensor] = [first]
    total = first.numel() * first.element_size()
    with ThreadPoolExecutor(threads) as pool:
        results = pool.map(one, range(1, n))
        for done, image in enumerate(results, start=2):
            parts.append(image)
            total += image.numel() * image.element_size()
            if bound is not None and total > bound:
                pool.shutdown(wait=True, cancel_futures=True)
                raise CacheTooLarge(total)
            if progress is not None and (done % step == 0 or done == n):
                progress(done, n)
    shapes = np.array([tuple(p.shape) for p in parts], dtype=np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(shapes.prod(axis=1), out=offsets[1:])
    flat = torch.empty(int(offsets[-1]), dtype=first.dtype)
    for i, p in enumerate(parts):
        flat[offsets[i] : offsets[i + 1]] = p.reshape(-1)
    parts.clear()
    done_ds = DecodedImageDataset(
        None, flat, offsets, shapes, dataset.targets, per_item, dataset.task, names, source=dataset
    )
    done_ds.failures = failures
    return done_ds


# ---------------------------------------------------------------------------------------------
# On disk
#
# A cache file is named IDENT-STAMPS.bin in cache_root()/decoded: IDENT digests what produced the pixels (the
# dataset's path, the split, the fixed steps with their sizes and interpolation, the library versions, the dtype
# and the format version), STAMPS every source file's path, size, modification time and inode (or an array's
# bytes). A changed file gives another name, and the file of the old stamps is removed when the new one is written,
# so there is one file per dataset and preprocessing. Layout:
#
#   [0, HEAD)           MAGIC, then the header as JSON (what the file holds), padded with zero bytes
#   [HEAD, ...)         the images' values one after another (C, H, W each, in dataset order)
#   then, 8-aligned     for images of different sizes: shapes (N, 3) and offsets (N + 1) as int64
#   then                the footer as JSON, its length (8 bytes, little-endian), END
#
# It is written to a temporary name (.NAME.PID.tmp), fsynced and renamed, all under an exclusive flock on
# IDENT.lock; a process that finds the lock taken waits for it, then maps what the writer left. A file is mapped
# only when its END, footer, header and size agree, so a half-written or cut-off file is never trusted; a
# temporary file is only ever left by a writer that died, and the next writer (holding the lock) removes it.

DISK_VERSION = 1
HEAD = 4096  # the images start on a page boundary
MAGIC = b"MWBDEC\x00\x01"
END = b"MWBDONE1"
DISK_HEADROOM = 64 * MIB  # free space left on the cache folder's disk beyond the file (plus a twentieth of it)


class DiskCacheError(Exception):
    """The cache file cannot be written (disk full, folder not writable); the message says which and why."""


def disk_folder() -> Path:
    """Where decoded-image cache files live: the decoded/ folder of the workbench's cache folder."""
    return cache_root() / "decoded"


def _digest(parts: object) -> str:
    text = json.dumps(parts, separators=(",", ":"), sort_keys=True, default=str)
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=10).hexdigest()


def _library_versions() -> dict[str, str]:
    import PIL
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__}


def cache_name(dataset: EngineDataset, fixed: Callable, *, dataset_path: str | os.PathLike, split: str) -> str:
    """The cache file's name (without .bin) for a split: IDENT-STAMPS, see "On disk" above.

    A source file that can no longer be read is stamped as such (it is served by its stand-in, see _raw_getter).
    """
    ident = _digest(
        {
            "version": DISK_VERSION,
            "dataset": os.path.abspath(os.fsdecode(dataset_path)),
            "split": split,
            "kind": type(dataset).__name__,
            "fixed": repr(fixed),
            "itemsize": _itemsize(dataset),
            "libraries": _library_versions(),
        }
    )
    stamps = hashlib.blake2b(digest_size=10)
    if isinstance(dataset, ImageFileDataset):
        for path in dataset.files.texts:
            try:
                st = os.stat(path)
                stamp = f"{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"
            except OSError:  # gone since the scan: writing serves its stand-in and reports it (sample_failures)
                stamp = "unreadable"
            stamps.update(f"{os.fsdecode(path)}\0{stamp}\n".encode("utf-8", "surrogateescape"))
    elif isinstance(dataset, ArrayDataset):
        array = np.ascontiguousarray(dataset.array)
        stamps.update(f"{array.dtype.str}{array.shape}{dataset.rows}".encode())
        stamps.update(array.data.cast("B"))
    else:
        raise TypeError(f"no decoded-image cache for {type(dataset).__name__}")
    return f"{ident}-{stamps.hexdigest()}"


def _read_footer(path: Path) -> dict[str, Any]:
    """The footer of a complete cache file; raises ValueError (or OSError) for anything else."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(HEAD)
        if size < HEAD + 16 or not head.startswith(MAGIC):
            raise ValueError("not a decoded-image cache file")
        fh.seek(size - 16)
        tail = fh.read(16)
        if tail[8:] != END:
            raise ValueError("no end marker: the file was not finished")
        length = int.from_bytes(tail[:8], "little")
        if length > size - HEAD - 16:
            raise ValueError("the footer's length is wrong")
        fh.seek(size - 16 - length)
        footer = json.loads(fh.read(length))
    header = json.loads(head[len(MAGIC) :].rstrip(b"\0"))
    if not isinstance(footer, dict) or footer.get("version") != DISK_VERSION or footer.get("header") != header:
        raise ValueError("written by another version, or its header and footer disagree")
    if footer["total"] != size or header.get("name") != path.stem:
        raise ValueError("its size or name is not what its footer says")
    return footer


def _map_images(
    path: Path, footer: dict[str, Any]
) -> tuple[torch.Tensor | None, torch.Tensor | None, np.ndarray | None, np.ndarray | None]:
    """(images, flat, offsets, shapes) of a cache file, mapped: the pages are the page cache's, shared."""
    dtype = np.dtype(footer["dtype"])
    count = footer["values"]
    # Copy-on-write mapping ("c"): reads share the file's pages; a step writing into an image would get a private
    # page rather than changing the file (none does, but nothing can reach the file through the tensor).
    values = np.memmap(path, dtype=dtype, mode="c", offset=HEAD, shape=(count,)) if count else np.zeros(0, dtype)
    tensor = torch.from_numpy(values)
    if footer["layout"] == "fixed":
        return tensor.view(footer["images"], *footer["shape"]), None, None, None
    n = footer["images"]
    at = footer["index_at"]
    shapes = np.memmap(path, dtype=np.int64, mode="r", offset=at, shape=(n, 3))
    offsets = np.memmap(path, dtype=np.int64, mode="r", offset=at + n * 3 * 8, shape=(n + 1,))
    return None, tensor, offsets, shapes


def _open_cache_file(
    path: Path, dataset: EngineDataset, per_item: Callable, names: list[str] | None = None
) -> DecodedImageDataset | None:
    """The dataset served from a complete cache file, or None when there is none (or it is not to be trusted)."""
    try:
        footer = _read_footer(path)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if footer["images"] != len(dataset):
        return None
    images, flat, offsets, shapes = _map_images(path, footer)
    if names is None:
        names = _raw_getter(dataset)[1]
    out = DecodedImageDataset(images, flat, offsets, shapes, dataset.targets, per_item, dataset.task, names, dataset)
    out.backing = path
    return out


def _append(fh: Any, image: torch.Tensor) -> None:
    """Write one image's values to the cache file being written."""
    fh.write(image.contiguous().numpy().data.cast("B"))


def _publish(temporary: Path, final: Path) -> None:
    """Give the finished, fsynced temporary file its final name, and make the rename itself durable."""
    os.replace(temporary, final)
    try:
        fd = os.open(final.parent, os.O_RDONLY)
    except OSError:
        return  # a folder that cannot be opened (Windows): the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _in_order(one: Callable[[int], torch.Tensor], n: int, threads: int) -> Iterator[torch.Tensor]:
    """one(0), one(1), ... computed in threads, a bounded window ahead of the consumer."""
    window: deque[Future[torch.Tensor]] = deque()
    with ThreadPoolExecutor(threads) as pool:
        try:
            for i in range(n):
                window.append(pool.submit(one, i))
                if len(window) > 4 * threads:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for future in window:
                future.cancel()


def _write_cache_file(
    final: Path,
    one: Callable[[int], torch.Tensor],
    n: int,
    *,
    threads: int,
    progress: Progress,
) -> None:
    """Decode every image into a temporary file next to `final`, then rename it to `final` once complete."""
    temporary = final.with_name(f".{final.stem}.{os.getpid()}.tmp")
    header = {"name": final.stem, "images": n, "pid": os.getpid(), "host": socket.gethostname()}
    encoded = json.dumps(header).encode()
    step = max(1, n // 100)
    try:
        with open(temporary, "wb") as fh:
            fh.write(MAGIC + encoded + b"\0" * (HEAD - len(MAGIC) - len(encoded)))
            shapes: list[tuple[int, ...]] = []
            dtype: torch.dtype | None = None
            for done, image in enumerate(_in_order(one, n, threads), start=1):
                if dtype is None:
                    dtype = image.dtype
                elif image.dtype != dtype:
                    raise TypeError(f"the fixed steps gave {image.dtype} after {dtype}")
                _append(fh, image)
                shapes.append(tuple(image.shape))
                if progress is not None and (done % step == 0 or done == n):
                    progress(done, n)
            assert dtype is not None  # n > 0
            itemsize = torch.empty(0, dtype=dtype).element_size()
            values = (fh.tell() - HEAD) // itemsize
            fh.write(b"\0" * (-fh.tell() % 8))
            footer: dict[str, Any] = {
                "version": DISK_VERSION,
                "header": header,
                "images": n,
                "values": values,
                "dtype": str(torch.empty(0, dtype=dtype).numpy().dtype),
            }
            if len(set(shapes)) == 1:
                footer.update(layout="fixed", shape=list(shapes[0]))
            else:
                footer.update(layout="flat", index_at=fh.tell())
                table = np.array(shapes, dtype=np.int64)
                offsets = np.zeros(n + 1, dtype=np.int64)
                np.cumsum(table.prod(axis=1), out=offsets[1:])
                fh.write(table.tobytes())
                fh.write(offsets.tobytes())
            tail_at = fh.tell()
            # The footer's own length enters "total", so settle the digits of the total first.
            for _ in range(2):
                encoded_footer = json.dumps(footer).encode()
                footer["total"] = tail_at + len(encoded_footer) + 16
            encoded_footer = json.dumps(footer).encode()
            fh.write(encoded_footer + len(encoded_footer).to_bytes(8, "little") + END)
            fh.flush()
            os.fsync(fh.fileno())
        _publish(temporary, final)
    except BaseException:
        try:
            temporary.unlink()
        except OSError:
            pass
        raise


class _FileLock:
    """An exclusive flock on a lock file held for a with-block; waits for another holder, saying so once."""

    def __init__(self, path: Path, waiting: Callable[[str], None]):
        self.path = path
        self.waiting = waiting
        self.fd: int | None = None

    def __enter__(self) -> _FileLock:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; the atomic rename still keeps half a file from being trusted
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    owner = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
                    self.waiting(owner or "another process")
                    fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the lock file was replaced meanwhile (someone removed the cache folder): lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the lock goes with the descriptor; the lock file stays (removing it would race)
            self.fd = None


@dataclass
class DiskOutcome:
    """One split's cache file: where it is, and whether this process wrote it."""

    dataset: DecodedImageDataset
    path: Path
    written: bool
    seconds: float
    notes: list[str] = field(default_factory=list)  # what was waited for and cleaned up, for the log


def disk_cached_dataset(
    dataset: EngineDataset,
    fixed: Callable,
    per_item: Callable,
    *,
    dataset_path: str | os.PathLike,
    split: str,
    needed: int,
    progress: Progress = None,
    threads: int | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> DiskOutcome:
    """A split's images mapped from their cache file, written first when no complete one exists.

    needed: the bytes this file and any written after it are expected to take (checked against the free space
    before writing, so that no split starts when all of them cannot fit). Raises
    DiskCacheError when the file cannot be written (the message names the folder and the reason).
    """
    started = time.perf_counter()
    folder = disk_folder()
    name = cache_name(dataset, fixed, dataset_path=dataset_path, split=split)
    final = folder / f"{name}.bin"
    failures: list = []  # files met unreadable while writing (each served its stand-in, as training would)
    one, names = _decoder(dataset, fixed, failures)
    found = _open_cache_file(final, dataset, per_item, names)
    if found is not None:
        return DiskOutcome(found, final, False, time.perf_counter() - started)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DiskCacheError(f"the cache folder {folder} cannot be made: {exc.strerror or exc}") from None
    notes: list[str] = []
    ident = name.split("-", 1)[0]

    def waiting(owner: str) -> None:
        line = f"Decoded-image cache: waiting for {owner}, which is writing {final.name} in {folder}"
        notes.append(line)
        log(line)

    try:
        lock = _FileLock(folder / f"{ident}.lock", waiting)
        with lock:
            found = _open_cache_file(final, dataset, per_item, names)  # written while this process waited
            if found is not None:
                return DiskOutcome(found, final, False, time.perf_counter() - started, notes)
            for other in sorted(folder.iterdir()):
                # Only the lock's holder writes files of this IDENT: a temporary one is a dead writer's; another
                # .bin is of files since changed (a process still mapping it keeps its pages after the unlink).
                left = other.name.startswith(f".{ident}-") and other.name.endswith(".tmp")
                old = other.name.startswith(f"{ident}-") and other.suffix == ".bin" and other != final
                if left or old:
                    other.unlink(missing_ok=True)
                    why = "left by a write that did not finish" if left else "of files that have changed since"
                    notes.append(f"Decoded-image cache: removed {other.name} {why}")
            free = shutil.disk_usage(folder).free
            want = needed + needed // 20 + DISK_HEADROOM
            if free < want:
                raise DiskCacheError(
                    f"the estimated {needed / MIB:,.0f} MiB (and {(want - needed) / MIB:,.0f} MiB to spare) does not "
                    f"fit the {free / MIB:,.0f} MiB free on the disk of the cache folder {folder}"
                )
            _write_cache_file(final, one, len(dataset), threads=_threads(threads), progress=progress)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskCacheError(
                f"the disk of the cache folder {folder} filled up while writing {final.name}"
            ) from None
        raise DiskCacheError(f"cannot write {final}: {exc.strerror or exc}") from None
    written = _open_cache_file(final, dataset, per_item, names)
    if written is None:
        raise DiskCacheError(f"{final} was written but does not read back as complete")
    written.failures = failures
    return DiskOutcome(written, final, True, time.perf_counter() - started, notes)


# ---------------------------------------------------------------------------------------------
# The cache of a run


@dataclass
class CacheOutcome:
    """What apply_decoded_cache did: used or not, why not, and what it cost."""

    used: bool
    setting: str
    estimate: int = 0  # bytes, from the preprocess size
    bound: int = 0  # bytes
    nbytes: int = 0  # bytes actually held
    images: int = 0
    seconds: float = 0.0
    message: str = ""  # the line logged (empty when the setting is "off")
    files: list[Path] = field(default_factory=list)  # the cache files mapped, when on disk
    written: int = 0  # how many of them this process wrote (the others it found complete)


def _why_disk(cfg: ProjectConfig, estimate: int, bound: int, processes: int, present: bool) -> str | None:
    """Why the cache goes to a file (for the log), or None when it stays in memory."""
    mode = cfg.loader.decoded_cache_disk
    if mode == "off":
        return None
    if mode == "on":
        return "loader.decoded_cache_disk = 'on'"
    if estimate > bound:
        return "the images need more than the memory bound"
    if processes > 1:
        return f"{processes} processes on this machine share one copy"
    if present:
        return "an earlier run left it"
    return None


def apply_decoded_cache(
    data: PreparedData,
    cfg: ProjectConfig,
    pre: Preprocess,
    *,
    log: Callable[[str], None] = lambda message: None,
    progress: Progress = None,
) -> CacheOutcome:
    """Replace data.train and data.val by decoded-image datasets when loader.decoded_cache allows and they fit.

    They are held in memory, or mapped from a file in the cache folder (loader.decoded_cache_disk): with `auto`
    when they pass the memory bound, when several torchrun processes share this machine (each would otherwise
    hold a copy; forked loader workers share the memory of their process either way), or when the file of an
    earlier run is there (mapping it costs nothing, decoding again does).
    """
    setting = cfg.loader.decoded_cache
    if setting == "off":
        return CacheOutcome(False, setting)
    d = cfg.data
    splits = [
        (name, ds, train)
        for name, ds, train in (("train", data.train, True), ("val", data.val, False))
        if ds is not None and len(ds) > 0
    ]
    if any(not isinstance(ds, (ImageFileDataset, ArrayDataset)) for _, ds, _ in splits):
        return CacheOutcome(False, setting)
    fixed_size = {
        name: not d.keep_aspect and not (train and d.augment.random_resized_crop) for name, _, train in splits
    }
    # From the preprocess size, before anything is decoded: centre-cropped images are exactly C x crop x crop;
    # keep-aspect ones at most resize x resize; presized ones are counted as square (resize x resize), and the
    # filling stops if wider images overrun the bound.
    estimate = 0
    for name, ds, _ in splits:
        side = pre.crop_size if fixed_size[name] else pre.resize_size
        estimate += len(ds) * 3 * side * side * _itemsize(ds)
    bound, how = memory_bound(cfg.loader.decoded_cache_max_mb)
    images = sum(len(ds) for _, ds, _ in splits)
    steps = {
        name: split_transforms(pre, d.augment, train=train, keep_aspect=d.keep_aspect) for name, _, train in splits
    }
    sources = {"train": data.source.path, "val": (data.val_source or data.source).path}
    from engine.distributed import local_processes

    processes = local_processes()
    present = False
    if cfg.loader.decoded_cache_disk == "auto" and estimate <= bound and processes == 1:
        present = all(
            (disk_folder() / f"{cache_name(ds, steps[name][0], dataset_path=sources[name], split=name)}.bin").exists()
            for name, ds, _ in splits
        )
    why_disk = _why_disk(cfg, estimate, bound, processes, present)

    def fall_back(size: int, why: str, disk: str = "") -> CacheOutcome:
        forced = " although loader.decoded_cache = 'on'" if setting == "on" else ""
        disk = disk or (
            "; loader.decoded_cache_disk = 'off' keeps it off disk" if cfg.loader.decoded_cache_disk == "off" else ""
        )
        message = (
            f"Decoded-image cache not used{forced}: {why} {size / MIB:,.0f} MiB for {images} images "
            f"exceeds the bound of {bound / MIB:,.0f} MiB ({how}){disk}; images are decoded on every epoch. "
            "Raise loader.decoded_cache_max_mb, free disk space or lower the image size to cache them"
        )
        log(message)
        return CacheOutcome(False, setting, estimate, bound, images=images, message=message)

    def on_disk(why: str) -> CacheOutcome | str:
        """The cache mapped from its files, or why they cannot be written."""
        started = time.perf_counter()
        mapped: dict[str, DiskOutcome] = {}
        sizes = {
            name: len(ds) * 3 * (pre.crop_size if fixed_size[name] else pre.resize_size) ** 2 * _itemsize(ds)
            for name, ds, _ in splits
        }
        try:
            for k, (name, ds, _) in enumerate(splits):
                fixed, per_item = steps[name]
                mapped[name] = disk_cached_dataset(
                    ds,
                    fixed,
                    per_item,
                    dataset_path=sources[name],
                    split=name,
                    needed=sum(sizes[later] for later, _, _ in splits[k:]),
                    progress=progress,
                    log=log,
                )
        except DiskCacheError as exc:
            return str(exc)
        seconds = time.perf_counter() - started
        held = sum(m.dataset.nbytes for m in mapped.values())
        for m in mapped.values():
            for note in m.notes:
                if not note.startswith("Decoded-image cache: waiting"):  # said when it began
                    log(note)
        data.train = mapped["train"].dataset if "train" in mapped else data.train
        data.val = mapped["val"].dataset if "val" in mapped else data.val
        each = ", ".join(
            f"{name}: {m.path.name} {'written by this process' if m.written else 'mapped as found, not rewritten'}"
            for name, m in mapped.items()
        )
        message = (
            f"Decoded-image cache: {images} images, {held / MIB:,.1f} MiB, memory-mapped from {disk_folder()} "
            f"({why}; {each}) in {seconds:.1f} s"
        )
        log(message)
        files = [m.path for m in mapped.values()]
        written = sum(m.written for m in mapped.values())
        return CacheOutcome(True, setting, estimate, bound, held, images, seconds, message, files, written)

    if why_disk is not None:
        result = on_disk(why_disk)
        if isinstance(result, CacheOutcome):
            return result
        if estimate > bound:
            return fall_back(estimate, "the estimated", f", and on disk {result}")
        log(f"Decoded-image cache kept in memory instead of on disk ({why_disk}): {result}")
    if estimate > bound:
        return fall_back(estimate, "the estimated")
    started = time.perf_counter()
    cached: dict[str, DecodedImageDataset] = {}
    held = 0
    for name, ds, _ in splits:
        fixed, per_item = steps[name]
        try:
            cached[name] = decode_dataset(
                ds, fixed, per_item, fixed_size=fixed_size[name], bound=bound - held, progress=progress
            )
        except CacheTooLarge as exc:
            cached.clear()
            if why_disk is None and cfg.loader.decoded_cache_disk != "off":
                result = on_disk("the presized images pass the memory bound")
                if isinstance(result, CacheOutcome):
                    return result
                return fall_back(held + int(exc.args[0]), "the presized images pass", f", and on disk {result}")
            return fall_back(held + int(exc.args[0]), "the presized images pass")
        held += cached[name].nbytes
    seconds = time.perf_counter() - started
    data.train = cached.get("train", data.train)
    data.val = cached.get("val", data.val)
    message = f"Decoded-image cache: {images} images, {held / MIB:,.1f} MiB in memory, built in {seconds:.1f} s"
    log(message)
    return CacheOutcome(True, setting, estimate, bound, held, images, seconds, message)
