"""`nemt data check`: every bad entry reported by file and reason; exit status."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import shared, write_png
from nemt.cli import app
from nemt.data import open_dataset
from nemt.data.check import check_dataset

runner = CliRunner()


def _bad_manifest(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        write_png(tmp_path / f"ok{i}.png", rng.integers(0, 255, (32, 32), dtype=np.uint8))
        write_png(tmp_path / f"ok{i}_mask.png", np.zeros((32, 32), np.uint8))
    good = (tmp_path / "ok0.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    write_png(tmp_path / "small_mask.png", np.zeros((16, 16), np.uint8))
    (tmp_path / "manifest.csv").write_text(
        "image,mask,label\n"
        "ok0.png,ok0_mask.png,benign\n"
        "missing.png,,benign\n"
        "truncated.png,,malignant\n"
        "ok1.png,small_mask.png,malignant\n"
        "ok2.png,ok2_mask.png,unknown\n")
    return tmp_path / "manifest.csv"


def test_each_problem_named(tmp_path):
    m = open_dataset(_bad_manifest(tmp_path), labels=["benign", "malignant"])
    rep = check_dataset(m)
    msgs = [str(e) for e in rep.fatal]
    assert len(msgs) == 4, msgs
    assert any("missing.png" in t and "not found" in t for t in msgs)
    assert any("truncated.png" in t for t in msgs)
    assert any("small_mask.png" in t and "shape" in t for t in msgs)
    assert any("ok2.png" in t and "'unknown' not in the label set" in t for t in msgs)
    assert rep.n_images == 1 and not rep.ok


def test_cli_exit_status(tmp_path):
    bad = _bad_manifest(tmp_path / "bad")
    res = runner.invoke(app, ["data", "check", str(bad), "--labels", "benign,malignant", "--no-progress"])
    assert res.exit_code == 1
    for name in ("missing.png", "truncated.png", "small_mask.png"):
        assert name in res.output
    good_dir = tmp_path / "good"
    write_png(good_dir / "a.png", np.zeros((8, 8), np.uint8))
    (good_dir / "manifest.csv").write_text("image,label\na.png,x\n")
    res = runner.invoke(app, ["data", "check", str(good_dir), "--no-progress",
                              "--json", str(tmp_path / "rep.json")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["images"] == 1 and rep["fatal"] == []


def test_missing_dataset_is_a_clear_error(tmp_path):
    res = runner.invoke(app, ["data", "check", str(tmp_path / "nope"), "--no-progress"])
    assert res.exit_code == 2 and "no such file or folder" in " ".join(res.output.split())


def test_busi_counts():
    rep = check_dataset(open_dataset(shared("busi")))
    assert rep.n_images == 780 and rep.ok
    assert rep.per_label == {"benign": 437, "malignant": 210, "normal": 133}
    assert rep.masks == 780 and rep.nonempty_masks == 647


def test_empty_class_folder_is_fatal_and_small_classes_are_warnings(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(6):
        write_png(tmp_path / "tree" / "benign" / f"{i}.png", rng.integers(0, 255, (8, 8), dtype=np.uint8))
    for i in range(2):
        write_png(tmp_path / "tree" / "malignant" / f"{i}.png", rng.integers(0, 255, (8, 8), dtype=np.uint8))
    (tmp_path / "tree" / "normal").mkdir()
    rep_path = tmp_path / "rep.json"
    res = runner.invoke(app, ["data", "check", str(tmp_path / "tree"), "--no-progress", "--json", str(rep_path)])
    assert res.exit_code == 1, res.output
    text = rep_path.read_text()
    rep = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in the report"))
    assert any("class folder 'normal' holds no image" in f for f in rep["fatal"])
    assert any("class 'malignant' has only 2 images" in w for w in rep["warnings"])
    assert rep["per_label"] == {"benign": 6, "malignant": 2, "normal": 0}
    out = " ".join(res.output.split())
    assert "FATAL" in out and "holds no image" in out and "warning" in out and "'malignant' has only 2" in out


def test_summary_counts_readable_and_listed_images_apart(tmp_path):
    """The per-class warnings count the manifest's rows; the summary counted only the readable images, so
    "class 'benign' has only 2 images" sat beside "benign 1". Both counts are reported now, each named."""
    bad = _bad_manifest(tmp_path)
    rep = check_dataset(open_dataset(bad, labels=["benign", "malignant"]))
    # listed: ok0 (benign), truncated and ok1 (malignant); a missing file or an unknown label is no sample
    assert rep.listed == 3 and rep.listed_per_label == {"benign": 1, "malignant": 2}
    assert rep.n_images == 1 and rep.per_label == {"benign": 1, "malignant": 0}
    assert any("class 'malignant' has only 2 images" in str(w) for w in rep.warnings)
    res = runner.invoke(app, ["data", "check", str(bad), "--labels", "benign,malignant", "--no-progress"])
    out = " ".join(res.output.split())
    assert "1 readable of 3 listed" in out and "0 readable of 2 listed" in out
    assert json.loads(res.output.strip().splitlines()[-1])["listed"] == 3
