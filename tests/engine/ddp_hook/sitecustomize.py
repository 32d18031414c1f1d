"""Loaded by every Python process of a test's torchrun run (the test puts this folder on PYTHONPATH).

In the training processes (torchrun sets RANK) it adds a callback to every Trainer, driven by the environment:
MWB_TEST_DUMP_DIR: each rank saves its final weights there (rank-N.pt), so a test compares the ranks;
MWB_TEST_FAIL_RANK / MWB_TEST_FAIL_STEP: that rank raises at that global step, as a crashing process would;
MWB_TEST_CORRUPT: rank 0 cuts that image file short once the run is built (after the scan), and every rank
waits for it before the first batch.
"""

import os
import sys

_KEYS = ("MWB_TEST_DUMP_DIR", "MWB_TEST_FAIL_RANK", "MWB_TEST_CORRUPT")
if "RANK" in os.environ and any(key in os.environ for key in _KEYS):
    sys.path.insert(0, os.environ["MWB_TEST_REPO"])
    import torch

    from engine import trainer as _trainer

    class _TestHook(_trainer.Callback):
        def on_run_started(self, trainer, state):
            victim = os.environ.get("MWB_TEST_CORRUPT")
            if not victim:
                return
            if os.environ["RANK"] == "0":
                with open(victim, "rb") as fh:
                    data = fh.read()
                with open(victim, "wb") as fh:
                    fh.write(data[: len(data) // 2])
            torch.distributed.barrier()

        def on_batch_finished(self, trainer, state, loss):
            if os.environ.get("MWB_TEST_FAIL_RANK") == os.environ["RANK"] and state.global_step == int(
                os.environ.get("MWB_TEST_FAIL_STEP", "1")
            ):
                raise RuntimeError(f"injected failure in rank {os.environ['RANK']} at step {state.global_step}")

        def on_run_finished(self, trainer, state):
            folder = os.environ.get("MWB_TEST_DUMP_DIR")
            if folder and trainer.parts is not None:
                torch.save(
                    {k: v.detach().cpu() for k, v in trainer.parts.model.state_dict().items()},
                    os.path.join(folder, f"rank-{os.environ['RANK']}.pt"),
                )

    _init = _trainer.Trainer.__init__

    def _patched_init(self, cfg, callbacks=(), *args, **kwargs):
        _init(self, cfg, [*callbacks, _TestHook()], *args, **kwargs)

    _trainer.Trainer.__init__ = _patched_init
