"""Check the GPU paths on a CUDA machine: training in a worker thread at fp32/bf16/fp16, pinned memory, stop, CPU reload.

Run it where `torch.cuda.is_available()`; it trains EfficientNet-Lite0 (random init, so no download) on the bundled
digits and writes a JSON report:

    python examples/gpu_check.py --out gpu_check.json

Samples/second are compared as ratios within this one process (fp32 with pinned memory is the baseline), since
absolute figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402 - after the sys.path line that makes the repository importable

from engine.checkpoints import load_checkpoint  # noqa: E402 - after the sys.path line that makes the repository importable
from engine.config import from_dict  # noqa: E402 - after the sys.path line that makes the repository importable
from engine.evaluate import evaluate_checkpoint  # noqa: E402 - after the sys.path line that makes the repository importable
from engine.runs import create_run_dir, run_callbacks  # noqa: E402 - after the sys.path line that makes the repository importable
from engine.trainer import Callback, Trainer  # noqa: E402 - after the sys.path line that makes the repository importable


def project(out_dir: Path, *, precision: str, pin: bool | None, epochs: int, workers: int) -> dict:
    return {
        "name": f"gpu-{precision}",
        "data": {
            "path": str(REPO / "resources" / "sample_data" / "digits"),
            "val_fraction": 0.2,
            "mean": [0.5],
            "std": [0.5],
        },
        "model": {"backbone": "timm/efficientnet_lite0"},
        "loader": {"batch_size": 128, "num_workers": workers, "pin_memory": pin},
        "optimizer": {"name": "adamw", "lr": 0.003},
        "schedule": {"name": "cosine"},
        "train": {"epochs": epochs, "device": "cuda", "seed": 0, "precision": precision},
        "output": {"dir": str(out_dir), "tensorboard": False},
    }


class Watch(Callback):
    """Counts batches, and optionally asks for a stop after `stop_after` of them."""

    def __init__(self, stop_after: int | None = None):
        self.batches = 0
        self.after_stop = 0
        self.stop_after = stop_after
        self.thread_name = None

    def on_run_started(self, trainer, state):
        self.thread_name = threading.current_thread().name

    def on_batch_finished(self, trainer, state, loss):
        self.batches += 1
        if trainer.stop_event.is_set():
            self.after_stop += 1
        if self.stop_after is not None and self.batches == self.stop_after:
            trainer.stop()


def train_in_thread(cfg_dict: dict, base: Path, stop_after: int | None = None) -> dict:
    """Train on a worker thread, as the app does (its QThread runs this same Trainer)."""
    cfg = from_dict(cfg_dict, base_dir=base)
    run_dir = create_run_dir(cfg)
    watch = Watch(stop_after)
    trainer = Trainer(cfg, [*run_callbacks(cfg, run_dir), watch])
    result: dict = {}

    def work():
        try:
            state = trainer.run()
            result.update(status=state.status, history=state.history)
        except BaseException as exc:  # noqa: BLE001 - reported in the JSON
            result.update(status="failed", error=f"{type(exc).__name__}: {exc}")

    torch.cuda.synchronize()
    started = time.perf_counter()
    worker = threading.Thread(target=work, name="training-worker")
    worker.start()
    worker.join()
    result.update(
        wall_seconds=time.perf_counter() - started,
        run_dir=str(run_dir),
        thread=watch.thread_name,
        batches=watch.batches,
        batches_after_stop=watch.after_stop,
        peak_memory_mb=torch.cuda.max_memory_allocated() / 2**20,
    )
    torch.cuda.reset_peak_memory_stats()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=6)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("No CUDA device here: this check needs one.", file=sys.stderr)
        return 2
    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        variants = [("fp32", True), ("fp32", False), ("bf16", True), ("fp16", True)]
        # A short warm-up run so cuDNN autotuning and worker start-up do not count against the first variant.
        train_in_thread(project(base, precision="fp32", pin=True, epochs=1, workers=args.workers), base)
        for precision, pin in variants:
            name = f"{precision}{'' if pin else '-unpinned'}"
            res = train_in_thread(
                project(base, precision=precision, pin=pin, epochs=args.epochs, workers=args.workers), base
            )
            hist = res.get("history") or []
            res["samples_per_second_last_epoch"] = hist[-1]["samples_per_second"] if hist else None
            res["val_accuracy"] = hist[-1]["val_accuracy"] if hist else None
            res["val_loss"] = hist[-1]["val_loss"] if hist else None
            res.pop("history", None)
            report["runs"][name] = res
            print(
                name,
                json.dumps(
                    {
                        k: res.get(k)
                        for k in (
                            "status",
                            "error",
                            "val_accuracy",
                            "samples_per_second_last_epoch",
                            "wall_seconds",
                            "peak_memory_mb",
                            "thread",
                        )
                    }
                ),
                flush=True,
            )
        base_sps = report["runs"]["fp32"]["samples_per_second_last_epoch"]
        report["ratios_vs_fp32_pinned"] = {
            k: (
                v["samples_per_second_last_epoch"] / base_sps
                if base_sps and v["samples_per_second_last_epoch"]
                else None
            )
            for k, v in report["runs"].items()
        }

        # Stop takes effect within one batch on the GPU too.
        stopped = train_in_thread(
            project(base, precision="bf16", pin=True, epochs=5, workers=args.workers), base, stop_after=5
        )
        report["stop"] = {k: stopped.get(k) for k in ("status", "batches", "batches_after_stop", "error")}
        print("stop", report["stop"], flush=True)

        # A checkpoint written from CUDA loads and evaluates on the CPU.
        final = Path(report["runs"]["bf16"]["run_dir"]) / "checkpoints" / "final.pt"
        try:
            ckpt = load_checkpoint(final)
            on_cpu = all(t.device.type == "cpu" for t in ckpt["model_state_dict"].values())
            ev = evaluate_checkpoint(str(final), device="cpu")
            report["cpu_reload"] = {
                "tensors_on_cpu": on_cpu,
                "cpu_accuracy": ev.accuracy,
                "gpu_val_accuracy": report["runs"]["bf16"]["val_accuracy"],
            }
        except Exception as exc:  # noqa: BLE001 - reported in the JSON
            report["cpu_reload"] = {"error": f"{type(exc).__name__}: {exc}"}
        print("cpu_reload", report["cpu_reload"], flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
