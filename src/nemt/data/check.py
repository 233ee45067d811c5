"""``nemt data check``: read every entry of a data set and report what is wrong.

Nothing is skipped silently: each unreadable or inconsistent entry is listed
with its file and reason. Fatal problems (a file that cannot be used for
training) make the command exit non-zero; warnings (e.g. a box that reaches
outside the image, a class with very few images) do not.

:func:`read_every_item` is the same promise for ``nemt train``: every image
of every split is read (header and pixels) and preprocessed before the first
epoch, so a bad validation or test image stops the run before any training.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from nemt.data.dataset import ImageDataset, read_sample
from nemt.data.manifest import Manifest
from nemt.data.readers import read_mask
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
            "target_range": self.target_range,
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
    targets = []
    rep.listed = len(manifest.samples)
    if manifest.task != "regression":
        rep.listed_per_label = _per_label(manifest, manifest.samples)
    readable = []
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
        rep.sizes[spatial] += 1
        rep.channels[a.shape[0]] += 1
        rep.modalities[img.modality] += 1
        if manifest.task == "regression":
            targets.append(float(s.y))
    if manifest.task == "regression":
        if targets:
            rep.target_range = (min(targets), max(targets))
        rep.per_label = {}
    else:
        rep.per_label = _per_label(manifest, readable)
    if len(rep.channels) > 1:
        rep.warnings.append(DataError(manifest.source, "channels",
                                      f"mixed channel counts {dict(rep.channels)}; images are "
                                      "converted to the model's channels when loaded"))
    return rep


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
