"""Manifest rules: columns, tasks, ground truth, groups, and problems reported by name."""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import shared, write_png
from nemt.data import load_folder, load_manifest, open_dataset
from nemt.errors import DataError


def _img(tmp_path, name, shape=(8, 8)):
    return write_png(tmp_path / name, np.full(shape, 100, np.uint8))


def test_multiclass_with_masks_and_groups(small_csv):
    m = load_manifest(small_csv)
    assert m.task == "multiclass"
    assert m.label_names == ["benign", "malignant", "normal"]  # sorted distinct labels
    assert len(m.samples) == 24 and not m.problems
    s = m.samples[1]
    assert s.image.name == "case (1).png" and s.mask.name == "case (1).png"
    assert s.y == m.label_names.index("benign") and s.group == "p0" and s.has_gt


def test_label_set_is_respected_and_order_kept(small_csv):
    m = load_manifest(small_csv, labels=["normal", "benign"])
    assert m.label_names == ["normal", "benign"]
    assert len(m.samples) == 16
    bad = [p for p in m.problems if "not in the label set" in str(p)]
    assert len(bad) == 8 and all("malignant" in str(p) and "case (" in str(p) for p in bad)
    with pytest.raises(DataError, match="8 bad entries"):
        m.raise_problems()


def test_multilabel_auto_detected(tmp_path):
    _img(tmp_path, "a.png"), _img(tmp_path, "b.png")
    (tmp_path / "m.csv").write_text("image,effusion,nodule\na.png,1,0\nb.png,1,1\n")
    m = load_manifest(tmp_path / "m.csv")
    assert m.task == "multilabel" and m.label_names == ["effusion", "nodule"]
    assert m.labels_array().tolist() == [[1, 0], [1, 1]]


def test_multilabel_bad_value_named(tmp_path):
    _img(tmp_path, "a.png")
    (tmp_path / "m.csv").write_text("image,effusion,nodule\na.png,1,2\n")
    m = load_manifest(tmp_path / "m.csv", task="multilabel")
    assert not m.samples
    assert "nodule" in str(m.problems[0]) and "'2'" in str(m.problems[0]) and "a.png" in str(m.problems[0])


def test_regression_and_nan_target(tmp_path):
    for n in "abc":
        _img(tmp_path, f"{n}.png")
    (tmp_path / "m.csv").write_text("image,severity\na.png,1.5\nb.png,nan\nc.png,x\n")
    m = load_manifest(tmp_path / "m.csv")
    assert m.task == "regression" and m.label_names == ["severity"]
    assert [s.y for s in m.samples] == [1.5]
    msgs = [str(p) for p in m.problems]
    assert any("b.png" in t and "NaN" in t for t in msgs)
    assert any("c.png" in t and "not a number" in t for t in msgs)


def test_boxes_several_rows_per_image(tmp_path):
    _img(tmp_path, "a.png", (50, 40)), _img(tmp_path, "b.png")
    (tmp_path / "m.csv").write_text(
        "image,label,x,y,w,h\na.png,tb,1,2,10,20\na.png,tb,20,30,5,5\nb.png,healthy,,,,\n")
    m = load_manifest(tmp_path / "m.csv")
    assert len(m.samples) == 2
    a, b = m.samples
    assert a.boxes == [(1, 2, 10, 20), (20, 30, 5, 5)] and a.has_gt
    assert b.boxes == [] and not b.has_gt


def test_disagreeing_rows_and_bad_box_are_problems(tmp_path):
    _img(tmp_path, "a.png"), _img(tmp_path, "b.png")
    (tmp_path / "m.csv").write_text("image,label,x,y,w,h\na.png,tb,1,2,3,4\na.png,healthy,1,2,3,4\n"
                                    "b.png,tb,1,2,-3,4\n")
    m = load_manifest(tmp_path / "m.csv")
    assert m.samples == []
    msgs = " | ".join(str(p) for p in m.problems)
    assert "disagrees with row 2" in msgs and "w, h > 0" in msgs


def test_missing_files_are_problems_not_skips(tmp_path):
    _img(tmp_path, "a.png")
    (tmp_path / "m.csv").write_text("image,mask,label\na.png,nomask.png,x\ngone.png,,x\n")
    m = load_manifest(tmp_path / "m.csv")
    assert m.samples == []
    msgs = [str(p) for p in m.problems]
    assert any("nomask.png" in t and "mask file not found" in t for t in msgs)
    assert any("gone.png" in t and "image file not found" in t for t in msgs)


def test_unknown_task_and_columns_refused(tmp_path):
    _img(tmp_path, "a.png")
    (tmp_path / "m.csv").write_text("image,notes\na.png,hello\n")
    with pytest.raises(DataError, match="cannot tell the task"):
        load_manifest(tmp_path / "m.csv")
    with pytest.raises(DataError, match="column not found"):
        load_manifest(tmp_path / "m.csv", label_col="diagnosis")
    with pytest.raises(DataError, match="no image column"):
        (tmp_path / "n.csv").write_text("picture,label\na.png,x\n")
        load_manifest(tmp_path / "n.csv")


def test_split_column_fixes_split(tmp_path):
    for n in "abc":
        _img(tmp_path, f"{n}.png")
    (tmp_path / "m.csv").write_text("image,label,split\na.png,x,train\nb.png,y,val\nc.png,x,test\n")
    from nemt.data import split_indices
    sp = split_indices(load_manifest(tmp_path / "m.csv"), seed=123)
    assert {k: v.tolist() for k, v in sp.items()} == {"train": [0], "val": [1], "test": [2]}


def test_class_per_folder(tmp_path):
    _img(tmp_path, "cats/a.png"), _img(tmp_path, "dogs/b.png"), _img(tmp_path, "dogs/c.png")
    (tmp_path / "dogs" / "notes.txt").write_text("x")
    m = open_dataset(tmp_path)
    assert m.kind == "folder" and m.label_names == ["cats", "dogs"]
    assert [s.y for s in m.samples] == [0, 1, 1]
    assert len(m.problems) == 1 and "notes.txt" in str(m.problems[0])
    m2 = load_folder(tmp_path, labels=["dogs"])
    assert [s.y for s in m2.samples] == [0, 0] and any("cats" in str(p) for p in m2.problems)


def test_medmnist_npz_keeps_its_splits(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1))
    np.savez(tmp_path / "toy.npz", **arrays)
    m = open_dataset(tmp_path / "toy.npz")
    assert m.kind == "medmnist" and m.task == "multiclass" and m.arrays.shape == (11, 1, 28, 28)
    from nemt.data import split_indices
    sp = split_indices(m, seed=5)
    assert [len(sp[k]) for k in ("train", "val", "test")] == [6, 2, 3]
    assert m.samples[6].split == "val" and m.samples[6].y == int(arrays["val_labels"][0, 0])


def test_busi_manifest_loads_as_it_is():
    root = shared("busi")
    m = open_dataset(root)
    assert len(m.samples) == 780 and not m.problems
    assert m.label_names == ["benign", "malignant", "normal"]
    counts = np.bincount(m.labels_array())
    assert counts.tolist() == [437, 210, 133]
    assert any(" (" in s.image.name for s in m.samples)
    assert all(s.image.is_file() and s.mask.is_file() for s in m.samples)


def test_fingerprint_changes_with_content(small_csv):
    a = load_manifest(small_csv).fingerprint()
    small_csv.write_text(small_csv.read_text().replace(",p0\n", ",p99\n", 1))
    assert load_manifest(small_csv).fingerprint() != a
    assert math.isfinite(len(a)) and len(a) == 64
