"""One training run, prepared, run and finished the same way for every front end: the CLI, the app's worker
thread, and each process of a torchrun run. Front ends only choose the outputs and read the RunFinished.

A session claims its run folder (rank 0 makes it and tells the other processes), builds the callbacks that
write it, runs the Trainer, classifies a failure in one place (the user's input, a run fault, or a bug),
leaves no empty folder behind a run that failed before it began, releases the folder, and reports the outcome
to its outputs and to the caller as a RunFinished.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.config import ConfigError, ProjectConfig, run_epochs
from engine.events import EventEmitter, LogMessage, Output, RunFinished
from engine.run_lock import release_run_dir

if TYPE_CHECKING:  # the trainer imports torch; this module is also read by the app's window at start-up
    from engine.trainer import Trainer


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input: a message is enough, a traceback would only confuse."""
    from engine.backbones import WeightsError
    from engine.checkpoints import CheckpointError
    from engine.codegen import CodegenError
    from engine.data import DataError
    from engine.export import ExportError
    from engine.run_lock import FolderBusyError
    from engine.samplers import SamplerError

    return (
        ConfigError,
        DataError,
        WeightsError,
        SamplerError,
        CheckpointError,
        ExportError,
        FolderBusyError,
        CodegenError,
    )


def run_faults() -> tuple[type[BaseException], ...]:
    """Failures that stop a run for a reason outside the code (a diverging loss, a full disk, a device out of
    memory, a failed peer process): their message says what happened and what to change."""
    from engine.checkpoints import CheckpointWriteError
    from engine.failures import DeviceOutOfMemoryError, NonFiniteLossError, PeerProcessError

    return NonFiniteLossError, CheckpointWriteError, DeviceOutOfMemoryError, PeerProcessError


def error_kind(exc: BaseException) -> str:
    """ "input" (the user can fix their project or files), "fault" (the run met a condition outside the code),
    "interrupted" (a second Ctrl-C) or "bug"."""
    if isinstance(exc, user_errors()):
        return "input"
    if isinstance(exc, run_faults()) or isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return "fault"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return "bug"


def error_text(exc: BaseException) -> str:
    """A failure as the user reads it: the message alone for input errors and run faults, else its type and
    first line; an out-of-memory error the engine did not recognise also says what to lower."""
    kind = error_kind(exc)
    if isinstance(exc, user_errors() + run_faults()):
        return str(exc)
    if kind == "interrupted":
        return "aborted"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    if kind == "fault":
        text += "\nThe device ran out of memory: lower loader.batch_size or data.image_size."
    return text


def apply_init_from(cfg: ProjectConfig, checkpoint: str | Path) -> None:
    """Start a new run from a checkpoint's (or state dict's) weights: they replace the project's weights."""
    cfg.model.weights, cfg.model.weights_file = None, str(Path(checkpoint).resolve())


def failed_before_start(error: BaseException) -> RunFinished:
    """The RunFinished of a run that failed before a session could begin (a bad project, a missing file)."""
    return RunFinished(
        status="failed",
        run_dir=None,
        epoch=0,
        epochs=0,
        error=error_text(error),
        error_type=type(error).__name__,
        kind=error_kind(error),
        traceback=traceback.format_exc() if error_kind(error) == "bug" else None,
    )


class RunSession:
    """One run of a project: `run()` trains it and returns how it ended.

    resume / checkpoint: a loaded checkpoint and its path, to continue exactly (the project is the checkpoint's,
    as engine.runs.resume_config made it). out: the run folder (default: a new one under output.dir, or the
    checkpoint's own folder when resuming). labels: what started the run, kept in the folder's run.json. outputs receive the run's events, in every process of a torchrun run
    (a front end may set them after prepare(), once is_main is known); callbacks are further trainer callbacks.
    """

    def __init__(
        self,
        cfg: ProjectConfig,
        *,
        resume: dict[str, Any] | None = None,
        checkpoint: str | Path | None = None,
        out: str | Path | None = None,
        outputs: Sequence[Output] = (),
        callbacks: Sequence[Any] = (),
        stop_event: threading.Event | None = None,
        log: Callable[[str], None] | None = None,
        labels: dict[str, Any] | None = None,
    ):
        self.cfg = cfg
        self.labels = labels
        self.resume = resume
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.out = out
        self.outputs = list(outputs)
        self.callbacks = list(callbacks)
        self.stop_event = stop_event or threading.Event()
        self.log = log
        self.run_dir: Path | None = None
        self.trainer: Trainer | None = None
        self.dist: Any = None
        self._made_out = False  # a resumed run's --out folder this session created (removed again if left empty)

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    def _make_run_dir(self) -> Path:
        from engine.runs import create_run_dir, resume_run_dir

        if self.resume is not None:
            assert self.checkpoint is not None, "a resumed session needs its checkpoint's path"
            self._made_out = self.out is not None and not Path(self.out).expanduser().exists()
            return resume_run_dir(self.checkpoint, self.out, log=self.log)
        return create_run_dir(self.cfg, self.out, log=self.log)

    def _shared_run_dir(self) -> Path:
        """Rank 0 makes the run folder and tells the others (one folder per run, written by rank 0 only)."""
        if self.dist is None:
            return self._make_run_dir()
        from engine.distributed import broadcast_object
        from engine.failures import PeerProcessError

        made, problem, error = None, None, None
        if self.dist.is_main:
            try:
                made = self._make_run_dir()
            except Exception as exc:  # noqa: BLE001 - the others must hear of it too, or they wait forever
                error = exc
                problem = (str(exc), getattr(exc, "problems", None))
        made, problem = broadcast_object((str(made) if made else None, problem), self.dist)
        if error is not None:
            raise error
        if problem:
            text, problems = problem
            if problems is not None:
                raise ConfigError(problems)
            raise PeerProcessError(f"rank 0 could not prepare the run folder: {text}")
        return Path(made)

    def prepare(self) -> Path:
        """The run folder, claimed (every process of a torchrun run agrees on it)."""
        from engine.distributed import init_from_env

        self.dist = init_from_env(self.cfg)
        self.run_dir = self._shared_run_dir()
        return self.run_dir

    def run(self) -> RunFinished:
        """Train to the end, to a stop request, or to a failure; KeyboardInterrupt is re-raised after the
        folder is released and the outcome reported."""
        fresh = self.resume is None
        try:
            folder = self.run_dir if self.run_dir is not None else self.prepare()
            from engine.runs import run_callbacks
            from engine.trainer import Trainer

            if self.is_main:
                for output in self.outputs:
                    output(LogMessage(f"Run folder: {self.run_dir}"))

            callbacks: list[Any] = run_callbacks(self.cfg, folder, self.labels) if self.is_main else []
            callbacks.append(
                EventEmitter(folder, self.outputs, world_size=self.dist.world_size if self.dist is not None else 1)
            )
            self.trainer = Trainer(
                self.cfg,
                [*callbacks, *self.callbacks],
                stop_event=self.stop_event,
                resume=self.resume,
                resume_source=self.checkpoint,
            )
            state = self.trainer.run()
            result = RunFinished(
                status=state.status,
                run_dir=str(self.run_dir),
                epoch=state.epoch,
                epochs=state.epochs,
                best_epoch=state.best_epoch,
                stopped_early=state.stopped_early,
                unreadable=list(state.unreadable),
            )
        except BaseException as exc:
            release_run_dir(self.run_dir)
            run_dir = self.run_dir
            if (
                self.is_main
                and (fresh or self._made_out)
                and run_dir is not None
                and run_dir.is_dir()
                and not any(run_dir.iterdir())
            ):
                run_dir.rmdir()  # failed before anything was written: leave no empty run folder behind
                run_dir = None
            done = 0
            if self.trainer is not None:
                st = self.trainer.state
                done = st.history[-1]["epoch"] if st.history else st.start_epoch  # the last finished epoch
            kind = error_kind(exc)
            result = RunFinished(
                status="failed",
                run_dir=str(run_dir) if run_dir else None,
                epoch=done,
                epochs=run_epochs(self.cfg),
                error=error_text(exc),
                error_type=type(exc).__name__,
                kind=kind,
                traceback=traceback.format_exc() if kind == "bug" else None,
                unreadable=list(self.trainer.state.unreadable) if self.trainer is not None else [],
            )
            # The traceback's finished frames hold the batch loop's locals (DDP's wrapper among them): cleared, so
            # that _finish can end the process group's threads on this path too.
            traceback.clear_frames(exc.__traceback__)
            self._finish(result)
            if not isinstance(exc, Exception):
                raise
            return result
        self._finish(result)
        return result

    def _finish(self, result: RunFinished) -> None:
        from engine.distributed import shutdown

        release_run_dir(self.run_dir)  # after every callback wrote its last line into the folder
        if self.trainer is not None:
            self.trainer.release()
        shutdown()
        for output in self.outputs:
            output(result)
