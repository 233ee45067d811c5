"""Tests of the synthetic phantoms (nemt.data.phantoms)."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from nemt.data import phantoms as P
from nemt.data.phantoms import FINDINGS, PhantomSet, make_phantoms, write_phantom_dataset
from nemt.errors import DataError

TASKS = ("multiclass", "multilabel", "regression")
K = len(FINDINGS)


def _check_set(ps: PhantomSet, n: int, shape: tuple[int, ...], task: str) -> None:
    d = len(shape)
    assert ps.spatial_dims == d and ps.task == task and len(ps) == n
    assert ps.images.shape == (n, 1, *shape) and ps.images.dtype == np.float32
    assert ps.masks.shape == (n, K, *shape) and ps.masks.dtype == bool
    assert ps.present.shape == (n, K) and ps.present.dtype == bool
    assert ps.union_masks.shape == (n, 1, *shape) and ps.union_masks.dtype == bool
    assert np.isfinite(ps.images).all()
    assert ps.images.min() >= 0.0 and ps.images.max() <= 1.0
    # not a constant image: a body on a dark surround
    assert (ps.images.reshape(n, -1).std(axis=1) > 0.1).all()
    spatial = tuple(range(2, 2 + d))
    np.testing.assert_array_equal(ps.present, ps.masks.any(axis=spatial))
    if task == "multiclass":
        assert ps.labels.shape == (n,) and ps.labels.dtype == np.int64
        assert ps.label_names == ["normal", *FINDINGS]
    elif task == "multilabel":
        assert ps.labels.shape == (n, K) and ps.labels.dtype == np.float32
        assert ps.label_names == list(FINDINGS)
    else:
        assert ps.labels.shape == (n,) and ps.labels.dtype == np.float32
        assert ps.label_names == ["severity"]


@pytest.mark.parametrize("task", TASKS)
def test_shapes_dtypes_ranges_2d(task):
    ps = make_phantoms(6, 32, task=task, seed=1)
    _check_set(ps, 6, (32, 32), task)


@pytest.mark.parametrize("task", TASKS)
def test_shapes_dtypes_ranges_3d(task):
    ps = make_phantoms(3, 16, spatial_dims=3, task=task, seed=2)
    _check_set(ps, 3, (16, 16, 16), task)


@pytest.mark.parametrize("size,dims", [((24, 40), 2), ((40, 24), 2), ((12, 16, 20), 3)])
def test_anisotropic_sizes(size, dims):
    ps = make_phantoms(4, size, spatial_dims=dims, task="multilabel", seed=3, p_finding=1.0)
    _check_set(ps, 4, size, "multilabel")
    assert ps.present.all()  # every kind still fits


def test_zero_samples():
    ps = make_phantoms(0, 16)
    assert ps.images.shape == (0, 1, 16, 16) and ps.labels.shape == (0,)


def test_finding_subset():
    ps = make_phantoms(10, 32, task="multiclass", findings=("cyst",), seed=0)
    assert ps.masks.shape[1] == 1 and ps.label_names == ["normal", "cyst"]
    assert set(np.unique(ps.labels)) <= {0, 1}


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(spatial_dims=4),
        dict(size=(32, 32, 32)),
        dict(size=4),
        dict(task="segmentation"),
        dict(findings=("nodule", "tumour")),
        dict(findings=("nodule", "nodule")),
        dict(findings=()),
        dict(noise=-0.1),
        dict(p_finding=1.5),
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(DataError):
        make_phantoms(2, **{"size": 32, **kwargs})


# --------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------


def _assert_sets_equal(a: PhantomSet, b: PhantomSet) -> None:
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.present, b.present)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.label_names == b.label_names


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_arrays_and_prefix(task):
    a = make_phantoms(8, 32, task=task, seed=5)
    b = make_phantoms(8, 32, task=task, seed=5)
    _assert_sets_equal(a, b)
    _assert_sets_equal(a[:5], make_phantoms(5, 32, task=task, seed=5))
    c = make_phantoms(8, 32, task=task, seed=6)
    assert not np.array_equal(a.images, c.images)
    # samples differ from each other
    assert not np.array_equal(a.images[0], a.images[1])


def test_prefix_3d():
    a = make_phantoms(4, 16, spatial_dims=3, task="regression", seed=9)
    _assert_sets_equal(a[:2], make_phantoms(2, 16, spatial_dims=3, task="regression", seed=9))


# --------------------------------------------------------------------------
# ground truth
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,task",
    [((48, 48), "multiclass"), ((48, 64), "multilabel"), ((64, 64), "regression"), ((20, 20, 20), "multilabel")],
)
def test_masks_are_exactly_where_the_image_changed(shape, task):
    ps = make_phantoms(12, shape, spatial_dims=len(shape), task=task, seed=11, p_finding=0.7)
    n_with = 0
    for i in range(12):
        s = P._generate_sample(11, i, shape, task, FINDINGS, 0.03, 0.7)
        # the private helper is what make_phantoms uses
        np.testing.assert_array_equal(s.image, ps.images[i, 0])
        np.testing.assert_array_equal(s.masks, ps.masks[i])
        union = s.masks.any(axis=0)
        changed = s.image != s.background
        assert not changed[~union].any(), "image changed outside the finding masks"
        np.testing.assert_array_equal(s.image[~union], s.background[~union])
        if union.any():
            n_with += 1
            assert changed[union].mean() > 0.9, "mask covers pixels the finding did not change"
        else:
            np.testing.assert_array_equal(s.image, s.background)
    assert n_with >= 4


@pytest.mark.parametrize("shape", [(64, 64), (32, 80), (24, 24, 24)])
def test_findings_inside_body(shape):
    for i in range(15):
        s = P._generate_sample(4, i, shape, "regression", FINDINGS, 0.03, 0.5)
        union = s.masks.any(axis=0)
        assert not (union & ~s.body).any()
        # the body is a large central region, not the whole image
        assert 0.2 < s.body.mean() < 0.9


def test_finding_kinds_look_different():
    """Nodules and opacities brighten, cysts darken their core; nodules are smaller than opacities."""
    shape = (96, 96)
    stats = {k: [] for k in FINDINGS}
    areas = {k: [] for k in FINDINGS}
    for i in range(30):
        s = P._generate_sample(21, i, shape, "multiclass", FINDINGS, 0.0, 0.5)
        for k, kind in enumerate(FINDINGS):
            m = s.masks[k]
            if m.any():
                stats[kind].append(float((s.image[m] - s.background[m]).mean()))
                areas[kind].append(int(m.sum()))
    assert all(len(v) >= 3 for v in stats.values())
    assert min(stats["nodule"]) > 0.05
    assert min(stats["opacity"]) > 0.02
    assert max(stats["cyst"]) < -0.05
    assert np.median(areas["nodule"]) < np.median(areas["opacity"])
    # nodule radius ~4-8 % of the size
    r = np.sqrt(np.array(areas["nodule"]) / np.pi) / 96
    assert 0.03 < r.min() and r.max() < 0.1


def test_multiclass_labels_consistent():
    ps = make_phantoms(60, 32, task="multiclass", seed=7)
    counts = np.bincount(ps.labels, minlength=K + 1)
    assert (counts > 5).all(), counts  # every class, normal ~1/(K+1)
    for i in range(60):
        lab = int(ps.labels[i])
        expected = np.zeros(K, dtype=bool)
        if lab > 0:
            expected[lab - 1] = True
        np.testing.assert_array_equal(ps.present[i], expected)
        assert ps.masks[i].any() == (lab != 0)
        for k in range(K):
            assert ps.masks[i, k].any() == (k == lab - 1)


def test_multilabel_labels_equal_present():
    ps = make_phantoms(60, 32, task="multilabel", seed=8)
    np.testing.assert_array_equal(ps.labels, ps.present.astype(np.float32))
    assert set(np.unique(ps.labels)) == {0.0, 1.0}
    assert (ps.present.sum(axis=1) >= 2).any()  # co-occurrence
    frac = ps.present.mean(axis=0)
    assert ((frac > 0.3) & (frac < 0.7)).all(), frac
    assert not make_phantoms(5, 32, task="multilabel", p_finding=0.0).present.any()
    assert make_phantoms(5, 32, task="multilabel", p_finding=1.0).present.all()


def test_regression_severity():
    ps = make_phantoms(60, 48, task="regression", seed=12)
    sev = ps.labels
    has = ps.present.any(axis=1)
    assert (sev >= 0).all()
    np.testing.assert_array_equal(sev == 0, ~has)
    assert (~has).sum() >= 3 and has.sum() >= 30
    # monotone-ish in lesion area over random samples (rank correlation)
    area = ps.union_masks[has].reshape(has.sum(), -1).sum(axis=1)
    ra = np.argsort(np.argsort(area))
    rs = np.argsort(np.argsort(sev[has]))
    assert np.corrcoef(ra, rs)[0, 1] > 0.6


def test_regression_severity_controlled():
    """Same nodule, larger radius (or contrast) -> larger severity."""
    g = P._grid((64, 64))
    sev = []
    for radius, amp in [(3.0, 0.25), (5.0, 0.25), (8.0, 0.25), (8.0, 0.35)]:
        f = P._Finding("nodule", np.array([32.0, 32.0]), np.array([radius, radius]), np.eye(2), amp)
        delta, mask = P._render_finding(f, g)
        assert mask.sum() > 0 and not delta[~mask].any()
        sev.append(P._severity(delta, mask))
    assert sev[0] < sev[1] < sev[2] < sev[3]
    assert P._severity(np.zeros((64, 64)), np.zeros((64, 64), bool)) == 0.0


def test_global_brightness_is_not_the_label():
    ps = make_phantoms(120, 48, task="multiclass", seed=13)
    mean = ps.images.reshape(120, -1).mean(axis=1)
    normal, abnormal = mean[ps.labels == 0], mean[ps.labels != 0]
    spread = mean.std()
    assert spread > 0.02  # per-image brightness varies
    assert abs(normal.mean() - abnormal.mean()) < 0.5 * spread


# --------------------------------------------------------------------------
# on disk
# --------------------------------------------------------------------------


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _read_manifest(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


@pytest.mark.parametrize("task", TASKS)
def test_write_dataset_2d_roundtrip(tmp_path, task):
    from PIL import Image

    n = 7
    out = tmp_path / "ds"
    manifest = write_phantom_dataset(out, n, 40, task=task, seed=3)
    assert manifest == out / "manifest.csv" and manifest.is_file()
    ps = make_phantoms(n, 40, task=task, seed=3)
    cols, rows = _read_manifest(manifest)
    label_cols = {"multiclass": ["label"], "multilabel": list(FINDINGS), "regression": ["severity"]}[task]
    assert cols == ["image", "mask", *label_cols, "group"]
    assert len(rows) == n
    for i, row in enumerate(rows):
        assert not Path(row["image"]).is_absolute()
        img = np.asarray(Image.open(out / row["image"]))
        assert img.dtype == np.uint8 and img.shape == (40, 40)
        assert np.abs(img / 255.0 - ps.images[i, 0]).max() <= 0.5 / 255 + 1e-6
        mask = np.asarray(Image.open(out / row["mask"]))
        assert set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask == 255, ps.union_masks[i, 0])
        if task == "multiclass":
            assert row["label"] == ps.label_names[int(ps.labels[i])]
        elif task == "multilabel":
            assert [int(row[f]) for f in FINDINGS] == [int(v) for v in ps.labels[i]]
        else:
            assert np.float32(float(row["severity"])) == ps.labels[i]
        assert row["group"] == f"p{i // 2:04d}"
    groups = [r["group"] for r in rows]
    assert len(set(groups)) == (n + 1) // 2
    meta = json.loads((out / "phantoms.json").read_text())
    assert meta["n"] == n and meta["size"] == [40, 40] and meta["spatial_dims"] == 2
    assert meta["task"] == task and meta["seed"] == 3
    assert meta["findings"] == list(FINDINGS) and meta["label_names"] == ps.label_names

    # reruns are byte-identical, in place and elsewhere; no temporary files left
    before = _hashes(out)
    assert not [p for p in before if p.endswith(".tmp")]
    write_phantom_dataset(out, n, 40, task=task, seed=3)
    assert _hashes(out) == before
    other = tmp_path / "other"
    write_phantom_dataset(other, n, 40, task=task, seed=3)
    assert _hashes(other) == before


def test_write_dataset_3d_roundtrip(tmp_path):
    import nibabel as nib

    n = 3
    out = tmp_path / "vol"
    manifest = write_phantom_dataset(out, n, (12, 16, 20), spatial_dims=3, task="multilabel", seed=2,
                                     p_finding=0.8)
    ps = make_phantoms(n, (12, 16, 20), spatial_dims=3, task="multilabel", seed=2, p_finding=0.8)
    cols, rows = _read_manifest(manifest)
    assert cols == ["image", "mask", *FINDINGS, "group"]
    for i, row in enumerate(rows):
        assert row["image"].endswith(".nii.gz") and row["mask"].endswith(".nii.gz")
        img = nib.load(out / row["image"])
        np.testing.assert_array_equal(img.affine, np.eye(4))
        data = np.asarray(img.dataobj)
        assert data.dtype == np.float32
        np.testing.assert_array_equal(data, ps.images[i, 0])
        mask = np.asarray(nib.load(out / row["mask"]).dataobj)
        assert mask.dtype == np.uint8
        np.testing.assert_array_equal(mask.astype(bool), ps.union_masks[i, 0])
        assert [int(row[f]) for f in FINDINGS] == [int(v) for v in ps.labels[i]]
    meta = json.loads((out / "phantoms.json").read_text())
    assert meta["size"] == [12, 16, 20] and meta["spatial_dims"] == 3 and meta["p_finding"] == 0.8
    before = _hashes(out)
    write_phantom_dataset(tmp_path / "again", n, (12, 16, 20), spatial_dims=3, task="multilabel", seed=2,
                          p_finding=0.8)
    assert _hashes(tmp_path / "again") == before


def test_a_generator_never_overwrites_another_data_set(tmp_path):
    """`data phantoms` / `data ecg` into a folder: the same settings again write the same bytes; other
    settings are refused with nothing changed, unless --overwrite, which removes the old set's files first
    (no stale images of a larger set); a folder with another data set (a user's manifest, or the other
    generator's) is always refused."""
    from typer.testing import CliRunner

    from nemt.cli import app

    run = CliRunner().invoke
    ph = tmp_path / "ph"
    assert run(app, ["data", "phantoms", str(ph), "--n", "10", "--size", "16"]).exit_code == 0

    def digest(folder):
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    before = digest(ph)
    assert run(app, ["data", "phantoms", str(ph), "--n", "10", "--size", "16"]).exit_code == 0
    assert digest(ph) == before  # a rerun is harmless
    res = run(app, ["data", "phantoms", str(ph), "--n", "6", "--size", "16"])
    assert res.exit_code != 0 and "other settings (n)" in res.output and "--overwrite" in res.output
    assert digest(ph) == before
    res = run(app, ["data", "ecg", "--out", str(ph), "--n", "5", "--duration", "2"])
    assert res.exit_code != 0 and "`nemt data ecg` did not write" in res.output
    assert digest(ph) == before
    res = run(app, ["data", "phantoms", str(ph), "--n", "6", "--size", "16", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (ph / "images").iterdir()) == [f"{i:05d}.png" for i in range(6)]
    assert sorted(p.name for p in (ph / "masks").iterdir()) == [f"{i:05d}.png" for i in range(6)]
    ecg = tmp_path / "ecg"
    assert run(app, ["data", "ecg", "--out", str(ecg), "--n", "8", "--duration", "2"]).exit_code == 0
    assert json.loads((ecg / "ecg.json").read_text())["n"] == 8
    res = run(app, ["data", "phantoms", str(ecg), "--n", "6", "--size", "16", "--overwrite"])
    assert res.exit_code != 0 and "`nemt data phantoms` did not write" in res.output
    assert run(app, ["data", "ecg", "--out", str(ecg), "--n", "3", "--duration", "2", "--overwrite"]).exit_code == 0
    for sub in ("signals", "findings", "waves"):
        assert len(list((ecg / sub).glob("*.npy"))) == 3, sub
    assert len(list((ecg / "signals").glob("*.json"))) == 3
    own = tmp_path / "mine"
    own.mkdir()
    (own / "manifest.csv").write_text("image,label\na.png,x\n")
    res = run(app, ["data", "phantoms", str(own), "--n", "4", "--size", "16", "--overwrite"])
    assert res.exit_code != 0 and "did not write" in res.output
    assert (own / "manifest.csv").read_text() == "image,label\na.png,x\n" and not (own / "images").exists()
