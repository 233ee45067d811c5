"""Preprocessing that travels with a model: geometry, channels and intensity.

An image becomes the model's input in three steps, all recorded in
:class:`Preprocessing` and stored in the model card so that explaining,
benchmarking and serving see exactly what training saw:

1. intensity to [0, 1]: ``scale="range"`` maps the reader's ``Image.value_range``
   to [0, 1], which depends on the format (the table in :mod:`nemt.data.readers`):
   PNG/JPEG/BMP/TIFF of unsigned 8- or 16-bit integers by their dtype's full range
   (0..255, 0..65535); DICOM by its window (or VOI LUT) when it has one, else by
   its own min..max after the modality rescale; NIfTI, float and signed or
   32-bit integer TIFFs by their own min..max; ``.npy`` by its sidecar's
   ``range``, else its own min..max. So ``"range"`` is per-image min-max for
   every format without a nominal range. ``scale="minmax"`` is per-image
   min..max for every format;
2. channels: RGB to grey by luminance (2D colour images only: the volumes of a
   4D NIfTI are never mixed), or grey repeated to three channels;
3. resize to ``size`` (anti-aliased linear for images, nearest for masks,
   boxes scaled by the same factors), then ``(x - mean) / std`` per channel.

Everything is written for any number of spatial dimensions.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nemt.data.readers import Image
from nemt.errors import DataError
from nemt.ops import is_whole_number

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass
class Preprocessing:
    """How raw images become model inputs (see the module docstring).

    ``size`` is the spatial size, ``channels`` the model's input channels,
    ``mean``/``std`` one value per channel in the [0, 1] scale.
    """

    size: tuple[int, ...]
    channels: int = 1
    scale: str = "range"
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])

    def __post_init__(self) -> None:
        size = self.size
        if isinstance(size, (str, bytes)) or not hasattr(size, "__len__") or not 1 <= len(size) <= 3 \
                or not all(is_whole_number(s) and s >= 1 for s in size):
            raise DataError(None, "size", f"need 1 to 3 positive whole numbers, one per spatial axis (e.g. "
                            f"(128, 128)), got {size!r}")
        self.size = tuple(int(s) for s in size)
        if not is_whole_number(self.channels) or self.channels < 1:
            raise DataError(None, "channels", f"need a whole number >= 1, got {self.channels!r}")
        self.channels = int(self.channels)
        if self.scale not in ("range", "minmax"):
            raise DataError(None, "scale", f"unknown intensity scaling {self.scale!r} (range or minmax)")
        for key in ("mean", "std"):
            v = getattr(self, key)
            if isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or not len(v) or not all(
                    isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))
                    and math.isfinite(x) for x in v):
                raise DataError(None, key, f"need a list of finite numbers (1 or one per channel), got {v!r}")
            setattr(self, key, [float(x) for x in v])
        if min(self.std) <= 0:
            raise DataError(None, "std", f"must be positive (it divides the input), got {self.std}")
        if len(self.mean) == 1 and self.channels > 1:
            self.mean = self.mean * self.channels
        if len(self.std) == 1 and self.channels > 1:
            self.std = self.std * self.channels
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise DataError(None, "mean/std", f"need {self.channels} values, got {self.mean} / {self.std}")

    @property
    def spatial_dims(self) -> int:
        return len(self.size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(**{k: d[k] for k in ("size", "channels", "scale", "mean", "std") if k in d})

    # -- steps ---------------------------------------------------------------
    def unit_scale(self, img: Image) -> np.ndarray:
        """Intensities to [0, 1] and channels to ``self.channels``: (C, *original spatial)."""
        a = img.array.astype(np.float32, copy=False)
        if a.ndim != self.spatial_dims + 1:
            flat = a.ndim == self.spatial_dims + 2 and a.shape[-1] == 1  # e.g. a 2D image stored as X x Y x 1
            raise DataError(img.path, "shape", f"image has {a.ndim - 1} spatial dimensions, "
                            f"the model takes {self.spatial_dims}"
                            + (f"; its last axis has length 1 ({'x'.join(map(str, a.shape[1:]))}): squeeze that "
                               "axis (e.g. nibabel.squeeze_image) to store it as "
                               f"{self.spatial_dims}D" if flat else ""))
        check_volume_channels(img, self.channels)
        bad = ~np.isfinite(a)
        if bad.any():  # np.clip keeps NaN: the model's input, and every map of it, would be NaN
            raise DataError(img.path, "pixels", f"image has {int(bad.sum())} NaN or infinite values of {a.size}")
        if self.scale == "range":
            lo, hi = img.value_range
        else:
            lo, hi = float(a.min()), float(a.max())
        a = np.clip((a - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
        return convert_channels(a, self.channels, img.path)

    def resize(self, a: np.ndarray | torch.Tensor, *, mask: bool = False) -> torch.Tensor:
        """(C, *spatial) to (C, *size): anti-aliased linear for images, nearest for masks.

        Written on ``F.interpolate`` rather than MONAI's ``Resize``: the latter's
        anti-aliasing pads with zeros and darkens the borders of the image.
        2D uses bilinear with anti-aliasing; 1D signals and 3D use area averaging
        when every axis shrinks and (tri)linear otherwise. Constant images stay constant.
        """
        t = torch.as_tensor(a)
        if tuple(t.shape[1:]) == self.size:
            return t.bool() if mask else t.float()
        t = t.float()[None]
        if mask:
            return F.interpolate(t, size=self.size, mode="nearest-exact")[0] > 0.5
        if self.spatial_dims == 2:
            out = F.interpolate(t, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        elif all(s <= o for s, o in zip(self.size, t.shape[2:])):
            out = F.interpolate(t, size=self.size, mode="area")
        else:
            out = F.interpolate(t, size=self.size, mode="linear" if self.spatial_dims == 1 else "trilinear",
                                align_corners=False)
        return out[0]

    def resized_affine(self, affine: np.ndarray | None, original: Sequence[int]) -> np.ndarray:
        """The voxel-to-world affine of the resized grid (``size``) for an image of ``original`` spatial shape
        with ``affine``: voxel i' of the new grid is the continuous voxel (i' + 0.5) s - 0.5 of the original,
        s = original / size per axis (the centre convention of every mode :meth:`resize` uses). Identity
        when the image has no affine."""
        if affine is None:
            return np.eye(4)
        m = np.eye(4)
        for axis, (o, n) in enumerate(zip(original, self.size)):
            s = float(o) / float(n)
            m[axis, axis], m[axis, 3] = s, 0.5 * s - 0.5
        return np.asarray(affine, dtype=np.float64) @ m  # a 2D grid keeps the world's third axis as it is

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(…, C, *spatial) in [0, 1] to the model's input scale."""
        shape = (-1,) + (1,) * self.spatial_dims
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return (x - mean) / std

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalise` (for overlays)."""
        shape = (-1,) + (1,) * self.spatial_dims
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return x * std + mean

    def unit(self, img: Image) -> torch.Tensor:
        """A read image at the model's size with intensities in [0, 1] (what an overlay shows): (C, *size)."""
        return self.resize(self.unit_scale(img))

    def __call__(self, img: Image) -> torch.Tensor:
        """A read image to the model's input: (C, *size) float32."""
        return self.normalise(self.unit(img))

    def boxes(self, boxes: Sequence[tuple[float, float, float, float]],
              original: Sequence[int]) -> list[tuple[float, float, float, float]]:
        """Scale (x, y, w, h) boxes (x along the last axis) from ``original`` (H, W) to ``size``."""
        sy, sx = self.size[-2] / original[-2], self.size[-1] / original[-1]
        return [(x * sx, y * sy, w * sx, h * sy) for x, y, w, h in boxes]

    def box_mask(self, boxes: Sequence[tuple[float, float, float, float]]) -> torch.Tensor:
        """Rasterise scaled boxes into (1, H, W): pixels whose centre lies in a box."""
        h, w = self.size[-2], self.size[-1]
        yy = torch.arange(h, dtype=torch.float32).view(-1, 1) + 0.5
        xx = torch.arange(w, dtype=torch.float32).view(1, -1) + 0.5
        m = torch.zeros(h, w, dtype=torch.bool)
        for x, y, bw, bh in boxes:
            m |= (xx >= x) & (xx < x + bw) & (yy >= y) & (yy < y + bh)
        return m.unsqueeze(0)


def check_volume_channels(img: Image, channels: int) -> None:
    """Refuse channels that are more than one and not ``channels`` where they cannot be colours.

    RGB-to-grey by luminance is for 2D colour photos (PNG, JPEG, DICOM RGB). The volumes of a 4D NIfTI
    (time points, modalities, echoes) are not red, green and blue, nor are the channels of a volume or a
    signal from a ``.npy`` array (modalities, ECG leads), so three of them must not be mixed into one by
    luma weights, just as two or five are not. One channel (grey) may still be repeated.
    """
    c = img.array.shape[0]
    if c == channels or c == 1:
        return
    if img.modality == "nifti":
        ndim = len(img.meta.get("shape") or ()) or 4
        axis = {4: "4th", 5: "5th"}.get(ndim, "last")
        raise DataError(img.path, "channels", f"{c} volumes (channels) along its {axis} axis; "
                        f"the model takes {channels}")
    spatial = img.array.ndim - 1
    if spatial != 2:
        kind = "a volume" if spatial == 3 else "a signal"
        raise DataError(img.path, "channels", f"{c} channels of {kind} (first axis); the model takes {channels} "
                        "(only 2D colour images are mixed to grey)")


def convert_channels(a: np.ndarray, channels: int, path: str | None = None) -> np.ndarray:
    """(C, *spatial) to ``channels`` channels: RGB→grey by luminance, grey→RGB by repetition."""
    c = a.shape[0]
    if c == channels:
        return a
    if c == 3 and channels == 1:
        return np.tensordot(_LUMA, a, axes=(0, 0))[None].astype(np.float32)
    if c == 1 and channels == 3:
        return np.repeat(a, 3, axis=0)
    raise DataError(path, "channels", f"image has {c} channels, the model takes {channels}")
