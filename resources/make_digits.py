"""Regenerates resources/sample_data/digits from scikit-learn's copy of the UCI handwritten digits (CC BY 4.0)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parent / "sample_data" / "digits"


def main() -> None:
    digits = load_digits()
    if OUT.exists():
        shutil.rmtree(OUT)
    for index, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = OUT / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        # The originals are 8x8 counts of 0..16 set pixels in 4x4 blocks; scale to 8-bit grey.
        pixels = np.round(image * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{index:04d}.png", optimize=True)
    print(f"wrote {len(digits.target)} images in {len(set(digits.target))} classes to {OUT}")


if __name__ == "__main__":
    main()
