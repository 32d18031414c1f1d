"""A process that fills the decoded-image cache of a project (test_decoded_cache_disk.py starts it).

    python child.py PROJECT.json OUT.json PREPROCESS_JSON

It prepares the project's data with the given Preprocess fields and applies the decoded-image cache as a training run does, printing the log lines,
then writes OUT.json: the outcome, and each cache file's inode and modification time as it found them after
mapping. With MWB_TEST_DECODED_PAUSE set it stops at one known point of writing a cache file, so that a test's
SIGKILL (or its go-ahead) lands exactly there, not wherever a polling loop happens to catch it:

  bytes:K   K images have been written into the first temporary file (the training split's; flushed and fsynced,
            so the file is that long);
  rename    the first temporary file is whole and fsynced, and not yet renamed to its final name.

There it writes MWB_TEST_DECODED_MARKER (JSON: the stage and the temporary file) and waits: for ever (until it is
killed), or, with MWB_TEST_DECODED_GO set, until that file exists, then carries on. The engine's code is untouched:
the hook wraps engine.decoded_cache._append (one image written) and _publish (the rename).
"""

import json
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from engine import decoded_cache  # noqa: E402
from engine.config import load_project  # noqa: E402
from engine.data import prepare_data  # noqa: E402
from engine.transforms import Preprocess  # noqa: E402


def pause(stage: str, temporary: str) -> None:
    marker = os.environ["MWB_TEST_DECODED_MARKER"]
    with open(marker + ".part", "w") as fh:
        json.dump({"stage": stage, "temporary": temporary, "bytes": os.path.getsize(temporary)}, fh)
    os.replace(marker + ".part", marker)  # the test sees the marker whole or not at all
    go = os.environ.get("MWB_TEST_DECODED_GO")
    if not go:
        threading.Event().wait()  # until SIGKILL
    while not os.path.exists(go):
        time.sleep(0.01)


def install(spec: str) -> None:
    stage, *rest = spec.split(":")
    if stage == "bytes":
        after = int(rest[0])
        real_append = decoded_cache._append
        count = 0

        def append(fh, image):
            nonlocal count
            real_append(fh, image)
            count += 1
            if count == after:
                fh.flush()
                os.fsync(fh.fileno())
                pause("bytes", fh.name)

        decoded_cache._append = append
    elif stage == "rename":
        real_publish = decoded_cache._publish
        published = 0

        def publish(temporary, final):
            nonlocal published
            published += 1
            if published == 1:
                pause("rename", str(temporary))
            real_publish(temporary, final)

        decoded_cache._publish = publish
    else:
        raise SystemExit(f"unknown MWB_TEST_DECODED_PAUSE stage {stage!r}")


def main() -> None:
    project, out = sys.argv[1], sys.argv[2]
    if os.environ.get("MWB_TEST_DECODED_PAUSE"):
        install(os.environ["MWB_TEST_DECODED_PAUSE"])
    cfg = load_project(project)
    pre = Preprocess(**json.loads(sys.argv[3]))
    data = prepare_data(cfg, pre)
    outcome = decoded_cache.apply_decoded_cache(data, cfg, pre, log=lambda line: print(line, flush=True))
    files = []
    for path in outcome.files:
        st = os.stat(path)
        files.append({"path": str(path), "inode": st.st_ino, "mtime_ns": st.st_mtime_ns})
    with open(out, "w") as fh:
        json.dump({"pid": os.getpid(), "used": outcome.used, "written": outcome.written, "files": files}, fh)


if __name__ == "__main__":
    main()
