"""The headless command line: train, check and inspect a project without the desktop app."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from engine.config import DEVICES, ConfigError, ProjectConfig, with_total_epochs
from engine.events import (
    DATA_PROGRESS,
    BatchProgress,
    EpochFinished,
    Event,
    JsonLines,
    LogMessage,
    Output,
    RunFinished,
    RunStarted,
)
from engine.session import RunSession, apply_init_from, error_kind, failed_before_start

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class ConsoleOutput:
    """A run's events on the console (stderr): a progress bar per epoch and one summary line per epoch.

    progress=False leaves out the bar (a parent process reads the output line by line, or a rank other than 0).
    """

    def __init__(self, stream: TextIO | None = None, *, progress: bool = True, prefix: str = ""):
        from tqdm import tqdm

        self._tqdm = tqdm
        self.stream = stream if stream is not None else sys.stderr  # the stderr of now, as every other message
        self.progress = progress
        self.prefix = prefix  # "[rank N] " for the other processes of a multi-process run
        self.bar: Any = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, LogMessage):
            self._write(event.message)
        elif isinstance(event, RunStarted):
            self._write(f"Training on {event.device}: {event.epochs} epoch(s) of {event.batches_per_epoch} batches")
        elif isinstance(event, BatchProgress):
            if not self.progress:
                return
            if self.bar is None:
                self.bar = self._tqdm(
                    total=event.batches_per_epoch,
                    desc=f"epoch {event.epoch}/{event.epochs}",
                    initial=event.batch - len(event.steps),
                    file=self.stream,
                    leave=False,
                    dynamic_ncols=True,
                    mininterval=0.25,
                )
            self.bar.update(len(event.steps))
            self.bar.set_postfix(loss=f"{event.loss:.4f}", refresh=False)
        elif isinstance(event, EpochFinished):
            self._close_bar()
            self._write(format_metrics(event.metrics))
        elif isinstance(event, RunFinished):
            self._close_bar()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _write(self, text: str) -> None:
        if self.prefix:
            text = "\n".join(self.prefix + line for line in text.splitlines())
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)


def format_metrics(m: dict[str, Any]) -> str:
    parts = [f"epoch {m['epoch']}", f"train_loss {m['train_loss']:.4f}"]
    if m.get("train_accuracy") is not None:
        parts.append(f"train_acc {m['train_accuracy']:.3f}")
    if m.get("val_loss") is not None:
        parts.append(f"val_loss {m['val_loss']:.4f}")
    if m.get("val_accuracy") is not None:
        parts.append(f"val_acc {m['val_accuracy']:.3f}")
    parts.append(f"lr {m['lr']:.3g}")
    parts.append(f"{m['epoch_seconds']:.1f}s")
    if m.get("samples_per_second"):
        parts.append(f"{m['samples_per_second']:.0f} samples/s")
    return "  ".join(parts)


def _load(project: str, overrides: argparse.Namespace | None = None) -> ProjectConfig:
    from engine.config import from_dict, load_project

    cfg = load_project(project)
    epochs = getattr(overrides, "epochs", None)
    processes = getattr(overrides, "processes", None)
    if epochs is not None or processes is not None:
        data = cfg.to_dict()
        if epochs is not None:
            data = with_total_epochs(data, epochs)
        if processes is not None:
            data["distributed"]["processes"] = processes
        try:
            cfg = from_dict(data, base_dir=cfg.base_dir, source=project)
        except ConfigError as exc:
            raise ConfigError(
                [
                    str(p).replace("train.epochs", "--epochs").replace("distributed.processes", "--processes")
                    for p in exc.problems
                ]
            ) from None
    return cfg


def _relaunch(args: argparse.Namespace, processes: int) -> int:
    """distributed.processes > 1 outside torchrun: run this same command in that many processes through torchrun.

    Ctrl-C in the terminal reaches torchrun and its workers directly (one process group); they stop after the
    batch. A SIGTERM to this process is passed on to torchrun, which ends its workers.
    """
    import subprocess

    from engine.distributed import torchrun_command

    cmd = torchrun_command(processes, args.argv)
    print(
        f"distributed.processes = {processes}: starting the run in {processes} processes through torchrun",
        file=sys.stderr,
        flush=True,
    )
    child = subprocess.Popen(cmd)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    interrupted = []

    def on_sigint(
        signum: int, frame: FrameType | None
    ) -> None:  # the workers got it too: they stop after the batch; torchrun then ends
        interrupted.append(True)

    if main_thread:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, on_sigint)
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, lambda signum, frame: child.terminate())
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code == 0:
        return EXIT_OK
    if interrupted or code in (EXIT_INTERRUPTED, -signal.SIGINT):
        print(
            f"Stopped: the {processes} processes ended after their batch; the run folder keeps the last finished epoch",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    print(
        f"error: the {processes}-process run ended with exit code {code} (each process's messages are above)",
        file=sys.stderr,
    )
    return EXIT_FAILED


def _wants_relaunch(cfg: ProjectConfig) -> bool:
    from engine.distributed import world_from_env

    return cfg.distributed.processes > 1 and world_from_env() is None


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args.project, args)
    if _wants_relaunch(cfg):
        return _relaunch(args, cfg.distributed.processes)
    if args.init_from:
        if cfg.model.weights or cfg.model.weights_file:
            raise ConfigError(
                [
                    "--init-from replaces the project's model.weights / model.weights_file; "
                    "remove them from the project or drop --init-from"
                ]
            )
        if not Path(args.init_from).is_file():
            raise ConfigError([f"--init-from {args.init_from!r}: no such file"])
        apply_init_from(cfg, args.init_from)
    return _train(RunSession(cfg, out=args.out), events=args.events)


def cmd_resume(args: argparse.Namespace) -> int:
    from engine.checkpoints import load_checkpoint
    from engine.runs import resume_config

    ckpt = load_checkpoint(args.checkpoint)
    cfg = resume_config(ckpt, args.checkpoint, epochs=args.epochs, epochs_field="--epochs", processes=args.processes)
    if _wants_relaunch(cfg):
        return _relaunch(args, cfg.distributed.processes)
    return _train(RunSession(cfg, resume=ckpt, checkpoint=args.checkpoint, out=args.out), events=args.events)


def _train(session: RunSession, *, events: bool = False) -> int:
    """The CLI's adapter to a RunSession: its events on the console (and as JSON lines with --events), Ctrl-C
    and SIGTERM as a stop after the batch, and the outcome as an exit code."""
    session.prepare()
    dist, main_rank = session.dist, session.is_main
    outputs: list[Output] = []
    if main_rank and events:
        outputs.append(JsonLines())  # the log goes to the parent as events, not a second time as plain lines
    else:
        outputs.append(ConsoleOutput(progress=main_rank, prefix="" if main_rank else f"[rank {dist.rank}] "))
    session.outputs = outputs
    stop = session.stop_event

    def on_sigint(signum: int, frame: Any) -> None:
        if stop.is_set():
            if dist is not None:  # torchrun passes a terminal's Ctrl-C on a second time: already stopping
                return
            raise KeyboardInterrupt
        print("\nStopping after this batch (Ctrl-C again to abort)...", file=sys.stderr, flush=True)
        stop.set()

    def on_sigterm(signum: int, frame: Any) -> None:
        # torchrun ends the other processes with SIGTERM when one fails (and passes its own SIGTERM on): stop
        # after the batch like Ctrl-C; a process waiting for a dead peer then fails with its one-line message.
        stop.set()

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
    previous_term = signal.signal(signal.SIGTERM, on_sigterm) if main_thread and dist is not None else None
    _finished_sent.append(True)  # the session reports its end to the outputs, however it ends
    try:
        result = session.run()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    if result.status == "failed":
        if result.traceback:
            print(result.traceback, file=sys.stderr, end="")
            print(f"error: train failed: {result.error}", file=sys.stderr)
        else:
            print(f"error: {result.error}", file=sys.stderr)
        return EXIT_BAD_INPUT if result.kind == "input" else EXIT_FAILED
    if not main_rank:
        return EXIT_INTERRUPTED if result.status == "stopped" else EXIT_OK
    if result.status == "stopped":
        print(
            f"Stopped after {result.epoch} of {result.epochs} epoch(s); results so far are in {result.run_dir}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    how = " (stopped early)" if result.stopped_early else ""
    print(
        f"Done: {result.epoch} epoch(s){how}; model saved to "
        f"{Path(result.run_dir or '.') / 'checkpoints' / 'final.pt'}",
        file=sys.stderr,
    )
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from engine.evaluate import evaluate_checkpoint

    if args.top < 0:
        raise ConfigError([f"--top = {args.top}: must be 0 or more"])
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise ConfigError([f"--json {args.json!r}: folder {str(Path(args.json).resolve().parent)!r} does not exist"])
    ev = evaluate_checkpoint(
        args.checkpoint,
        data=args.data,
        top_n=args.top,
        device=args.device,
        cam_dir=args.cam,
        cam_method=args.cam_method,
    )
    assert ev is not None  # None only after a stop request, and no stop_event is given
    print(f"Evaluated {ev.data}")
    if ev.loss is not None:
        plain = {"classification": "cross-entropy", "multilabel": "binary cross-entropy", "regression": "MSE"}
        print(
            f"loss {ev.loss:.4f} (plain {plain.get(ev.task, 'loss')}: no label smoothing or class weights, "
            "so it can be lower than the run's val_loss)"
        )
    if ev.accuracy is not None:
        print(
            f"accuracy {ev.accuracy:.4f}"
            + (f"   top-5 {ev.top5_accuracy:.4f}" if ev.top5_accuracy is not None else "")
            + (f"   macro F1 {ev.macro_f1:.4f}" if ev.macro_f1 else "")
        )
    if ev.mae is not None:
        print(f"MAE {ev.mae:.4f}   RMSE {ev.rmse:.4f}")
    if ev.per_class:
        width = max(len(r["class"]) for r in ev.per_class)
        print(f"\n{'class':{width}s}  precision  recall     f1  support")
        for r in ev.per_class:
            print(
                f"{r['class']:{width}s}  {r['precision']:9.3f}  {r['recall']:6.3f}  {r['f1']:5.3f}  {r['support']:7d}"
            )
    if ev.confusion:
        names = [c[:6] for c in ev.class_names]
        print("\nconfusion (rows: true, columns: predicted)")
        print(" " * 8 + " ".join(f"{n:>6s}" for n in names))
        for name, row in zip(names, ev.confusion, strict=True):
            print(f"{name:>6s}  " + " ".join(f"{v:6d}" for v in row))
    if ev.hardest:
        shown = ev.hardest[:10]
        more = f"; all {len(ev.hardest)} in --json" if len(ev.hardest) > len(shown) and not args.json else ""
        print(f"\nhighest-loss samples (top {len(shown)}{more}):")
        for h in shown:
            conf = f"{h['confidence']:.2f}" if h.get("confidence") is not None else "-"
            print(f"  loss {h['loss']:.3f}  true {h['true']}  predicted {h['predicted']} ({conf})  {h['path']}")
    if ev.cams:
        print(
            f"\nwrote {len(ev.cams)} class activation map(s) ({ev.cams[0]['method']}, layer {ev.cams[0]['layer']}) "
            f"to {Path(ev.cams[0]['map']).parent}: NNN-<image>.png overlays and .npy maps"
        )
    if ev.cam_note:
        print(f"\n{ev.cam_note}")
    if args.json:
        out = Path(args.json)
        out.write_text(json.dumps(ev.to_dict(), indent=2), encoding="utf-8")
        print(f"\nwrote {out}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    import json

    from engine.export import default_suffix, export_checkpoint, format_report

    checkpoint = Path(args.checkpoint)
    # TorchScript's usual suffix is the checkpoint's own (.pt): name the format so the two never collide.
    tag = ".torchscript" if args.format == "torchscript" else ""
    suffix = default_suffix(args.format, args.quantize)  # refuses --quantize with a format it cannot apply to
    out = Path(args.out) if args.out else checkpoint.with_name(checkpoint.stem + tag + suffix)
    if out.resolve() == checkpoint.resolve():
        raise ConfigError([f"--out {str(out)!r} is the checkpoint itself; choose another file name"])
    result = export_checkpoint(
        checkpoint,
        args.format,
        out,
        force=args.force,
        tolerance=args.tolerance,
        quantize=args.quantize,
        log=lambda m: print(m, file=sys.stderr),
    )
    if result.quantize:
        q = json.loads(result.sidecar.read_text(encoding="utf-8")).get("quantization", {})
        how = f"{q.get('method', '?')} {result.quantize} quantization"
        print(
            f"Exported {result.format} ({how}) to {result.path} (details in {result.sidecar.name}); the float32 "
            f"file matched PyTorch within {result.tolerance:g} before quantizing"
            + (f"; dynamic because {q['why_not_static']}" if q.get("why_not_static") else "")
        )
    else:
        print(
            f"Exported {result.format} to {result.path} (details in {result.sidecar.name}); checked on a "
            f"{result.inputs}: max |difference| of logits vs PyTorch {result.max_abs_diff:.2e} "
            f"(tolerance {result.tolerance:g})"
        )
    print("Deployment report:")
    for line in format_report(result.report):
        print(f"  {line}")
    if result.predict_script is not None:
        print(f"Classify images with: python {result.predict_script} IMAGE_OR_FOLDER --model {result.path.name}")
    return EXIT_OK


def cmd_codegen(args: argparse.Namespace) -> int:
    from engine.codegen import write_export

    cfg = _load(args.project)
    written = write_export(cfg, args.out, bundled_weights="file" if args.weights_file else "package")
    print(f"Wrote {', '.join(p.name for p in written)} to {Path(args.out).resolve()}")
    print(f"Run it with: python {Path(args.out) / 'train.py'}")
    return EXIT_OK


def cmd_lr_find(args: argparse.Namespace) -> int:
    import json

    from engine.lr_curve import write_plot
    from engine.lr_finder import find_lr

    for flag, value in (("--json", args.json), ("--plot", args.plot)):
        if value and not Path(value).resolve().parent.is_dir():
            raise ConfigError([f"{flag} {value!r}: folder {str(Path(value).resolve().parent)!r} does not exist"])
    cfg = _load(args.project)
    if cfg.distributed.processes > 1:
        print(
            "The learning-rate finder runs in this one process (distributed.processes is for training)", file=sys.stderr
        )
    stop = threading.Event()
    bar = ConsoleOutput()._tqdm(total=args.batches, desc="lr-find", leave=False, file=sys.stderr, dynamic_ncols=True)

    def progress(info: dict[str, Any]) -> None:
        bar.total = info["batches"]
        bar.update(info["batch"] - bar.n)
        bar.set_postfix(lr=f"{info['lr']:.2g}", loss=f"{info['loss']:.4f}", refresh=False)

    def on_sigint(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
    try:
        result = find_lr(
            cfg,
            start_lr=args.start_lr,
            end_lr=args.end_lr,
            num_batches=args.batches,
            diverge=args.diverge,
            stop_event=stop,
            progress=progress,
            log=lambda message: bar.write(message, file=sys.stderr),
        )
    finally:
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if result.suggestion is not None:
        print(f"suggested lr {result.suggestion:.3g} ({result.reason})")
    else:
        print(f"no suggestion: {result.reason}")
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(result, args.plot)
        print(f"wrote {args.plot}")
    return EXIT_INTERRUPTED if result.status == "stopped" else EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from engine.image_scan import ProgressLine
    from engine.trainer import build_run

    cfg = _load(args.project)
    messages: list[str] = []
    # Everything train builds before its first batch: data, weights, freezing, loss, sampler, device. A first
    # scan of a big folder shows its progress; Ctrl-C ends it, keeping in the scan cache what was checked.
    progress = ProgressLine(lambda line: print(line, file=sys.stderr, flush=True), DATA_PROGRESS)
    parts = build_run(cfg, log=messages.append, progress=progress)
    print(f"Project {cfg.name!r} is valid: {len(parts.train_loader)} batches per epoch on {parts.device}.")
    print("\n".join(messages))
    return EXIT_OK


def cmd_shard(args: argparse.Namespace) -> int:
    from engine.webdataset_data import write_shards

    result = write_shards(
        args.data,
        args.out,
        shard_size=args.shard_size,
        kind=args.kind,
        task=args.task,
        val_fraction=args.val_fraction,
        split_seed=args.split_seed,
        progress=lambda message: print(message, file=sys.stderr, flush=True),
    )
    if result.replaced:
        print(f"Replaced the previous shard set in {result.out} ({result.replaced} shard file(s) removed)")
    for split, names in result.shards.items():
        if names:
            print(f"{split}: {result.samples[split]} samples in {len(names)} shard(s)")
    if result.skipped:
        print(f"{result.skipped} unusable image(s) left out (main.py check on the source lists them)")
    patterns = result.patterns()
    print(f'Use them with data.kind "webdataset", data.path "{patterns["train"]}"', end="")
    if "val" in patterns:
        print(f', data.val_path "{patterns["val"]}"', end="")
    print(f" ({result.out / 'shards.json'} gives the classes and counts)")
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    import json

    from engine.audit import AuditStopped, finding_status, kept_findings, report_json, run_audit

    cfg = _load(args.project)
    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())  # Ctrl-C: stop at the next batch
    stages = {"scan": "Checking images", "embed": "Embedding", "index": "Searching duplicates", "labels": "Label probe"}
    shown: dict[str, int] = {}

    def progress(stage: str, done: int, total: int) -> None:
        step = max(total // 10, 1)
        if done == total or done - shown.get(stage, -step) >= step:
            shown[stage] = done
            print(f"{stages.get(stage, stage)}: {done:,} of {total:,}", file=sys.stderr, flush=True)

    try:
        report = run_audit(cfg, progress=progress, stop=stop, use_cached_report=not args.again)
        assert report is not None  # None only with cached_only
    except AuditStopped:
        print("audit stopped; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    kept = kept_findings(cfg)
    print(
        f"Audit of {report.dataset}: {report.samples:,} images ({report.train:,} training, {report.val:,} "
        f"validation); embeddings from {report.embedder}" + (" (report from the cache)" if report.from_cache else "")
    )
    data = report_json(report, cfg)
    for kind, count in data["counts"].items():
        if count:
            still = sum(1 for f in report.of_kind(kind) if finding_status(f, cfg, kept) == "open")
            print(f"  {kind:16s} {count:6,d}  ({still:,} open)")
    leak = report.leakage
    print(
        f"Train/validation leakage: {leak['val_with_twin']:,} of {leak['val_total']:,} validation images have a "
        "twin in training"
    )
    if report.balance:
        counts = ", ".join(
            f"{n} {c:,}" for n, c in zip(report.class_names, report.balance["train_counts"], strict=True)
        )
        print(f"Class balance (training): {counts}; imbalance ratio {report.balance['imbalance_ratio']:.2f}")
    for note in report.notes:
        print(f"Note: {note}")
    top = sorted((f for f in report.findings if f.kind == "label_issue"), key=lambda f: -f.score)[: args.show]
    for f in top:
        print(f"  label? {f.keys[0]}: given {f.detail['given']}, suggested {f.detail['suggested']} ({f.score:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        print(f"Wrote {Path(args.json).resolve()}")
    return EXIT_OK


def cmd_backbones(args: argparse.Namespace) -> int:
    from engine.backbones import weights_status
    from engine.catalog import list_backbones, weight_names

    needle = (args.filter or "").lower()
    names = [n for n in list_backbones() if needle in n.lower()]
    if not names:
        print(
            f"error: no backbone name contains {args.filter!r}; run `backbones` without a filter to list all",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    for name in names:
        weights = [w for w in weight_names(name) if w != "DEFAULT"]
        shown = ", ".join(f"{w} ({weights_status(name, w)})" for w in weights) or "no pretrained weights"
        print(f"{name:24s} {shown}")
    return EXIT_OK


def cmd_layers(args: argparse.Namespace) -> int:
    from engine.backbones import build_model, preprocess_for
    from engine.freezing import apply_freeze, layer_tree

    cfg = _load(args.project)
    num_outputs = args.classes
    if num_outputs is not None and num_outputs < 1:
        raise ConfigError([f"--classes = {num_outputs}: must be at least 1"])
    if num_outputs is None:
        from engine.data import scan_source

        data_path = cfg.resolve(cfg.data.path)
        assert data_path is not None  # load_project refuses an empty data.path
        num_outputs = len(scan_source(data_path, kind=cfg.data.kind, task=cfg.data.task).class_names)
    model_cfg = cfg.model
    if model_cfg.weights:  # the shapes do not depend on the weights; building without them needs no network
        model_cfg = cfg.copy().model
        model_cfg.weights = None
    size = preprocess_for(cfg.model, cfg.data).crop_size
    built = build_model(model_cfg, num_outputs, resolve=cfg.resolve, image_size=size)
    summary = apply_freeze(built.model, cfg.model, built.head_name, freeze_backbone=cfg.optimizer.backbone_lr_mult == 0)
    print(f"{'module':48s} {'type':22s} {'output':20s} {'params':>12s} {'trainable':>12s}")
    for row in layer_tree(built.model, (3, size, size)):
        if args.depth is not None and row.depth > args.depth:
            continue
        name = ("  " * max(row.depth - 1, 0) + row.name) if row.name else "(model)"
        shape = "x".join(str(d) for d in row.output_shape) if row.output_shape else "-"
        print(f"{name[:48]:48s} {row.type[:22]:22s} {shape:20s} {row.params:12,d} {row.trainable:12,d}")
    print(f"\n{summary.total:,} parameters: {summary.trainable:,} trainable, {summary.frozen:,} frozen")
    return EXIT_OK


def _sweep_spec(args: argparse.Namespace) -> Any:
    from engine.sweep import SweepSpec, load_space

    cfg = _load(args.project)
    spec = SweepSpec(
        cfg=cfg,
        params=load_space(args.space),
        trials=args.trials,
        storage=args.storage,
        study=args.study,
        sampler=args.sampler,
        pruner=args.pruner,
        objective=args.objective,
        worker_index=args.worker_index,
    )
    spec.check()
    return spec


def _sweep_workers(args: argparse.Namespace, spec: Any) -> int:
    """--workers K: K worker processes on one study (this one waits); their lines carry [worker N]."""
    import os
    import subprocess

    main_py = Path(__file__).resolve().parent.parent / "main.py"
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.workers)))
    base = [sys.executable, str(main_py), "sweep", args.project, "--space", args.space, "--trials", str(args.trials)]
    base += ["--storage", spec.storage_url, "--study", spec.study_name, "--sampler", args.sampler]
    base += ["--pruner", args.pruner, "--objective", args.objective, "--workers", "1"]
    # Workers 1..K: each prints as [worker N] and seeds its sampler apart; this process runs no trial itself.
    children = [subprocess.Popen([*base, "--worker-index", str(i)], env=env) for i in range(1, args.workers + 1)]
    main_thread = threading.current_thread() is threading.main_thread()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        for child in children:
            child.terminate()  # each stops after its batch, as on Ctrl-C (which the terminal sends them itself)

    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    interrupted = False
    try:
        codes = []
        for child in children:
            while True:
                try:
                    codes.append(child.wait())
                    break
                except KeyboardInterrupt:
                    interrupted = True  # the children got the Ctrl-C too; wait for them to stop
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    from engine.sweep import load_study, summary

    _print_sweep_summary(summary(load_study(spec)), spec)
    if interrupted or any(c == EXIT_INTERRUPTED for c in codes):
        return EXIT_INTERRUPTED
    return EXIT_OK if all(c == 0 for c in codes) else EXIT_FAILED


def _print_sweep_summary(result: dict[str, Any], spec: Any) -> None:
    counts = {k: v for k, v in result["trials"].items() if v}
    print(
        f"Study {result['study']!r}: " + ", ".join(f"{v} {k}" for k, v in counts.items()) if counts else "no trials",
        file=sys.stderr,
    )
    best = result["best"]
    if best is not None:
        params = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
        print(f"Best: trial {best['number']}, {spec.objective} {best['value']:.4f}: {params}")
        if best["run_dir"]:
            print(f"Its run folder: {best['run_dir']}")


def cmd_sweep(args: argparse.Namespace) -> int:
    from engine.sweep import Sweep, summary

    if args.workers < 1:
        raise ConfigError([f"--workers = {args.workers}: must be at least 1"])
    spec = _sweep_spec(args)
    prefix = f"[worker {args.worker_index}] " if args.worker_index else ""

    def log(message: str) -> None:
        print(prefix + message, file=sys.stderr, flush=True)

    if args.workers > 1:
        Sweep(spec, log=log).open()  # created (and its space checked against a stored one) once, before the workers
        return _sweep_workers(args, spec)

    def outputs(number: int) -> list[Output]:
        def show(event: Event) -> None:
            if isinstance(event, EpochFinished):
                log(f"  trial {number} {format_metrics(event.metrics)}")

        return [show]

    sweep = Sweep(spec, log=log, outputs=outputs)
    sweep.open()
    log(
        f"Sweep {spec.study_name!r} in {spec.storage_url}: {args.trials} trial(s), {args.sampler} sampler, "
        f"{args.pruner} pruner, {spec.objective} ({spec.direction})"
    )

    def on_signal(signum: int, frame: Any) -> None:
        if sweep.stop_event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log("Stopping after this batch; the running trial runs again when the sweep continues (Ctrl-C again to abort)")
        sweep.stop()

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        sweep.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not args.worker_index:
        _print_sweep_summary(summary(sweep.study), spec)
    return EXIT_INTERRUPTED if sweep.stop_event.is_set() else EXIT_OK


def cmd_runs(args: argparse.Namespace) -> int:
    import json

    from engine.run_table import DEFAULT_COLUMNS, as_json, column, format_table, list_runs

    keys = list(args.columns.split(",")) if args.columns else list(DEFAULT_COLUMNS)
    keys += [k for k in args.field or [] if k not in keys]
    for key in keys:
        column(key)  # refuses an unknown column by name before anything is read
    records = list_runs(args.folders or ["runs"])
    if args.status:
        records = [r for r in records if r.status == args.status]
    if args.json:
        print(json.dumps(as_json(records, keys), indent=2))
    elif not records:
        print(f"No runs in {', '.join(args.folders or ['runs'])}", file=sys.stderr)
    else:
        print(format_table(records, keys))
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    import json

    from engine.run_table import format_diff, project_diff, read_run

    if len(args.runs) < 2:
        raise ConfigError(["compare needs two or more run folders"])
    missing = [r for r in args.runs if not Path(r).is_dir()]
    if missing:
        raise ConfigError([f"run folder {m!r} does not exist" for m in missing])
    records = [read_run(r) for r in args.runs]
    if args.json:
        print(json.dumps({path: values for path, values in project_diff(records)}, indent=2))
    else:
        print(format_diff(records))
    return EXIT_OK


_finished_sent: list[bool] = []  # _train wrote the run_finished event (so main's error path does not again)


def _report_failure_event(args: argparse.Namespace, exc: BaseException) -> None:
    """--events: a failure before training began (a bad project, a missing checkpoint) still ends with a
    run_finished event, so the parent process shows the message rather than waiting."""
    if not getattr(args, "events", False) or _finished_sent or isinstance(exc, SystemExit):
        return
    import os

    if os.environ.get("RANK", "0") != "0":
        return
    JsonLines()(failed_before_start(exc))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="model-workbench", description="Fine-tune pretrained PyTorch models from a JSON project file, headless."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a project headless and write a run folder")
    p.add_argument("project", help="project file (.json)")
    p.add_argument(
        "--epochs", type=int, help="total epochs (overrides train.epochs; in a run in phases, its last phase's)"
    )
    p.add_argument("--out", help="run folder to write (default: OUTPUT_DIR/NAME-TIMESTAMP)")
    p.add_argument(
        "--init-from",
        metavar="CHECKPOINT",
        help="start from a checkpoint's (or state dict's) weights: a new run, fine-tuning a fine-tune",
    )
    p.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="train in N processes through torchrun (overrides distributed.processes)",
    )
    p.add_argument(
        "--events",
        action="store_true",
        help="print machine-readable progress lines on stdout (engine/events.py) for a parent process",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("resume", help="continue a run exactly where a checkpoint left it")
    p.add_argument("checkpoint", help="a checkpoint .pt from a run folder")
    p.add_argument("--epochs", type=int, help="the run's total epochs (default: the project's)")
    p.add_argument("--out", help="run folder to write (default: the checkpoint's own run folder)")
    p.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="continue in N processes (overrides the run's distributed.processes; 1: one process)",
    )
    p.add_argument(
        "--events",
        action="store_true",
        help="print machine-readable progress lines on stdout (engine/events.py) for a parent process",
    )
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("evaluate", help="accuracy, per-class metrics, confusion matrix, hardest samples")
    p.add_argument("checkpoint")
    p.add_argument("--data", help="a folder, CSV or .npz to evaluate (default: the run's validation split)")
    p.add_argument("--json", metavar="OUT", help="also write every figure to this JSON file")
    p.add_argument("--top", type=int, default=20, help="how many highest-loss samples to list (default 20)")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument(
        "--cam",
        metavar="OUTDIR",
        help="write a class activation map of each highest-loss sample (for its predicted class) to OUTDIR: "
        "an overlay .png and the raw map .npy (float32, the image's height x width, in [0, 1])",
    )
    p.add_argument(
        "--cam-method",
        default="gradcam",
        choices=["gradcam", "gradcam++", "layercam"],
        help="the map's method (default gradcam; gradcam++ and layercam are sharper on small objects)",
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="export a checkpoint's model and verify the file against PyTorch")
    p.add_argument("checkpoint")
    p.add_argument("--format", required=True, choices=["torchscript", "onnx", "state_dict", "safetensors", "pt2"])
    p.add_argument("--out", help="file to write (default: next to the checkpoint, with the format's suffix)")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest allowed logit difference (default 1e-3)")
    p.add_argument(
        "--quantize",
        choices=["int8"],
        help="ONNX only: quantize to int8 with ONNX Runtime (static, calibrated on training images; dynamic where "
        "static does not apply); the report compares its accuracy, size and speed with float32",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("codegen", help="export the project as a plain PyTorch training script (train.py)")
    p.add_argument("project")
    p.add_argument("--out", required=True, help="folder to write train.py, README.md and requirements.txt into")
    p.add_argument(
        "--weights-file",
        action="store_true",
        help="BUNDLED weights: write them next to the script as a state-dict file instead of loading the package",
    )
    p.set_defaults(func=cmd_codegen)

    from engine.lr_curve import DEFAULT_BATCHES, DEFAULT_DIVERGE, DEFAULT_END_LR, DEFAULT_START_LR

    p = sub.add_parser(
        "lr-find",
        help="learning-rate range test: the loss over an exponential ramp of learning rates, and a suggestion",
    )
    p.add_argument("project")
    p.add_argument("--json", metavar="OUT", help="write the curve, the suggestion and how it ended to this file")
    p.add_argument("--plot", metavar="OUT.png", help="draw the loss against the learning rate into this PNG")
    p.add_argument(
        "--start-lr", type=float, default=DEFAULT_START_LR, help=f"first rate (default {DEFAULT_START_LR:g})"
    )
    p.add_argument("--end-lr", type=float, default=DEFAULT_END_LR, help=f"last rate (default {DEFAULT_END_LR:g})")
    p.add_argument(
        "--batches",
        type=int,
        default=DEFAULT_BATCHES,
        help=f"steps of the ramp, at most one epoch (default {DEFAULT_BATCHES})",
    )
    p.add_argument(
        "--diverge",
        type=float,
        default=DEFAULT_DIVERGE,
        help=f"stop once the smoothed loss exceeds this many times its lowest (default {DEFAULT_DIVERGE:g})",
    )
    p.set_defaults(func=cmd_lr_find)

    p = sub.add_parser("check", help="validate a project and summarise its dataset, without training")
    p.add_argument("project")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "shard", help="write an image folder or CSV as tar shards for data.kind 'webdataset' (the source is only read)"
    )
    p.add_argument("data", help="image folder (one sub-folder per class) or .csv")
    p.add_argument(
        "--out",
        required=True,
        help="folder for the shards and shards.json: empty or new, or a previous shard set (which is replaced)",
    )
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--kind", choices=["auto", "folder", "csv"], default="auto", help="what DATA is (default: auto)")
    p.add_argument("--task", choices=["classification", "multilabel", "regression"], default="classification")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="share of each class written to val-*.tar shards (stratified, as data.val_fraction); default 0",
    )
    p.add_argument("--split-seed", type=int, default=0, help="seed of that split (default 0)")
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser(
        "audit", help="find duplicates, train/validation leakage, likely label errors, outliers and imbalance"
    )
    p.add_argument("project", help="project file (.json)")
    p.add_argument("--json", metavar="OUT", help="write every finding (kind, image paths, score, status) to OUT")
    p.add_argument("--again", action="store_true", help="recompute the report even when it is cached")
    p.add_argument("--show", type=int, default=10, help="likely label errors to print (default 10)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("backbones", help="list the backbone catalog and whether each weight is cached")
    p.add_argument("filter", nargs="?", help="show only names containing this text")
    p.set_defaults(func=cmd_backbones)

    p = sub.add_parser("layers", help="show a project's model as a layer tree with frozen/trainable counts")
    p.add_argument("project")
    p.add_argument("--depth", type=int, help="show modules down to this depth only")
    p.add_argument("--classes", type=int, help="number of outputs (default: from the project's dataset)")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser(
        "sweep",
        help="search project fields with Optuna: each trial a run folder; run again to continue the same study",
    )
    p.add_argument("project", help="project file (.json)")
    p.add_argument("--space", required=True, metavar="SPACE.json", help="field -> Optuna distribution (README)")
    p.add_argument("--trials", type=int, required=True, metavar="N", help="finished (complete or pruned) trials")
    p.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna storage URL (default: sqlite:///OUTPUT_DIR/sweeps.db); postgresql://... for several machines",
    )
    p.add_argument("--study", metavar="NAME", help="study name (default: PROJECT_NAME-sweep)")
    p.add_argument("--workers", type=int, default=1, metavar="K", help="worker processes on this machine")
    p.add_argument("--sampler", choices=["tpe", "random", "grid"], default="tpe")
    p.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median")
    p.add_argument("--objective", choices=["val_accuracy", "val_loss"], default="val_accuracy")
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("runs", help="list the runs in run folders: status, settings and results, one per line")
    p.add_argument("folders", nargs="*", metavar="DIR", help="folders holding run folders (default: runs)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.add_argument(
        "--field",
        action="append",
        metavar="FIELD",
        help="add a project field as a column, by its dotted name such as optimizer.weight_decay (repeatable)",
    )
    p.add_argument("--columns", help="the columns, comma-separated, instead of the default ones")
    p.add_argument("--status", choices=["running", "completed", "stopped", "failed"], help="only runs in this state")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("compare", help="the project fields that differ between two or more runs, side by side")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="print {field: [value per run]} as JSON")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (0 done, 2 bad input, 1 failure, 130 stopped)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # to run the same command through torchrun
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        try:
            return args.func(args)
        except BaseException as exc:
            _report_failure_event(args, exc)
            raise
    except KeyboardInterrupt:  # first: a Ctrl-C while torch is still importing must not import it again
        print("aborted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `... | head` closed the pipe: the reader has what it wanted
        sys.stderr.close()
        return EXIT_OK
    except Exception as exc:  # say what; keep the trace for a bug report
        kind = error_kind(exc)
        if kind == "bug":
            traceback.print_exc()
            print(f"error: {args.command} failed: {exc}", file=sys.stderr)
        else:
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT if kind == "input" else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
