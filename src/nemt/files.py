"""Atomic file output and content hashing (of files and of nemt's own code).

Outputs are written to a temporary file in the destination folder and then
renamed over the target, so an interrupted run never leaves a half-written
checkpoint, card or table behind. Every file gets a normal file's mode
(``0666`` less the umask, e.g. ``0644``), also when the writer replaced the
temporary file with one of its own (safetensors makes its files ``0600``).

JSON is strict: NaN and infinities (an undefined AUROC) are written as
``null``, never as the bare ``NaN`` that strict parsers reject.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import secrets
from pathlib import Path
from typing import IO, Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary file is created with mode ``0666`` and the umask applied by
    the system (``mkstemp``'s ``0600`` is not kept, and the process's umask is
    neither read nor changed); the same mode is set again before the rename,
    in case the writer replaced the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp_path = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    os.close(fd)
    mode = os.stat(tmp_path).st_mode & 0o777
    try:
        yield tmp_path
        if os.stat(tmp_path).st_mode & 0o777 != mode:
            os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; rename on success."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (tuples become lists), for strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented strict JSON (NaN and infinities as null), atomically."""
    text = json.dumps(json_safe(obj), indent=2, sort_keys=False, allow_nan=False)
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text + "\n")


def write_html(path: str | Path, title: str, body: list[str] | str, style: str = "") -> Path:
    """A self-contained HTML page (``body`` parts joined, ``style`` as CSS), written atomically; returns the path."""
    import html
    body = "".join(body) if not isinstance(body, str) else body
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{body}</body></html>")
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(page)
    return Path(path)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def code_fingerprint(root: str | Path | None = None) -> str:
    """SHA-256 (16 hex digits) of the installed nemt package's Python source (or of the ``.py`` files under
    ``root``).

    Resume points and benchmark folders record it, so that a run resumed
    after nemt's code was edited (an editable install between two versions)
    is refused instead of joining results of two different programs. Files
    are taken in sorted relative order, each as its path and its bytes;
    compiled caches are not source and are left out.
    """
    return _package_fingerprint() if root is None else _fingerprint(Path(root))


@functools.lru_cache(maxsize=1)
def _package_fingerprint() -> str:  # read once per process: the running code is the code imported at its start
    return _fingerprint(Path(__file__).resolve().parent)


def _fingerprint(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


#: how a refusal names the part of a run key that differs (a key not named here is said as it is)
KEY_NAMES = {"code": "nemt code (edited since)", "config": "settings", "params": "settings", "nemt": "nemt version"}


def differing_keys(old: dict, new: dict) -> list[str]:
    """The top-level keys whose values differ between two run keys (one missing counts as differing), named by
    :data:`KEY_NAMES`, an object's differing fields in brackets (``config (lr, seed)``): ``"other " +
    ", ".join(...)`` says what a refused resume differs in."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k, _MISSING) != new.get(k, _MISSING))
    out = []
    for k in keys:
        a, b = old.get(k, _MISSING), new.get(k, _MISSING)
        name = KEY_NAMES.get(k, k)
        if isinstance(a, dict) and isinstance(b, dict):  # e.g. a training config: which of its fields
            sub = sorted(j for j in set(a) | set(b) if a.get(j, _MISSING) != b.get(j, _MISSING))
            name = f"{name} ({', '.join(sub)})"
        out.append(name)
    return list(dict.fromkeys(out))


_MISSING = object()


#: suffixes that belong together: ``scan.nii.gz`` is ``scan`` in NIfTI, not ``scan.nii`` gzipped
_DOUBLE_SUFFIXES = (".nii.gz", ".tar.gz")


def image_stem(path: str | Path) -> str:
    """A file's name without its format suffix; every other dot kept.

    >>> image_stem("scan.2023.png"), image_stem("1.2.840.10008.dcm"), image_stem("brain.nii.gz")
    ('scan.2023', '1.2.840.10008', 'brain')
    """
    name = Path(path).name
    for double in _DOUBLE_SUFFIXES:
        if name.lower().endswith(double) and len(name) > len(double):
            return name[:-len(double)]
    stem = Path(name).stem
    return stem or name


_UNSAFE_IN_NAMES = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*]')


def label_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a label (output) name, or None: not a string, empty or only spaces, or holding a
    control character (a tab, a line end). Path-like names ("mass/nodule", "../x") are allowed as labels;
    :func:`label_file_parts` makes them safe as parts of file names."""
    if not isinstance(name, str):
        return f"{name!r} is not a string"
    if not name.strip():
        return "an empty name"
    if re.search(r"[\x00-\x1f\x7f]", name):
        return f"{name!r} holds a control character"
    return None


def label_names_problem(names: list) -> str | None:
    """Every bad name's :func:`label_name_problem` and every name given twice, joined by "; " (as a
    manifest lists all its bad labels), or None. (Names that differ only in case are two labels;
    :func:`label_file_parts` keeps their files apart.)"""
    seen: set[str] = set()
    problems: list[str] = []
    for n in names:
        why = label_name_problem(n)
        if why:
            problems.append(why)
        elif n in seen:
            problems.append(f"{n!r} twice")
        seen.add(n)
    return "; ".join(dict.fromkeys(problems)) or None


def label_file_parts(names: list[str]) -> list[str]:
    """Each label's part of an output file name (``{stem}__{part}.png``): the name itself where it is safe, else
    with path separators and characters no file system takes replaced by ``_`` and leading/trailing dots and
    spaces removed, so that no label writes outside the output folder; made unique (case-insensitive) by a
    ``-{index}`` suffix where two labels would give the same part.

    >>> label_file_parts(["benign", "mass/nodule", "../../x", "a_b", "a/b"])
    ['benign', 'mass_nodule', '_.._x', 'a_b', 'a_b-4']
    """
    parts, taken = [], set()
    for k, n in enumerate(names):
        part = _UNSAFE_IN_NAMES.sub("_", n).strip(" .") or f"label{k}"
        if part.casefold() in taken:
            part = f"{part}-{k}"
        taken.add(part.casefold())
        parts.append(part)
    return parts


class OutputNames:
    """Unique output stems within one run: the image's stem, else ``stem-2``, ``stem-3``, ...

    ``claim(path, parts)`` returns the first stem for which none of the names
    ``{stem}__{part}`` was handed out before in this run (compared without
    case, as on a case-insensitive file system), and reserves them; so two
    inputs never write the same output file, whatever their names or folders.
    """

    def __init__(self) -> None:
        self._taken: set[str] = set()

    def claim(self, path: str | Path, parts: list[str] | tuple[str, ...]) -> str:
        base = image_stem(path)
        k = 1
        while True:
            stem = base if k == 1 else f"{base}-{k}"
            names = {f"{stem}__{p}".casefold() for p in parts}
            if not names & self._taken:
                self._taken |= names
                return stem
            k += 1
