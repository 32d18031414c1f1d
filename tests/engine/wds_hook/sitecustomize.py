"""Loaded by every Python process of tests/engine/test_webdataset.py's torchrun run (the test puts this folder on
PYTHONPATH).

In the training processes (torchrun sets RANK) with MWB_TEST_WDS_LOG set, every sample a stream decodes is written
to a file of its own process (DataLoader workers included) as "epoch url key", so the test sees which shards each
rank read in each epoch.
"""

import os
import sys

if "RANK" in os.environ and "MWB_TEST_WDS_LOG" in os.environ:
    sys.path.insert(0, os.environ["MWB_TEST_REPO"])
    from engine import webdataset_data as _wds

    _decode = _wds.ShardStream._decode

    def _logged(self, sample):
        path = os.path.join(os.environ["MWB_TEST_WDS_LOG"], f"rank-{os.environ['RANK']}-{os.getpid()}.txt")
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{self.epoch} {sample['__url__']} {sample['__key__']}\n")
        return _decode(self, sample)

    _wds.ShardStream._decode = _logged
