"""The benchmark runner: how figures read, the report files it writes, and the README table it keeps current.

Nothing here measures speed; the one run uses the GPU benchmark, which is skipped at once without CUDA.
"""

import json

import pytest
import torch

from bench import run as bench
from bench.common import Figure, Section

INFO = {
    "platform": "Linux-6.1-x86_64",
    "processor": "x86_64",
    "cpu_count": 16,
    "python": "3.12.1",
    "torch": "2.4.0",
    "torch_threads": 16,
    "gpu": "NVIDIA H200",
    "cpu": "AMD EPYC 9654",
}
RESULTS = {"machine": INFO, "date": "2025-03-01T10:00:00+00:00", "quick": False}


def sections():
    return [
        Section(
            "engine_overhead",
            "Engine overhead",
            [
                Figure("engine_vs_hand", "Trainer ÷ hand loop", 1.0512, "x", ">= 0.97", detail="980 vs 932 samples/s"),
                Figure("compile", "Compiled | eager", None, "x", ">= 0.97", detail="failed: RuntimeError: no compiler"),
            ],
            setup="resnet18, batch 64",
            notes=["Alternated, median."],
        ),
        Section(
            "latency",
            "Latency",
            [
                Figure("ui_ms", "Timer lateness", 35.4, "ms", "<= 50"),
                Figure("rss", "Peak memory", 812.3, "MiB"),
                Figure("growth", "Growth", 3.46, "%", "<= 2"),
            ],
        ),
        Section("gpu_paths", "GPU paths", skipped="no CUDA GPU on this machine"),
    ]


@pytest.mark.parametrize(
    "value, unit, text",
    [
        (1.0512, "x", "1.05x"),
        (0.9, "x", "0.90x"),
        (35.4, "ms", "35 ms"),
        (3.24, "ms", "3.2 ms"),
        (812.3, "MiB", "812 MiB"),
        (3.46, "%", "3.5%"),
        (2.414, "s", "2.41 s"),
        (None, "x", "–"),
    ],
)
def test_values_read_with_their_units(value, unit, text):
    assert bench.format_value(value, unit) == text


def test_targets_and_verdicts_read_as_symbols():
    assert bench.format_target(">= 0.97", "x") == "≥ 0.97x"
    assert bench.format_target("<= 50", "ms") == "≤ 50 ms"
    assert bench.format_target(None, "MiB") == "–"
    assert [bench.format_ok(v) for v in (True, False, None)] == ["✓", "✗", "–"]


def test_section_table_has_a_row_per_figure_and_escapes_cells():
    table = bench.section_table(sections()[0]).splitlines()
    assert table[0] == "| Figure | Value | Target | OK | Detail |"
    assert table[2] == "| Trainer ÷ hand loop | 1.05x | ≥ 0.97x | ✓ | 980 vs 932 samples/s |"
    # a missing value reads as a dash, with the reason kept; a '|' in a title does not split the row
    assert table[3] == "| Compiled \\| eager | – | ≥ 0.97x | – | failed: RuntimeError: no compiler |"
    assert bench.section_table(sections()[2]) == "Skipped: no CUDA GPU on this machine"


def test_report_names_the_machine_and_every_section():
    text = bench.results_markdown(RESULTS, sections())
    assert "AMD EPYC 9654 (16 CPUs" in text and "NVIDIA H200" in text and "2025-03-01" in text
    for title in ("## Engine overhead", "## Latency", "## GPU paths"):
        assert title in text
    assert "| Timer lateness | 35 ms | ≤ 50 ms | ✓ |  |" in text
    assert "| Growth | 3.5% | ≤ 2% | ✗ |  |" in text
    assert "Setup: resnet18, batch 64" in text and "- Alternated, median." in text
    assert "Skipped: no CUDA GPU on this machine" in text


def test_readme_block_lists_every_figure_and_links_the_report():
    block = bench.readme_block(RESULTS, sections(), "docs/bench/results.md")
    assert "| Engine overhead | Trainer ÷ hand loop | 1.05x | ≥ 0.97x | ✓ |" in block
    assert "| Latency | Peak memory | 812 MiB | – | – |" in block
    assert "| GPU paths | skipped: no CUDA GPU on this machine | – | – | – |" in block
    assert "[docs/bench/results.md](docs/bench/results.md)" in block and "NVIDIA H200" in block


def test_readme_text_between_markers_is_replaced_and_the_rest_kept(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nBefore.\n\n{bench.START}\nold table\n{bench.END}\n\nAfter.\n", encoding="utf-8")
    message = bench.update_readme(readme, "| new | table |")
    assert "updated" in message
    assert readme.read_text(encoding="utf-8") == (
        f"# Title\n\nBefore.\n\n{bench.START}\n| new | table |\n{bench.END}\n\nAfter.\n"
    )
    bench.update_readme(readme, "| newer |")  # again: still one block, between the same markers
    assert readme.read_text(encoding="utf-8").count("| new") == 1


@pytest.mark.parametrize(
    "text", ["# Title\n\nNo markers.\n", f"# Title\n{bench.END}\n{bench.START}\n", f"# Title\n{bench.START}\nno end\n"]
)
def test_readme_without_both_markers_is_left_alone(tmp_path, text):
    readme = tmp_path / "README.md"
    readme.write_text(text, encoding="utf-8")
    assert "no " in bench.update_readme(readme, "| new | table |")
    assert readme.read_text(encoding="utf-8") == text


def test_a_failing_benchmark_is_recorded_as_skipped_and_the_next_one_runs(monkeypatch):
    def boom(quick):
        raise RuntimeError("CUDA out of memory\nmore detail")

    monkeypatch.setitem(bench.RUNNERS, "boom", boom)
    monkeypatch.setitem(bench.RUNNERS, "fine", lambda quick: [Section("fine", "Fine", skipped=f"quick={quick}")])
    printed = []
    result = bench.run_sections(["boom", "fine"], True, echo=printed.append)
    assert [s.name for s in result] == ["boom", "fine"]
    assert result[0].skipped == "failed: RuntimeError: CUDA out of memory"
    assert result[1].skipped == "quick=True"
    assert len(printed) == 2 and "CUDA out of memory" in printed[0]


def test_quick_gpu_run_writes_the_report_files_and_the_readme(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the GPU section skips at once
    readme = tmp_path / "README.md"
    readme.write_text(f"Intro\n{bench.START}\n{bench.END}\nOutro\n", encoding="utf-8")
    out = tmp_path / "bench"

    assert bench.main(["--quick", "--only", "gpu", "--out", str(out), "--readme", str(readme), "--same-process"]) == 0

    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["quick"] is True and results["machine"]["cpu_count"] and results["date"]
    assert [s["name"] for s in results["sections"]] == ["gpu_paths"]
    assert results["sections"][0]["skipped"] == "no CUDA GPU on this machine"
    report = (out / "results.md").read_text(encoding="utf-8")
    assert report.startswith("# Benchmark results") and "Skipped: no CUDA GPU on this machine" in report
    text = readme.read_text(encoding="utf-8")
    assert text.startswith(f"Intro\n{bench.START}\n") and text.endswith(f"{bench.END}\nOutro\n")
    assert "skipped: no CUDA GPU on this machine" in text and "[bench/results.md](bench/results.md)" in text
    assert "GPU paths" in capsys.readouterr().out  # printed as it finished


def test_unknown_benchmark_name_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--only", "nonsense"])
    assert "nonsense" in capsys.readouterr().err


def test_a_section_comes_back_whole_from_its_json():
    for section in sections():
        data = json.loads(json.dumps(section.to_dict()))
        assert bench.section_from_dict(data) == section


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU section would really run in its own process")
def test_by_default_each_benchmark_runs_in_a_process_of_its_own(tmp_path, capfd):
    readme = tmp_path / "README.md"
    readme.write_text(f"{bench.START}\n{bench.END}\n", encoding="utf-8")
    out = tmp_path / "bench"

    assert bench.main(["--quick", "--only", "gpu", "--out", str(out), "--readme", str(readme)]) == 0

    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["same_process"] is False
    assert results["sections"][0]["name"] == "gpu_paths"
    assert results["sections"][0]["skipped"] == "no CUDA GPU on this machine"
    assert "Each benchmark ran in a fresh process of its own." in (out / "results.md").read_text(encoding="utf-8")
    assert "GPU paths" in capfd.readouterr().out  # the child printed it as it finished


def test_a_benchmark_whose_process_fails_is_recorded_as_skipped():
    printed = []
    # The child refuses a name it does not know (exit code 2): a process that ends without its sections.
    result = bench.run_isolated("no_such_benchmark", True, echo=printed.append)
    assert [s.name for s in result] == ["no_such_benchmark"]
    assert result[0].skipped.startswith("failed: its process exited with 2: ")
    assert "invalid choice" in result[0].skipped and "no_such_benchmark" in printed[0]


def _write_full_run(out, info, *, quick=False):
    out.mkdir(parents=True, exist_ok=True)
    old = {"machine": info, "date": "2026-01-02T03:04:05+00:00", "quick": quick, "same_process": False}
    old["sections"] = [bench._json_safe(s.to_dict()) for s in sections()]  # no 'measured': an older file
    (out / "results.json").write_text(json.dumps(old), encoding="utf-8")


def test_update_measures_one_benchmark_again_and_keeps_the_others_with_their_dates(tmp_path, monkeypatch):
    again = Section("latency", "Latency", [Figure("ui_ms", "Timer lateness", 12.0, "ms", "<= 50")])
    monkeypatch.setitem(bench.RUNNERS, "latency_bench", lambda quick: again)
    out, readme = tmp_path / "bench", tmp_path / "README.md"
    readme.write_text(f"{bench.START}\n{bench.END}\n", encoding="utf-8")
    _write_full_run(out, bench.machine())

    argv = ["--only", "latency_bench", "--update", "--same-process", "--out", str(out), "--readme", str(readme)]
    assert bench.main(argv) == 0

    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    # The re-measured section replaced the old one in its place; the others are the full run's, dated by it.
    assert [s["name"] for s in results["sections"]] == ["engine_overhead", "latency", "gpu_paths"]
    latency = results["sections"][1]
    assert [f["value"] for f in latency["figures"]] == [12.0]
    assert latency["measured"] > "2026-01-02T03:04:05+00:00"
    assert results["sections"][0]["measured"] == "2026-01-02T03:04:05+00:00"
    assert results["sections"][0]["figures"][0]["value"] == 1.0512
    assert results["date"] == "2026-01-02T03:04:05+00:00"
    assert [u["sections"] for u in results["updates"]] == [["latency"]]
    text = readme.read_text(encoding="utf-8")
    assert "2026-01-02; re-measured with `--update` on " in text and "UTC: latency" in text
    assert "| Engine overhead | Trainer ÷ hand loop | 1.05x |" in text and "| 12 ms |" in text
    assert "Measured 2026-01-02 03:04 UTC." in (out / "results.md").read_text(encoding="utf-8")


def test_update_from_another_machine_marks_its_sections_with_that_machine(tmp_path, monkeypatch, capsys):
    again = Section("latency", "Latency", [Figure("ui_ms", "Timer lateness", 12.0, "ms", "<= 50")])
    monkeypatch.setitem(bench.RUNNERS, "latency_bench", lambda quick: again)
    out, readme = tmp_path / "bench", tmp_path / "README.md"
    readme.write_text(f"{bench.START}\n{bench.END}\n", encoding="utf-8")
    _write_full_run(out, INFO)  # an H200 machine's figures

    argv = ["--only", "latency_bench", "--update", "--same-process", "--out", str(out), "--readme", str(readme)]
    assert bench.main(argv) == 0

    assert "Updating figures measured on " in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    here = bench.machine_line(bench.machine())
    assert results["machine"] == INFO and here != bench.machine_line(INFO)
    assert [s["name"] for s in results["sections"]] == ["engine_overhead", "latency", "gpu_paths"]
    assert [s["machine"] for s in results["sections"]] == ["", here, ""]
    assert results["updates"][0]["machine"] == here
    text = readme.read_text(encoding="utf-8")
    assert "| Latency (a) | Timer lateness | 12 ms |" in text and "| Engine overhead | Trainer ÷ hand loop |" in text
    assert f"(a) Measured on another machine: {here}." in text
    assert f"Measured on {bench.machine_line(INFO)}, 2026-01-02; re-measured with `--update` on " in text
    assert f" UTC on {here}: latency" in text
    assert f"UTC on {here}, not the machine above." in (out / "results.md").read_text(encoding="utf-8")


def test_update_does_not_mix_a_quick_run_with_a_full_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bench.RUNNERS, "latency_bench", lambda quick: Section("latency", "Latency"))
    out, readme = tmp_path / "bench", tmp_path / "README.md"
    _write_full_run(out, bench.machine(), quick=True)

    argv = ["--only", "latency_bench", "--update", "--same-process", "--out", str(out), "--readme", str(readme)]
    assert bench.main(argv) == 0

    assert "Not updating: " in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [s["name"] for s in results["sections"]] == ["latency"] and "updates" not in results


def test_update_without_only_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--update"])
    assert "--update needs --only" in capsys.readouterr().err
