"""Run folders: the project as run, metrics.jsonl one line per epoch, and the model checkpoints."""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.checkpoints import FORMAT_VERSION, CheckpointWriteError, atomic_torch_save, remove_stale_temporaries
from engine.config import ConfigError, ProjectConfig, run_epochs, save_project, with_total_epochs
from engine.freezing import freeze_spec
from engine.run_files import (  # noqa: F401 - METRICS_FILE, read_metrics: part of this module's API
    METRICS_FILE,
    PROJECT_FILE,
    read_metrics,
    read_run_info,
    update_run_info,
)
from engine.run_lock import claim_run_dir, release_run_dir
from engine.trainer import Callback, Trainer, TrainState

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"


def _make_dir(run_dir: Path, exist_ok: bool) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=exist_ok)
    except FileExistsError:
        if not exist_ok:
            raise
        raise ConfigError([f"--out {str(run_dir)!r} is a file; give a folder for the run"]) from None
    except OSError as exc:
        raise ConfigError([f"run folder {str(run_dir)!r} cannot be created: {exc.strerror or exc}"]) from None


def create_run_dir(
    cfg: ProjectConfig, out: str | os.PathLike | None = None, *, log: Callable[[str], None] | None = None
) -> Path:
    """A fresh run folder, claimed for this process: `out` as given, else OUTPUT_DIR/NAME-YYYYmmdd-HHMMSS[-N].

    The folder is created and claimed before anything is written in it, so two processes never share one:
    default names get a suffix when another run took the name in the same second (mkdir is the arbiter), and
    an `out` that another live process holds, or that already holds a run, is refused.
    """
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        output_dir = cfg.resolve(cfg.output.dir)
        if output_dir is None:  # validation refuses it; an unvalidated project gets the same message
            raise ConfigError(["output.dir is empty: give a folder for run folders, such as 'runs'"])
        base = output_dir / f"{_slug(cfg.output.run_name or cfg.name)}-{stamp}"
        run_dir, n = base, 1
        while True:
            try:
                _make_dir(run_dir, exist_ok=False)
                break
            except FileExistsError:  # another run took this name in the same second
                n += 1
                run_dir = base.with_name(f"{base.name}-{n}")
        claim_run_dir(run_dir, log=log)
        return run_dir
    run_dir = Path(out).expanduser().resolve()
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError([f"--out {str(run_dir)!r} is a file; give a folder for the run"])
    _make_dir(run_dir, exist_ok=True)
    claim_run_dir(run_dir, log=log)
    if (run_dir / METRICS_FILE).exists():
        release_run_dir(run_dir)
        raise ConfigError(
            [
                f"--out {str(run_dir)!r} already holds a run ({METRICS_FILE}); choose another folder "
                "so its results are not overwritten"
            ]
        )
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


def link_atomic(src: Path, dst: Path) -> None:
    """dst becomes the same file as src (a hard link, else a copy), replacing dst in one rename."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link.tmp")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)  # costs no space; a later rename over src leaves dst alone
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(dst, exc) from exc


def _write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    tmp = run_dir / f".{METRICS_FILE}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps({k: _json_value(v) for k, v in row.items()}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, run_dir / METRICS_FILE)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(run_dir / METRICS_FILE, exc, what="the run's metrics") from exc


def _append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    """One line more in metrics.jsonl; a line cut short (a full disk, a kill) is skipped by read_metrics."""
    try:
        with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({k: _json_value(v) for k, v in row.items()}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise CheckpointWriteError(run_dir / METRICS_FILE, exc, what="the run's metrics") from exc


class RunRecorder(Callback):
    """Writes a run folder as training goes: nothing is lost when the process dies between epochs.

    checkpoints/epoch-NNN.pt each epoch (the newest checkpoint.keep_last kept), last.pt and
    best.pt (by checkpoint.monitor) as links to it, final.pt when the run completes. Each file
    is written to a temporary name, fsynced and renamed, so a kill leaves the previous one whole; a
    resumed run first deletes the temporary files a killed one left. An epoch's line goes into
    metrics.jsonl once its checkpoint is saved: the metrics never claim an epoch that cannot be resumed.
    """

    def __init__(self, run_dir: Path, labels: dict[str, Any] | None = None):
        """labels: what started the run, kept in run.json (a sweep's {"sweep": {"study": ..., "trial": ...}})."""
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.labels = dict(labels or {})

    def _write_info(self, **values: Any) -> None:
        try:
            update_run_info(self.run_dir, **values)
        except OSError as exc:
            raise CheckpointWriteError(self.run_dir / "run.json", exc, what="the run's record") from exc

    def on_run_started(self, trainer: Trainer, state: TrainState) -> None:
        save_project(project_as_run(trainer.cfg), self.run_dir / PROJECT_FILE)
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        # A resumed run keeps the time its folder's run first started; "running" until on_run_finished says how
        # it ended, so a folder still saying "running" with nobody holding its lock was killed.
        started = read_run_info(self.run_dir).get("started") or now
        self._write_info(started=started, resumed=now if state.start_epoch else None, status="running", error=None)
        if self.labels:
            self._write_info(**self.labels)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.checkpoint_dir)  # a killed run's half-written files
        (self.run_dir / f".{METRICS_FILE}.tmp").unlink(missing_ok=True)
        if state.start_epoch:  # resumed: the checkpoint's history is the truth, later lines are stale
            _write_metrics(self.run_dir, state.history)

    def on_epoch_finished(self, trainer: Trainer, state: TrainState, metrics: dict[str, Any]) -> None:
        policy = trainer.cfg.checkpoint
        payload = checkpoint_payload(trainer, state, metrics)
        last = self.checkpoint_dir / "last.pt"
        if policy.every_epoch:
            written = self.checkpoint_dir / f"epoch-{state.epoch:03d}.pt"
            atomic_torch_save(payload, written)
            link_atomic(written, last)
            self._prune(policy.keep_last)
        else:
            atomic_torch_save(payload, last)
            written = last
        if metrics.get("best"):
            link_atomic(written, self.checkpoint_dir / "best.pt")
        _append_metrics(self.run_dir, metrics)

    def _prune(self, keep: int) -> None:
        if keep <= 0:
            return
        epochs = sorted(self.checkpoint_dir.glob("epoch-*.pt"))
        for old in epochs[:-keep]:
            old.unlink(missing_ok=True)

    def on_run_finished(self, trainer: Trainer, state: TrainState) -> None:
        if state.status == "completed":
            self._link_final(trainer, state)
        if not (self.run_dir / PROJECT_FILE).exists():  # a run that failed before it began has no record to finish
            return
        error = state.error
        text = (str(error).strip().splitlines() or [type(error).__name__])[0] if error is not None else None
        try:
            # Image files skipped while training ({"path", "reason", "split"}), with those of the run before a resume
            earlier = read_run_info(self.run_dir).get("unreadable") or []
            known = {u.get("path") for u in state.unreadable}
            unreadable = [u for u in earlier if isinstance(u, dict) and u.get("path") not in known]
            self._write_info(
                status=state.status,
                ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                error=text,
                unreadable=unreadable + list(state.unreadable),
            )
        except CheckpointWriteError:
            if state.status != "failed":
                raise  # a failing run's own error (a full disk, most likely) is the one to report

    def _link_final(self, trainer: Trainer, state: TrainState) -> None:
        final, restored = self.checkpoint_dir / "final.pt", state.restored_best_epoch
        if restored is None:
            source = self.checkpoint_dir / "last.pt"
        elif restored == state.best_epoch:
            source = self.checkpoint_dir / "best.pt"
        else:
            # Early stopping's best (by its own monitor and min_delta) is not best.pt's epoch: final.pt holds the
            # weights the run ended with, that epoch's file, or written now when the file was not kept.
            source = self.checkpoint_dir / f"epoch-{restored:03d}.pt"
            if not source.exists():
                metrics = state.history[restored - 1]
                payload = checkpoint_payload(trainer, state, metrics)
                payload.update(epoch=restored, history=payload["history"][:restored])
                atomic_torch_save(payload, final)
                return
        if source.exists():
            link_atomic(source, final)


class TensorBoardLogger(Callback):
    """TensorBoard event files in RUN/tensorboard: losses, accuracies, learning rate, the hyperparameters."""

    def __init__(self, run_dir: Path):
        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer: SummaryWriter | None = None

    def on_run_started(self, trainer: Trainer, state: TrainState) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a longer earlier run logged past the resumed point.
        self.writer = SummaryWriter(str(self.log_dir), purge_step=state.global_step if state.start_epoch else None)
        self.writer.add_text("project", "```json\n" + json.dumps(trainer.cfg.to_dict(), indent=2) + "\n```", 0)

    def on_batch_finished(self, trainer: Trainer, state: TrainState, loss: float) -> None:
        assert self.writer is not None  # opened in on_run_started
        self.writer.add_scalar("batch/loss", loss, state.global_step)

    def on_epoch_finished(self, trainer: Trainer, state: TrainState, metrics: dict[str, Any]) -> None:
        assert self.writer is not None  # opened in on_run_started
        for key, tag in (
            ("train_loss", "loss/train"),
            ("val_loss", "loss/val"),
            ("train_accuracy", "accuracy/train"),
            ("val_accuracy", "accuracy/val"),
            ("lr", "lr"),
            ("samples_per_second", "speed/samples_per_s"),
        ):
            value = metrics.get(key)
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, value, state.epoch)
        self.writer.flush()

    def on_run_finished(self, trainer: Trainer, state: TrainState) -> None:
        if self.writer is None:
            return
        if state.history:
            from torch.utils.tensorboard.summary import hparams

            last = state.history[-1]
            final = {
                f"hparam/{k}": last[k]
                for k in ("train_loss", "val_loss", "val_accuracy")
                if last.get(k) is not None and math.isfinite(last[k])
            }
            # Written into this run's own event file (add_hparams would start a separate run folder).
            file_writer = self.writer.file_writer
            assert file_writer is not None  # SummaryWriter opens it on creation
            for event in hparams(hyperparameters(trainer.cfg), final):
                file_writer.add_summary(event)
            for tag, value in final.items():
                self.writer.add_scalar(tag, value, state.epoch)
        self.writer.close()
        self.writer = None


class WandbLogger(Callback):
    """Weights & Biases logging (output.wandb): the project as the run's config, each epoch's metrics, the outcome.

    offline writes into RUN/wandb (`wandb sync` uploads it later); online needs `wandb login`. The W&B run's id is
    kept in run.json, so a resumed run continues the same W&B run. group: runs shown together (a sweep's study).
    """

    def __init__(self, run_dir: Path, group: str | None = None):
        self.run_dir = Path(run_dir)
        self.group = group
        self.run: Any = None

    def on_run_started(self, trainer: Trainer, state: TrainState) -> None:
        wandb = import_wandb(trainer.cfg.output.wandb.mode)
        settings = trainer.cfg.output.wandb
        run_id = read_run_info(self.run_dir).get("wandb_id") or secrets.token_hex(4)  # W&B ids: [a-z0-9]
        self.run = wandb.init(
            project=settings.project or _slug(trainer.cfg.name),
            entity=settings.entity,
            mode=settings.mode,
            dir=str(self.run_dir),
            name=self.run_dir.name,
            id=run_id,
            resume="allow",
            group=self.group,
            config=project_as_run(trainer.cfg).to_dict(),
        )
        update_run_info(self.run_dir, wandb_id=run_id)

    def on_epoch_finished(self, trainer: Trainer, state: TrainState, metrics: dict[str, Any]) -> None:
        values = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.run.log({k: v for k, v in values.items() if math.isfinite(v)}, step=state.epoch)

    def on_run_finished(self, trainer: Trainer, state: TrainState) -> None:
        if self.run is None:
            return
        self.run.summary["status"] = state.status
        if state.best_epoch is not None:
            self.run.summary["best_epoch"] = state.best_epoch
        self.run.finish(exit_code=1 if state.status == "failed" else 0)
        self.run = None


def import_wandb(mode: str) -> Any:
    """The wandb package, or a ConfigError saying how to install it."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            [
                f"output.wandb.mode = {mode!r} needs the wandb package: pip install wandb "
                "(or pip install -e '.[wandb]'), or set output.wandb.mode to 'off'"
            ]
        ) from None
    return wandb


def hyperparameters(cfg: ProjectConfig) -> dict[str, Any]:
    """The settings worth comparing across runs, flattened for TensorBoard's HParams view."""
    return {
        "backbone": cfg.model.backbone,
        "weights": str(cfg.model.weights or cfg.model.weights_file or "none"),
        "freeze": cfg.model.freeze,
        "batch_size": cfg.loader.batch_size,
        "sampler": cfg.loader.sampler.name,
        "loss": cfg.loss.name,
        "label_smoothing": cfg.loss.label_smoothing,
        "optimizer": cfg.optimizer.name,
        "lr": cfg.optimizer.lr,
        "weight_decay": cfg.optimizer.weight_decay,
        "backbone_lr_mult": cfg.optimizer.backbone_lr_mult,
        "layer_lr_decay": cfg.optimizer.layer_lr_decay,
        "schedule": cfg.schedule.name,
        "epochs": run_epochs(cfg),
        "phases": len(cfg.train.phases),
        "seed": cfg.train.seed,
        "precision": cfg.train.precision,
    }


def run_callbacks(cfg: ProjectConfig, run_dir: Path, labels: dict[str, Any] | None = None) -> list[Callback]:
    """The callbacks that write a run folder, as the CLI and the app both use them (labels: see RunRecorder)."""
    callbacks: list[Callback] = [RunRecorder(run_dir, labels)]
    if cfg.output.tensorboard:
        callbacks.append(TensorBoardLogger(run_dir))
    if cfg.output.wandb.mode != "off":
        sweep = (labels or {}).get("sweep")
        callbacks.append(WandbLogger(run_dir, group=sweep.get("study") if isinstance(sweep, dict) else None))
    return callbacks


def resume_config(
    ckpt: dict[str, Any],
    source: str | os.PathLike,
    *,
    epochs: int | None = None,
    epochs_field: str = "train.epochs",
    processes: int | None = None,
) -> ProjectConfig:
    """The project saved in a checkpoint, to continue it; epochs is the run's new total (default: as saved).

    processes: continue in that many processes (a multi-process run's checkpoint resumes in one, and back)."""
    from engine.config import from_dict

    if "config" not in ckpt or "epoch" not in ckpt:
        raise ConfigError(
            [
                f"{source} is not a Model Workbench checkpoint (no config/epoch); "
                "a plain state dict can start a new run with train --init-from"
            ]
        )
    data = dict(ckpt["config"])
    if epochs is not None:
        data = with_total_epochs(data, epochs)
    if processes is not None:
        data["distributed"] = {**data.get("distributed", {}), "processes": processes}
    try:
        cfg = from_dict(data, source=str(source))
    except ConfigError as exc:
        raise ConfigError(
            [
                str(p).replace("train.epochs", epochs_field).replace("distributed.processes", "--processes")
                for p in exc.problems
            ],
            exc.source,
        ) from None
    if run_epochs(cfg) <= ckpt["epoch"]:
        raise ConfigError(
            [
                f"{epochs_field} = {run_epochs(cfg)}: the checkpoint has already trained {ckpt['epoch']} "
                f"epoch(s); give the run's new total, such as {ckpt['epoch'] + 5}"
            ]
        )
    return cfg


def resume_run_dir(
    checkpoint: Path, out: str | os.PathLike | None, *, log: Callable[[str], None] | None = None
) -> Path:
    """Where a resumed run writes, claimed for this process: --out, else the checkpoint's own run folder."""
    if out is not None:
        run_dir = Path(out).expanduser().resolve()
    else:
        parent = Path(checkpoint).resolve().parent
        run_dir = parent.parent if parent.name == "checkpoints" else parent
    _make_dir(run_dir, exist_ok=True)
    claim_run_dir(run_dir, log=log)
    return run_dir


def checkpoint_payload(trainer: Trainer, state: TrainState, metrics: dict[str, Any]) -> dict[str, Any]:
    """PyTorch's checkpoint recipe (epoch, model_state_dict, optimizer_state_dict, loss) plus the run's context.

    Only tensors and plain values, so torch.load(weights_only=True) reads it anywhere.
    """
    p = trainer.built
    return {
        "format_version": FORMAT_VERSION,
        "epoch": state.epoch,
        "global_step": state.global_step,
        # contiguous: a channels-last model's weights are saved in the ordinary layout, loadable anywhere
        "model_state_dict": {k: v.detach().cpu().contiguous() for k, v in p.model.state_dict().items()},
        "optimizer_state_dict": p.optimizer.state_dict(),
        "loss": metrics.get("train_loss"),
        **trainer.training_state(),
        "metrics": {k: _json_value(v) for k, v in metrics.items()},
        "history": [{k: _json_value(v) for k, v in m.items()} for m in state.history],
        "config": project_as_run(trainer.cfg).to_dict(),
        "task": p.data.task,
        "class_names": list(p.data.class_names),
        "backbone": trainer.cfg.model.backbone,
        "head_name": p.head_name,
        "freeze": freeze_spec(p.model),
    }
