"""A multi-process run from the app: torchrun as a QProcess child, its output split by rank, rank 0's event lines
turned back into the signals an in-process run sends (app/training.py), Stop through SIGINT to the whole group."""

from __future__ import annotations

import collections
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, QProcess, QProcessEnvironment, QTimer, Signal, Slot

from engine.config import ConfigError, ProjectConfig
from engine.events import BatchProgress, EpochFinished, Event, LogMessage, RunFinished, RunStarted, decode, to_dict
from engine.run_lock import CLAIM_ENV, FolderBusyError, release_run_dir

# torchrun gives its workers 30 s after passing SIGINT on before it kills them; past this the app kills the tree.
STOP_GRACE_MS = 45_000
TAIL_LINES = 12  # lines of output quoted when the processes end without saying why
WATCH_MS = 1000  # how often the pids below torchrun are noted, to find any it leaves behind when it dies
# torchrun --tee starts every line of a worker with "[<role><local rank>]:" ("[default0]:"); its own lines have none.
RANK_PREFIX = re.compile(r"\[([^\]\d]*)(\d+)\]:")
ERROR_LINE = re.compile(r"error: (.*)")  # how the CLI reports a failure on stderr (engine/cli.py main)
# torchrun's note of a worker that ended badly: "... failed (exitcode: -9) local_rank: 1 (pid: 31091) of binary: ..."
WORKER_FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+)")

Launcher = Callable[[int, list[str]], list[str]]  # (processes, main.py arguments) -> the command line to run


def torchrun_launcher(processes: int, args: list[str]) -> list[str]:
    """torchrun with every line tee'd to its console, prefixed with its rank (engine.distributed.torchrun_command)."""
    from engine.distributed import torchrun_command

    return torchrun_command(processes, args, tee=True)


def run_processes(checkpoint: str | os.PathLike) -> int:
    """How many processes the run a checkpoint belongs to trained in (its run folder's project.json), 1 if unknown."""
    from engine.run_files import PROJECT_FILE

    parent = Path(checkpoint).resolve().parent
    run_dir = parent.parent if parent.name == "checkpoints" else parent
    try:
        data = json.loads((run_dir / PROJECT_FILE).read_text(encoding="utf-8"))
        return max(1, int(data.get("distributed", {}).get("processes", 1)))
    except (OSError, ValueError, TypeError, AttributeError):
        return 1


def start_time(pid: int) -> int | None:
    """When a process started (clock ticks since boot, Linux), to tell it from a later one with the same pid;
    None where it is gone or this is not known."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def descendants(pid: int) -> list[int]:
    """Every process below pid (its children, theirs, ...): torchrun's workers start their own sessions, and
    their DataLoader workers are below them, so neither pid's process group nor its session reaches them all."""
    parents: dict[int, int] = {}
    if os.path.isdir("/proc"):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", encoding="utf-8", errors="replace") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue  # it ended while we looked
    else:  # macOS and the other Unixes: ps lists the same
        out = subprocess.run(
            ["ps", "-A", "-o", "pid=", "-o", "ppid="], capture_output=True, text=True, check=False
        ).stdout
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                parents[int(parts[0])] = int(parts[1])
    children: dict[int, list[int]] = collections.defaultdict(list)
    for child, parent in parents.items():
        children[parent].append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


class ProcessRun(QObject):
    """One run in `processes` processes started through torchrun; the TrainingWorker's signals, plus each rank's
    output (rank_logged). Lives on the GUI thread: QProcess reports output through the event loop.

    Rank 0 prints the engine's event lines (engine/events.py) on its stdout; they become run_started,
    batch_finished, epoch_finished and the run's result. Rank 0's other lines and torchrun's own go to `logged`
    as well, so the app's log reads as for a run in the app's own process.
    """

    logged = Signal(str)
    rank_logged = Signal(int, str)  # (rank, line): every line a worker wrote, log messages of rank 0 included
    run_started = Signal(dict)
    batch_finished = Signal(dict)
    epoch_finished = Signal(dict)
    run_finished = Signal(dict)
    done = Signal()

    def __init__(
        self,
        cfg: ProjectConfig | None,
        processes: int,
        *,
        resume_from: str | None = None,
        epochs: int | None = None,
        init_from: str | None = None,
        launcher: Launcher | None = None,
        parent: QObject | None = None,
    ):
        super().__init__(parent)
        self.cfg, self.processes = cfg, processes
        self.resume_from, self.epochs, self.init_from = resume_from, epochs, init_from
        self.launcher = launcher or torchrun_launcher
        self.run_dir: Path | None = None
        self.global_step = 0  # from rank 0's latest batch event
        self.stop_requested = False
        self.killed = False
        self._fresh = resume_from is None
        self._process = QProcess(self)
        self._partial = {QProcess.ProcessChannel.StandardOutput: b"", QProcess.ProcessChannel.StandardError: b""}
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._errors: dict[int, str] = {}  # each rank's first "error: ..." line
        self._exit_codes: dict[int, int] = {}  # ranks torchrun saw fail, with their exit codes
        self._traceback: list[str] = []  # a traceback of torchrun's own, held until its last line says what it is
        self._result: dict[str, Any] | None = None  # rank 0's run_finished event
        self._progress = {"epoch": 0, "epochs": 0, "best_epoch": None}
        self._ended = False
        self._kill_timer = QTimer(self)
        self._kill_timer.setSingleShot(True)
        self._kill_timer.setInterval(STOP_GRACE_MS)
        self._kill_timer.timeout.connect(self._on_stop_overdue)
        self._known: dict[int, int | None] = {}  # pid -> start_time of every process seen below torchrun
        self._watch = QTimer(self)
        self._watch.setInterval(WATCH_MS)
        self._watch.timeout.connect(self._note_processes)
        self._process.readyReadStandardOutput.connect(self._on_stdout)
        self._process.readyReadStandardError.connect(self._on_stderr)
        self._process.started.connect(self._on_started)
        self._process.finished.connect(self._on_finished)
        self._process.errorOccurred.connect(self._on_error)

    # -- control -------------------------------------------------------------------------------
    def start(self) -> None:
        """Write the run folder's project and start torchrun; a failure to do so arrives as a failed run."""
        if sys.platform == "win32":
            self._fail_soon(
                "Training in several processes from the app needs Linux or macOS (Stop reaches the "
                "processes through Unix signals). Set Processes to 1, or run `python main.py train` "
                "under torchrun yourself."
            )
            return
        try:
            args = self._main_args()
        except (ConfigError, FolderBusyError, OSError) as exc:
            self._fail_soon(f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError) else str(exc))
            return
        command = self.launcher(self.processes, args)
        env = QProcessEnvironment.systemEnvironment()
        env.insert("PYTHONUNBUFFERED", "1")  # torchrun passes each line on as it comes, not a pipe's buffer later
        env.insert(CLAIM_ENV, str(os.getpid()))  # this process holds the run folder's claim for the run's rank 0
        env.remove("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE")  # keep the rank prefix this module reads
        self._process.setProcessEnvironment(env)
        params = QProcess.UnixProcessParameters()
        # Its own session: a Ctrl-C in the terminal that started the app does not reach torchrun behind Stop's back.
        params.flags = QProcess.UnixProcessFlag.CreateNewSession
        self._process.setUnixProcessParameters(params)
        self._process.setProgram(command[0])
        self._process.setArguments(command[1:])
        self.logged.emit(f"Starting {self.processes} training processes: {shlex.join(command)}")
        self._process.start()

    def _main_args(self) -> list[str]:
        """main.py's arguments; for a new run, its folder created here with the project snapshot it trains."""
        if self.resume_from is not None:
            from engine.runs import resume_run_dir

            self.run_dir = resume_run_dir(Path(self.resume_from), None, log=self.logged.emit)
            args = ["resume", str(self.resume_from), "--processes", str(self.processes)]
            if self.epochs is not None:
                args += ["--epochs", str(self.epochs)]
            return [*args, "--events"]
        from engine.config import save_project
        from engine.run_files import PROJECT_FILE
        from engine.runs import create_run_dir, project_as_run

        cfg = self.cfg
        assert cfg is not None, "a fresh run needs its project"
        if self.init_from:  # as an in-process run does it (TrainingWorker.run)
            cfg.model.weights, cfg.model.weights_file = None, str(Path(self.init_from).resolve())
        self.run_dir = create_run_dir(cfg, log=self.logged.emit)
        project = self.run_dir / PROJECT_FILE
        save_project(project_as_run(cfg), project)
        return ["train", str(project), "--out", str(self.run_dir), "--events"]

    def stop(self) -> None:
        """SIGINT to torchrun, which passes it to every worker: they stop together after the current batch.
        If they have not ended STOP_GRACE_MS later, the whole tree is killed. A second call does nothing."""
        if self.stop_requested or self._ended:
            return
        self.stop_requested = True
        self._note_processes()
        pid = self._process.processId()
        if pid:
            _signal(pid, signal.SIGINT)
        # else torchrun is still starting: _on_started sends the signal
        self._kill_timer.start()

    def is_running(self) -> bool:
        return not self._ended

    def wait_briefly(self, ms: int) -> None:
        """Block up to ms for the processes to end (their output and end are delivered meanwhile)."""
        if self._process.state() != QProcess.ProcessState.NotRunning:
            self._process.waitForFinished(ms)

    def pids(self) -> list[int]:
        """torchrun's pid and those of every process below it (empty once it ended)."""
        pid = self._process.processId()
        return [pid, *descendants(pid)] if pid else []

    def kill(self) -> None:
        """Kill torchrun and every process below it at once (SIGKILL: no batch is finished, no file written)."""
        pids = self.pids()
        if not pids:
            return
        self.killed = True
        for pid in reversed(pids):  # the deepest first, so none is left to be re-parented and missed
            _signal(pid, signal.SIGKILL)

    # -- output --------------------------------------------------------------------------------
    @Slot()
    def _note_processes(self) -> None:
        pid = self._process.processId()
        if pid:
            for child in descendants(pid):
                if child not in self._known:
                    self._known[child] = start_time(child)

    def _kill_leftovers(self) -> None:
        """Kill what torchrun left running when it ended without ending its workers (it was killed or crashed):
        they would go on training, writing the run folder, with nobody to stop them."""
        left = [pid for pid, started in self._known.items() if started is not None and start_time(pid) == started]
        for pid in left:
            _signal(pid, signal.SIGKILL)
        if left:
            self.logged.emit(f"torchrun ended but left {len(left)} of its processes running: killed them.")

    @Slot()
    def _on_started(self) -> None:
        self._watch.start()
        if self.stop_requested:
            _signal(self._process.processId(), signal.SIGINT)

    @Slot()
    def _on_stdout(self) -> None:
        self._read(QProcess.ProcessChannel.StandardOutput)

    @Slot()
    def _on_stderr(self) -> None:
        self._read(QProcess.ProcessChannel.StandardError)

    def _read(self, channel: QProcess.ProcessChannel) -> None:
        self._process.setReadChannel(channel)
        data = self._partial[channel] + bytes(self._process.readAll().data())
        *lines, self._partial[channel] = data.split(b"\n")
        for raw in lines:
            self._line(raw.decode("utf-8", errors="replace"), stdout=channel == QProcess.ProcessChannel.StandardOutput)

    def _line(self, line: str, *, stdout: bool) -> None:
        line = line.rstrip("\r")
        match = RANK_PREFIX.match(line)
        if match is None:  # torchrun's own output
            self._torchrun_line(line)
            return
        header, rank = match.group(0), int(match.group(2))
        # A line torchrun read before its end was written continues after a second header on the same line.
        text = line[match.end() :].replace(header, "").removeprefix(f"[rank {rank}] ")  # the CLI's own prefix
        if "\r" in text:  # a progress bar redrawn in place: its final state
            text = text.rsplit("\r", 1)[-1]
        event = decode(text) if stdout and rank == 0 else None
        if event is not None:
            self._on_event(event)
            return
        if not text.strip():
            return
        self._tail.append(f"rank {rank}: {text}")
        error = ERROR_LINE.match(text)
        if error and rank not in self._errors:
            self._errors[rank] = error.group(1)
        if rank == 0:
            self._log_rank_0(text)
        else:
            self.rank_logged.emit(rank, text)

    def _torchrun_line(self, line: str) -> None:
        if not line.strip():
            return
        failed = WORKER_FAILED.search(line)
        if failed:
            self._exit_codes.setdefault(int(failed.group(2)), int(failed.group(1)))
        if line.startswith("Traceback (most recent call last):") or self._traceback:
            self._traceback.append(line)
            if line[:1].isspace() or len(self._traceback) == 1:
                return
            # Its last line names the exception. The one torchrun raises when Stop's SIGINT reaches it is how
            # it ends a stopped run, not a fault: shown, it would bury the run's result under 30 lines.
            lines, self._traceback = self._traceback, []
            if self.stop_requested and "SignalException" in line:
                return
        else:
            lines = [line]
        for text in lines:
            self._tail.append(text)
            self.logged.emit(text)

    def _log_rank_0(self, line: str) -> None:
        """A line of rank 0's log: with --events its messages come only as events, so each is shown once."""
        self.rank_logged.emit(0, line)
        self.logged.emit(line)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, LogMessage):
            for line in event.message.splitlines():
                if line.strip():
                    self._log_rank_0(line)
        elif isinstance(event, RunStarted):
            self.global_step = event.global_step
            self._progress.update(epoch=event.start_epoch, epochs=event.epochs)
            self.run_started.emit(to_dict(event))
        elif isinstance(event, BatchProgress):
            self.global_step = event.global_step
            self.batch_finished.emit(to_dict(event))
        elif isinstance(event, EpochFinished):
            self._progress.update(
                epoch=int(event.metrics.get("epoch") or 0), epochs=event.epochs, best_epoch=event.best_epoch
            )
            self.epoch_finished.emit(to_dict(event))
        elif isinstance(event, RunFinished):
            self._result = to_dict(event)

    # -- the end -------------------------------------------------------------------------------
    @Slot()
    def _on_stop_overdue(self) -> None:
        if self._ended:
            return
        self.logged.emit(
            f"The training processes did not end within {STOP_GRACE_MS // 1000} s of Stop: killing "
            "them. The checkpoints written so far are kept."
        )
        self.kill()

    @Slot(QProcess.ProcessError)
    def _on_error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart:  # no finished signal follows
            self._end(
                {
                    "status": "failed",
                    "error": f"Could not start torchrun ({self._process.program()}): {self._process.errorString()}",
                }
            )

    @Slot(int, QProcess.ExitStatus)
    def _on_finished(self, code: int, status: QProcess.ExitStatus) -> None:
        for channel in (QProcess.ProcessChannel.StandardOutput, QProcess.ProcessChannel.StandardError):
            self._read(channel)
            rest, self._partial[channel] = self._partial[channel], b""
            if rest:
                self._line(
                    rest.decode("utf-8", errors="replace"), stdout=channel == QProcess.ProcessChannel.StandardOutput
                )
        for text in self._traceback:  # a traceback cut short
            self._tail.append(text)
            self.logged.emit(text)
        self._traceback = []
        self._kill_leftovers()
        crashed = status == QProcess.ExitStatus.CrashExit
        self._end(self._outcome(code, crashed))

    def _outcome(self, code: int, crashed: bool) -> dict[str, Any]:
        """The run's result: rank 0's own when it sent one, else what the exit and the output tell."""
        how = "was killed" if crashed else f"exited with code {code}"
        said = {**{r: _exit_text(c) for r, c in self._exit_codes.items()}, **self._errors}  # a word beats a code
        others = {r: m for r, m in sorted(said.items()) if r != 0}
        if self._result is not None:
            result = dict(self._result)
            if result.get("status") == "stopped" and not self.stop_requested and others:
                # torchrun ended rank 0 because another rank failed: that failure is the run's.
                result["status"] = "failed"
            if result.get("status") == "failed":
                own = str(result.get("error") or "the run failed")
                extra = [f"rank {r}: {m}" for r, m in others.items() if m not in own]
                # Rank 0 failing because a peer did (engine.failures.PeerProcessError) names the peer's failure
                # as the cause: that comes first.
                cause_first = result.get("error_type") == "PeerProcessError"
                result["error"] = "\n".join([*extra, own] if cause_first else [own, *extra])
            return result
        if self.stop_requested:
            return {"status": "stopped"}
        if said:
            error = "\n".join(f"rank {r}: {m}" for r, m in sorted(said.items()))
        else:
            error = (
                f"The training processes ended without finishing the run (torchrun {how}). "
                "Their last output:\n" + "\n".join(self._tail)
            )
        return {"status": "failed", "error": error}

    def _fail_soon(self, message: str) -> None:
        """Report a run that could not start, from the event loop (as a worker thread's failure arrives)."""
        QTimer.singleShot(0, lambda: self._end({"status": "failed", "error": message}))

    def _end(self, outcome: dict[str, Any]) -> None:
        if self._ended:
            return
        self._ended = True
        self._kill_timer.stop()
        self._watch.stop()
        result: dict[str, Any] = {
            "status": "failed",
            "run_dir": str(self.run_dir) if self.run_dir else None,
            **self._progress,
            "stopped_early": False,
            "error": None,
            "traceback": None,
            "error_type": None,
        }
        result.update(outcome)
        release_run_dir(self.run_dir)  # every process of the run has ended
        if result["status"] == "failed" and self._fresh and self.run_dir is not None and self._only_project_written():
            from engine.run_files import PROJECT_FILE

            (self.run_dir / PROJECT_FILE).unlink(missing_ok=True)  # the run never began: leave no empty folder
            self.run_dir.rmdir()
            result["run_dir"] = None
        elif result.get("run_dir") is None and self.run_dir is not None and self.run_dir.is_dir():
            result["run_dir"] = str(self.run_dir)  # rank 0 failed before it knew the folder; it holds files
        self.run_finished.emit(result)
        self.done.emit()

    def _only_project_written(self) -> bool:
        from engine.run_files import PROJECT_FILE

        try:
            return self.run_dir is not None and {p.name for p in self.run_dir.iterdir()} <= {PROJECT_FILE}
        except OSError:
            return False


def _exit_text(code: int) -> str:
    """A worker's end as torchrun reports it: a negative code is the signal that killed it."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the system's out-of-memory killer is a common cause)" if code == -signal.SIGKILL else ""
        return f"the process was killed by {name} without a message{hint}"
    return f"the process ended with exit code {code} without a message"


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # it ended already
