"""Read one medical image (PNG, JPEG, BMP, TIFF, DICOM, NIfTI), a NumPy array or signal, a mask, or a MedMNIST file.

Every reader returns channel-first float32 with no resizing or normalisation:

* 2D images: ``(C, H, W)``, C = 1 for grey and 3 for colour;
* DICOM multi-frame: ``(C, F, H, W)``, frames first;
* NIfTI: ``(C, X, Y, Z)`` in nibabel's voxel order (``(1, X, Y)`` for a 2D file);
* NumPy ``.npy`` (told by its magic bytes): the array as stored, channel-first ``(C, *spatial)`` with 1 to 3
  spatial axes; a 1-D array ``(L,)`` is one channel ``(1, L)``. A signal is ``(C, L)``: ECG leads are channels.
  A sidecar ``<name>.json`` may give ``fs`` (samples per second of a 1D signal), ``spacing``, ``range``
  (the nominal value range), ``channels`` (names, e.g. leads) and ``units`` (see :func:`_read_npy`).

2D images from Pillow (PNG, JPEG, BMP, TIFF) are shown upright: an EXIF (TIFF) Orientation is applied,
as a viewer does. A multi-page TIFF is read as its first page only (``meta["frames"]`` counts the pages;
``nemt data check`` warns). 16-bit colour PNG/TIFF and 16-bit grey+alpha PNG are read as 8 bits, their high
bytes, because Pillow decodes them so: ``meta["bits"]`` is 8, ``meta["stored_bits"]`` 16 and
``meta["note"]`` says so (``nemt data check`` warns); 16-bit grey is read at full depth.

``Image.value_range`` is the range ``(lo, hi)`` that ``scale="range"``
(:class:`~nemt.data.preprocess.Preprocessing`) maps to [0, 1] by
``(array - lo) / (hi - lo)``, clipped. It is fixed by the format and sample
type where these give one, and is the image's own min..max where they do not:

====================================  ==================================================
file                                  ``value_range``
====================================  ==================================================
PNG, JPEG, BMP, TIFF: unsigned 8-bit  (0, 255) (also 1-bit, palette, 8-bit colour)
PNG, TIFF: unsigned 16-bit            (0, 65535) (``meta["bits"]`` 16)
TIFF: signed or 32-bit integers       its own min..max (``meta["bits"]`` 8, 16 or 32)
TIFF: floats                          its own min..max
DICOM grey with a VOI LUT             the LUT's own entries' min..max
DICOM grey with a window              the window's output range: the stored bits' range
                                      after the modality rescale (pydicom's windowing)
DICOM grey without either             its own min..max after the modality rescale
DICOM colour                          (0, 2**BitsStored - 1); PALETTE COLOR: its LUT
                                      dtype's full range
NIfTI (any datatype)                  its own min..max
NumPy ``.npy``                        the sidecar's ``range``, else its own min..max
====================================  ==================================================

``meta["range_from"]`` names the row that applied: ``"type"`` (a sample type's full range), ``"window"``,
``"lut"``, ``"sidecar"`` or ``"own"`` (the image's own min..max); ``meta["spacing_from"]`` where the spacing
came from (a DICOM tag, ``"header"`` for NIfTI, ``"sidecar"``), None where the file gives none and the
spacing is a placeholder 1.0 (PNG, JPEG, BMP, TIFF, ``.npy`` without a sidecar ``spacing`` or ``fs``; see
:mod:`nemt.data.acquisition`).

So ``scale="range"`` is a per-image min-max for DICOM without a window,
every NIfTI, float and signed or 32-bit integer TIFFs, and ``.npy`` without
a sidecar range. A flat image's own range is ``(v, v + 1)``. An empty
WindowCenter/WindowWidth, or a width <= 0 (< 1 unless VOILUTFunction is
LINEAR_EXACT), is read as no window (``meta["window_ignored"]`` says why).
An enhanced multi-frame DICOM without top-level RescaleSlope/Intercept or
WindowCenter/Width takes them from its SharedFunctionalGroupsSequence, else
from its per-frame groups: a rescale that differs between frames is refused,
a window that differs is the first frame's (``meta["window_from"]``).

Anything unreadable raises
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
#: ``warnings.catch_warnings`` swaps process-wide state: two threads' reads (Pillow's, pydicom's) must not
#: interleave it
_WARNINGS_LOCK = threading.Lock()


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
    """Read one image file, or a folder of one DICOM series (:func:`_read_dicom_series`); a file's format is
    told by its magic bytes first, its suffix second.

    ``max_pixels`` (default :data:`DEFAULT_MAX_PIXELS`) bounds the pixels
    (voxels, all frames) the header may declare; more raises
    :class:`ImageTooLarge` before decoding.
    """
    path = Path(path)
    if path.is_dir():  # a DICOM series: one file per slice
        return _read_dicom_series(path, max_pixels=max_pixels)
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
    """A mask as bool ``(1, *spatial)``: True where any colour channel is nonzero and the pixel is not
    transparent.

    Transparency is an alpha band (``LA``, ``RGBA``, a palette's or ``tRNS``
    transparency): a pixel of alpha 0 is background whatever its colour (a
    white mask on a transparent background marks only its opaque pixels); an
    image without alpha counts its colours alone. Palette (``P``) PNGs count
    nonzero palette indices, not colours, so a palette whose entry 0 is not
    black still has background False. EXIF/TIFF Orientation is applied as for
    :func:`read_image`. ``like`` (an Image or a spatial shape) must have the
    same spatial shape. ``max_pixels`` as for :func:`read_image`.
    """
    path = Path(path)
    if (_sniff(path) or _suffix_format(path)) == "pil":
        a, grey, alpha, _ = _pil_pixels(path, True, max_pixels, alpha=True)
        if a.ndim == 3:
            a = a[..., :1] if grey else a[..., :3]
        mask = np.any(a.reshape(a.shape[:2] + (-1,)) != 0, axis=-1)
        if alpha is not None:
            mask &= alpha > 0
        read = Image(mask[None], (1.0, 1.0), None, (0.0, 1.0), "mask", str(path))
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
    """8/16-bit grey or RGB to ``(1|3, H, W)``; alpha dropped; EXIF/TIFF Orientation applied. Only the first
    page of a TIFF stack (``meta["frames"]`` counts them). Value range and ``meta["bits"]`` as the module
    docstring's table says."""
    a, grey, _, meta = _pil_pixels(path, palette_indices, max_pixels)
    if a.ndim == 3:
        a = a[..., :1] if grey else a[..., :3]  # drops alpha
    a = a.reshape(a.shape[:2] + (-1,))
    a, value_range, meta["bits"] = _pil_range(a, meta)
    meta["spacing_from"] = None  # a pixel's size is not recorded (DPI is not a spacing)
    array = np.ascontiguousarray(np.moveaxis(a, -1, 0), dtype=np.float32)
    return Image(array, (1.0, 1.0), None, value_range, meta["format"].lower(), str(path), meta)


#: Pillow's warnings that say a file ends before its header does (a TIFF's image file directory cut short)
_PIL_TRUNCATION = ("truncated file read", "tag data larger than file", "tag offset too large")


def _pil_pixels(path: Path, palette_indices: bool, max_pixels: int | None,
                alpha: bool = False) -> tuple[np.ndarray, bool, np.ndarray | None, dict]:
    """Decode with Pillow: (pixels ``(H, W)`` or ``(H, W, K)``, grey, alpha ``(H, W)`` or None, meta).

    ``alpha``: also return the transparency of every pixel (a band, or a palette's or ``tRNS`` transparency;
    None when the image has none). Pillow's warnings do not reach the caller: one that says the header is
    cut short raises :class:`DataError` (``header``), the others go into ``meta["pillow_warnings"]``.
    """
    # warnings.catch_warnings swaps process-wide state: the lock keeps two threads' reads apart
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _pil_pixels_warned(path, palette_indices, max_pixels, alpha, caught)
    if caught:
        out[3]["pillow_warnings"] = list(dict.fromkeys(str(w.message) for w in caught))
    return out


def _refuse_truncated_header(path: Path, fmt: str, caught: Sequence[warnings.WarningMessage]) -> None:
    cut = [str(w.message) for w in caught if str(w.message).lower().startswith(_PIL_TRUNCATION)]
    if cut:
        raise DataError(path, "header", f"a {fmt} file by its signature, but its header is cut short (Pillow: "
                        f"{cut[0]}; {path.stat().st_size} bytes): the file is truncated")


def _pil_pixels_warned(path: Path, palette_indices: bool, max_pixels: int | None, want_alpha: bool,
                       caught: Sequence[warnings.WarningMessage]):
    try:
        im = _open_pil(path)
    except Exception as e:  # a plugin's header parser may raise more than OSError
        with open(path, "rb") as f:
            head = f.read(16)
        _refuse_truncated_header(path, next((k for k, v in _PIL_SIGNATURES.items() if head.startswith(v)), "TIFF"),
                                 caught)
        raise _pil_refusal(path, e) from e
    if im is None:
        raise _pil_refusal(path, None)
    try:
        _refuse_truncated_header(path, im.format, caught)
        check_pixels(path, im.size[::-1], max_pixels)  # the header's size, before any decoding
    except DataError:
        im.close()
        raise
    with im, _decoding(path, "pixels"):
        frames = getattr(im, "n_frames", 1)  # walks a TIFF's directories: a cut one warns here
        _refuse_truncated_header(path, im.format, caught)
        meta = {"format": im.format, "mode": im.mode, "frames": frames}
        if im.format == "TIFF":  # the stored sample type (Pillow reads int8 as uint8, uint32 as int32)
            kind = im.tag_v2.get(339, (1,))
            meta["tiff_bits"] = int(tuple(im.tag_v2.get(258, (0,)))[0])
            meta["tiff_signed"] = int(kind[0] if isinstance(kind, tuple) else kind) == 2
        rawmode = _pil_rawmode(im)  # the tile goes with the decode
        orientation = _take_orientation(im)
        im.load()  # a full decode, so that a truncated file fails here and not later
        if orientation != 1:  # as a viewer shows it
            im = im.transpose(_EXIF_TRANSPOSE[orientation])
            meta["orientation"] = orientation
        grey = im.mode in ("1", "L", "LA", "I", "F") or im.mode.startswith("I;16")
        if rawmode.startswith(("RGB;16", "RGBA;16", "LA;16")):
            # Pillow decodes 16-bit colour (and 16-bit grey+alpha, as RGBA of three equal bands) to 8 bits
            grey = grey or rawmode.startswith("LA;16")
            meta["stored_bits"] = 16
            meta["note"] = (f"16-bit {'grey+alpha' if rawmode.startswith('LA') else 'colour'} read as 8-bit "
                            "(Pillow keeps the 8 high bits)")
        transparency = None
        if want_alpha and "transparency" in im.info and im.mode in ("1", "L", "P", "RGB", "I", "I;16"):
            transparency = np.asarray(im.convert("RGBA"))[..., 3]
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
        has_band = im.mode in ("LA", "PA", "RGBA", "La", "RGBa")
    if want_alpha and transparency is None and has_band:
        transparency = a[..., -1]
    return a, grey, transparency, meta


def _exif_transpose_table() -> dict:
    from PIL.Image import Transpose

    # ImageOps.exif_transpose's table: Orientation -> the transposition that shows the image upright
    return {2: Transpose.FLIP_LEFT_RIGHT, 3: Transpose.ROTATE_180, 4: Transpose.FLIP_TOP_BOTTOM,
            5: Transpose.TRANSPOSE, 6: Transpose.ROTATE_270, 7: Transpose.TRANSVERSE, 8: Transpose.ROTATE_90}


_EXIF_TRANSPOSE = _exif_transpose_table()


def _take_orientation(im) -> int:
    """The EXIF (TIFF: tag 274) Orientation, 1 to 8, read before decoding (1 when absent or invalid).

    What :func:`PIL.ImageOps.exif_transpose` does, but for a TIFF Pillow's own handling is switched off
    first: Pillow 13 applies a TIFF's orientation while decoding and scrambles orientations 5 to 8 (it
    decodes the rows into a buffer of the rotated size); the caller transposes the decoded image instead.
    """
    try:
        exif = im.getexif()  # a PNG's eXIf chunk may follow its pixels: Pillow decodes them to find it
        orientation = int(exif.get(0x0112, 1))
    except (TypeError, ValueError):
        return 1
    if orientation not in _EXIF_TRANSPOSE:
        return 1
    if im.format == "TIFF":
        del exif[0x0112]  # the cached EXIF Pillow's TIFF decoder consults
        tile_size = getattr(im, "_tile_size", None)
        if tile_size:
            im._size = tuple(tile_size)  # the stored size, which Pillow swapped for orientations 5 to 8
    return orientation


def _pil_rawmode(im) -> str:
    """How the file stores its pixels, as Pillow names it (``RGB;16B``: 16-bit RGB), or ``""``."""
    try:
        args = im.tile[0].args if im.tile else None
    except (AttributeError, IndexError):
        return ""
    raw = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else ""
    return raw if isinstance(raw, str) else ""


def _pil_range(a: np.ndarray, meta: dict) -> tuple[np.ndarray, tuple[float, float], int]:
    """(pixels, value range, bits per sample) by the sample type alone, never by the values: unsigned 8-bit
    0..255, unsigned 16-bit 0..65535; signed or 32-bit integers and floats their own min..max."""
    signed, bits = meta.pop("tiff_signed", False), meta.pop("tiff_bits", None)
    meta["range_from"] = "type"  # the sample type's full range, unless one of the own-range cases below
    if a.dtype.kind == "f":
        meta["range_from"] = "own"
        return a, _data_range(a), a.dtype.itemsize * 8
    if signed and a.dtype.kind == "u":  # Pillow decodes signed 8-bit TIFF samples as unsigned
        a = a.view(f"i{a.dtype.itemsize}")
    elif meta["format"] == "TIFF" and not signed and bits == 32 and a.dtype.kind == "i":
        a = a.view(np.uint32)  # and unsigned 32-bit ones as signed
    if not signed and a.dtype.itemsize == 1:  # 8-bit, 1-bit (as 0/255) and Pillow's 8 bits of 16-bit colour
        return a, (0.0, 255.0), 8
    if not signed and (a.dtype.itemsize == 2 or (a.dtype.kind == "i" and bits in (None, 16))):
        return a, (0.0, 65535.0), 16  # Pillow's "I" mode holds 16-bit unsigned samples too
    meta["range_from"] = "own"
    return a, _data_range(a), int(bits or a.dtype.itemsize * 8)


# -- DICOM --------------------------------------------------------------------

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
    sop = _sop_class(ds)
    if "Directory Storage" in sop:
        return (f"no pixel data: a DICOMDIR ({sop}), the index of a medium's files, not an image; read the "
                "image files it lists")
    return (f"no pixel data ({sop + ': ' if sop else ''}not an image object, or a file truncated before its "
            f"image header; {size} bytes{note})")


def _sop_class(ds) -> str:
    """The file's SOP class in words, ``RT Structure Set Storage (1.2.840.10008.5.1.4.1.1.481.3)``, or ``""``."""
    meta = getattr(ds, "file_meta", None)
    uid = (meta.get("MediaStorageSOPClassUID") if meta is not None else None) or ds.get("SOPClassUID")
    if not uid:
        return ""
    name = getattr(uid, "name", "")
    return f"{name} ({uid})" if name and name != str(uid) else f"SOP class {uid}"


def _read_dicom(path: Path, max_pixels: int | None = None) -> Image:
    """Stored values -> modality LUT -> VOI LUT or window -> MONOCHROME1 inverted.

    Grey ``(1, H, W)`` or colour ``(3, H, W)``; multi-frame ``(C, F, H, W)``. pydicom's warnings (a value
    that breaks its VR, a value cut short) do not reach the terminal: an error quotes the first, an image
    keeps them in ``meta["pydicom_warnings"]``.
    """
    # pydicom reads a file cut short without complaint, up to its last whole element, and warns about a
    # value cut in half when the value is first used, anywhere below
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:  # the lock: the service reads in threads
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
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi

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
        # a known object class that holds no image (a structured report, an RT structure set, a DICOMDIR) is a
        # kind of file nemt does not read (field SOPClassUID: the service answers 415), not a damaged image
        sop = _sop_class(ds)
        other = bool(sop) and "Image" not in sop and not any(k in ds for k in _IMAGE_HEADER)
        raise DataError(path, "SOPClassUID" if other else "PixelData", _no_pixel_data(ds, path, caught))
    if not ds[element].value:  # present but empty (pydicom reads a zero-length value as None)
        raise DataError(path, element, f"no pixel data: the {element} element is empty")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    prefix = ""
    if ts is not None and ts.is_compressed:
        prefix = f"{ts.name} ({ts}): "
        decoders = _dicom_decoders(ts)
        if not decoders:
            raise DataError(path, "TransferSyntaxUID", f"{prefix}compressed pixel data and no installed "
                            f"decoder; {_decoder_hint(ts)}")
        allocated = int(ds.get("BitsAllocated", 8) or 8)
        if ts == "1.2.840.10008.1.2.4.51" and allocated > 8 and decoders == ("pillow",):
            # JPEG Extended holds 12-bit samples; Pillow, the one decoder here, reads 8-bit JPEG only
            raise DataError(path, "TransferSyntaxUID", f"{prefix}{int(ds.get('BitsStored', 12) or 12)}-bit "
                            f"samples (BitsAllocated {allocated}), and Pillow, the only installed decoder for it, "
                            "reads 8-bit JPEG only; install pylibjpeg-libjpeg "
                            "(pip install pylibjpeg pylibjpeg-libjpeg) or python-gdcm")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    except (TypeError, ValueError) as e:
        raise DataError(path, "Rows/Columns/NumberOfFrames", f"not whole numbers ({e})") from e
    for name, n in (("Rows", rows), ("Columns", cols)):
        if n <= 0:
            raise DataError(path, name, f"{n if name in ds else 'missing'}: an image needs its number of "
                            f"{name.lower()} (the header is damaged or incomplete)")
    check_pixels(path, (frames, rows, cols) if frames > 1 else (rows, cols), max_pixels,
                 "Rows/Columns/NumberOfFrames")
    meta = {"Modality": str(ds.get("Modality", "")), "PhotometricInterpretation": photometric,
            "BitsStored": int(ds.get("BitsStored", 0) or 0), "frames": frames,
            "TransferSyntaxUID": str(ts or "")}
    _functional_groups(ds, path, meta)
    with _decoding(path, "PixelData", prefix):
        a = ds.pixel_array
        if photometric == "PALETTE COLOR":
            a = apply_color_lut(a, ds)
        colour = a.ndim == (4 if frames > 1 else 3)
        if colour:
            # pydicom hands YBR as RGB already; no modality or VOI LUT applies to colour.
            bits = a.dtype.itemsize * 8 if photometric == "PALETTE COLOR" else meta["BitsStored"]
            value_range = (0.0, float(2 ** bits - 1)) if a.dtype.kind == "u" and bits else _data_range(a)
            meta["range_from"] = "type" if a.dtype.kind == "u" and bits else "own"
            a = np.moveaxis(a, -1, 0)
        else:
            a = apply_modality_lut(a, ds)
            if ds.get("VOILUTSequence"):
                a = apply_voi(a, ds, 0)
                # the range of the LUT's own entries (its descriptor's bit depth may be wider than they are)
                desc = ds.VOILUTSequence[0].LUTDescriptor
                first, n = int(desc[1]), int(desc[0]) or 2 ** 16
                value_range = _data_range(apply_voi(np.arange(first, first + n, dtype=np.int64), ds, 0))
                meta["voi"] = meta["range_from"] = "lut"
                a = _bright_high(a, value_range, photometric)
            else:
                a, value_range = _window_or_own(a, ds, meta)
            a = a[None]
    spacing, meta["spacing_from"] = _dicom_spacing(ds)
    if frames > 1:
        between = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
        spacing = (float(between) if between and float(between) > 0 else 1.0,) + spacing
        if not (between and float(between) > 0):  # the frames' 1.0 is a placeholder: the spacing is not known
            meta["spacing_from"] = None
    array = np.ascontiguousarray(a, dtype=np.float32)
    return Image(array, spacing, None, value_range, "dicom", str(path), meta)


def _dicom_decoders(ts) -> tuple[str, ...]:
    """The installed pydicom plugins that decode transfer syntax ``ts`` (``()``: none)."""
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(ts)
        return tuple(decoder.available_plugins) if decoder.is_available else ()
    except NotImplementedError:  # no decoder is known for this syntax at all
        return ()


def _decoder_hint(ts) -> str:
    """What to install for ``ts``, from pydicom's own list of the plugins that decode it."""
    from pydicom.pixels import get_decoder

    try:
        missing = list(get_decoder(ts).missing_dependencies)
    except Exception:  # noqa: BLE001 - no decoder is known for this syntax at all
        missing = []
    options = []
    for line in missing:  # e.g. "pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0"
        plugin, _, needs = line.partition(" - requires ")
        needs = needs.replace("numpy and ", "")
        options.append(needs.replace("gdcm>=", "python-gdcm>=") if plugin.strip() == "gdcm" else needs or plugin)
    if not options:
        return "no pydicom decoder plugin reads it; convert the file to an uncompressed transfer syntax"
    return "install a pydicom decoder plugin that reads it: " + ", or ".join(options)


def _window_problem(ds) -> str | None:
    """Why the first WindowCenter/WindowWidth cannot be applied (empty, not a number, width too small), or None."""
    try:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    except (TypeError, ValueError, IndexError):
        return (f"WindowCenter/WindowWidth {ds.get('WindowCenter')!r}/{ds.get('WindowWidth')!r} are empty or "
                "not numbers: read as no window")
    function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    if not (math.isfinite(center) and math.isfinite(width)) or width <= 0 or \
            (width < 1 and function != "LINEAR_EXACT"):
        return f"WindowWidth {width:g} is not a usable width (> 0; >= 1 for {function}): read as no window"
    return None


#: functional group sequence -> the top-level tags it holds (an enhanced multi-frame file keeps them there)
_FUNCTIONAL_GROUPS = {"PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept", "RescaleType"),
                      "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction")}


def _functional_groups(ds, path: Path, meta: dict) -> None:
    """Copy an enhanced multi-frame file's rescale and window from its functional groups to the top level,
    where the modality LUT and windowing look, when the top level has none.

    The shared group first; else the per-frame groups: a rescale that differs between frames is refused
    (one rescale for all frames would change the values), a window that differs is taken from the first
    frame and ``meta["window_from"]`` says so. ``meta["rescale_from"]``/``["window_from"]`` name the source.
    """
    shared = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    for group, tags in _FUNCTIONAL_GROUPS.items():
        what = "rescale" if group.startswith("Pixel") else "window"
        if tags[0] in ds or tags[1] in ds:  # the top level's own values win
            continue
        item, source = None, None
        if shared and shared[0].get(group):
            item, source = shared[0][group][0], f"SharedFunctionalGroupsSequence.{group}"
        else:
            items = [f[group][0] if f.get(group) else None for f in per_frame]
            if not items or items[0] is None:
                continue
            item, source = items[0], f"PerFrameFunctionalGroupsSequence.{group}"
            values = {tuple(str(it.get(t)) if it is not None else None for t in tags[:2]) for it in items}
            if len(values) > 1 and what == "rescale":
                raise DataError(path, source, f"{len(values)} different rescales (RescaleSlope, RescaleIntercept) "
                                f"among the {len(items)} frames; nemt applies one rescale to a whole image")
            if len(values) > 1:
                source += f", first frame's ({len(values)} different windows among the {len(items)} frames)"
        for tag in tags:
            if tag in item:
                ds[item[tag].tag] = item[tag]
        meta[f"{what}_from"] = source


def _window_or_own(a: np.ndarray, ds, meta: dict) -> tuple[np.ndarray, tuple[float, float]]:
    """Grey values after the modality LUT to what ``scale="range"`` maps: through ``ds``'s first window if it is
    usable (its value range the window's output range), else as they are (their own min..max); MONOCHROME1
    flipped so that high is bright. Records ``meta["voi"]``, ``["range_from"]`` and ``["window"]`` or
    ``["window_ignored"]``. The single-file reader and the series reader (with its first slice) share it."""
    from pydicom.pixels import apply_windowing

    unusable = _window_problem(ds) if "WindowCenter" in ds and "WindowWidth" in ds else None
    if "WindowCenter" in ds and "WindowWidth" in ds and unusable is None:
        a = apply_windowing(a, ds, 0)
        # pydicom maps the window onto the stored bits' range (after rescale);
        # windowing -inf and +inf gives exactly those ends.
        lo, hi = apply_windowing(np.array([-np.inf, np.inf]), ds, 0)
        value_range = (float(min(lo, hi)), float(max(lo, hi)))
        meta["voi"] = meta["range_from"] = "window"
        meta["window"] = [_first(ds.WindowCenter), _first(ds.WindowWidth)]
    else:
        value_range = _data_range(a)
        meta["voi"], meta["range_from"] = "none", "own"
        if unusable:
            meta["window_ignored"] = unusable
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    return _bright_high(a, value_range, photometric), value_range


def _bright_high(a: np.ndarray, value_range: tuple[float, float], photometric: str) -> np.ndarray:
    """MONOCHROME1 (stored so that high is dark) flipped within its value range so that high is bright."""
    if photometric == "MONOCHROME1":
        return value_range[0] + value_range[1] - np.asarray(a, dtype=np.float64)
    return a


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


# -- DICOM series ---------------------------------------------------------------

def _read_dicom_series(folder: Path, max_pixels: int | None = None) -> Image:
    """A folder holding one DICOM series of single-frame slices (CT, MR, PET as exported from a PACS) as a
    volume ``(1, X, Y, Z)`` in nibabel's voxel order with its RAS affine (nibabel's DICOM formula), as a NIfTI
    converted from it reads. The slices are ordered by their position along the slice normal, not by file
    name or InstanceNumber, and each gets its own modality LUT (RescaleSlope/Intercept: CT in HU). Written
    here, not with MONAI's ``PydicomReader``: that one orders by InstanceNumber, drops slices without it, and
    takes the slice spacing from positions' z alone (wrong for sagittal or coronal series). The first slice's
    window, if usable, is applied to the volume as the 2D reader applies a file's (``meta["voi"]``), else the
    volume's own min..max is its range. Every file must be DICOM and of one series, with one size and a
    position per slice, at distinct positions; the header sizes are checked against ``max_pixels`` before
    any pixel is decoded."""
    import pydicom

    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(folder, "file", "an empty folder (a folder is read as one DICOM series, a file per slice)")
    headers = []
    for p in files:
        if p.stat().st_size == 0 or _sniff(p) != "dicom":
            raise DataError(p, "file", f"not a DICOM file, in {folder}, which is read as one DICOM series (a file "
                            "per slice): move other files out")
        with _decoding(p, "header"):
            headers.append(pydicom.dcmread(p, stop_before_pixels=True))
    series = sorted({str(h.get("SeriesInstanceUID", "")) for h in headers})
    if len(series) > 1:
        raise DataError(folder, "SeriesInstanceUID", f"{len(series)} series in one folder ({', '.join(series[:3])}"
                        f"{', ...' if len(series) > 3 else ''}); put each series in a folder of its own")
    for p, h in zip(files, headers):
        if int(h.get("NumberOfFrames", 1) or 1) > 1:
            raise DataError(p, "NumberOfFrames", "a multi-frame file in a series folder: read it on its own")
        if int(h.get("SamplesPerPixel", 1) or 1) != 1:
            raise DataError(p, "SamplesPerPixel", "a colour slice: a series is read as grey slices only")
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "Rows", "Columns"):
            if tag not in h:
                raise DataError(p, tag, "missing: the slices of a series cannot be placed and ordered without it")
    sizes = {(int(h.Rows), int(h.Columns)) for h in headers}
    if len(sizes) > 1:
        raise DataError(folder, "Rows/Columns", f"slices of different sizes {sorted(sizes)}")
    normal = np.cross(*np.asarray(headers[0].ImageOrientationPatient, dtype=np.float64).reshape(2, 3))
    where = np.round([float(np.dot(normal, np.asarray(h.ImagePositionPatient, dtype=np.float64)))
                      for h in headers], 4)
    if len(set(where.tolist())) != len(where):
        values, counts = np.unique(where, return_counts=True)
        raise DataError(folder, "ImagePositionPatient", f"{int((counts > 1).sum())} positions hold more than one "
                        f"slice (e.g. {values[counts > 1][0]:g} mm along the normal): two series, echoes or time "
                        "points in one folder? put each in a folder of its own")
    rows, cols = sizes.pop()
    check_pixels(folder, (len(files), rows, cols), max_pixels, "Rows/Columns/slices")
    order = np.argsort(where)
    steps = np.diff(where[order])
    if len(steps) and (steps.max() - steps.min()) > 0.01 * max(float(np.median(steps)), 1e-6):
        raise DataError(folder, "ImagePositionPatient", f"slices {steps.min():g} to {steps.max():g} mm apart: missing "
                        "slices or a varying thickness (a volume needs one spacing; resample it first)")
    from pydicom.pixels import apply_modality_lut
    slices = []
    for k in order:  # each slice's own rescale (PET and some MR slices have their own)
        ts = getattr(headers[k], "file_meta", {}).get("TransferSyntaxUID")
        prefix = f"{ts.name} ({ts}): " if ts is not None and ts.is_compressed else ""
        with _decoding(files[k], "PixelData", prefix):
            ds = pydicom.dcmread(files[k])
            slices.append(np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64))
    a = np.stack(slices).transpose(2, 1, 0)  # (slice, row, column) to nibabel's (column, row, slice)
    # nibabel's DICOM affine (LPS): column index along the row cosine at the column spacing, row index along the
    # column cosine at the row spacing, slice index from the first slice's position to the last's; then RAS
    h0, h1 = headers[order[0]], headers[order[-1]]
    iop = np.asarray(h0.ImageOrientationPatient, dtype=np.float64)
    row_mm, col_mm = (float(v) for v in h0.get("PixelSpacing", [1.0, 1.0]))
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = iop[:3] * col_mm, iop[3:] * row_mm
    p0, p1 = (np.asarray(h.ImagePositionPatient, dtype=np.float64) for h in (h0, h1))
    lps[:3, 2] = (p1 - p0) / (len(files) - 1) if len(files) > 1 else normal * float(h0.get("SliceThickness", 1) or 1)
    lps[:3, 3] = p0
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    first = headers[int(np.argmin(where))]  # the first slice along the normal
    meta = {"Modality": str(first.get("Modality", "")), "series": len(files), "spacing_from": "ImagePositionPatient",
            "sform_code": 1, "qform_code": 1, "space_unit": "mm"}
    a, value_range = _window_or_own(a, first, meta)  # the first slice's window, as a single file's
    import nibabel as nib
    meta["axcodes"] = list(nib.aff2axcodes(affine))
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    array = np.ascontiguousarray(a[None], dtype=np.float32)
    return Image(array, spacing, affine, value_range, "dicom", str(folder), meta)


# -- NIfTI --------------------------------------------------------------------

def map_nifti(array: np.ndarray, affine: np.ndarray, like: Image) -> bytes:
    """A map over image ``like`` as an uncompressed NIfTI-1 file's bytes, with voxel-to-world ``affine`` (the
    map's grid: :meth:`Preprocessing.resized_affine` of ``like``'s) and ``like``'s header codes: a NIfTI
    input's sform / qform codes and spatial unit (so a viewer places the map where it places the input); a DICOM
    series' scanner codes and mm (its affine is the patient position); a single DICOM file's unit, mm, with the
    "aligned" sform code (its affine is its spacing, not the patient position); else "aligned" and no unit."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine)
    meta = like.meta or {}
    if "sform_code" in meta:  # a NIfTI's own codes; a DICOM series' scanner coordinates (1, 1, mm)
        sform, qform = int(meta.get("sform_code", 0)), int(meta.get("qform_code", 0))
        unit = meta.get("space_unit", "unknown")
    else:
        sform, qform, unit = 2, 0, "mm" if like.modality == "dicom" else "unknown"
    img.set_sform(affine, code=sform)
    img.set_qform(affine if qform else None, code=qform)
    img.header.set_xyzt_units(xyz=unit if unit in ("meter", "mm", "micron") else "unknown")
    return img.to_bytes()


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
    dtype = img.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "biuf":  # RGB24/RGBA32 (records), complex
        try:
            label = str(img.header.get_value_label("datatype"))
        except Exception:  # noqa: BLE001 - only the name in the message is lost
            label = str(dtype)
        raise DataError(path, "file", f"NIfTI datatype {label} ({dtype}) is not supported: nemt reads integer and "
                        "floating-point NIfTI; store colour or other components as a 4th axis of volumes")
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
            "axcodes": list(nib.aff2axcodes(img.affine)), "spacing_from": "header", "range_from": "own",
            "space_unit": img.header.get_xyzt_units()[0],
            "sform_code": int(img.header["sform_code"]), "qform_code": int(img.header["qform_code"])}
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
    spacing, value_range, meta = (1.0,) * nd, _data_range(array), {"spacing_from": None, "range_from": "own"}
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
        meta["spacing_from"] = "sidecar"
    if "spacing" in d:
        sp = d["spacing"]
        if not (isinstance(sp, list) and len(sp) == nd and all(positive(v) for v in sp)):
            raise DataError(side, "spacing", f"need {nd} positive numbers (one per spatial axis), got {sp!r}")
        spacing = tuple(float(v) for v in sp)
        meta["spacing_from"] = "sidecar"
    if "range" in d:
        r = d["range"]
        if not (isinstance(r, list) and len(r) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                           and math.isfinite(v) for v in r) and r[0] < r[1]):
            raise DataError(side, "range", f"need [lo, hi] with finite lo < hi, got {r!r}")
        value_range = (float(r[0]), float(r[1]))
        meta["range"] = meta["range_from"] = "sidecar"
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
