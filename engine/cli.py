"""The headless command line: train, check and inspect a project without the desktop app."""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Sequence

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input: a message is enough, a traceback would only confuse."""
    from engine.backbones import WeightsError
    from engine.checkpoints import CheckpointError
    from engine.config import ConfigError
    from engine.data import DataError
    from engine.samplers import SamplerError

    return ConfigError, DataError, WeightsError, SamplerError, CheckpointError


class ConsoleReporter:
    """A progress bar per epoch on stderr and one summary line per epoch (the CLI's bridge to the trainer)."""

    def __init__(self, stream=sys.stderr):
        from tqdm import tqdm

        self._tqdm = tqdm
        self.stream = stream
        self.bar = None

    def on_log(self, trainer, message: str) -> None:
        self._write(message)

    def on_run_started(self, trainer, state) -> None:
        self._write(f"Training on {state.device}: {state.epochs} epoch(s) of {state.batches_per_epoch} batches")

    def on_batch_finished(self, trainer, state, loss: float) -> None:
        if self.bar is None:
            self.bar = self._tqdm(total=state.batches_per_epoch, desc=f"epoch {state.epoch}/{state.epochs}",
                                  file=self.stream, leave=False, dynamic_ncols=True, mininterval=0.25)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def on_epoch_finished(self, trainer, state, metrics: dict[str, Any]) -> None:
        self._close_bar()
        self._write(format_metrics(metrics))

    def on_run_finished(self, trainer, state) -> None:
        self._close_bar()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _write(self, text: str) -> None:
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


def _load(project: str, overrides: argparse.Namespace | None = None):
    from engine.config import ConfigError, from_dict, load_project

    cfg = load_project(project)
    if overrides is not None and getattr(overrides, "epochs", None) is not None:
        data = cfg.to_dict()
        data["train"]["epochs"] = overrides.epochs
        try:
            cfg = from_dict(data, base_dir=cfg.base_dir, source=project)
        except ConfigError as exc:
            raise ConfigError([p.replace("train.epochs", "--epochs") for p in exc.problems]) from None
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from engine.runs import RunRecorder, create_run_dir
    from engine.trainer import Trainer

    cfg = _load(args.project, args)
    run_dir = create_run_dir(cfg, args.out)
    stop = threading.Event()
    trainer = Trainer(cfg, [RunRecorder(run_dir), ConsoleReporter()], stop_event=stop)

    def on_sigint(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        print("\nStopping after this batch (Ctrl-C again to abort)...", file=sys.stderr, flush=True)
        stop.set()

    previous = signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() \
        else None
    print(f"Run folder: {run_dir}", file=sys.stderr, flush=True)
    try:
        state = trainer.run()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if state.status == "stopped":
        print(f"Stopped after {state.epoch} of {state.epochs} epoch(s); results so far are in {run_dir}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"Done: {state.epoch} epoch(s); model saved to {run_dir / 'checkpoints' / 'final.pt'}", file=sys.stderr)
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from engine.backbones import preprocess_for
    from engine.data import prepare_data

    cfg = _load(args.project)
    data = prepare_data(cfg, preprocess_for(cfg.model, cfg.data))
    print(f"Project {cfg.name!r} is valid.")
    print(data.summary())
    return EXIT_OK


def cmd_backbones(args: argparse.Namespace) -> int:
    from engine.backbones import list_backbones, weight_names, weights_status

    needle = (args.filter or "").lower()
    for name in list_backbones():
        if needle and needle not in name.lower():
            continue
        weights = [w for w in weight_names(name) if w != "DEFAULT"]
        shown = ", ".join(f"{w} ({weights_status(name, w)})" for w in weights) or "no pretrained weights"
        print(f"{name:24s} {shown}")
    return EXIT_OK


def cmd_layers(args: argparse.Namespace) -> int:
    from engine.backbones import build_model, preprocess_for
    from engine.freezing import apply_freeze, layer_tree

    cfg = _load(args.project)
    num_outputs = args.classes
    if num_outputs is None:
        from engine.data import scan_source

        num_outputs = len(scan_source(cfg.resolve(cfg.data.path), kind=cfg.data.kind,
                                      task=cfg.data.task).class_names)
    model_cfg = cfg.model
    if model_cfg.weights:  # the shapes do not depend on the weights; building without them needs no network
        model_cfg = cfg.copy().model
        model_cfg.weights = None
    size = preprocess_for(cfg.model, cfg.data).crop_size
    built = build_model(model_cfg, num_outputs, resolve=cfg.resolve, image_size=size)
    try:
        summary = apply_freeze(built.model, cfg.model, built.head_name)
    except ValueError as exc:
        from engine.config import ConfigError

        raise ConfigError([str(exc)]) from None
    print(f"{'module':48s} {'type':22s} {'output':20s} {'params':>12s} {'trainable':>12s}")
    for row in layer_tree(built.model, (3, size, size)):
        if args.depth is not None and row.depth > args.depth:
            continue
        name = ("  " * max(row.depth - 1, 0) + row.name) if row.name else "(model)"
        shape = "x".join(str(d) for d in row.output_shape) if row.output_shape else "-"
        print(f"{name[:48]:48s} {row.type[:22]:22s} {shape:20s} {row.params:12,d} {row.trainable:12,d}")
    print(f"\n{summary.total:,} parameters: {summary.trainable:,} trainable, {summary.frozen:,} frozen")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="model-workbench",
        description="Fine-tune pretrained PyTorch models. With no command, opens the desktop app.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a project headless and write a run folder")
    p.add_argument("project", help="project file (.json)")
    p.add_argument("--epochs", type=int, help="total epochs (overrides train.epochs)")
    p.add_argument("--out", help="run folder to write (default: OUTPUT_DIR/NAME-TIMESTAMP)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("check", help="validate a project and summarise its dataset, without training")
    p.add_argument("project")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("backbones", help="list the backbone catalog and whether each weight is cached")
    p.add_argument("filter", nargs="?", help="show only names containing this text")
    p.set_defaults(func=cmd_backbones)

    p = sub.add_parser("layers", help="show a project's model as a layer tree with frozen/trainable counts")
    p.add_argument("project")
    p.add_argument("--depth", type=int, help="show modules down to this depth only")
    p.add_argument("--classes", type=int, help="number of outputs (default: from the project's dataset)")
    p.set_defaults(func=cmd_layers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (0 done, 2 bad input, 1 failure, 130 stopped)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return args.func(args)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a failure in training itself: say what, keep the trace for a bug report
        from engine.trainer import NonFiniteLossError

        if isinstance(exc, NonFiniteLossError):
            print(f"error: {exc}", file=sys.stderr)
        else:
            traceback.print_exc()
            print(f"error: training failed: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
