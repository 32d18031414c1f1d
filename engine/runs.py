"""Run folders: the project as run, metrics.jsonl one line per epoch, and the model checkpoints."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from engine.checkpoints import FORMAT_VERSION, atomic_torch_save
from engine.config import ConfigError, ProjectConfig, save_project
from engine.freezing import freeze_spec
from engine.trainer import Callback, Trainer, TrainState

METRICS_FILE = "metrics.jsonl"
PROJECT_FILE = "project.json"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"


def create_run_dir(cfg: ProjectConfig, out: str | os.PathLike | None = None) -> Path:
    """A fresh run folder: `out` as given, else OUTPUT_DIR/NAME-YYYYmmdd-HHMMSS; never one that holds a run."""
    if out is not None:
        run_dir = Path(out).expanduser().resolve()
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = cfg.resolve(cfg.output.dir) / f"{_slug(cfg.output.run_name or cfg.name)}-{stamp}"
        run_dir, n = base, 1
        while run_dir.exists():  # two runs started in the same second
            n += 1
            run_dir = base.with_name(f"{base.name}-{n}")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError([f"--out {str(run_dir)!r} is a file; give a folder for the run"])
    if (run_dir / METRICS_FILE).exists():
        raise ConfigError([f"--out {str(run_dir)!r} already holds a run ({METRICS_FILE}); choose another folder "
                           "so its results are not overwritten"])
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError([f"run folder {str(run_dir)!r} cannot be created: {exc.strerror or exc}"]) from None
    return run_dir


def project_as_run(cfg: ProjectConfig) -> ProjectConfig:
    """The project with its paths made absolute, so the copy in the run folder still finds its data."""
    snapshot = cfg.copy()
    for section, name in (("data", "path"), ("data", "val_path"), ("model", "weights_file"), ("output", "dir")):
        obj = getattr(snapshot, section)
        value = getattr(obj, name)
        if value:
            setattr(obj, name, str(cfg.resolve(value)))
    return snapshot


def _json_value(value: Any) -> Any:
    # JSON has no NaN or Infinity; null keeps metrics.jsonl readable by every JSON parser.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunRecorder(Callback):
    """Writes a run folder as training goes: nothing is lost when the process dies between epochs."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"

    def on_run_started(self, trainer: Trainer, state: TrainState) -> None:
        save_project(project_as_run(trainer.cfg), self.run_dir / PROJECT_FILE)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)

    def on_epoch_finished(self, trainer: Trainer, state: TrainState, metrics: dict[str, Any]) -> None:
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({k: _json_value(v) for k, v in metrics.items()}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        atomic_torch_save(checkpoint_payload(trainer, state, metrics), self.checkpoint_dir / "last.pt")

    def on_run_finished(self, trainer: Trainer, state: TrainState) -> None:
        last = self.checkpoint_dir / "last.pt"
        if state.status == "completed" and last.exists():
            final = self.checkpoint_dir / "final.pt"
            final.unlink(missing_ok=True)
            try:  # a hard link costs no space; last.pt is later replaced by rename, which leaves final.pt alone
                os.link(last, final)
            except OSError:
                shutil.copyfile(last, final)


def checkpoint_payload(trainer: Trainer, state: TrainState, metrics: dict[str, Any]) -> dict[str, Any]:
    """PyTorch's checkpoint recipe (epoch, model_state_dict, optimizer_state_dict, loss) plus the run's context.

    Only tensors and plain values, so torch.load(weights_only=True) reads it anywhere.
    """
    p = trainer.parts
    return {
        "format_version": FORMAT_VERSION,
        "epoch": state.epoch,
        "global_step": state.global_step,
        "model_state_dict": {k: v.detach().cpu() for k, v in p.model.state_dict().items()},
        "optimizer_state_dict": p.optimizer.state_dict(),
        "scheduler_state_dict": p.schedule.state_dict(),
        "loss": metrics.get("train_loss"),
        "metrics": {k: _json_value(v) for k, v in metrics.items()},
        "history": [{k: _json_value(v) for k, v in m.items()} for m in state.history],
        "config": project_as_run(trainer.cfg).to_dict(),
        "task": p.data.task,
        "class_names": list(p.data.class_names),
        "backbone": trainer.cfg.model.backbone,
        "head_name": p.head_name,
        "freeze": freeze_spec(p.model),
    }
