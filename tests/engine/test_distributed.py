"""Multi-process training with torchrun and DistributedDataParallel, on the CPU with gloo: real processes.

The runs use the repository's main.py through torchrun (or through `main.py train` with
distributed.processes = 2, which starts torchrun itself). tests/engine/ddp_hook/sitecustomize.py is put on
the training processes' PYTHONPATH where a test needs each rank's final weights or a rank that fails.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_image_folder, write_project

from engine.checkpoints import load_checkpoint
from engine.config import SamplerConfig
from engine.distributed import torchrun_command
from engine.events import BatchProgress, EpochFinished, LogMessage, RunFinished, RunStarted, decode
from engine.samplers import SamplerError, ShardedSampler, build_sampler

ROOT = Path(__file__).resolve().parents[2]
HOOK = Path(__file__).resolve().parent / "ddp_hook"

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this PyTorch has no torch.distributed")


def _env(**extra) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MWB_TEST_REPO": str(ROOT), **extra})
    return env


def _run(cmd: list[str], cwd: Path, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=_env(**env), timeout=timeout)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Sharded samplers: every process draws the same global order and takes its stride of it


@pytest.mark.parametrize(
    "name, extra",
    [
        ("sequential", {}),
        ("random", {}),
        ("distributed", {}),
        ("subset_random", {"indices": list(range(0, 100, 3))}),
        ("random", {"replacement": True, "num_samples": 50}),
    ],
)
def test_the_shares_of_a_global_draw_are_disjoint_equal_and_cover_it(name, extra):
    spec = SamplerConfig(name=name, **extra)
    g = torch.Generator()
    g.manual_seed(3)
    shares = [build_sampler(spec, 100, None, generator=g, world=(3, r)) for r in range(3)]
    whole = [build_sampler(spec, 100, None, generator=g, world=(1, 0)) for _ in range(1)][0]
    for s in [*shares, whole]:
        s.set_epoch(4)
    drawn = [list(s) for s in shares]
    assert len({len(d) for d in drawn}) == 1 and all(len(d) == len(s) for d, s in zip(drawn, shares, strict=True))
    everything = list(whole)
    # the shares interleave the single draw (padded by repeating its start to a multiple of 3)
    padded = everything + everything[: (-len(everything)) % 3]
    assert [padded[r::3] for r in range(3)] == drawn
    if not spec.replacement:
        assert len(set(everything)) == len(everything)


def test_the_draw_changes_with_the_epoch_and_not_with_the_process():
    spec = SamplerConfig(name="random")
    a = build_sampler(spec, 40, None, world=(2, 0))
    b = build_sampler(spec, 40, None, world=(2, 1))
    a.set_epoch(1)
    b.set_epoch(1)
    first = list(a) + list(b)
    a.set_epoch(2)
    assert list(a) != first[:20]
    assert sorted(first) == list(range(40))


def test_balanced_weighting_holds_across_processes():
    """The weighted sampler is drawn globally, so two processes together see every class about equally."""
    targets = [0] * 180 + [1] * 20
    spec = SamplerConfig(name="weighted_random", weights="balanced")
    counts = collections.Counter()
    for rank in range(2):
        s = build_sampler(spec, 200, targets, world=(2, rank))
        s.set_epoch(0)
        assert len(s) == 100
        counts.update(targets[i] for i in s)
    assert sum(counts.values()) == 200
    assert 70 <= counts[1] <= 130  # 20 of 200 samples, drawn about half the time


def test_weights_of_the_wrong_length_are_refused_under_torchrun_too():
    spec = SamplerConfig(name="weighted_random", weights=[1.0, 2.0])
    with pytest.raises(SamplerError, match="has 2 values but the training set has 10"):
        build_sampler(spec, 10, None, world=(2, 0))


def test_a_fixed_rank_that_contradicts_torchrun_is_refused():
    with pytest.raises(SamplerError, match=r"loader.sampler.num_replicas = 4, but torchrun"):
        build_sampler(SamplerConfig(name="distributed", num_replicas=4), 10, None, world=(2, 0))


def test_evaluation_shares_cover_each_sample_once():
    shares = [ShardedSampler(lambda g, n: range(n), 7, num_replicas=2, rank=r, pad=False) for r in range(2)]
    assert sorted([*shares[0], *shares[1]]) == list(range(7)) and len(shares[0]) == 4 and len(shares[1]) == 3


def test_the_torchrun_command_runs_main_py():
    cmd = torchrun_command(2, ["train", "p.json"], tee=True)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=2" in cmd and "--tee=3" in cmd
    assert cmd[-3:] == [str(ROOT / "main.py"), "train", "p.json"]


# ---------------------------------------------------------------------------------------------
# Real runs


@pytest.fixture()
def data(tmp_path) -> Path:
    return write_image_folder(tmp_path / "images", per_class=16)  # 36 training, 12 validation images


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, data):
    """2 x 6 images per step against 1 x 12, same seed and order: the same losses and weights (BatchNorm
    frozen, which is per-process otherwise; the frozen backbone's features cached, so DDP wraps the rest). Also: `main.py train` starts torchrun itself for processes = 2,
    only rank 0 writes, and the checkpoint has no DDP prefixes and resumes in one process."""
    common = dict(
        model={"backbone": "resnet18", "freeze": "head_only"},
        train={"epochs": 2, "device": "cpu", "seed": 0, "feature_cache": "auto"},
    )
    two = write_project(
        tmp_path / "two.json",
        "images",
        model=common["model"],
        train=common["train"],
        loader={"batch_size": 6, "sampler": {"name": "sequential"}},
        distributed={"processes": 2},
        output={"dir": "runs-two"},
    )
    one = write_project(
        tmp_path / "one.json",
        "images",
        model=common["model"],
        train=common["train"],
        loader={"batch_size": 12, "sampler": {"name": "sequential"}},
        output={"dir": "runs-one"},
    )
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    res = _run(
        [sys.executable, str(ROOT / "main.py"), "train", str(two)],
        tmp_path,
        PYTHONPATH=str(HOOK),
        MWB_TEST_DUMP_DIR=str(dumps),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "starting the run in 2 processes through torchrun" in res.stderr
    assert "All 2 processes end with the same weights and buffers" in res.stderr
    assert "Feature cache: computing the features" in res.stderr  # DDP wraps the part after the cache's cut
    # The decoded images: one file per split on this machine, mapped by both processes (written once each).
    assert "memory-mapped from" in res.stderr and "2 processes on this machine share one copy" in res.stderr
    assert res.stderr.count("written by this process") == 2 and "mapped as found, not rewritten" in res.stderr
    runs = list((tmp_path / "runs-two").iterdir())
    assert len(runs) == 1, runs  # one folder, made by rank 0
    run_two = runs[0]
    ranks = [torch.load(dumps / f"rank-{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])

    from engine.cli import main

    assert main(["train", str(one), "--out", str(tmp_path / "run-one")]) == 0
    m2, m1 = _metrics(run_two), _metrics(tmp_path / "run-one")
    assert len(m2) == len(m1) == 2
    for a, b in zip(m2, m1, strict=True):
        for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a, b)
    ckpt2 = load_checkpoint(run_two / "checkpoints" / "final.pt")
    ckpt1 = load_checkpoint(tmp_path / "run-one" / "checkpoints" / "final.pt")
    assert not any(k.startswith("module.") for k in ckpt2["model_state_dict"])
    for k, v in ckpt1["model_state_dict"].items():
        assert torch.allclose(ckpt2["model_state_dict"][k], v, rtol=1e-4, atol=1e-5), k
    assert all(torch.equal(ckpt2["model_state_dict"][k], ranks[0][k]) for k in ranks[0])

    # the 2-process run's checkpoint continues in one process
    assert main(["resume", str(run_two / "checkpoints" / "last.pt"), "--epochs", "3", "--processes", "1"]) == 0
    assert [m["epoch"] for m in _metrics(run_two)] == [1, 2, 3]


def test_a_one_process_checkpoint_resumes_in_two_processes_and_the_loss_falls(tmp_path, data):
    """The whole model trains (BatchNorm per process); events on stdout from rank 0 only; ranks agree. An image
    cut short after the scan (before the first batch) is met by one of the processes and reported once by rank 0:
    in the last event, run.json and the scan cache (engine/sample_failures.py)."""
    from engine.data import scan_source

    project = write_project(
        tmp_path / "p.json",
        "images",
        loader={"batch_size": 6, "decoded_cache": "off"},  # read from the files each epoch, as big data is
        optimizer={"name": "adam", "lr": 0.0005},
        train={"epochs": 1, "device": "cpu", "seed": 1},
    )
    from engine.cli import main

    assert main(["train", str(project), "--out", str(tmp_path / "run")]) == 0
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    cmd = torchrun_command(
        2, ["resume", str(tmp_path / "run" / "checkpoints" / "last.pt"), "--epochs", "4", "--events"]
    )
    victim = data / "blue" / "005.png"
    res = _run(cmd, tmp_path, PYTHONPATH=str(HOOK), MWB_TEST_DUMP_DIR=str(dumps), MWB_TEST_CORRUPT=str(victim))
    assert res.returncode == 0, res.stderr[-3000:]
    history = _metrics(tmp_path / "run")
    assert [m["epoch"] for m in history] == [1, 2, 3, 4]
    finished = [e for e in map(decode, res.stdout.splitlines()) if isinstance(e, RunFinished)]
    assert [u["path"] for u in finished[0].unreadable] == [str(victim)]
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [u["path"] for u in info["unreadable"]] == [str(victim)]
    logged = [e.message for e in map(decode, res.stdout.splitlines()) if isinstance(e, LogMessage)]
    assert sum("1 unreadable image(s) skipped: 005.png" in m for m in logged) == 1  # rank 0's summary line
    skipped = {s.path: s.reason for s in scan_source(data).skipped}
    assert skipped[str(victim)].startswith("unreadable when training read it")
    assert max(m["train_loss"] for m in history[1:]) < history[0]["train_loss"], history
    events = [e for e in map(decode, res.stdout.splitlines()) if e is not None]
    kinds = collections.Counter(type(e).__name__ for e in events)
    assert kinds["RunStarted"] == 1 and kinds["EpochFinished"] == 3 and kinds["RunFinished"] == 1, kinds
    started = next(e for e in events if isinstance(e, RunStarted))
    assert started.world_size == 2 and started.start_epoch == 1
    assert isinstance(events[-1], RunFinished) and events[-1].status == "completed" and events[-1].epoch == 4
    losses = [v for e in events if isinstance(e, BatchProgress) for v in e.losses]
    assert len(losses) == 3 * 3  # 3 epochs of 18 images per process in batches of 6
    assert "[rank 1] " in res.stderr  # the other process's log lines say whose they are
    ranks = [torch.load(dumps / f"rank-{r}.pt", weights_only=True) for r in range(2)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    final = load_checkpoint(tmp_path / "run" / "checkpoints" / "final.pt")
    assert all(torch.equal(final["model_state_dict"][k], ranks[0][k]) for k in ranks[0])


def test_a_failing_rank_ends_the_run_with_its_error_and_the_checkpoints_stay(tmp_path, data):
    project = write_project(
        tmp_path / "p.json",
        "images",
        loader={"batch_size": 6},
        train={"epochs": 3, "device": "cpu", "seed": 0},
        distributed={"timeout_s": 30},
    )
    cmd = torchrun_command(2, ["train", str(project), "--out", str(tmp_path / "run"), "--events"], tee=True)
    # rank 1 fails in epoch 2 (3 steps per epoch), while rank 0 waits for it in the next all-reduce
    res = _run(cmd, tmp_path, timeout=240, PYTHONPATH=str(HOOK), MWB_TEST_FAIL_RANK="1", MWB_TEST_FAIL_STEP="5")
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "[default1]:" in out and "injected failure in rank 1 at step 5" in out
    # rank 0 says what happened to it in one line, and its last event tells a parent process the same
    assert "rank 0: another of the 2 processes failed or stopped answering at epoch 2" in out
    finished = [e for e in map(decode, res.stdout.splitlines()) if isinstance(e, RunFinished)]
    assert len(finished) == 1 and finished[0].status == "failed" and finished[0].error_type == "PeerProcessError"
    assert finished[0].epoch == 1  # the last epoch that finished, not the one cut short
    assert [m["epoch"] for m in _metrics(tmp_path / "run")] == [1]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 1


def _children(pid: int) -> set[int]:
    """Every descendant of a process (from /proc), to check that none outlives a stop."""
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = (task / "children").read_text().split()
            except OSError:
                continue
            for kid in map(int, kids):
                if kid not in found:
                    found.add(kid)
                    todo.append(kid)
    return found


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to find the worker processes")
def test_ctrl_c_stops_every_process_after_the_batch_with_the_checkpoints_intact(tmp_path, data):
    """Ctrl-C in a terminal signals the whole foreground group: main.py, torchrun and both workers."""
    import signal
    import time

    project = write_project(
        tmp_path / "p.json",
        "images",
        loader={"batch_size": 2},
        train={"epochs": 50, "device": "cpu", "seed": 0},
        distributed={"processes": 2},
    )
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "train", str(project), "--out", str(tmp_path / "run"), "--events"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    try:
        workers: set[int] = set()
        for line in proc.stdout:  # wait until an epoch has finished (and was checkpointed)
            workers |= _children(proc.pid)
            event = decode(line)
            if isinstance(event, EpochFinished):
                break
        else:
            pytest.fail("the run ended before its first epoch: " + proc.stderr.read()[-3000:])
        workers |= _children(proc.pid)
        assert len(workers) >= 3  # torchrun and its two training processes
        os.killpg(proc.pid, signal.SIGINT)
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    finished = [e for e in map(decode, rest.splitlines()) if isinstance(e, RunFinished)]
    assert finished and finished[-1].status == "stopped", err[-3000:]
    assert proc.returncode == 130
    deadline = time.monotonic() + 30
    while (
        any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in workers)
        and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid)]
    assert "processes end with the same weights and buffers" in err  # stopped in the same batch, buffers shared
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["epoch"] == finished[-1].epoch >= 1
    assert [m["epoch"] for m in _metrics(tmp_path / "run")] == list(range(1, last["epoch"] + 1))


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "gone"


def test_each_process_plans_its_workers_with_its_share_of_the_cpus(monkeypatch):
    from engine.samplers import usable_cpus

    alone = usable_cpus()
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    assert usable_cpus() == max(1, alone // 2)


def test_a_run_in_phases_trains_the_same_in_two_processes_as_in_one(tmp_path, data):
    """Phase 1 the head on cached features, phase 2 layer4's convolutions too (BatchNorm frozen, which is
    per-process otherwise): 2 x 6 images per step against 1 x 12, the same losses phase by phase."""
    bn = ["layer4.0.bn1", "layer4.0.bn2", "layer4.0.downsample.1", "layer4.1.bn1", "layer4.1.bn2"]
    phases = [
        {"epochs": 1, "freeze": "head_only", "lr": 0.01},
        {"epochs": 1, "freeze": "up_to", "freeze_up_to": "layer3", "freeze_prefixes": bn, "lr_factor": 0.3},
    ]
    runs = {}
    for name, batch, processes in (("two", 6, 2), ("one", 12, 1)):
        project = write_project(
            tmp_path / f"{name}.json",
            "images",
            model={"backbone": "resnet18"},
            train={"device": "cpu", "seed": 0, "phases": phases},
            loader={"batch_size": batch, "sampler": {"name": "sequential"}},
            distributed={"processes": processes},
            output={"dir": f"runs-{name}", "tensorboard": False},
        )
        res = _run([sys.executable, str(ROOT / "main.py"), "train", str(project)], tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = _metrics(next((tmp_path / f"runs-{name}").iterdir()))
        if processes == 2:
            assert "All 2 processes end with the same weights and buffers" in res.stderr
            assert "Phase 2/2: epochs 2-2" in res.stderr
    assert [m["phase"] for m in runs["two"]] == [m["phase"] for m in runs["one"]] == [1, 2]
    for a, b in zip(runs["two"], runs["one"], strict=True):
        for key in ("train_loss", "val_loss", "val_accuracy", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a, b)


_THREADS_AFTER_THE_RUN = """
import os, sys
sys.path.insert(0, os.environ["MWB_TEST_REPO"])
from engine.config import load_project
from engine.session import RunSession
from engine.trainer import Callback

def native_threads():
    return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))

class Watch(Callback):
    def on_batch_finished(self, trainer, state, loss):
        if sys.argv[2] == "fail":  # in every process, inside the batch loop: its frames hold DDP's wrapper
            print("during:", native_threads(), flush=True)
            raise RuntimeError("a failure in the batch loop")

    def on_epoch_finished(self, trainer, state, metrics):
        print("during:", native_threads(), flush=True)

finished = RunSession(load_project(sys.argv[1]), callbacks=[Watch()]).run()
print("after:", finished.status, native_threads(), flush=True)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the process's threads from /proc")
@pytest.mark.parametrize("ending", ["completed", "failed"])
def test_the_end_of_a_run_ends_the_process_groups_threads(tmp_path, data, ending):
    """The Gloo threads must be gone when a run has ended, not left to interpreter shutdown: one of them still
    dropping the last collective's tensors there takes the GIL and aborts the process after a finished run
    (it did in CI: rank 1 of a two-process run in phases, SIGABRT after 'Done'). Two phases, so two DDP
    wrappers, the first one left to the garbage collector; DDP's first use imports torch._dynamo, which keeps
    every process group existing then alive for good, so the group must be made after that import. A run that
    fails in its batch loop ends them too (the traceback's frames held the wrapper)."""
    phases = [{"epochs": 1, "freeze": "head_only"}, {"epochs": 1, "freeze": "up_to", "freeze_up_to": "layer3"}]
    project = write_project(
        tmp_path / "p.json",
        "images",
        train={"device": "cpu", "seed": 0, "phases": phases},
        loader={"batch_size": 6, "sampler": {"name": "sequential"}},
        output={"dir": "runs", "tensorboard": False},
    )
    script = tmp_path / "threads.py"
    script.write_text(_THREADS_AFTER_THE_RUN)
    fail = "fail" if ending == "failed" else "run"
    res = _run(torchrun_command(2, [], tee=True)[:-1] + [str(script), str(project), fail], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    during = [line for line in lines if "during:" in line]
    after = [line for line in lines if "after:" in line]
    # two epochs in each of the two processes, or the first batch
    assert len(during) == (4 if ending == "completed" else 2) and len(after) == 2, res.stdout
    assert all("gloo" in line for line in during)  # the check below sees Gloo's threads where they exist
    assert all(f"after: {ending}" in line for line in after), after
    assert not [line for line in after if "gloo" in line]
