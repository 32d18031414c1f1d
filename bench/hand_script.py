"""Whole pipeline: `main.py train` against the torchvision script a person writes for the same training.

The engine-overhead benchmark feeds both loops the same Dataset object, so it cannot see the input path. Here
each side does all of its own work on a generated folder of small PNGs, from the folder to the trained weights
on disk:

  script:    torchvision's ImageFolder with Resize / CenterCrop / ToTensor / Normalize, a shuffled DataLoader,
             resnet18 with the same modules frozen, Adam, the usual loop, and torch.save of the weights;
  main.py:   `main.py train PROJECT` run in this process (engine.cli.main), which scans and checks the folder,
             builds the model, trains and writes its run folder (log, metrics, checkpoints).

The project is trained twice: with loader.decoded_cache and train.feature_cache off (the input path and loop
the script has too), and with the workbench's defaults (both caches on their automatic setting).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.common import Figure, Section, alternate, median
from bench.overhead import write_images

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def write_folder(root: Path, classes: int, per_class: int, width: int, height: int, seed: int = 0) -> Path:
    """Small RGB PNGs of noisy colours (width x height), one folder per class (the other benchmarks' images)."""
    return write_images(root, classes, per_class, width, seed=seed, height=height)


def write_project(
    path: Path, data: Path, runs: Path, *, size: int, batch: int, epochs: int, freeze_up_to: str, caches: bool
) -> Path:
    """The project file `main.py train` gets: no validation split (the script has none), the rest as by default."""
    from engine.config import from_dict, save_project

    spec: dict[str, Any] = {
        "name": "hand-script-bench",
        "data": {"path": str(data), "image_size": size, "val_fraction": 0.0, "mean": list(MEAN), "std": list(STD)},
        "model": {"backbone": "resnet18", "freeze": "up_to", "freeze_up_to": freeze_up_to},
        "loader": {"batch_size": batch},
        "optimizer": {"name": "adam", "lr": 1e-3},
        "train": {"epochs": epochs, "device": "cpu", "seed": 0},
        "output": {"dir": str(runs), "tensorboard": False},
    }
    if not caches:
        spec["loader"]["decoded_cache"] = "off"
        spec["train"]["feature_cache"] = "off"
    save_project(from_dict(spec, base_dir=path.parent), path)
    return path


def freeze_up_to_child(model: torch.nn.Module, name: str) -> list[torch.nn.Module]:
    """Freeze the model's top-level modules up to and including `name`, as a script does; returns them."""
    frozen = []
    for child_name, module in model.named_children():
        frozen.append(module)
        module.requires_grad_(False)
        if child_name == name:
            return frozen
    raise ValueError(f"{type(model).__name__} has no top-level module {name!r}")


def hand_script(data: Path, out: Path, *, size: int, batch: int, epochs: int, freeze_up_to: str, workers: int) -> float:
    """The script a person writes with torchvision for the same training; returns the last epoch's mean loss."""
    import torchvision
    from torchvision import transforms as T

    torch.manual_seed(0)
    transform = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(MEAN, STD)])
    dataset = torchvision.datasets.ImageFolder(str(data), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers)
    model = torchvision.models.resnet18(num_classes=len(dataset.classes))
    frozen = freeze_up_to_child(model, freeze_up_to)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    mean_loss = float("nan")
    for _ in range(epochs):
        model.train()
        for module in frozen:
            module.eval()  # frozen BatchNorm keeps its statistics, as the workbench does
        total, count = 0.0, 0
        for inputs, targets in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(targets)
            count += len(targets)
        mean_loss = total / count
    torch.save(model.state_dict(), out / "model.pt")
    return mean_loss


def main_py_train(project: Path) -> None:
    """`main.py train PROJECT` in this process, its console output kept out of the benchmark's."""
    from engine import feature_cache
    from engine.cli import main as cli_main

    feature_cache.clear()  # a fresh `main.py train` process starts with no features computed
    console = io.StringIO()
    with contextlib.redirect_stderr(console), contextlib.redirect_stdout(console):
        code = cli_main(["train", str(project)])
    if code != 0:
        raise RuntimeError(f"main.py train {project.name} exited with {code}: {console.getvalue()[-2000:]}")


def run(quick: bool = False) -> Section:
    from engine.config import load_project
    from engine.samplers import plan_loader

    # quick: a smoke run of the whole benchmark in seconds (tests/bench), its ratios meaningless.
    per_class, size, epochs, repeats, warmup = (4, 32, 1, 1, 0) if quick else (64, 64, 3, 5, 1)
    # Everything before the head frozen (a linear probe): with the defaults, the feature cache then computes
    # the backbone's output once, and later epochs train the head alone.
    width, height, batch, freeze_up_to = 96, 80, 32, "layer4"
    work = Path(tempfile.mkdtemp(prefix="bench-hand-script-"))
    try:
        data = write_folder(work / "images", classes=4, per_class=per_class, width=width, height=height)
        runs = work / "runs"
        settings = {"size": size, "batch": batch, "epochs": epochs, "freeze_up_to": freeze_up_to}
        off = write_project(work / "caches-off.json", data, runs, caches=False, **settings)
        on = write_project(work / "defaults.json", data, runs, caches=True, **settings)
        # The script gets the worker count main.py chooses for the uncached folder, so that the two compare
        # their input paths and loops rather than a worker count.
        workers = plan_loader(load_project(off).loader, cached=False, augmented=False).workers
        script_out = work / "script"
        script_out.mkdir()

        def clean() -> None:  # untimed: the run folders and weights of the last call
            shutil.rmtree(runs, ignore_errors=True)
            for f in script_out.iterdir():
                f.unlink()

        times = alternate(
            {
                "script": functools.partial(hand_script, data, script_out, workers=workers, **settings),
                "off": functools.partial(main_py_train, off),
                "defaults": functools.partial(main_py_train, on),
            },
            repeats,
            warmup=warmup,
            between=clean,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    images = 4 * per_class
    script_t, off_t, on_t = median(times["script"]), median(times["off"]), median(times["defaults"])

    def spread(name: str) -> str:
        values = times[name]
        return f"{min(values):.2f}-{max(values):.2f} s"

    return Section(
        name="hand_script",
        title="Whole pipeline: `main.py train` vs a hand-written torchvision script",
        figures=[
            Figure(
                "main_vs_script_caches_off",
                "Script run time ÷ `main.py train` run time, caches off (throughput ratio)",
                script_t / off_t,
                "x",
                ">= 0.97",
                detail=f"median {off_t:.2f} s main.py ({spread('off')}), {script_t:.2f} s script ({spread('script')})",
            ),
            Figure(
                "main_vs_script_defaults",
                "Script run time ÷ `main.py train` run time, the workbench's defaults",
                script_t / on_t,
                "x",
                ">= 1",
                detail=f"median {on_t:.2f} s main.py ({spread('defaults')}): decoded-image and feature caches on",
            ),
        ],
        setup=(
            f"{images} generated {width}x{height} PNGs in 4 class folders, resnet18 (random init) frozen up to "
            f"{freeze_up_to}, {size} px, batch {batch}, Adam, {epochs} epochs, no validation split, CPU, "
            f"{workers} loader worker(s) on both sides, torch threads {torch.get_num_threads()}; "
            f"{repeats} repetitions of the three alternated, medians"
        ),
        notes=[
            "Each side times its whole run: reading the folder, building the model, the epochs, and writing "
            "the weights (main.py also checks every image once, and writes its log, metrics and checkpoints).",
            "With the defaults, the decoded-image cache keeps the resized images after one decoding and the "
            "feature cache computes the frozen layers once, so later epochs train only what follows the cut.",
        ],
    )


if __name__ == "__main__":
    print(json.dumps(run().to_dict(), indent=2))
