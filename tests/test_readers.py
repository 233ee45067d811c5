"""nemt.data.readers: round trips, refusals, DICOM LUTs, NIfTI geometry, masks, MedMNIST."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from nemt.data.readers import (SUPPORTED_SUFFIXES, Image, is_image_file, read_image, read_mask,
                               read_medmnist)
from nemt.errors import DataError

from conftest import shared as need  # a path under ../shared/data, or skip


def save_pil(path: Path, a: np.ndarray, **kw) -> Path:
    PILImage.fromarray(a).save(path, **kw)
    return path


RNG = np.random.default_rng(0)
GREY8 = RNG.integers(0, 256, (20, 30), dtype=np.uint8)
GREY16 = RNG.integers(0, 65536, (20, 30), dtype=np.uint16)
RGB8 = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)


# -- Pillow formats -----------------------------------------------------------

@pytest.mark.parametrize("name,a,vr", [
    ("g8.png", GREY8, (0, 255)), ("g16.png", GREY16, (0, 65535)), ("rgb.png", RGB8, (0, 255)),
    ("g8.bmp", GREY8, (0, 255)), ("rgb.bmp", RGB8, (0, 255)),
    ("g8.tif", GREY8, (0, 255)), ("g16.tiff", GREY16, (0, 65535)), ("rgb.tif", RGB8, (0, 255)),
])
def test_lossless_round_trip(tmp_path, name, a, vr):
    img = read_image(save_pil(tmp_path / name, a))
    want = a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0)
    assert img.array.dtype == np.float32 and img.array.shape == want.shape
    np.testing.assert_array_equal(img.array, want.astype(np.float32))
    assert img.value_range == vr
    assert img.modality == {"png": "png", "bmp": "bmp", "tif": "tiff", "tiff": "tiff"}[name.split(".")[1]]
    assert img.spacing == (1.0, 1.0) and img.affine is None and img.path == str(tmp_path / name)


def test_16bit_png_keeps_values_above_255(tmp_path):
    a = np.array([[0, 256, 1000], [40000, 65535, 7]], dtype=np.uint16)
    img = read_image(save_pil(tmp_path / "a.png", a))
    assert img.array.max() == 65535 and img.array[0, 0, 1] == 256 and img.meta["bits"] == 16


def test_jpeg_grey_and_rgb(tmp_path):
    smooth = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (24, 1))
    g = read_image(save_pil(tmp_path / "g.jpg", smooth, quality=95))
    assert g.modality == "jpeg" and g.array.shape == (1, 24, 32) and g.value_range == (0, 255)
    assert np.abs(g.array[0] - smooth).max() < 8
    c = read_image(save_pil(tmp_path / "c.jpeg", np.stack([smooth] * 3, -1)))
    assert c.array.shape == (3, 24, 32)


def test_alpha_dropped_and_la_is_grey(tmp_path):
    rgba = np.concatenate([RGB8, np.full((20, 30, 1), 7, np.uint8)], -1)
    img = read_image(save_pil(tmp_path / "a.png", rgba))
    np.testing.assert_array_equal(img.array, np.moveaxis(RGB8, -1, 0))
    la = read_image(save_pil(tmp_path / "la.png", np.stack([GREY8, GREY8 // 2], -1)))
    np.testing.assert_array_equal(la.array, GREY8[None])


def test_palette_grey_is_one_channel_colour_is_three(tmp_path):
    im = PILImage.fromarray(GREY8 % 4, mode="L").convert("P")
    im.putpalette([v for i in range(256) for v in (i * 60 % 256,) * 3])
    im.save(tmp_path / "pg.png")
    img = read_image(tmp_path / "pg.png")
    assert img.array.shape == (1, 20, 30)
    np.testing.assert_array_equal(img.array[0], (GREY8 % 4) * 60.0)
    colour = PILImage.fromarray(RGB8).convert("P", palette=PILImage.Palette.ADAPTIVE)
    colour.save(tmp_path / "pa.png")
    assert read_image(tmp_path / "pa.png").array.shape == (3, 20, 30)


def test_content_wins_over_suffix(tmp_path):
    p = save_pil(tmp_path / "actually_png.dcm", GREY8, format="PNG")
    img = read_image(p)
    assert img.modality == "png"
    np.testing.assert_array_equal(img.array[0], GREY8)


# -- refusals -----------------------------------------------------------------

def test_truncated_png_names_the_file(tmp_path):
    p = save_pil(tmp_path / "noise.png", RNG.integers(0, 256, (128, 128), dtype=np.uint8))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as e:
        read_image(p)
    assert "noise.png" in str(e.value) and e.value.field == "pixels"


@pytest.mark.parametrize("name,content,words", [
    ("empty.png", b"", "empty"),
    ("text.png", b"hello, this is not an image\n" * 20, "not a readable PNG"),
    ("text.dcm", b"hello, this is not a DICOM file\n" * 20, "not a DICOM file"),
    ("text.nii", b"hello" * 100, "file"),
    ("gz.nii.gz", b"\x1f\x8b" + b"garbage" * 20, "file"),
    ("notes.txt", b"hello", "unsupported format"),
])
def test_bad_files_raise_data_error(tmp_path, name, content, words):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(DataError) as e:
        read_image(p)
    assert name in str(e.value) and words in str(e.value)


def test_missing_file_and_npz(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_image(tmp_path / "nope.png")
    np.savez(tmp_path / "d.npz", x=np.zeros(3))
    with pytest.raises(DataError, match="read_medmnist"):
        read_image(tmp_path / "d.npz")


def test_suffixes():
    assert ".nii.gz" in SUPPORTED_SUFFIXES and ".npz" in SUPPORTED_SUFFIXES
    for name in ("a.PNG", "b.jpeg", "c.Tif", "d.dcm", "e.DICOM", "f.nii", "g.nii.GZ", "h.bmp"):
        assert is_image_file(name), name
    for name in ("a.txt", "b.gz", "c.npz", "png", "d.png.bak"):
        assert not is_image_file(name), name


# -- DICOM made on the fly ----------------------------------------------------

def make_dicom(path: Path, a: np.ndarray | None, *, colour: bool = False, ts=None,
               pixel_bytes: bytes | None = None, **tags) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    if a is not None:
        ds.Rows, ds.Columns = a.shape[-3:-1] if colour else a.shape[-2:]
        ds.SamplesPerPixel = 3 if colour else 1
        ds.PhotometricInterpretation = "RGB" if colour else "MONOCHROME2"
        if colour:
            ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = a.dtype.itemsize * 8
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 0
        ds.PixelData = a.tobytes() if pixel_bytes is None else pixel_bytes
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)
    return path


STORED = np.array([[0, 50, 1000], [2000, 3000, 4000]], dtype=np.uint16)


def test_dicom_plain(tmp_path):
    img = read_image(make_dicom(tmp_path / "a.dcm", STORED, PixelSpacing=[0.5, 0.25]))
    assert img.modality == "dicom" and img.array.dtype == np.float32 and img.array.shape == (1, 2, 3)
    np.testing.assert_array_equal(img.array[0], STORED)
    assert img.value_range == (0, 4000) and img.spacing == (0.5, 0.25)
    assert img.meta["PhotometricInterpretation"] == "MONOCHROME2" and img.meta["Modality"] == "OT"


def test_dicom_rescale(tmp_path):
    img = read_image(make_dicom(tmp_path / "r.dcm", STORED, RescaleSlope=2, RescaleIntercept=-100))
    np.testing.assert_array_equal(img.array[0], STORED * 2.0 - 100)
    assert img.value_range == (-100, 7900)


def test_dicom_monochrome1_inverted(tmp_path):
    img = read_image(make_dicom(tmp_path / "m1.dcm", STORED, PhotometricInterpretation="MONOCHROME1"))
    lo, hi = img.value_range
    assert (lo, hi) == (0, 4000)
    np.testing.assert_array_equal(img.array[0], hi + lo - STORED.astype(np.float32))
    assert img.array[0, 1, 2] == lo and img.array[0, 0, 0] == hi  # brightest stored is now darkest


def test_dicom_window(tmp_path):
    img = read_image(make_dicom(tmp_path / "w.dcm", STORED, BitsStored=12, HighBit=11,
                                WindowCenter=[2000, 40], WindowWidth=[1000, 400]))
    assert img.value_range == (0, 4095)  # the first window, mapped onto the 12 stored bits
    a = img.array[0].ravel()
    assert a[0] == a[1] == a[2] == 0 and a[4] == a[5] == 4095  # clipped below and above the window
    assert 0 < a[3] < 4095 and img.meta["window"] == [2000, 1000]


def test_dicom_rgb_and_multiframe(tmp_path):
    rgb = read_image(make_dicom(tmp_path / "c.dcm", RGB8, colour=True))
    np.testing.assert_array_equal(rgb.array, np.moveaxis(RGB8, -1, 0))
    assert rgb.value_range == (0, 255)
    frames = np.stack([STORED, STORED + 1, STORED + 2])
    mf = read_image(make_dicom(tmp_path / "mf.dcm", frames, NumberOfFrames=3, SliceThickness=2.5,
                               PixelSpacing=[0.5, 0.5]))
    assert mf.array.shape == (1, 3, 2, 3) and mf.spacing == (2.5, 0.5, 0.5)
    np.testing.assert_array_equal(mf.array[0], frames)


def test_dicom_refusals(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLossless

    with pytest.raises(DataError, match="PixelData") as e:
        read_image(make_dicom(tmp_path / "nopix.dcm", None))
    assert "nopix.dcm" in str(e.value)
    fake = encapsulate([b"\xff\xd8\xff\xc3" + b"\x00" * 30])
    with pytest.raises(DataError, match="JPEG Lossless") as e:
        read_image(make_dicom(tmp_path / "jl.dcm", STORED, ts=JPEGLossless, pixel_bytes=fake))
    assert "jl.dcm" in str(e.value)
    with pytest.raises(DataError, match="PixelData") as e:
        read_image(make_dicom(tmp_path / "short.dcm", STORED, pixel_bytes=STORED.tobytes()[:5] + b"\0"))
    assert "short.dcm" in str(e.value)


def test_dicom_cut_short_says_so_and_warns_nothing(tmp_path):
    """A DICOM file cut short (a broken download or copy) is reported as truncated, wherever the cut falls,
    and pydicom's own warnings about it do not reach the caller (they go into the message)."""
    import warnings

    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLossless

    whole = make_dicom(tmp_path / "whole.dcm", STORED).read_bytes()
    header_end = whole.index(b"\xe0\x7f\x10\x00")  # the PixelData tag (7FE0,0010), little-endian
    enc = make_dicom(tmp_path / "enc.dcm", STORED, ts=JPEGLossless,
                     pixel_bytes=encapsulate([b"\xff\xd8\xff\xc3" + b"\x00" * 300])).read_bytes()
    cases = {"pixels.dcm": (whole[:-4], "less than expected"),  # inside the pixel values
             "header.dcm": (whole[:header_end], "probably truncated"),  # after the image header, before PixelData
             "fragment.dcm": (enc[:-100], "truncated; pydicom: End of file")}  # inside encapsulated pixel data
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with warnings.catch_warnings(record=True) as leaked:
            warnings.simplefilter("always")
            with pytest.raises(DataError, match="PixelData") as e:
                read_image(tmp_path / name)
        assert reason in str(e.value) and name in str(e.value), str(e.value)
        assert not leaked, [str(w.message) for w in leaked]
    # a file that is no image object at all keeps its own reason
    with pytest.raises(DataError, match="not an image object"):
        read_image(make_dicom(tmp_path / "nopix.dcm", None))


# -- real DICOM samples -------------------------------------------------------

def chest_layout(img: Image) -> dict[str, float]:
    """Mean intensity (in [0, 1] of value_range) of lung fields, mediastinum and the bottom rows."""
    lo, hi = img.value_range
    a = (img.array[0] - lo) / (hi - lo)
    h, w = a.shape
    band = a[int(0.25 * h):int(0.55 * h)]
    lung = (band[:, int(0.2 * w):int(0.35 * w)].mean() + band[:, int(0.65 * w):int(0.8 * w)].mean()) / 2
    return {"lung": lung, "mediastinum": band[:, int(0.45 * w):int(0.55 * w)].mean(),
            "bottom": a[int(0.85 * h):].mean()}


@pytest.mark.realdata
@pytest.mark.parametrize("name,shape,photometric", [
    ("chest_cr_uint16.dcm", (1, 1955, 1841), "MONOCHROME1"),
    ("siim_sample.dcm", (1, 1024, 1024), "MONOCHROME2"),
])
def test_real_chest_dicom(name, shape, photometric):
    img = read_image(need(f"cxr-samples/{name}"))
    assert img.array.dtype == np.float32 and img.array.shape == shape
    assert img.meta["PhotometricInterpretation"] == photometric and img.meta["Modality"] == "CR"
    lo, hi = img.value_range
    assert lo <= img.array.min() and img.array.max() <= hi
    # Upright, bones bright: the spine/mediastinum column and the abdomen are brighter than
    # the lungs. Un-inverting MONOCHROME1 or flipping the image breaks this.
    layout = chest_layout(img)
    assert layout["mediastinum"] > layout["lung"] + 0.15
    assert layout["bottom"] > layout["lung"] + 0.1


@pytest.mark.realdata
def test_real_chest_cr_window_and_spacing():
    img = read_image(need("cxr-samples/chest_cr_uint16.dcm"))
    # 15 stored bits, window 15000/30000 -> mapped onto 0..32767; PixelSpacing is 0.000 (unknown).
    assert img.value_range == (0, 32767) and img.meta["window"] == [15000, 30000]
    assert img.spacing == (1.0, 1.0)
    assert read_image(need("cxr-samples/siim_sample.dcm")).spacing == pytest.approx((0.168, 0.168))


@pytest.mark.realdata
def test_real_png_and_busi_mask():
    cxr = read_image(need("cxr-samples/00000001_000.png"))
    assert cxr.array.shape == (1, 512, 512) and cxr.value_range == (0, 255)
    img = read_image(need("busi/images/benign (1).png"))
    mask = read_mask(need("busi/masks/benign (1).png"), like=img)
    assert mask.dtype == bool and mask.shape == (1,) + img.array.shape[1:] and 0 < mask.mean() < 0.5


# -- NIfTI --------------------------------------------------------------------

AFFINE = np.array([[0.0, -0.8, 0, 10], [1.2, 0, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]])


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
def test_nifti_round_trip(tmp_path, name):
    import nibabel as nib

    vol = RNG.normal(size=(4, 5, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, AFFINE), tmp_path / name)
    img = read_image(tmp_path / name)
    assert img.modality == "nifti" and img.array.shape == (1, 4, 5, 6)
    np.testing.assert_array_equal(img.array[0], vol)
    np.testing.assert_allclose(img.affine, AFFINE)
    assert img.spacing == pytest.approx((1.2, 0.8, 2.5))
    assert img.value_range == (float(vol.min()), float(vol.max()))


def test_nifti_channels_and_2d(tmp_path):
    import nibabel as nib

    vol = RNG.integers(0, 9, (4, 5, 6, 2)).astype(np.int16)
    nib.save(nib.Nifti1Image(vol, AFFINE), tmp_path / "c.nii.gz")
    img = read_image(tmp_path / "c.nii.gz")
    np.testing.assert_array_equal(img.array, np.moveaxis(vol, -1, 0))
    assert img.spacing == pytest.approx((1.2, 0.8, 2.5)) and img.meta["dtype"] == "int16"
    flat = np.zeros((4, 5), np.float32)
    nib.save(nib.Nifti1Image(flat, np.eye(4)), tmp_path / "f.nii")
    img2 = read_image(tmp_path / "f.nii")
    assert img2.array.shape == (1, 4, 5) and img2.value_range == (0, 1) and len(img2.spacing) == 2


def test_truncated_nifti_gz(tmp_path):
    import nibabel as nib

    nib.save(nib.Nifti1Image(RNG.normal(size=(20, 20, 20)).astype(np.float32), AFFINE), tmp_path / "t.nii.gz")
    data = (tmp_path / "t.nii.gz").read_bytes()
    (tmp_path / "t.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="t.nii.gz"):
        read_image(tmp_path / "t.nii.gz")


# -- masks --------------------------------------------------------------------

def test_read_mask(tmp_path):
    m = np.zeros((4, 5), np.uint8)
    m[1, 2] = 1
    m[3, 4] = 255
    got = read_mask(save_pil(tmp_path / "m.png", m))
    assert got.dtype == bool and got.shape == (1, 4, 5)
    np.testing.assert_array_equal(got[0], m > 0)
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[0, 0, 1] = 9
    np.testing.assert_array_equal(read_mask(save_pil(tmp_path / "c.png", rgb))[0], rgb.any(-1))
    zero = read_mask(save_pil(tmp_path / "z.png", np.zeros((4, 5), np.uint8)), like=(4, 5))
    assert zero.shape == (1, 4, 5) and not zero.any()


def test_read_mask_palette_uses_indices(tmp_path):
    im = PILImage.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="L").convert("P")
    im.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)  # index 0 is white, index 1 black
    im.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png")[0], [[False, True], [True, False]])


def test_read_mask_shape_mismatch(tmp_path):
    p = save_pil(tmp_path / "m.png", np.ones((4, 5), np.uint8))
    like = read_image(save_pil(tmp_path / "i.png", np.ones((5, 5), np.uint8)))
    with pytest.raises(DataError, match="shape") as e:
        read_mask(p, like=like)
    assert "mask is 4x5, image is 5x5" in str(e.value) and "m.png" in str(e.value)
    with pytest.raises(DataError, match="shape"):
        read_mask(p, like=(4, 6))


# -- MedMNIST -----------------------------------------------------------------

def fake_medmnist(path: Path, shape: tuple[int, ...], drop: str | None = None, **over) -> Path:
    arrays = {}
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = RNG.integers(0, 256, (n,) + shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = RNG.integers(0, 2, (n, 1), dtype=np.uint8)
    arrays.update(over)
    arrays.pop(drop, None)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("shape,want", [((7, 7), (1, 7, 7)), ((7, 7, 3), (3, 7, 7)),
                                        ((4, 7, 7), (1, 4, 7, 7))])
def test_medmnist_synthetic(tmp_path, shape, want):
    p = fake_medmnist(tmp_path / "m.npz", shape)
    parts = read_medmnist(p)
    raw = np.load(p)
    assert list(parts) == ["train", "val", "test"]
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        x, y = parts[split]
        assert x.dtype == np.float32 and x.shape == (n,) + want
        assert y.dtype == np.int64 and y.shape == (n, 1)
        np.testing.assert_array_equal(y, raw[f"{split}_labels"])
    rgb_first = raw["train_images"][0]
    np.testing.assert_array_equal(parts["train"][0][0], rgb_first[None] if len(shape) != 3 or shape[-1] != 3
                                  else np.moveaxis(rgb_first, -1, 0))


def test_medmnist_refusals(tmp_path):
    with pytest.raises(DataError, match="val_labels"):
        read_medmnist(fake_medmnist(tmp_path / "a.npz", (7, 7), drop="val_labels"))
    bad = RNG.integers(0, 2, (5, 1), dtype=np.uint8)
    with pytest.raises(DataError, match="test_labels"):
        read_medmnist(fake_medmnist(tmp_path / "b.npz", (7, 7), test_labels=bad))
    (tmp_path / "c.npz").write_text("not a zip")
    with pytest.raises(DataError, match="c.npz"):
        read_medmnist(tmp_path / "c.npz")


@pytest.mark.realdata
@pytest.mark.parametrize("name,sizes,channels", [("breastmnist.npz", (546, 78, 156), 1),
                                                 ("retinamnist.npz", (1080, 120, 400), 3)])
def test_medmnist_real(name, sizes, channels):
    parts = read_medmnist(need(f"medmnist/{name}"))
    for (x, y), n in zip(parts.values(), sizes):
        assert x.shape == (n, channels, 28, 28) and x.dtype == np.float32
        assert y.shape == (n, 1) and y.dtype == np.int64
        assert 0 <= x.min() and x.max() <= 255 and x.max() > 1


def test_atomic_writes_get_normal_file_permissions(tmp_path):
    import os
    from nemt.files import atomic_open
    with atomic_open(tmp_path / "out.txt", "w") as fh:
        fh.write("x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temporary file left


# -- decompression bombs: the header's size is checked before decoding ------------------------------

def png_bomb(path: Path, width: int, height: int) -> Path:
    """A valid PNG header declaring ``width`` x ``height`` grey pixels, with a few bytes of data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def test_png_bomb_refused_from_the_header(tmp_path):
    from nemt.data.readers import DEFAULT_MAX_PIXELS, ImageTooLarge

    bomb = png_bomb(tmp_path / "bomb.png", 30000, 30000)
    assert bomb.stat().st_size < 200
    with pytest.raises(ImageTooLarge) as e:
        read_image(bomb)
    msg = str(e.value)
    assert "bomb.png: size: image of 30000x30000 = 900 Mpx exceeds the limit of 256 Mpx" in msg
    assert "--max-pixels" in msg and DEFAULT_MAX_PIXELS == 256_000_000
    with pytest.raises(ImageTooLarge):
        read_mask(bomb)
    # the limit is the caller's: an 8x8 image is refused at 63 pixels and read at 64
    small = save_pil(tmp_path / "s.png", GREY8[:8, :8])
    with pytest.raises(ImageTooLarge, match="8x8 = 64 pixels exceeds the limit of 63 pixels"):
        read_image(small, max_pixels=63)
    assert read_image(small, max_pixels=64).array.shape == (1, 8, 8)


def test_pillow_global_limit_is_neither_used_nor_changed(tmp_path, monkeypatch):
    """Pillow's process-wide MAX_IMAGE_PIXELS would refuse sizes a caller allows: the readers ignore it."""
    import warnings

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 10)
    p = save_pil(tmp_path / "g.png", GREY8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        assert read_image(p).array.shape == (1, 20, 30)
    assert PILImage.MAX_IMAGE_PIXELS == 10


def test_dicom_nifti_and_medmnist_bombs_refused_from_the_header(tmp_path):
    import nibabel as nib

    from nemt.data.readers import ImageTooLarge

    dcm = make_dicom(tmp_path / "big.dcm", np.zeros((2, 2), np.uint8), pixel_bytes=b"\0" * 4,
                     Rows=60000, Columns=60000)
    with pytest.raises(ImageTooLarge, match="big.dcm: Rows/Columns/NumberOfFrames: image of 60000x60000"):
        read_image(dcm)
    mf = make_dicom(tmp_path / "frames.dcm", np.zeros((2, 2), np.uint8), pixel_bytes=b"\0" * 4,
                    Rows=4000, Columns=4000, NumberOfFrames=100)
    with pytest.raises(ImageTooLarge, match="100x4000x4000 = 1600 Mpx"):
        read_image(mf)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4000, 4000, 100))
    hdr.set_data_dtype(np.uint8)
    nii = tmp_path / "vol.nii"
    nii.write_bytes(hdr.binaryblock + b"\0" * (352 - len(hdr.binaryblock)) + b"\0" * 64)
    with pytest.raises(ImageTooLarge, match="vol.nii: dim: image of 4000x4000x100 = 1600 Mpx"):
        read_image(nii)
    npz = fake_medmnist(tmp_path / "m.npz", (7, 7))
    with pytest.raises(ImageTooLarge, match="train_images: image of 7x7 = 49 pixels exceeds the limit of 48"):
        read_medmnist(npz, max_pixels=48)
    assert read_medmnist(npz, max_pixels=49)["train"][0].shape == (6, 1, 7, 7)


def test_a_nifti_mask_on_another_grid_than_its_image_is_refused(tmp_path):
    """Matched by shape alone, a mask stored flipped (same world geometry, other affine) marked the mirrored
    place: the two affines must agree (audit of 3D)."""
    import nibabel as nib

    from nemt.data.readers import DataError, read_image, read_mask
    vol = np.zeros((8, 8, 8), np.float32)
    vol[5:7, 2:4, 2:4] = 1
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(vol.astype(np.uint8), np.eye(4)), tmp_path / "same.nii.gz")
    flipped = np.diag([-1.0, 1, 1, 1])
    flipped[0, 3] = 7
    nib.save(nib.Nifti1Image(vol[::-1].astype(np.uint8).copy(), flipped), tmp_path / "flipped.nii.gz")
    img = read_image(tmp_path / "img.nii.gz")
    assert read_mask(tmp_path / "same.nii.gz", like=img).sum() == 8
    with pytest.raises(DataError, match="affine.*resample the mask"):
        read_mask(tmp_path / "flipped.nii.gz", like=img)
