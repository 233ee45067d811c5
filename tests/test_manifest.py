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


def test_second_row_may_only_add_boxes(tmp_path):
    """A later row of an image whose mask, group or split differs is a problem naming file, field and reason."""
    for n in "abcde":
        _img(tmp_path, f"{n}.png", (20, 24))
    _img(tmp_path, "ma.png", (20, 24)), _img(tmp_path, "tiny.png", (7, 5))
    (tmp_path / "m.csv").write_text(
        "image,mask,label,patient,split,x,y,w,h\n"
        "a.png,ma.png,tb,p1,train,1,1,4,4\n"
        "a.png,ma.png,tb,p1,train,5,5,4,4\n"   # adds a box: fine
        "a.png,,tb,,,9,9,2,2\n"                 # empty cells do not repeat: fine
        "b.png,ma.png,tb,p2,train,,,,\n"
        "b.png,gone.png,tb,p2,train,,,,\n"      # another (missing) mask
        "c.png,,tb,p3,train,,,,\n"
        "c.png,tiny.png,tb,p3,train,,,,\n"      # a 7x5 mask the first row did not have
        "d.png,,tb,p4,train,,,,\n"
        "d.png,,tb,p5,train,,,,\n"              # another patient
        "e.png,,tb,p6,train,,,,\n"
        "e.png,,tb,p6,test,,,,\n")              # another split
    m = load_manifest(tmp_path / "m.csv")
    assert [s.image.name for s in m.samples] == ["a.png"]
    assert m.samples[0].boxes == [(1, 1, 4, 4), (5, 5, 4, 4), (9, 9, 2, 2)]
    msgs = [str(p) for p in m.problems]
    assert len(msgs) == 4, msgs
    assert any(t.startswith(str(tmp_path / "b.png") + ": mask: row 6: mask 'gone.png' disagrees with row 5 "
                            "('ma.png')") for t in msgs), msgs
    assert any("c.png: mask: row 8: mask 'tiny.png' disagrees with row 7 (none)" in t for t in msgs), msgs
    assert any("d.png: patient: row 10: group 'p5' disagrees with row 9 ('p4')" in t for t in msgs), msgs
    assert any("e.png: split: row 12: split 'test' disagrees with row 11 ('train')" in t for t in msgs), msgs
    assert all("may only add boxes" in t for t in msgs)


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-Infinity", "NA", "null", "?"])
def test_missing_looking_labels_are_problems_not_classes(tmp_path, value):
    rows = ["image,label"]
    for i in range(12):
        _img(tmp_path, f"{i}.png")
        rows.append(f"{i}.png,{['benign', 'malignant'][i % 2]}")
    _img(tmp_path, "x.png")
    rows.append(f"x.png,{value}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    m = load_manifest(tmp_path / "m.csv")
    assert m.label_names == ["benign", "malignant"] and len(m.samples) == 12
    assert len(m.problems) == 1
    assert f"x.png: label: row 14: label {value!r} looks like a missing value" in str(m.problems[0])
    assert "--labels" in str(m.problems[0])
    # --labels remains the way to fix the set, also to a value that looks missing
    m2 = load_manifest(tmp_path / "m.csv", labels=["benign", "malignant", value])
    assert not m2.problems and len(m2.samples) == 13


def test_a_class_with_very_few_images_is_a_warning_that_names_it(tmp_path):
    from nemt.data.manifest import MIN_CLASS_IMAGES

    rows = ["image,label"]
    for i in range(12):
        _img(tmp_path, f"{i}.png")
        rows.append(f"{i}.png,{['benign', 'malignant'][i % 2]}")
    _img(tmp_path, "t.png")
    rows.append("t.png,malignnat")  # a typo
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    m = load_manifest(tmp_path / "m.csv")
    assert m.label_names == ["benign", "malignant", "malignnat"] and not m.problems
    assert len(m.warnings) == 1 and MIN_CLASS_IMAGES == 5
    w = str(m.warnings[0])
    assert "label: class 'malignnat' has only 1 image (first: row 14), fewer than 5" in w and "--labels" in w
    # a class the label set names but no row has is a warning too
    m2 = load_manifest(tmp_path / "m.csv", labels=["benign", "malignant", "malignnat", "normal"])
    assert any("class 'normal' of the label set has no image" in str(x) for x in m2.warnings)


def test_an_empty_class_folder_is_a_problem(tmp_path):
    for i in range(6):
        _img(tmp_path, f"cats/{i}.png"), _img(tmp_path, f"dogs/{i}.png")
    (tmp_path / "birds").mkdir()
    (tmp_path / "birds" / "notes.txt").write_text("todo")
    m = open_dataset(tmp_path)
    assert m.label_names == ["birds", "cats", "dogs"] and len(m.samples) == 12
    msgs = [str(p) for p in m.problems]
    assert any(t.startswith(str(tmp_path / "birds") + ": label: class folder 'birds' holds no image") for t in msgs)
    with pytest.raises(DataError, match="holds no image"):
        m.raise_problems()
    # naming the classes leaves the empty folder out
    m2 = open_dataset(tmp_path, labels=["cats", "dogs"])
    assert not any("holds no image" in str(p) for p in m2.problems) and len(m2.samples) == 12


def test_a_manifest_without_rows_is_a_problem(tmp_path):
    """A header and no rows is not a data set: a fatal problem naming the file (`data check` exits non-zero),
    not a clean report of 0 images that only `train` later refuses."""
    p = tmp_path / "manifest.csv"
    p.write_text("image,label\n")
    m = load_manifest(p)
    assert len(m.samples) == 0 and len(m.problems) == 1 and "no rows" in str(m.problems[0])
    with pytest.raises(DataError, match="no rows"):
        m.raise_problems()


def test_labels_outside_a_fixed_set_are_summed_up_first(small_csv):
    """Data of another label set (e.g. a model's labels given to other data): the error opens with one line
    naming the foreign labels and their row counts, before the per-row list."""
    m = load_manifest(small_csv, labels=["normal", "benign"])
    with pytest.raises(DataError) as info:
        m.raise_problems()
    first = str(info.value).splitlines()[1]
    assert "8 rows have labels outside the label set ['normal', 'benign']" in first and "'malignant' (8 rows)" in first
