"""A PyTorch data set over a :class:`~nemt.data.manifest.Manifest`.

Each item is a dict:

- ``image``: (C, *size) float32, normalised model input;
- ``y``: class index (int64), 0/1 vector (float32) or scalar (float32);
- ``gt``: (1, *size) bool ground-truth mask (mask image or rasterised boxes;
  all False when there is none);
- ``has_gt``: whether the sample has ground truth at all (a normal image with
  an empty mask file has ground truth that is empty);
- ``index``: the sample's position in the manifest.

With ``cache=True`` the resized [0, 1] images are kept in memory after the
first read, which is what small medical data sets want on a CPU.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from nemt.data.acquisition import describe
from nemt.data.manifest import Manifest, Sample
from nemt.data.preprocess import Preprocessing
from nemt.data.readers import Image, read_image, read_mask
from nemt.ops import ArgumentTypeError, ParameterError


def read_sample(manifest: Manifest, sample: Sample) -> Image:
    """The sample's image, from its file or from the manifest's in-memory array."""
    if sample.index is None:
        return read_image(sample.image, max_pixels=manifest.max_pixels)
    a = manifest.arrays[sample.index].astype(np.float32)
    return Image(array=a, spacing=(1.0,) * (a.ndim - 1), affine=None, value_range=(0.0, 255.0),
                 modality="npz", path=sample.name, meta={"spacing_from": None, "range_from": "type"})


class ImageDataset(Dataset):
    """Model-ready items for a subset of a manifest (see the module docstring)."""

    def __init__(self, manifest: Manifest, preprocessing: Preprocessing,
                 indices: Sequence[int] | None = None, cache: bool = True):
        if not isinstance(manifest, Manifest):
            raise ArgumentTypeError(f"manifest must be a Manifest (nemt.data.open_dataset), got "
                                    f"{type(manifest).__name__}")
        if isinstance(preprocessing, dict):  # a card's "preprocessing" as it is stored
            preprocessing = Preprocessing.from_dict(preprocessing)
        if not isinstance(preprocessing, Preprocessing):
            raise ArgumentTypeError(f"preprocessing must be a Preprocessing (e.g. a model's clf.preprocessing), "
                                    f"got {type(preprocessing).__name__}")
        self.manifest = manifest
        self.pre = preprocessing
        n = len(manifest.samples)
        self.indices = list(range(n)) if indices is None else _checked_indices(indices, n, manifest.source)
        self.cache = cache
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor, bool]] = {}
        #: per manifest index read so far: :func:`nemt.data.acquisition.describe` of its image
        self.described: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def unit_item(self, i: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(image in [0, 1] at model size, gt mask, has_gt) for position ``i``."""
        j = self.indices[i]
        if j in self._cache:
            return self._cache[j]
        s = self.manifest.samples[j]
        img = read_sample(self.manifest, s)
        self.described[j] = describe(img)
        x = self.pre.resize(self.pre.unit_scale(img))
        spatial = img.array.shape[1:]
        if s.mask is not None:
            gt = self.pre.resize(read_mask(s.mask, like=img, max_pixels=self.manifest.max_pixels), mask=True)
        elif s.boxes:
            gt = self.pre.box_mask(self.pre.boxes(s.boxes, spatial))
        else:
            gt = torch.zeros((1, *self.pre.size), dtype=torch.bool)
        item = (x, gt, s.has_gt)
        if self.cache:
            self._cache[j] = item
        return item

    def __getitem__(self, i: int) -> dict:
        x, gt, has_gt = self.unit_item(i)
        j = self.indices[i]
        y = self.manifest.samples[j].y
        yt = torch.tensor(y, dtype=torch.int64 if self.manifest.task == "multiclass" else torch.float32)
        return {"image": self.pre.normalise(x), "y": yt, "gt": gt, "has_gt": has_gt, "index": j}

    def stacked(self) -> dict:
        """All items at once (small data sets): image (N, C, *size), y, gt, has_gt, index."""
        if len(self) == 0:
            raise ParameterError(f"this ImageDataset of {self.manifest.source} holds no sample (an empty split?): "
                                 "nothing to stack")
        items = [self[i] for i in range(len(self))]
        return {k: (torch.stack([it[k] for it in items]) if torch.is_tensor(items[0][k])
                    else torch.tensor([it[k] for it in items])) for k in items[0]}


def _checked_indices(indices, n: int, source) -> list[int]:
    """``indices`` as a list of ints in [0, n): a list, range, NumPy array or tensor of whole numbers. A
    boolean mask, a negative index (Python would count it from the end) or one past the end is refused."""
    if isinstance(indices, (str, bytes, dict)) or not hasattr(indices, "__iter__"):
        raise ArgumentTypeError(f"indices must be a sequence of sample indices (e.g. split['test']), got "
                                f"{type(indices).__name__}")
    if isinstance(indices, torch.Tensor):
        arr = indices.detach().cpu().numpy()
    else:
        arr = indices if isinstance(indices, np.ndarray) else np.asarray(list(indices))
    if arr.size == 0:
        return []
    if arr.ndim != 1:
        raise ParameterError(f"indices must be one-dimensional, got shape {arr.shape}")
    if arr.dtype.kind == "b":
        raise ParameterError("indices is a boolean mask; give the indices of the samples (np.flatnonzero(mask))")
    if arr.dtype.kind not in "iu":
        raise ArgumentTypeError(f"indices must be whole numbers, got {arr.dtype} ({arr[:3].tolist()} ...)")
    bad = arr[(arr < 0) | (arr >= n)]
    if bad.size:
        raise ParameterError(f"index {int(bad[0])} out of range: {source} has {n} samples (0 to {n - 1}); "
                             f"{bad.size} of the {arr.size} indices are outside")
    return [int(i) for i in arr]


def channel_stats(ds: ImageDataset) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the [0, 1] images of ``ds`` (for the normalisation)."""
    if len(ds) == 0:
        raise ParameterError(f"channel statistics of an empty data set ({ds.manifest.source}, no sample): "
                             "they need at least one image")
    total = sq = count = 0.0
    for i in range(len(ds)):
        x = ds.unit_item(i)[0].double()
        dims = tuple(range(1, x.ndim))
        total = total + x.sum(dims)
        sq = sq + (x * x).sum(dims)
        count += x[0].numel()
    mean = total / count
    std = (sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()
