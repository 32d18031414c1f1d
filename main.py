"""Model Workbench's entry point: no arguments (or a project file) opens the desktop app; a subcommand runs the CLI."""

from __future__ import annotations

import sys
from pathlib import Path

from engine.openmp_env import prefer_passive_waiting

prefer_passive_waiting()  # before anything imports PyTorch; the processes it starts (torchrun) inherit it


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and (argv[0].startswith("-") or not argv[0].lower().endswith(".json")):
        from engine.cli import main as cli_main  # a subcommand: headless, no Qt imported

        return cli_main(argv)
    if len(argv) > 1:
        print(
            f"usage: main.py [PROJECT.json]  (or main.py COMMAND ...; see main.py --help); got {' '.join(argv)}",
            file=sys.stderr,
        )
        return 2
    from app.launch import display_problem

    project = argv[0] if argv else None
    problem = display_problem()
    if problem is None:
        from app.launch import run_app

        return run_app(project)
    target = project or str(Path(__file__).resolve().parent / "examples" / "default.json")
    print(
        f"The desktop app cannot open a window: {problem}\n"
        f"Running the project headless instead: python main.py train {target}\n",
        file=sys.stderr,
        flush=True,
    )
    from engine.cli import main as cli_main

    return cli_main(["train", target])


if __name__ == "__main__":
    sys.exit(main())
