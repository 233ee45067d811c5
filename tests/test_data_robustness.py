"""Data read robustly: one image under two spellings, labels that differ in case, messages by label name,
atomic ECG output, and 4D NIfTI volumes that are never mixed as RGB."""
from __future__ import annotations

import csv
import os

import numpy as np
import pytest

from conftest import write_png
from nemt.data import Preprocessing, load_folder, load_manifest, read_image
from nemt.data.check import check_dataset
from nemt.errors import DataError, NemtError


def _images(root, n):
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_png(root / "images" / f"{i:05d}.png", np.full((8, 8), 10 * i, np.uint8))


def _manifest(root, rows, header="image,label"):
    (root / "manifest.csv").write_text(header + "\n" + "".join(r + "\n" for r in rows), encoding="utf-8")
    return root / "manifest.csv"


# -- 1. one image under two spellings of its path --------------------------------------------------------

def test_two_spellings_of_one_image_are_one_image(tmp_path):
    _images(tmp_path, 6)
    labels = ["normal", "normal", "cyst", "cyst", "cyst", "normal"]
    rows = [f"images/{i:05d}.png,{lab}" for i, lab in enumerate(labels)]
    rows += ["./images/00001.png,cyst",        # row 8: 00001 (row 3) is normal
             "images//00002.png,normal",       # row 9: 00002 (row 4) is cyst
             "images/sub/../00003.png,normal",  # row 10: 00003 (row 5) is cyst
             "./images//00004.png,cyst"]       # row 11: the same label: one image, as for an exact duplicate
    m = load_manifest(_manifest(tmp_path, rows))
    msgs = [str(p) for p in m.problems]
    assert len(msgs) == 3, msgs
    assert any(t.startswith(str(tmp_path / "images" / "00001.png") + ": label: row 8: label 'cyst' disagrees "
                            "with row 3 ('normal'), which names the same image as 'images/00001.png'") for t in msgs), msgs
    assert any("row 9: label 'normal' disagrees with row 4 ('cyst')" in t for t in msgs), msgs
    assert any("row 10: label 'normal' disagrees with row 5 ('cyst')" in t for t in msgs), msgs
    # the images with disagreeing rows are left out; the rest are there once each (no copy for another split)
    assert sorted(s.image.name for s in m.samples) == ["00000.png", "00004.png", "00005.png"]
    assert len({s.image.resolve() for s in m.samples}) == len(m.samples)
    rep = check_dataset(m)
    assert not rep.ok and len(rep.fatal) == 3 and rep.n_images == 3


def test_other_spelling_behaves_as_an_exact_duplicate(tmp_path):
    _images(tmp_path, 2)
    exact = load_manifest(_manifest(tmp_path, ["images/00000.png,a", "images/00001.png,b", "images/00001.png,a"]))
    other = load_manifest(_manifest(tmp_path, ["images/00000.png,a", "images/00001.png,b", "./images/00001.png,a"]))
    assert [s.image.name for s in exact.samples] == [s.image.name for s in other.samples] == ["00000.png"]
    assert len(exact.problems) == len(other.problems) == 1
    same = load_manifest(_manifest(tmp_path, ["images/00000.png,a", "images/00001.png,b", "images//00001.png,b"]))
    assert not same.problems and [s.image.name for s in same.samples] == ["00000.png", "00001.png"]


def test_other_spelling_with_another_group_is_reported(tmp_path):
    _images(tmp_path, 2)
    m = load_manifest(_manifest(tmp_path, ["images/00000.png,a,p1", "images/00001.png,a,p2",
                                           "images/./00001.png,a,p3"], header="image,label,patient"))
    assert [s.image.name for s in m.samples] == ["00000.png"]
    assert len(m.problems) == 1 and "group 'p3' disagrees with row 3 ('p2')" in str(m.problems[0])


# -- 2. labels that differ only in case --------------------------------------------------------------------

def test_labels_differing_in_case_are_warned_not_merged(tmp_path):
    _images(tmp_path, 19)
    rows = [f"images/{i:05d}.png,{'normal' if i < 8 else 'Normal'}" for i in range(19)]
    m = load_manifest(_manifest(tmp_path, rows))
    assert m.label_names == ["Normal", "normal"] and not m.problems  # two classes, as written
    assert sorted(m.labels_array().tolist()) == [0] * 11 + [1] * 8
    case = [str(w) for w in m.warnings if "differ only in case" in str(w)]
    assert len(case) == 1, [str(w) for w in m.warnings]
    assert case[0].startswith(str(tmp_path / "manifest.csv") + ": label: ")
    assert "'Normal' (11 images)" in case[0] and "'normal' (8 images)" in case[0]
    rep = check_dataset(m)
    assert rep.ok and any("differ only in case" in str(w) for w in rep.warnings)


def test_labels_differing_in_case_in_a_folder_tree_and_a_label_set(tmp_path):
    for cls, n in (("Cyst", 6), ("cyst", 5), ("normal", 5)):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for i in range(n):
            write_png(tmp_path / "tree" / cls / f"{i}.png", np.zeros((4, 4), np.uint8))
    m = load_folder(tmp_path / "tree")
    msgs = [str(w) for w in m.warnings]
    assert len(msgs) == 1 and "'Cyst' (6 images), 'cyst' (5 images)" in msgs[0], msgs
    _images(tmp_path, 6)
    m = load_manifest(_manifest(tmp_path, [f"images/{i:05d}.png,a" for i in range(6)]), labels=["a", " A"])
    assert any("'a' (6 images), ' A' (0 images)" in str(w) for w in m.warnings), [str(w) for w in m.warnings]


def test_distinct_labels_give_no_case_warning(tmp_path):
    _images(tmp_path, 10)
    m = load_manifest(_manifest(tmp_path, [f"images/{i:05d}.png,{'a' if i < 5 else 'b'}" for i in range(10)]))
    assert not m.warnings


# -- 3. messages name labels, not class indices -------------------------------------------------------------

def test_disagreeing_label_is_named(tmp_path):
    _images(tmp_path, 3)
    m = load_manifest(_manifest(tmp_path, ["images/00000.png,cyst", "images/00001.png,normal",
                                           "images/00002.png,nodule", "images/00001.png,nodule"]))
    assert len(m.problems) == 1
    assert str(m.problems[0]) == (f"{tmp_path / 'images' / '00001.png'}: label: row 5: label 'nodule' disagrees "
                                  "with row 3 ('normal')")


# -- 4. nemt data ecg writes atomically ------------------------------------------------------------------

def test_ecg_dataset_files_are_all_written_atomically(tmp_path, monkeypatch):
    from nemt.data import write_ecg_dataset

    renamed = []
    real = os.replace

    def spy(src, dst, *a, **k):
        renamed.append(os.path.abspath(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", spy)
    out = tmp_path / "ecg"
    manifest = write_ecg_dataset(out, 3, leads=["I", "II"], fs=50.0, duration=2.0)
    written = sorted(os.path.abspath(p) for p in out.rglob("*") if p.is_file())
    assert len(written) == 3 * 4 + 2  # signal, sidecar, findings, waves per record, manifest.csv and ecg.json
    assert sorted(renamed) == written
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    # the content is what it was: readable .npy files with their sidecar, and the manifest's rows
    m = load_manifest(manifest)
    assert len(m.samples) == 3 and not m.problems
    assert read_image(out / "signals" / "ecg_00000.npy").array.shape == (2, 100)
    assert np.load(out / "findings" / "ecg_00001.npy").dtype == np.uint8


def test_ecg_manifest_survives_a_failed_rewrite(tmp_path, monkeypatch):
    from nemt.data import write_ecg_dataset

    out = tmp_path / "ecg"
    manifest = write_ecg_dataset(out, 2, fs=50.0, duration=2.0)
    before = manifest.read_bytes()

    class Broken:
        def __init__(self, fh, *a, **k):
            self.fh = fh

        def writerow(self, row):
            self.fh.write(",".join(row) + "\r\n")

        def writerows(self, rows):
            raise OSError("disk full")

    monkeypatch.setattr(csv, "writer", Broken)
    with pytest.raises(OSError, match="disk full"):
        write_ecg_dataset(out, 2, fs=50.0, duration=2.0)
    assert manifest.read_bytes() == before
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


# -- 5. a 4D NIfTI's volumes are not RGB --------------------------------------------------------------------

def _nifti(path, shape):
    import nibabel as nib

    data = np.random.default_rng(0).random(shape, dtype=np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


@pytest.mark.parametrize("volumes", [3, 5, 2])
def test_nifti_volumes_other_than_the_models_channels_are_refused(tmp_path, volumes):
    path = _nifti(tmp_path / f"v{volumes}.nii.gz", (6, 6, 6, volumes))
    img = read_image(path)
    assert img.array.shape == (volumes, 6, 6, 6)
    with pytest.raises(DataError) as info:
        Preprocessing(size=(6, 6, 6), channels=1).unit_scale(img)
    assert isinstance(info.value, NemtError)
    assert str(info.value) == (f"{path}: channels: {volumes} volumes (channels) along its 4th axis; "
                               "the model takes 1")
    # a model that takes that many channels reads them as they are
    assert Preprocessing(size=(6, 6, 6), channels=volumes).unit_scale(img).shape == (volumes, 6, 6, 6)


def test_one_volume_nifti_and_2d_rgb_keep_their_conversions(tmp_path):
    one = read_image(_nifti(tmp_path / "one.nii.gz", (6, 6, 6, 1)))
    assert Preprocessing(size=(6, 6, 6), channels=3).unit_scale(one).shape == (3, 6, 6, 6)  # grey repeated
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255
    write_png(tmp_path / "red.png", rgb)
    out = Preprocessing(size=(4, 4), channels=1).unit_scale(read_image(tmp_path / "red.png"))
    np.testing.assert_allclose(out, np.full((1, 4, 4), 0.299), rtol=1e-6)  # a photo still goes grey by luma


def test_a_symbolic_link_to_a_listed_image_is_the_same_image(tmp_path):
    _images(tmp_path, 2)
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "again.png").symlink_to(tmp_path / "images" / "00001.png")
    m = load_manifest(_manifest(tmp_path, ["images/00000.png,a", "images/00001.png,b", "links/again.png,a"]))
    assert any("row 4: label 'a' disagrees with row 3 ('b'), which names the same image as 'images/00001.png'"
               in str(p) for p in m.problems), [str(p) for p in m.problems]
    assert [s.image.name for s in m.samples] == ["00000.png"]


@pytest.mark.parametrize("shape", [(3, 6, 6, 6), (3, 40)])
def test_npy_volume_or_signal_channels_are_not_mixed_as_rgb(tmp_path, shape):
    """A (3, X, Y, Z) volume or a 3-lead (3, L) signal from .npy is three modalities or leads, not RGB: a
    one-channel model refuses it instead of mixing it by luma weights; a 2D (3, H, W) array still mixes."""
    path = tmp_path / "a.npy"
    np.save(path, np.random.default_rng(0).random(shape).astype(np.float32))
    img = read_image(path)
    with pytest.raises(DataError) as info:
        Preprocessing(size=shape[1:], channels=1).unit_scale(img)
    assert str(info.value).startswith(f"{path}: channels: 3 channels of a ")
    assert Preprocessing(size=shape[1:], channels=3).unit_scale(img).shape == shape
    np.save(tmp_path / "rgb.npy", np.random.default_rng(0).random((3, 4, 4)).astype(np.float32))
    assert Preprocessing(size=(4, 4), channels=1).unit_scale(read_image(tmp_path / "rgb.npy")).shape == (1, 4, 4)
