"""Data sets as lists of samples: CSV manifests, class-per-folder trees, MedMNIST.

Every loader returns a :class:`Manifest`: the samples, the task, the label
names, and the problems found while parsing. Parsing never drops a row
silently: a row with a problem is kept out of ``samples`` and recorded in
``problems`` (file, field, reason), and :meth:`Manifest.raise_problems` turns
them into one error for the commands that cannot go on (training).

CSV rules
---------
- one image column (``image``, ``path``, ``file`` or ``filename``; or named): a file, or a folder holding one
  DICOM series (a file per slice, read as a volume);
- the target: one label column (multi-class; ``label``, ``class``,
  ``diagnosis``), several 0/1 columns (multi-label), or one numeric column
  (regression; ``target``, ``severity``, ``score``);
- optional ground truth: a mask-image column (``mask``) or box columns
  ``x, y, w, h`` in pixels of the original image; several rows per image add
  several boxes (their labels must agree);
- optional group column (``group``, ``patient``, ``patient_id``, ``subject``)
  so that splits never put one patient in two splits;
- optional ``split`` column (train/val/test) that fixes the split.
Paths are relative to the CSV's folder. Rows name the same image when their
paths are equal once resolved (``./a.png``, ``x//a.png`` and ``x/../a.png``
are ``a.png`` and ``x/a.png``, and a symbolic link is its target; see
:func:`_image_key`).

Several rows of one image may only add boxes: a later row whose label, mask,
group or split differs from the first row's is a problem (file, field,
reason), and the image is left out (an empty mask, group or split cell in a
later row just does not repeat the first row's).

Labels (multi-class): without ``labels`` the label set is the distinct
values of the label column, except values that look like a missing entry
(``nan``, ``NaN``, ``inf``, ``None``, ``NA``, ``?``, ...), which are
problems: a spreadsheet's empty cell must not become a class. ``labels``
fixes the set (it may name such a value on purpose). A class with fewer than
:data:`MIN_CLASS_IMAGES` images, often a typo, is a warning that names it
(``Manifest.warnings``); so is a class of ``labels`` with no image, and so
are labels that differ only in case or surrounding whitespace (``normal`` and
``Normal``: two classes, not merged). A
class-per-folder tree with an empty class folder is a problem.
"""
from __future__ import annotations

import csv
import hashlib
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from nemt.errors import DataError
from nemt.files import label_name_problem

TASKS = ("multiclass", "multilabel", "regression")
SPLITS = ("train", "val", "test")

_IMAGE_COLS = ("image", "path", "file", "filename", "image_path")
_LABEL_COLS = ("label", "class", "diagnosis", "category")
_TARGET_COLS = ("target", "severity", "score", "value")
_MASK_COLS = ("mask", "mask_path", "segmentation")
_GROUP_COLS = ("group", "patient", "patient_id", "subject", "subject_id")
_BOX_COLS = ("x", "y", "w", "h")
MIN_CLASS_IMAGES = 5
"""A class with fewer images is named in a warning (too few to learn or evaluate; often a typo)."""
# Values a spreadsheet or pandas writes for a missing entry; never a class unless --labels names them.
_MISSING_LIKE = frozenset({"nan", "null", "nil", "na", "n/a", "#n/a", "<na>", "nat", "?"})


@dataclass
class Sample:
    """One image and what is known about it.

    ``y`` is the class index (multi-class), a tuple of 0/1 floats
    (multi-label) or a float (regression). ``boxes`` are ``(x, y, w, h)`` in
    pixels of the original image. ``index`` points into ``Manifest.arrays``
    for in-memory data sets (MedMNIST); ``row`` is the 1-based CSV line of the
    first row that named the image (for messages).
    """

    image: Path
    y: int | float | tuple[float, ...]
    mask: Path | None = None
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    group: str = ""
    split: str | None = None
    index: int | None = None
    row: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.image, (str, os.PathLike)):
            self.image = Path(self.image)
        else:
            raise DataError(None, "image", f"a sample's image must be a path (str or Path), got {self.image!r}")
        if isinstance(self.mask, (str, os.PathLike)):
            self.mask = Path(self.mask)
        elif self.mask is not None:
            raise DataError(self.image, "mask", f"must be a path or None, got {self.mask!r}")

    @property
    def name(self) -> str:
        return self.image.name if self.index is None else f"{self.image.name}[{self.index}]"

    @property
    def has_gt(self) -> bool:
        return self.mask is not None or bool(self.boxes)


@dataclass
class Manifest:
    """A parsed data set. ``arrays`` holds in-memory images ``(N, C, *spatial)``.

    ``problems`` are fatal (training refuses them), ``warnings`` are not.
    ``max_pixels`` is the largest image its files may declare (see
    :func:`nemt.data.readers.read_image`; None: the readers' default).
    """

    samples: list[Sample]
    task: str
    label_names: list[str]
    source: Path
    problems: list[DataError] = field(default_factory=list)
    arrays: np.ndarray | None = None
    kind: str = "csv"
    warnings: list[DataError] = field(default_factory=list)
    max_pixels: int | None = None
    headline: str | None = None  #: one line that sums up many problems, shown first by raise_problems

    def __post_init__(self) -> None:
        """A manifest built in Python is held to the loaders' rules: a known task, a list of label names, and
        each sample's ``y`` of the task's form (a class index within the label set, one 0/1 value per label,
        a finite number), so that a bad one fails here, naming the sample, rather than deep in training."""
        self.source = Path(self.source)
        if self.task not in TASKS:
            raise DataError(self.source, "task", f"unknown task {self.task!r}; choose one of {TASKS}")
        if isinstance(self.label_names, (str, bytes)) or not all(isinstance(n, str) for n in self.label_names):
            raise DataError(self.source, "label_names", f"need a list of names (str), got {self.label_names!r}")
        self.label_names = [str(n) for n in self.label_names]
        if not all(isinstance(s, Sample) for s in self.samples):
            bad = next(s for s in self.samples if not isinstance(s, Sample))
            raise DataError(self.source, "samples", f"need a list of Sample, got a {type(bad).__name__}")
        for s in self.samples:
            why = _y_problem(s.y, self.task, len(self.label_names))
            if why:
                where = f"row {s.row}: " if s.row is not None else ""
                raise DataError(s.image if s.index is None else f"{s.image}[{s.index}]", "y",
                                f"{where}{why} (task {self.task}, labels {self.label_names})")

    @property
    def n_outputs(self) -> int:
        return 1 if self.task == "regression" else len(self.label_names)

    @property
    def root(self) -> Path:
        """The folder the data set's relative paths start from: the manifest file's folder, or the tree itself."""
        return self.source.parent if self.source.is_file() else self.source

    def relative_name(self, sample: Sample) -> str:
        """``sample``'s image as a path relative to :attr:`root` (``benign/img1.png``: two files of one name in
        two folders stay apart), the full path for an image outside it, ``name[index]`` for an in-memory one."""
        try:
            rel = sample.image.relative_to(self.root).as_posix()
        except ValueError:
            rel = str(sample.image)
        return rel if sample.index is None else f"{rel}[{sample.index}]"

    def fingerprint(self) -> str:
        """SHA-256 of the data set's definition (the manifest's bytes, or the npz/folder listing)."""
        h = hashlib.sha256()
        if self.source.is_file():
            h.update(self.source.read_bytes())
        else:
            for s in self.samples:
                h.update(f"{s.image.relative_to(self.source)}\t{s.y}\n".encode())
        return h.hexdigest()

    def raise_problems(self) -> None:
        """Raise one DataError listing every problem (the first 20 by name)."""
        if not self.problems:
            return
        lines = ([f"{self.source}: {self.headline}"] if self.headline else []) + [str(p) for p in self.problems[:20]]
        more = len(self.problems) - 20
        if more > 0:
            lines.append(f"... and {more} more")
        raise DataError(self.source, None, f"{len(self.problems)} bad entries "
                        f"(run `nemt data check {self.source}` for the full list):\n  " + "\n  ".join(lines))

    def labels_array(self) -> np.ndarray:
        """Targets of all samples: (N,) int64, (N, L) float32 or (N,) float32."""
        ys = [s.y for s in self.samples]
        if self.task == "multiclass":
            return np.asarray(ys, dtype=np.int64)
        return np.asarray(ys, dtype=np.float32)


def _y_problem(y, task: str, n_labels: int) -> str | None:
    """Why ``y`` is not a target of ``task`` with ``n_labels`` labels, or None."""
    def real(v) -> bool:
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) \
            and math.isfinite(v)

    if task == "multiclass":
        if not isinstance(y, (int, np.integer)) or isinstance(y, (bool, np.bool_)):
            return f"a multi-class target is a class index (int), got {y!r}"
        if not 0 <= y < n_labels:
            return f"class index {y} out of range for {n_labels} labels"
    elif task == "multilabel":
        if not isinstance(y, (tuple, list)) or len(y) != n_labels or not all(real(v) and v in (0, 1) for v in y):
            return f"a multi-label target is one 0/1 value per label ({n_labels}), got {y!r}"
    elif not real(y):
        return f"a regression target is a finite number, got {y!r}"
    return None


def _pick(columns: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str,
          source: Path, required: bool) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(source, wanted, f"{what} column not found; columns are {list(columns)}")
        return wanted
    lower = {c.lower(): c for c in columns}
    for cand in candidates:
        if cand in lower:
            return lower[cand]
    if required:
        raise DataError(source, what, f"no {what} column (tried {', '.join(candidates)}); "
                        f"columns are {list(columns)}")
    return None


def _is_binary(values: list[str]) -> bool:
    return bool(values) and all(v.strip() in ("0", "1", "0.0", "1.0") for v in values)


def missing_like(value: str) -> bool:
    """Whether a label looks like a missing entry: empty, NaN or infinite as a number, or NA-like text."""
    v = value.strip()
    if not v or v.lower() in _MISSING_LIKE:
        return True
    try:
        return not math.isfinite(float(v))
    except ValueError:
        return False


def _case_variant_warnings(source: Path, counts: Counter, label_names: list[str]) -> list[DataError]:
    """One warning per group of labels that are equal but for case or surrounding whitespace
    (``normal`` and ``Normal``): they are distinct classes, which is seldom meant. They are not merged:
    the warning names each spelling with its image count (``counts``: class index -> images)."""
    groups: dict[str, list[int]] = {}
    for k, name in enumerate(label_names):
        groups.setdefault(name.strip().casefold(), []).append(k)
    out = []
    for ks in groups.values():
        if len(ks) > 1:
            listed = ", ".join(f"{label_names[k]!r} ({counts.get(k, 0)} image{'s' * (counts.get(k, 0) != 1)})"
                               for k in ks)
            out.append(DataError(source, "label", f"labels {listed} differ only in case or surrounding "
                                 f"whitespace, so they are {len(ks)} different classes; if they are one class, "
                                 "write it one way in every row"))
    return out


def _class_warnings(source: Path, samples: list[Sample], label_names: list[str],
                    from_labels: bool) -> list[DataError]:
    """Warnings for multi-class labels that differ only in case or surrounding whitespace (see
    :func:`_case_variant_warnings`), and for classes with fewer than MIN_CLASS_IMAGES images (none: only when
    the set was given, since a set taken from the data has no empty class)."""
    counts = Counter(int(s.y) for s in samples)
    out = _case_variant_warnings(source, counts, label_names)
    for k, name in enumerate(label_names):
        n = counts.get(k, 0)
        if n == 0 and from_labels:
            out.append(DataError(source, "label", f"class {name!r} of the label set has no image; "
                                 "the model would have an output it never sees"))
        elif 0 < n < MIN_CLASS_IMAGES:
            first = next(s for s in samples if int(s.y) == k)
            where = f"row {first.row}" if first.row is not None else first.name
            out.append(DataError(source, "label", f"class {name!r} has only {n} image{'s' * (n > 1)} "
                                 f"(first: {where}), fewer than {MIN_CLASS_IMAGES}; a typo? "
                                 "fix the rows, or fix the label set with --labels"))
    return out


def read_csv_table(path: Path, what: str, empty: str) -> tuple[list[str], list[dict[str, str]]]:
    """A CSV file's header (names stripped; a UTF-8 byte-order mark is dropped) and rows as dicts.

    Errors name the file: ``"{what} not found"``, not a readable CSV, or ``"{empty} (no header)"``.
    """
    if not path.is_file():
        raise DataError(path, None, f"{what} not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(path, None, f"not a readable CSV file ({exc})") from exc
    if not header:
        raise DataError(path, None, f"{empty} (no header)")
    return header, rows


def load_manifest(path: str | Path, *, task: str | None = None, image_col: str | None = None,
                  label_col: str | None = None, label_cols: Sequence[str] | None = None,
                  target_col: str | None = None, mask_col: str | None = None,
                  group_col: str | None = None, labels: Sequence[str] | None = None) -> Manifest:
    """Parse a CSV manifest (see the module docstring for its rules).

    ``labels`` fixes the label set (and its order) of a multi-class data set;
    rows with another label are problems. Without it the set is the sorted
    distinct labels.
    """
    path = Path(path)
    _check_name_lists(path, labels=labels, label_cols=label_cols)
    columns, rows = read_csv_table(path, "manifest", "empty manifest")
    root = path.parent

    img_c = _pick(columns, image_col, _IMAGE_COLS, "image", path, required=True)
    mask_c = _pick(columns, mask_col, _MASK_COLS, "mask", path, required=False)
    group_c = _pick(columns, group_col, _GROUP_COLS, "group", path, required=False)
    split_c = "split" if "split" in columns else None
    box_c = [c for c in _BOX_COLS if c in columns]
    if box_c and len(box_c) != 4:
        raise DataError(path, ",".join(box_c), "box columns need all of x, y, w, h")

    used = {img_c, mask_c, group_c, split_c, *box_c}
    if task is not None and task not in TASKS:
        raise DataError(path, "task", f"unknown task {task!r}; choose one of {TASKS}")
    if label_cols:
        task = task or "multilabel"
    if task is None:
        if label_col or _pick(columns, None, _LABEL_COLS, "label", path, False):
            task = "multiclass"
        elif target_col or _pick(columns, None, _TARGET_COLS, "target", path, False):
            task = "regression"
        else:
            rest = [c for c in columns if c not in used]
            if rest and all(_is_binary([r[c] for r in rows]) for c in rest):
                task = "multilabel"
            else:
                raise DataError(path, None, "cannot tell the task: no label column, no target column, "
                                "and the other columns are not all 0/1; name them with "
                                "--label-col / --label-cols / --target-col")

    if task == "multiclass":
        lab_c = _pick(columns, label_col, _LABEL_COLS, "label", path, required=True)
        ycols = [lab_c]
    elif task == "regression":
        ycols = [_pick(columns, target_col, _TARGET_COLS, "target", path, required=True)]
    else:
        ycols = list(label_cols) if label_cols else [c for c in columns if c not in used]
        missing = [c for c in ycols if c not in columns]
        if missing or not ycols:
            raise DataError(path, ",".join(missing) or None, "multi-label columns not found")

    if task == "multiclass":
        if labels is not None:
            label_names = list(labels)
        else:
            label_names = sorted({v for r in rows if not missing_like(v := (r[ycols[0]] or "").strip())})
    elif task == "multilabel":
        label_names = ycols
    else:
        label_names = [ycols[0]]

    problems: list[DataError] = []
    if not rows:
        problems.append(DataError(path, None, "no rows: the manifest lists no image (only its header)"))
    for name in dict.fromkeys(label_names):  # a label is an output's name: in cards, reports and file names
        why = label_name_problem(name)
        if why:
            problems.append(DataError(path, ",".join(ycols) if task == "multilabel" else "label",
                                      f"label {why}"))
    if len(set(label_names)) < len(label_names):
        problems.append(DataError(path, "labels", f"a label given twice in {label_names}"))
    # Keyed on the resolved path (see _image_key), so that ./a.png, a//b/../a.png, a link to a.png and a.png
    # are one image.
    by_image: dict[str, Sample] = {}
    first_values: dict[str, dict[str, str]] = {}  # the first row's mask, group and split, as written
    first_spelling: dict[str, str] = {}  # the image path as the first row wrote it
    order: list[str] = []
    bad_images: set[str] = set()
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"row {i}"
        rel = (row.get(img_c) or "").strip()
        if not rel:
            problems.append(DataError(path, img_c, f"{where}: empty image path"))
            continue
        img_path = root / rel
        key = _image_key(root, rel)
        y, err = _parse_y(row, task, ycols, label_names, fixed_set=labels is not None)
        if err:
            problems.append(DataError(img_path, err[0], f"{where}: {err[1]}"))
            bad_images.add(key)
            continue
        box = None
        if box_c and any((row.get(c) or "").strip() for c in box_c):
            try:
                box = tuple(float(row[c]) for c in box_c)
                if not all(math.isfinite(v) for v in box) or box[2] <= 0 or box[3] <= 0:
                    raise ValueError
            except (TypeError, ValueError):
                problems.append(DataError(img_path, "x,y,w,h", f"{where}: box must be 4 finite numbers "
                                          f"with w, h > 0, got {[row.get(c) for c in box_c]}"))
                bad_images.add(key)
                continue
        mask_rel = (row.get(mask_c) or "").strip() if mask_c else ""
        group = (row.get(group_c) or "").strip() if group_c else ""
        split = (row.get(split_c) or "").strip().lower() if split_c else ""
        if split and split not in SPLITS:
            problems.append(DataError(img_path, "split", f"{where}: split {split!r} is not one of {SPLITS}"))
            bad_images.add(key)
            continue
        values = {"mask": os.path.normpath(mask_rel) if mask_rel else "", "group": group, "split": split}
        if key in by_image:  # another row of the same image: it may add a box, nothing else
            s = by_image[key]
            # the same file written another way (./a.png, a//b/../a.png): say so, or the message would puzzle
            same = "" if rel == first_spelling[key] else f", which names the same image as {first_spelling[key]!r}"
            if s.y != y:
                problems.append(DataError(img_path, ",".join(ycols),
                                          f"{where}: label {_fmt_y(y, task, label_names)} disagrees with "
                                          f"row {s.row} ({_fmt_y(s.y, task, label_names)}){same}"))
                bad_images.add(key)
            columns_of = {"mask": mask_c, "group": group_c, "split": split_c}
            for what, value in values.items():
                first = first_values[key][what]
                if value and value != first:  # an empty cell only does not repeat the first row's value
                    problems.append(DataError(img_path, columns_of[what], f"{where}: {what} {value!r} disagrees "
                                              f"with row {s.row} ({repr(first) if first else 'none'}){same}; the "
                                              "rows of one image may only add boxes"))
                    bad_images.add(key)
            if box:
                s.boxes.append(box)
            continue
        if not (img_path.is_file() or img_path.is_dir()):  # a folder: one DICOM series
            problems.append(DataError(img_path, img_c, f"{where}: image file not found"))
            bad_images.add(key)
            continue
        mask_path = None
        if mask_rel:
            mask_path = root / mask_rel
            if not mask_path.is_file():
                problems.append(DataError(mask_path, mask_c, f"{where}: mask file not found"))
                bad_images.add(key)
                continue
        by_image[key] = Sample(image=img_path, y=y, mask=mask_path, boxes=[box] if box else [],
                               group=group or rel, split=split or None, row=i)
        first_values[key] = values
        first_spelling[key] = rel
        order.append(key)
    samples = [by_image[r] for r in order if r not in bad_images]
    if split_c and samples and any(s.split is None for s in samples):
        problems.append(DataError(path, "split", "some rows have a split and others none"))
    headline = None
    if task == "multiclass" and labels is not None:  # one line first for what may be a whole other label set
        outside = Counter(v for r in rows if (v := (r.get(ycols[0]) or "").strip())
                          and v not in label_names and not missing_like(v))
        if outside:
            seen = ", ".join(f"{v!r} ({c} rows)" for v, c in outside.most_common(5))
            more = f" and {len(outside) - 5} more" if len(outside) > 5 else ""
            headline = (f"{sum(outside.values())} rows have labels outside the label set {label_names} (a "
                        f"model's, if these are not its data): {seen}{more}")
    warnings = _class_warnings(path, samples, label_names, labels is not None) if task == "multiclass" else []
    return Manifest(samples=samples, task=task, label_names=label_names, source=path,
                    problems=problems, kind="csv", warnings=warnings, headline=headline)


def _image_key(root: Path, rel: str) -> str:
    """The identity of a manifest's image path: ``rel`` joined to the manifest's folder and resolved
    (``./``, ``//``, ``a/../`` and symbolic links, as :func:`os.path.realpath` does), so that two spellings
    of one file, or a link to it, are one image."""
    return os.path.realpath(os.path.join(str(root), rel))


def _fmt_y(y, task: str, label_names: list[str]) -> str:
    """A target for messages: a multi-class label by its name, others as written."""
    if task == "multiclass" and isinstance(y, int) and 0 <= y < len(label_names):
        return repr(label_names[y])
    return repr(y)


def _parse_y(row: dict, task: str, ycols: list[str], label_names: list[str], fixed_set: bool = False):
    """Return (y, None) or (None, (field, reason)).

    ``fixed_set``: the label set was given (``--labels``), so a missing-looking
    value it names is a class on purpose.
    """
    if task == "multiclass":
        v = (row.get(ycols[0]) or "").strip()
        if not v:
            return None, (ycols[0], "empty label")
        if missing_like(v) and not (fixed_set and v in label_names):
            return None, (ycols[0], f"label {v!r} looks like a missing value (empty, NaN, infinite or NA), "
                                    "not a class; fix the row, or name the label set with --labels")
        if v not in label_names:
            return None, (ycols[0], f"label {v!r} not in the label set {label_names}")
        return label_names.index(v), None
    if task == "multilabel":
        out = []
        for c in ycols:
            v = (row.get(c) or "").strip()
            if v not in ("0", "1", "0.0", "1.0"):
                return None, (c, f"multi-label value must be 0 or 1, got {v!r}")
            out.append(float(v))
        return tuple(out), None
    v = (row.get(ycols[0]) or "").strip()
    try:
        f = float(v)
    except ValueError:
        return None, (ycols[0], f"target {v!r} is not a number")
    if not math.isfinite(f):
        return None, (ycols[0], f"target is {v} (NaN or infinite)")
    return f, None


def _check_name_lists(path, **lists) -> None:
    """``labels`` / ``label_cols`` must be lists of names: a string would be taken letter by letter."""
    for key, value in lists.items():
        if value is None:
            continue
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") or not all(
                isinstance(v, str) for v in value):
            raise DataError(path, key, f"need a list of names, e.g. ['benign', 'malignant'], got {value!r}"
                            + (f" (for comma-separated text: {value!r}.split(','))" if isinstance(value, str) else ""))


def load_folder(root: str | Path, labels: Sequence[str] | None = None) -> Manifest:
    """A class-per-folder tree: ``root/<label>/<image>``; multi-class."""
    from nemt.data.readers import is_image_file

    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(root, None, "no class folders found (expected root/<label>/<image files>)")
    label_names = list(labels) if labels is not None else classes
    samples, problems = [], []
    for cls in classes:
        files = sorted(p for p in (root / cls).rglob("*") if p.is_file() and not p.name.startswith("."))
        if labels is None and not any(is_image_file(f) for f in files):
            problems.append(DataError(root / cls, "label", f"class folder {cls!r} holds no image, so its output "
                                      "would never see an example; add images, remove the folder, or name "
                                      "the classes with --labels"))
        for f in files:
            if not is_image_file(f):
                problems.append(DataError(f, None, "not an image file of a supported format"))
            elif cls not in label_names:
                problems.append(DataError(f, "label", f"folder {cls!r} is not in the label set {label_names}"))
            else:
                samples.append(Sample(image=f, y=label_names.index(cls), group=str(f.relative_to(root))))
    warnings = _class_warnings(root, samples, label_names, labels is not None)
    return Manifest(samples=samples, task="multiclass", label_names=label_names, source=root,
                    problems=problems, kind="folder", warnings=warnings)


def load_medmnist_npz(path: str | Path, *, task: str | None = None,
                      labels: Sequence[str] | None = None, max_pixels: int | None = None) -> Manifest:
    """A MedMNIST ``.npz`` with its own train/val/test splits.

    Labels of shape (N, 1) are multi-class (``task`` may say ``regression`` for
    the ordinal grades of RetinaMNIST); (N, L>1) are multi-label.
    """
    from nemt.data.readers import read_medmnist

    path = Path(path)
    parts = read_medmnist(path, max_pixels=max_pixels)
    arrays, samples = [], []
    offset = 0
    for split in SPLITS:
        if split not in parts:
            continue
        imgs, labs = parts[split]
        arrays.append(imgs)
        for j in range(len(imgs)):
            lab = labs[j]
            if lab.shape[0] == 1 and task != "multilabel":
                y: int | float | tuple = float(lab[0]) if task == "regression" else int(lab[0])
            else:
                y = tuple(float(v) for v in lab)
            samples.append(Sample(image=path, y=y, index=offset + j, split=split,
                                  group=f"{split}-{j}"))
        offset += len(imgs)
    if not samples:
        raise DataError(path, None, "no train/val/test images in the file")
    data = np.concatenate(arrays)
    first = samples[0].y
    if task is None:
        task = "multilabel" if isinstance(first, tuple) else "multiclass"
    if task == "multiclass":
        n = max(int(s.y) for s in samples) + 1
        label_names = list(labels) if labels is not None else [str(i) for i in range(n)]
    elif task == "multilabel":
        label_names = list(labels) if labels is not None else [f"label{i}" for i in range(len(first))]
    else:
        label_names = list(labels) if labels is not None else ["target"]
    return Manifest(samples=samples, task=task, label_names=label_names, source=path,
                    arrays=data, kind="medmnist", max_pixels=max_pixels)


#: the keyword options of :func:`open_dataset` besides ``max_pixels`` (those of :func:`load_manifest`)
_OPEN_OPTIONS = ("task", "labels", "image_col", "label_col", "label_cols", "target_col", "mask_col", "group_col")


def open_dataset(path: str | Path, *, max_pixels: int | None = None, **options) -> Manifest:
    """One entry point: a CSV file, a folder with ``manifest.csv``, a MedMNIST ``.npz``,
    or a class-per-folder tree.

    ``max_pixels`` is kept in the manifest and bounds every image read from it
    (None: :data:`nemt.data.readers.DEFAULT_MAX_PIXELS`).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise DataError(None, "path", f"need a path (str or Path) to a data set, got {type(path).__name__}")
    path = Path(path)
    unknown = sorted(set(options) - set(_OPEN_OPTIONS))
    if unknown:
        raise DataError(path, ",".join(unknown), f"unknown option{'s' * (len(unknown) > 1)}; open_dataset takes "
                        f"max_pixels and {', '.join(_OPEN_OPTIONS)}")
    _check_name_lists(path, labels=options.get("labels"), label_cols=options.get("label_cols"))
    if max_pixels is not None and (not isinstance(max_pixels, (int, np.integer)) or isinstance(max_pixels, bool)
                                   or max_pixels < 1):
        raise DataError(path, "max_pixels", f"need a whole number >= 1 (or None: the default), got {max_pixels!r}")
    if not path.exists():
        raise DataError(path, None, "no such file or folder")
    if path.is_file():
        if path.suffix.lower() == ".csv":
            m = load_manifest(path, **options)
        elif path.suffix.lower() == ".npz":
            columns = sorted(k for k, v in options.items() if v is not None and k not in ("labels", "task"))
            if columns:
                raise DataError(path, ",".join(columns), "column options apply to CSV manifests only")
            return load_medmnist_npz(path, task=options.get("task"), labels=options.get("labels"),
                                     max_pixels=max_pixels)
        else:
            raise DataError(path, None, "expected a .csv manifest, a .npz MedMNIST file or a folder")
    elif (path / "manifest.csv").is_file():
        m = load_manifest(path / "manifest.csv", **options)
    else:
        unknown = {k for k, v in options.items() if v is not None} - {"labels", "task"}
        if unknown:
            raise DataError(path, ",".join(sorted(unknown)), "column options apply to CSV manifests only")
        if options.get("task") not in (None, "multiclass"):
            raise DataError(path, "task", "a class-per-folder tree is multi-class")
        m = load_folder(path, labels=options.get("labels"))
    m.max_pixels = max_pixels
    return m
