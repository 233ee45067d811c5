"""The model card: everything needed to rebuild, feed and trust a checkpoint.

A saved model is a folder with ``model.safetensors`` (the weights) and
``model.json`` (this card). Loading validates the card field by field and
refuses a mismatch (wrong task, label count, channels, weights checksum) with
a message that names the file, the field and the reason.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nemt import __version__
from nemt.data.manifest import TASKS
from nemt.errors import CardError

CARD_FORMAT = "nemt-model/1"


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
        if d["spatial_dims"] not in (2, 3):
            raise CardError(path, "spatial_dims", f"must be 2 or 3, got {d['spatial_dims']}")
        if len(d["input_size"]) != d["spatial_dims"] or not all(isinstance(s, int) and s > 0 for s in d["input_size"]):
            raise CardError(path, "input_size", f"need {d['spatial_dims']} positive sizes, got {d['input_size']}")
        if not d["label_names"] or not all(isinstance(s, str) for s in d["label_names"]):
            raise CardError(path, "label_names", "need a non-empty list of names")
        if d["task"] == "regression" and len(d["label_names"]) != 1:
            raise CardError(path, "label_names", "a regression model has one output name")
        if d["in_channels"] < 1:
            raise CardError(path, "in_channels", "must be at least 1")
        known = set(cls.__dataclass_fields__)
        extra = set(d) - known
        if extra:
            raise CardError(path, ",".join(sorted(extra)), "unknown card fields")
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
