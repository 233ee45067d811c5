"""``nemt data check``: read every entry of a data set and report what is wrong.

Nothing is skipped silently: each unreadable or inconsistent entry is listed
with its file and reason. Fatal problems (a file that cannot be used for
training) make the command exit non-zero; warnings (e.g. a box that reaches
outside the image, a class with very few images) do not.

The data set as a whole must suit one model, as ``nemt train`` needs: images
of another dimensionality than most (2D images and a 3D volume) are fatal, and
so is an image whose channels the loader would refuse (:func:`~nemt.data.
preprocess.check_volume_channels`, e.g. a 4D NIfTI of 3 volumes among 1-channel
images: the model takes the channels of its first training image, unless ``--channels`` says otherwise).
Warnings also name a multi-page TIFF (only page 1 is read) and 16-bit colour
read as 8-bit.

:func:`read_every_item` is the same promise for ``nemt train``: every image
of every split is read (header and pixels) and preprocessed before the first
epoch, so a bad validation or test image stops the run before any training.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from nemt.data.acquisition import describe, summarise
from nemt.data.dataset import ImageDataset, read_sample
from nemt.data.manifest import Manifest
from nemt.data.preprocess import check_volume_channels, convert_channels
from nemt.data.readers import Image, read_mask
from nemt.errors import DataError


@dataclass
class CheckReport:
    """What ``check_dataset`` found."""

    source: str
    task: str
    label_names: list[str]
    n_images: int = 0  #: images read without a fatal problem
    per_label: dict[str, int] = field(default_factory=dict)  #: of those, per label
    listed: int = 0  #: rows (images) the manifest lists, read or not
    listed_per_label: dict[str, int] = field(default_factory=dict)  #: of those, per label (as its warnings count)
    sizes: Counter = field(default_factory=Counter)
    channels: Counter = field(default_factory=Counter)
    modalities: Counter = field(default_factory=Counter)
    with_gt: int = 0
    masks: int = 0
    nonempty_masks: int = 0
    with_boxes: int = 0
    target_range: tuple[float, float] | None = None
    #: the usable images' :func:`~nemt.data.acquisition.summarise` (what a model's card would record)
    acquisition: dict = field(default_factory=dict)
    fatal: list[DataError] = field(default_factory=list)
    warnings: list[DataError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.fatal

    def to_dict(self) -> dict:
        return {
            "source": self.source, "task": self.task, "label_names": self.label_names,
            "images": self.n_images, "per_label": self.per_label,
            "listed": self.listed, "listed_per_label": self.listed_per_label,
            "sizes": {"x".join(map(str, k)): v for k, v in self.sizes.most_common()},
            "channels": dict(self.channels), "modalities": dict(self.modalities),
            "with_ground_truth": self.with_gt, "masks": self.masks,
            "nonempty_masks": self.nonempty_masks, "with_boxes": self.with_boxes,
            "target_range": self.target_range, "acquisition": self.acquisition,
            "fatal": [str(e) for e in self.fatal], "warnings": [str(e) for e in self.warnings],
        }


def check_dataset(manifest: Manifest, progress: Callable[[int], None] | None = None) -> CheckReport:
    """Read every image and mask of ``manifest``; count, measure and collect problems.

    ``progress`` is called with 1 after each sample (for a progress bar).
    """
    rep = CheckReport(source=str(manifest.source), task=manifest.task,
                      label_names=list(manifest.label_names))
    rep.fatal.extend(manifest.problems)
    rep.warnings.extend(manifest.warnings)
    rep.listed = len(manifest.samples)
    if manifest.task != "regression":
        rep.listed_per_label = _per_label(manifest, manifest.samples)
    readable, described = [], []
    shapes: list[tuple[str, tuple[int, ...], Image]] = []  # (image, shape, a pixel-less stand-in)
    for s in manifest.samples:
        if progress:
            progress(1)
        try:
            img = read_sample(manifest, s)
        except DataError as exc:
            rep.fatal.append(exc)
            continue
        a = img.array
        if not np.isfinite(a).all():
            rep.fatal.append(DataError(s.image, "pixels", "image has NaN or infinite values"))
            continue
        spatial = tuple(a.shape[1:])
        if s.mask is not None:
            try:
                m = read_mask(s.mask, like=img, max_pixels=manifest.max_pixels)
            except DataError as exc:
                rep.fatal.append(exc)
                continue
            rep.masks += 1
            rep.nonempty_masks += int(m.any())
        for box in s.boxes:
            x, y, w, h = box
            if len(spatial) != 2:
                rep.fatal.append(DataError(s.image, "x,y,w,h", "boxes are for 2D images"))
            elif x < 0 or y < 0 or x + w > spatial[-1] or y + h > spatial[-2]:
                rep.warnings.append(DataError(s.image, "x,y,w,h", f"box {box} reaches outside the "
                                              f"{spatial[-1]}x{spatial[-2]} image (row {s.row})"))
        rep.with_boxes += int(bool(s.boxes))
        rep.with_gt += int(s.has_gt)
        rep.n_images += 1
        readable.append(s)
        described.append(describe(img))
        rep.sizes[spatial] += 1
        rep.channels[a.shape[0]] += 1
        rep.modalities[img.modality] += 1
        # a stand-in of the image's channels, kind and header (no pixels) to try the channel counts on later
        stub = Image(np.zeros((a.shape[0],) + (1,) * (a.ndim - 1), np.float32), img.spacing, None, img.value_range,
                     img.modality, img.path, img.meta)
        shapes.append((str(s.image), tuple(a.shape), stub))
        pages = int(img.meta.get("frames", 1) or 1) if img.modality == "tiff" else 1
        if pages > 1:
            rep.warnings.append(DataError(s.image, "pages", f"a TIFF of {pages} pages: only page 1 is read"))
        if img.meta.get("stored_bits", 0) > img.meta.get("bits", 0):
            rep.warnings.append(DataError(s.image, "bits", f"{img.meta.get('note') or 'read with fewer bits'}: "
                                          "the low 8 bits are lost; save it as 16-bit grey (or as 8-bit colour) "
                                          "to train on what the file holds"))
    unfit = _whole_set(rep, manifest, shapes)  # readable, but not with the others
    if unfit:
        keep = [i for i, (image, _, _) in enumerate(shapes) if image not in unfit]
        readable, described = [readable[i] for i in keep], [described[i] for i in keep]
        rep.n_images = len(readable)
        rep.with_boxes = sum(bool(s.boxes) for s in readable)
        rep.with_gt = sum(int(s.has_gt) for s in readable)
    rep.acquisition = summarise(described)
    kinds = rep.acquisition["range_from"]
    if "own" in kinds and len(kinds) > 1:  # scale="range" maps the same tissue to other intensities in each group
        rep.warnings.append(DataError(manifest.source, "value range", f"{kinds['own']} of {len(described)} images "
                                      "are scaled by their own minimum and maximum, the others by a fixed range "
                                      f"({', '.join(f'{k} {v}' for k, v in kinds.items() if k != 'own')}): "
                                      "under --scale range the same intensity maps to other values in the two "
                                      "groups (give every image a window or sidecar range, or train with "
                                      "--scale minmax)"))
    if manifest.task == "regression":
        targets = [float(s.y) for s in readable]
        if targets:
            rep.target_range = (min(targets), max(targets))
        rep.per_label = {}
    else:
        rep.per_label = _per_label(manifest, readable)
    return rep


def _channel_refusal(img: Image, channels: int) -> str | None:
    """Why loading would refuse ``img`` for a model of ``channels`` channels (the rule of
    :meth:`Preprocessing.unit_scale <nemt.data.preprocess.Preprocessing.unit_scale>`), or None."""
    try:
        check_volume_channels(img, channels)
        convert_channels(np.zeros((img.array.shape[0],) + (1,) * (img.array.ndim - 1), np.float32), channels,
                         img.path)
    except DataError as exc:
        return exc.reason
    return None


def _whole_set(rep: CheckReport, manifest: Manifest,
               shapes: list[tuple[str, tuple[int, ...], Image]]) -> set[str]:
    """The problems of the readable images together: one dimensionality, channels every image can be loaded
    with. ``nemt train`` takes the dimensionality of its --size (else its first image) and gives the model its
    first training image's channels (without ``--channels``); which image is first depends on the split, so an
    image is fatal if loading refuses it for any count the data set can give. Returns the images made fatal."""
    unfit: set[str] = set()
    dims = Counter(len(shape) - 1 for _, shape, _ in shapes)
    common = dims.most_common(1)[0][0] if dims else None
    if len(dims) > 1:
        counts = ", ".join(f"{n} {d}D" for d, n in sorted(dims.items()))
        for path, shape, _ in shapes:
            if len(shape) - 1 != common:
                size = "x".join(map(str, shape[1:]))
                unfit.add(path)
                rep.fatal.append(DataError(path, "shape", f"a {len(shape) - 1}D image ({size}) among {common}D "
                                           f"ones ({counts}): a model takes one dimensionality"))
    possible = {shape[0] for _, shape, _ in shapes if len(shape) - 1 == common}
    refused = False
    for path, shape, stub in shapes:
        if len(shape) - 1 != common:
            continue
        reasons = [(k, why) for k in sorted(possible) if (why := _channel_refusal(stub, k))]
        if reasons:
            k, why = reasons[0]
            refused = True
            unfit.add(path)
            rep.fatal.append(DataError(path, "channels", f"{why} (a model trained on this data set takes "
                                       f"{' or '.join(map(str, sorted(possible)))} channels: those of its first "
                                       "training image, or --channels)"))
    if len(rep.channels) > 1 and not refused:
        rep.warnings.append(DataError(manifest.source, "channels",
                                      f"mixed channel counts {dict(rep.channels)}; images are "
                                      "converted to the model's channels when loaded"))
    return unfit


def _per_label(manifest: Manifest, samples) -> dict[str, int]:
    """Images per label (multi-label: the images carrying each label), every label named."""
    counts: Counter = Counter()
    for s in samples:
        if manifest.task == "multiclass":
            counts[manifest.label_names[s.y]] += 1
        else:
            for name, v in zip(manifest.label_names, s.y):
                counts[name] += int(v > 0)
    return {name: counts.get(name, 0) for name in manifest.label_names}


def read_every_item(datasets: Mapping[str, ImageDataset], progress: Callable[[int], None] | None = None) -> int:
    """Read, preprocess and cache every item of every split (image, mask, boxes); return the count.

    Every failure is collected first; then one :class:`DataError` lists them
    all by split, file and reason, so a truncated test image stops training
    before the first epoch instead of after the last.
    """
    failures: list[str] = []
    source = None
    n = 0
    for split, ds in datasets.items():
        source = source or ds.manifest.source
        for i in range(len(ds)):
            if progress:
                progress(1)
            try:
                ds.unit_item(i)
                n += 1
            except DataError as exc:
                failures.append(f"{split}: {exc}")
    if failures:
        shown = failures[:20] + ([f"... and {len(failures) - 20} more"] if len(failures) > 20 else [])
        raise DataError(source, None, f"{len(failures)} of {n + len(failures)} images cannot be used, so "
                        f"nothing was trained (run `nemt data check {source}` for the full report):\n  "
                        + "\n  ".join(shown))
    return n
