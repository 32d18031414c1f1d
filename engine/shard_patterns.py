"""Shard patterns of data.kind = "webdataset" (brace patterns, lists, URLs), without PyTorch: the project's checks
and the app's panel use them on their own thread."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def is_remote(pattern: str) -> bool:
    """A URL or a pipe: command that webdataset opens (not a local path resolved against the project)."""
    return "://" in pattern or pattern.startswith("pipe:")


def expand_pattern(pattern: str) -> list[str]:
    """The shards a pattern names: brace patterns (`shards/train-{000000..000009}.tar`), several joined by `::` or
    spaces; each a local path or a URL. Raises ValueError for a pattern braceexpand cannot expand."""
    from braceexpand import braceexpand  # small and pure Python

    urls: list[str] = []
    for word in pattern.replace("::", " ").split():
        try:
            urls += list(braceexpand(word))
        except Exception as exc:  # noqa: BLE001 - braceexpand's own errors say what is wrong
            raise ValueError(str(exc) or type(exc).__name__) from None
    return urls


def resolve_pattern(resolve: Callable[[str], Path | None], pattern: str) -> str:
    """Local paths made absolute (by the project's resolve); URLs as they are."""
    words = []
    for word in pattern.replace("::", " ").split():
        resolved = None if is_remote(word) else resolve(word)
        words.append(word if resolved is None else str(resolved))
    return " ".join(words)
