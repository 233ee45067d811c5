"""The explanation service: an image in, predictions and maps out, and a browser viewer at ``/``.

>>> app = create_app(clf, {"nemt": NEMt.load("explainer/", clf),       # doctest: +SKIP
...                        "gradcam++": get_explainer("gradcam++", clf)})
>>> uvicorn.run(app, host="127.0.0.1", port=8000)                     # doctest: +SKIP

Endpoints (the OpenAPI schema is at ``/openapi.json``; FastAPI's ``/docs`` and
``/redoc`` pages are switched off, since they load their scripts from a CDN):

- ``GET /health``: ``{"status": "ok", "active": n, "capacity": c}``;
- ``GET /v1/model``: the model card, the labels, the methods this service
  offers, the upload limit and the colour map overlays are drawn with;
- ``POST /v1/explain``: a multipart form with the image in ``file`` (PNG,
  JPEG, BMP, TIFF, DICOM; NIfTI for 3D models) and optional ``labels``
  (:data:`LABELS_HELP`: ``all`` (the default), ``predicted`` (the top output, as
  ``nemt explain --target predicted`` chooses it, :func:`nemt.ops.resolve_targets`; one
  label, for a multi-label model too), comma-separated label names or indices, or a JSON
  list of names and indices), ``method`` (default ``nemt``),
  ``format`` (``png``, ``array`` or ``both``; default ``png``) and ``alpha``
  (overlay opacity, default 0.45); each field at most once. The answer holds the predictions
  (probabilities, or the value for regression), the image as the model sees
  it, per requested label the overlay PNG and/or the raw map (float32,
  little-endian, base64, with its shape), and the time spent in ``ms``;
- ``GET /``: the viewer (``static/``).

A request's path: the upload is streamed, its bytes counted, into a
``tempfile.TemporaryDirectory`` that is removed when the request is done
(also on errors and when the client goes away); only a complete body takes
a compute slot. A worker thread then reads the file with
:func:`nemt.data.read_image` (its size checked from the header first),
preprocesses it with the card's preprocessing, predicts, explains and
encodes. Errors answer with FastAPI's ``{"detail": reason}``: 400 for a
malformed or incomplete multipart body, a form part without a name, a bad
Content-Length or a client that closed the connection mid-upload, 408 for a body
not complete within ``body_timeout`` seconds, 413 for an upload over the
byte limit (Content-Length, and counted while reading) or an image over the
pixel limit (``max_pixels``, default 50 Mpx, from the file's header before
any decoding), 415 for a file that is no format nemt reads (or a sample type
it does not decode), 422 for a file of a supported format that cannot be
decoded (truncated or damaged, from its header on), a wrong number of
dimensions or channels, an unknown label, method, format or field, or a field
given twice, 503 with ``Retry-After`` when the
queue is full. Messages name the client's file name, never the server's
temporary path; a client that goes away mid-upload is logged in one line.

Every method served is checked when the app is made (:func:`check_explainers`: one
explanation of a zero image of the model's input size, the only size a request hands it), so that a
setting that cannot work there (an occlusion window as large as a 16 px input) is refused at start-up
with the method's own message, not answered with a 500 on every request.

Bounds: a slow or stalled client holds only an upload slot (at most
``max_receiving`` bodies are read at once, each for at most
``body_timeout`` seconds and ``max_upload_bytes`` bytes), never a compute
slot, so it cannot starve the others. ``workers`` threads do the work; at
most ``workers + queue`` complete requests are admitted at once (running or
waiting); the next one gets 503 at once instead of piling up in memory.
The model and explainer computations themselves run one at a time
(a lock): explainers read the model's activations through forward hooks on
the one shared network, so two concurrent forward passes would mix their
features. The workers overlap reading, preprocessing and encoding with it.

Channels: a colour (3-channel) image sent to a 1-channel model is refused
(422) rather than converted to grey: the model never saw colour, and a
silent conversion would hide a wrong file. An RGB file whose three channels
are equal (a grey image stored as RGB, common for JPEG exports) is read as
grey, and a grey image for a 3-channel model is repeated to three channels,
as in training.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from nemt import __version__
from nemt.data.acquisition import input_notes
from nemt.data.readers import SUPPORTED_SUFFIXES, Image, ImageTooLarge, format_pixels, read_image
from nemt.errors import DataError, NemtError
from nemt.explainers.base import Explainer
from nemt.ops import ParameterError, evaluating, label_or_index, probe_input, resolve_targets
from nemt.visualize import _to_uint8, colormap_lut, display_order, overlay  # noqa: F401 (service API)

MB = 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000  # the service's own limit: a 285 KB PNG of 10000x10000 would take gigabytes
DEFAULT_BODY_TIMEOUT = 30.0  # seconds to receive one whole request body
DEFAULT_MAX_RECEIVING = 64  # request bodies read at once (each at most max_upload_bytes on disk)
log = logging.getLogger("nemt.service")
FORMATS = ("png", "array", "both")
FIELDS = ("file", "labels", "method", "format", "alpha")
#: ``labels=predicted``: the model's top output, as ``nemt explain --target predicted``
PREDICTED = "predicted"
ALL = "all"
LABELS_HELP = ("all (the default: every label), predicted (the model's top output, as nemt explain --target "
               "predicted chooses it: one label, for a multi-label model too), comma-separated label names or "
               "indices (spaces around each ignored; as nemt explain --target reads one, digits are an index, "
               "and digits that are also a label's name mean that label when no output has that index and are "
               "refused as ambiguous when it is another label's), or a JSON list of names (strings, "
               "taken exactly) and indices (integers), e.g. [\"left, upper\", \"all\", 2]: the way to name a "
               "label holding a comma, spaces at its ends or a leading [, or one called all or predicted (which "
               "alone are refused as ambiguous for such a model). Give the field once.")
DEFAULT_ALPHA = 0.45
STATIC = Path(__file__).with_name("static")
#: how many of a class's prototypes a prototype model's response shows per label (nearest first)
PROTOTYPES_SHOWN = 3
_FIELD_LIMIT = 64 * 1024  # a form field other than the file (labels, method, ...) is short
#: DataError fields meaning "not a format (or DICOM object) nemt decodes": 415
_UNSUPPORTED = ("file", "TransferSyntaxUID", "SampleFormat", "SOPClassUID")
_GREY_TOLERANCE = 0.01  # RGB channels this close (fraction of the value range) make a grey image


# -- response schema (also the OpenAPI documentation) ----------------------------------------------------

class RawMap(BaseModel):
    shape: list[int] = Field(description="the map's shape: the model's input size")
    dtype: str = "float32"
    byteorder: str = "little"
    data: str = Field(description="base64 of the values in C order")


class LabelExplanation(BaseModel):
    overlay_png: str | None = Field(None, description="base64 PNG: the map over the image at the model's input "
                                                      "size (format png or both; 3D: the middle slice)")
    map: RawMap | None = Field(None, description="the raw map in [0, 1] (format array or both)")


class ShownImage(BaseModel):
    filename: str
    modality: str
    shape: list[int] = Field(description="(C, *spatial) as read, before resizing")
    png: str = Field(description="base64 PNG of the image as the model sees it (resized; 3D: middle slice)")


class Timings(BaseModel):
    receive: float = Field(description="reading the upload from the client")
    queue: float = Field(description="waiting for a worker, then for the model")
    read: float = Field(description="decoding and preprocessing")
    predict: float = Field(description="the classifier's pass; 0 for NEMt, whose pass gives the predictions")
    explain: float
    encode: float
    total: float


class Prototype(BaseModel):
    index: int = Field(description="the prototype's index in the model")
    similarity: float = Field(description="its similarity to the image (Pantypes' s_j, higher is closer)")
    weight: float = Field(description="its weight to the label's logit")
    png: str = Field(description="base64 PNG of the prototype decoded to an image")


class ExplainResponse(BaseModel):
    method: str
    task: str
    labels: list[str] = Field(description="the explained labels, in the order asked for")
    predictions: dict[str, float] = Field(description="per label: probability (softmax or sigmoid) or value")
    predicted: list[str] = Field(description="multi-class: the top label; multi-label: labels at p >= 0.5")
    image: ShownImage
    explanations: dict[str, LabelExplanation]
    ms: Timings
    prototypes: dict[str, list[Prototype]] | None = Field(
        None, description="a prototype model (Pantypes) only: per label, that class's prototypes nearest the "
                          "image, nearest first")
    notes: list[str] = Field(default_factory=list, description=(
        "what makes this image unlike the model's training images, as its card records them: another field "
        "of view (spacing x pixels), a value range fixed where training's were the images' own (or the "
        "reverse), no spacing in the file; empty when nothing does"))


_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": "the image: PNG, JPEG, BMP, TIFF or DICOM (NIfTI for 3D models)"},
        "labels": {"type": "string", "default": "all", "description": LABELS_HELP},
        "method": {"type": "string", "default": "nemt", "description": "explainer (GET /v1/model lists them)"},
        "format": {"type": "string", "enum": list(FORMATS), "default": "png"},
        "alpha": {"type": "number", "minimum": 0, "maximum": 1, "default": DEFAULT_ALPHA,
                  "description": "overlay opacity"}}}}}}}
_ERRORS = {400: {"description": "malformed or incomplete multipart body, a form part without a name, a bad "
                                "(e.g. negative) Content-Length, or a client that closed the connection before "
                                "its body was complete"},
           408: {"description": "request body not received within the time limit"},
           413: {"description": "upload over the size limit, or an image over the pixel limit"},
           415: {"description": "not a multipart form, or a file in no format (or sample type) nemt reads, or "
                                "a DICOM object that holds no image (a structured report, an RT structure set)"},
           422: {"description": "a file of a supported format that cannot be decoded (truncated or damaged), "
                                "wrong dimensions or channels, an unknown or ambiguous label, an unknown "
                                "method/format/field, or a field given twice"},
           503: {"description": "queue (or upload slots) full; retry after the Retry-After seconds"}}


# -- reading the upload ----------------------------------------------------------------------------------

@dataclass
class _Form:
    fields: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    filename: str = ""
    size: int = 0


def _suffix(filename: str) -> str:
    """The supported suffix the client's file name ends in ('' if none): the only part of the name kept."""
    name = filename.lower()
    return next((s for s in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")


class _FormReader:
    """python-multipart callbacks: the one file part goes to ``directory``, short fields to memory."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.form = _Form()
        self.finished = False
        self._file = None
        self._name = ""
        self._data = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._hname = self._hvalue = b""
        self._seen: set[str] = set()  # part names so far: a field given twice is refused, not last-wins

    def callbacks(self) -> dict:
        return {name: getattr(self, name) for name in (
            "on_part_begin", "on_header_field", "on_header_value", "on_header_end", "on_headers_finished",
            "on_part_data", "on_part_end", "on_end")}

    def on_part_begin(self) -> None:
        self._headers, self._data, self._name = {}, bytearray(), ""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._hname.lower()] = self._hvalue
        self._hname = self._hvalue = b""

    def on_headers_finished(self) -> None:
        _, opts = parse_options_header(self._headers.get(b"content-disposition", b""))
        if b"name" not in opts:
            raise HTTPException(400, "a form part has no name (Content-Disposition)")
        self._name = opts[b"name"].decode("utf-8", "replace")
        if b"filename" in opts:
            if self._name != "file" or self.form.path is not None or "file" in self._seen:
                raise HTTPException(422, "send one file, in the form field 'file'")
            name = opts[b"filename"].decode("utf-8", "replace").replace("\\", "/").rsplit("/", 1)[-1]
            self.form.filename = name[:200] or "upload"
            self.form.path = self.directory / ("upload" + _suffix(name))
            self._file = open(self.form.path, "wb")
        elif self._name in self._seen:
            raise HTTPException(422, f"form field {self._name!r} is given more than once; give each field once "
                                     "(several labels: comma-separated, or a JSON list, in one labels field)")
        self._seen.add(self._name)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._file.write(data[start:end])
            self.form.size += end - start
            return
        self._data += data[start:end]
        if len(self._data) > _FIELD_LIMIT:
            raise HTTPException(413, f"form field {self._name!r} is over {_FIELD_LIMIT // 1024} KB")

    def on_part_end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        else:
            self.form.fields[self._name] = self._data.decode("utf-8", "replace")

    def on_end(self) -> None:
        self.finished = True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class _ClientGone(Exception):
    """The client closed the connection before its body was complete (nobody is left to answer)."""


async def _read_form(request: Request, boundary: bytes, directory: Path, limit: int) -> _Form:
    """Stream the body through the multipart parser, counting bytes; 413 as soon as it passes ``limit``."""
    reader = _FormReader(directory)
    parser = MultipartParser(boundary, reader.callbacks())
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise HTTPException(413, f"upload over the limit of {_fmt_bytes(limit)}")
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise HTTPException(400, f"malformed multipart body ({exc})") from exc
    except ClientDisconnect as exc:
        raise _ClientGone(f"after {total} bytes") from exc
    finally:
        reader.close()
    if not reader.finished:
        raise HTTPException(400, "incomplete multipart body (no closing boundary)")
    return reader.form


def _fmt_bytes(n: int, other: int = 0) -> str:
    """``n`` bytes as text, in MB when ``n`` or the number it is compared with (``other``) reaches 1 MB."""
    return f"{n / MB:.4g} MB" if max(n, other) >= MB else f"{n} bytes"


# -- images and overlays ---------------------------------------------------------------------------------

def _png(a: np.ndarray) -> str:
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.fromarray(a).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _raw(m: np.ndarray) -> dict:
    data = np.ascontiguousarray(m, dtype="<f4").tobytes()
    return {"shape": list(m.shape), "dtype": "float32", "byteorder": "little",
            "data": base64.b64encode(data).decode("ascii")}


def decode_map(raw: Mapping[str, Any]) -> np.ndarray:
    """A ``map`` entry of the response back to a numpy array (for Python clients)."""
    return np.frombuffer(base64.b64decode(raw["data"]), dtype="<f4").reshape(raw["shape"])


def _is_grey(img: Image) -> bool:
    a = img.array
    lo, hi = img.value_range
    tol = _GREY_TOLERANCE * (hi - lo)
    return bool(np.abs(a[0] - a[1]).max() <= tol and np.abs(a[1] - a[2]).max() <= tol)


# -- labels ----------------------------------------------------------------------------------------------

def _known(names: Sequence[str]) -> str:
    return (f"the model's labels are {list(names)} (names, or indices 0 to {len(names) - 1}; or {ALL}, or "
            f"{PREDICTED}, or a JSON list)")


def requested_labels(raw: str, names: Sequence[str]) -> list[int] | None:
    """The ``labels`` form field (:data:`LABELS_HELP`) as output indices, in the order asked, each once;
    ``None`` for ``predicted`` (resolved from the prediction). Refusals are :class:`ParameterError`."""
    names = list(names)
    text = raw.strip()
    if not text:
        return list(range(len(names)))
    if text in (ALL, PREDICTED):
        if text in names:  # a keyword that is also a label's name: never guess which is meant
            own = names.index(text)
            raise ParameterError(f"labels {text!r} is both a keyword and the name of label {own}; give labels={own} "
                                 f"or the JSON list [{json.dumps(text)}] for the label"
                                 + (", or leave labels out for every label" if text == ALL else ""))
        return None if text == PREDICTED else list(range(len(names)))
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ParameterError(f"labels {raw!r}: not a JSON list ({exc.msg}); e.g. [\"a, b\", 2]") from None
        if not isinstance(items, list) or not items or not all(
                isinstance(v, str) or isinstance(v, int) and not isinstance(v, bool) for v in items):
            raise ParameterError(f"labels {raw!r}: a JSON list of label names (strings) and indices (integers), "
                                 "at least one, e.g. [\"a, b\", 2]")
        bad = [v for v in items if (v not in names if isinstance(v, str) else not 0 <= v < len(names))]
        if bad:
            raise ParameterError(f"unknown label(s) {bad}; " + _known(names))
        return list(dict.fromkeys(names.index(v) if isinstance(v, str) else v for v in items))
    parts = [s.strip() for s in text.split(",") if s.strip()]
    found = [label_or_index(part, names) for part in parts]
    out = [i for i in found if i is not None]
    bad = [part for part, i in zip(parts, found) if i is None]
    if bad or not out:
        whole = next((n for n in (raw, text) if n in names), None)  # "left, upper", " pad": one label, not split
        hint = f"; to name the label {whole!r}, send the JSON list [{json.dumps(whole)}]" if whole else ""
        raise ParameterError(f"unknown label(s) {bad or [raw]}; " + _known(names) + hint)
    return list(dict.fromkeys(out))


# -- the service -----------------------------------------------------------------------------------------

@dataclass
class _Options:
    method: str
    labels: list[str]
    indices: list[int]
    format: str
    alpha: float


class ExplanationService:
    """State behind the app: the model, its explainers, the worker pool and the admission count."""

    def __init__(self, clf: torch.nn.Module, explainers: Mapping[str, Explainer], *, max_upload_bytes: int = 20 * MB,
                 workers: int = 2, queue: int = 16, colormap: str = "inferno", max_pixels: int = DEFAULT_MAX_PIXELS,
                 body_timeout: float = DEFAULT_BODY_TIMEOUT, max_receiving: int = DEFAULT_MAX_RECEIVING):
        if not explainers:
            raise NemtError("the service needs at least one explainer")
        dims = getattr(getattr(clf, "card", None), "spatial_dims", None)
        if dims == 1:  # its uploads are images and volumes, its overlays pictures: a signal would answer 500
            raise NemtError("the service takes images and volumes (2D and 3D models); this model takes 1D signals: "
                            "explain signals with `nemt explain` or the Python API")
        for name, value, least in (("workers", workers, 1), ("queue", queue, 0),
                                   ("max_upload_bytes", max_upload_bytes, 1)):
            if value < least:
                raise NemtError(f"{name} must be at least {least}, got {value}")
        if max_pixels < 1 or not body_timeout > 0 or max_receiving < 1:
            raise NemtError(f"need max_pixels >= 1, body_timeout > 0 and max_receiving >= 1 "
                            f"(got {max_pixels}, {body_timeout}, {max_receiving})")
        self.clf = clf  # its training flags stay the caller's: each request runs in eval mode and restores them
        self.explainers = dict(explainers)
        self.default_method = "nemt" if "nemt" in self.explainers else next(iter(self.explainers))
        self.max_upload_bytes, self.workers, self.queue = int(max_upload_bytes), int(workers), int(queue)
        self.max_pixels, self.body_timeout = int(max_pixels), float(body_timeout)
        self.max_receiving = int(max_receiving)
        self.capacity = self.workers + self.queue
        self.active = 0  # admitted requests (complete bodies); only touched on the event loop
        self.receiving = 0  # bodies being read; only touched on the event loop
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="nemt-explain")
        self.compute = threading.Lock()
        self.colormap = colormap
        self.lut = colormap_lut(colormap)
        self.device = next(clf.parameters()).device

    # -- GET ------------------------------------------------------------------
    def model_info(self) -> dict:
        card = self.clf.card
        return {"card": card.to_dict(), "labels": list(card.label_names), "task": card.task,
                "spatial_dims": card.spatial_dims, "input_size": list(card.input_size),
                "channels": card.in_channels, "methods": list(self.explainers),
                "default_method": self.default_method, "formats": list(FORMATS),
                "limits": {"max_upload_bytes": self.max_upload_bytes, "max_pixels": self.max_pixels,
                           "body_timeout_s": self.body_timeout, "max_receiving": self.max_receiving,
                           "workers": self.workers, "queue": self.queue},
                "colormap": {"name": self.colormap, "lut": self.lut.tolist()},
                "nemt_version": __version__}

    def health(self) -> dict:
        return {"status": "ok", "active": self.active, "capacity": self.capacity, "receiving": self.receiving}

    # -- POST /v1/explain -----------------------------------------------------
    async def explain(self, request: Request) -> dict:
        t_start = time.perf_counter()
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise HTTPException(400, f"bad Content-Length {length!r}")
            if int(length) > self.max_upload_bytes:
                raise HTTPException(413, f"upload of {_fmt_bytes(int(length), self.max_upload_bytes)} is over "
                                         f"the limit of {_fmt_bytes(self.max_upload_bytes, int(length))}")
        kind, params = parse_options_header(request.headers.get("content-type", ""))
        if kind != b"multipart/form-data" or not params.get(b"boundary"):
            raise HTTPException(415, "send a multipart/form-data form with the image in the field 'file'")
        if self.receiving >= self.max_receiving:
            raise HTTPException(503, f"busy: {self.receiving} uploads in progress; try again shortly",
                                headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        tmp = job = None
        try:
            tmp = tempfile.TemporaryDirectory(prefix="nemt-upload-", ignore_cleanup_errors=True)
            form = await self._receive(request, params[b"boundary"], Path(tmp.name))
            opts = self._options(form.fields)
            if form.path is None:
                raise HTTPException(422, "no file: send the image as a file upload in the form field 'file'")
            if form.size == 0:
                raise HTTPException(422, f"{form.filename}: the uploaded file is empty")
            # only now, with the whole body on disk, does the request take a compute slot
            if self.active >= self.capacity:
                raise HTTPException(503, f"busy: {self.active} requests running or queued; try again shortly",
                                    headers={"Retry-After": "1"})
            t_received = time.perf_counter()
            self.active += 1
            try:
                job = self.pool.submit(self._explain_file, form, opts, t_start, t_received)
            except BaseException:
                self._release()
                raise

            def done(_) -> None:  # the slot and the folder last until the job ends, even if the client is gone
                tmp.cleanup()
                with contextlib.suppress(RuntimeError):  # the loop is already closed (shutdown)
                    loop.call_soon_threadsafe(self._release)
            job.add_done_callback(done)
            return await asyncio.wrap_future(job)
        finally:
            if job is None and tmp is not None:
                tmp.cleanup()

    async def _receive(self, request: Request, boundary: bytes, directory: Path) -> _Form:
        """The whole body into ``directory`` within ``body_timeout`` seconds, holding an upload slot meanwhile.

        A timeout answers 408 and closes the connection; a client that went
        away gets a one-line log entry instead of a traceback (and an answer
        nobody reads).
        """
        self.receiving += 1
        try:
            return await asyncio.wait_for(_read_form(request, boundary, directory, self.max_upload_bytes),
                                          self.body_timeout)
        except asyncio.TimeoutError:
            raise HTTPException(408, f"the request body was not complete within {self.body_timeout:g} s",
                                headers={"Connection": "close"}) from None
        except _ClientGone as exc:
            client = request.client
            log.info("client %s went away during its upload (%s)", f"{client.host}:{client.port}" if client
                     else "?", exc)
            raise HTTPException(400, "the client closed the connection before the body was complete",
                                headers={"Connection": "close"}) from None
        finally:
            self.receiving -= 1

    def _release(self) -> None:
        self.active -= 1

    def _options(self, fields: Mapping[str, str]) -> _Options:
        unknown = sorted(set(fields) - set(FIELDS))
        if unknown:
            raise HTTPException(422, f"unknown form field(s) {unknown}; the fields are {list(FIELDS)}")
        method = fields.get("method", "").strip() or self.default_method
        if method not in self.explainers:
            raise HTTPException(422, f"unknown method {method!r}; this service offers {list(self.explainers)}")
        fmt = fields.get("format", "").strip().lower() or "png"
        if fmt not in FORMATS:
            raise HTTPException(422, f"unknown format {fmt!r}; use one of {list(FORMATS)}")
        raw_alpha = fields.get("alpha", "").strip()
        try:
            alpha = float(raw_alpha) if raw_alpha else DEFAULT_ALPHA
        except ValueError:
            alpha = float("nan")
        if not 0.0 <= alpha <= 1.0:
            raise HTTPException(422, f"alpha must be a number in [0, 1], got {raw_alpha!r}")
        names = list(self.clf.card.label_names)
        try:
            indices = requested_labels(fields.get("labels", ""), names)
        except ParameterError as exc:
            raise HTTPException(422, str(exc)) from None
        if indices is None:  # labels=predicted: resolved from the prediction, in the worker
            return _Options(method, [], [], fmt, alpha)
        return _Options(method, [names[i] for i in indices], indices, fmt, alpha)

    # -- worker thread ----------------------------------------------------------
    def _explain_file(self, form: _Form, opts: _Options, t_start: float, t_received: float) -> dict:
        t0 = time.perf_counter()
        img = self._read(form)
        unit = self._to_unit(img, form.filename)
        pre = self.clf.preprocessing
        x = pre.normalise(unit)[None].to(self.device)
        t1 = time.perf_counter()
        explainer = self.explainers[opts.method]
        with self.compute, evaluating(self.clf):
            t_model = time.perf_counter()
            if not opts.indices:  # labels=predicted: the top output, resolved as `nemt explain --target predicted`
                top = int(resolve_targets(PREDICTED, self.clf, x)[0, 0])
                opts = replace(opts, labels=[self.clf.card.label_names[top]], indices=[top])
            maps, probs = explainer.explain_and_predict(x, target=opts.indices)  # NEMt: from one pass
            t2 = t_model  # the prediction is timed with the explanation ("predict" stays 0 for old clients)
            probs = probs[0].float().cpu()
            maps = maps.detach()[0].float().cpu().numpy()
            prototypes = self._prototypes(x, opts)
            t3 = time.perf_counter()
        shown = unit.numpy()
        if shown.ndim == 4:  # 3D: the middle slice, axial for a NIfTI (display_order by its orientation)
            axcodes = img.meta.get("axcodes")
            shown, maps_shown = display_order(shown, axcodes), display_order(maps, axcodes)
            mid = shown.shape[1] // 2
            shown, flat = shown[:, mid], maps_shown[:, mid]
        else:
            flat = maps
        explanations = {}
        for name, m, m2 in zip(opts.labels, maps, flat):
            entry = {}
            if opts.format in ("png", "both"):
                entry["overlay_png"] = _png(overlay(shown, m2, opts.alpha, self.lut))
            if opts.format in ("array", "both"):
                entry["map"] = _raw(m)
            explanations[name] = entry
        card = self.clf.card
        p = probs.tolist()
        if card.task == "multiclass":
            predicted = [card.label_names[int(np.argmax(p))]]
        elif card.task == "multilabel":
            predicted = [n for n, v in zip(card.label_names, p) if v >= 0.5]
        else:
            predicted = []
        t4 = time.perf_counter()
        ms = {"receive": t_received - t_start, "queue": t0 - t_received + t_model - t1, "read": t1 - t0,
              "predict": t2 - t_model,
              "explain": t3 - t2, "encode": t4 - t3, "total": t4 - t_start}
        return {"method": opts.method, "task": card.task, "labels": opts.labels,
                "predictions": dict(zip(card.label_names, p)), "predicted": predicted,
                "image": {"filename": form.filename, "modality": img.modality, "shape": list(img.array.shape),
                          "png": _png(_to_uint8(shown))},
                "explanations": explanations, "ms": {k: round(v * 1000, 3) for k, v in ms.items()},
                "prototypes": prototypes, "notes": input_notes(card, img)}

    def _prototypes(self, x: torch.Tensor, opts: _Options) -> dict | None:
        """A prototype model's own explanation (Pantypes): per requested label, that class's
        ``PROTOTYPES_SHOWN`` prototypes most similar to the image, with their similarity, their weight to
        the label's logit and their decoded image (PNG, intensities as the model decodes them). None for
        any other model."""
        from nemt.models.pantypes import is_pantypes, pantypes_of, top_prototypes

        if not is_pantypes(self.clf):
            return None
        weights = pantypes_of(self.clf).last_layer.weight.detach()  # (classes, prototypes)
        out = {}
        for name, t in zip(opts.labels, opts.indices):
            top = top_prototypes(self.clf, x, PROTOTYPES_SHOWN, target=int(t))
            w = weights[int(t)]
            out[name] = [{"index": int(top["index"][0, j]), "similarity": round(float(top["similarity"][0, j]), 4),
                          "weight": round(float(w[int(top["index"][0, j])]), 4),
                          "png": _png(_to_uint8(top["image"][0, j].float().cpu().numpy()))}
                         for j in range(top["index"].shape[1])]
        return out

    def _read(self, form: _Form) -> Image:
        try:
            return read_image(form.path, max_pixels=self.max_pixels)
        except ImageTooLarge as exc:  # from the header: nothing was decoded
            raise HTTPException(413, f"{form.filename}: {exc.field}: image of {'x'.join(map(str, exc.shape))} = "
                                     f"{format_pixels(exc.pixels)} is over this service's limit of "
                                     f"{format_pixels(exc.limit)}") from exc
        except DataError as exc:
            raise HTTPException(415 if exc.field in _UNSUPPORTED else 422,
                                _reason(form.filename, exc, form.path)) from exc
        except Exception as exc:  # a decoder's own limits
            raise HTTPException(422, _hide_path(f"{form.filename}: {type(exc).__name__}: {exc}", form.path,
                                                form.filename)) from exc

    def _to_unit(self, img: Image, filename: str) -> torch.Tensor:
        """Checks dimensions and channels, then intensities to [0, 1] and resize: (C, *input_size)."""
        card, pre = self.clf.card, self.clf.preprocessing
        spatial = img.array.ndim - 1
        shape = "x".join(str(s) for s in img.array.shape[1:])
        if spatial != card.spatial_dims:
            raise HTTPException(422, f"{filename}: shape: the image is {spatial}D ({shape}), the model takes "
                                     f"{card.spatial_dims}D images ({'x'.join(map(str, card.input_size))})")
        c = img.array.shape[0]
        if c == 3 and pre.channels == 1 and not _is_grey(img):
            raise HTTPException(422, f"{filename}: channels: the image has 3 channels (colour), the model takes "
                                     "1 (grey); send a grey-scale image")
        try:
            return pre.unit(img)
        except DataError as exc:
            raise HTTPException(422, _reason(filename, exc, Path(img.path))) from exc


def _hide_path(text: str, path: Path | None, filename: str) -> str:
    """``text`` with the server's temporary file (and its folder) written as the client's file name.

    Decoders put the path they were given into their messages (nibabel:
    ``File /tmp/nemt-upload-.../upload.nii is not a gzip file``).
    """
    if path is None:
        return text
    return text.replace(str(path), filename).replace(str(path.parent), "<upload>")


def _reason(filename: str, exc: DataError, path: Path | None = None) -> str:
    """The DataError's field and reason under the client's file name (never the server's temporary path)."""
    return _hide_path(": ".join(p for p in (filename, exc.field, exc.reason) if p), path, filename)


# -- the app -------------------------------------------------------------------------------------------

def create_app(clf: torch.nn.Module, explainers: Mapping[str, Explainer], *, max_upload_bytes: int = 20 * MB,
               workers: int = 2, queue: int = 16, max_pixels: int = DEFAULT_MAX_PIXELS,
               body_timeout: float = DEFAULT_BODY_TIMEOUT, max_receiving: int = DEFAULT_MAX_RECEIVING) -> FastAPI:
    """The FastAPI app serving ``clf`` with ``explainers`` (name -> explainer; ``nemt`` is the default method).

    ``max_upload_bytes`` bounds the request body, ``body_timeout`` the
    seconds to receive it and ``max_receiving`` the bodies read at once;
    ``max_pixels`` bounds the image's size (from its header); ``workers``
    threads do the work and at most ``workers + queue`` complete requests are
    admitted at once. Each explainer is checked on the model's input size first
    (:func:`check_explainers`): one that cannot explain it is a :class:`NemtError` now.
    """
    service = ExplanationService(clf, explainers, max_upload_bytes=max_upload_bytes, workers=workers, queue=queue,
                                 max_pixels=max_pixels, body_timeout=body_timeout, max_receiving=max_receiving)
    try:
        check_explainers(clf, service.explainers)
    except BaseException:
        service.pool.shutdown(wait=False)
        raise

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.pool.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="nemt explanation service", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None,  # their pages load scripts from a CDN; the schema stays
                  description="Predictions and explanation maps for one image per request. "
                              "The viewer is at /.")
    app.state.service = service

    @app.get("/health", summary="liveness and load")
    async def health() -> dict:
        return service.health()

    @app.get("/v1/model", summary="the model card, labels, methods and limits")
    async def model() -> dict:
        return service.model_info()

    @app.post("/v1/explain", response_model=ExplainResponse, openapi_extra=_FORM, responses=_ERRORS,
              summary="predict and explain one image")
    async def explain(request: Request) -> dict:
        return await service.explain(request)

    @app.get("/", include_in_schema=False)
    async def viewer() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def build_explainers(clf: torch.nn.Module, explainer_dir: str | Path | None = None, baselines: Sequence[str] = (),
                     *, params: Mapping[str, Mapping[str, Any]] | None = None, seed: int = 0,
                     device: str | torch.device | None = None) -> dict[str, Explainer]:
    """``{"nemt": NEMt from explainer_dir, baseline: its explainer, ...}`` (NEMt only with a folder).

    ``params``: per method, its keywords (``nemt serve --param METHOD.KEY=VALUE``, read by
    :func:`nemt.bench.runner.split_method_params`), built as ``nemt benchmark`` builds its methods
    (``seed`` among them replaces ``seed``; ``device`` and ``path`` are refused). Refused now rather than
    answered with a 500 on every request: ``nemt`` among the baselines without a folder, a method that
    must be fitted (``nem``: the service loads only NEMt's folder), parameters for a method not served.
    """
    from nemt.bench.runner import _method_explainers
    from nemt.explainers.base import _REGISTRY

    methods = ["nemt"] if explainer_dir is not None else []
    for name in baselines:
        if name == "nemt":  # NEMt is a fitted folder, not a baseline: refused now, not with a 500 per request
            if explainer_dir is None:
                raise NemtError("method 'nemt' needs a fitted explainer folder: give --explainer DIR (written by "
                                "`nemt fit`) instead of listing nemt among --baselines")
            continue
        if getattr(_REGISTRY.get(name), "load", None) is not None:  # as get_explainer tells a fitted method
            raise NemtError(f"method {name!r} must be fitted before it explains anything, and the service loads "
                            "only NEMt's fitted folder (--explainer DIR); leave it out of --baselines")
        methods.append(name)
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise NemtError("nothing to serve: give a NEMt explainer folder and/or baseline methods")
    params = {m: dict(kw) for m, kw in (params or {}).items()}
    unknown = [m for m in params if m not in methods]
    if unknown:
        raise NemtError(f"--param for {unknown}: not a method this service offers ({methods})")
    return _method_explainers(methods, clf, params, explainer_dir=explainer_dir, seed=seed, device=device)


def check_explainers(clf: torch.nn.Module, explainers: Mapping[str, Explainer]) -> None:
    """Refuse a method that cannot explain an input of the model's size, with the method's own message.

    Every image a request sends is resized to the card's input size, so one explanation of a zero image
    of that size (the data's mean once normalised; the first output) tells whether a method's settings work
    there (e.g. an occlusion window or a LIME cell as large as a 16 px input makes a map of one value).
    The model's flags are restored (:func:`nemt.ops.evaluating`).
    """
    card = clf.card
    x = probe_input(clf, (card.in_channels, *card.input_size))
    size = "x".join(map(str, card.input_size))
    for name, explainer in explainers.items():
        try:
            with evaluating(clf):
                explainer.explain_and_predict(x, target=[0])
        except (NemtError, ValueError, TypeError, RuntimeError) as exc:
            why = str(exc) if isinstance(exc, NemtError) else f"{type(exc).__name__}: {exc}"
            raise NemtError(f"method {name!r} cannot explain this model's {size} inputs: {why} (nemt serve: set "
                            f"its parameters with --param {name}.KEY=VALUE, see `nemt methods`)") from exc


def serve(model_dir: str | Path, explainer_dir: str | Path | None = None, *, baselines: Sequence[str] = (),
          params: Mapping[str, Mapping[str, Any]] | None = None,
          host: str = "127.0.0.1", port: int = 8000, workers: int = 2, queue: int = 16,
          max_upload_mb: float = 20, max_pixels: int = DEFAULT_MAX_PIXELS, body_timeout: float = DEFAULT_BODY_TIMEOUT,
          max_receiving: int = DEFAULT_MAX_RECEIVING, device: str = "cpu", seed: int = 0,
          log_level: str = "info") -> None:
    """``nemt serve``: load the model and its explainers (``params`` per method, :func:`build_explainers`),
    check each on the model's input size, and run the service until interrupted."""
    import uvicorn

    from nemt.models import load_model

    upload_bytes = float(max_upload_mb) * MB  # checked before the model is read or a port is bound
    if not upload_bytes >= 1:
        raise NemtError(f"--max-upload-mb {max_upload_mb:g}: the upload limit must be at least one byte "
                        f"({1 / MB:.3g} MB)")
    if not np.isfinite(upload_bytes):
        raise NemtError(f"--max-upload-mb {max_upload_mb:g}: the upload limit is too large to count in bytes")
    clf = load_model(model_dir, device=device)
    app = create_app(clf, build_explainers(clf, explainer_dir, baselines, params=params, seed=seed, device=device),
                     max_upload_bytes=int(upload_bytes), workers=workers, queue=queue, max_pixels=max_pixels,
                     body_timeout=body_timeout, max_receiving=max_receiving)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread; yield its base URL; stop it on exit.

    ``port=0`` lets the system pick a free port (read back once the server
    listens), so parallel runs never collide.
    """
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="nemt-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise NemtError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)
