"""``KEY=VALUE`` parameters as the command line and the benchmark's ``--param`` give them."""
from __future__ import annotations

from typing import Any, Sequence

from nemt.ops import ParameterError


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """``["n_masks=2000", "score=logit", "fast=false"]`` -> ``{"n_masks": 2000, "score": "logit", "fast": False}``."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ParameterError(f"--param {item!r}: expected KEY=VALUE, e.g. n_masks=2000")
        params[key.strip().replace("-", "_")] = parse_value(raw.strip())
    return params


def parse_value(raw: str) -> Any:
    """A command-line value as a bool, None, int, float, list (comma-separated) or string."""
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    if "," in raw:
        return [parse_value(v) for v in raw.split(",")]
    return raw
