"""`make bench`: run the engine's and the app's benchmarks, write docs/bench/results.{json,md}, update the README.

    python -m bench [--quick] [--out DIR] [--readme PATH] [--only NAME ...] [--update] [--same-process]

Each benchmark runs in a Python process of its own (this module again, with --child), so that none measures
in a process that an earlier one left with its threads, caches, allocator state and gigabytes of memory:
the app-overhead ratio read 0.75-0.82 after the engine's sections and 0.96-1.02 alone. --same-process runs
them all in this process instead. A benchmark that raises (or whose process dies) is recorded as skipped,
with the first line of its error, and the others still run.
--update re-measures the --only benchmarks and keeps every other section of the existing results.json, each
with the date it was measured: one section re-run on a quiet machine does not cost a full run, and the report
says which sections came from which run. Sections measured on another machine than the file's are marked in the
README's table and report, with that machine named (each ratio compares runs on one machine; absolute figures
of two machines do not compare). A quick run and a full one are never mixed.
The README's table goes between the markers <!-- bench:start --> and <!-- bench:end -->; without them the README
is left as it is.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import REPO, Figure, Section, machine

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _engine(module: str) -> Callable[[bool], Any]:
    return lambda quick: importlib.import_module(f"bench.{module}").run(quick)


def _app(name: str) -> Callable[[bool], Any]:
    # Qt is imported only when one of the app's benchmarks runs.
    return lambda quick: getattr(importlib.import_module("bench.gui"), name)(quick)


# Name on the command line (--only) -> a callable giving one Section or a list of them.
RUNNERS: dict[str, Callable[[bool], Any]] = {
    "overhead": _engine("overhead"),
    "feature_cache": _engine("feature_cache"),
    "phases": _engine("phases"),
    "lr_finder": _engine("lr_finder"),
    "input_pipeline": _engine("input_pipeline"),
    "hand_script": _engine("hand_script"),
    "dataset_scan": _engine("dataset_scan"),
    "decoded_cache": _engine("decoded_cache"),  # torchrun processes sharing the cache file
    "large_dataset": _engine("large_dataset"),
    "gpu": _engine("gpu"),
    "error_analysis": _engine("error_analysis"),  # Qt only for its grid, offscreen
    "audit": _engine("audit"),
    "webdataset": _engine("webdataset"),  # shards against the same images as a folder
    "startup": _app("startup"),
    "app_overhead": _app("app_overhead"),  # and the UI heartbeat
    "memory": _app("memory"),
    "plot_cost": _app("plot_cost"),
    "sweep_pruning": lambda quick: importlib.import_module("bench.sweep").pruning(quick),
    "sweep_kill": lambda quick: importlib.import_module("bench.sweep").kill(quick),
    "runs_table": lambda quick: importlib.import_module("bench.sweep").runs_table(quick),
    "runs_view": _engine("runs_view"),  # the app's Runs view (offscreen Qt): 200 folders, 20 long runs overlaid
}


# ---------------------------------------------------------------------------------------------
# Formatting: pure functions of Sections, Figures and plain values


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _digits(value: float) -> str:
    """Few digits for big numbers, more for small ones: 1234, 35, 3.2, 0.42."""
    size = abs(value)
    if size >= 10 or value == 0:
        return f"{value:.0f}"
    if size >= 1:
        return f"{value:.1f}"
    return f"{value:.2g}"


def _suffix(unit: str) -> str:
    return unit if unit in ("x", "%") else f" {unit}" if unit else ""


def format_value(value: float | None, unit: str) -> str:
    """A figure's value with its unit: '1.05x', '35 ms', '2.41 s', '180 MiB', '3.5%'; '–' when there is none."""
    if value is None:
        return "–"
    if not math.isfinite(value):
        return str(value)
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "%":
        return f"{value:.1f}%"
    if unit in ("ms", "MiB"):
        return f"{_digits(value)} {unit}"
    return f"{value:.3g}{_suffix(unit)}"


def format_target(target: str | None, unit: str) -> str:
    """'>= 0.97' with unit 'x' reads '≥ 0.97x'; no target reads '–'."""
    if not target:
        return "–"
    op, bound = target.split()
    symbol = {">=": "≥", "<=": "≤"}.get(op, op)
    return f"{symbol} {bound}{_suffix(unit)}"  # the bound as the benchmark wrote it


def format_ok(ok: bool | None) -> str:
    return "–" if ok is None else ("✓" if ok else "✗")


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def figure_row(figure: Figure) -> list[str]:
    """The cells figure | value | target | ok | detail."""
    return [
        figure.title,
        format_value(figure.value, figure.unit),
        format_target(figure.target, figure.unit),
        format_ok(figure.ok),
        figure.detail,
    ]


def section_table(section: Section) -> str:
    """The section's figures as a Markdown table, or one line saying why it was skipped."""
    if section.skipped:
        return f"Skipped: {section.skipped}"
    if not section.figures:
        return "No figures."
    lines = [_row(["Figure", "Value", "Target", "OK", "Detail"]), "|---|---:|---|:-:|---|"]
    lines += [_row(figure_row(f)) for f in section.figures]
    return "\n".join(lines)


def machine_line(info: dict[str, Any]) -> str:
    """One line naming the machine: CPU and count, GPU, system, Python and torch."""
    cpu = info.get("cpu") or info.get("processor") or "unknown CPU"
    parts = [
        f"{cpu} ({info.get('cpu_count')} CPUs, {info.get('torch_threads')} torch threads)",
        info.get("gpu") or "no GPU",
        str(info.get("platform", "")),
        f"Python {info.get('python')}",
        f"torch {info.get('torch')}",
    ]
    return ", ".join(p for p in parts if p)


def _when(results: dict[str, Any]) -> str:
    mode = " (quick run)" if results.get("quick") else ""
    when = f"{str(results.get('date', ''))[:10]}{mode}"
    for update in results.get("updates", []):
        stamp = str(update.get("date", ""))[:16].replace("T", " ")
        where = f" on {update['machine']}" if update.get("machine") else ""
        when += f"; re-measured with `--update` on {stamp} UTC{where}: {', '.join(update.get('sections', []))}"
    return when


def other_machines(sections: Sequence[Section]) -> list[str]:
    """The machines other than the file's own that some sections were measured on, in the order they appear."""
    return list(dict.fromkeys(s.machine for s in sections if s.machine))


def _letter(index: int) -> str:
    """a, b, ... z, then 27, 28, ...: the footnote of the index-th other machine."""
    return chr(ord("a") + index) if index < 26 else str(index + 1)


def _mark(section: Section, machines: Sequence[str]) -> str:
    """The footnote mark of a section measured on another machine: (a), (b), ... as listed under the table."""
    return f" ({_letter(machines.index(section.machine))})" if section.machine else ""


def same_machine(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two results came from the same kind of machine (figures compare only within one)."""
    keys = ("cpu", "processor", "cpu_count", "torch_threads", "gpu", "python", "torch")
    return all(a.get(k) == b.get(k) for k in keys)


def merge_sections(kept: Sequence[Section], fresh: Sequence[Section]) -> list[Section]:
    """kept with each section that fresh measured again replaced in its place; fresh sections new to kept last."""
    by_name = {s.name: s for s in fresh}
    merged = [by_name.pop(s.name, s) for s in kept]
    return merged + [s for s in fresh if s.name in by_name]


def results_markdown(results: dict[str, Any], sections: Sequence[Section]) -> str:
    """The whole report: the machine, then each section's table, setup and notes."""
    out = [
        "# Benchmark results",
        "",
        f"Measured on {machine_line(results['machine'])}, {_when(results)}, with `make bench`.",
        "",
        "Each ratio compares two candidates run alternately in the same process (median of the repetitions); "
        "compare figures only with figures from the same machine. "
        + (
            "All benchmarks ran in one process (--same-process)."
            if results.get("same_process")
            else "Each benchmark ran in a fresh process of its own."
        ),
        "",
    ]
    for section in sections:
        out += [f"## {section.title}", "", section_table(section), ""]
        if results.get("updates") and section.measured:
            where = f" on {section.machine}, not the machine above" if section.machine else ""
            out += [f"Measured {section.measured[:16].replace('T', ' ')} UTC{where}.", ""]
        if section.setup:
            out += [f"Setup: {section.setup}", ""]
        if section.notes:
            out += [f"- {note}" for note in section.notes] + [""]
    return "\n".join(out).rstrip() + "\n"


def readme_block(results: dict[str, Any], sections: Sequence[Section], link: str) -> str:
    """The README's compact table of every figure, with the machine, the date and a link to the full report."""
    machines = other_machines(sections)
    lines = [_row(["Section", "Figure", "Value", "Target", "OK"]), "|---|---|---:|---|:-:|"]
    for section in sections:
        title = section.title + _mark(section, machines)
        if section.skipped:
            lines.append(_row([title, f"skipped: {section.skipped}", "–", "–", "–"]))
            continue
        for f in section.figures:
            lines.append(
                _row(
                    [
                        title,
                        f.title,
                        format_value(f.value, f.unit),
                        format_target(f.target, f.unit),
                        format_ok(f.ok),
                    ]
                )
            )
    lines += [
        "",
        f"Measured on {machine_line(results['machine'])}, {_when(results)}; setup and notes in [{link}]({link}).",
    ]
    for i, other in enumerate(machines):
        lines += ["", f"({_letter(i)}) Measured on another machine: {other}."]
    return "\n".join(lines)


def replace_between_markers(text: str, block: str) -> str | None:
    """text with what lies between the bench markers replaced by block; None when the markers are missing."""
    start = text.find(START)
    end = text.find(END, start + len(START)) if start >= 0 else -1
    if start < 0 or end < 0:
        return None
    return f"{text[: start + len(START)]}\n{block.strip()}\n{text[end:]}"


def update_readme(path: Path, block: str) -> str:
    """Put block between the README's markers; the message says what was done."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return f"{path}: not updated ({_first_line(exc)})"
    new = replace_between_markers(text, block)
    if new is None:
        return f"{path}: no {START} ... {END} markers, left as it is"
    if new != text:
        path.write_text(new, encoding="utf-8")
    return f"{path}: benchmark table updated"


def section_text(section: Section, seconds: float) -> str:
    """A section as plain text for the console, as soon as it has finished."""
    head = f"== {section.title} ({seconds:.0f} s)"
    if section.skipped:
        return f"{head}\n   skipped: {section.skipped}"
    lines = [head]
    for f in section.figures:
        target = "" if not f.target else f"  [{format_target(f.target, f.unit)} {format_ok(f.ok)}]"
        detail = f"  ({f.detail})" if f.detail else ""
        lines.append(f"   {f.title}: {format_value(f.value, f.unit)}{target}{detail}")
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    """NaN and infinities become null: results.json stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Running


def run_sections(names: Sequence[str], quick: bool, *, echo: Callable[[str], None] = print) -> list[Section]:
    """Every named benchmark in turn; one that raises becomes a skipped Section and the next one runs."""
    sections: list[Section] = []
    for name in names:
        started = time.perf_counter()
        try:
            result = RUNNERS[name](quick)
            produced = [result] if isinstance(result, Section) else list(result)
        except Exception as exc:
            produced = [Section(name=name, title=f"{name} (failed)", skipped=f"failed: {_first_line(exc)}")]
        seconds = time.perf_counter() - started
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for section in produced:
            section.measured = section.measured or stamp
            echo(section_text(section, seconds))
        sections.extend(produced)
    return sections


def _previous_results(path: Path, info: dict[str, Any], quick: bool) -> dict[str, Any] | str:
    """The results file that --update adds to, or why it cannot be added to."""
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{path} does not exist"
    except (OSError, ValueError) as exc:
        return f"{path} cannot be read ({_first_line(exc)})"
    if not isinstance(previous, dict) or not isinstance(previous.get("sections"), list):
        return f"{path} holds no benchmark sections"
    if not isinstance(previous.get("machine"), dict):
        return f"{path} does not say which machine measured it"
    if bool(previous.get("quick")) != quick:
        return f"{path} is a {'quick' if previous.get('quick') else 'full'} run and this one is not"
    return previous


def section_from_dict(data: dict[str, Any]) -> Section:
    """A Section back from its to_dict() (what a benchmark's own process hands back)."""
    figures = [Figure(**f) for f in data.get("figures", [])]
    return Section(**{**data, "figures": figures})


def run_isolated(name: str, quick: bool, *, echo: Callable[[str], None] = print) -> list[Section]:
    """One benchmark in a fresh Python process: its sections, or one skipped section saying why it has none."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        out = Path(tmp) / "sections.json"
        command = [sys.executable, "-m", "bench.run", "--child", str(out), "--only", name]
        started = time.perf_counter()
        # The child prints its sections as they finish, on this process's console.
        proc = subprocess.run(command + (["--quick"] if quick else []), cwd=REPO, stderr=subprocess.PIPE, text=True)
        if proc.returncode == 0 and out.is_file():
            return [section_from_dict(d) for d in json.loads(out.read_text(encoding="utf-8"))]
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    why = f"its process exited with {proc.returncode}" + (f": {lines[-1]}" if lines else "")
    section = Section(name=name, title=f"{name} (failed)", skipped=f"failed: {why}")
    echo(section_text(section, time.perf_counter() - started))
    return [section]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and smaller sizes (a smoke run)")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "docs" / "bench",
        help="folder for results.json and results.md (default docs/bench)",
    )
    parser.add_argument(
        "--readme",
        type=Path,
        default=REPO / "README.md",
        help="file whose bench markers receive the table (default README.md)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        action="extend",
        choices=list(RUNNERS),
        metavar="NAME",
        help=f"run only these benchmarks: {', '.join(RUNNERS)}",
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="with --only: keep the other sections of the existing results.json, each with the date it was "
        "measured (and its machine, where that is not the file's)",
    )
    parser.add_argument(
        "--same-process",
        action="store_true",
        help="run every benchmark in this process rather than each in a fresh one",
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # run_isolated's process: sections to FILE
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before the app's benchmarks import Qt
    names = list(dict.fromkeys(args.only)) if args.only else list(RUNNERS)
    if args.update and not args.only:
        _parser().error("--update needs --only NAME ...: the benchmarks to measure again")

    def echo(text: str) -> None:
        print(text, flush=True)

    if args.child is not None:
        sections = run_sections(names, args.quick, echo=echo)
        args.child.write_text(json.dumps([_json_safe(s.to_dict()) for s in sections]), encoding="utf-8")
        return 0
    info = machine()
    how = "in this process" if args.same_process else "each in its own process"
    print(
        f"Benchmarks on {machine_line(info)}{' (quick)' if args.quick else ''}, {how}: {', '.join(names)}",
        flush=True,
    )
    if args.same_process:
        sections = run_sections(names, args.quick, echo=echo)
    else:
        sections = [s for name in names for s in run_isolated(name, args.quick, echo=echo)]
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results: dict[str, Any] = {
        "machine": info,
        "date": now,
        "quick": args.quick,
        "same_process": args.same_process,
    }
    out: Path = args.out
    if args.update:
        previous = _previous_results(out / "results.json", info, args.quick)
        if isinstance(previous, str):
            print(f"Not updating: {previous}; writing the new sections alone", flush=True)
        else:
            fresh = [s.name for s in sections]
            kept = [section_from_dict(d) for d in previous.get("sections", [])]
            for section in kept:  # a file written before sections carried dates: its run's date
                section.measured = section.measured or str(previous.get("date", ""))
            update: dict[str, Any] = {"date": now, "sections": fresh}
            if not same_machine(previous.get("machine", {}), info):
                # Each ratio compares two runs on one machine, so a section still reads alone; the table marks the
                # sections from another machine and names it, and no figure is compared across the two.
                print(
                    f"Updating figures measured on {machine_line(previous.get('machine', {}))}: the new sections "
                    "are marked as measured on this machine",
                    flush=True,
                )
                update["machine"] = machine_line(info)
                for section in sections:
                    section.machine = machine_line(info)
            sections = merge_sections(kept, sections)
            updates = [*previous.get("updates", []), update]
            results.update(
                machine=previous.get("machine", info),
                date=previous.get("date", now),
                same_process=previous.get("same_process"),
                updates=updates,
            )
    results["sections"] = [s.to_dict() for s in sections]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps(_json_safe(results), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    report = out / "results.md"
    report.write_text(results_markdown(results, sections), encoding="utf-8")
    print(f"Wrote {out / 'results.json'} and {report}")
    readme: Path = args.readme
    link = Path(os.path.relpath(report.resolve(), readme.resolve().parent)).as_posix()
    print(update_readme(readme, readme_block(results, sections, link)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
