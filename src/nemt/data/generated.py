"""Writing a generated data set (phantoms, ECGs) into a folder without destroying another data set there.

A generator records its settings in a JSON file beside ``manifest.csv`` (``phantoms.json``, ``ecg.json``,
with ``"generator"``). :func:`claim_folder` decides, before anything is written:

- a folder without ``manifest.csv``: written;
- the same generator with the same settings: written again (byte-identical files, so a rerun is harmless);
- the same generator with other settings: refused, unless ``overwrite``: then the files the old manifest
  lists (and their JSON sidecars) are removed first, so no stale record of a larger set stays behind;
- any other ``manifest.csv`` (a user's data set, or another generator's): always refused.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from nemt.errors import NemtError
from nemt.files import differing_keys


def claim_folder(out: str | Path, meta_name: str, settings: dict, *, command: str, overwrite: bool = False) -> None:
    """Make ``out`` ready for a generated data set of ``settings`` (with ``"generator"``), or raise (see module)."""
    out = Path(out)
    manifest, meta = out / "manifest.csv", out / meta_name
    if not manifest.exists():
        return
    old = None
    if meta.is_file():
        try:
            old = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
    if not isinstance(old, dict) or old.get("generator") != settings["generator"]:
        raise NemtError(f"{out}: holds a data set ({manifest.name}) that `{command}` did not write; nothing was "
                        "changed: choose another folder")
    want = json.loads(json.dumps(settings))  # as stored and read back
    if old == want:
        return
    if not overwrite:
        raise NemtError(f"{out}: holds a `{command}` data set of other settings "
                        f"({', '.join(differing_keys(old, want))}); nothing was changed: pass --overwrite to "
                        "replace it, or choose another folder")
    _remove_listed(out, manifest)
    meta.unlink()


def _remove_listed(out: Path, manifest: Path) -> None:
    """Remove every file the manifest lists inside ``out`` (and ``X.json`` beside ``X.npy``), then the manifest."""
    root = out.resolve()
    with open(manifest, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        for key in ("image", "mask", "waves"):
            rel = (row.get(key) or "").strip()
            if not rel:
                continue
            p = (out / rel).resolve()
            if root not in p.parents:  # only the generator's own files, never one outside the folder
                continue
            for f in (p, p.with_suffix(".json") if p.suffix == ".npy" else None):
                if f is not None and f.is_file():
                    f.unlink()
    manifest.unlink()
