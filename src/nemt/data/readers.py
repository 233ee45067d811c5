"""Read one medical image (PNG, JPEG, BMP, TIFF, DICOM, NIfTI), a NumPy array or signal, a mask, or a MedMNIST file.

Every reader returns channel-first float32 with no resizing or normalisation:

* 2D images: ``(C, H, W)``, C = 1 for grey and 3 for colour;
* DICOM multi-frame: ``(C, F, H, W)``, frames first;
* NIfTI: ``(C, X, Y, Z)`` in nibabel's voxel order (``(1, X, Y)`` for a 2D file);
* NumPy ``.npy`` (told by its magic bytes): the array as stored, channel-first ``(C, *spatial)`` with 1 to 3
  spatial axes; a 1-D array ``(L,)`` is one channel ``(1, L)``. A signal is ``(C, L)``: ECG leads are channels.
  A sidecar ``<name>.json`` may give ``fs`` (samples per second of a 1D signal), ``spacing``, ``range``
  (the nominal value range), ``channels`` (names, e.g. leads) and ``units`` (see :func:`_read_npy`).

``Image.value_range`` is the nominal intensity range of ``array``, so
``(array - lo) / (hi - lo)`` lies in [0, 1]. Anything unreadable raises
:class:`~nemt.errors.DataError` naming the file, the field and the reason.
The field tells an unsupported file from a damaged one: ``file`` (or
``TransferSyntaxUID``, ``SampleFormat``) for a format, or a variant of one,
that nemt does not read; ``header``, ``pixels``, ``PixelData`` and the like
for a file that starts as a supported format (its signature, magic bytes)
but cannot be read: truncated or damaged.

Decompression bombs: a small file may declare a huge image (a 196-byte PNG
of 30000x30000). Every reader takes the size from the header and refuses an
image of more than ``max_pixels`` pixels (voxels for volumes, all frames
counted; default :data:`DEFAULT_MAX_PIXELS`) with :class:`ImageTooLarge`
before any pixel is decoded. Pillow's own, process-wide limit is not used:
the readers open Pillow's format plugins directly, so a caller's limit is
the only one, and no global setting is read or changed.
"""
from __future__ import annotations

import gzip
import math
import struct
import threading
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nemt.errors import DataError

SUPPORTED_SUFFIXES: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", ".nii", ".nii.gz", ".npz",
)
# An .npz holds a whole data set, not one image, so folder scans must not pick it up.
_IMAGE_SUFFIXES = tuple(s for s in SUPPORTED_SUFFIXES if s != ".npz")
_SUFFIX_FORMAT = {".png": "pil", ".jpg": "pil", ".jpeg": "pil", ".bmp": "pil", ".tif": "pil",
                  ".tiff": "pil", ".dcm": "dicom", ".dicom": "dicom", ".nii": "nifti",
                  ".nii.gz": "nifti", ".npz": "npz"}
_PIL_FORMATS = ["PNG", "JPEG", "BMP", "TIFF"]
#: the first bytes of each format Pillow reads here (as :func:`_sniff` tells them)
_PIL_SIGNATURES = {"PNG": (b"\x89PNG\r\n\x1a\n",), "JPEG": (b"\xff\xd8\xff",), "BMP": (b"BM",),
                   "TIFF": (b"II*\x00", b"MM\x00*")}
_MEDMNIST_SPLITS = ("train", "val", "test")
DEFAULT_MAX_PIXELS = 256_000_000
"""Largest image decoded by default: 256 Mpx (about 1 GB as float32 per channel); a 512x512x900 CT fits."""


class ImageTooLarge(DataError):
    """The header declares more pixels than the reader's limit (checked before decoding).

    ``shape``, ``pixels`` and ``limit`` hold the figures, for callers that word their own message.
    """

    def __init__(self, path, field, reason, *, shape: tuple[int, ...] = (), pixels: int = 0, limit: int = 0):
        super().__init__(path, field, reason)
        self.shape, self.pixels, self.limit = shape, pixels, limit


def check_pixels(path: str | Path, shape: Sequence[int], max_pixels: int | None, field: str = "size") -> None:
    """Raise :class:`ImageTooLarge` when ``shape`` (spatial sizes, frames) holds more than ``max_pixels``."""
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    n = math.prod(int(s) for s in shape)
    if n > limit:
        raise ImageTooLarge(path, field, f"image of {_fmt_shape(shape)} = {format_pixels(n)} exceeds the limit of "
                            f"{format_pixels(limit)}; raise the limit with --max-pixels if the file is genuine",
                            shape=tuple(int(s) for s in shape), pixels=n, limit=limit)


@dataclass
class Image:
    """One image, channel-first float32: ``(C, H, W)`` or ``(C, X, Y, Z)``."""

    array: np.ndarray
    spacing: tuple[float, ...]  # one per spatial axis; mm where the file says so, else 1.0
    affine: np.ndarray | None  # (4, 4) voxel-to-world for NIfTI, None otherwise
    value_range: tuple[float, float]
    modality: str  # "png", "jpeg", "bmp", "tiff", "dicom" or "nifti"
    path: str
    meta: dict = field(default_factory=dict)


def is_image_file(path: str | Path) -> bool:
    """Whether the name ends in a single-image suffix (case-insensitive; ``.npz`` is not one)."""
    return Path(path).name.lower().endswith(_IMAGE_SUFFIXES)


def read_image(path: str | Path, *, max_pixels: int | None = None) -> Image:
    """Read one image file; the format is told by its magic bytes first, its suffix second.

    ``max_pixels`` (default :data:`DEFAULT_MAX_PIXELS`) bounds the pixels
    (voxels, all frames) the header may declare; more raises
    :class:`ImageTooLarge` before decoding.
    """
    path = Path(path)
    kind = _sniff(path) or _suffix_format(path)
    if kind == "pil":
        return _read_pil(path, max_pixels=max_pixels)
    if kind == "dicom":
        return _read_dicom(path, max_pixels=max_pixels)
    if kind == "nifti":
        return _read_nifti(path, max_pixels=max_pixels)
    if kind == "npz":
        raise DataError(path, "file", "an .npz archive holds a data set, not one image; "
                        "read it with read_medmnist (a MedMNIST data set)")
    if kind == "npy":
        return _read_npy(path, max_pixels=max_pixels)
    raise DataError(path, "file", "unsupported format (not PNG, JPEG, BMP, TIFF, DICOM, NIfTI or NumPy .npy; "
                    f"supported suffixes: {', '.join(dict.fromkeys((*_IMAGE_SUFFIXES, '.npy')))})")


def read_mask(path: str | Path, like: Image | tuple[int, ...] | None = None, *,
              max_pixels: int | None = None) -> np.ndarray:
    """A mask as bool ``(1, *spatial)``: True where any channel is nonzero.

    Palette (``P``) PNGs count nonzero palette indices, not colours, so a
    palette whose entry 0 is not black still has background False. ``like``
    (an Image or a spatial shape) must have the same spatial shape.
    ``max_pixels`` as for :func:`read_image`.
    """
    path = Path(path)
    if (_sniff(path) or _suffix_format(path)) == "pil":
        read = _read_pil(path, palette_indices=True, max_pixels=max_pixels)
    else:
        read = read_image(path, max_pixels=max_pixels)
    mask = np.any(read.array != 0, axis=0, keepdims=True)
    if like is not None:
        want = tuple(like.array.shape[1:]) if isinstance(like, Image) else tuple(like)
        if mask.shape[1:] != want:
            raise DataError(path, "shape", f"mask is {_fmt_shape(mask.shape[1:])}, "
                            f"image is {_fmt_shape(want)}")
        theirs = like.affine if isinstance(like, Image) else None
        if theirs is not None and read.affine is not None and not np.allclose(read.affine, theirs, rtol=1e-4,
                                                                               atol=1e-3):
            # the same shape on another grid (e.g. stored flipped): voxel by voxel it would mark another place
            raise DataError(path, "affine", "the mask's voxel-to-world affine differs from its image's "
                            f"({np.round(read.affine, 3).tolist()} against {np.round(theirs, 3).tolist()}): "
                            "resample the mask onto the image's grid")
    return mask


def read_medmnist(path: str | Path, *, max_pixels: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A MedMNIST ``.npz`` as ``{"train": (images, labels), "val": ..., "test": ...}``.

    ``max_pixels`` bounds each image's pixels as for :func:`read_image`,
    checked on the arrays' headers before they are decompressed.

    images: float32 ``(N, C, H, W)`` with values 0..255 (grey ``(N, H, W)``
    gives C = 1, RGB ``(N, H, W, 3)`` gives C = 3), or ``(N, 1, D, H, W)``
    for the 3D sets stored as ``(N, D, H, W)``. labels: int64 ``(N, L)``.
    """
    path = Path(path)
    _check_file(path)
    if not zipfile.is_zipfile(path):
        raise DataError(path, "file", "not an .npz (zip) archive; MedMNIST data sets are .npz files")
    with _decoding(path, "file"):
        npz = np.load(path, allow_pickle=False)
    out = {}
    with npz:
        for split in _MEDMNIST_SPLITS:
            ikey, lkey = f"{split}_images", f"{split}_labels"
            for key in (ikey, lkey):
                if key not in npz.files:
                    raise DataError(path, key, f"missing key (has {', '.join(npz.files) or 'none'}; "
                                    "MedMNIST files have train/val/test _images and _labels)")
            with _decoding(path, ikey):
                shape = _npy_shape(npz, ikey)
            per_image = shape[1:-1] if len(shape) == 4 and shape[-1] == 3 else shape[1:]
            check_pixels(path, per_image, max_pixels, ikey)
            with _decoding(path, ikey):
                images = npz[ikey]
            with _decoding(path, lkey):
                labels = npz[lkey]
            out[split] = (_medmnist_images(path, ikey, images),
                          _medmnist_labels(path, lkey, labels, len(images), ikey))
    return out


# -- format detection -------------------------------------------------------

def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(path, "file", "no such file")
    if not path.is_file():
        raise DataError(path, "file", "not a regular file")
    if path.stat().st_size == 0:
        raise DataError(path, "file", "file is empty")


def _suffix_format(path: Path) -> str | None:
    name = path.name.lower()
    return next((kind for suffix, kind in _SUFFIX_FORMAT.items() if name.endswith(suffix)), None)


def _sniff(path: Path) -> str | None:
    """The format from the first bytes, or None when they name none we read."""
    _check_file(path)
    with open(path, "rb") as f:
        head = f.read(352)
    # DICOM first: its 128-byte preamble is free-form and may itself be a TIFF header.
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(tuple(m for magics in _PIL_SIGNATURES.values() for m in magics)):
        return "pil"
    if head.startswith(b"PK\x03\x04"):
        return "npz"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"\x1f\x8b"):
        try:
            with gzip.open(path, "rb") as f:
                head = f.read(352)
        except (OSError, EOFError, zlib.error):
            return None  # a broken gzip: let the suffix pick the reader, which reports it
    # NIfTI-1 keeps its magic at byte 344, NIfTI-2 at byte 4.
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] in (b"n+2\x00", b"ni2\x00"):
        return "nifti"
    return None


@contextmanager
def _decoding(path: Path, what: str, prefix: str = "") -> Iterator[None]:
    """Turn whatever a third-party decoder raises into a DataError on ``what``."""
    try:
        yield
    except DataError:
        raise
    except Exception as e:  # Pillow, pydicom, nibabel and gzip raise a zoo of types
        raise DataError(path, what, f"{prefix}{type(e).__name__}: {e}") from e


# -- Pillow: PNG, JPEG, BMP, TIFF ---------------------------------------------

def _open_pil(path: Path):
    """Pillow's image object for ``path`` from the header only (nothing decoded), or None if no plugin knows it.

    The same steps as ``PIL.Image.open(path, formats=_PIL_FORMATS)`` (each
    plugin's ``accept`` test on the first bytes, then its header parser) minus
    Pillow's process-wide decompression-bomb check, which would refuse, or
    warn about, sizes the caller's ``max_pixels`` allows; the caller checks
    its own limit on ``im.size`` before ``load``.
    """
    from PIL import Image as PILImage

    PILImage.init()  # registers the format plugins (once per process)
    with open(path, "rb") as f:
        prefix = f.read(16)
    failure = None
    for fmt in _PIL_FORMATS:
        factory, accept = PILImage.OPEN[fmt]
        result = accept(prefix) if accept is not None else True
        if isinstance(result, str) or not result:  # a string says why the plugin declines
            continue
        try:
            return factory(str(path), str(path))  # opens (and on failure closes) its own file handle
        except (SyntaxError, IndexError, TypeError, struct.error) as e:
            failure = failure or e  # kept to say why; Image.open goes on to the next plugin too
    if failure is not None:  # a plugin took the file by its first bytes, then could not parse its header
        raise failure
    return None


def _pil_refusal(path: Path, exc: Exception | None) -> DataError:
    """Why Pillow's plugins could not open ``path`` (``exc``: what the one that took it raised): ``file`` when
    the file has none of their signatures or is a variant they do not read (415 in the service),
    ``SampleFormat`` for a TIFF of a sample type they do not decode, ``header`` when it has a signature but
    its header cannot be read: truncated or damaged."""
    with open(path, "rb") as f:
        head = f.read(16)
    fmt = next((name for name, magics in _PIL_SIGNATURES.items() if head.startswith(magics)), None)
    reason = f"{type(exc).__name__}: {exc}" if exc is not None else ""
    if fmt is None:
        return DataError(path, "file", "not a readable PNG, JPEG, BMP or TIFF image"
                         + (f" ({reason})" if reason else ""))
    if fmt == "TIFF" and "pixel mode" in str(exc):  # Pillow's "unknown pixel mode": a sample type it lacks
        samples = _tiff_samples(path)
        if samples is not None:
            return DataError(path, "SampleFormat", f"a TIFF of {samples}: a sample type nemt does not read (it "
                             "reads 8- or 16-bit integers, grey or RGB, and one sample of 32-bit integers or "
                             "floats); save the image as one of those")
    if "nsupported" in str(exc):  # e.g. Pillow's "Unsupported BMP compression (1)"
        return DataError(path, "file", f"a {fmt} variant nemt does not read ({reason})")
    return DataError(path, "header", f"a {fmt} file by its signature, but its header cannot be read "
                     f"({reason or 'no image found'}; {path.stat().st_size} bytes): the file is truncated or damaged")


_TIFF_SAMPLE_KINDS = {1: "unsigned integer", 2: "signed integer", 3: "floating-point", 4: "undefined",
                      5: "complex integer", 6: "complex floating-point"}


def _tiff_samples(path: Path) -> str | None:
    """A TIFF's sample type from its first directory, in words (None if that cannot be read)."""
    from PIL import TiffImagePlugin

    try:
        with open(path, "rb") as f:
            ifh = f.read(8)
            if ifh[2:3] == b"+" or ifh[3:4] == b"+":  # BigTIFF: a 16-byte header
                ifh += f.read(8)
            ifd = TiffImagePlugin.ImageFileDirectory_v2(ifh)
            f.seek(ifd.next)
            ifd.load(f)
        bits = tuple(ifd.get(258, (1,)))
        kind = tuple(ifd.get(339, (1,)))
        n = int(ifd.get(277, 1))
    except Exception:  # noqa: BLE001 - only a better message is lost
        return None
    words = _TIFF_SAMPLE_KINDS.get(kind[0], f"SampleFormat {kind[0]}")
    return (f"{bits[0]}-bit {words} samples, {n} per pixel (BitsPerSample {'/'.join(map(str, bits))}, "
            f"SampleFormat {'/'.join(map(str, kind))})")


def _read_pil(path: Path, palette_indices: bool = False, max_pixels: int | None = None) -> Image:
    """8/16-bit grey or RGB to ``(1|3, H, W)``; alpha dropped. Only the first frame of a TIFF stack."""
    try:
        im = _open_pil(path)
    except Exception as e:  # a plugin's header parser may raise more than OSError
        raise _pil_refusal(path, e) from e
    if im is None:
        raise _pil_refusal(path, None)
    try:
        check_pixels(path, im.size[::-1], max_pixels)  # the header's size, before any decoding
    except ImageTooLarge:
        im.close()
        raise
    with im, _decoding(path, "pixels"):
        im.load()  # a full decode, so that a truncated file fails here and not later
        meta = {"format": im.format, "mode": im.mode, "frames": getattr(im, "n_frames", 1)}
        grey = im.mode in ("1", "L", "LA", "I", "F") or im.mode.startswith("I;16")
        if im.mode in ("P", "PA") and not palette_indices:
            # A palette of greys is a grey image; otherwise colours.
            pal = np.asarray(im.getpalette("RGB") or [0, 0, 0]).reshape(-1, 3)
            grey = bool((pal == pal[:, :1]).all())
            im = im.convert("RGBA")
        elif im.mode in ("P", "PA"):
            grey = True
        elif im.mode == "1":
            im = im.convert("L")
        elif not grey and im.mode not in ("RGB", "RGBA"):
            im = im.convert("RGB")  # CMYK, YCbCr, LAB, ...
        a = np.asarray(im)
    if a.ndim == 3:
        a = a[..., :1] if grey else a[..., :3]  # drops alpha
    a = a.reshape(a.shape[:2] + (-1,))
    meta["bits"] = a.dtype.itemsize * 8
    if a.dtype == np.uint8:
        value_range = (0.0, 255.0)
    elif a.dtype.kind == "u" and a.dtype.itemsize == 2:
        value_range = (0.0, 65535.0)
    elif a.dtype.kind == "i" and a.min() >= 0 and a.max() <= 65535:
        value_range = (0.0, 65535.0)  # Pillow's "I" mode holds 16-bit files too
        meta["bits"] = 16
    else:
        value_range = _data_range(a)
    array = np.ascontiguousarray(np.moveaxis(a, -1, 0), dtype=np.float32)
    return Image(array, (1.0, 1.0), None, value_range, meta["format"].lower(), str(path), meta)


# -- DICOM --------------------------------------------------------------------

#: ``warnings.catch_warnings`` swaps process-wide state: two threads' reads must not interleave it
_DICOM_WARNINGS = threading.Lock()
#: header elements that only an image has: a file holding them but no PixelData was cut short
_IMAGE_HEADER = ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation")


def _no_pixel_data(ds, path: Path, caught: Sequence[warnings.WarningMessage]) -> str:
    """Why a DICOM file has no pixel data: truncated (its header describes an image) or not an image object."""
    size = Path(path).stat().st_size
    described = [k for k in _IMAGE_HEADER if k in ds]
    eof = [w for w in caught if "end of file" in str(w.message).lower()]
    note = f"; pydicom: {_warning_text((eof or caught)[0])}" if caught else ""
    if eof:
        return f"no pixel data: the file ends inside an element, {size} bytes: truncated{note}"
    if described:
        return (f"no PixelData element, although the header describes an image ({', '.join(described)}): "
                f"the file ends after {len(ds)} data elements, {size} bytes, probably truncated{note}")
    return f"no pixel data (not an image object, or a file truncated before its image header; {size} bytes{note})"


def _read_dicom(path: Path, max_pixels: int | None = None) -> Image:
    """Stored values -> modality LUT -> VOI LUT or window -> MONOCHROME1 inverted.

    Grey ``(1, H, W)`` or colour ``(3, H, W)``; multi-frame ``(C, F, H, W)``. pydicom's warnings (a value
    that breaks its VR, a value cut short) do not reach the terminal: an error quotes the first, an image
    keeps them in ``meta["pydicom_warnings"]``.
    """
    # pydicom reads a file cut short without complaint, up to its last whole element, and warns about a
    # value cut in half when the value is first used, anywhere below
    with _DICOM_WARNINGS, warnings.catch_warnings(record=True) as caught:  # the lock: the service reads in threads
        warnings.simplefilter("always")
        image = _read_dicom_warned(path, max_pixels, caught)
    if caught:
        image.meta["pydicom_warnings"] = list(dict.fromkeys(_warning_text(w) for w in caught))
    return image


def _warning_text(w: warnings.WarningMessage) -> str:
    return str(w.message).split(". Please see")[0]


def _read_dicom_warned(path: Path, max_pixels: int | None, caught: list) -> Image:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import (apply_color_lut, apply_modality_lut, apply_voi,
                                apply_windowing)

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as e:
        raise DataError(path, "file", "not a DICOM file (no 'DICM' marker at byte 128)") from e
    except Exception as e:  # the 'DICM' marker is there: a damaged file, not another format
        cut = isinstance(e, (struct.error, EOFError)) or type(e).__name__ == "BytesLengthException"
        raise DataError(path, "header", f"cannot parse DICOM: {type(e).__name__}: {e}"
                        + (f" (the header ends mid-element after {Path(path).stat().st_size} bytes: "
                           "truncated?)" if cut else " (damaged?)")) from e
    element = next((k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds), None)
    if element is None:
        raise DataError(path, "PixelData", _no_pixel_data(ds, path, caught))
    if not ds[element].value:  # present but empty (pydicom reads a zero-length value as None)
        raise DataError(path, element, f"no pixel data: the {element} element is empty")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    prefix = ""
    if ts is not None and ts.is_compressed:
        prefix = f"{ts.name} ({ts}): "
        if not _dicom_decoder_available(ts):
            raise DataError(path, "TransferSyntaxUID", f"{prefix}compressed pixel data and no installed "
                            "decoder; install a pydicom decoder plugin such as pylibjpeg "
                            "(with pylibjpeg-libjpeg / pylibjpeg-openjpeg) or python-gdcm")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    except (TypeError, ValueError) as e:
        raise DataError(path, "Rows/Columns/NumberOfFrames", f"not whole numbers ({e})") from e
    check_pixels(path, (frames, rows, cols) if frames > 1 else (rows, cols), max_pixels,
                 "Rows/Columns/NumberOfFrames")
    meta = {"Modality": str(ds.get("Modality", "")), "PhotometricInterpretation": photometric,
            "BitsStored": int(ds.get("BitsStored", 0) or 0), "frames": frames,
            "TransferSyntaxUID": str(ts or "")}
    with _decoding(path, "PixelData", prefix):
        a = ds.pixel_array
        if photometric == "PALETTE COLOR":
            a = apply_color_lut(a, ds)
        colour = a.ndim == (4 if frames > 1 else 3)
        if colour:
            # pydicom hands YBR as RGB already; no modality or VOI LUT applies to colour.
            bits = a.dtype.itemsize * 8 if photometric == "PALETTE COLOR" else meta["BitsStored"]
            value_range = (0.0, float(2 ** bits - 1)) if a.dtype.kind == "u" and bits else _data_range(a)
            a = np.moveaxis(a, -1, 0)
        else:
            a = apply_modality_lut(a, ds)
            if ds.get("VOILUTSequence"):
                a = apply_voi(a, ds, 0)
                value_range = (0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1))
                meta["voi"] = "lut"
            elif "WindowCenter" in ds and "WindowWidth" in ds:
                a = apply_windowing(a, ds, 0)
                # pydicom maps the window onto the stored bits' range (after rescale);
                # windowing -inf and +inf gives exactly those ends.
                lo, hi = apply_windowing(np.array([-np.inf, np.inf]), ds, 0)
                value_range = (float(min(lo, hi)), float(max(lo, hi)))
                meta["voi"] = "window"
                meta["window"] = [_first(ds.WindowCenter), _first(ds.WindowWidth)]
            else:
                value_range = _data_range(a)
                meta["voi"] = "none"
            if photometric == "MONOCHROME1":  # stored so that high is dark: flip so high is bright
                a = value_range[0] + value_range[1] - np.asarray(a, dtype=np.float64)
            a = a[None]
    spacing, meta["spacing_from"] = _dicom_spacing(ds)
    if frames > 1:
        between = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
        spacing = (float(between) if between and float(between) > 0 else 1.0,) + spacing
    array = np.ascontiguousarray(a, dtype=np.float32)
    return Image(array, spacing, None, value_range, "dicom", str(path), meta)


def _dicom_decoder_available(ts) -> bool:
    from pydicom.pixels import get_decoder

    try:
        return get_decoder(ts).is_available
    except NotImplementedError:  # no decoder is known for this syntax at all
        return False


def _dicom_spacing(ds) -> tuple[tuple[float, float], str | None]:
    """(row, column) spacing in mm and the tag it came from; (1, 1) when none is usable."""
    candidates = [("PixelSpacing", ds.get("PixelSpacing")),
                  ("ImagerPixelSpacing", ds.get("ImagerPixelSpacing"))]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and shared[0].get("PixelMeasuresSequence"):
        candidates.append(("PixelMeasuresSequence", shared[0].PixelMeasuresSequence[0].get("PixelSpacing")))
    for tag, value in candidates:
        try:
            row, col = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if row > 0 and col > 0:  # some files hold 0.000 as "unknown"
            return (row, col), tag
    return (1.0, 1.0), None


def _first(value) -> float:
    """The first of a multi-valued tag (several windows: the first is the default)."""
    return float(value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value)


# -- NIfTI --------------------------------------------------------------------

def _read_nifti(path: Path, max_pixels: int | None = None) -> Image:
    """3D ``(1, X, Y, Z)``; 4D, last axis as channels, ``(C, X, Y, Z)``; 2D ``(1, X, Y)``.

    The affine is nibabel's 4x4 voxel-to-world (also for a 2D file, whose
    plane need not be axial); spacing is the header's zooms.
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises a zoo of types
        if _starts_as_nifti(path):
            raise DataError(path, "header", f"a NIfTI file by its first bytes, but it cannot be read "
                            f"({type(e).__name__}: {e}; {path.stat().st_size} bytes): the file is truncated or "
                            "damaged") from e
        raise DataError(path, "file", f"{type(e).__name__}: {e}") from e
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(path, "file", f"not a NIfTI image ({type(img).__name__})")
    shape = img.shape
    if len(shape) == 5 and shape[3] == 1:
        shape = shape[:3] + shape[4:]  # (X, Y, Z, 1, C): NIfTI's vector images, one time point
    if not 2 <= len(shape) <= 4:
        raise DataError(path, "shape", f"{len(img.shape)}D NIfTI {_fmt_shape(img.shape)} "
                        "(readable: 2D, 3D, or 4D with channels last)")
    check_pixels(path, img.shape, max_pixels, "dim")  # the header's dim; the data is not read yet
    with _decoding(path, "pixels"):
        data = img.get_fdata(dtype=np.float32).reshape(shape)
    array = np.ascontiguousarray(np.moveaxis(data, -1, 0) if len(shape) == 4 else data[None])
    n = min(len(shape), 3)
    spacing = tuple(float(z) for z in img.header.get_zooms()[:n])
    meta = {"dtype": str(img.get_data_dtype()), "shape": [int(s) for s in img.shape],
            "axcodes": list(nib.aff2axcodes(img.affine))}
    return Image(array, spacing, np.asarray(img.affine, dtype=np.float64), _data_range(array),
                 "nifti", str(path), meta)


def _starts_as_nifti(path: Path) -> bool:
    """Whether a NIfTI reader should have read ``path``: a gzip stream that breaks off or is damaged (a cut
    ``.nii.gz``), or a file (after gzip) whose first field is NIfTI's ``sizeof_hdr``, 348 or 540."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as f:
                head = f.read(4)
        except (OSError, EOFError, zlib.error):
            return True
    return len(head) == 4 and {struct.unpack("<i", head)[0], struct.unpack(">i", head)[0]} & {348, 540} != set()


# -- NumPy arrays and signals -----------------------------------------------

def _read_npy(path: Path, max_pixels: int | None = None) -> Image:
    """A ``.npy`` array as ``(C, *spatial)`` float32 (see the module docstring); its sidecar read by :func:`_sidecar`.

    The header's shape is checked against ``max_pixels`` (all values, channels included) before the data
    is read; object and complex arrays are refused.
    """
    fmt = np.lib.format
    with _decoding(path, "header"):
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(f)
    if dtype.kind not in "biuf":
        raise DataError(path, "dtype", f"{dtype} is not a real number type (bool, int, uint or float)")
    if not 1 <= len(shape) <= 4:
        raise DataError(path, "shape", f"{len(shape)}-D array {_fmt_shape(shape)}; readable: (L,) or "
                        "channel-first (C, *spatial) with 1 to 3 spatial axes")
    check_pixels(path, shape, max_pixels, "shape")
    if 0 in shape:
        raise DataError(path, "shape", f"array {_fmt_shape(shape)} holds no values (an axis of length 0)")
    with _decoding(path, "pixels"):
        a = np.load(path, allow_pickle=False)
    array = np.ascontiguousarray(a[None] if a.ndim == 1 else a, dtype=np.float32)
    spacing, value_range, meta = _sidecar(path, array)
    meta.update({"dtype": str(dtype), "shape": [int(s) for s in shape]})
    return Image(array, spacing, None, value_range, "npy", str(path), meta)


def _sidecar(path: Path, array: np.ndarray) -> tuple[tuple[float, ...], tuple[float, float], dict]:
    """(spacing, value range, meta) for an array from its optional sidecar ``<name>.json``.

    Keys (all optional): ``fs`` (samples per second, 1D only: spacing 1/fs seconds), ``spacing`` (one
    positive number per spatial axis), ``range`` ([lo, hi], lo < hi: the nominal value range that
    ``scale="range"`` maps to [0, 1]; default the data's own min and max), ``channels`` (one name per
    channel) and ``units`` (text). ``fs`` and ``channels`` are kept in ``meta``.
    """
    import json

    nd = array.ndim - 1
    spacing, value_range, meta = (1.0,) * nd, _data_range(array), {}
    side = path.with_suffix(".json")
    if not side.is_file():
        return spacing, value_range, meta
    try:
        d = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(side, None, f"sidecar is not valid JSON ({exc})") from exc
    if not isinstance(d, dict):
        raise DataError(side, None, "sidecar must be a JSON object")

    def positive(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    if "fs" in d:
        if not positive(d["fs"]):
            raise DataError(side, "fs", f"sampling rate must be a positive number (samples per second), "
                            f"got {d['fs']!r}")
        if nd != 1:
            raise DataError(side, "fs", f"a sampling rate is for 1D signals (C, L); the array has {nd} spatial axes")
        spacing, meta["fs"] = (1.0 / float(d["fs"]),), float(d["fs"])
    if "spacing" in d:
        sp = d["spacing"]
        if not (isinstance(sp, list) and len(sp) == nd and all(positive(v) for v in sp)):
            raise DataError(side, "spacing", f"need {nd} positive numbers (one per spatial axis), got {sp!r}")
        spacing = tuple(float(v) for v in sp)
    if "range" in d:
        r = d["range"]
        if not (isinstance(r, list) and len(r) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                           and math.isfinite(v) for v in r) and r[0] < r[1]):
            raise DataError(side, "range", f"need [lo, hi] with finite lo < hi, got {r!r}")
        value_range = (float(r[0]), float(r[1]))
        meta["range"] = "sidecar"
    if "channels" in d:
        names = d["channels"]
        if not (isinstance(names, list) and len(names) == array.shape[0] and all(isinstance(n, str) for n in names)):
            raise DataError(side, "channels", f"need {array.shape[0]} names (one per channel), got {names!r}")
        meta["channels"] = list(names)
    if "units" in d:
        meta["units"] = str(d["units"])
    return spacing, value_range, meta


# -- MedMNIST -----------------------------------------------------------------

def _npy_shape(npz, key: str) -> tuple[int, ...]:
    """The shape an ``.npz`` member's ``.npy`` header declares (nothing decompressed beyond the header)."""
    fmt = np.lib.format
    with npz.zip.open(key + ".npy") as f:
        version = fmt.read_magic(f)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        return tuple(int(n) for n in read(f)[0])


def _medmnist_images(path: Path, key: str, images: np.ndarray) -> np.ndarray:
    if images.ndim == 3:  # (N, H, W) grey
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] == 3:  # (N, H, W, 3) RGB
        images = np.moveaxis(images, -1, 1)
    elif images.ndim == 4:  # (N, D, H, W): the 3D sets
        images = images[:, None]
    else:
        raise DataError(path, key, f"shape {_fmt_shape(images.shape)} is not (N, H, W), "
                        "(N, H, W, 3) or (N, D, H, W)")
    return np.ascontiguousarray(images, dtype=np.float32)


def _medmnist_labels(path: Path, key: str, labels: np.ndarray, n: int, ikey: str) -> np.ndarray:
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2 or len(labels) != n:
        raise DataError(path, key, f"shape {_fmt_shape(labels.shape)} does not match {n} rows of {ikey}")
    if labels.dtype.kind not in "biu" and not (labels.dtype.kind == "f" and np.all(labels == np.round(labels))):
        raise DataError(path, key, f"labels of dtype {labels.dtype} are not whole numbers")
    return labels.astype(np.int64)


# -- small helpers ------------------------------------------------------------

def _data_range(a: np.ndarray) -> tuple[float, float]:
    """(min, max) of the finite values; (min, min + 1) when flat; (0, 1) when none is finite."""
    finite = np.asarray(a)[np.isfinite(a)]
    if finite.size == 0:
        return (0.0, 1.0)
    lo, hi = float(finite.min()), float(finite.max())
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _fmt_shape(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def format_pixels(n: int) -> str:
    """A pixel count for messages: 900 Mpx, 50 Mpx, 0.25 Mpx; below 0.1 Mpx the count itself."""
    return f"{n / 1e6:.4g} Mpx" if n >= 100_000 else f"{n} pixels"
