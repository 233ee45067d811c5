"""A folder of one DICOM series (a file per slice) read as a volume, as a NIfTI converted from it reads."""
from __future__ import annotations

import json
import random

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from nemt.data.readers import read_image
from nemt.errors import DataError

ROWS, COLS, SLICES = 6, 8, 5


def write_series(folder, *, seed=0, window=None, series=None, positions=None, drop=None, sizes=None,
                 sagittal=False):
    """A CT series of SLICES slices of ROWS x COLS (voxel value = its index in C order of (slice, row, column)),
    stored under shuffled file names; slice k at z = 30 + 2.5 k mm, rows along +y (0.5 mm), columns along +x
    (0.7 mm), HU = stored - 1024."""
    folder.mkdir(parents=True, exist_ok=True)
    study, uid, frame = generate_uid(), series or generate_uid(), generate_uid()
    vol = np.arange(SLICES * ROWS * COLS, dtype=np.int16).reshape(SLICES, ROWS, COLS)
    order = list(range(SLICES))
    random.Random(seed).shuffle(order)
    for fi, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"IM{fi:04d}"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, uid, frame
        ds.Modality, ds.PixelSpacing, ds.SliceThickness = "CT", [0.5, 0.7], 2.5
        rows, cols = (sizes or {}).get(k, (ROWS, COLS))
        ds.Rows, ds.Columns = rows, cols
        if sagittal:  # rows along +y, columns along -z (feet); slices from x = 5 mm toward the right, 2 mm apart
            ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
            ds.ImagePositionPatient = [5 - 2.0 * k, -20, 40]
        else:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [-10, -20, (positions or {}).get(k, 30 + 2.5 * k)]
        ds.InstanceNumber = fi + 1  # not the slice order: position decides
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        if window:
            ds.WindowCenter, ds.WindowWidth = window
        if drop:
            delattr(ds, drop)
        ds.PixelData = np.resize(vol[k], (rows, cols)).astype(np.int16).tobytes()
        ds.save_as(folder / f"IM{fi:04d}", enforce_file_format=True)
    return folder


def test_series_is_a_volume_in_position_order_with_its_affine(tmp_path):
    img = read_image(write_series(tmp_path / "ct"))
    assert img.array.shape == (1, COLS, ROWS, SLICES) and img.modality == "dicom"
    # voxel (x, y, z) is stored value z*ROWS*COLS + y*COLS + x, minus 1024: slices in position order whatever
    # the file names and InstanceNumbers say
    z, y, x = np.meshgrid(np.arange(SLICES), np.arange(ROWS), np.arange(COLS), indexing="ij")
    want = (z * ROWS * COLS + y * COLS + x - 1024).transpose(2, 1, 0)
    assert np.array_equal(img.array[0], want.astype(np.float32))
    # nibabel's DICOM affine in RAS: columns along +x in LPS are -x in RAS; first voxel at LPS (-10, -20, 30)
    assert np.allclose(img.affine, [[-0.7, 0, 0, 10], [0, -0.5, 0, 20], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    assert img.spacing == pytest.approx((0.7, 0.5, 2.5)) and img.meta["axcodes"] == ["L", "P", "S"]
    assert img.value_range == (-1024.0, float(SLICES * ROWS * COLS - 1 - 1024))
    assert (img.meta["range_from"], img.meta["series"]) == ("own", SLICES)
    # a window on the slices is applied as the 2D reader applies a file's
    win = read_image(write_series(tmp_path / "w", window=(-900, 200)))
    assert win.meta["range_from"] == "window" and win.meta["window"] == [-900.0, 200.0]
    assert win.array.min() == win.value_range[0] and win.array.max() == win.value_range[1]


def test_sagittal_series_is_ordered_along_its_normal():
    """A sagittal series (slices along x, not z): ordered along its own normal, its slice spacing from the
    positions' distance, not their z (which is the same for every slice)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        img = read_image(write_series(Path(d) / "sag", sagittal=True))
    # LPS columns: column index along (0, 1, 0) x 0.7, row index along (0, 0, -1) x 0.5, slice (-2, 0, 0); RAS flips x, y
    assert np.allclose(img.affine, [[0, 0, 2, -5], [-0.7, 0, 0, 20], [0, -0.5, 0, 40], [0, 0, 0, 1]])
    assert img.spacing == pytest.approx((0.7, 0.5, 2.0))
    # slice k of the files' numbering (x = 5 - 2k) is at index k along the normal (-1, 0, 0): in order
    assert img.array[0, 0, 0, :].tolist() == [k * ROWS * COLS - 1024 for k in range(SLICES)]


@pytest.mark.parametrize("case, field, reason", [
    ("other file", "file", "not a DICOM file"),
    ("two series", "SeriesInstanceUID", "2 series in one folder"),
    ("same position", "ImagePositionPatient", "positions hold more than one slice"),
    ("gap", "ImagePositionPatient", "missing slices or a varying thickness"),
    ("no position", "ImagePositionPatient", "missing"),
    ("sizes", "Rows/Columns", "slices of different sizes"),
    ("empty", "file", "an empty folder"),
])
def test_series_refusals_name_the_file_field_and_reason(tmp_path, case, field, reason):
    folder = tmp_path / "ct"
    if case == "other file":
        write_series(folder)
        (folder / "notes.txt").write_text("report")
    elif case == "two series":
        write_series(folder)
        write_series(tmp_path / "b", seed=1)
        for i, p in enumerate(sorted((tmp_path / "b").iterdir())):
            p.rename(folder / f"B{i}")
    elif case == "same position":
        write_series(folder, positions={3: 30.0})
    elif case == "gap":
        write_series(folder, positions={4: 45.0})  # 2.5 mm steps, then 7.5 mm: slices missing
    elif case == "no position":
        write_series(folder, drop="ImagePositionPatient")
    elif case == "sizes":
        write_series(folder, sizes={2: (ROWS, COLS + 2)})
    else:
        folder.mkdir()
    with pytest.raises(DataError) as e:
        read_image(folder)
    assert e.value.field == field and reason in str(e.value), str(e.value)


def test_series_size_is_checked_before_decoding(tmp_path):
    from nemt.data.readers import ImageTooLarge
    with pytest.raises(ImageTooLarge):
        read_image(write_series(tmp_path / "ct"), max_pixels=SLICES * ROWS * COLS - 1)


def test_a_series_folder_is_explained_and_checked_through_the_cli(tmp_path):
    """A 3D model explains a series folder: its NIfTI map lies in the series' scanner coordinates (codes 1, mm);
    a manifest row may name a series folder (`data check` reads it as one volume)."""
    import torch
    from typer.testing import CliRunner

    from nemt.cli import app
    from nemt.models import Classifier, build_model

    torch.manual_seed(0)
    net = build_model("smallcnn", spatial_dims=3, in_channels=1, out_channels=2, width=4)
    Classifier.from_module(net, spatial_dims=3, in_channels=1, input_size=(16, 16, 16), task="multiclass",
                           label_names=["a", "b"], arch="smallcnn").save(tmp_path / "m")
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    card["arch_kwargs"] = {"width": 4}
    (tmp_path / "m" / "model.json").write_text(json.dumps(card))
    series = write_series(tmp_path / "ct")
    runner = CliRunner()
    res = runner.invoke(app, ["explain", str(series), "--model", str(tmp_path / "m"), "--method", "gradcam",
                              "--target", "0", "--out", str(tmp_path / "x")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("["):])
    m = nib.load(tmp_path / "x" / f"{out[0]['files'][0]}.nii.gz")
    assert m.shape == (16, 16, 16) and (int(m.header["sform_code"]), int(m.header["qform_code"])) == (1, 1)
    img = read_image(series)
    centre_in = img.affine @ np.r_[(np.array(img.array.shape[1:]) - 1) / 2, 1]
    assert np.allclose(m.affine @ np.r_[7.5, 7.5, 7.5, 1], centre_in)  # the same world centre
    write_series(tmp_path / "ct2", seed=2)
    (tmp_path / "manifest.csv").write_text("image,label\nct,a\nct2,b\n")
    res = runner.invoke(app, ["data", "check", str(tmp_path / "manifest.csv"), "--no-progress", "--json",
                              str(tmp_path / "check.json")])
    check = json.loads((tmp_path / "check.json").read_text())
    assert check["images"] == 2 and check["sizes"] == {f"{COLS}x{ROWS}x{SLICES}": 2} and not check["fatal"]
