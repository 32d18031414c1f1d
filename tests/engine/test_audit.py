"""The dataset audit against ground truth: the bundled digits with flipped labels and injected duplicates."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.audit import (
    THUMB,
    AuditOptions,
    AuditStopped,
    finding_status,
    leakage_fix,
    near_pairs,
    neighbour_candidates,
    normalise,
    pixel_residual,
    run_audit,
    thumbnail,
)
from engine.config import load_project
from tests.conftest import ROOT, write_image_folder, write_project

DIGITS = ROOT / "resources" / "sample_data" / "digits"
PER_CLASS_TRAIN, PER_CLASS_VAL = 25, 8


def _pairs(findings, kind):
    """Every unordered pair of images that share a finding of this kind."""
    out = set()
    for f in findings:
        if f.kind == kind:
            keys = sorted(f.keys)
            out |= {(a, b) for i, a in enumerate(keys) for b in keys[i + 1 :]}
    return out


def _near_copy(src: Path, rng: np.random.Generator) -> Image.Image:
    """A resized (2-4x) and JPEG-recompressed copy, decoded again: other pixels, the same picture."""
    image = Image.open(src).convert("L")
    factor = int(rng.integers(2, 5))
    big = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    buffer = io.BytesIO()
    big.convert("RGB").save(buffer, "JPEG", quality=int(rng.choice([85, 90, 95])))
    return Image.open(io.BytesIO(buffer.getvalue()))


def _snapshot(root: Path) -> dict[Path, tuple[int, int]]:
    """Every file and folder of the dataset and the project, with its size and modification time."""
    paths = [root / "project.json", *(root / "train").rglob("*"), *(root / "val").rglob("*")]
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in paths}


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    """A CI-sized digits dataset with a separate validation folder, and what was done to it."""
    root = tmp_path_factory.mktemp("audit-digits")
    rng = np.random.default_rng(17)
    train, val = root / "train", root / "val"
    originals: dict[str, list[Path]] = {}
    for cls in sorted(p.name for p in DIGITS.iterdir()):
        files = sorted((DIGITS / cls).glob("*.png"))
        chosen = [files[i] for i in sorted(rng.choice(len(files), PER_CLASS_TRAIN + PER_CLASS_VAL, replace=False))]
        for side, part in ((train, chosen[:PER_CLASS_TRAIN]), (val, chosen[PER_CLASS_TRAIN:])):
            (side / cls).mkdir(parents=True)
            for f in part:
                shutil.copy(f, side / cls / f.name)
        originals[cls] = [train / cls / f.name for f in chosen[:PER_CLASS_TRAIN]]
    train_files = [f for cls in sorted(originals) for f in originals[cls]]
    order = rng.permutation(len(train_files))
    n_flip = round(0.05 * len(train_files))
    flip_src = [train_files[i] for i in order[:n_flip]]
    exact_src = [train_files[i] for i in order[n_flip : n_flip + 24]]
    near_src = [train_files[i] for i in order[n_flip + 24 : n_flip + 48]]

    def key(p: Path) -> str:
        return Path(os.path.relpath(p, train)).as_posix()

    exact_pairs, near_pairs, within = set(), set(), set()
    for j, src in enumerate(exact_src):
        # 20 across the split (into validation), 4 within training; half re-encoded (other bytes, same pixels)
        dest = (val if j < 20 else train) / src.parent.name / f"copy_{src.name}"
        if j % 2:
            Image.open(src).convert("RGB").save(dest)
        else:
            shutil.copy(src, dest)
        (exact_pairs if j < 20 else within).add(tuple(sorted((key(src), key(dest)))))
    for j, src in enumerate(near_src):
        dest = (val if j < 20 else train) / src.parent.name / f"near_{src.stem}.jpg"
        _near_copy(src, rng).save(dest, quality=95)
        (near_pairs if j < 20 else within).add(tuple(sorted((key(src), key(dest)))))
    flipped = []
    for src in flip_src:
        wrong = str((int(src.parent.name) + int(rng.integers(1, 10))) % 10)
        dest = train / wrong / src.name
        src.rename(dest)
        flipped.append(key(dest))
    project = write_project(
        root / "project.json",
        "train",
        data={"val_path": "val", "image_size": 16},
        model={"backbone": "resnet18", "weights": None},
    )
    before = _snapshot(root)
    cache = root / "mwb" / "audit"  # what the CLI uses with MWB_CACHE_DIR = root / "mwb"
    report = run_audit(load_project(project), cache=cache)
    return {
        "root": root,
        "project": project,
        "report": report,
        "exact": exact_pairs,
        "near": near_pairs,
        "within": within,
        "flipped": flipped,
        "before": before,
        "cache": cache,
    }


def test_finds_injected_duplicates_leakage_and_flipped_labels(truth):
    report = truth["report"]
    exact_found = _pairs(report.findings, "exact_duplicate")
    near_found = _pairs(report.findings, "near_duplicate")
    assert len(truth["exact"] & exact_found) >= 0.9 * len(truth["exact"])
    injected_near = truth["near"] | {p for p in truth["within"] if "near_" in p[0] + p[1]}
    assert len(truth["near"] & near_found) >= 0.8 * len(truth["near"])
    assert len(near_found & injected_near) >= 0.9 * len(near_found)  # precision

    leak_found = {tuple(sorted(p)) for f in report.of_kind("leakage") for p in f.detail["pairs"]}
    across = truth["exact"] | truth["near"]
    assert len(across & leak_found) >= 0.8 * len(across)
    assert len(across & leak_found) >= 0.9 * len(leak_found)  # precision

    ranked = sorted(report.of_kind("label_issue"), key=lambda f: -f.score)
    top = {f.keys[0] for f in ranked[: 2 * len(truth["flipped"])]}
    assert len(top & set(truth["flipped"])) >= 0.7 * len(truth["flipped"])
    issue = next(f for f in ranked if f.keys[0] in truth["flipped"])
    assert issue.detail["given"] == Path(issue.keys[0]).parent.name
    assert issue.detail["suggested"] != issue.detail["given"]


def test_exact_and_near_duplicates_told_apart(truth):
    report = truth["report"]
    exact_found = _pairs(report.findings, "exact_duplicate")
    near_found = _pairs(report.findings, "near_duplicate")
    assert not exact_found & near_found
    assert not near_found & truth["exact"]  # an exact copy is never reported as near as well
    assert not exact_found & truth["near"]  # a recompressed copy has other pixels
    hows = {f.detail["how"] for f in report.of_kind("leakage") if set(f.keys) & {k for p in truth["near"] for k in p}}
    assert hows == {"near"}
    limit = AuditOptions().pixel_residual
    copies = [f for f in report.of_kind("near_duplicate") if any("near_" in k for k in f.keys)]
    assert copies and all(f.detail["pixel_residual"] <= limit for f in copies)  # the pixels agree


def test_pixel_check_tells_a_resized_copy_from_another_writers_digit():
    """Many natural 8x8 1s are as close in the embedding as a copy is to its source: the pixel check must pass
    every resized + recompressed copy and no pair of two different handwritten 1s (all 182 of them)."""
    files = sorted((DIGITS / "1").glob("*.png"))
    thumbs = [thumbnail(np.asarray(Image.open(f).convert("RGB"))) for f in files]
    limit = AuditOptions().pixel_residual
    natural = [pixel_residual(thumbs[i], 8, thumbs[j], 8) for i, j in combinations(range(len(files)), 2)]
    assert len(natural) == 182 * 181 // 2 and min(natural) > limit
    rng = np.random.default_rng(5)
    for f, source in zip(files[:20], thumbs[:20], strict=True):
        copy = np.asarray(_near_copy(f, rng).convert("RGB"))  # 16 to 32 px
        assert pixel_residual(thumbnail(copy), min(THUMB, *copy.shape[:2]), source, 8) <= limit


def test_leakage_only_across_the_split(truth):
    report = truth["report"]
    within = truth["within"]
    found_within = _pairs(report.findings, "exact_duplicate") | _pairs(report.findings, "near_duplicate")
    assert within & found_within  # the within-training twins are found as duplicates...
    for finding in report.of_kind("leakage"):
        assert finding.detail["val_keys"] and finding.detail["train_keys"]
        assert all(k.startswith("../val/") for k in finding.detail["val_keys"])
        assert not any(k.startswith("../val/") for k in finding.detail["train_keys"])
        assert not {tuple(sorted(p)) for p in finding.detail["pairs"]} & within  # ...but are no leakage
    n_val = sum(1 for _ in (truth["root"] / "val").rglob("*.*"))
    assert report.leakage["val_total"] == n_val
    assert report.leakage["val_with_twin"] == len(leakage_fix(report))


def test_audit_changes_nothing_but_its_cache_and_reuses_it(truth):
    root, cache = truth["root"], truth["cache"]
    assert _snapshot(root) == truth["before"]
    files = sorted(p.name for p in cache.iterdir())
    assert [f.split("-")[0] for f in files] == ["embeddings", "report"]
    again = run_audit(load_project(truth["project"]), cache=cache)
    assert again.from_cache and again.findings == truth["report"].findings
    recomputed = run_audit(load_project(truth["project"]), cache=cache, use_cached_report=False)
    assert "embeddings from the cache" in recomputed.embedder
    assert recomputed.findings == truth["report"].findings


def test_exclusions_from_the_audit_change_what_training_reads(truth):
    from engine.backbones import preprocess_for
    from engine.config import save_project
    from engine.corrections import with_excluded, with_relabel
    from engine.data import prepare_data

    cfg = load_project(truth["project"])
    report = truth["report"]
    fix = leakage_fix(report)
    issue = max(report.of_kind("label_issue"), key=lambda f: f.score)
    fixed = with_relabel(with_excluded(cfg, fix), issue.keys[0], issue.detail["suggested"])
    saved = truth["root"] / "fixed.json"  # beside the original: its data paths are relative
    save_project(fixed, saved)
    reopened = load_project(saved)
    assert reopened.data.exclude == fix and reopened.data.relabel == {issue.keys[0]: issue.detail["suggested"]}

    data = prepare_data(reopened, preprocess_for(reopened.model, reopened.data))
    assert not set(fix) & set(data.val_keys)
    assert len(data.val_keys) == report.leakage["val_total"] - len(fix)
    where = data.train_keys.index(issue.keys[0]) if issue.keys[0] in data.train_keys else None
    targets = data.train_targets if where is not None else data.val_targets
    position = where if where is not None else data.val_keys.index(issue.keys[0])
    assert data.class_names[targets[position]] == issue.detail["suggested"]
    leaks = report.of_kind("leakage")
    assert leaks and all(finding_status(f, reopened, set()) == "excluded" for f in leaks)
    assert finding_status(issue, reopened, set()) == "relabelled"


def test_stop_ends_the_audit_at_the_next_batch(tmp_path):
    write_image_folder(tmp_path / "images", per_class=40, size=12)
    cfg = load_project(write_project(tmp_path / "p.json", "images", model={"weights": None}))
    stop = threading.Event()
    seen: list[tuple[str, int]] = []

    def progress(stage: str, done: int, total: int) -> None:
        seen.append((stage, done))
        if stage == "embed" and done > 0:
            stop.set()  # the worker's own side: the batch that reported this is the last one

    with pytest.raises(AuditStopped):
        run_audit(cfg, progress=progress, stop=stop, cache=tmp_path / "cache")
    embeds = [d for s, d in seen if s == "embed"]
    assert embeds == [0, embeds[1]] and embeds[1] < 120  # no batch ran after the stop
    assert not (tmp_path / "cache" / "audit").exists() or not any((tmp_path / "cache" / "audit").iterdir())


def test_unreadable_image_listed_and_single_class_skips_label_checks(tmp_path):
    folder = tmp_path / "images"
    write_image_folder(folder, per_class=8, size=12)
    for name in ("green", "blue"):
        shutil.rmtree(folder / name)
    (folder / "red" / "broken.png").write_bytes(b"not a png")
    cfg = load_project(write_project(tmp_path / "p.json", "images", model={"weights": None}), check_paths=False)
    report = run_audit(cfg, cache=tmp_path / "cache")
    unreadable = report.of_kind("unreadable")
    assert [f.keys for f in unreadable] == [["red/broken.png"]]
    assert not report.of_kind("label_issue") and not report.balance
    assert any("label checks skipped" in n and "one class" in n for n in report.notes)


def test_a_file_that_stops_decoding_after_the_audits_scan_is_listed_and_marked_in_the_scan_cache(tmp_path):
    from engine.data import scan_source

    folder = tmp_path / "images"
    write_image_folder(folder, per_class=8, size=12)
    for name in ("green", "blue"):  # one class: the audit leaves out its label checks, which train models
        shutil.rmtree(folder / name)
    cfg = load_project(write_project(tmp_path / "p.json", "images", model={"weights": None}), check_paths=False)
    victim = folder / "red" / "002.png"

    def progress(stage, done, total):
        if stage == "embed" and done == 0:  # scanned, not yet decoded: cut short after its header
            data = victim.read_bytes()
            victim.write_bytes(data[: len(data) // 2])

    report = run_audit(cfg, progress=progress, cache=tmp_path / "cache")

    assert [f.keys for f in report.of_kind("unreadable")] == [["red/002.png"]]
    reasons = {s.path: s.reason for s in scan_source(folder, single_class_ok=True).skipped}
    assert reasons[str(victim)].startswith("unreadable when the audit read it")


def test_cli_writes_the_json_report(truth, capsys, monkeypatch):
    from tests.conftest import cli

    monkeypatch.setenv("MWB_CACHE_DIR", str(truth["root"] / "mwb"))
    out = truth["root"] / "audit.json"
    result = cli(capsys, "audit", str(truth["project"]), "--json", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    kinds = {f["kind"] for f in data["findings"]}
    assert {"exact_duplicate", "near_duplicate", "leakage", "label_issue"} <= kinds
    first = next(f for f in data["findings"] if f["kind"] == "label_issue")
    assert {"keys", "score", "given", "suggested", "status"} <= set(first)
    assert (truth["root"] / "train" / first["keys"][0]).is_file()
    assert "leakage" in result.stdout


def test_inverted_file_index_finds_what_the_exhaustive_search_finds():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(20, 128))
    x = centres[rng.integers(0, 20, 3000)] + rng.normal(size=(3000, 128))
    x[-50:] = x[:50] + 0.05 * rng.normal(size=(50, 128))  # 50 near copies
    unit = normalise(x)
    exhaustive, _ = neighbour_candidates(unit, 5, 32)
    ivf_found, ivf_dist = neighbour_candidates(unit, 5, 32, exact_up_to=500)  # 54 k-means cells, 4 probed
    assert np.mean(ivf_found[:, 0] == exhaustive[:, 0]) >= 0.95
    pairs, _ = near_pairs(ivf_found, ivf_dist, 0.4)
    assert {(a, b) for a, b, _ in pairs} == {(i, 2950 + i) for i in range(50)}
