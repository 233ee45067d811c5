"""How an image was acquired, as far as its file says: what a model card records of its training images and what
``nemt explain`` and the service compare a new input with.

Every input is resized to the model's input size, so what the network sees of the world is the **extent** of
an image per axis, spacing x samples (a field of view in the file's units, usually mm; a signal's duration in
seconds, samples / fs): the same anatomy photographed at a larger field of view looks smaller to the model.
The pixel spacing alone does not matter (a finer grid of the same field of view is resized to the same
input). The **value range** matters under ``scale="range"``: an image scaled by its own minimum and maximum
(DICOM without a window, NIfTI, ``.npy`` without a sidecar range) maps the same tissue to other intensities
than one scaled by a fixed range (8/16-bit PNG, a DICOM window or VOI LUT, a sidecar range).

:func:`describe` reads both from one :class:`~nemt.data.readers.Image`; :func:`summarise` turns the training
split's descriptions into the card's ``data.acquisition``; :func:`differences` words what makes an input
unlike them (a list of notes, empty when nothing does). A tolerance of 10 % around the training images'
range of extents is allowed (:data:`EXTENT_TOLERANCE`): the size of a random zoom augmentation, and well
above the rounding of spacings stored in DICOM and NIfTI headers (below 0.1 %).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

import numpy as np

from nemt.data.readers import Image

EXTENT_TOLERANCE = 0.10
#: Image.meta["range_from"]: what fixed an image's value range ("own": its own min..max)
_RANGE_WORDS = {"type": "its sample type's full range", "window": "its DICOM window", "lut": "its DICOM VOI LUT",
                "sidecar": "its sidecar's range", "own": "its own minimum and maximum"}


def _round(v: float) -> float:
    return float(f"{v:.6g}")


def describe(img: Image) -> dict:
    """What ``img``'s file says of its acquisition: ``range_from`` (see the module docstring), ``extent``
    (spacing x samples per spatial axis; None where the file gives no spacing: PNG, JPEG, ..., an array
    without a sidecar ``spacing`` or ``fs``) and ``fs`` (a signal's sampling rate, or None)."""
    meta = img.meta or {}
    shape = img.array.shape[1:]
    known = meta.get("spacing_from") is not None
    return {"range_from": str(meta.get("range_from", "own")),
            "extent": [_round(float(s) * int(n)) for s, n in zip(img.spacing, shape)] if known else None,
            "fs": float(meta["fs"]) if meta.get("fs") is not None else None,
            "value_range": [float(v) for v in img.value_range],
            "axcodes": list(meta["axcodes"]) if meta.get("axcodes") else None}  # a NIfTI's orientation


def _stats(rows: list[list[float]]) -> dict:
    a = np.asarray(rows, dtype=np.float64)
    return {"n": int(a.shape[0]), "min": [_round(v) for v in a.min(0)], "median": [_round(v) for v in np.median(a, 0)],
            "max": [_round(v) for v in a.max(0)]}


def summarise(descriptions: Sequence[dict]) -> dict:
    """The card's ``data.acquisition`` from the training images' :func:`describe`: ``n`` images, how many had
    each kind of value range (``range_from``), and ``extent`` / ``fs`` statistics (``n``, per-axis ``min``,
    ``median``, ``max``) over the images whose file gives them (absent where none does)."""
    out: dict[str, Any] = {"n": len(descriptions),
                           "range_from": dict(sorted(Counter(d["range_from"] for d in descriptions).items()))}
    extents = [d["extent"] for d in descriptions if d.get("extent") is not None]
    if extents and len({len(e) for e in extents}) == 1:
        out["extent"] = _stats(extents)
    rates = [[d["fs"]] for d in descriptions if d.get("fs") is not None]
    if rates:
        out["fs"] = _stats(rates)
    return out


def _span(lo: float, hi: float) -> str:
    return f"{lo:g}" if math.isclose(lo, hi, rel_tol=1e-6) else f"{lo:g}-{hi:g}"


def _outside(v: float, lo: float, hi: float) -> bool:
    return v < lo * (1 - EXTENT_TOLERANCE) or v > hi * (1 + EXTENT_TOLERANCE)


def differences(summary: dict | None, img: Image | dict, *, scale: str = "range") -> list[str]:
    """Notes on what makes ``img`` (an image, or its :func:`describe`) unlike the training images that
    ``summary`` (a card's ``data.acquisition``) describes; empty when nothing does, or when ``summary`` is
    empty (a card written before cards recorded their training images' acquisition, or a model from
    :meth:`Classifier.from_module`). ``scale``: the model's preprocessing scale (the value range matters only
    for ``"range"``)."""
    if not summary:
        return []
    notes = []
    mine = describe(img) if isinstance(img, Image) else img
    kinds = summary.get("range_from") or {}
    n = int(summary.get("n", 0))
    if scale == "range" and kinds:
        own_in, own_train = mine["range_from"] == "own", int(kinds.get("own", 0))
        trained = ", ".join(f"{_RANGE_WORDS.get(k, k)} {v} of {n}" for k, v in kinds.items())
        if own_in and own_train == 0:
            notes.append(f"its value range is {_RANGE_WORDS['own']}, while every training image's was fixed "
                         f"({trained}): the same tissue may map to other intensities than in training")
        elif not own_in and own_train == n:
            lo, hi = mine.get("value_range") or (math.nan, math.nan)
            notes.append(f"its value range is fixed by {_RANGE_WORDS.get(mine['range_from'], mine['range_from'])} "
                         f"({lo:g}..{hi:g}), while every training image was "
                         "scaled by its own minimum and maximum: intensities may differ from training's")
    ext = summary.get("extent")
    one_d = bool(ext) and len(ext["min"]) == 1 or bool(summary.get("fs"))
    what = "duration (s)" if one_d else "field of view (spacing x pixels, in the file's units)"
    if ext and mine["extent"] is None and int(ext.get("n", 0)) == n:
        notes.append(f"the file gives no {'sampling rate' if one_d else 'spacing'}, so its {what} cannot be "
                     f"checked against training's ({' x '.join(map(_span, ext['min'], ext['max']))})")
    elif ext and mine["extent"] is not None and len(mine["extent"]) == len(ext["min"]):
        if any(_outside(v, lo, hi) for v, lo, hi in zip(mine["extent"], ext["min"], ext["max"])):
            ratio = " x ".join(f"{v / m:.2g}" for v, m in zip(mine["extent"], ext["median"]))
            notes.append(f"its {what}, {' x '.join(f'{v:g}' for v in mine['extent'])}, is outside training's "
                         f"{' x '.join(map(_span, ext['min'], ext['max']))} (x{ratio} of training's median): "
                         "resized to the model's input, its structures appear at another scale than in training")
    fs = summary.get("fs")
    if fs and mine["fs"] is not None and _outside(mine["fs"], fs["min"][0], fs["max"][0]):
        notes.append(f"sampled at {mine['fs']:g} Hz, training's signals at {_span(fs['min'][0], fs['max'][0])} Hz "
                     "(resampled to the model's length, its frequency content differs from training's)")
    return notes


def input_notes(card, img: Image) -> list[str]:
    """What ``nemt explain`` and the service warn about one input of a model with ``card`` (a
    :class:`~nemt.models.card.ModelCard`): :func:`differences` from the card's ``data.acquisition``; for a
    signal also a resampling to the model's length (its maps have the model's length). A card that records
    no acquisition (written before cards did) gets, for a signal, the one check it allows: a signal without
    a sidecar range is scaled by its own minimum and maximum."""
    pre = card.preprocessing
    scale = pre.get("scale", "range")
    summary = (card.data or {}).get("acquisition")
    notes = differences(summary, img, scale=scale)
    if card.spatial_dims == 1 and not summary and img.modality == "npy" and scale == "range" \
            and img.meta.get("range") != "sidecar":
        notes.append("no sidecar range ([lo, hi] in its .json, as `nemt data ecg` writes): scaled by its own "
                     "minimum and maximum, which differs from training if the model learnt fixed ranges")
    if card.spatial_dims == 1 and list(img.array.shape[1:]) != list(card.input_size):  # images: resized routinely
        notes.append(f"resampled from {img.array.shape[-1]} to the model's {card.input_size[0]} samples; its maps "
                     "have the model's length")
    return notes
