"""Classifier training: seeded, class-weighted, validated each epoch, resumable.

``train_classifier`` writes into ``out_dir``:

- ``model.safetensors`` + ``model.json``: the best checkpoint so far (by
  validation macro AUROC, or MAE for regression) with its card;
- ``splits.csv``: which sample went to which split;
- ``history.json``: the figures of every epoch;
- ``state/last.{safetensors,json}``: the resume point, written after each
  epoch. Running the same command again continues from it; a run with other
  settings is refused unless ``fresh=True``.

Why a hand-written augmentation: MONAI's random transforms work one sample
at a time; here a random flip, affine and intensity jitter are drawn for the
whole batch at once on the batch's device (``affine_grid`` works for 2D and
3D), which keeps a 2-core CPU busy with the network instead.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from nemt.checkpoint import load_state, save_state
from nemt.distributed import (StepBatches, all_reduce_sum, batch_generator, batch_seed, context, local_device,
                              steps_per_epoch)
from nemt.data.acquisition import summarise
from nemt.data.check import read_every_item
from nemt.data.dataset import ImageDataset, channel_stats, read_sample
from nemt.data.manifest import Manifest
from nemt.data.preprocess import Preprocessing
from nemt.data.splits import split_indices
from nemt.errors import SEED_MAX, CardError, DataError, NemtError
from nemt.files import atomic_open, code_fingerprint, differing_keys, write_json
from nemt.models.card import ModelCard
from nemt.models.classifier import Classifier, load_model
from nemt.models.metrics import classification_metrics, score_for_selection
from nemt.models.zoo import build_model, sized_arch_kwargs
from nemt.ops import ArgumentTypeError, ParameterError, evaluating, is_whole_number, preserved_rng
from nemt.progress import console, progress_bar


@dataclass
class TrainConfig:
    """Settings of one training run (all recorded in the card)."""

    arch: str = "resnet18"
    size: Sequence[int] = (128, 128)
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    fractions: Sequence[float] = (0.7, 0.1, 0.2)
    augment: bool = True
    class_weighting: bool = True
    scale: str = "range"
    channels: int | None = None
    arch_kwargs: dict = field(default_factory=dict)
    #: micro-batches of ``batch_size`` per optimiser step (per process under torchrun: the effective batch is
    #: batch_size x accumulate x processes, so 2 processes with accumulate=A train like 1 with 2A)
    accumulate: int = 1

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse a setting that training cannot use, before any work: one :class:`~nemt.ops.ParameterError`
        (a ``ValueError``) or :class:`~nemt.ops.ArgumentTypeError` (a ``TypeError``) naming the field, what
        it needs and what it got. Run at construction and again by :func:`train_classifier` (a field may be
        changed in between); the architecture's keywords are tried by :func:`check_network`."""
        from nemt.models.zoo import ARCHITECTURES

        if not isinstance(self.arch, str):
            raise ArgumentTypeError(f"TrainConfig.arch must be an architecture name (str), got {self.arch!r}")
        if self.arch not in ARCHITECTURES:
            raise ParameterError(f"TrainConfig.arch: unknown architecture {self.arch!r}; choose one of "
                                 f"{sorted(ARCHITECTURES)}")
        size = self.size
        if isinstance(size, (str, bytes)) or not isinstance(size, Sequence) and not (
                isinstance(size, (np.ndarray, torch.Size)) and np.ndim(size) == 1):
            raise ArgumentTypeError(f"TrainConfig.size must be a sequence of 1 to 3 sizes, one per spatial axis "
                                    f"(e.g. (128, 128), or (1000,) for a signal), got {size!r}")
        if not 1 <= len(size) <= 3 or not all(is_whole_number(s) and s >= 1 for s in size):
            raise ParameterError(f"TrainConfig.size must be 1 to 3 positive whole numbers, one per spatial axis "
                                 f"(e.g. (128, 128)), got {list(size)!r}")
        for name, low in (("epochs", 1), ("batch_size", 1), ("accumulate", 1)):
            _check_int(name, getattr(self, name), low)
        _check_int("seed", self.seed, 0, SEED_MAX)
        _check_real("lr", self.lr, positive=True)
        _check_real("weight_decay", self.weight_decay, positive=False)
        fr = self.fractions
        if isinstance(fr, (str, bytes)) or not isinstance(fr, (Sequence, np.ndarray)) or len(fr) != 3 or not all(
                isinstance(f, (int, float, np.integer, np.floating)) and not isinstance(f, bool) for f in fr):
            raise ParameterError(f"TrainConfig.fractions must be three numbers (train, val, test), "
                                 f"e.g. (0.7, 0.1, 0.2), got {fr!r}")
        if not all(math.isfinite(f) and f >= 0 for f in fr) or not np.isclose(sum(fr), 1.0):
            raise ParameterError(f"TrainConfig.fractions must be three non-negative numbers summing to 1 (train, "
                                 f"val, test), got {list(fr)}")
        for name in ("augment", "class_weighting"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ArgumentTypeError(f"TrainConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.scale not in ("range", "minmax"):
            raise ParameterError(f"TrainConfig.scale must be 'range' or 'minmax', got {self.scale!r}")
        if self.channels is not None:
            _check_int("channels", self.channels, 1)
        kw = self.arch_kwargs
        if not isinstance(kw, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kw):
            raise ArgumentTypeError(f"TrainConfig.arch_kwargs must be a dict of keyword arguments of {self.arch}, "
                                    f"got {kw!r}")
        reserved = sorted(set(kw) & {"spatial_dims", "in_channels", "out_channels"})
        if reserved:
            raise ParameterError(f"TrainConfig.arch_kwargs: {reserved} come from the data (size, channels, labels), "
                                 "not from arch_kwargs")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = [int(s) for s in self.size]
        d["fractions"] = [float(f) if isinstance(f, (np.integer, np.floating)) else f for f in self.fractions]
        return d




def _check_int(name: str, v, low: int, high: int | None = None) -> None:
    if not is_whole_number(v):
        raise ArgumentTypeError(f"TrainConfig.{name} must be a whole number (int), got {v!r}")
    if v < low or high is not None and v > high:
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ParameterError(f"TrainConfig.{name} must be {bound}, got {v}")


def _check_real(name: str, v, *, positive: bool) -> None:
    if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, (bool, np.bool_)):
        raise ArgumentTypeError(f"TrainConfig.{name} must be a number, got {v!r}")
    if not math.isfinite(v) or (v <= 0 if positive else v < 0):
        raise ParameterError(f"TrainConfig.{name} must be a finite number {'> 0' if positive else '>= 0'}, got {v}")


def check_network(cfg: TrainConfig, spatial_dims: int | None = None) -> None:
    """``cfg``'s network tried before any data are read or anything is written (:func:`probe_network`)."""
    probe_network(cfg.arch, cfg.arch_kwargs, tuple(int(s) for s in cfg.size), spatial_dims=spatial_dims)


def probe_network(arch: str, arch_kwargs: dict, size: tuple[int, ...], *, spatial_dims: int | None = None,
                  kwargs_name: str = "TrainConfig.arch_kwargs", size_name: str = "TrainConfig.size",
                  size_label: str | None = None) -> None:
    """Build the network once (1 channel, 2 outputs; the caller's random generators untouched) when it has
    keywords or a small input, and pass one input of ``size`` through it: an unknown or ill-typed keyword, or a
    size the network's downsampling cannot take, is one :class:`~nemt.ops.ParameterError` naming the field
    (``kwargs_name``, ``size_name``: the library's fields or the command line's options)."""
    kwargs = sized_arch_kwargs(arch, arch_kwargs, size)
    label = size_label or str(list(size))
    dims = spatial_dims or len(size)
    if not arch_kwargs and min(size) >= 32 and arch not in SIZE_CHECKED:
        return
    with preserved_rng(), torch.no_grad():
        try:
            net = build_model(arch, spatial_dims=dims, in_channels=1, out_channels=2, **kwargs)
        except (NemtError, TypeError, ValueError) as exc:
            # blame what the network cannot take: the size (the dimensions, or the input_size filled in from
            # it) when the architecture cannot be built even without the caller's keywords (or without the
            # filled-in input_size), else the keywords
            filled = {k: v for k, v in kwargs.items() if k != "input_size" or "input_size" in arch_kwargs}
            if not _builds(arch, dims, {}) or (filled != kwargs and _builds(arch, dims, filled)):
                raise ParameterError(f"{size_name} {label}: {arch} cannot take it ({_first_line(exc)})") from exc
            if isinstance(exc, NemtError):  # build_model's own message names the architecture and the keywords
                raise ParameterError(f"{kwargs_name}: {exc}") from exc
            raise ParameterError(f"{kwargs_name}: {arch} cannot be built with {arch_kwargs}: "
                                 f"{type(exc).__name__}: {_first_line(exc)}") from exc
        if min(size) < 32:
            try:
                net.eval()(torch.zeros(1, 1, *size))
            except (RuntimeError, ValueError) as exc:
                raise ParameterError(f"{size_name} {label}: too small for {arch} ({_first_line(exc)}); give a "
                                     f"larger {size_name.split('.')[-1]}") from exc


#: architectures tried by :func:`probe_network` at any size, not only below 32 px: whether they can be built
#: depends on the size itself (Pantypes: 2D only)
SIZE_CHECKED = frozenset({"pantypes"})


def _builds(arch: str, spatial_dims: int, kwargs: dict) -> bool:
    """Whether ``arch`` can be built with ``kwargs`` (1 channel, 2 outputs; the caller's generators untouched)."""
    try:
        with preserved_rng():
            build_model(arch, spatial_dims=spatial_dims, in_channels=1, out_channels=2, **kwargs)
    except (NemtError, TypeError, ValueError):
        return False
    return True


def checked_config(config: TrainConfig | None) -> TrainConfig:
    """``config`` (default: ``TrainConfig()``) checked field by field and its network tried (see
    :meth:`TrainConfig.check`, :func:`check_network`), before a training run reads or writes anything."""
    if config is None:
        return TrainConfig()
    if not isinstance(config, TrainConfig):
        raise ArgumentTypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    config.check()
    check_network(config)
    return config


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and any GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def augment_batch(x: torch.Tensor, gen: torch.Generator, *, flip: bool = True, max_rotate: float = 10.0,
                  max_scale: float = 0.1, max_shift: float = 0.05, jitter: float = 0.1) -> torch.Tensor:
    """Random flip along the last axis, small affine and brightness/contrast jitter; (B, C, *spatial).

    A 1D signal (B, C, L) gets the amplitude (gain and offset) jitter only: time has a direction (a
    flipped ECG puts T before QRS) and no plane to rotate in.
    """
    b, d = x.shape[0], x.ndim - 2
    dev = x.device

    def u(*shape):  # uniform in [-1, 1], drawn on CPU from ``gen`` for reproducibility
        return (torch.rand(*shape, generator=gen) * 2 - 1).to(dev)

    if d == 1:
        shape = (b, 1, 1)
        return x * (1 + u(*shape) * jitter) + u(*shape) * jitter

    ang = u(b) * math.radians(max_rotate)
    rot = torch.eye(d, device=dev).repeat(b, 1, 1)  # rotation in the plane of the last two axes
    rot[:, -1, -1], rot[:, -1, -2] = torch.cos(ang), -torch.sin(ang)
    rot[:, -2, -1], rot[:, -2, -2] = torch.sin(ang), torch.cos(ang)
    theta = rot * (1 + u(b, 1, 1) * max_scale)
    if flip:
        sign = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0).to(dev)
        theta[:, :, 0] = theta[:, :, 0] * sign[:, None]  # affine_grid's first coordinate is the last axis
    shift = u(b, d, 1) * max_shift * 2
    grid = F.affine_grid(torch.cat([theta, shift], dim=2), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    shape = (b,) + (1,) * (x.ndim - 1)
    return out * (1 + u(*shape) * jitter) + u(*shape) * jitter


def _loss_fn(task: str, y_train: np.ndarray, n_out: int, weighting: bool, device) -> nn.Module:
    if task == "multiclass":
        w = None
        if weighting:
            counts = np.bincount(y_train, minlength=n_out).astype(np.float64)
            w = torch.tensor(len(y_train) / (n_out * np.maximum(counts, 1)), dtype=torch.float32, device=device)
        return nn.CrossEntropyLoss(weight=w)
    if task == "multilabel":
        pw = None
        if weighting:
            pos = y_train.sum(axis=0)
            pw = torch.tensor(np.clip((len(y_train) - pos) / np.maximum(pos, 1), 0.1, 10.0),
                              dtype=torch.float32, device=device)
        return nn.BCEWithLogitsLoss(pos_weight=pw)
    return nn.MSELoss()


@torch.no_grad()
def predict_outputs(clf: Classifier, ds: ImageDataset, batch_size: int = 64,
                    device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Targets and raw outputs of ``clf`` over ``ds`` (in eval mode for the call: every module's ``training``
    flag is restored after, so a model in training mode leaves in training mode)."""
    if len(ds) == 0:
        raise ParameterError("the data set holds no sample (an empty split?): there is nothing to evaluate")
    ys, outs = [], []
    with evaluating(clf):
        for batch in DataLoader(ds, batch_size=batch_size, shuffle=False):
            outs.append(clf(batch["image"].to(device)).float().cpu())
            ys.append(batch["y"])
    return torch.cat(ys).numpy(), torch.cat(outs).numpy()


def evaluate(clf: Classifier, ds: ImageDataset, device: str | torch.device = "cpu") -> dict:
    """Validation/test figures of ``clf`` on ``ds`` (see :mod:`nemt.models.metrics`)."""
    y, out = predict_outputs(clf, ds, device=device)
    return classification_metrics(clf.task, y, out, clf.label_names)


def _split_rows(manifest: Manifest, splits: dict[str, np.ndarray]) -> list[list[str]]:
    """The rows of ``splits.csv`` (header first): index, image name, split, by index."""
    rows = sorted((int(i), name) for name, idx in splits.items() for i in idx)
    return [["index", "image", "split"]] + [[str(i), manifest.samples[i].name, name] for i, name in rows]


def _write_splits(path: Path, manifest: Manifest, splits: dict[str, np.ndarray]) -> None:
    with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(_split_rows(manifest, splits))


def _check_splits(path: Path, manifest: Manifest, splits: dict[str, np.ndarray]) -> None:
    """Raise if ``path`` exists and holds another split than ``splits`` (the resumed run's own)."""
    if not path.is_file():
        return
    with open(path, newline="", encoding="utf-8") as fh:
        found = list(csv.reader(fh))
    want = _split_rows(manifest, splits)
    if found != want:
        differ = sum(a != b for a, b in zip(found[1:], want[1:])) + abs(len(found) - len(want))
        raise NemtError(f"{path}: not the split of the run being resumed ({differ} of {len(want) - 1} rows "
                        "differ); the folder was changed since; use another --out or --fresh")


def _format(metrics: dict) -> str:
    keys = ("auroc_macro", "balanced_accuracy", "accuracy", "mae", "pearson_r")
    return " ".join(f"{k}={metrics[k]:.3f}" for k in keys if k in metrics)


@dataclass
class RunSetup:
    """What a training run starts from (see :func:`prepare_run`)."""

    splits: dict[str, np.ndarray]
    fingerprint: str
    state_path: Path
    run_key: dict
    state: dict | None  #: the resume point in ``out_dir`` (None: a new run)
    size: tuple[int, ...]
    channels: int
    pre: Preprocessing  #: with the training split's channel statistics
    ds: dict[str, ImageDataset]  #: train / val / test, every item read once already

    def card_data(self, manifest: Manifest, cfg: TrainConfig) -> dict:
        """The card's ``data``: the manifest, its checksum, the split, and the training images' acquisition
        (:func:`nemt.data.acquisition.summarise`: their extents, sampling rates and value ranges), which
        ``nemt explain`` and the service compare each input with."""
        train = self.ds["train"]
        return {"source": str(manifest.source), "kind": manifest.kind, "sha256": self.fingerprint,
                "split_seed": cfg.seed, "fractions": list(cfg.fractions),
                "n": {k: int(len(v)) for k, v in self.splits.items()},
                "acquisition": summarise([train.described[j] for j in train.indices])}


def prepare_run(manifest: Manifest, out_dir: Path, cfg: TrainConfig, *, fresh: bool, extra_key: dict | None = None,
                check: Callable[[dict[str, np.ndarray]], None] | None = None) -> RunSetup:
    """The split, the resume point and the data sets of a training run (plain or guided).

    Settings (``cfg`` and ``extra_key``), data and split are checked against the folder's resume point before
    anything in it changes; ``check(splits)`` may refuse the split (e.g. guided training without masks).
    """
    splits = split_indices(manifest, cfg.fractions, cfg.seed)
    for name in ("train", "val"):
        if len(splits[name]) == 0:
            raise NemtError(f"the {name} split is empty ({len(manifest.samples)} samples, fractions "
                            f"{list(cfg.fractions)}); add data or change the fractions")
    if check is not None:
        check(splits)
    fingerprint = manifest.fingerprint()
    state_path = Path(out_dir) / "state" / "last"
    run_key = json.loads(json.dumps({"config": cfg.to_dict(), **(extra_key or {}), "data": fingerprint,
                                     "task": manifest.task, "code": code_fingerprint()}))  # as stored and read back
    st = None
    if state_path.with_suffix(".json").is_file() and not fresh:
        st = load_state(state_path)
        if st["run_key"] != run_key:
            raise NemtError(f"{out_dir} holds a run with other {', '.join(differing_keys(st['run_key'], run_key))}; "
                            "use another --out or --fresh")
        _check_splits(Path(out_dir) / "splits.csv", manifest, splits)

    size = tuple(int(s) for s in cfg.size)
    first = read_sample(manifest, manifest.samples[int(splits["train"][0])])
    spatial = tuple(first.array.shape[1:])
    flat = len(spatial) == 3 and 1 in spatial  # a 2D image stored as a volume of one slice (X x Y x 1 NIfTI)
    hint = (f"; {first.path} is {'x'.join(map(str, spatial))}, a 2D image stored as a volume of one slice: save "
            "the images as 2D files (a 2D NIfTI, e.g. nibabel.squeeze_image, or PNG) to train a 2D model"
            if flat else "")
    if first.array.ndim - 1 != len(size):
        raise NemtError(f"images are {first.array.ndim - 1}D but the size (--size, TrainConfig.size) gives "
                        f"{len(size)} sizes {size}; give one size per spatial axis{hint}")
    if flat and any(n == 1 and s > 1 for n, s in zip(spatial, size)):
        raise NemtError(f"--size {'x'.join(map(str, size))} would stretch one slice into {max(size)}{hint}")
    # the first training image's channels: grey 1, colour 3, a signal's leads, a multi-sequence volume's
    # sequences; the others are converted to them where that is defined (grey <-> colour), else refused
    channels = cfg.channels or int(first.array.shape[0])
    pre = Preprocessing(size=size, channels=channels, scale=cfg.scale)
    ds = {k: ImageDataset(manifest, pre, splits[k]) for k in ("train", "val", "test")}
    read_every_item(ds)  # every image of every split (header, pixels, masks) before the first epoch
    pre.mean, pre.std = channel_stats(ds["train"])
    return RunSetup(splits, fingerprint, state_path, run_key, st, size, channels, pre, ds)



def train_classifier(manifest: Manifest, out_dir: str | Path, config: TrainConfig | None = None, *,
                     device: str | torch.device = "cpu", fresh: bool = False, progress: bool = True,
                     log: Callable[[str], None] | None = None,
                     init_from: str | Path | None = None) -> tuple[Classifier, dict]:
    """Train a classifier on ``manifest`` (see :func:`_train_classifier`); the global random generators,
    seeded inside for reproducible training, are handed back in the caller's states."""
    with preserved_rng():
        return _train_classifier(manifest, out_dir, config, device=device, fresh=fresh, progress=progress, log=log,
                                 init_from=init_from)


def check_init_model(init: Classifier, card: ModelCard, where: Path) -> None:
    """Raise unless ``init`` (a saved model) has the network that ``card`` (a new run's) describes: the same
    architecture and keywords, dimensions, channels, input size and labels, so its weights are a start."""
    mine, theirs = card.to_dict(), init.card.to_dict()
    for key in ("arch", "arch_kwargs", "spatial_dims", "in_channels", "input_size", "task", "label_names"):
        if mine.get(key) != theirs.get(key):
            raise NemtError(f"--init-from {where}: its {key} is {theirs.get(key)!r}, this run's {mine.get(key)!r}; "
                            "its weights can start only a run of the same network and outputs")


def _train_classifier(manifest: Manifest, out_dir: str | Path, config: TrainConfig | None = None, *,
                      device: str | torch.device = "cpu", fresh: bool = False, progress: bool = True,
                      log: Callable[[str], None] | None = None,
                      init_from: str | Path | None = None) -> tuple[Classifier, dict]:
    """Train a classifier on ``manifest``; return the best model (test figures in its card) and the history.

    See the module docstring for what is written to ``out_dir``. ``init_from``: a model folder (``nemt
    train``'s) whose weights start a new run instead of a random initialisation (to train on with a new
    schedule, e.g. more epochs, or on other data with the same labels); its network must be this run's
    (:func:`check_init_model`), and its weights' SHA-256 is part of the run (a resume with another
    start is refused) and of the card (``training.init_from``).
    """
    cfg = checked_config(config)
    if cfg.arch == "pantypes" and getattr(manifest, "task", None) != "multiclass":
        raise NemtError(f"--arch pantypes needs a multi-class task (each prototype belongs to one class), not "
                        f"{getattr(manifest, 'task', None)}")
    ctx = context(device)
    device = local_device(device, ctx)
    log = log or (lambda s: console.print(s, soft_wrap=True, highlight=False))
    if not ctx.main:
        log = lambda s: None  # noqa: E731 - rank 0 speaks for the run
    manifest.raise_problems()
    for warning in manifest.warnings:  # e.g. a class with very few images (a typo?)
        log(f"warning: {warning}")
    out_dir = Path(out_dir)
    seed_everything(cfg.seed)

    init = None
    if init_from is not None:
        init = load_model(init_from)  # card and weights checked
    run = prepare_run(manifest, out_dir, cfg, fresh=fresh,
                      extra_key=None if init is None else {"init_from": init.card.weights_sha256})
    splits, state_path, run_key, st = run.splits, run.state_path, run.run_key, run.state
    size, channels, pre, ds = run.size, run.channels, run.pre, run.ds

    y_all = manifest.labels_array()
    y_train = y_all[splits["train"]]
    target_scale = None
    if manifest.task == "regression":
        target_scale = {"mean": float(y_train.mean()), "std": float(max(y_train.std(), 1e-8))}
    card = ModelCard(
        arch=cfg.arch, arch_kwargs=sized_arch_kwargs(cfg.arch, cfg.arch_kwargs, size), spatial_dims=len(size),
        in_channels=channels,
        task=manifest.task, label_names=list(manifest.label_names), input_size=list(size),
        preprocessing=pre.to_dict(), target_scale=target_scale,
        data=run.card_data(manifest, cfg), training=cfg.to_dict(),
    )
    net = build_model(cfg.arch, spatial_dims=len(size), in_channels=channels, out_channels=card.out_channels,
                      **card.arch_kwargs)
    if init is not None:  # a resumed run's own weights replace these below
        check_init_model(init, card, Path(init_from))
        net.load_state_dict(init.net.state_dict())
        card.training["init_from"] = {"model": str(init_from), "weights_sha256": init.card.weights_sha256}
    # a model with loss terms of its own (Pantypes: KL, reconstruction, volume) adds them to the loss below
    auxiliary_loss = getattr(net, "auxiliary_loss", None)
    # a model with random draws of its own (Pantypes' latent noise) takes them from the micro-batch's key
    noise_key = getattr(net, "set_noise_key", None)
    clf = Classifier(net, card).to(device)
    loss_fn = _loss_fn(manifest.task, y_train, card.out_channels, cfg.class_weighting, device)
    opt = torch.optim.AdamW(clf.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # this rank's micro-batches, in an order fixed by the seed and the epoch (see nemt.distributed)
    loader = StepBatches(ds["train"], cfg.batch_size, seed=cfg.seed, accumulate=cfg.accumulate, ctx=ctx)
    n_micro = len(loader)
    n_steps = steps_per_epoch(n_micro, cfg.accumulate)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * n_steps,
                                                pct_start=0.15)

    ready_folder(ctx, out_dir, state_path, manifest, splits, new_run=st is None)
    start_epoch, best, history = resume(st, {"model": clf.net, "optimizer": opt, "scheduler": sched}, out_dir, log)

    net: nn.Module = clf.net
    if ctx.distributed:  # gradients averaged over the ranks once per optimiser step; batch-norm buffers from rank 0
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(clf.net, device_ids=[device] if device.type == "cuda" else None)
    with progress_bar(progress and ctx.main) as bar:
        task_id = bar.add_task("train", total=(cfg.epochs - start_epoch) * n_micro, info="")
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.time()
            loader.set_epoch(epoch)  # the epoch's order survives a resume
            clf.train()
            total, seen = 0.0, 0
            opt.zero_grad(set_to_none=True)
            for i, (index, batch) in enumerate(loader):
                x, y = batch["image"].to(device), batch["y"].to(device)
                last = (i + 1) % cfg.accumulate == 0 or i + 1 == n_micro
                with net.no_sync() if ctx.distributed and not last else contextlib.nullcontext():
                    if cfg.augment:  # drawn from the micro-batch's own generator: the same on any rank
                        x = augment_batch(x, batch_generator(cfg.seed, epoch, index))
                    if noise_key is not None:
                        noise_key(batch_seed(cfg.seed, epoch, index))
                    out = net(x)
                    if manifest.task == "regression":
                        loss = loss_fn(out.squeeze(1), (y - target_scale["mean"]) / target_scale["std"])
                    else:
                        loss = loss_fn(out, y)
                    if auxiliary_loss is not None:  # from this forward pass, which the model kept
                        loss = loss + auxiliary_loss(y, pre)
                    (loss / cfg.accumulate).backward()
                if last:
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                total += loss.item() * len(x)
                seen += len(x)
                bar.update(task_id, advance=1, description=f"epoch {epoch + 1}/{cfg.epochs}",
                           info=f"loss {total / seen:.4f}")
            total, seen = all_reduce_sum([total, seen], ctx)
            if ctx.main:  # rank 0 validates, keeps the best checkpoint and writes the resume point
                val = evaluate(clf, ds["val"], device)
                score = score_for_selection(manifest.task, val)
                improved = score > best
                if improved:
                    best = score
                    clf.card.metrics = {"val": val, "best_epoch": epoch + 1}
                    clf.save(out_dir)
                history.append({"epoch": epoch + 1, "train_loss": total / max(seen, 1), "val": val,
                                "seconds": round(time.time() - t0, 2)})
                save_state(state_path, {"run_key": run_key, "epoch": epoch + 1, "best": best, "history": history,
                                        "model": clf.net.state_dict(), "optimizer": opt.state_dict(),
                                        "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state()})
                write_json(out_dir / "history.json", history)
                log(f"epoch {epoch + 1}/{cfg.epochs} loss {total / max(seen, 1):.4f} val {_format(val)}"
                    f"{' *' if improved else ''} ({time.time() - t0:.1f}s)")
            ctx.barrier()

    if not ctx.main:
        return clf, {"history": history, "metrics": {}}
    return finish_run(out_dir, ds, history, device, log)


def ready_folder(ctx, out_dir: Path, state_path: Path, manifest: Manifest, splits: dict, *, new_run: bool) -> None:
    """Rank 0 readies a training run's folder, the other ranks wait for it: a new run (or --fresh) gets its
    split, written once, and no resume point, model or history of an earlier run; a resumed one its split if it
    is missing."""
    if ctx.main and new_run:
        out_dir.mkdir(parents=True, exist_ok=True)
        for suffix in (".json", ".safetensors"):  # the JSON first: a lone .safetensors is no resume point
            state_path.with_suffix(suffix).unlink(missing_ok=True)
        # an earlier run's model and history go too (--fresh): killed before its first checkpoint, a new run
        # would leave them beside its own split, and they would pass for a model of that split
        for name in ("model.json", "model.safetensors", "history.json"):
            (out_dir / name).unlink(missing_ok=True)
        _write_splits(out_dir / "splits.csv", manifest, splits)
    elif ctx.main and not (out_dir / "splits.csv").is_file():
        _write_splits(out_dir / "splits.csv", manifest, splits)
    ctx.barrier()  # the other ranks start once the folder is ready


def resume(st: dict | None, parts: dict, out_dir: Path, log: Callable[[str], None]) -> tuple[int, float, list]:
    """(start epoch, best score, history) of a run: from its resume point ``st`` (each of ``parts``, a
    module, optimiser or scheduler by its key in ``st``, and the global torch RNG restored), or a new run's."""
    if st is None:
        return 0, -math.inf, []
    for key, part in parts.items():
        part.load_state_dict(st[key])
    torch.set_rng_state(st["torch_rng"])
    log(f"resuming {out_dir} after epoch {st['epoch']} (best {st['best']:.4f})")
    return st["epoch"], st["best"], st["history"]


def finish_run(out_dir: Path, ds: dict[str, ImageDataset], history: list[dict], device,
               log: Callable[[str], None]) -> tuple[Classifier, dict]:
    """The best checkpoint of a finished run, its test figures added to its card: (classifier, result)."""
    best_clf = load_model(out_dir, device=device)
    metrics = dict(best_clf.card.metrics)
    if len(ds["test"]):
        metrics["test"] = evaluate(best_clf, ds["test"], device)
        log(f"test ({len(ds['test'])} images): {_format(metrics['test'])}")
    best_clf.card.metrics = metrics
    best_clf.card.save(out_dir / "model.json")
    return best_clf, {"history": history, "metrics": metrics}


def load_splits(model_dir: str | Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """The train/val/test indices a model was trained with (its ``splits.csv``), checked against ``manifest``.

    Falls back to recomputing the split from the card's seed and fractions
    when the file is absent (same manifest and seed give the same split).
    The manifest must be the model's data: the same task and label names in the same order (a data set
    opened without the model's label set may number its classes otherwise), and every row of
    ``splits.csv`` must name the manifest's sample at its index; each sample is in one split at most.
    """
    model_dir = Path(model_dir)
    if not isinstance(manifest, Manifest):
        raise ArgumentTypeError(f"manifest must be a Manifest (nemt.data.open_dataset), got {type(manifest).__name__}")
    if not model_dir.is_dir():
        raise CardError(model_dir, None, "no such model folder" if not model_dir.exists() else
                        "not a folder; give the model folder (model.json, model.safetensors, splits.csv)")
    path = model_dir / "splits.csv"
    card_path = model_dir / "model.json"
    card = ModelCard.load(card_path) if card_path.is_file() or not path.is_file() else None
    if card is not None:
        _check_data_of_model(card, card_path, manifest)
    if not path.is_file():
        return split_indices(manifest, card.data.get("fractions", (0.7, 0.1, 0.2)), card.data.get("split_seed", 0))
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    seen: dict[int, str] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("index", "image", "split") if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(path, ",".join(missing), f"column missing (columns are {reader.fieldnames}); "
                            "a model folder's splits.csv has index, image, split")
        for line, row in enumerate(reader, start=2):
            try:
                i = int(row["index"])
            except (TypeError, ValueError):
                raise DataError(path, "index", f"row {line}: {row['index']!r} is not a whole number") from None
            if row["split"] not in out:
                raise DataError(path, "split", f"row {line}: {row['split']!r} is not one of {list(out)}")
            if not 0 <= i < len(manifest.samples) or manifest.samples[i].name != row["image"]:
                raise ParameterError(f"{path}: row for {row['image']!r} does not match the data set "
                                f"({len(manifest.samples)} samples); is this the data the model was trained on?")
            if i in seen:
                raise DataError(path, "index", f"row {line}: sample {i} ({row['image']!r}) is in the {seen[i]} "
                                f"split already; a sample in two splits would leak between them")
            seen[i] = row["split"]
            out[row["split"]].append(i)
    return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}


def _check_data_of_model(card: ModelCard, card_path: Path, manifest: Manifest) -> None:
    """Refuse a manifest whose task or label names (names and order: the outputs' numbering) are not the
    model's: its items' ``y`` would count classes another way than the model's outputs."""
    if manifest.task != card.task:
        raise ParameterError(f"{manifest.source}: the data set's task is {manifest.task}, the model's ({card_path}) is "
                        f"{card.task}; is this the data the model was trained on?")
    if card.task != "regression" and list(manifest.label_names) != list(card.label_names):
        hint = (f"; open it with the model's label set: open_dataset(..., labels={list(card.label_names)})"
                if card.task == "multiclass" and sorted(manifest.label_names) == sorted(card.label_names) else
                "; is this the data the model was trained on?")
        raise ParameterError(f"{manifest.source}: the data set's labels are {list(manifest.label_names)}, the model's "
                        f"({card_path}) are {list(card.label_names)}{hint}")
