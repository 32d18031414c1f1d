"""What this machine has for a run: the memory available now (the caches size themselves by it), its devices."""

from __future__ import annotations


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None when it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def devices_here() -> dict[str, bool]:
    """Which of the project's train.device values this machine can run ("auto" and "cpu" always)."""
    import torch  # here, not at the top: the app's window asks only once the user looks at the device setting

    mps = getattr(torch.backends, "mps", None)
    return {
        "auto": True,
        "cpu": True,
        "cuda": bool(torch.cuda.is_available()),
        "mps": bool(mps is not None and mps.is_available()),
    }


def auto_device(here: dict[str, bool]) -> str:
    """What train.device 'auto' means on a machine with these devices: cuda, then mps, then cpu."""
    return "cuda" if here["cuda"] else "mps" if here["mps"] else "cpu"
