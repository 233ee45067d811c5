"""Errors that name the file, the field and the reason.

Every piece of bad input a user can hand to nemt ends in one of these, so the
CLI can print one clear line and a caller can catch one type.
"""
from __future__ import annotations

from pathlib import Path

#: the largest seed, for the command line's --seed and the library alike: NumPy, torch and scikit-learn all
#: take [0, 2**32 - 1] (here, a module without heavy imports, so that the command line starts fast)
SEED_MAX = 2**32 - 1


class NemtError(Exception):
    """Base class of the errors nemt raises on purpose."""


class _Located(NemtError, ValueError):
    """An error about one file: ``path: field: reason`` (empty parts left out)."""

    def __init__(self, path: str | Path | None, field: str | None, reason: str):
        self.path = None if path is None else str(path)
        self.field = field
        self.reason = reason
        super().__init__(": ".join(p for p in (self.path, field, reason) if p))


class DataError(_Located):
    """Bad input data: names the file, the field (or ``None``) and the reason.

    >>> str(DataError("a.png", "pixels", "file is truncated"))
    'a.png: pixels: file is truncated'
    """


class CardError(_Located):
    """A model or explainer card that is missing, malformed or does not match."""
