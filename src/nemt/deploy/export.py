"""One model that predicts and explains in one call, exported to ONNX and TorchScript.

>>> sem = SelfExplainingModel(clf, NEMt.load("explainer/", clf))        # doctest: +SKIP
>>> probs, maps = sem(x)             # (B, T) and (B, T, *spatial), maps in [0, 1]
>>> export_onnx(clf, nemt, "model.onnx"); check_onnx("model.onnx", x, sem)
{'outputs': 1.5e-08, 'maps': 1.3e-06}

The exported graph takes the model's *normalised* input ``image``
(B, C, *input_size) float32, with a dynamic batch axis, and returns
``outputs`` (B, T) and ``maps`` (B, T, *input_size). Everything a caller
needs to build that input and read the outputs (labels, task, input size,
channels, intensity scaling, mean/std, the model card and the explainer's
settings) travels with the file: in the ONNX ``metadata_props`` (one JSON
string per key, read back with :func:`read_onnx_metadata`) and, for
TorchScript, in the archive's extra file ``meta.json`` (:func:`load_torchscript`).

Export runs under ``torch.no_grad()``, so the traced graph is NEMt's eval
fast path: BatchNorm folded into the decoder's convolutions, channels-last
tensors, and the box smoothing as differences of cumulative sums (ONNX
CumSum; circular padding becomes Slice/Concat at opset 17). TorchScript
keeps all of it. ONNX keeps it for 2D models; for 3D models PyTorch's
ONNX exporter has no ``channels_last_3d``, so the plain path (BatchNorm
unfolded, which ONNX Runtime folds itself when it loads the graph) is
exported instead. 1D models (signals, (B, C, L)) are exported on the plain
path too (``graph`` ``plain``). The metadata key ``graph`` says which
(``fast`` or ``plain``); both give the same outputs.

A batch of 0: :class:`SelfExplainingModel` and the TorchScript archive
return empty ``outputs`` (0, T) and ``maps`` (0, T, *input_size); the ONNX
graph does not (ONNX Runtime refuses the empty batch at a Reshape node with
an error), so callers of the ONNX file skip empty batches. Exporting leaves
the classifier's ``training`` flags and ``requires_grad`` as they were.
"""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Any, Iterator, Tuple

import numpy as np
import torch
from torch import nn

from nemt import __version__
from nemt.errors import NemtError
from nemt.files import atomic_path
from nemt.models.classifier import predictions_from_outputs
from nemt.ops import ParameterError, n_outputs_of

FORMAT = "nemt-self-explaining/1"
INPUT, OUTPUTS, MAPS = "image", "outputs", "maps"
META_FILE = "meta.json"
_OUTPUT_KIND = {"multiclass": "softmax probabilities", "multilabel": "sigmoid probabilities",
                "regression": "predicted value in the target's units"}


class SelfExplainingModel(nn.Module):
    """A classifier and its fitted NEMt explainer as one inference module.

    ``forward(x)`` takes the normalised input (B, C, *spatial) and returns
    ``(outputs, maps)``: ``outputs`` (B, T) are softmax probabilities for a
    multi-class model, sigmoid probabilities for a multi-label model and the
    predicted value (in the target's units) for regression, i.e.
    :meth:`Classifier.predict`; ``maps`` (B, T, *spatial) in [0, 1] are NEMt's
    maps for every output (``explain(x, target="all")``). One pass of the
    classifier serves both: the explanation module reads its stage features.
    Inference only: this module and NEMt's explanation module stay in eval
    mode (as ``NEMt.explain`` puts it), while the classifier keeps the
    ``training`` flags the caller gave it: each pass runs it in eval mode and
    restores them (:func:`nemt.ops.evaluating`). A batch of 0 gives empty
    ``outputs`` (0, T) and ``maps`` (0, T, *spatial).
    """

    def __init__(self, classifier: nn.Module, explainer: Any):
        super().__init__()
        from nemt.explainers.nemt import NEMt

        if not isinstance(explainer, NEMt):
            raise NemtError(f"a self-explaining model needs a fitted NEMt explainer, got {type(explainer).__name__}")
        if explainer.model is not classifier:
            raise NemtError("the explainer was loaded for another classifier object; "
                            "load it with NEMt.load(dir, classifier) for this one")
        self.classifier = classifier
        self.explanation = explainer._check_fitted()
        self.task = classifier.card.task
        self.n_outputs = n_outputs_of(classifier)
        self.train(False)
        self.freeze_fast_path()

    def freeze_fast_path(self) -> None:
        """Build the decoder's BatchNorm-folded copy now, without gradients.

        The copy is a cache outside the module's parameters (rebuilt after
        any ``train``/``eval`` switch); a trace can only hold its weights as
        constants when they do not require gradients.
        """
        for block in self.explanation.decoder._eval_blocks():
            block.requires_grad_(False)

    def train(self, mode: bool = True) -> "SelfExplainingModel":
        """Always eval (a deployment module: training mode would draw random smoothing kernels), and only
        for this module and the explanation module: the classifier's flags stay the caller's (the
        explanation module runs it in eval mode on each pass). The explanation module is switched only when
        some part of it is in training mode, so that its folded fast path (:meth:`freeze_fast_path`) is kept."""
        self.training = False
        if any(m.training for m in self.explanation.modules()):
            self.explanation.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not torch.jit.is_tracing() and x.shape[0] == 0:  # the graph's flattening cannot take an empty batch
            return (x.new_zeros((0, self.n_outputs)), x.new_zeros((0, self.n_outputs, *x.shape[2:])))
        maps, out = self.explanation(x)
        return predictions_from_outputs(out, self.task), maps


class _EmptyBatch(nn.Module):
    """The traced TorchScript model, answering a batch of 0 with empty outputs as :class:`SelfExplainingModel`
    does (a trace holds no branch; this scripted wrapper does)."""

    def __init__(self, traced: nn.Module, n_outputs: int):
        super().__init__()
        self.traced = traced
        self.n_outputs = n_outputs

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if x.size(0) == 0:
            return x.new_zeros([0, self.n_outputs]), x.new_zeros([0, self.n_outputs] + list(x.shape[2:]))
        return self.traced(x)


def export_metadata(clf: nn.Module, explainer: Any) -> dict[str, Any]:
    """What travels with an exported model: labels, geometry, normalisation, model card, explainer settings.

    Values are strict JSON (a NaN in the card's metrics becomes null).
    """
    from nemt.explainers.nemt import model_checksum

    card, pre = clf.card, clf.preprocessing
    return _strict({
        "format": FORMAT,
        "labels": list(card.label_names),
        "task": card.task,
        "outputs": _OUTPUT_KIND[card.task],
        "spatial_dims": card.spatial_dims,
        "input_size": list(card.input_size),
        "channels": card.in_channels,
        "normalisation": {"scale": pre.scale, "mean": list(pre.mean), "std": list(pre.std)},
        "io": {INPUT: "(B, C, *input_size) float32: intensities to [0, 1] by `scale`, then (x - mean) / std",
               OUTPUTS: "(B, T)", MAPS: "(B, T, *input_size) in [0, 1], one map per label"},
        "model_card": card.to_dict(),
        "explainer": {"kind": type(explainer).__name__, "params": explainer.hyper_params(),
                      "model_sha256": model_checksum(clf)},
        "nemt_version": __version__,
    })


def _strict(v: Any) -> Any:
    """NaN and infinities (e.g. an undefined AUROC in the card's metrics) as null: strict JSON for any reader."""
    if isinstance(v, dict):
        return {k: _strict(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_strict(x) for x in v]
    return None if isinstance(v, float) and not np.isfinite(v) else v


def _example(clf: nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    card = clf.card
    g = torch.Generator().manual_seed(seed)
    dev = next(clf.parameters()).device
    return torch.randn(batch, card.in_channels, *card.input_size, generator=g).to(dev)


def _traced_input(clf: nn.Module, example: torch.Tensor | None) -> torch.Tensor:
    """The batch to trace: ``example`` when it is (B, channels, *input_size) floats with B >= 1, as the
    metadata says (a graph traced at another size would contradict it), else a clear error."""
    if example is None:
        return _example(clf)
    card = clf.card
    want = (card.in_channels, *card.input_size)
    form = f"(B, {', '.join(map(str, want))}) with B >= 1 (the model's channels and input size)"
    if not torch.is_tensor(example):
        raise ParameterError(f"example must be a float tensor {form}, got {type(example).__name__}")
    if tuple(example.shape[1:]) != want or example.ndim != len(want) + 1 or example.shape[0] < 1:
        raise ParameterError(f"example must be {form}, got shape {tuple(example.shape)}")
    if not example.is_floating_point():
        raise ParameterError(f"example must be a float tensor {form}, got {example.dtype}")
    return example


def _writable_target(path: str | Path, name: str) -> Path:
    """``path`` as a file to write: refused before any work when it is a folder or a folder above it is a
    file (``--out afile/x.onnx``)."""
    path = Path(path)
    if path.is_dir():
        raise NemtError(f"{name} {path} is a folder, not a file; give a file name in it")
    for parent in path.parents:  # the nearest existing one decides
        if parent.exists():
            if not parent.is_dir():
                raise NemtError(f"{name} {path}: {parent} is a file, not a folder")
            break
    return path


def export_onnx(clf: nn.Module, nemt: Any, path: str | Path, opset: int = 17, *,
                example: torch.Tensor | None = None) -> Path:
    """Write the self-explaining model as ONNX (dynamic batch axis, metadata attached), atomically.

    ``example`` is the input traced (default: a seeded random batch of 2 of
    the card's shape), (B, channels, *input_size) with B >= 1: another
    shape is refused; the graph is the same for any input of that shape.
    Uses PyTorch's TorchScript-based exporter (``dynamo=False``): it needs no
    ``onnxscript`` and handles the forward hooks NEMt reads features with.
    """
    import onnx

    path = _writable_target(path, "path")
    x = _traced_input(clf, example)
    sem = SelfExplainingModel(clf, nemt)
    # grad mode picks the decoder's path: no_grad -> folded, channels-last; enabled -> plain.
    # 3D: the exporter has no channels_last_3d, so the plain path (ONNX Runtime folds BatchNorm itself).
    fast = clf.card.spatial_dims == 2
    batch = {0: "batch"}
    buf = io.BytesIO()
    with torch.set_grad_enabled(not fast), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes say nothing about this graph
        torch.onnx.export(sem, (x,), buf, dynamo=False, opset_version=opset, do_constant_folding=True,
                          input_names=[INPUT], output_names=[OUTPUTS, MAPS],
                          dynamic_axes={INPUT: batch, OUTPUTS: batch, MAPS: batch})
    model = onnx.load_from_string(buf.getvalue())
    model.doc_string = (f"nemt self-explaining model: {INPUT} -> {OUTPUTS} ({_OUTPUT_KIND[clf.card.task]}), "
                        f"{MAPS} (NEMt, one per label); see metadata_props")
    model.producer_name = "nemt"
    model.producer_version = __version__
    for key, value in {**export_metadata(clf, nemt), "graph": "fast" if fast else "plain"}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value, allow_nan=False)
    onnx.checker.check_model(model)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return path


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata written by :func:`export_onnx`, decoded (one JSON value per key)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: json.loads(p.value) for p in model.metadata_props}


def export_torchscript(clf: nn.Module, nemt: Any, path: str | Path, *,
                       example: torch.Tensor | None = None) -> Path:
    """Write the self-explaining model as a traced TorchScript archive with ``meta.json``, atomically.

    Traced (``torch.jit.trace``) rather than scripted: NEMt reads the
    classifier's stages with forward hooks, which scripting does not run.
    The batch axis stays dynamic; the trace holds the device it was made on.
    PyTorch 2.13 marks TorchScript deprecated (in favour of ``torch.export``)
    but still writes and runs it; its notices are silenced here, since the
    format was asked for by name. ONNX is the format to prefer. ``example`` as for :func:`export_onnx`.
    The trace is wrapped in a small scripted module that answers a batch of 0 with empty outputs.
    """
    path = _writable_target(path, "path")
    x = _traced_input(clf, example)
    sem = SelfExplainingModel(clf, nemt)
    sem.freeze_fast_path()
    with torch.no_grad(), _quiet_jit():
        traced = torch.jit.script(_EmptyBatch(torch.jit.trace(sem, (x,)), sem.n_outputs))
    with atomic_path(path) as tmp, _quiet_jit():
        meta = {**export_metadata(clf, nemt), "graph": "fast"}
        torch.jit.save(traced, str(tmp), _extra_files={META_FILE: json.dumps(meta, allow_nan=False)})
    return path


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=DeprecationWarning)
        yield


def load_torchscript(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[torch.jit.ScriptModule, dict]:
    """A TorchScript archive written by :func:`export_torchscript` and its metadata."""
    extra = {META_FILE: ""}
    with _quiet_jit():
        module = torch.jit.load(str(path), map_location=map_location, _extra_files=extra)
    return module, json.loads(extra[META_FILE]) if extra[META_FILE] else {}


def _max_diffs(got: tuple, reference: tuple) -> dict[str, float]:
    return {name: float(np.max(np.abs(np.asarray(g, dtype=np.float64) -
                                      np.asarray(r.detach().cpu() if torch.is_tensor(r) else r, dtype=np.float64))))
            for name, g, r in zip((OUTPUTS, MAPS), got, reference)}


def _reference(x: torch.Tensor, reference: Any) -> tuple:
    if isinstance(reference, nn.Module):
        with torch.no_grad():
            return reference(x)
    return tuple(reference)


def check_onnx(path: str | Path, x: torch.Tensor, reference: Any) -> dict[str, float]:
    """Run the ONNX file with onnxruntime (CPU) on ``x``; max abs difference to PyTorch per output.

    ``reference`` is a module returning ``(outputs, maps)`` (e.g. the
    :class:`SelfExplainingModel`) or those two tensors already computed.
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run([OUTPUTS, MAPS], {INPUT: x.detach().cpu().numpy().astype(np.float32)})
    return _max_diffs(tuple(got), _reference(x, reference))


def check_torchscript(path: str | Path, x: torch.Tensor, reference: Any) -> dict[str, float]:
    """Load the TorchScript archive and compare its outputs on ``x`` with ``reference`` (as :func:`check_onnx`)."""
    module, _ = load_torchscript(path, map_location=x.device)
    with torch.no_grad():
        got = module(x)
    return _max_diffs(tuple(t.cpu().numpy() for t in got), _reference(x, reference))


def map_tolerance(nemt, x: torch.Tensor, floor: float = 1e-4) -> float:
    """How far float32 rounding of NEMt's logits can move its maps (at least ``floor``).

    A fixed-area map is the mean of ``sigmoid((l - threshold) / (T * std(l)))`` steps (``staircase``, T the
    map temperature), so a logit moved by e moves the map by up to e / (4 T std(l)); ONNX Runtime and PyTorch
    sum the convolutions in other orders, a few ulps of the largest logit: e = 16 * 2^-23 * max|l|. Smoothing
    the map (``map_smoothing``) averages such errors, an unsmoothed map shows them as they are; for the nearly
    flat logits of an untrained decoder the steps are steep and the bound large.
    """
    if nemt.module_.map_kind != "nested":  # the paper's keep map, a student's sigmoid map
        return floor  # sigmoid maps: slope at most 1/4 per logit unit, far below the floor for float32 rounding
    with torch.no_grad():
        logits, _ = nemt.module_.logits(x.to(nemt.device))
    std = float(logits.flatten(2).std(-1).min())
    return max(floor, 16 * 2.0 ** -23 * float(logits.abs().max()) / (4 * nemt.map_temperature * max(std, 1e-12)))


SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".pth": "torchscript", ".ts": "torchscript"}


def opset_range() -> tuple[int, int]:
    """The ONNX opsets :func:`export_onnx` writes valid graphs for: from 12 (at 11 the exporter writes a Clip
    on int64 that ONNX Runtime rejects; below, the bilinear resize does not export) to the newest that
    PyTorch's TorchScript-based exporter supports."""
    try:
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as top
    except ImportError:  # a private constant: fall back to the newest this nemt was tested with
        top = 20
    return 12, int(top)


def export_format(out: str | Path, format: str | None) -> str:
    """The format of an export to ``out``: ``format`` if given (onnx or torchscript, in any case), else from
    the suffix (.onnx; .pt, .pth or .ts for TorchScript, in any case); a suffix that contradicts ``format``, or
    an unknown one, is refused."""
    suffix = Path(out).suffix.lower()
    given = format
    format = format.lower() if isinstance(format, str) else format  # ONNX, TorchScript: as suffixes, any case
    if format is not None and format not in ("onnx", "torchscript"):
        raise NemtError(f"--format must be onnx or torchscript (any case), got {given!r}")
    if suffix not in SUFFIXES:
        raise NemtError(f"--out {out}: {f'unknown suffix {suffix!r}' if suffix else 'no suffix'}; use .onnx for ONNX "
                        "or .pt / .pth / .ts for TorchScript")
    if format is not None and SUFFIXES[suffix] != format:
        raise NemtError(f"--out {out}: a {suffix} file is not {format}; name it "
                        f"{Path(out).with_suffix('.onnx' if format == 'onnx' else '.pt').name} or drop --format")
    return SUFFIXES[suffix]


def export_model(model_dir: str | Path, explainer_dir: str | Path, out: str | Path, *, format: str | None = None,
                 seed: int = 0, opset: int = 17, tolerance: float = 1e-4) -> dict[str, Any]:
    """``nemt export``: load a model and its NEMt explainer, export, and check against PyTorch.

    ``format``: onnx or torchscript (default: from ``out``'s suffix, :func:`export_format`); ``opset`` in
    :func:`opset_range`. The check runs a seeded random batch of 3 (not the traced batch of 2, so
    the dynamic batch axis is exercised) and raises :class:`NemtError` when
    an output differs by more than ``tolerance``, or a map by more than its rounding bound
    (:func:`map_tolerance`, at least ``tolerance``), or the runtime refuses the file. The file is written and
    checked under a temporary name and takes ``out``'s name only once checked: a failed (or interrupted) check
    removes it and leaves an earlier file at ``out`` as it was. Returns a summary.
    """
    from nemt.explainers import get_explainer
    from nemt.models import load_model

    format = export_format(out, format)
    lo, hi = opset_range()
    if format == "onnx" and not lo <= opset <= hi:
        raise NemtError(f"--opset {opset}: the ONNX export supports opsets {lo} to {hi}")
    _writable_target(out, "--out")  # before the model is loaded: not a traceback from the final rename
    clf = load_model(model_dir, device="cpu")
    nemt = get_explainer("nemt", clf, path=explainer_dir, device="cpu")
    example = _example(clf, 2, seed)
    x = _example(clf, 3, seed + 1)
    path = Path(out)
    with atomic_path(path) as tmp:  # renamed onto out only when checked; removed on any failure or interrupt
        if format == "onnx":
            export_onnx(clf, nemt, tmp, opset, example=example)
            check = check_onnx
        else:
            export_torchscript(clf, nemt, tmp, example=example)
            check = check_torchscript
        try:
            diffs = check(tmp, x, SelfExplainingModel(clf, nemt))
        except Exception as exc:  # the runtime refuses the file (e.g. ONNX Runtime's InvalidGraph)
            lines = str(exc).replace(str(tmp), str(path)).strip().splitlines()  # the name the user gave
            raise NemtError(f"{path}: the runtime cannot run the exported model ("
                            f"{lines[0][:300] if lines else type(exc).__name__}); nothing kept") from None
        tol = {"outputs": tolerance, "maps": map_tolerance(nemt, x, tolerance)}  # the maps' own rounding bound
        if any(diffs[k] > tol[k] for k in diffs):
            raise NemtError(f"{path}: the exported model differs from PyTorch by {diffs} (tolerance {tol}); "
                            "nothing kept")
    return {"path": str(path), "format": format, "labels": clf.label_names, "input_size": clf.card.input_size,
            "max_abs_diff": diffs, "tolerance": tol, "bytes": Path(path).stat().st_size}
