"""The image readers' audit findings: what ``scale="range"`` maps, integer TIFFs, orientation, DICOM windows,
LUTs and functional groups, masks with alpha, 16-bit colour, and the messages of files nemt does not read."""
from __future__ import annotations

import json
import struct
import warnings
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image as PILImage
from PIL import ImageOps

from nemt.data import open_dataset
from nemt.data.check import check_dataset
from nemt.data.preprocess import Preprocessing
from nemt.data.readers import read_image, read_mask
from nemt.errors import DataError

from test_readers import make_dicom  # the DICOM maker of the reader tests

tifffile = pytest.importorskip("tifffile")  # scikit-image's dependency: writes the TIFF variants Pillow does not

STORED12 = np.array([[0, 1000, 1064], [1100, 2000, 4095]], np.uint16)


def png16(path: Path, a: np.ndarray) -> Path:
    """A 16-bit PNG of ``a`` (H, W, 2) grey+alpha or (H, W, 3) RGB, written by hand (Pillow writes neither)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    h, w, c = a.shape
    raw = b"".join(b"\x00" + a[i].astype(">u2").tobytes() for i in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, {2: 4, 3: 2}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def resave(path: Path, edit) -> Path:
    """Read a DICOM file, let ``edit(ds)`` change it, write it back."""
    import pydicom

    ds = pydicom.dcmread(path)
    edit(ds)
    ds.save_as(path)
    return path


def folder(root: Path, files: dict[str, object]) -> Path:
    """A class-folder data set: ``{"a/0.png": array or writer}``."""
    for name, what in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if callable(what):
            what(p)
        else:
            PILImage.fromarray(what).save(p)
    return root


# -- 1. what scale="range" maps to [0, 1], per format ---------------------------------------------------

def test_scale_range_table(tmp_path):
    """One file of each kind: the value range the module docstring's table gives."""
    g8 = np.array([[10, 20, 30], [40, 50, 60]], np.uint8)
    g16 = g8.astype(np.uint16) * 100
    PILImage.fromarray(g8).save(tmp_path / "g8.png")
    PILImage.fromarray(g16).save(tmp_path / "g16.png")
    PILImage.fromarray(np.dstack([g8] * 3)).save(tmp_path / "c.jpg")
    PILImage.fromarray(g8).save(tmp_path / "g8.bmp")
    tifffile.imwrite(tmp_path / "u16.tif", g16)
    tifffile.imwrite(tmp_path / "i16.tif", g16.astype(np.int16))
    tifffile.imwrite(tmp_path / "f32.tif", g8.astype(np.float32) / 100)
    make_dicom(tmp_path / "win.dcm", STORED12, BitsStored=12, HighBit=11, WindowCenter=2000, WindowWidth=1000)
    make_dicom(tmp_path / "raw.dcm", STORED12, BitsStored=12, HighBit=11, RescaleSlope=2, RescaleIntercept=-100)
    nib.save(nib.Nifti1Image(np.stack([g8, g8 + 1], -1).astype(np.int16), np.eye(4)), tmp_path / "v.nii.gz")
    np.save(tmp_path / "side.npy", g8.astype(np.float32))
    (tmp_path / "side.json").write_text(json.dumps({"range": [0, 100]}))
    np.save(tmp_path / "own.npy", g8.astype(np.float32))
    want = {"g8.png": (0, 255), "g16.png": (0, 65535), "c.jpg": (0, 255), "g8.bmp": (0, 255),
            "u16.tif": (0, 65535), "i16.tif": (1000, 6000), "f32.tif": (0.1, 0.6),
            "win.dcm": (0, 4095),  # the window's output: the 12 stored bits' range
            "raw.dcm": (-100, 8090),  # no window: own min..max after the rescale
            "v.nii.gz": (10, 61), "side.npy": (0, 100), "own.npy": (10, 60)}
    for name, (lo, hi) in want.items():
        img = read_image(tmp_path / name)
        np.testing.assert_allclose(img.value_range, (lo, hi), rtol=1e-6, err_msg=name)
        unit = Preprocessing(size=img.array.shape[1:], channels=img.array.shape[0]).unit_scale(img)
        np.testing.assert_allclose(unit, np.clip((img.array - lo) / (hi - lo), 0, 1), atol=1e-6, err_msg=name)


# -- 2. integer TIFFs: by the sample type, not the values ------------------------------------------------

def test_integer_tiff_range_by_sample_type_only(tmp_path):
    a = np.array([[0, 1000], [2000, 3000]], np.int16)
    b = a.copy()
    b[0, 0] = -1
    tifffile.imwrite(tmp_path / "a.tif", a)  # int16 without a negative value
    tifffile.imwrite(tmp_path / "b.tif", b)  # and with one: the same rule
    ra, rb = read_image(tmp_path / "a.tif"), read_image(tmp_path / "b.tif")
    assert ra.value_range == (0, 3000) and rb.value_range == (-1, 3000)
    assert ra.meta["bits"] == rb.meta["bits"] == 16
    tifffile.imwrite(tmp_path / "i32.tif", np.array([[0, 5], [7, 9]], np.int32))
    r32 = read_image(tmp_path / "i32.tif")
    assert r32.value_range == (0, 9) and r32.meta["bits"] == 32
    tifffile.imwrite(tmp_path / "i8.tif", np.array([[-5, 0], [3, 100]], np.int8))  # Pillow decodes it as uint8
    r8 = read_image(tmp_path / "i8.tif")
    np.testing.assert_array_equal(r8.array[0], [[-5, 0], [3, 100]])
    assert r8.value_range == (-5, 100) and r8.meta["bits"] == 8
    tifffile.imwrite(tmp_path / "u16.tif", np.array([[0, 7]], np.uint16))
    assert read_image(tmp_path / "u16.tif").value_range == (0, 65535)


# -- 3. EXIF / TIFF orientation --------------------------------------------------------------------------

def test_orientation_6_read_as_a_viewer_shows_it(tmp_path):
    raw = np.zeros((40, 60), np.uint8)
    raw[:10] = 255  # a bright band along the stored top
    exif = PILImage.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    PILImage.fromarray(raw).save(tmp_path / "o.png", exif=exif.tobytes())
    PILImage.fromarray(raw).save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=95)
    tifffile.imwrite(tmp_path / "o.tif", raw, photometric="minisblack", extratags=[(274, "H", 1, 6, True)])
    upright = np.rot90(raw, -1)  # 60 x 40, the band along the right edge
    with PILImage.open(tmp_path / "o.png") as im:
        np.testing.assert_array_equal(np.asarray(ImageOps.exif_transpose(im)), upright)
    for name in ("o.png", "o.tif"):
        img = read_image(tmp_path / name)
        np.testing.assert_array_equal(img.array[0], upright, err_msg=name)
        assert img.meta["orientation"] == 6
    jpeg = read_image(tmp_path / "o.jpg")
    assert jpeg.array.shape == (1, 60, 40) and jpeg.array[0, :, -5:].mean() > 200 and jpeg.array[0, :, :25].max() < 60
    mask = read_mask(tmp_path / "o.png", like=read_image(tmp_path / "o.png"))  # a mask turns with its image
    np.testing.assert_array_equal(mask[0], upright > 0)


# -- 4. an unusable window is no window ------------------------------------------------------------------

@pytest.mark.parametrize("center,width", [("", ""), (100, 0), (100, -5)])
def test_empty_or_zero_width_window_is_no_window(tmp_path, center, width):
    img = read_image(make_dicom(tmp_path / "w.dcm", STORED12, BitsStored=12, HighBit=11,
                                WindowCenter=center, WindowWidth=width))
    np.testing.assert_array_equal(img.array[0], STORED12)
    assert img.value_range == (0, 4095) and img.meta["voi"] == "none"
    assert "no window" in img.meta["window_ignored"]


# -- 5. enhanced multi-frame DICOM: rescale and window from the functional groups ----------------------

def _enhanced(path: Path, per_frame: list | None = None, **shared_groups) -> Path:
    from pydicom import uid
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    def item(**tags):
        ds = Dataset()
        for k, v in tags.items():
            setattr(ds, k, v)
        return ds

    groups = {}
    if shared_groups:
        sh = Dataset()
        for seq, tags in shared_groups.items():
            setattr(sh, seq, Sequence([item(**tags)]))
        groups["SharedFunctionalGroupsSequence"] = Sequence([sh])
    if per_frame:
        frames = []
        for f in per_frame:
            fd = Dataset()
            for seq, tags in f.items():
                setattr(fd, seq, Sequence([item(**tags)]))
            frames.append(fd)
        groups["PerFrameFunctionalGroupsSequence"] = Sequence(frames)
    p = make_dicom(path, np.stack([STORED12] * 2), BitsStored=12, HighBit=11, NumberOfFrames=2, Modality="CT",
                   **groups)
    return resave(p, lambda ds: setattr(ds.file_meta, "MediaStorageSOPClassUID", uid.EnhancedCTImageStorage))


def test_enhanced_dicom_functional_groups(tmp_path):
    pvt = {"RescaleSlope": 1, "RescaleIntercept": -1024, "RescaleType": "HU"}
    voi = {"WindowCenter": 40, "WindowWidth": 400}
    img = read_image(_enhanced(tmp_path / "e.dcm", PixelValueTransformationSequence=pvt, FrameVOILUTSequence=voi))
    assert img.array.shape == (1, 2, 2, 3) and img.value_range == (-1024, 3071)
    assert img.meta["voi"] == "window" and img.meta["window"] == [40, 400]
    assert img.meta["rescale_from"].startswith("SharedFunctionalGroupsSequence")
    hu = STORED12.astype(float) - 1024
    lo, hi = -1024, 3071
    want = np.clip(((hu - 39.5) / 399 + 0.5), 0, 1) * (hi - lo) + lo  # DICOM's LINEAR window on the HU
    np.testing.assert_allclose(img.array[0, 1], want, rtol=1e-5, atol=1e-3)
    # per-frame groups: one rescale for all frames, a window that differs is the first frame's (and said so)
    same = {"PixelValueTransformationSequence": pvt}
    other_window = {**voi, "WindowCenter": 400}
    img = read_image(_enhanced(tmp_path / "p.dcm", per_frame=[{**same, "FrameVOILUTSequence": voi},
                                                              {**same, "FrameVOILUTSequence": other_window}]))
    assert img.meta["window"] == [40, 400] and "first frame" in img.meta["window_from"]
    assert img.array[0, 0, 0, 0] == -1024
    other = {"RescaleSlope": 2, "RescaleIntercept": 0}
    with pytest.raises(DataError, match="PerFrameFunctionalGroupsSequence.PixelValueTransformationSequence") as e:
        read_image(_enhanced(tmp_path / "d.dcm", per_frame=[same, {"PixelValueTransformationSequence": other}]))
    assert "2 different rescales" in str(e.value)


# -- 6 and 7. the data check: multi-page TIFF, one dimensionality, channels as loading -------------------

def test_check_warns_about_a_multipage_tiff(tmp_path):
    rng = np.random.default_rng(0)
    files = {f"{c}/{i}.png": rng.integers(0, 255, (8, 8), dtype=np.uint8) for c in "ab" for i in range(5)}
    files["b/stack.tif"] = lambda p: tifffile.imwrite(p, rng.integers(0, 255, (5, 8, 8), dtype=np.uint8),
                                                      photometric="minisblack")
    rep = check_dataset(open_dataset(folder(tmp_path, files)))
    assert rep.ok
    pages = [str(w) for w in rep.warnings if w.field == "pages"]
    assert len(pages) == 1 and "stack.tif" in pages[0] and "5 pages" in pages[0] and "page 1" in pages[0]
    assert read_image(tmp_path / "b/stack.tif").array.shape == (1, 8, 8)


def test_check_refuses_mixed_dimensionality(tmp_path):
    rng = np.random.default_rng(0)
    files = {f"{c}/{i}.png": rng.integers(0, 255, (8, 8), dtype=np.uint8) for c in "ab" for i in range(5)}
    files["a/mf.dcm"] = lambda p: make_dicom(p, rng.integers(0, 4000, (3, 8, 8)).astype(np.uint16),
                                             NumberOfFrames=3)
    rep = check_dataset(open_dataset(folder(tmp_path, files)))
    assert not rep.ok and len(rep.fatal) == 1
    assert rep.fatal[0].field == "shape" and "mf.dcm" in str(rep.fatal[0]) and "3D" in str(rep.fatal[0])
    assert rep.n_images == 10 and rep.per_label == {"a": 5, "b": 5}


def test_check_channels_by_the_loading_rule(tmp_path):
    rng = np.random.default_rng(0)

    def vol(*shape):
        return lambda p: nib.save(nib.Nifti1Image(rng.integers(0, 255, shape).astype(np.int16), np.eye(4)), p)

    files = {f"{c}/{i}.nii.gz": vol(4, 4, 4) for c in "ab" for i in range(5)}
    files["a/multi.nii.gz"] = vol(4, 4, 4, 3)  # 3 volumes: loading refuses them for a 1-channel model
    rep = check_dataset(open_dataset(folder(tmp_path / "vol", files)))
    assert not rep.ok and [e.field for e in rep.fatal] == ["channels"]
    assert "multi.nii.gz" in str(rep.fatal[0]) and "3 volumes" in str(rep.fatal[0])
    # grey and colour 2D images are converted when loaded: still a warning only
    files = {f"{c}/{i}.png": rng.integers(0, 255, (8, 8) if i else (8, 8, 3), dtype=np.uint8)
             for c in "ab" for i in range(5)}
    rep = check_dataset(open_dataset(folder(tmp_path / "2d", files)))
    assert rep.ok and any(w.field == "channels" for w in rep.warnings)


# -- 8. masks with alpha -----------------------------------------------------------------------------

def test_mask_alpha_marks_transparent_pixels_background(tmp_path):
    lesion = np.zeros((4, 4), bool)
    lesion[1:3, 1:3] = True
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere, opaque only on the lesion
    rgba[..., 3] = lesion * 255
    PILImage.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "rgba.png")[0], lesion)
    la = np.stack([np.full((4, 4), 200, np.uint8), (lesion * 255).astype(np.uint8)], -1)
    PILImage.fromarray(la, "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "la.png")[0], lesion)
    opaque = np.zeros((4, 4, 4), np.uint8)
    opaque[..., 3] = 255
    opaque[..., 0] = lesion * 9
    PILImage.fromarray(opaque, "RGBA").save(tmp_path / "opaque.png")  # as before: the colours alone
    np.testing.assert_array_equal(read_mask(tmp_path / "opaque.png")[0], lesion)


# -- 9. 16-bit colour ---------------------------------------------------------------------------------

def test_16bit_colour_is_read_as_8bit_and_said(tmp_path):
    g = np.array([[0, 256, 1000], [40000, 65535, 7]], np.uint16)
    png16(tmp_path / "rgb.png", np.dstack([g, g, g]))
    tifffile.imwrite(tmp_path / "rgb.tif", np.dstack([g, g, g]), photometric="rgb")
    for name in ("rgb.png", "rgb.tif"):
        img = read_image(tmp_path / name)
        assert img.array.shape == (3, 2, 3) and img.value_range == (0, 255), name
        np.testing.assert_array_equal(img.array[0], g >> 8)
        assert img.meta["bits"] == 8 and img.meta["stored_bits"] == 16 and "8-bit" in img.meta["note"]
    la = read_image(png16(tmp_path / "la.png", np.dstack([g, np.full_like(g, 65535)])))
    assert la.array.shape == (1, 2, 3) and la.meta["bits"] == 8 and "grey+alpha" in la.meta["note"]
    rng = np.random.default_rng(0)
    files = {f"{c}/{i}.png": rng.integers(0, 255, (2, 3, 3), dtype=np.uint8) for c in "ab" for i in range(5)}
    files["a/rgb16.png"] = lambda p: png16(p, np.dstack([g, g, g]))
    rep = check_dataset(open_dataset(folder(tmp_path / "ds", files)))
    bits = [str(w) for w in rep.warnings if w.field == "bits"]
    assert len(bits) == 1 and "rgb16.png" in bits[0] and "16-bit colour read as 8-bit" in bits[0]


# -- 10. VOI LUT range from its data ------------------------------------------------------------------

def test_voi_lut_range_is_the_lut_data(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    voi = Dataset()
    voi.LUTDescriptor = [4096, 0, 16]  # declares 16 bits, holds 12-bit values
    voi.LUTData = np.arange(4096).astype("<u2").tobytes()
    img = read_image(make_dicom(tmp_path / "v.dcm", np.array([[0, 2000], [3000, 4095]], np.uint16), BitsStored=12,
                                HighBit=11, VOILUTSequence=Sequence([voi])))
    assert img.value_range == (0, 4095) and img.meta["voi"] == "lut"
    assert img.array.max() == img.value_range[1]


# -- 11. compressed DICOM the installed decoders cannot read -----------------------------------------

def _decoders(ts) -> tuple[str, ...]:
    from pydicom.pixels import get_decoder

    d = get_decoder(ts)
    return tuple(d.available_plugins) if d.is_available else ()


def test_jpeg_12bit_refused_up_front_and_htj2k_hint(tmp_path):
    import io

    from pydicom import uid
    from pydicom.encaps import encapsulate

    if _decoders(uid.JPEGExtended12Bit) != ("pillow",):
        pytest.skip("a decoder besides Pillow reads 12-bit JPEG here")
    buf = io.BytesIO()
    PILImage.fromarray(np.zeros((8, 8), np.uint8)).save(buf, "JPEG")
    j = bytearray(buf.getvalue())
    i = j.index(b"\xff\xc0")
    j[i + 1], j[i + 4] = 0xC1, 12  # SOF1 (extended), 12-bit precision
    p = make_dicom(tmp_path / "j12.dcm", np.zeros((8, 8), np.uint16), ts=uid.JPEGExtended12Bit,
                   pixel_bytes=encapsulate([bytes(j)]), BitsStored=12, HighBit=11)
    with pytest.raises(DataError) as e:
        read_image(p)
    assert e.value.field == "TransferSyntaxUID" and "1.2.840.10008.1.2.4.51" in str(e.value)
    assert "pylibjpeg-libjpeg" in str(e.value) and "RuntimeError" not in str(e.value)
    if _decoders(uid.HTJ2KLossless):
        pytest.skip("an HTJ2K decoder is installed")
    p = make_dicom(tmp_path / "htj.dcm", np.zeros((8, 8), np.uint16), ts=uid.HTJ2KLossless,
                   pixel_bytes=encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 30]))
    with pytest.raises(DataError) as e:
        read_image(p)
    assert e.value.field == "TransferSyntaxUID" and "pylibjpeg-openjpeg" in str(e.value)
    assert "gdcm" not in str(e.value)  # GDCM does not decode HTJ2K


# -- 12. NIfTI messages ------------------------------------------------------------------------------

def test_nifti_messages(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((4, 5, 1), np.int16), np.eye(4)), tmp_path / "flat.nii.gz")
    with pytest.raises(DataError, match="last axis has length 1") as e:
        Preprocessing(size=(4, 5)).unit_scale(read_image(tmp_path / "flat.nii.gz"))
    assert "squeeze" in str(e.value)
    rgb = np.zeros((4, 5, 2), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb.nii.gz")
    with pytest.raises(DataError, match="datatype") as e:
        read_image(tmp_path / "rgb.nii.gz")
    assert e.value.field == "file" and "not supported" in str(e.value) and "damaged" not in str(e.value)


# -- 13. DICOM and TIFF messages ---------------------------------------------------------------------

def test_dicom_without_image_names_its_sop_class_and_rows(tmp_path):
    from pydicom import uid

    def of_class(name, sop):
        p = make_dicom(tmp_path / name, None, SOPClassUID=sop)
        return resave(p, lambda ds: setattr(ds.file_meta, "MediaStorageSOPClassUID", sop))

    for name, sop, words in [("sr.dcm", uid.BasicTextSRStorage, "Basic Text SR Storage"),
                             ("rt.dcm", uid.RTStructureSetStorage, "RT Structure Set Storage"),
                             ("DICOMDIR", uid.MediaStorageDirectoryStorage, "Media Storage Directory Storage")]:
        with pytest.raises(DataError, match="no pixel data") as e:
            read_image(of_class(name, sop))
        assert words in str(e.value) and str(sop) in str(e.value), str(e.value)
        assert e.value.field == "SOPClassUID"  # a kind of object nemt does not read (the service: 415), not damage
    p = resave(make_dicom(tmp_path / "norows.dcm", STORED12), lambda ds: delattr(ds, "Rows"))
    with pytest.raises(DataError) as e:
        read_image(p)
    assert e.value.field == "Rows" and "missing" in str(e.value)


def test_truncated_tiff_header_is_an_error_not_a_warning(tmp_path):
    a = (np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8)
    tifffile.imwrite(tmp_path / "ok.tif", a)
    data = (tmp_path / "ok.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 20])  # inside the image file directory
    with warnings.catch_warnings(record=True) as leaked:
        warnings.simplefilter("always")
        with pytest.raises(DataError) as e:
            read_image(tmp_path / "cut.tif")
    assert e.value.field == "header" and "truncated" in str(e.value) and "cut.tif" in str(e.value)
    assert not leaked, [str(w.message) for w in leaked]
