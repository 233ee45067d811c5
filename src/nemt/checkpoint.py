"""Training state in safetensors + JSON, never pickle.

A resume checkpoint (model and optimiser state, RNG states, history) is a
nested structure of tensors and plain values. ``save_state`` puts every tensor
in a safetensors file under its dotted path and everything else in a JSON
file beside it; ``load_state`` puts them back together. No code is ever
unpickled, so a checkpoint from elsewhere cannot run anything.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from nemt.errors import CardError
from nemt.files import atomic_path, write_json

_TENSOR = "__tensor__"


def _split(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if torch.is_tensor(obj):
        key = prefix or "_"
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"state keys must be str or int at {prefix!r}")
        # int keys (optimiser state) are tagged so they come back as ints
        return {("i:" if isinstance(k, int) else "s:") + str(k): _split(v, f"{prefix}.{k}".lstrip("."), tensors)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{prefix}.{i}".lstrip("."), tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix!r}")


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        return {(int(k[2:]) if k.startswith("i:") else k[2:]): _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_state(path: str | Path, state: dict) -> None:
    """Write ``state`` as ``path.safetensors`` + ``path.json``, each atomically
    (the JSON last, so a complete JSON means a complete pair)."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", tensors)
    with atomic_path(path.with_suffix(".safetensors")) as tmp:
        save_file(tensors, str(tmp))
    write_json(path.with_suffix(".json"), skeleton)


def load_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a state written by :func:`save_state`."""
    path = Path(path)
    js, st = path.with_suffix(".json"), path.with_suffix(".safetensors")
    if not js.is_file() or not st.is_file():
        raise CardError(path, None, "checkpoint incomplete: need both .json and .safetensors")
    try:
        skeleton = json.loads(js.read_text())
        tensors = load_file(str(st), device=str(map_location))
        return _join(skeleton, tensors)
    except (json.JSONDecodeError, KeyError, OSError, RuntimeError) as exc:
        raise CardError(path, None, f"unreadable checkpoint ({exc})") from exc
