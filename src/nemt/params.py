"""``KEY=VALUE`` parameters as the command line and the benchmark's ``--param`` give them."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from nemt.errors import NemtError
from nemt.ops import ParameterError

#: keywords a method's --param may not set: each has its own option
RESERVED = {"device": "--device", "path": "--explainer"}


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


def refuse_reserved(params: dict[str, Any], prefix: str = "") -> None:
    """Refuse ``--param device=`` / ``path=`` (``prefix``: ``"rise."`` for the benchmark's METHOD.KEY form):
    the command's --device and --explainer give them."""
    for key, option in RESERVED.items():
        if key in params:
            raise NemtError(f"--param {prefix}{key}={params[key]}: give the {key} with {option}, not --param")


@contextmanager
def blamed_on_params(given: str, what: str) -> Iterator[None]:
    """A ValueError, TypeError or RuntimeError inside the block becomes the one-line :class:`NemtError`
    ``"{what} with --param {given}: Type: message"`` when the user gave parameters (``given``, as they were
    written); without any it is a real failure and keeps its traceback."""
    try:
        yield
    except NemtError:
        raise
    except (ValueError, TypeError, RuntimeError) as exc:
        if not given:
            raise
        raise NemtError(f"{what} with --param {given}: {type(exc).__name__}: {exc}") from exc
