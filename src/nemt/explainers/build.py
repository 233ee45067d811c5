"""Building an explainer from the command line: a name, a seed, a device and ``key=value`` budget parameters."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn

from nemt.errors import NemtError
from nemt.explainers.base import Explainer, _REGISTRY, get_explainer, init_parameters


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """``["n_masks=2000", "score=logit", "fast=false"]`` -> ``{"n_masks": 2000, "score": "logit", "fast": False}``."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise NemtError(f"--param {item!r}: expected KEY=VALUE, e.g. n_masks=2000")
        params[key.strip().replace("-", "_")] = _value(raw.strip())
    return params


def _value(raw: str) -> Any:
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
        return [_value(v) for v in raw.split(",")]
    return raw


def make_explainer(name: str, model: nn.Module, *, seed: int = 0, device=None, explainer_dir: str | Path | None = None,
                   **params: Any) -> Explainer:
    """An explainer by name, with ``seed`` (for methods that draw random numbers) and its parameters checked.

    ``nemt`` and ``nem`` are loaded from ``explainer_dir`` (written by ``nemt fit``).
    """
    if name in ("nemt", "nem"):
        if explainer_dir is None:
            raise NemtError(f"method {name!r} needs a fitted explainer folder (--explainer DIR from `nemt fit`)")
        from nemt.explainers.nemt import NEM, NEMt
        return (NEMt if name == "nemt" else NEM).load(explainer_dir, model, device=device)
    cls = _REGISTRY.get(name)
    if cls is None:
        return get_explainer(name, model)  # raises with the list of names
    accepted = init_parameters(cls) - {"model"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise NemtError(f"method {name!r} has no parameter {unknown}; its parameters are {sorted(accepted)}")
    if "seed" in accepted:
        params.setdefault("seed", seed)
    if device is not None:
        params.setdefault("device", device)
    return get_explainer(name, model, **params)
