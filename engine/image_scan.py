"""Reading image files, and checking many of them quickly: what a dataset scan needs, without PyTorch or Qt.

A scan looks at each file's header (format, size, mode) and at its last bytes instead of decoding its pixels:
Pillow's Image.open reads the header alone, and a file whose format ends with a known trailer (a PNG's IEND
chunk, a JPEG's end-of-image marker, a GIF's trailer byte) or states its own length (WebP, BMP) shows whether
all of it is there. Only a file whose end does not look complete, or of another format, is decoded in full, so a
file cut short by an interrupted copy or download is still found by the scan, with the decoder's own words.

Found up front: empty files, files that are not images or not in a format Pillow reads, unreadable files
(permissions), images over Pillow's pixel limit (decompression bombs), damaged headers, and truncated files.
Not found up front: damage inside a file of full length (flipped bytes in the compressed pixels). Such a file
fails when training reads it; the training data path skips it and reports it by name.

Big datasets are checked in worker processes (module-level functions here, so a worker imports Pillow and this
module only, never PyTorch or Qt). The processes come from the 'forkserver' start method (or 'spawn' where it
does not exist), never from fork: the scan is called from threads of a process that holds PyTorch's and Qt's
threads, which a forked child would inherit in whatever state they were in.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

Result = tuple[str | None, tuple[int, int] | None]  # (why the file cannot be used, or None; upright width, height)

# Below the crossover the scan stays in the calling process: starting the worker processes would cost more than
# the work they share. With n CPUs the pool wins from start / (per_file * (1 - 1/n)) files. The costs below are
# CPU-bound estimates from the 2-CPU development machine (shared, load about 12, so wall times were noisy):
# checking one small PNG in-process took 70 us of CPU (about 200 us wall), starting a pool (forkserver, workers
# importing Pillow) 0.8 s wall, of which about 0.5 s is taken as the cost on an idle machine. That puts the
# crossover near 14,000 files on 2 CPUs and 7,600 on 16. (On the loaded machine 20,000 files took 4.0-4.5 s
# in-process and 3.3-7.3 s in 2 workers: no clear winner at 2 CPUs.) PARALLEL_FROM, when set, replaces the
# estimate (the tests set it to 1 to scan a few dozen files in real worker processes).
PARALLEL_FROM: int | None = None
_POOL_START_S = 0.5
_CHECK_S = 70e-6
_ORIENTATION = 0x0112
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_JPEG_END = b"\xff\xd9"
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_image(path: str | os.PathLike) -> Image.Image:
    """An image file fully decoded as PIL RGB, turned upright by its EXIF orientation."""
    with Image.open(path) as img:
        _refuse_bomb(img)
        img.load()
        # In place: the copy exif_transpose otherwise makes of an upright image (nearly every file) was a
        # fifth of the decoding time of a small PNG. The pixels stay in memory after the file is closed.
        ImageOps.exif_transpose(img, in_place=True)
    return to_rgb(img)


def _refuse_bomb(img: Image.Image) -> None:
    # Pillow only warns between one and two times its pixel limit; refusing here makes the scan and
    # training agree, without the process-wide warning filters (not thread-safe) or a changed limit.
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:
        raise Image.DecompressionBombError(
            f"image too large ({img.width}x{img.height} pixels; Pillow's limit is {limit}, "
            "a guard against decompression bombs)"
        )


def to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_MODES:
        # Pillow's own conversion clips 16-bit values at 255 (a white image); scale the 16-bit range instead.
        values = np.asarray(img).astype(np.float32) / 257.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float32))
        lo, hi = float(values.min()), float(values.max())
        if lo < 0.0 or hi > 1.0:  # no fixed range to assume, so stretch what is there
            values = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
        return Image.fromarray(np.rint(values * 255).astype(np.uint8)).convert("RGB")
    if mode in ("P", "PA"):
        # Going through RGBA applies palette transparency properly (Pillow warns on a direct P -> RGB).
        img = img.convert("RGBA") if mode == "PA" or "transparency" in img.info else img.convert("RGB")
    return img.convert("RGB")  # RGBA/LA drop alpha; L, 1, CMYK, YCbCr convert directly


# ---------------------------------------------------------------------------------------------
# Checking one file


def inspect(path: str | os.PathLike) -> Result:
    """Whether an image file can be used, from its header and its end; decoded in full only where those cannot
    tell (see the module's note)."""
    try:
        length = os.stat(path).st_size
        if length == 0:
            return "empty file (0 bytes)", None
        with Image.open(path) as img:
            _refuse_bomb(img)
            if _looks_complete(img, length):
                return None, _upright_size(img)
        return None, load_image(path).size  # the decoder decides, and says what is wrong
    except UnidentifiedImageError:
        return "cannot identify image file (not an image, or a format Pillow cannot read)", None
    except Exception as exc:  # noqa: BLE001 - any reader failure means the file is unusable
        text = str(exc).strip()
        return (text if text else type(exc).__name__), None


def _looks_complete(img: Image.Image, length: int) -> bool:
    """True when the file's own structure says all of it is there; False sends it to the full decoder."""
    fmt, fp = img.format, getattr(img, "fp", None)  # the open file of an ImageFile, which Image.open returns
    if fp is None:
        return False
    if fmt == "PNG":
        return _tail(fp, length, len(_PNG_END)) == _PNG_END
    if fmt in ("JPEG", "MPO"):
        # The marker cannot occur inside compressed data (0xFF there is followed by 0x00 or a restart marker);
        # a few bytes of padding after it are common.
        return _JPEG_END in _tail(fp, length, 64)
    if fmt == "GIF":
        return _tail(fp, length, 1) == b";"
    if fmt == "WEBP":
        head = _head(fp, 12)
        return head[:4] == b"RIFF" and length >= int.from_bytes(head[4:8], "little") + 8
    if fmt == "BMP":
        stated = int.from_bytes(_head(fp, 6)[2:6], "little")
        return stated > 0 and length >= stated
    return False


def _tail(fp: Any, length: int, count: int) -> bytes:
    fp.seek(max(0, length - count))
    return bytes(fp.read(count))


def _head(fp: Any, count: int) -> bytes:
    fp.seek(0)
    return bytes(fp.read(count))


def _upright_size(img: Image.Image) -> tuple[int, int]:
    """The size load_image gives: width and height swapped for an EXIF orientation that turns the image."""
    # A PNG's getexif() decodes the image when the EXIF chunk comes after the pixels; read it only when the header had it.
    if img.format == "PNG" and "exif" not in img.info:
        return img.size
    try:
        orientation = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: the decoder ignores it as well
        orientation = 1
    w, h = img.size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


# ---------------------------------------------------------------------------------------------
# Checking many files


def _no_sigint() -> None:
    # Ctrl-C reaches the whole process group; the parent alone handles it (and ends these workers).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def start_method() -> str:
    """'forkserver' where the platform has it, else 'spawn' (never 'fork': see the module's note)."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def worker_count(files: int) -> int:
    """Worker processes for a scan of this many files: the CPUs this process may use, or none below the
    crossover (see PARALLEL_FROM's note)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS, Windows)
        cpus = os.cpu_count() or 1
    if PARALLEL_FROM is not None:
        threshold = float(PARALLEL_FROM)
    elif cpus < 2:
        return 0
    else:
        threshold = _POOL_START_S / (_CHECK_S * (1 - 1 / cpus))
    return 0 if files < threshold else max(1, min(cpus, 32))


def inspect_many(
    paths: Sequence[str | os.PathLike], workers: int | None = None
) -> Generator[tuple[int, list[Result]], None, None]:
    """Check files, yielding (index of the first, results) chunk by chunk as they finish, in no fixed order.

    workers: processes to use (None: worker_count's choice; 0: in this process). Use it in
    contextlib.closing(...): closing the generator early (a stop, an exception in the caller's loop) ends the
    worker processes at once, where waiting for the garbage collector would leave them running; what was
    yielded before stays valid. Where worker processes cannot run (a script that starts scanning at import
    time, without the `if __name__ == "__main__":` guard that the 'spawn' and 'forkserver' start methods need),
    the files they did not finish are checked in this process instead.
    """
    total = len(paths)
    if workers is None:
        workers = worker_count(total)
    if workers <= 0 or total == 0:
        yield from _in_process(paths, 0, total)
        return
    # Chunks of a twentieth to a tenth of a second: smooth progress, and few enough messages not to cost much.
    size = max(32, min(512, total // (workers * 40) or 1))
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(start_method()), initializer=_no_sigint)
    pending = {
        pool.submit(_inspect_chunk, start, [os.fspath(p) for p in paths[start : start + size]]): start
        for start in range(0, total, size)
    }
    try:
        for future in as_completed(list(pending)):
            start = pending.pop(future)
            try:
                result = future.result()
            except BrokenProcessPool:
                yield from _in_process(paths, start, min(start + size, total))
                continue
            yield result
    finally:
        _end(pool, pending)


def _in_process(paths: Sequence[str | os.PathLike], begin: int, end: int) -> Iterator[tuple[int, list[Result]]]:
    step = min(256, max(1, -(-(end - begin) // 100)))  # at most 100 progress reports, each at most 256 files
    for start in range(begin, end, step):
        yield start, [inspect(p) for p in paths[start : min(start + step, end)]]


def _end(pool: ProcessPoolExecutor, pending: dict[Future[tuple[int, list[Result]]], int]) -> None:
    """Shut the pool down now: unstarted chunks cancelled, and workers busy with a chunk ended (a stopped scan
    must not wait for them)."""
    for future in pending:
        future.cancel()
    if pending:
        terminate = getattr(pool, "terminate_workers", None)  # Python 3.14
        if terminate is not None:
            terminate()
        else:  # before 3.14 the executor keeps its processes here, and has no public way to end them
            processes = getattr(pool, "_processes", None) or {}
            for process in list(processes.values()):
                process.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def _inspect_chunk(start: int, paths: list[str]) -> tuple[int, list[Result]]:
    return start, [inspect(p) for p in paths]


class ProgressLine:
    """Progress as lines with the rate and the time left, for work that takes a while: nothing in the first
    second (a small dataset prints nothing), then about one line a second, and the last one.

    Call it with (done, total); it calls write(text) when a line is due. Counts that go back or a new total
    start a new stage (the validation source, or the decoded cache after the scan). Used by `main.py check` and
    by training, whose consoles and logs would otherwise show nothing for the minutes a first scan of a big
    folder takes.
    """

    def __init__(
        self,
        write: Callable[[str], None],
        what: str = "Checking images",
        every: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.write = write
        self.what = what
        self.every = every
        self.clock = clock
        self._stage: tuple[int, int] | None = None  # (total, last done) of the stage in progress
        self._started = 0.0
        self._base = 0
        self._shown: float | None = None
        self._now = 0.0

    def __call__(self, done: int, total: int) -> None:
        text = self.update(done, total)
        now = self._now
        if done >= total:
            if self._shown is not None:  # the work took long enough to show lines: say that it ended
                self.write(text)
            return
        if now - self._started >= self.every and (self._shown is None or now - self._shown >= self.every):
            self._shown = now
            self.write(text)

    def update(self, done: int, total: int) -> str:
        """Take in a count and return its line (the app shows each one; __call__ writes some)."""
        now = self._now = self.clock()
        if self._stage is None or self._stage[0] != total or done < self._stage[1]:
            # A new stage; its first count is work done before (files the scan cache knew): not in the rate.
            self._started, self._base, self._shown = now, done, None
        self._stage = (total, done)
        return self.line(done, total, now - self._started)

    def line(self, done: int, total: int, elapsed: float) -> str:
        share = f"{done:,} of {total:,} ({100 * done // max(total, 1)}%)"
        if done >= total:
            return f"{self.what}: {share}, done in {_duration(elapsed)}"
        worked = done - self._base
        if worked <= 0 or elapsed <= 0:
            return f"{self.what}: {share}"
        rate = worked / elapsed
        return f"{self.what}: {share}, {rate:,.0f}/s, about {_duration((total - done) / rate)} left"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
