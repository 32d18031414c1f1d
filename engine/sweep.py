"""Hyperparameter sweeps on Optuna: a space of project fields, each trial an ordinary run folder of the project.

A space file maps dotted project fields to Optuna's distribution arguments::

    {"optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": true},
     "model.freeze_up_to": {"type": "categorical", "choices": ["layer2", "layer3"]},
     "loader.batch_size": {"type": "int", "low": 16, "high": 64, "step": 16}}

and is checked against the field declarations (engine/config.py) before any trial runs: unknown fields, a
range outside the field's own limits, an empty choice list and values the project would refuse are named.

The study lives in Optuna's relational storage: by default an SQLite file in the project's output folder
(OUTPUT_DIR/sweeps.db), or any SQLAlchemy URL (PostgreSQL, MySQL) that workers on several machines share.
Running the same command again continues the same study up to the same number of finished trials.

Kill-and-continue: every worker process holds a claim (engine.run_lock) on a lock file of its own while it
runs, and records that file on each trial it starts. A RUNNING trial whose worker's lock nobody holds was left
by a killed process: it is marked FAIL and Optuna's RetryHeartbeatStaleTrialCallback enqueues it again with the same
parameters. Workers on other machines are watched through Optuna's heartbeat instead (a trial whose heartbeat
is older than GRACE_PERIOD_S is failed and retried the same way). Asking for a trial, counting the trials and
failing dead ones happen under one lock file per study, so local workers never overshoot the number of trials.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import ConfigError, ProjectConfig, from_dict
from engine.events import Output
from engine.run_files import update_run_info
from engine.run_lock import Claim, claim, lock_holder
from engine.settings import bounds, choices, fields, range_text, unwrap

try:
    import fcntl
except ImportError:  # Windows: local workers are coordinated through the heartbeat alone
    fcntl = None  # type: ignore[assignment]  # the module is absent here; _study_lock checks for None

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
OBJECTIVES = {"val_accuracy": "maximize", "val_loss": "minimize"}
STORAGE_FILE = "sweeps.db"
HEARTBEAT_INTERVAL_S = 30  # how often a running trial tells the storage it is alive (for workers elsewhere)
GRACE_PERIOD_S = 120  # a trial silent this long is taken for dead by workers on other machines
MAX_RETRIES = 3  # how often one interrupted trial is run again


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError(
            ["sweeps need the optuna package: pip install optuna (it is in Model Workbench's dependencies)"]
        ) from None
    # The heartbeat and RetryHeartbeatStaleTrialCallback are marked experimental, and Optuna expects heartbeats only under
    # Study.optimize; this module records them itself around each trial (see _Heartbeat), so neither warning applies.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    return optuna


# ---------------------------------------------------------------------------------------------
# The space


@dataclass(frozen=True)
class Param:
    """One searched field: its dotted path and Optuna distribution arguments."""

    path: str
    kind: str  # "float" | "int" | "categorical"
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def distribution(self) -> Any:
        dist = _optuna().distributions
        if self.kind == "float":
            return dist.FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return dist.IntDistribution(int(self.low or 0), int(self.high or 0), log=self.log, step=int(self.step or 1))
        return dist.CategoricalDistribution(list(self.choices))

    def grid(self) -> list[Any]:
        """The values a grid search takes: the choices, or the range walked by its step."""
        if self.kind == "categorical":
            return list(self.choices)
        assert self.low is not None and self.high is not None and self.step is not None  # parse_space checked
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        values = [self.low + i * self.step for i in range(count)]
        return [int(v) for v in values] if self.kind == "int" else values

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "categorical":
            return {"type": "categorical", "choices": list(self.choices)}
        out: dict[str, Any] = {"type": self.kind, "low": self.low, "high": self.high}
        if self.step is not None:
            out["step"] = self.step
        if self.log:
            out["log"] = True
        return out


_KEYS = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"}}
_KEYS["categorical"] = {"type", "choices"}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _within(limits: dict[str, float], value: float) -> bool:
    return (
        ("ge" not in limits or value >= limits["ge"])
        and ("gt" not in limits or value > limits["gt"])
        and ("le" not in limits or value <= limits["le"])
        and ("lt" not in limits or value < limits["lt"])
    )


def _near(path: str, declared: Sequence[str]) -> str:
    import difflib

    leaf = path.rsplit(".", 1)[-1]
    near = difflib.get_close_matches(path, declared, 3, 0.5) or [p for p in declared if p.endswith("." + leaf)][:3]
    return f" (did you mean {', '.join(near)}?)" if near else " (the README's project-file table lists them)"


class SpaceError(ConfigError):
    """A space file's problems, each naming its field and what is wrong; nothing was run."""

    def __init__(self, problems: Sequence[str], source: str = ""):
        super().__init__(problems, source or None)
        head = f"invalid sweep space in {source}" if source else "invalid sweep space"
        if len(self.problems) == 1:
            self.args = (f"{head}: {self.problems[0]}",)
        else:
            self.args = (f"{head} ({len(self.problems)} problems):\n" + "\n".join(f"  - {p}" for p in self.problems),)


def parse_space(data: Any, source: str = "") -> list[Param]:
    """The space's params, or SpaceError naming every field that is wrong and why (nothing is run)."""
    if not isinstance(data, dict):
        raise SpaceError([f"expected a JSON object of field -> distribution, not {type(data).__name__}"], source)
    if not data:
        raise SpaceError(["it is empty: name at least one project field to search, such as optimizer.lr"], source)
    declared = dict(fields(ProjectConfig))
    problems: list[str] = []
    params: list[Param] = []
    for path, spec in data.items():
        info = declared.get(path)
        if info is None:
            problems.append(f"{path}: not a project field{_near(path, list(declared))}")
            continue
        if not isinstance(spec, dict):
            problems.append(f'{path}: expected an object such as {{"type": "float", "low": ..., "high": ...}}')
            continue
        kind = spec.get("type")
        if kind not in _KEYS:
            problems.append(f"{path}: type = {kind!r}: must be one of float, int, categorical")
            continue
        extra = sorted(set(spec) - _KEYS[kind])
        if extra:
            problems.append(
                f"{path}: unknown key(s) {', '.join(extra)} for type {kind} (allowed: {', '.join(sorted(_KEYS[kind]))})"
            )
            continue
        base, metadata, _ = unwrap(info.annotation)
        if kind == "categorical":
            values = spec.get("choices")
            if not isinstance(values, list) or not values:
                problems.append(f"{path}: choices must be a non-empty list of values")
                continue
            allowed = choices(info)
            wrong = [v for v in values if allowed and v not in allowed]
            if wrong:
                problems.append(
                    f"{path}: choice(s) {', '.join(json.dumps(v) for v in wrong)} not allowed "
                    f"(allowed: {', '.join(json.dumps(v) for v in allowed)})"
                )
                continue
            if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
                problems.append(f"{path}: choices repeat a value")
                continue
            params.append(Param(path, "categorical", choices=tuple(values)))
            continue
        if base not in (int, float) or base is bool:
            problems.append(f"{path}: a {kind} range needs a numeric field; use a categorical list of values")
            continue
        if kind == "float" and base is int:
            problems.append(f'{path}: an integer field; use "type": "int"')
            continue
        low: Any = spec.get("low")  # JSON values, checked one by one below
        high: Any = spec.get("high")
        step: Any = spec.get("step")
        log: Any = spec.get("log", False)
        if not _is_number(low) or not _is_number(high):
            problems.append(f"{path}: low and high must be finite numbers (got low = {low!r}, high = {high!r})")
            continue
        if kind == "int" and (low != int(low) or high != int(high) or (step is not None and step != int(step))):
            problems.append(f"{path}: an int range needs whole numbers for low, high and step")
            continue
        if low > high:
            problems.append(f"{path}: low = {low:g} is above high = {high:g}")
            continue
        if not isinstance(log, bool):
            problems.append(f"{path}: log must be true or false")
            continue
        if step is not None and (not _is_number(step) or step <= 0):
            problems.append(f"{path}: step = {step!r}: must be a positive number")
            continue
        if log and step is not None:
            problems.append(f"{path}: log and step cannot be used together (Optuna samples a log range continuously)")
            continue
        if log and low <= 0:
            problems.append(f"{path}: a log range needs low > 0 (got {low:g})")
            continue
        limits = bounds(metadata + list(info.metadata))
        outside = [
            f"{name} = {value:g}" for name, value in (("low", low), ("high", high)) if not _within(limits, value)
        ]
        if outside:
            problems.append(f"{path}: {' and '.join(outside)} outside the field's limits ({range_text(limits)})")
            continue
        params.append(Param(path, kind, low=low, high=high, step=step, log=log))
    if problems:
        raise SpaceError(problems, source)
    return params


def load_space(path: str | os.PathLike) -> list[Param]:
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpaceError([f"cannot be read: {exc.strerror or exc}"], f"space file {str(p)!r}") from None
    except ValueError as exc:
        raise SpaceError([f"not valid JSON: {exc}"], f"space file {str(p)!r}") from None
    return parse_space(data, source=f"space file {str(p)!r}")


def _set_path(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    obj = data
    for part in parents:
        obj = obj.setdefault(part, {})
    obj[leaf] = value


def project_with(cfg: ProjectConfig, values: dict[str, Any], run_name: str | None = None) -> ProjectConfig:
    """The project with these fields set (validated as any project; ConfigError names what is refused)."""
    data = cfg.to_dict()
    for path, value in values.items():
        _set_path(data, path, value)
    if run_name is not None:
        data["output"]["run_name"] = run_name
    return from_dict(data, base_dir=cfg.base_dir, check_paths=False)


def unused_params(cfg: ProjectConfig, params: Sequence[Param]) -> list[str]:
    """The space's fields this project would not use, each with why: its `applies` rule holds neither for the
    project nor in any of its phases (unless the field that rule names is searched too), or every phase of
    train.phases that uses it sets it itself. Trials would differ only in name there, so such a sweep is refused."""
    from engine.phases import plan_phases
    from engine.settings import fields, get_path, meta

    infos = dict(fields(ProjectConfig))
    searched = {p.path for p in params}
    problems: list[str] = []
    for param in params:
        info = infos.get(param.path)
        rule = meta(info).applies if info is not None else None
        if rule is not None and rule.path not in searched:
            using = [rule.holds(cfg)] if not cfg.train.phases else [rule.holds(ph.cfg) for ph in plan_phases(cfg)]
            if not any(using):
                where = ", in no phase of train.phases" if cfg.train.phases else ""
                problems.append(f"{param.path}: this project does not use it (used only with {rule.describe()}{where})")
                continue
        else:
            using = [True] * max(1, len(cfg.train.phases))
        tried = list(param.choices) if param.kind == "categorical" else [param.low, param.high]
        if not cfg.train.phases or len({json.dumps(v) for v in tried}) < 2:
            continue
        try:
            seen = [
                [
                    get_path(ph.cfg, param.path)
                    for ph, used in zip(plan_phases(project_with(cfg, {param.path: v})), using, strict=True)
                    if used
                ]
                for v in tried
            ]
        except ConfigError:
            continue  # a value the project refuses: check_space names it
        if all(values == seen[0] for values in seen[1:]):
            problems.append(
                f"{param.path}: every phase of train.phases that uses it sets it, so the trials would not differ by "
                "it (sweep a project without phases, or change the phases)"
            )
    return problems


def check_space(cfg: ProjectConfig, params: Sequence[Param]) -> None:
    """Refuse, by field and value, the space's values the project itself would refuse (a choice that another
    setting rules out, a range end beyond a rule that joins several fields), and the fields it would not use
    (unused_params). Each end and choice is tried with the project's other values."""
    problems: list[str] = unused_params(cfg, params)
    unused = {problem.split(":")[0] for problem in problems}
    for param in params:
        if param.path in unused:
            continue
        tried = param.choices if param.kind == "categorical" else (param.low, param.high)
        for value in tried:
            if param.kind == "int" and value is not None:
                value = int(value)
            try:
                project_with(cfg, {param.path: value})
            except ConfigError as exc:
                own = [str(p) for p in exc.problems if p.path == param.path or str(p).startswith(param.path)]
                if own:
                    problems.append(f"{param.path} = {json.dumps(value)}: the project refuses it: {own[0]}")
                    break
    if problems:
        raise SpaceError(problems)


# ---------------------------------------------------------------------------------------------
# Storage and study


def default_storage(cfg: ProjectConfig) -> str:
    out = cfg.resolve(cfg.output.dir)
    if out is None:
        raise ConfigError(["output.dir is empty: give a folder for run folders and the sweep's database"])
    return f"sqlite:///{out / STORAGE_FILE}"


def shown_url(url: str) -> str:
    """The storage URL with its password hidden (messages and run.json)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot parse is refused later with its own message
        return url


def open_storage(url: str) -> Any:
    """Optuna's relational storage with heartbeats (dead trials elsewhere are failed and retried).

    SQLite: transactions begin IMMEDIATE and wait up to 5 minutes for the file's write lock, so several worker
    processes on one file queue instead of failing with "database is locked".
    """
    _optuna()
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    sqlite = url.startswith("sqlite")
    if sqlite:
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"connect_args": {"timeout": 300}} if sqlite else {"pool_pre_ping": True}
    try:
        storage = RDBStorage(
            url,
            engine_kwargs=kwargs,
            heartbeat_interval=HEARTBEAT_INTERVAL_S,
            grace_period=GRACE_PERIOD_S,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
        )
    except ImportError as exc:
        raise ConfigError(
            [f"--storage {shown_url(url)}: its database driver is not installed ({exc}); see the README's sweeps"]
        ) from None
    except Exception as exc:  # noqa: BLE001 - a bad URL or an unreachable server: say which
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError([f"--storage {shown_url(url)}: cannot open the study storage: {first}"]) from None
    if sqlite:
        _begin_immediate(storage.engine)
    return storage


def _begin_immediate(engine: Any) -> None:
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver's own deferred BEGIN is replaced below

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners existed


def grid_problems(params: Sequence[Param]) -> list[str]:
    """What keeps these params from making a grid (a float range without a step), by field."""
    return [
        f"{p.path}: a grid needs choices or a step for a float range"
        for p in params
        if p.kind == "float" and p.step is None
    ]


def make_sampler(name: str, params: Sequence[Param], seed: int, trials: int) -> Any:
    optuna = _optuna()
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        problems = grid_problems(params)
        if problems:
            raise ConfigError(problems)
        return optuna.samplers.GridSampler({p.path: p.grid() for p in params}, seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, trials // 3)))
    raise ConfigError([f"--sampler {name!r}: one of {', '.join(SAMPLERS)}"])


def make_pruner(name: str, epochs: int) -> Any:
    optuna = _optuna()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1), reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError([f"--pruner {name!r}: one of {', '.join(PRUNERS)}"])


def grid_size(params: Sequence[Param]) -> int:
    return math.prod(len(p.grid()) for p in params)


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class TrialOutcome:
    """One finished trial as the worker saw it (printed, and given to on_trial)."""

    number: int
    params: dict[str, Any]
    state: str  # "complete" | "pruned" | "failed" | "stopped"
    value: float | None
    run_dir: str | None
    epochs: int
    seconds: float
    error: str | None = None


@dataclass
class SweepSpec:
    """What to search and how: a project, its space, the number of finished trials to reach, and the engine."""

    cfg: ProjectConfig
    params: list[Param]
    trials: int
    storage: str | None = None
    study: str | None = None
    sampler: str = "tpe"
    pruner: str = "median"
    objective: str = "val_accuracy"
    worker_index: int = 0
    labels: dict[str, Any] = field(default_factory=dict)

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective]

    @property
    def study_name(self) -> str:
        return self.study or f"{self.cfg.name}-sweep"

    @property
    def storage_url(self) -> str:
        return self.storage or default_storage(self.cfg)

    def check(self) -> None:
        """Everything that can be refused before a trial runs."""
        problems = []
        if self.trials < 1:
            problems.append(f"--trials = {self.trials}: must be at least 1")
        if self.objective not in OBJECTIVES:
            problems.append(f"--objective {self.objective!r}: one of {', '.join(OBJECTIVES)}")
        if self.sampler not in SAMPLERS:
            problems.append(f"--sampler {self.sampler!r}: one of {', '.join(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            problems.append(f"--pruner {self.pruner!r}: one of {', '.join(PRUNERS)}")
        if not self.cfg.data.val_path and self.cfg.data.val_fraction <= 0:
            problems.append(
                "data.val_fraction = 0 and no data.val_path: a sweep scores each trial on validation data; "
                "hold out a share such as 0.2"
            )
        if self.objective == "val_accuracy" and self.cfg.data.task == "regression":
            problems.append("--objective val_accuracy: a regression project has no accuracy; use val_loss")
        if self.cfg.distributed.processes > 1:
            problems.append("distributed.processes > 1: a sweep runs each trial in one process; use --workers")
        if problems:
            raise ConfigError(problems)
        check_space(self.cfg, self.params)


class _Pruning:
    """Trainer callback: each epoch's objective goes to the trial; when the pruner says so, the run stops after
    that epoch (its folder keeps every finished epoch, like any stopped run)."""

    def __init__(self, trial: Any, objective: str, stop: threading.Event):
        self.trial, self.objective, self.stop = trial, objective, stop
        self.pruned_at: int | None = None
        self.values: list[float] = []

    def on_epoch_finished(self, trainer: Any, state: Any, metrics: dict[str, Any]) -> None:
        value = metrics.get(self.objective)
        if value is None or not math.isfinite(value):
            return
        self.values.append(float(value))
        self.trial.report(float(value), state.epoch)
        if state.epoch < state.epochs and self.trial.should_prune():
            self.pruned_at = state.epoch
            self.stop.set()

    # The trainer's other hooks (engine.trainer.Callback's, which this module does not import: it would bring torch
    # to the app's Sweep dialog, which only reads spaces and studies).
    def on_log(self, trainer: Any, message: str) -> None: ...
    def on_run_started(self, trainer: Any, state: Any) -> None: ...
    def on_batch_finished(self, trainer: Any, state: Any, loss: float) -> None: ...
    def on_run_finished(self, trainer: Any, state: Any) -> None: ...


class _Heartbeat:
    """Records a running trial's heartbeat every HEARTBEAT_INTERVAL_S (what workers on other machines check)."""

    def __init__(self, storage: Any, trial_id: int):
        self._storage, self._trial_id = storage, trial_id
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="sweep-heartbeat", daemon=True)

    def _beat(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a missed beat is retried; the trial goes on
                self._storage.record_heartbeat(self._trial_id)
            if self._done.wait(HEARTBEAT_INTERVAL_S):
                return

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


class Sweep:
    """One worker of a study: asks trials, runs each as a run folder, tells their outcome, until the study holds
    spec.trials finished (complete or pruned) trials, stop() is called, or trials keep failing."""

    def __init__(
        self,
        spec: SweepSpec,
        *,
        log: Callable[[str], None] | None = None,
        outputs: Callable[[int], Sequence[Output]] | None = None,
        on_trial: Callable[[TrialOutcome], None] | None = None,
    ):
        """outputs: the outputs of trial N's run events (see engine.events); on_trial: called as each ends."""
        self.spec = spec
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.outputs = outputs or (lambda number: ())
        self.on_trial = on_trial
        self.stop_event = threading.Event()
        self._trial_stop: threading.Event | None = None
        self.outcomes: list[TrialOutcome] = []
        out = spec.cfg.resolve(spec.cfg.output.dir)
        assert out is not None  # SweepSpec.check and default_storage refuse an empty output.dir
        self.out_dir = out
        self.work_dir = out / ".sweeps" / _slug(spec.study_name)
        self.storage: Any = None
        self.study: Any = None
        self._claim: Claim | None = None
        self._identity: dict[str, Any] = {}

    def stop(self) -> None:
        """End after the running trial stops (within a batch); the study keeps it as failed, to be run again."""
        self.stop_event.set()
        if self._trial_stop is not None:
            self._trial_stop.set()

    # -- the study

    def open(self) -> Any:
        """Create or join the study; refuses a study that was started with another space or objective."""
        optuna = _optuna()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        spec = self.spec
        self.storage = open_storage(spec.storage_url)
        space = {p.path: p.to_dict() for p in spec.params}
        with self._study_lock():
            study = optuna.create_study(
                storage=self.storage,
                study_name=spec.study_name,
                direction=spec.direction,
                load_if_exists=True,
            )
            attrs = study.user_attrs
            if not attrs:
                study.set_user_attr("space", space)
                study.set_user_attr("objective", spec.objective)
                study.set_user_attr("project", spec.cfg.name)
            elif attrs.get("space") != space or attrs.get("objective") != spec.objective:
                raise ConfigError(
                    [
                        f"study {spec.study_name!r} in {shown_url(spec.storage_url)} was started with another "
                        f"space or objective ({attrs.get('objective')}, {json.dumps(attrs.get('space'))}); "
                        "give --study a new name, or the same space file and --objective to continue it"
                    ]
                )
            done = len(study.get_trials(deepcopy=False))
        seed = spec.cfg.train.seed * 1_000_003 + done + 7919 * spec.worker_index
        sampler = make_sampler(spec.sampler, spec.params, seed, spec.trials)
        pruner = make_pruner(spec.pruner, spec.cfg.train.epochs)
        self.study = optuna.load_study(study_name=spec.study_name, storage=self.storage, sampler=sampler, pruner=pruner)
        return self.study

    @contextlib.contextmanager
    def _study_lock(self) -> Iterator[None]:
        """The study's local lock: counting, failing dead trials and asking are one step for local workers."""
        if fcntl is None:
            yield
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.work_dir / "study.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # drops the lock

    def _fail_dead_trials(self) -> None:
        """RUNNING trials whose worker died: failed, and run again (same parameters) through Optuna's retry."""
        optuna = _optuna()
        from optuna.storages import RetryHeartbeatStaleTrialCallback
        from optuna.trial import TrialState

        optuna.storages.fail_stale_trials(self.study)  # workers elsewhere, by their heartbeat
        retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)
        host = socket.gethostname()
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = trial.user_attrs.get("worker")
            if not isinstance(worker, dict) or worker.get("host") != host:
                continue  # another machine's: its heartbeat tells
            lock = Path(str(worker.get("lock", "")))
            if lock.exists() and lock_holder(lock) is not None:
                continue  # its worker lives
            trial_id = trial._trial_id  # Optuna's storage API is keyed by the id, which FrozenTrial keeps private
            try:
                self.storage.set_trial_user_attr(trial_id, "failure", "killed")
                if not self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            run_dir = trial.user_attrs.get("run_dir")
            self.log(
                f"trial {trial.number}: its worker (process {worker.get('pid')}) is gone; marked failed and run again"
                + (f" ({run_dir} keeps what it wrote)" if run_dir else "")
            )
            if run_dir and Path(run_dir).is_dir():
                with contextlib.suppress(OSError):
                    update_run_info(run_dir, sweep={"state": "failed"})
            retry(self.study, self.storage.get_trial(trial_id))

    def counts(self) -> dict[str, int]:
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        out = {s.name.lower(): 0 for s in TrialState}
        for t in trials:
            out[t.state.name.lower()] += 1
        return out

    def _errors(self) -> int:
        from optuna.trial import TrialState

        return sum(
            1
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if t.user_attrs.get("failure") == "error"
        )

    def _next_trial(self) -> Any | None:
        """A new trial, or None when the study has (or is running) spec.trials finished trials."""
        spec = self.spec
        target = spec.trials
        if spec.sampler == "grid":
            target = min(target, grid_size(spec.params))
        with self._study_lock():
            self._fail_dead_trials()
            n = self.counts()
            if n["complete"] + n["pruned"] + n["running"] >= target:
                return None
            if self._errors() >= max(target, 3):
                raise ConfigError(
                    [
                        f"study {spec.study_name!r}: {self._errors()} trials failed with an error; the sweep stops "
                        "(each trial's error is in the runs table: main.py runs)"
                    ]
                )
            distributions = {p.path: p.distribution() for p in spec.params}
            trial = self.study.ask(fixed_distributions=distributions)
            trial.set_user_attr("worker", self._identity)
            # A retry starts with its predecessor's attributes (Optuna copies them): this run's are its own.
            for stale in ("run_dir", "failure", "error"):
                trial.set_user_attr(stale, None)
        return trial

    # -- the worker

    def run(self) -> list[TrialOutcome]:
        if self.study is None:
            self.open()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        lock = self.work_dir / f"worker-{_slug(socket.gethostname())}-{os.getpid()}-{time.time_ns()}.lock"
        self._claim = claim(lock, f"sweep worker lock {str(lock)!r}", log=self.log)
        self._identity = {"host": socket.gethostname(), "pid": os.getpid(), "lock": str(lock)}
        try:
            while not self.stop_event.is_set():
                trial = self._next_trial()
                if trial is None:
                    break
                outcome = self._run_trial(trial)
                self.outcomes.append(outcome)
                if self.on_trial is not None:
                    self.on_trial(outcome)
        finally:
            self._claim.release()
            self._claim = None
        return self.outcomes

    def _run_trial(self, trial: Any) -> TrialOutcome:
        from optuna.storages import RetryHeartbeatStaleTrialCallback
        from optuna.trial import TrialState

        from engine.session import RunSession

        spec = self.spec
        params = {p.path: trial.params[p.path] for p in spec.params}
        shown = "  ".join(f"{k}={_short(v)}" for k, v in params.items())
        started = time.monotonic()
        trial_id = trial._trial_id  # Optuna's storage API is keyed by the id, which Trial keeps private
        retry_of = RetryHeartbeatStaleTrialCallback.retried_trial_number(self.storage.get_trial(trial_id))
        again = f" (again: trial {retry_of} was interrupted)" if retry_of is not None else ""
        self.log(f"trial {trial.number}: {shown}{again}")

        def finish(
            state: str, value: float | None, run_dir: str | None, epochs: int, error: str | None
        ) -> TrialOutcome:
            outcome = TrialOutcome(
                trial.number, params, state, value, run_dir, epochs, time.monotonic() - started, error
            )
            if run_dir and Path(run_dir).is_dir():
                with contextlib.suppress(OSError):
                    update_run_info(run_dir, sweep={"state": state, "value": value})
            self.log(_describe(outcome, spec.objective))
            return outcome

        try:
            cfg = project_with(spec.cfg, params, run_name=f"{spec.study_name}-trial-{trial.number:03d}")
        except ConfigError as exc:
            trial.set_user_attr("failure", "error")
            trial.set_user_attr("error", str(exc))
            self.study.tell(trial, state=TrialState.FAIL)
            return finish("failed", None, None, 0, str(exc))
        stop = threading.Event()
        self._trial_stop = stop
        if self.stop_event.is_set():
            stop.set()
        pruning = _Pruning(trial, spec.objective, stop)
        labels = {
            "sweep": {
                "study": spec.study_name,
                "trial": trial.number,
                "storage": shown_url(spec.storage_url),
                "params": params,
                "objective": spec.objective,
                "state": "running",
                **spec.labels,
            }
        }
        session = RunSession(
            cfg, outputs=self.outputs(trial.number), callbacks=[pruning], stop_event=stop, labels=labels, log=self.log
        )
        with _Heartbeat(self.storage, trial_id):
            try:
                run_dir = session.prepare()
            except Exception as exc:  # noqa: BLE001 - the folder could not be claimed: this trial fails, said why
                trial.set_user_attr("failure", "error")
                self.study.tell(trial, state=TrialState.FAIL)
                return finish("failed", None, None, 0, str(exc))
            trial.set_user_attr("run_dir", str(run_dir))
            result = session.run()
        self._trial_stop = None
        best = _best(pruning.values, spec.direction)
        if result.status == "failed":
            trial.set_user_attr("failure", "error")
            trial.set_user_attr("error", result.error)
            self.study.tell(trial, state=TrialState.FAIL)
            return finish("failed", None, result.run_dir, result.epoch, result.error)
        if pruning.pruned_at is not None:
            self.study.tell(trial, state=TrialState.PRUNED)
            return finish("pruned", best, result.run_dir, result.epoch, None)
        if result.status == "stopped":
            # Stopped by the user: failed for Optuna and run again when the sweep continues.
            trial.set_user_attr("failure", "stopped")
            self.study.tell(trial, state=TrialState.FAIL)
            RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)(self.study, self.storage.get_trial(trial_id))
            return finish("stopped", best, result.run_dir, result.epoch, None)
        if best is None:
            error = f"no {spec.objective} was recorded (is there validation data?)"
            trial.set_user_attr("failure", "error")
            self.study.tell(trial, state=TrialState.FAIL)
            return finish("failed", None, result.run_dir, result.epoch, error)
        self.study.tell(trial, best)
        return finish("complete", best, result.run_dir, result.epoch, None)


def _best(values: Sequence[float], direction: str) -> float | None:
    if not values:
        return None
    return max(values) if direction == "maximize" else min(values)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value)


def _slug(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "study"


def _describe(outcome: TrialOutcome, objective: str) -> str:
    value = f"{objective} {outcome.value:.4f}" if outcome.value is not None else ""
    how = {
        "complete": f"finished: {value}",
        "pruned": f"pruned after epoch {outcome.epochs} ({value})",
        "stopped": f"stopped after epoch {outcome.epochs}; it runs again when the sweep continues",
        "failed": f"failed: {outcome.error}",
    }[outcome.state]
    where = f" [{outcome.run_dir}]" if outcome.run_dir else ""
    return f"trial {outcome.number} {how} in {outcome.seconds:.1f}s{where}"


def summary(study: Any) -> dict[str, Any]:
    """The study's trials by state and its best trial (number, value, params, run folder), as plain values."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    states = {s.name.lower(): sum(1 for t in trials if t.state == s) for s in TrialState}
    best = None
    if states["complete"]:
        b = study.best_trial
        best = {"number": b.number, "value": b.value, "params": b.params, "run_dir": b.user_attrs.get("run_dir")}
    return {"study": study.study_name, "trials": states, "best": best}


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """Every trial of a study: number, state, value, params, run folder (the Sweep dialog's plot reads these)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        last = max(t.intermediate_values.items())[1] if t.intermediate_values else None
        rows.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "value": t.value if t.value is not None else last,
                "params": dict(t.params),
                "run_dir": t.user_attrs.get("run_dir"),
            }
        )
    return rows


def load_study(spec: SweepSpec) -> Any:
    """The spec's study as stored (to read its trials), without a sampler of its own."""
    optuna = _optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=spec.study_name, storage=open_storage(spec.storage_url))
