"""Loaded by the `main.py` processes test_faults_kill.py starts (it puts this folder on PYTHONPATH).

With MWB_TEST_PAUSE_IN_WRITE set, the process stops dead at one known point inside the checkpoint writes of one
epoch, so that the test's SIGKILL lands exactly there rather than wherever a polling loop happens to catch it:

  bytes:E:F   torch.save of epoch-E.pt has written the fraction F (0 < F < 1) of last.pt's size (epoch E-1's
              checkpoint, as large as epoch E's but for a few bytes) into its temporary file, flushed to the file
              so that the half-written file on disk is that long;
  rename:E    epoch-E.pt's temporary file is whole and fsynced, and not yet renamed over epoch-E.pt;
  link:E      last.pt's new hard link to epoch-E.pt exists under its temporary name, not yet renamed over last.pt.

There it writes MWB_TEST_PAUSED_MARKER (JSON: the stage, the temporary file, the bytes in it) and blocks until it
is killed. Without the variable nothing is changed. The checkpoint code itself is untouched: the hook wraps
tempfile.mkstemp (to learn which descriptor is epoch-E.pt's temporary file), the engine's write-through file
object (engine.checkpoints._KeepWriteErrors.write) and os.replace.
"""

import os
import sys

if os.environ.get("MWB_TEST_PAUSE_IN_WRITE"):
    import json
    import tempfile
    import threading

    sys.path.insert(0, os.environ["MWB_TEST_REPO"])
    from engine import checkpoints as _checkpoints

    _stage, _epoch, *_rest = os.environ["MWB_TEST_PAUSE_IN_WRITE"].split(":")
    _epoch_file = f"epoch-{int(_epoch):03d}.pt"
    _fraction = float(_rest[0]) if _rest else 0.0
    _temporaries: dict[int, str] = {}  # descriptor -> path of epoch-E.pt's temporary file
    _real_mkstemp, _real_replace = tempfile.mkstemp, os.replace

    def _pause(stage: str, temporary: str) -> None:
        marker = os.environ["MWB_TEST_PAUSED_MARKER"]
        with open(marker + ".part", "w") as fh:
            json.dump({"stage": stage, "temporary": temporary, "bytes": os.path.getsize(temporary)}, fh)
        _real_replace(marker + ".part", marker)  # the test sees the marker whole or not at all
        threading.Event().wait()  # until SIGKILL

    def _mkstemp(*args, **kwargs):
        fd, path = _real_mkstemp(*args, **kwargs)
        if os.path.basename(path).startswith(f".{_epoch_file}."):
            _temporaries[fd] = path
        return fd, path

    tempfile.mkstemp = _mkstemp

    if _stage == "bytes":
        _real_write = _checkpoints._KeepWriteErrors.write

        def _write(self, data):
            path = _temporaries.get(self._fh.fileno())
            if path is None:
                return _real_write(self, data)
            at = max(1, int(_fraction * os.path.getsize(os.path.join(os.path.dirname(path), "last.pt"))))
            done = self._fh.tell()
            if done + len(data) < at:
                return _real_write(self, data)
            self._fh.write(data[: at - done])
            self._fh.flush()
            _pause("bytes", path)

        _checkpoints._KeepWriteErrors.write = _write

    def _replace(src, dst, *args, **kwargs):
        name, folder = os.path.basename(dst), os.path.dirname(dst)
        if _stage == "rename" and name == _epoch_file:
            _pause("rename", os.fspath(src))
        if _stage == "link" and name == "last.pt" and os.path.exists(os.path.join(folder, _epoch_file)):
            _pause("link", os.fspath(src))
        return _real_replace(src, dst, *args, **kwargs)

    os.replace = _replace
