"""The model card: everything needed to rebuild, feed and trust a checkpoint.

A saved model is a folder with ``model.safetensors`` (the weights) and
``model.json`` (this card). Loading validates the card field by field and
refuses a mismatch (wrong task, label count, channels, weights checksum) with
a message that names the file, the field and the reason. The preprocessing
must describe the model's own input (its ``size`` is ``input_size``, its
``channels`` are ``in_channels``, ``std`` finite and positive): a card that
would silently feed the network something else, or NaN, is refused.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nemt import __version__
from nemt.data.manifest import TASKS
from nemt.errors import CardError
from nemt.files import label_names_problem

CARD_FORMAT = "nemt-model/1"
_PREPROCESSING_KEYS = ("size", "channels", "scale", "mean", "std")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _finite_numbers(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)


def _check_preprocessing(pre: dict, d: dict, path) -> None:
    """The preprocessing must produce what the network takes, with a usable normalisation."""
    extra = sorted(set(pre) - set(_PREPROCESSING_KEYS))
    if extra:
        raise CardError(path, "preprocessing", f"unknown keys {extra} (known: {list(_PREPROCESSING_KEYS)})")
    if "size" not in pre:
        raise CardError(path, "preprocessing.size", "missing")
    if pre["size"] != d["input_size"]:
        raise CardError(path, "preprocessing.size", f"{pre['size']} differs from input_size {d['input_size']}; "
                        "the images would be resized to another size than the network was made for")
    channels = pre.get("channels", 1)
    if channels != d["in_channels"] or isinstance(channels, bool):
        raise CardError(path, "preprocessing.channels", f"{channels!r} differs from in_channels {d['in_channels']}")
    if pre.get("scale", "range") not in ("range", "minmax"):
        raise CardError(path, "preprocessing.scale", f"{pre['scale']!r} is not range or minmax")
    for key, default in (("mean", [0.0]), ("std", [1.0])):
        v = pre.get(key, default)
        if not _finite_numbers(v) or len(v) not in (1, channels):
            raise CardError(path, f"preprocessing.{key}", f"need 1 or {channels} finite numbers, got {v!r}")
    if min(pre.get("std", [1.0])) <= 0:
        raise CardError(path, "preprocessing.std", f"must be positive (it divides the input), got {pre['std']}")


def _check_target_scale(ts: Any, path) -> None:
    if not isinstance(ts, dict) or set(ts) != {"mean", "std"}:
        raise CardError(path, "target_scale", f"must be null or {{\"mean\": m, \"std\": s}}, got {ts!r}")
    for key in ("mean", "std"):
        if not _finite_numbers([ts[key]]):
            raise CardError(path, f"target_scale.{key}", f"must be a finite number, got {ts[key]!r}")
    if ts["std"] <= 0:
        raise CardError(path, "target_scale.std", f"must be positive, got {ts['std']}")


@dataclass
class ModelCard:
    """Description of a classifier checkpoint.

    ``preprocessing`` is :meth:`nemt.data.Preprocessing.to_dict`;
    ``target_scale`` holds the training targets' mean and std for regression
    (the network predicts standardised values, :class:`Classifier` returns
    them in the target's units); ``data`` names the manifest, its SHA-256 and
    the split; ``metrics`` holds validation and test figures.
    """

    arch: str
    spatial_dims: int
    in_channels: int
    task: str
    label_names: list[str]
    input_size: list[int]
    preprocessing: dict
    arch_kwargs: dict = field(default_factory=dict)
    target_scale: dict | None = None
    data: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    weights_sha256: str | None = None
    nemt_version: str = __version__
    format: str = CARD_FORMAT

    @property
    def out_channels(self) -> int:
        return 1 if self.task == "regression" else len(self.label_names)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, path: str | Path | None = None) -> "ModelCard":
        """Build and validate a card; every problem names its field."""
        if not isinstance(d, dict):
            raise CardError(path, None, "card must be a JSON object")
        fmt = d.get("format")
        if fmt != CARD_FORMAT:
            raise CardError(path, "format", f"expected {CARD_FORMAT!r}, got {fmt!r}")
        types = {"arch": str, "spatial_dims": int, "in_channels": int, "task": str,
                 "label_names": list, "input_size": list, "preprocessing": dict}
        for name, typ in types.items():
            if name not in d:
                raise CardError(path, name, "missing")
            if not isinstance(d[name], typ) or (typ is int and isinstance(d[name], bool)):
                raise CardError(path, name, f"must be {typ.__name__}, got {type(d[name]).__name__}")
        if d["task"] not in TASKS:
            raise CardError(path, "task", f"{d['task']!r} is not one of {TASKS}")
        if d["spatial_dims"] not in (1, 2, 3):
            raise CardError(path, "spatial_dims", f"must be 1, 2 or 3, got {d['spatial_dims']}")
        if len(d["input_size"]) != d["spatial_dims"] or not all(isinstance(s, int) and s > 0 for s in d["input_size"]):
            raise CardError(path, "input_size", f"need {d['spatial_dims']} positive sizes, got {d['input_size']}")
        if not d["label_names"] or not all(isinstance(s, str) for s in d["label_names"]):
            raise CardError(path, "label_names", "need a non-empty list of names")
        why = label_names_problem(d["label_names"])
        if why:
            raise CardError(path, "label_names", f"{why}; each output needs its own non-empty name")
        if d["task"] == "regression" and len(d["label_names"]) != 1:
            raise CardError(path, "label_names", "a regression model has one output name")
        if d["in_channels"] < 1:
            raise CardError(path, "in_channels", "must be at least 1")
        known = set(cls.__dataclass_fields__)
        extra = set(d) - known
        if extra:
            raise CardError(path, ",".join(sorted(extra)), "unknown card fields")
        _check_preprocessing(d["preprocessing"], d, path)
        if d.get("target_scale") is not None:
            _check_target_scale(d["target_scale"], path)
            if d["task"] != "regression":  # forward applies it to regression outputs only: it would be ignored
                raise CardError(path, "target_scale", f"only a regression model has one (this card's task is "
                                f"{d['task']}); leave it null")
        kwargs = d.get("arch_kwargs", {})
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
            raise CardError(path, "arch_kwargs", f"must be an object of keyword arguments, got {kwargs!r}")
        sha = d.get("weights_sha256")
        if sha is not None and not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
            raise CardError(path, "weights_sha256", f"must be 64 lower-case hex digits, got {sha!r}")
        for name in ("data", "metrics", "training"):
            if name in d and not isinstance(d[name], dict):
                raise CardError(path, name, f"must be an object, got {type(d[name]).__name__}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        from nemt.files import write_json
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "ModelCard":
        path = Path(path)
        if not path.is_file():
            raise CardError(path, None, "model card not found")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CardError(path, None, f"not valid JSON ({exc})") from exc
        return cls.from_dict(d, path)
