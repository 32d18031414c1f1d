"""Model Workbench's entry point: a subcommand runs the headless CLI; no arguments is meant for the desktop app."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from engine.cli import EXIT_BAD_INPUT, build_parser, main as cli_main

    if not argv:
        # The desktop app is its own piece of work; until it lands, say so rather than open a hollow window.
        print("The desktop app is not part of this version yet. Use a command:\n", file=sys.stderr)
        build_parser().print_help(sys.stderr)
        return EXIT_BAD_INPUT
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
