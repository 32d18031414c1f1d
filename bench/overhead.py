"""Engine overhead: the engine's Trainer against a minimal hand-written PyTorch loop doing the same work.

Same model (the engine builds it; the hand loop trains a copy), same training dataset object and transforms,
same batch size, optimizer, loss, device and torch threads. The hand loop is what a person writes in a
notebook: a shuffled DataLoader, zero_grad / forward / loss / backward / step, and loss.item() for a running
mean. The engine's epoch adds its sampler, callbacks, NaN guard, schedule, accuracy and stop checks.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bench.common import Figure, Section, alternate, median

if TYPE_CHECKING:
    from engine.config import ProjectConfig


def write_images(root: Path, classes: int, per_class: int, size: int, seed: int = 0, height: int | None = None) -> Path:
    """Small PNGs of noisy colours (size x size, or size wide and height high), one folder per class: real files
    for a real input pipeline."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 255, size=3)
        for i in range(per_class):
            shape = (size if height is None else height, size, 3)
            pixels = np.clip(colour[None, None, :] + rng.integers(-40, 40, size=shape), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:04d}.png")
    return root


def project(
    data: Path, *, size: int, batch: int, backbone: str = "resnet18", epochs: int = 1, **sections: dict[str, Any]
) -> ProjectConfig:
    from engine.config import from_dict

    spec: dict[str, Any] = {
        "name": "bench",
        "data": {"path": str(data), "image_size": size, "val_fraction": 0.0},
        "model": {"backbone": backbone},
        "loader": {"batch_size": batch},
        "optimizer": {"name": "adam", "lr": 1e-3},
        "train": {"epochs": epochs, "device": "auto", "seed": 0},
        "output": {"tensorboard": False},
    }
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value}
    return from_dict(spec, base_dir=data.parent)


def run(quick: bool = False) -> Section:
    from engine.trainer import Trainer, build_run

    per_class, size, batch = (32, 32, 32) if quick else (128, 48, 32)
    repeats = 2 if quick else 5
    with tempfile.TemporaryDirectory() as tmp:
        data = write_images(Path(tmp) / "images", classes=4, per_class=per_class, size=size)
        cfg = project(data, size=size, batch=batch)
        parts = build_run(cfg)
        trainer = Trainer(cfg)
        trainer.parts = parts
        device = parts.device

        model = copy.deepcopy(parts.model)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss_fn = torch.nn.CrossEntropyLoss()
        loader = torch.utils.data.DataLoader(
            parts.data.train,
            batch_size=batch,
            shuffle=True,
            drop_last=False,
            num_workers=parts.train_loader.num_workers,
            pin_memory=device.type == "cuda",
        )

        def hand_loop() -> None:
            model.train()
            running = 0.0
            for inputs, targets in loader:
                inputs = inputs.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(inputs), targets)
                loss.backward()
                optimizer.step()
                running += loss.item()

        def engine_epoch() -> None:
            trainer.state.epoch = 0  # one more epoch of the same run each time
            trainer.state.epochs = 1
            trainer.run()

        times = alternate({"engine": engine_epoch, "hand": hand_loop}, repeats)
        samples = len(parts.data.train)
    engine_t, hand_t = median(times["engine"]), median(times["hand"])
    return Section(
        name="engine_overhead",
        title="Engine overhead: Trainer vs a hand-written loop",
        figures=[
            Figure(
                "engine_vs_hand",
                "Trainer samples/s ÷ hand-written loop samples/s",
                hand_t / engine_t,
                "x",
                ">= 0.97",
                detail=f"{samples / engine_t:.0f} vs {samples / hand_t:.0f} samples/s",
            )
        ],
        setup=(
            f"resnet18 (random init) on {samples} generated {size}x{size} PNGs, batch {batch}, Adam, one epoch "
            f"per repetition, {repeats} repetitions alternated, device {device}, "
            f"torch threads {torch.get_num_threads()}"
        ),
        notes=[
            "Both loops read the same Dataset object (the engine's, so the same decoding and transforms); the "
            "time is the training pass only (no validation set, no checkpoint files)."
        ],
    )


if __name__ == "__main__":
    print(json.dumps(run().to_dict(), indent=2))
