"""What a card records of its training images' acquisition, and what explain says of an input unlike them."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from nemt.data.acquisition import EXTENT_TOLERANCE, describe, differences, summarise
from nemt.data.readers import read_image
from conftest import write_png


def _nifti(path, shape=(8, 10, 6), zooms=(1.0, 1.0, 2.0)):
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(shape).astype(np.float32),
                             np.diag([*zooms, 1.0])), path)
    return read_image(path)


def _write_dicom(path, a, *, spacing=(0.5, 0.5), window=None, **tags):
    """A grey CR DICOM of pixels ``a`` (uint16: 12 bits stored; uint8: 8), with a pixel spacing and a window if
    given and any further ``tags``; returns its path."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, (ds.Rows, ds.Columns) = "CR", a.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    bits = 12 if a.dtype == np.uint16 else 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = a.dtype.itemsize * 8, bits, bits - 1, 0
    if spacing is not None:
        ds.PixelSpacing = list(spacing)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.PixelData = a.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _dicom(path, spacing=(0.5, 0.5), window=True, rows=20, cols=16):
    """A 12-bit CR of random pixels, read back."""
    a = np.random.default_rng(0).integers(0, 4095, (rows, cols), dtype=np.uint16)
    return read_image(_write_dicom(path, a, spacing=spacing, window=(2000, 1000) if window else None))


def test_describe_per_format(tmp_path):
    """Extent = spacing x samples where the file gives a spacing (None where it does not), the value range's
    source as the readers' table fixes it, a signal's rate from its sidecar."""
    png = read_image(write_png(tmp_path / "a.png", np.zeros((20, 16), np.uint8)))
    def d(img):
        out = describe(img)
        assert out.pop("value_range") == list(img.value_range)
        assert out.pop("axcodes") == (["R", "A", "S"] if img.modality == "nifti" else None)
        return out

    assert d(png) == {"range_from": "type", "extent": None, "fs": None}
    assert d(_nifti(tmp_path / "v.nii.gz")) == {"range_from": "own", "extent": [8.0, 10.0, 12.0], "fs": None}
    assert d(_dicom(tmp_path / "w.dcm")) == {"range_from": "window", "extent": [10.0, 8.0], "fs": None}
    assert d(_dicom(tmp_path / "n.dcm", spacing=None, window=False)) == {"range_from": "own", "extent": None,
                                                                         "fs": None}
    np.save(tmp_path / "s.npy", np.zeros((1, 500), np.float32))
    (tmp_path / "s.json").write_text(json.dumps({"fs": 250, "range": [-5, 5]}))
    assert d(read_image(tmp_path / "s.npy")) == {"range_from": "sidecar", "extent": [2.0], "fs": 250.0}
    np.save(tmp_path / "bare.npy", np.zeros((1, 500), np.float32))
    assert d(read_image(tmp_path / "bare.npy")) == {"range_from": "own", "extent": None, "fs": None}


def test_summary_and_differences(tmp_path):
    train = [describe(_nifti(tmp_path / f"t{i}.nii.gz", zooms=(1.0, 1.0, z))) for i, z in enumerate((1.8, 2.0, 2.2))]
    s = summarise(train)
    assert s["n"] == 3 and s["range_from"] == {"own": 3} and "fs" not in s
    assert s["extent"] == {"n": 3, "min": [8.0, 10.0, 10.8], "median": [8.0, 10.0, 12.0], "max": [8.0, 10.0, 13.2]}
    # inside the training range, and within the tolerance beyond it: nothing to say
    assert differences(s, _nifti(tmp_path / "a.nii.gz", zooms=(1.0, 1.0, 2.1))) == []
    edge = 13.2 * (1 + EXTENT_TOLERANCE) * 0.999 / 6
    assert differences(s, _nifti(tmp_path / "b.nii.gz", zooms=(1.0, 1.0, edge))) == []
    # twice the field of view along the first axis (finer voxels of a larger field: the extent counts)
    notes = differences(s, _nifti(tmp_path / "c.nii.gz", shape=(32, 10, 6), zooms=(0.5, 1.0, 2.0)))
    assert len(notes) == 1 and "16 x 10 x 12" in notes[0] and "x2 x 1 x 1" in notes[0], notes
    # the same field of view on a finer grid: resized to the same input, nothing to say
    assert differences(s, _nifti(tmp_path / "d.nii.gz", shape=(16, 20, 12), zooms=(0.5, 0.5, 1.0))) == []
    # a value range fixed where every training image was scaled by its own (and the reverse)
    dcm = _dicom(tmp_path / "w.dcm")
    s2 = summarise([describe(dcm), describe(dcm)])
    assert s2["range_from"] == {"window": 2} and s2["extent"]["median"] == [10.0, 8.0]
    own = _dicom(tmp_path / "own.dcm", window=False)
    assert ["own minimum and maximum" in n for n in differences(s2, own)] == [True]
    assert differences(s2, own, scale="minmax") == []  # min-max scaling ignores the range: nothing differs
    nowin = summarise([describe(own)] * 2)
    assert ["fixed by its DICOM window" in n for n in differences(nowin, dcm)] == [True]
    assert differences(summarise([describe(own), describe(dcm)]), dcm) == []  # mixed training: either is seen
    # no spacing in the file where every training image had one; not where some training images had none
    png = read_image(write_png(tmp_path / "p.png", np.zeros((20, 16), np.uint8)))
    assert any("gives no spacing" in n for n in differences(s2, png))
    mixed = summarise([describe(dcm), describe(_dicom(tmp_path / "ns.dcm", spacing=None))])
    assert not any("spacing" in n for n in differences(mixed, png))
    # a card without a record: nothing is checked
    assert differences({}, png) == [] and differences(None, png) == []


def test_signal_rate_and_duration(tmp_path):
    def sig(name, n, fs):
        np.save(tmp_path / f"{name}.npy", np.zeros((1, n), np.float32))
        (tmp_path / f"{name}.json").write_text(json.dumps({"fs": fs, "range": [-5, 5]}))
        return read_image(tmp_path / f"{name}.npy")

    s = summarise([describe(sig(f"t{i}", 500, 250)) for i in range(4)])
    assert s["fs"] == {"n": 4, "min": [250.0], "median": [250.0], "max": [250.0]} and s["extent"]["max"] == [2.0]
    assert differences(s, sig("same", 500, 250)) == []
    notes = differences(s, sig("fast", 1000, 500))  # the same 2 s at twice the rate: only the rate differs
    assert len(notes) == 1 and "500 Hz" in notes[0] and "250 Hz" in notes[0]
    notes = differences(s, sig("long", 1000, 250))  # twice the duration
    assert len(notes) == 1 and "duration" in notes[0] and "x2" in notes[0]


def test_training_records_acquisition_and_explain_warns(tmp_path):
    """`nemt train` writes the training split's acquisition into the card; `nemt explain` of a volume with
    another field of view warns and lists the note in its JSON; the map's NIfTI header carries the input's
    sform / qform codes and unit (before: code 2 / 0 and no unit, whatever the input)."""
    from typer.testing import CliRunner

    from nemt.cli import app
    from nemt.data import write_phantom_dataset

    runner = CliRunner()
    manifest = write_phantom_dataset(tmp_path / "data", 24, 16, spatial_dims=3, task="multiclass", seed=0)
    res = runner.invoke(app, ["train", "--data", str(manifest), "--out", str(tmp_path / "m"), "--arch", "smallcnn",
                              "--arch-param", "width=4", "--size", "16", "--dims", "3", "--epochs", "1",
                              "--batch-size", "8", "--no-progress"])
    assert res.exit_code == 0, res.output
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    acq = card["data"]["acquisition"]
    assert acq["n"] == card["data"]["n"]["train"] and acq["range_from"] == {"own": acq["n"]}
    assert acq["extent"]["min"] == acq["extent"]["max"] == [16.0, 16.0, 16.0]  # the phantoms' unit voxels
    vol = next((tmp_path / "data" / "images").glob("*.nii.gz"))
    arr = np.asarray(nib.load(vol).dataobj, dtype=np.float32)
    for name, zooms in (("same", 1.0), ("big", 2.0)):
        img = nib.Nifti1Image(arr, np.diag([zooms] * 3 + [1.0]))
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
        img.header.set_xyzt_units("mm")
        nib.save(img, tmp_path / f"{name}.nii.gz")
    res = runner.invoke(app, ["explain", str(tmp_path / "same.nii.gz"), str(tmp_path / "big.nii.gz"),
                              "--model", str(tmp_path / "m"), "--method", "gradcam", "--target", "0",
                              "--out", str(tmp_path / "x")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("["):])
    assert "notes" not in out[0]
    assert len(out[1]["notes"]) == 1 and "32 x 32 x 32" in out[1]["notes"][0]
    assert "warning:" in res.output and "outside training's 16 x 16 x 16" in res.output
    m = nib.load(tmp_path / "x" / f"{out[1]['files'][0]}.nii.gz")
    assert (int(m.header["sform_code"]), int(m.header["qform_code"])) == (1, 1)
    assert m.header.get_xyzt_units()[0] == "mm"
    assert np.allclose(np.diag(m.affine)[:3], 2.0)


@pytest.mark.parametrize("modality", ["dicom", "npy"])
def test_map_header_without_a_nifti_input(tmp_path, modality):
    """A DICOM input's map is in mm; an array's has no unit (a sidecar's spacing gives none); both "aligned"."""
    from nemt.data.readers import map_nifti

    if modality == "dicom":
        like = _dicom(tmp_path / "w.dcm")
    else:
        np.save(tmp_path / "a.npy", np.zeros((1, 4, 4, 4), np.float32))
        like = read_image(tmp_path / "a.npy")
    m = nib.Nifti1Image.from_bytes(map_nifti(np.zeros((4, 4, 4)), np.diag([2.0, 2.0, 2.0, 1.0]), like))
    assert (int(m.header["sform_code"]), int(m.header["qform_code"])) == (2, 0)
    assert m.header.get_xyzt_units()[0] == ("mm" if modality == "dicom" else "unknown")


def test_data_check_reports_acquisition_and_mixed_ranges(tmp_path):
    """`nemt data check` reports what a card would record, and warns when some images are scaled by their own
    range and others by a fixed one (a DICOM window on half of them): the same intensity maps to other values."""
    from nemt.data.check import check_dataset
    from nemt.data.manifest import open_dataset

    rows = ["image,label"]
    for i in range(6):
        _dicom(tmp_path / f"d{i}.dcm", window=i % 2 == 0)
        rows.append(f"d{i}.dcm,{'ab'[i % 2]}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    rep = check_dataset(open_dataset(tmp_path / "manifest.csv"))
    assert rep.to_dict()["acquisition"]["range_from"] == {"own": 3, "window": 3}
    assert rep.acquisition["extent"]["median"] == [10.0, 8.0]
    assert [w.field for w in rep.warnings].count("value range") == 1 and rep.ok
    rows = ["image,label"] + [f"d{i}.dcm,{'ab'[i % 2]}" for i in (0, 2, 4, 1)]  # one own among windows: still
    (tmp_path / "m2.csv").write_text("\n".join(rows) + "\n")
    assert "value range" in [w.field for w in check_dataset(open_dataset(tmp_path / "m2.csv")).warnings]
    (tmp_path / "m3.csv").write_text("\n".join(["image,label", "d0.dcm,a", "d2.dcm,b", "d4.dcm,a"]) + "\n")
    assert "value range" not in [w.field for w in check_dataset(open_dataset(tmp_path / "m3.csv")).warnings]


@pytest.mark.parametrize("codes,voxel", [(("R", "A", "S"), (3, 4, 2)), (("L", "P", "S"), (0, 0, 2)),
                                         (("A", "S", "R"), (4, 2, 3)), (("P", "I", "L"), (0, 2, 0))])
def test_volumes_are_shown_in_axial_slices_radiologically(codes, voxel):
    """The voxel at the patient's right, most anterior, is shown at the top left of its axial slice (anterior
    up, right on the viewer's left), whatever the stored orientation; the slice axis comes first."""
    from nemt.visualize import display_order

    shape = {("R", "A", "S"): (4, 5, 6), ("L", "P", "S"): (4, 5, 6), ("A", "S", "R"): (5, 6, 4),
             ("P", "I", "L"): (5, 6, 4)}[codes]
    a = np.zeros(shape)
    a[voxel] = 1.0
    shown = display_order(a, codes)
    assert shown.shape == (6, 5, 4)  # superior-inferior, anterior-posterior, right-left
    z, row, col = np.unravel_index(np.argmax(shown), shown.shape)
    assert (row, col) == (0, 0)
    assert display_order(a, None) is a and display_order(a, ("R", "A", None)) is a


def test_benchmark_records_inputs_unlike_training(small_csv):
    """A benchmark on images unlike the card's record (PNGs without spacing and a fixed 8-bit range, where the
    model was trained on windowed DICOM with a 300 mm field of view) counts them for run.json and the report;
    on images like the record it records nothing."""
    import torch

    from nemt.bench.runner import load_benchmark_data, unlike_training_text
    from nemt.data.manifest import open_dataset
    from nemt.models import Classifier, build_model

    torch.manual_seed(0)
    net = build_model("smallcnn", spatial_dims=2, in_channels=1, out_channels=3, width=4)
    manifest = open_dataset(small_csv)
    clf = Classifier.from_module(net, spatial_dims=2, in_channels=1, input_size=(16, 16), task="multiclass",
                                 label_names=list(manifest.label_names))
    clf.card.data = {"acquisition": summarise([{"range_from": "window", "extent": [300.0, 300.0], "fs": None}] * 4)}
    data = load_benchmark_data(clf, manifest, [0, 1, 2])
    u = data.unlike_training
    assert (u["n"], u["of"]) == (3, 3) and u["first"]["image"] == manifest.samples[0].name
    assert len(u["first"]["notes"]) == 1  # the spacing only: an 8-bit PNG's range is fixed, as a window is
    text = unlike_training_text(u)
    assert text.startswith("3 of 3 images are unlike") and "gives no spacing" in text
    clf.card.data = {"acquisition": summarise([{"range_from": "type", "extent": None, "fs": None}] * 4)}
    assert load_benchmark_data(clf, manifest, [0, 1, 2]).unlike_training is None


def test_report_gallery_planes_follow_the_orientation():
    """A RAS volume's gallery rows are axial, coronal and sagittal through the lesion's centre, each slice shown
    radiologically (its voxel at the patient's right, most anterior, at the top left of the axial slice);
    without an orientation the stored axes' planes, as before."""
    from nemt.bench.report import gallery_planes

    unit = np.zeros((1, 4, 5, 6))  # X (to the right), Y (to anterior), Z (to superior)
    gt = np.zeros((4, 5, 6), bool)
    gt[3, 4, 2] = True  # right, most anterior, slice 2
    planes = gallery_planes(unit + gt, gt, {"m": gt.astype(float)}, axcodes=["R", "A", "S"])
    assert [p[0] for p in planes] == ["axial = 2", "coronal = 0", "sagittal = 0"]
    name, u, g, ms = planes[0]
    assert u.shape == (1, 5, 4) and g[0, 0] and ms["m"][0, 0] == 1 and u[0, 0, 0] == 1
    assert [p[0] for p in gallery_planes(unit, gt, {}, axcodes=None)] == ["axis 0 = 3", "axis 1 = 4", "axis 2 = 2"]


def test_one_slice_volumes_get_a_squeeze_hint(tmp_path):
    """An X x Y x 1 NIfTI data set is a 2D data set stored as volumes: training it as 3D would stretch one slice
    into many, as 2D is refused for its dimensionality; both errors say so and what to do."""
    from typer.testing import CliRunner

    from nemt.cli import app

    rows = ["image,label"]
    for i in range(8):
        nib.save(nib.Nifti1Image(np.random.default_rng(i).random((20, 16, 1)).astype(np.float32), np.eye(4)),
                 tmp_path / f"v{i}.nii.gz")
        rows.append(f"v{i}.nii.gz,{'ab'[i % 2]}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    runner = CliRunner()
    for size in ("16", "16x16"):
        res = runner.invoke(app, ["train", "--data", str(tmp_path / "m.csv"), "--size", size, "--epochs", "1",
                                  "--arch", "smallcnn", "--out", str(tmp_path / f"o{size}"), "--no-progress"])
        out = " ".join(res.output.split())
        assert res.exit_code != 0 and "a 2D image stored as a volume of one slice" in out, out
        assert ("stretch one slice" in out) == (size == "16")


def _study_dicom(path, a, **tags):
    """An 8-bit grey DICOM in a study, with patient tags and a pixel spacing (a CR of another size)."""
    return _write_dicom(path, a.astype(np.uint8), spacing=(0.2, 0.2), PatientName="Doe^Jane", PatientID="P123",
                        StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(), **tags)


def test_explain_writes_secondary_captures_in_the_source_study(tmp_path):
    """`explain --dicom`: per label a Secondary Capture of the map over the source at the source's size, in its
    study and patient, a new series per label, naming its source; the same run again gives the same UIDs; a
    non-DICOM input or --data is refused before any output."""
    import pydicom
    from typer.testing import CliRunner

    from conftest import train_phantom_model
    from nemt.cli import app
    from nemt.deploy.dicom import SECONDARY_CAPTURE, overlay_at_source
    from nemt.models import load_model

    manifest, model = train_phantom_model(tmp_path, n=24, size=32)
    png = sorted((tmp_path / "data" / "images").glob("*.png"))[0]
    from PIL import Image as PILImage
    grey = np.asarray(PILImage.open(png).resize((48, 64)))  # 64 rows x 48 columns: not the model's 32 x 32
    src = _study_dicom(tmp_path / "cr.dcm", grey)
    runner = CliRunner()
    ok = []
    for run in ("x", "y"):
        res = runner.invoke(app, ["explain", str(src), "--model", str(model), "--method", "gradcam", "--target",
                                  "all", "--dicom", "--out", str(tmp_path / run)])
        assert res.exit_code == 0, res.output
        ok.append(sorted((tmp_path / run).glob("*.dcm")))
    labels = load_model(model).label_names
    assert [p.name for p in ok[0]] == sorted(f"cr__{n}.dcm" for n in labels)
    source = pydicom.dcmread(src)
    clf = load_model(model)
    series = set()
    for path, again in zip(*ok):
        sc, sc2 = pydicom.dcmread(path), pydicom.dcmread(again)
        assert sc.SOPClassUID == SECONDARY_CAPTURE and list(sc.ImageType) == ["DERIVED", "SECONDARY"]
        assert (sc.Rows, sc.Columns, sc.PhotometricInterpretation) == (64, 48, "RGB")
        assert (str(sc.PatientName), sc.PatientID, sc.StudyInstanceUID) == ("Doe^Jane", "P123",
                                                                          source.StudyInstanceUID)
        assert [float(v) for v in sc.PixelSpacing] == [0.2, 0.2]
        assert sc.SeriesInstanceUID != source.SeriesInstanceUID and sc.SOPInstanceUID != source.SOPInstanceUID
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert "not for diagnostic use" in sc.ImageComments and "gradcam" in sc.SeriesDescription
        assert (sc2.SOPInstanceUID, sc2.SeriesInstanceUID) == (sc.SOPInstanceUID, sc.SeriesInstanceUID)
        series.add(sc.SeriesInstanceUID)
        # its pixels are the written map over the source, blended as the service's overlays are
        m = np.load(path.with_suffix(".npy"))
        want = overlay_at_source(clf.preprocessing.unit_scale(read_image(src)), m)
        assert np.array_equal(sc.pixel_array, want)
    assert len(series) == len(labels)
    for args, needle in (([str(png)], "not a DICOM file"), (["--data", str(manifest)], "not --data")):
        res = runner.invoke(app, ["explain", *args, "--model", str(model), "--method", "gradcam", "--dicom",
                                  "--out", str(tmp_path / "z")])
        assert res.exit_code == 2 and needle in " ".join(res.output.split()), res.output
        assert not (tmp_path / "z").exists()
