"""How PyTorch's OpenMP threads wait for work, chosen before PyTorch is imported.

OpenMP threads spin by default while they wait for the next parallel region. Every OS thread that runs a PyTorch
operation gets a team of its own (the app has several: the GUI thread, the training worker, background tasks),
and an idle team's spinning takes the cores from the team that has work. Measured on this project's 2-CPU
machine under load, 5 steps of resnet18 on 16 images of 32 px: 2.3 to 34 s in the main thread after a worker
thread had trained, against 1.4 s every time with passive waiting (the OS wakes the threads instead). Passive
waiting changes no result, only how idle threads wait. A value the user set is kept.
"""

from __future__ import annotations

import os


def prefer_passive_waiting() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless set; effective only before PyTorch (libgomp) is first imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
