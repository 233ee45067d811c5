"""The ``nemt`` command line: thin, it only parses and calls the packages."""
from __future__ import annotations

import errno
import functools
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.table import Table

from nemt.errors import SEED_MAX, NemtError
from nemt.progress import console, progress_bar

app = typer.Typer(help="nemt: fast, verifiable explanations for medical image models.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Inspect and make data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _version(value: bool) -> None:
    if value:
        from nemt import __version__
        typer.echo(f"nemt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print nemt's version and exit")) -> None:
    """nemt: fast, verifiable explanations for medical image models."""

TaskOpt = typer.Option(None, help="multiclass | multilabel | regression (default: from the data)")
MaxPixelsOpt = typer.Option(None, "--max-pixels", min=1,
                            help="largest image to decode, in pixels (voxels, all frames), e.g. 1e9; a file "
                                 "declaring more is refused from its header [default: 2.56e8, 256 Mpx]")


SuperpixelifyOpt = typer.Option(None, "--superpixelify", help="average each map within segments of its image: "
                                "a folder written by `nemt clusters --out` (the model's activation clusters), nas:K "
                                "(K neuro-activated superpixels per image) or slic:N (SLIC, N segments)")


def _friendly(fn: Callable) -> Callable:
    """Print nemt's own errors as one clear line and exit 2, instead of a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NemtError as exc:
            console.print(f"[red]error:[/red] {exc}", highlight=False, markup=True)
            raise typer.Exit(2)
        except OSError as exc:  # a read-only, full or forbidden output folder: one line, not a traceback
            if not isinstance(exc, PermissionError) and exc.errno not in _WRITE_ERRNOS:
                raise
            console.print(f"[red]error:[/red] {_write_error(exc)}", highlight=False, markup=True)
            raise typer.Exit(2)
    return wrapper


_WRITE_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _write_error(exc: OSError) -> str:
    """``cannot write PATH: reason`` for an OSError (``cannot access`` for a permission error, which may come
    from reading); a temporary file of :func:`nemt.files.atomic_path` (``.NAME.HEX.tmp``) is named by the file
    it stands for."""
    name = exc.filename
    if name is not None:
        path = Path(name)
        parts = path.name.split(".")
        if path.name.startswith(".") and path.name.endswith(".tmp") and len(parts) >= 4:
            name = path.parent / ".".join(parts[1:-2])
    reason = exc.strerror or str(exc)
    verb = "cannot access" if isinstance(exc, PermissionError) else "cannot write"
    return f"{verb} {name}: {reason}" if name is not None else f"{verb} the output: {reason}"


def _device(value: str, option: str = "--device") -> str:
    """``--device`` checked before anything runs: a torch device string whose device exists here."""
    import torch
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise NemtError(f"{option} {value!r}: not a torch device; expected cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None
                   else "no GPU is visible")
            raise NemtError(f"{option} {value}: no CUDA device is available here ({why}); use {option} cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise NemtError(f"{option} {value}: there are only {count} CUDA devices here (cuda:0 to "
                            f"cuda:{count - 1})")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise NemtError(f"{option} {value}: no MPS device is available here (Apple silicon only); "
                            f"use {option} cpu")
    elif dev.type != "cpu":  # another accelerator (e.g. xpu) only where torch has one
        available = getattr(getattr(torch, dev.type, None), "is_available", None)
        if not (callable(available) and available()):
            raise NemtError(f"{option} {value!r}: no such device here; expected cpu, cuda, cuda:N or mps")
    return value


def _out_dir(path: Path, option: str = "--out") -> Path:
    """An output folder: refused when it is an existing file (before anything is computed)."""
    if path.exists() and not path.is_dir():
        raise NemtError(f"{option} {path} is a file, not a folder")
    return path


def _out_file(path: Path, option: str = "--out") -> Path:
    """An output file: refused when it is an existing folder (before anything is computed)."""
    if path.is_dir():
        raise NemtError(f"{option} {path} is a folder, not a file; give a file name in it")
    return path


def _finite_positive(value: Optional[float]) -> Optional[float]:
    """Typer callback: a finite number > 0 (None stays None): a limit, not nan or inf."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value:g} is not a finite number > 0")
    return value


def _positive(value: Optional[float]) -> Optional[float]:
    """Typer callback: a finite number that must be > 0 (None stays None; inf, e.g. a learning rate, is refused)."""
    if value is not None and not 0 < value < float("inf"):
        raise typer.BadParameter(f"{value:g} is not a finite number > 0")
    return value


def _open_fraction(value: Optional[float]) -> Optional[float]:
    """Typer callback: a fraction strictly between 0 and 1 (None stays None)."""
    if value is not None and not 0 < value < 1:
        raise typer.BadParameter(f"{value:g} is not strictly between 0 and 1")
    return value


def _method_params(items: list[str]) -> dict:
    """``explain --param``: KEY=VALUE keywords; ``seed`` replaces --seed, ``device`` and ``path`` are refused."""
    from nemt.params import parse_params, refuse_reserved
    params = parse_params(items)
    refuse_reserved(params)
    return params


def _metric_workers(value: int | None) -> int:
    """The command line is an entry point: it may spread the metrics over torch's threads (the library never does)."""
    import torch
    return torch.get_num_threads() if value is None else max(0, int(value))


def _shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    i, sep, n = value.partition("/")
    if not sep or not i.strip().isdigit() or not n.strip().isdigit() or not 0 <= int(i) < int(n):
        raise NemtError(f"--shard {value!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(i), int(n)


def _csv_list(value: Optional[str]) -> Optional[list[str]]:
    """A comma-separated option as a list: blanks dropped, a repeated item kept once (in its first place)."""
    return list(dict.fromkeys(v.strip() for v in value.split(",") if v.strip())) if value else None


def _floats(value: str, option: str) -> list[float]:
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise NemtError(f"{option}: expected comma-separated numbers, got {value!r}") from None


def _ints(value: str, option: str) -> list[int]:
    """Comma-separated positive integers, e.g. ``--decoder-channels 128,64,32``."""
    try:
        parts = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        parts = []
    if not parts or min(parts) < 1:
        raise NemtError(f"{option} {value!r}: expected comma-separated positive integers")
    return parts


def _size(value: str, spatial_dims: int | None = None) -> tuple[int, ...]:
    try:
        parts = [int(v) for v in value.lower().replace("x", ",").split(",")]  # "32x" or "32,,32": refused
    except ValueError:
        parts = []
    if not parts or min(parts) < 1:
        raise NemtError(f"--size {value!r}: expected positive integers, e.g. 128, 128x96 or 64x64x64")
    if len(parts) == 1 and spatial_dims:
        parts = parts * spatial_dims
    return tuple(parts)


def _data_dims(manifest) -> int:
    """The spatial axes of a data set's first image (1 signal, 2 image, 3 volume): ``--dims`` when neither it
    nor a multi-part ``--size`` says; 2 for an empty manifest (its own checks refuse it)."""
    if not manifest.samples:
        return 2
    from nemt.data.dataset import read_sample
    return read_sample(manifest, manifest.samples[0]).array.ndim - 1


def _open(path: Path, task, labels, image_col=None, label_col=None, label_cols=None, target_col=None,
          mask_col=None, group_col=None, max_pixels: float | None = None):
    from nemt.data.manifest import open_dataset
    opts = dict(task=task, labels=_csv_list(labels), image_col=image_col, label_col=label_col,
                label_cols=_csv_list(label_cols), target_col=target_col, mask_col=mask_col, group_col=group_col)
    return open_dataset(path, max_pixels=None if max_pixels is None else int(max_pixels),
                        **{k: v for k, v in opts.items() if v is not None})


@data_app.command("check")
@_friendly
def data_check(
    path: Path = typer.Argument(..., help="manifest.csv, a folder with one, a class-per-folder tree, or a MedMNIST .npz"),
    task: Optional[str] = TaskOpt,
    labels: Optional[str] = typer.Option(None, help="the label set, comma-separated (others are errors)"),
    label_cols: Optional[str] = typer.Option(None, help="multi-label 0/1 columns, comma-separated"),
    target_col: Optional[str] = typer.Option(None, help="numeric target column (regression)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the report as JSON here"),
    max_pixels: Optional[float] = MaxPixelsOpt,
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """Read every image and mask; print a summary and every bad entry. Exit 1 if anything is fatal."""
    from nemt.data.check import check_dataset
    from nemt.files import json_safe, write_json

    if json_out is not None:
        _out_file(json_out, "--json")
    manifest = _open(path, task, labels, label_cols=label_cols, target_col=target_col, max_pixels=max_pixels)
    with progress_bar(progress) as bar:
        tid = bar.add_task("reading", total=len(manifest.samples), info="")
        rep = check_dataset(manifest, progress=lambda k: bar.update(tid, advance=k))
    table = Table(title=f"{path}  ({rep.task})", show_header=False)
    # readable images; where a fatal problem left some out, "of" the manifest's rows (its warnings count those)
    def _of(n: int, listed: int) -> str:
        return str(n) if n == listed else f"{n} readable of {listed} listed"

    table.add_row("images", _of(rep.n_images, rep.listed))
    for name, n in rep.per_label.items():
        table.add_row(f"  {name}", _of(n, rep.listed_per_label.get(name, n)))
    if rep.target_range:
        table.add_row("target range", f"{rep.target_range[0]:g} .. {rep.target_range[1]:g}")
    sizes = ", ".join(f"{'x'.join(map(str, k))} ({v})" for k, v in rep.sizes.most_common(5))
    more = len(rep.sizes) - 5
    table.add_row("sizes", sizes + (f", and {more} other sizes" if more > 0 else ""))
    table.add_row("channels", ", ".join(f"{k} ({v})" for k, v in sorted(rep.channels.items())))
    table.add_row("modalities", ", ".join(f"{k} ({v})" for k, v in rep.modalities.items()))
    acq = rep.acquisition  # what a model's card would record (explain compares inputs with it)
    table.add_row("value ranges", ", ".join(f"{k} ({v})" for k, v in acq.get("range_from", {}).items()))
    if acq.get("extent"):
        ext = acq["extent"]
        table.add_row("field of view", " x ".join(f"{lo:g}-{hi:g}" for lo, hi in zip(ext["min"], ext["max"]))
                      + f" (median {' x '.join(f'{v:g}' for v in ext['median'])}; {ext['n']} of {acq['n']} "
                      "images give a spacing)")
    if acq.get("fs"):
        table.add_row("sampling rate", f"{acq['fs']['min'][0]:g}-{acq['fs']['max'][0]:g} Hz")
    table.add_row("with ground truth", str(rep.with_gt))
    table.add_row("masks / non-empty", f"{rep.masks} / {rep.nonempty_masks}")
    table.add_row("with boxes", str(rep.with_boxes))
    table.add_row("fatal problems", str(len(rep.fatal)))
    table.add_row("warnings", str(len(rep.warnings)))
    console.print(table)
    for e in rep.fatal:
        console.print(f"[red]FATAL[/red] {e}", highlight=False)
    for e in rep.warnings:
        console.print(f"[yellow]warning[/yellow] {e}", highlight=False)
    # the headline figures also go to stdout, for scripts
    typer.echo(json.dumps(json_safe({"images": rep.n_images, "per_label": rep.per_label, "listed": rep.listed,
                                     "nonempty_masks": rep.nonempty_masks, "fatal": len(rep.fatal),
                                     "warnings": len(rep.warnings)}), allow_nan=False))
    if json_out:
        write_json(json_out, rep.to_dict())
    if not rep.ok:
        raise typer.Exit(1)


@data_app.command("phantoms")
@_friendly
def data_phantoms(
    folder: Optional[Path] = typer.Argument(None, help="folder to write images/, masks/ and manifest.csv into "
                                            "(or --out, as `data ecg` takes it)", show_default=False),
    out_option: Optional[Path] = typer.Option(None, "--out", help="the same folder as an option"),
    n: int = typer.Option(400, min=1, help="number of images"),
    size: int = typer.Option(128, min=1, help="edge length in pixels/voxels"),
    spatial_dims: int = typer.Option(2, "--dims", help="2 or 3"),
    task: str = typer.Option("multiclass", help="multiclass | multilabel | regression"),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="random seed"),
    overwrite: bool = typer.Option(False, help="replace a phantom set of other settings in the folder (its files "
                                   "removed first); another data set there is always refused"),
) -> None:
    """Write a synthetic phantom data set with lesion masks (the built-in default data)."""
    from nemt.data.phantoms import write_phantom_dataset
    if folder is None and out_option is None:
        raise typer.BadParameter("give the output folder, as an argument or as --out", param_hint="OUT")
    if folder is not None and out_option is not None and folder != out_option:
        raise typer.BadParameter(f"two output folders, {folder} and {out_option}; give one", param_hint="--out")
    out = folder if folder is not None else out_option
    _out_dir(out, "OUT")
    manifest = write_phantom_dataset(out, n, size, spatial_dims=spatial_dims, task=task, seed=seed,
                                     overwrite=overwrite)
    typer.echo(str(manifest))


@data_app.command("gaze")
@_friendly
def data_gaze(
    path: Path = typer.Argument(..., help="the data set: manifest.csv, a folder with one, or a class-per-folder tree"),
    simulate: bool = typer.Option(False, "--simulate", help="simulate fixations: mostly on the finding masks, "
                                  "the rest on an anatomy prior with a centre bias; normal images anatomy only"),
    gaze: Optional[Path] = typer.Option(None, "--gaze", help="a real fixation CSV (image,x,y,duration; EGD's "
                                        "fixations.csv reads as it is) to check against the data and install"),
    out: Optional[Path] = typer.Option(None, help="fixation CSV to write [default: gaze.csv beside the manifest, "
                                       "where nemt benchmark finds it]"),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="random seed of the simulation"),
    fixations: float = typer.Option(40.0, callback=_positive,
                                    help="mean number of simulated fixations per image (Poisson; at most 10000)"),
    p_finding: float = typer.Option(0.7, min=0, max=1, help="share of simulated fixations inside the finding's mask"),
    max_pixels: Optional[float] = MaxPixelsOpt,
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """Give a data set eye gaze: simulated (--simulate) or real (--gaze FILE); the benchmark then scores KL and NSS."""
    from nemt.data.gaze import MAX_FIXATIONS, check_gaze, default_gaze_path, simulate_gaze, write_fixations

    if simulate == (gaze is not None):
        raise NemtError("nemt data gaze: give exactly one of --simulate and --gaze FILE")
    if simulate and fixations > MAX_FIXATIONS:
        raise NemtError(f"--fixations {fixations:g}: at most {MAX_FIXATIONS} mean fixations per image (a reading "
                        "has tens to a few hundred)")
    if out is not None:
        _out_file(out)
    manifest = _open(path, None, None, max_pixels=max_pixels)
    manifest.raise_problems()
    target = out or default_gaze_path(manifest)
    if out is None and not (target.parent.stat().st_mode & 0o222):  # no write bit: shared data, even for root
        raise NemtError(f"{target.parent}: the data folder is read-only (no write permission bits); nothing was "
                        "written: give --out FILE elsewhere and pass it to nemt benchmark --gaze")
    if simulate:
        with progress_bar(progress) as bar:
            tid = bar.add_task("gaze", total=len(manifest.samples), info="")
            table = simulate_gaze(manifest, seed=seed, n_fixations=fixations, p_finding=p_finding,
                                  progress=lambda k: bar.update(tid, advance=k))
        unknown: list[str] = []
        ambiguous: dict[str, list[str]] = {}
        with_gaze = len(table)
    else:  # every row checked, and every fixation of a matched image inside it, before anything is written
        table, match = check_gaze(manifest, gaze)
        unknown, ambiguous, with_gaze = match.unknown, match.ambiguous, len(match.matched)
        for name in unknown[:10]:
            console.print(f"[yellow]warning[/yellow] {gaze}: image {name!r} is not a sample of {path}; "
                          "its fixations are ignored", highlight=False)
        for name, keys in list(ambiguous.items())[:10]:
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            console.print(f"[yellow]warning[/yellow] {gaze}: image {name!r} is ambiguous: it names {len(keys)} "
                          f"samples of {path} ({', '.join(keys[:5])}{more}); name it by its path in the manifest; "
                          "its fixations are ignored", highlight=False)
    if gaze is None or Path(gaze).resolve() != Path(target).resolve():
        try:
            write_fixations(target, table)
        except OSError as exc:  # e.g. a read-only shared data folder
            raise NemtError(f"{target}: cannot write the fixation file ({exc.strerror or exc}); "
                            "give --out FILE elsewhere and pass it to nemt benchmark --gaze") from None
    n_fix = int(sum(len(v) for v in table.values()))
    typer.echo(json.dumps({"gaze": str(target), "images": len(manifest.samples),
                           "images_with_gaze": with_gaze, "fixations": n_fix,
                           "unknown_images": len(unknown), "ambiguous_images": len(ambiguous)}))


@data_app.command("ecg")
@_friendly
def data_ecg(
    out: Path = typer.Option(..., help="folder to write signals/, findings/, waves/ and manifest.csv into"),
    n: int = typer.Option(500, help="number of records (classes in turn: normal, inverted_t, wide_qrs, "
                          "st_elevation, afib)"),
    leads: int = typer.Option(1, help="1 (lead II) or 12"),
    fs: float = typer.Option(100.0, min=50, help="sampling rate, Hz (at least 50: a QRS complex of 0.1 s "
                             "spans 5 samples)"),
    duration: float = typer.Option(10.0, min=2, help="seconds per record (at least 2: one whole beat at the "
                                   "slowest rate drawn, 55/min)"),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="random seed"),
    overwrite: bool = typer.Option(False, help="replace an ECG set of other settings in the folder (its files "
                                   "removed first); another data set there is always refused"),
) -> None:
    """Write synthetic ECGs with exact wave labels; train on them with --dims 1 --size <samples>."""
    from nemt.data.ecg import write_ecg_dataset
    _out_dir(out)
    typer.echo(str(write_ecg_dataset(out, n, leads=leads, fs=fs, duration=duration, seed=seed,
                                     overwrite=overwrite)))


def _arch_kwargs(arch: str, items: list[str], size: tuple) -> dict:
    """``--arch-param`` as keyword arguments, refused before anything is written if the architecture rejects them
    or ``--size`` does not survive its downsampling (:func:`nemt.models.training.probe_network`)."""
    from nemt.models.training import probe_network
    from nemt.params import parse_params

    kwargs = parse_params(items)
    probe_network(arch, kwargs, tuple(size), kwargs_name=f"--arch-param {' '.join(items)}", size_name="--size",
                  size_label="x".join(map(str, size)))
    return kwargs


def _guide_config(guide: str | None, **options):
    """``nemt train``'s guide options as a checked :class:`~nemt.models.guided.GuideConfig` (None without
    --guide), before anything is read: an option of the guide not chosen (or given without --guide) is refused
    by name, as it would be ignored (and yet recorded)."""
    from nemt.models.guided import GUIDE_FIELDS, GUIDES, GuideConfig

    if guide is not None and guide not in GUIDES:
        raise NemtError(f"--guide must be one of {', '.join(GUIDES)}, got {guide!r}")
    for name, value in options.items():
        kind = next(k for k, names in GUIDE_FIELDS.items() if name in names)
        if value is not None and guide != kind:
            run = "this run has no --guide" if guide is None else f"this run is --guide {guide}"
            raise NemtError(f"--{name.replace('_', '-')} is an option of --guide {kind}; {run}: leave it out")
    if guide is None:
        return None
    cfg = GuideConfig(kind=guide, **{k: v for k, v in options.items() if v is not None})
    cfg.check()
    return cfg


@app.command()
@_friendly
def train(
    data: Path = typer.Option(..., help="data set: manifest.csv, folder or MedMNIST .npz"),
    out: Path = typer.Option(..., help="output folder (model, card, splits, history, resume state)"),
    arch: str = typer.Option("resnet18", help="resnet10 | resnet18 | resnet34 | resnet50 | densenet121 | smallcnn "
                                              "(MONAI's, 1D/2D/3D) | linear | mlp | cnn (XAI-TRIS) | pantypes (2D)"),
    arch_param: list[str] = typer.Option([], "--arch-param", help="KEY=VALUE keyword of the architecture, "
                                         "repeatable (e.g. width=8 for smallcnn; kept in the card)"),
    task: Optional[str] = TaskOpt,
    size: str = typer.Option("128", help="input size: 128, 128x96 or 64x64x64"),
    spatial_dims: Optional[int] = typer.Option(None, "--dims", help="1 (signals), 2 or 3 (default: from --size, "
                                               "else the data's first image)"),
    epochs: int = typer.Option(30, min=1, help="epochs"),
    batch_size: int = typer.Option(32, min=1, help="batch size (per process under torchrun)"),
    accumulate: int = typer.Option(1, min=1, help="micro-batches per optimiser step (per process under torchrun: "
                                   "N processes with --accumulate A take 1 process's steps with N*A; dropout and "
                                   "batch-norm statistics differ: docs/guide.md)"),
    lr: float = typer.Option(1e-3, callback=_positive, help="peak learning rate (one-cycle schedule)"),
    weight_decay: float = typer.Option(1e-4, min=0, help="AdamW weight decay"),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="seed for split, initialisation, order and augmentation"),
    fractions: str = typer.Option("0.7,0.1,0.2", help="train,val,test fractions"),
    augment: bool = typer.Option(True, help="random flip, affine and intensity jitter"),
    class_weighting: bool = typer.Option(True, help="weight the loss by inverse class frequency"),
    scale: str = typer.Option("range", help="range (uint8/16: full range; DICOM: window; else own min..max) or minmax"),
    channels: Optional[int] = typer.Option(None, min=1, help="the model's input channels (default: the first "
                                           "training image's: 1 grey, 3 colour, 12 for 12-lead ECGs; 1 trains on "
                                           "colour images as grey)"),
    labels: Optional[str] = typer.Option(None, help="the label set, comma-separated"),
    label_cols: Optional[str] = typer.Option(None, help="multi-label 0/1 columns"),
    target_col: Optional[str] = typer.Option(None, help="numeric target column"),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda:0"),
    fresh: bool = typer.Option(False, help="ignore a resume state in --out and start over"),
    init_from: Optional[Path] = typer.Option(None, help="a model folder whose weights start this run (same "
                                             "network and labels; e.g. to train on with more epochs into a new "
                                             "--out); recorded in the card"),
    max_pixels: Optional[float] = MaxPixelsOpt,
    progress: bool = typer.Option(True, help="show a progress bar"),
    guide: Optional[str] = typer.Option(None, help="explanation-guided training: mimic (M copies and a "
                                        "discriminator of their explanations, Watson et al. 2023) or mask "
                                        "(penalise input gradients outside the lesion masks, Ross et al. 2017)"),
    copies: Optional[int] = typer.Option(None, min=2, help="--guide mimic: copies of --arch trained together "
                                         "[default: 3]"),
    beta: Optional[float] = typer.Option(None, help="--guide mimic: weight of the discriminator's cross-entropy "
                                         "[default: 1]"),
    mask_weight: Optional[float] = typer.Option(None, help="--guide mask: weight of the right-reasons penalty "
                                                "[default: 1]"),
    mask_penalty: Optional[str] = typer.Option(None, help="--guide mask: fraction (share of the squared input "
                                               "gradient outside the mask) or ross (its sum, Ross et al.'s eq. 1) "
                                               "[default: fraction]"),
) -> None:
    """Train a classifier to explain. Re-run the same command to resume an interrupted run."""
    from nemt.files import json_safe
    from nemt.models.training import TrainConfig, train_classifier

    gcfg = _guide_config(guide, copies=copies, beta=beta, mask_weight=mask_weight, mask_penalty=mask_penalty)
    if guide is not None and init_from is not None:
        raise NemtError("--init-from starts a plain run; guided training (--guide) trains its copies from scratch")
    device = _device(device)
    _out_dir(out)
    _size(size)  # a bad --size or --fractions is refused before the data are read
    split_fractions = tuple(_floats(fractions, "--fractions"))
    manifest = _open(data, task, labels, label_cols=label_cols, target_col=target_col, max_pixels=max_pixels)
    dims = spatial_dims or (len(_size(size)) if len(_size(size)) > 1 else _data_dims(manifest))
    cfg = TrainConfig(arch=arch, size=_size(size, dims), epochs=epochs, batch_size=batch_size, lr=lr,
                      weight_decay=weight_decay, seed=seed,
                      fractions=split_fractions, augment=augment,
                      class_weighting=class_weighting, scale=scale, accumulate=accumulate, channels=channels,
                      arch_kwargs=_arch_kwargs(arch, arch_param, _size(size, dims)))
    if gcfg is not None:  # the guided loop (nemt.models.guided) writes the same folder
        from nemt.models.guided import train_guided
        clf, result = train_guided(manifest, out, cfg, gcfg, device=device, fresh=fresh, progress=progress)
    else:
        clf, result = train_classifier(manifest, out, cfg, device=device, fresh=fresh, progress=progress,
                                       init_from=init_from)
    from nemt.distributed import context
    if not context().main:  # under torchrun rank 0 reports
        return
    typer.echo(json.dumps(json_safe({"model": str(out), "metrics": result["metrics"]}), indent=2, allow_nan=False))


@app.command()
@_friendly
def fit(
    model: Path = typer.Option(..., help="model folder written by `nemt train`"),
    data: Path = typer.Option(..., help="the data set the model was trained on"),
    out: Path = typer.Option(..., help="explainer folder (weights, card, resume state)"),
    epochs: int = typer.Option(10, min=1, help="epochs"),
    batch_size: int = typer.Option(16, min=1, help="batch size (per process under torchrun)"),
    accumulate: int = typer.Option(1, min=1, help="gradient accumulation steps (per process under torchrun: N processes "
                                   "with --accumulate A take 1 process's steps with N*A; the decoder's batch-norm "
                                   "statistics are rank 0's: docs/guide.md)"),
    optimizer: str = typer.Option("adamw", help="adamw | prodigy"),
    schedule: str = typer.Option("cosine", help="learning-rate schedule: cosine | constant"),
    lr: Optional[float] = typer.Option(None, callback=_positive, help="learning rate (default: 1 for Prodigy, 3e-3 for AdamW)"),
    objective: str = typer.Option("nested", help="nested (fixed-area masks, deletion and preservation games on "
                                  "log-odds; cannot collapse) | paper (the published loss; collapses on confident "
                                  "models)"),
    areas: str = typer.Option("0.01,0.025,0.05,0.1,0.2", help="nested: mask areas trained (fractions of the image)"),
    map_areas: str = typer.Option("0.01", help="nested: areas the map is the mean of ('train': --areas)"),
    games: str = typer.Option("both", help="nested: both | deletion | preservation"),
    min_scale: float = typer.Option(1.0, callback=_positive, help="nested: smallest evidence size (log-odds) the "
                                    "games normalise by (> 0)"),
    preservation_bound: float = typer.Option(2.0,
                                             help="nested: a preservation game lost by more than this "
                                             "(in units of the clean evidence) gives no gradient; inf: unbounded"),
    preservation_weight: float = typer.Option(0.5,
                                              help="nested: weight of the preservation game against the "
                                              "deletion game's 1"),
    targets_per_image: int = typer.Option(1, min=1, help="nested: targets trained per image and step"),
    present_fraction: float = typer.Option(0.5, help="nested: share of targets that are the image's own"),
    allow_collapse: bool = typer.Option(False, help="save the explainer even if the collapse guard fires"),
    occlusion: str = typer.Option("inpaint-or-mean-image", help="what deleted pixels become: mean | zero | blur | "
                                  "inpaint (both games fill by inpainting, so the preservation game keeps the mask "
                                  "on a constant; the default until 2026-11-29) | inpaint+blur (NEMt's games with "
                                  "both) | "
                                  "inpaint+blur-background (delete by inpainting, keep on the blurred image) | "
                                  "inpaint+mean-image (delete by inpainting, keep on the training images' pixel-wise "
                                  "mean) | inpaint+outpaint (keep, the rest filled from the kept pixels, far from "
                                  "them the mean image) | mean-image (delete by the training images' pixel-wise mean, "
                                  "keep on it) | inpaint-and-mean-image (NEMt's games with inpaint and with "
                                  "mean-image) | inpaint-or-mean-image (the default: delete by both, scored by the "
                                  "fill that removes more of the evidence; keep on the mean image)"),
    map_smoothing: bool = typer.Option(False, help="nested: smooth the map at explanation time (training always "
                                       "smooths its masks); the default --no-map-smoothing: the top --map-areas of "
                                       "the logits"),
    blur_sigma: Optional[float] = typer.Option(None, callback=_positive, help="blur / inpainting sigma in pixels, > 0 (default: 8 px at 128 px; 3D: 0.135 of the side, 4.3 voxels at 32³)"),
    quantity: str = typer.Option("prob", help="paper: target quantity: prob | logit | one_minus_prob"),
    area_weight: float = typer.Option(1.0, help="paper: weight of the deleted-area term"),
    change_weight: float = typer.Option(2.0, help="paper: weight of the squared target change"),
    area_target: Optional[float] = typer.Option(None, callback=_open_fraction, help="paper: explicit deleted-fraction "
                                                "target, strictly between 0 and 1"),
    kernel_size: Optional[int] = typer.Option(None, min=1, help="smoothing kernel side (default: 30 at 224 px for "
                                              "the nested objective's images and volumes, 13 at 96 px, 17 at 128; "
                                              "21 at 224 for the paper's objective; signals: 0.88 % of the samples)"),
    smoothing: bool = typer.Option(True, help="integrated smoothing operator"),
    init_keep: float = typer.Option(0.95, callback=_open_fraction, help="initial kept fraction of the mask head, "
                                    "strictly between 0 and 1 (the head starts at its log-odds)"),
    encoder: str = typer.Option("model", help="model (frozen model's stages) | own (model-agnostic)"),
    decoder_channels: str = typer.Option("128,64,32,16,8", help="decoder block widths, deepest first (the last "
                                         "one only with --full-resolution)"),
    full_resolution: bool = typer.Option(False, help="add a decoder block at the image's resolution (the first "
                                         "design; slower, same maps after smoothing)"),
    train_targets: Optional[str] = typer.Option(None, help="true | predicted | all (default by task)"),
    teacher: Optional[str] = typer.Option(None, help="train a student of this explainer instead (e.g. extremal, "
                                          "rise, kernelshap, occlusion, inpainting): its maps on the training "
                                          "split are computed once (cached in OUT/teacher, resumable) and learnt"),
    teacher_param: list[str] = typer.Option([], "--teacher-param", help="teacher parameter KEY=VALUE (repeatable), "
                                            "e.g. steps=30"),
    teacher_budget: Optional[int] = typer.Option(None, min=1, help="at most this many training images for the teacher "
                                                 "(a seeded draw)"),
    teacher_loss: str = typer.Option("bce", help="student loss: bce (per pixel) | kl (maps as distributions)"),
    teacher_flip: bool = typer.Option(False, help="student augmentation: mirror each image and its teacher map "
                                      "together (last axis) half the time; images and volumes only"),
    flip: bool = typer.Option(False, help="augmentation: mirror each training image (last axis) half the time "
                              "(nested and paper objectives; images and volumes only)"),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="random seed"),
    device: str = typer.Option("cpu", help="torch device"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """Train a NEMt explainer once for a frozen model (on the model's training split).

    After training, the collapse guard checks every target's maps on the validation split and exits
    with status 3, naming the targets, when more than half of a target's maps are empty or full.
    """
    from torch.utils.data import DataLoader

    from nemt.data.dataset import ImageDataset
    from nemt.explainers import NEMt
    from nemt.models import load_model
    from nemt.models.training import load_splits

    from nemt.distributed import context, local_device
    _out_dir(out)
    if area_target is not None and (objective != "paper" or teacher is not None):
        other = "a student (--teacher)" if teacher is not None else objective
        raise NemtError(f"--area-target applies to --objective paper only, not {other}: it would be ignored")
    decoder = _ints(decoder_channels, "--decoder-channels")
    ctx = context(_device(device))
    device = str(local_device(device, ctx))
    clf = load_model(model, device=device)
    # the options are checked (by NEMt) before the data set is read
    from nemt.params import parse_params
    if teacher is not None:
        objective = "teacher"
    explainer = NEMt(clf, objective=objective, areas=_floats(areas, "--areas"),
                     teacher=teacher, teacher_params=parse_params(teacher_param) or None,
                     teacher_budget=teacher_budget, teacher_loss=teacher_loss, teacher_flip=teacher_flip, flip=flip,
                     map_areas=None if map_areas == "train" else _floats(map_areas, "--map-areas"), games=games,
                     min_scale=min_scale,
                     preservation_bound=None if math.isinf(preservation_bound) else preservation_bound,
                     preservation_weight=preservation_weight,
                     targets_per_image=targets_per_image, present_fraction=present_fraction,
                     occlusion=occlusion, map_smoothing=map_smoothing, blur_sigma=blur_sigma, quantity=quantity,
                     area_weight=area_weight,
                     change_weight=change_weight, area_target=area_target, kernel_size=kernel_size,
                     smoothing=smoothing, init_keep=init_keep, encoder=encoder, train_targets=train_targets,
                     decoder_channels=decoder,
                     decoder_full_resolution=full_resolution, optimizer=optimizer, lr=lr, schedule=schedule,
                     batch_size=batch_size, accumulate=accumulate, epochs=epochs,
                     seed=seed, device=device)
    manifest = _open(data, clf.task, ",".join(clf.label_names) if clf.task == "multiclass" else None)
    manifest.raise_problems()
    from nemt.bench.runner import _say, other_data, other_data_warning
    other = other_data(clf, manifest.fingerprint())
    if other is not None and ctx.main:
        _say(other_data_warning(other, data, model, "train", manifest, doing="fitting the explainer on it anyway"))
    splits = load_splits(model, manifest)
    train_ds = ImageDataset(manifest, clf.preprocessing, splits["train"])
    val_ds = ImageDataset(manifest, clf.preprocessing, splits["val"])
    from nemt.explainers.nemt.estimator import CollapseError
    try:
        explainer.fit(train_ds, val_data=DataLoader(val_ds, batch_size=32), out_dir=out, progress=progress,
                      guard=not allow_collapse)
    except CollapseError as exc:
        console.print(f"[red]collapsed:[/red] {exc}", highlight=False, markup=True)
        raise typer.Exit(3)
    if not ctx.main:  # under torchrun rank 0 checks, saves and reports
        return
    typer.echo(json.dumps({"explainer": str(out), "history": explainer.history_,
                           "collapsed": explainer.collapse_["collapsed"]}, indent=2))


@app.command()
@_friendly
def explain(
    images: Optional[list[Path]] = typer.Argument(None, help="image files (PNG, JPEG, BMP, TIFF, DICOM, NIfTI) or "
                                                 "folders of one DICOM series each (a volume)"),
    model: Path = typer.Option(..., help="model folder"),
    explainer: Optional[Path] = typer.Option(None, help="NEMt explainer folder (for --method nemt)"),
    method: str = typer.Option("nemt", help="explainer name: nemt, gradcam, gradcam++, ig, gradshap, occlusion, "
                                              "rise, extremal, inpainting, ... (see `nemt methods`)"),
    target: str = typer.Option("all", help="a label name or index, 'predicted' or 'all'"),
    out: Path = typer.Option(..., help="output folder for overlays and raw maps"),
    data: Optional[Path] = typer.Option(None, help="explain a data set instead of files (the model's data: "
                                        "manifest, folder or .npz); resumable; under torchrun each rank takes "
                                        "a share and rank 0 writes the index"),
    split: Optional[str] = typer.Option(None, help="with --data: train | val | test | all (default: test)",
                                        show_default=False),
    limit: Optional[int] = typer.Option(None, min=1, help="with --data: at most this many items of the split (a "
                                        "later call with a larger --limit into the same --out adds the rest)"),
    param: list[str] = typer.Option([], "--param", help="method parameter KEY=VALUE (repeatable), e.g. n_masks=2000"),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="random seed (for stochastic methods)"),
    device: str = typer.Option("cpu", help="torch device"),
    max_pixels: Optional[float] = MaxPixelsOpt,
    progress: bool = typer.Option(True, help="with --data: show a progress bar"),
    superpixelify: Optional[str] = SuperpixelifyOpt,
    dicom: bool = typer.Option(False, "--dicom", help="also write each map over its 2D DICOM input as a DICOM "
                               "Secondary Capture (OUT/{image}__{label}.dcm: the source's size, study and "
                               "patient, a new series per method and label) for a PACS or DICOM viewer"),
) -> None:
    """Explain images: one overlay PNG per image and target, plus the raw maps (.npy, or NIfTI for 3D).

    With --data, every item of a split is explained (outputs named INDEX-STEM__TARGET, INDEX the item's row in
    the data set), each finished item is logged (OUT/log/rank-R.jsonl) so that a re-run skips it, and
    OUT/explanations.json lists every item explained in OUT. A re-run resumes the same model (by its weights'
    checksum, whatever its path), explainer, method, target, parameters, seed, data and split (a larger --limit
    adds the rest of the split); other settings into the same OUT are refused.
    """
    import numpy as np
    import torch

    from nemt.data.acquisition import input_notes
    from nemt.data.readers import map_nifti, read_image
    from nemt.distributed import context, local_device
    from nemt.explainers import get_explainer, resolve_targets
    from nemt.files import OutputNames, atomic_open, image_stem, label_file_parts, write_json
    from nemt.models import load_model
    from nemt.ops import label_or_index
    from nemt.params import blamed_on_params
    from nemt.visualize import save_overlay

    if (data is None) == (not images):
        raise NemtError("give image files or --data (one of the two)")
    if dicom and data is not None:
        raise NemtError("--dicom takes DICOM files as arguments, not --data (give the files)")
    if data is None:  # options of a data set's run: silently ignored for image files, so refused
        given_opts = [opt for opt, v in (("--split", split), ("--limit", limit)) if v is not None]
        if given_opts:
            raise NemtError(f"{' and '.join(given_opts)} appl{'ies' if len(given_opts) == 1 else 'y'} to --data "
                            "only (a split of a data set), not to image files: leave "
                            f"{'it' if len(given_opts) == 1 else 'them'} out")
    split = "test" if split is None else split
    if split not in ("train", "val", "test", "all"):
        raise NemtError(f"--split {split!r}: expected train, val, test or all")
    # every input read (and so checked: there, a regular file, decodable) before the model is loaded and before
    # any output: a bad second file must not leave the first's maps written without its predictions printed
    imgs = [read_image(path, max_pixels=None if max_pixels is None else int(max_pixels)) for path in images or []]
    if dicom:  # every input a 2D DICOM before any output (the model's dimensionality is checked once it is loaded)
        from nemt.deploy.dicom import dicom_problem, overlay_at_source, secondary_capture, source_header
        for path, img in zip(images, imgs):
            why = dicom_problem(img, img.array.ndim - 1)
            if why:
                raise NemtError(f"{path}: --dicom: {why}")
    _out_dir(out)
    _device(device)
    params = _method_params(param)
    ex_seed = params.pop("seed", seed)  # --param seed=S (listed by `nemt methods`) overrides --seed for the method
    ctx = context(device) if data is not None else None
    if ctx is not None:
        device = str(local_device(device, ctx))
    torch.manual_seed(seed)
    clf = load_model(model, device=device)
    if method in ("nemt", "nem") and explainer is None:
        raise NemtError(f"method {method!r} needs a fitted explainer folder (--explainer DIR from `nemt fit`)")
    given = " ".join(param)
    with blamed_on_params(given, f"method {method!r} cannot be built"):
        ex = get_explainer(method, clf, path=explainer, seed=ex_seed, device=device, **params)
    if superpixelify is not None:  # the maps averaged within segments of each image (the last step)
        from nemt.clustering import Superpixelified, load_segmenter
        ex = Superpixelified(ex, load_segmenter(superpixelify, clf, seed=seed))
        method = ex.name
    tgt: object = target
    if target in ("all", "predicted"):
        if target in clf.label_names:  # a label named like a keyword: never guess which is meant
            own = clf.label_names.index(target)
            raise NemtError(f"--target {target!r} is both this model's label {own} and a keyword; give the label's "
                            f"index, --target {own}")
    else:  # a label's name or an output's index, read as the service reads its labels
        own = label_or_index(target, clf.label_names, what="--target", option="--target")
        tgt = own if own is not None else int(target) if target.isascii() and target.isdigit() else target
    pre = clf.preprocessing
    file_parts = label_file_parts(clf.label_names)

    def explain_one(img, path: str, stem_of) -> dict:
        # warned and listed in the JSON: what makes this input other than the training inputs (its extent, value
        # range, sampling rate against the card's record of the training images)
        notes = input_notes(clf.card, img)
        for note in notes:
            console.print(f"warning: {path}: {note}", highlight=False, markup=False, soft_wrap=True)
        unit = pre.unit(img)
        x = pre.normalise(unit)[None].to(device)
        targeted = getattr(ex, "targeted", True)  # an encoder's explainer (RELAX, NEM): one map, whatever --target
        t = resolve_targets(tgt, clf, x) if targeted else None
        with blamed_on_params(given, f"method {method!r} failed on {path}"):
            maps, probs = ex.explain_and_predict(x, target=t)
        maps, probs = maps.detach().cpu()[0], probs[0].cpu()
        if targeted:
            names = [clf.label_names[int(i)] for i in t[0]]
            files = [file_parts[int(i)] for i in t[0]]  # a label's file-safe name ("mass/nodule": mass_nodule)
            titles = [f"{method}: {name}" for name in names]
        else:  # its one map is named for the method, not for a class
            names, files, titles = [], label_file_parts([method]), [method]
        stem = stem_of(files)
        for part, title, m in zip(files, titles, maps):
            arr = m.numpy().astype(np.float32)
            if clf.spatial_dims == 3:
                import gzip

                # the input's world coordinates: its affine, else its voxel spacing (a .npy sidecar, DICOM)
                world = img.affine if img.affine is not None else np.diag([*map(float, img.spacing), 1.0])
                affine = pre.resized_affine(world, img.array.shape[1:])
                with atomic_open(out / f"{stem}__{part}.nii.gz", "wb") as fh:  # the input's header codes, units
                    fh.write(gzip.compress(map_nifti(arr, affine, img), mtime=0))
            else:
                with atomic_open(out / f"{stem}__{part}.npy", "wb") as fh:
                    np.save(fh, arr)
            if dicom:  # the map over the source at its own size, in its study
                k = files.index(part)
                sc = secondary_capture(source_header(path), overlay_at_source(pre.unit_scale(img), arr),
                                       model_sha256=clf.card.weights_sha256 or "", method=method,
                                       label=names[k] if names else method, settings=given,
                                       series_offset=int(t[0][k]) if targeted else 0)
                with atomic_open(out / f"{stem}__{part}.dcm", "wb") as fh:
                    sc.save_as(fh, enforce_file_format=True)
            shown = unit.numpy()
            shown = shown[0] if shown.shape[0] == 1 else shown
            pred = ", ".join(f"{n} {p:.2f}" for n, p in zip(clf.label_names, probs.tolist()))
            save_overlay(out / f"{stem}__{part}.png", shown, [arr], [title],
                         suptitle=f"{Path(path).name if data is None else path} | {pred}",
                         axcodes=img.meta.get("axcodes"))  # a NIfTI's axial slices
        return {"image": str(path), "outputs": stem, "targets": names,
                "files": [f"{stem}__{part}" for part in files],  # each target's map: FILE.npy / .png / .nii.gz
                "prediction": dict(zip(clf.label_names, [round(p, 4) for p in probs.tolist()])),
                **({"notes": notes} if notes else {})}

    if data is None:
        out.mkdir(parents=True, exist_ok=True)
        results = []
        outputs = OutputNames()  # full stem; a numbered suffix where two images would write the same file
        for path, img in zip(images, imgs):
            results.append(explain_one(img, str(path), lambda names, p=path: outputs.claim(p, names)))
        typer.echo(json.dumps(results, indent=2))
        return

    from nemt.data.dataset import read_sample
    from nemt.models.training import load_splits
    from nemt.progress import progress_bar
    manifest = _open(data, clf.task, ",".join(clf.label_names) if clf.task == "multiclass" else None,
                     max_pixels=max_pixels)
    order = list(range(len(manifest.samples))) if split == "all" else \
        [int(i) for i in load_splits(model, manifest)[split]]
    todo = order[:limit] if limit is not None else order
    run = _explain_run_key(clf, explainer, superpixelify, method=method, target=target, params=sorted(param),
                           seed=seed, data=manifest.fingerprint(), split=split, limit=limit)
    ext = ".nii.gz" if clf.spatial_dims == 3 else ".npy"
    logs = out / "log"
    done = _explained(logs, run, out, ext)  # items any rank finished in an earlier call (the same run)
    mine = [i for k, i in enumerate(todo) if k % ctx.world == ctx.rank and i not in done]
    out.mkdir(parents=True, exist_ok=True)  # once the data are open and the folder's earlier run accepted
    logs.mkdir(parents=True, exist_ok=True)
    mylog = logs / f"rank-{ctx.rank}.jsonl"
    with open(mylog, "a", encoding="utf-8") as log, progress_bar(progress and ctx.main) as bar:
        if mylog.stat().st_size and not mylog.read_bytes().endswith(b"\n"):
            log.write("\n")  # a line cut by a kill stays alone on its line (and is ignored)
        task = bar.add_task("explain", total=len(mine), info="")
        for i in mine:
            sample = manifest.samples[i]
            rec = explain_one(read_sample(manifest, sample), manifest.relative_name(sample),
                              lambda names, i=i, s=sample: f"{i:05d}-{image_stem(s.name)}")
            log.write(json.dumps({"run": run, "index": i, **rec}) + "\n")
            log.flush()  # a killed run keeps every finished item
            bar.update(task, advance=1)
    ctx.barrier()
    if not ctx.main:
        return
    done = _explained(logs, run, out, ext)
    missing = [i for i in todo if i not in done]
    if missing:
        raise NemtError(f"{len(missing)} items have no explanation in {logs} (a rank failed?); run again to finish")
    # every item explained in this folder, by this call or an earlier one of the same run (a smaller --limit),
    # in the split's order
    pos = {i: k for k, i in enumerate(order)}
    index = [done[i] for i in sorted(done, key=lambda i: (pos.get(i, len(order)), i))]
    write_json(out / "explanations.json", index)
    typer.echo(json.dumps({"explained": len(index), "index": str(out / "explanations.json")}))


#: what ``explain --data``'s run key records, named for its refusal
_EXPLAIN_KEY_NAMES = {"model_sha256": "model (weights checksum)", "explainer_sha256": "fitted explainer (--explainer "
                      "checksum)", "superpixelify": "--superpixelify segments", "method": "--method",
                      "target": "--target", "params": "--param", "seed": "--seed", "data": "data (--data)",
                      "split": "--split"}


def _explain_run_key(clf, explainer: Path | None, superpixelify: str | None, **settings) -> dict:
    """``explain --data``'s run key: the model's weights checksum, the fitted explainer's and the
    ``--superpixelify`` clusters folder's checksums (their files, not their paths: the same model given by another
    path resumes, another model at the same path is refused) and the settings (split and limit included; a
    resume compares all but the limit, whose items are a prefix of the split)."""
    from nemt.bench.runner import explainer_checksum
    from nemt.explainers.nemt import model_checksum
    key = {"model_sha256": model_checksum(clf),
           "explainer_sha256": None if explainer is None else explainer_checksum(explainer), "superpixelify": None}
    if superpixelify is not None:
        from nemt.clustering import segmenter_checksum
        key["superpixelify"] = segmenter_checksum(superpixelify)
    return json.loads(json.dumps({**key, **settings}))  # as stored and read back


def _other_run(recorded: Any, run: dict) -> list[str]:
    """The settings in which a log record's ``run`` differs from ``run`` (the limit is not compared)."""
    if not isinstance(recorded, dict) or "model_sha256" not in recorded:
        return ["log format (written by an earlier nemt, which recorded no checksums)"]
    return [_EXPLAIN_KEY_NAMES.get(k, k) for k in sorted(set(recorded) | set(run))
            if k != "limit" and recorded.get(k) != run.get(k)]


def _explained(logs: Path, run: dict, out: Path | None = None, ext: str = ".npy") -> dict[int, dict]:
    """Items logged as explained in ``logs/rank-*.jsonl`` by a run with these settings: {index: record}.
    A record of other settings is refused; a last line cut by a kill is ignored (its item is redone), and so is
    an item whose map (``FILE{ext}``) or overlay (``FILE.png``) is no longer in ``out``."""
    done: dict[int, dict] = {}
    for path in sorted(logs.glob("rank-*.jsonl")) if logs.is_dir() else []:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            diff = _other_run(rec.get("run"), run)
            if diff:
                raise NemtError(f"{path}, line {n}: written by a run with other settings ({', '.join(diff)}); "
                                "use another --out")
            rec.pop("run")
            done[int(rec.pop("index"))] = rec
    if out is not None:
        done = {i: rec for i, rec in done.items()
                if all((out / f"{f}{ext}").is_file() and (out / f"{f}.png").is_file() for f in rec["files"])}
    return done


@app.command()
@_friendly
def benchmark(
    model: Optional[Path] = typer.Option(None, help="model folder written by `nemt train`"),
    data: Optional[Path] = typer.Option(None, help="the data set the model was trained on (with masks or boxes)"),
    out: Path = typer.Option(..., help="output folder: results.csv, summary.md/.csv, report.html"),
    explainer: Optional[Path] = typer.Option(None, help="NEMt explainer folder (for method nemt)"),
    methods: Optional[str] = typer.Option(None, help="comma-separated methods (see `nemt methods`); default "
                                                     "nemt,gradcam++,ig,gradshap,rise,extremal,random,sobel, "
                                                     "or the suite's list"),
    metrics: Optional[str] = typer.Option(None, help="comma-separated metrics (default: localisation, complexity, "
                                                     "sparseness, faithfulness estimate)"),
    split: str = typer.Option("test", help="split of the model's data: train | val | test | all"),
    limit: Optional[int] = typer.Option(None, min=1, help="at most this many images (suite: correctly classified test "
                                                   "samples per model, default 50)"),
    batch_size: int = typer.Option(16, min=1, help="items per explain call"),
    gallery: int = typer.Option(6, min=0, help="gallery images in the report"),
    param: list[str] = typer.Option([], "--param", help="METHOD.KEY=VALUE or METRIC.KEY=VALUE (repeatable), "
                                                       "e.g. rise.n_masks=2000"),
    suite: Optional[str] = typer.Option(None, help="xai-tris: the ground-truth suite (no --model/--data)"),
    suite_models: Optional[str] = typer.Option(None, help="xai-tris: comma-separated models to train and explain "
                                                          "(linear,mlp,cnn; default all three)"),
    suite_scenarios: Optional[str] = typer.Option(None, help="xai-tris: comma-separated scenarios (lin,mult,rigid,"
                                                             "xor; default all four)"),
    suite_backgrounds: Optional[str] = typer.Option(None, help="xai-tris: comma-separated backgrounds (white,corr; "
                                                               "default both)"),
    suite_n: int = typer.Option(4000, min=20, help="xai-tris: samples generated per data set (split 80/10/10)"),
    suite_epochs: int = typer.Option(25, min=1, help="xai-tris: training epochs of each model"),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="random seed"),
    device: str = typer.Option("cpu", help="torch device"),
    progress: bool = typer.Option(True, help="show a progress bar"),
    restart: bool = typer.Option(False, help="forget earlier results in --out instead of resuming"),
    metric_workers: Optional[int] = typer.Option(None, help="threads for the per-map metrics (default: torch's "
                                                            "thread count; 0 or 1: serial)"),
    shard: Optional[str] = typer.Option(None, help="I/N: this job's share (every N-th chunk from the I-th), in "
                                        "OUT/shards/I-of-N; no report (for N independent jobs, e.g. a SLURM array)"),
    merge: bool = typer.Option(False, help="collect OUT/shards/* first, then write results, summary and report"),
    superpixelify: list[str] = typer.Option([], "--superpixelify", help="also score every method's maps averaged "
                                            "within segments (repeatable): a folder written by `nemt clusters "
                                            "--out` (rows METHOD@clusters), nas:K (per-image neuro-activated "
                                            "superpixels, METHOD@nas) or slic:N (METHOD@slic)"),
    gaze: Optional[Path] = typer.Option(None, help="eye-gaze fixation CSV (image,x,y,duration) to score the maps "
                                        "against (KL, NSS); default: gaze.csv beside the data's manifest, if any"),
    no_gaze: bool = typer.Option(False, "--no-gaze", help="leave out a gaze.csv beside the data's manifest"),
) -> None:
    """Explain and score every test image with every method; resumes where it stopped; writes the report."""
    from nemt.bench.runner import (DEFAULT_METHODS, DEFAULT_METRICS, benchmark_model, markdown_summary,
                                   split_method_params)

    _out_dir(out)
    _device(device)
    if no_gaze and gaze is not None:
        raise NemtError("nemt benchmark: give --gaze FILE or --no-gaze, not both")
    method_list = _csv_list(methods) or []
    metric_list = _csv_list(metrics)
    if suite is not None:
        if suite != "xai-tris":
            raise NemtError(f"--suite must be 'xai-tris', got {suite!r}")
        given = [opt for opt, v in (("--model", model), ("--data", data), ("--explainer", explainer),
                                    ("--metrics", metrics), ("--shard", shard), ("--merge", merge),
                                    ("--superpixelify", superpixelify), ("--gaze", gaze), ("--no-gaze", no_gaze),
                                    ("--split", split != "test"), ("--gallery", gallery != 6))  # set away from
                 if v]  # their defaults: the suite scores its own test split and shows no gallery
        if given:
            raise NemtError(f"--suite xai-tris: {', '.join(given)} do(es) not apply (the suite trains its own models "
                            "on generated data, scores top_k_precision, emd_score and importance_mass_accuracy "
                            "(their parameters: --param METRIC.KEY=VALUE) and runs in one process); leave "
                            f"{'it' if len(given) == 1 else 'them'} out")
        from nemt.bench.xaitris import XAITRIS_MODELS, run_suite
        from nemt.data.xaitris import BACKGROUNDS, SCENARIOS
        chosen = {}
        for opt, value, known in (("--suite-models", suite_models, XAITRIS_MODELS),
                                  ("--suite-scenarios", suite_scenarios, SCENARIOS),
                                  ("--suite-backgrounds", suite_backgrounds, BACKGROUNDS)):
            names = _csv_list(value) if value else None
            bad = [v for v in names or [] if v not in known]
            if bad or names == []:
                raise NemtError(f"{opt} {value!r}: {'unknown ' + ', '.join(map(repr, bad)) if bad else 'empty'} "
                                f"(known: {', '.join(known)})")
            chosen[opt] = tuple(names) if names else None
        table = run_suite(out, methods=method_list, seed=seed, device=device, progress=progress, restart=restart,
                          params=split_method_params(param), batch_size=batch_size, n=suite_n, epochs=suite_epochs,
                          **({"max_samples": limit} if limit else {}),
                          **({"models": chosen["--suite-models"]} if chosen["--suite-models"] else {}),
                          scenarios=chosen["--suite-scenarios"], backgrounds=chosen["--suite-backgrounds"])
        console.print(table)
        typer.echo(json.dumps({"report": str(out / "report.html"), "table": str(out / "summary.md")}))
        return
    suite_only = [opt for opt, v in (("--suite-models", suite_models), ("--suite-scenarios", suite_scenarios),
                                     ("--suite-backgrounds", suite_backgrounds), ("--suite-n", suite_n != 4000),
                                     ("--suite-epochs", suite_epochs != 25)) if v]
    if suite_only:
        raise NemtError(f"{', '.join(suite_only)} appl{'ies' if len(suite_only) == 1 else 'y'} to --suite xai-tris "
                        "only; leave " + ("it" if len(suite_only) == 1 else "them") + " out or add --suite xai-tris")
    if model is None or data is None:
        raise NemtError("nemt benchmark needs --model and --data (or --suite xai-tris)")
    shard_given = _shard(shard)  # --shard with --merge: refused by benchmark_model before any work
    from nemt.distributed import launched_world
    if (shard is not None or merge) and launched_world() > 1:
        raise NemtError(f"--shard and --merge do not run under torchrun (WORLD_SIZE={launched_world()}): every rank "
                        "would run the same share and append to the same files; torchrun already gives each rank "
                        "its share and rank 0 merges them, so leave --shard and --merge out (or run them as "
                        "independent jobs, without torchrun)")
    metric_list = metric_list or list(DEFAULT_METRICS)
    method_list = method_list or list(DEFAULT_METHODS)
    run = dict(explainer_dir=explainer, methods=method_list, metrics=metric_list, split=split, limit=limit,
               batch_size=batch_size, gallery=gallery, params=split_method_params(param), seed=seed, device=device,
               metric_workers=_metric_workers(metric_workers), superpixelify=superpixelify or None,
               gaze=False if no_gaze else gaze)
    from nemt.distributed import context
    ctx = context() if shard is None and not merge else None
    if ctx is not None and ctx.distributed:  # launched by torchrun: each rank a shard, rank 0 merges and reports
        # --restart: each rank clears its own shard and any of another split (rank 0 cannot do it for all
        # without a barrier before the checks)
        benchmark_model(model, data, out, **run, progress=progress and ctx.main, restart=restart,
                        shard=(ctx.rank, ctx.world))
        ctx.barrier()
        if not ctx.main:
            return
        merge = True
    summary = benchmark_model(model, data, out, **run, progress=progress, restart=restart, shard=shard_given,
                              merge=merge)
    if shard is not None:
        typer.echo(json.dumps(summary))
        return
    scored = [k for k in next(iter(summary.values()), {}) if k not in ("ms", "n_items")]  # gaze metrics included
    console.print(markdown_summary(summary, scored or metric_list))
    typer.echo(json.dumps({"report": str(out / "report.html"), "results": str(out / "results.csv")}))


@app.command()
@_friendly
def export(
    model: Path = typer.Option(..., help="model folder written by `nemt train`"),
    explainer: Path = typer.Option(..., help="NEMt explainer folder written by `nemt fit`"),
    out: Path = typer.Option(..., help="output file: model.onnx (ONNX) or model.pt (TorchScript)"),
    fmt: Optional[str] = typer.Option(None, "--format", help="onnx | torchscript [default: from --out's suffix]"),
    opset: int = typer.Option(17, help="ONNX opset (12 to the newest PyTorch's exporter writes, 20 with torch 2.13)"),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="seed of the random inputs traced and checked"),
) -> None:
    """Export the model and its NEMt explainer as one model (predictions and maps in one call), checked."""
    from nemt.deploy.export import export_model

    _out_file(out)
    typer.echo(json.dumps(export_model(model, explainer, out, format=fmt, seed=seed, opset=opset), indent=2))


@app.command()
@_friendly
def fidelity(
    model: Path = typer.Option(..., help="model folder written by `nemt train`"),
    data: Path = typer.Option(..., help="the data set the model was trained on (with masks or boxes)"),
    explainer: Path = typer.Option(..., help="a student's folder (`nemt fit --teacher ...`)"),
    out: Path = typer.Option(..., help="output folder: fidelity.json, fidelity.md, the teacher's maps (cache)"),
    split: str = typer.Option("test", help="split of the model's data: train | val | test"),
    limit: Optional[int] = typer.Option(None, min=1, help="at most this many images"),
    batch_size: int = typer.Option(16, min=1, help="images per explain call"),
    seed: Optional[int] = typer.Option(None, min=0, max=SEED_MAX, help="the seed both maps are made under: always "
                                       "the student's teacher seed (its card's teacher_seed, the seed of its "
                                       "training maps); another is refused [default: the student's]"),
    device: str = typer.Option("cpu", help="torch device"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """A student against its teacher on a split: map correlation, relevance mass and pointing game, time, break-even."""
    from nemt.bench.fidelity import fidelity_report, markdown, teacher_seed
    from nemt.bench.runner import load_benchmark_data, split_rows
    from nemt.data.manifest import open_dataset
    from nemt.explainers import get_explainer
    from nemt.models import load_model
    from nemt.models.training import load_splits

    _out_dir(out)
    clf = load_model(model, device=_device(device))
    student = get_explainer("nemt", clf, path=explainer, device=device)
    if getattr(student, "teacher", None) is None:
        raise NemtError(f"{explainer}: not a student (fitted without --teacher)")
    teacher_seed(student, seed)  # another --seed than the student's teacher seed: refused before any work
    kw = {"labels": list(clf.label_names)} if clf.task == "multiclass" else {}
    manifest = open_dataset(data, task=clf.task, **kw)
    manifest.raise_problems()
    splits = load_splits(model, manifest)
    bench = load_benchmark_data(clf, manifest, split_rows(splits, split, model), device=device, limit=limit)
    rep = fidelity_report(student, bench, out, batch_size=batch_size, seed=seed, progress=progress,
                          log=lambda s: console.print(s, highlight=False))
    console.print(markdown(rep), highlight=False)
    typer.echo(json.dumps({"report": str(out / "fidelity.json")}))


@app.command()
@_friendly
def serve(
    model: Path = typer.Option(..., help="model folder written by `nemt train`"),
    explainer: Optional[Path] = typer.Option(None, help="NEMt explainer folder (offers method nemt)"),
    baselines: Optional[str] = typer.Option(None, help="baseline methods to offer too, comma-separated"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, min=0, max=65535, help="port"),
    workers: int = typer.Option(2, min=1, help="worker threads"),
    queue: int = typer.Option(16, min=0, help="requests that may wait for a worker; more get 503"),
    max_upload_mb: float = typer.Option(20, callback=_finite_positive, help="upload size limit in MB"),
    max_pixels: float = typer.Option(5e7, "--max-pixels", min=1, callback=_finite_positive,
                                     help="largest image, in pixels (voxels), checked from the file's header "
                                          "before decoding; larger ones get 413"),
    body_timeout: float = typer.Option(30.0, min=0.001, callback=_finite_positive,
                                       help="seconds to receive a request body; slower gets 408"),
    max_receiving: int = typer.Option(64, min=1, help="request bodies received at once; more get 503"),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="seed of stochastic baselines"),
    device: str = typer.Option("cpu", help="torch device"),
    param: list[str] = typer.Option([], "--param", help="METHOD.KEY=VALUE (repeatable), a served method's "
                                    "parameter, e.g. occlusion.window=4 (see `nemt methods`)"),
) -> None:
    """Serve predictions and explanations over HTTP (POST /v1/explain, /openapi.json), with a viewer at /.

    Every method is tried once on the model's input size before the port is opened: a setting that cannot
    work there is refused with the method's own reason (change it with --param)."""
    from nemt.bench.runner import split_method_params
    from nemt.deploy.service import serve as run

    _device(device)
    run(model, explainer, baselines=_csv_list(baselines) or [], params=split_method_params(param, metrics=False), host=host,
        port=port, workers=workers, queue=queue, max_upload_mb=max_upload_mb, max_pixels=int(max_pixels),
        body_timeout=body_timeout, max_receiving=max_receiving, device=device, seed=seed)


@app.command()
@_friendly
def methods() -> None:
    """List the explanation methods, with their parameters and defaults (pass them to `explain` as --param
    KEY=VALUE). A fitted method (nemt, nem) takes at explanation time only the parameters listed so; the
    others are fixed when it is fitted (for nemt, by `nemt fit`) and read from its card."""
    from rich.table import Table

    from nemt.explainers import available
    from nemt.explainers.base import _REGISTRY

    table = Table("method", "what", "parameters (default)")
    for name in available():
        cls = _REGISTRY[name]
        table.add_row(name, _plain_summary(cls.__doc__), _method_parameters(cls))
    console.print(table, highlight=False)


def _method_parameters(cls: type) -> str:
    """``nemt methods``' parameter column: each ``NAME=DEFAULT``; for a fitted method (one with ``load``) those
    its fitted explainer takes at explanation time (``EXPLANATION_TIME_PARAMS``) apart from the others, which
    are set when it is fitted."""
    from nemt.explainers.base import init_defaults, init_parameters

    defaults = init_defaults(cls)
    names = sorted(init_parameters(cls) - {"device"})

    def shown(keys) -> str:
        return ", ".join(f"{k}={defaults[k]!r}" if k in defaults else k for k in keys) or "none"

    if getattr(cls, "load", None) is None:
        return shown(names)
    late = [k for k in names if k in getattr(cls, "EXPLANATION_TIME_PARAMS", ())]
    fit = [k for k in names if k not in late]
    how = ("by `nemt fit`'s options or NEMt(...).fit in Python" if cls.name == "nemt"
           else f"by {cls.__name__}(...).fit in Python; `nemt fit` fits nemt")
    return (f"--param with a fitted explainer (--explainer DIR): {shown(late)}. "
            f"Fixed when it is fitted ({how}), read from its card, not --param: {shown(fit)}")


def _plain_summary(doc: str | None) -> str:
    r"""A docstring's first paragraph as plain text: one line, reST roles and literal quotes removed.

    >>> _plain_summary("Uniform noise from ``seed``:\n    a :class:`~x.Random` map.\n\n    More.")
    'Uniform noise from seed: a Random map.'
    """
    import re

    para = " ".join(line.strip() for line in (doc or "").strip().split("\n\n")[0].splitlines())
    para = re.sub(r":[a-z]+:`~?(?:[\w.]*\.)?([^`]+)`", r"\1", para)
    return para.replace("``", "")


@app.command()
@_friendly
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="output folder"),
    n: int = typer.Option(1000, min=1, help="phantom images"),
    size: int = typer.Option(96, min=1, help="image size"),
    arch: str = typer.Option("smallcnn", help="classifier architecture"),
    epochs: int = typer.Option(30, min=1, help="classifier training epochs"),
    fit_epochs: int = typer.Option(10, min=1, help="NEMt training epochs"),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="random seed"),
    device: str = typer.Option("cpu", help="torch device"),
    bench_images: int = typer.Option(60, min=1, help="test images in the benchmark"),
    bench_methods: str = typer.Option("nemt,gradcam++,ig,gradshap,rise,extremal,random,sobel",
                                      help="methods in the benchmark"),
    open_report: bool = typer.Option(False, "--open", help="open the report in a browser at the end"),
    progress: bool = typer.Option(True, help="show progress bars"),
    restart: bool = typer.Option(False, help="start over: remove what an earlier demo wrote in --out (its phantoms, "
                                 "model, explainer, benchmark and summary.md; other files are kept) once every "
                                 "option is checked; without it a re-run resumes, and one with other settings is "
                                 "refused"),
) -> None:
    """The main job on built-in phantoms: data, check, classifier, NEMt, benchmark against the baselines, report.

    Re-run the same command to resume (finished stages are reused); --restart starts over."""
    _out_dir(out)
    _device(device)
    methods = _demo_methods(bench_methods, arch, size)  # every option checked before stage 1
    if restart:
        _clear_demo(out)
    try:
        _demo(out, n=n, size=size, arch=arch, epochs=epochs, fit_epochs=fit_epochs, seed=seed, device=device,
              bench_images=bench_images, methods=methods, open_report=open_report, progress=progress)
    except NemtError as exc:  # the stages' remedies name their own commands' options: name the demo's
        raise _demo_error(exc) from None


def _demo_methods(bench_methods: str, arch: str, size: int) -> list[str]:
    """``demo``'s ``--bench-methods`` and ``--arch``, checked before stage 1: the methods as a list."""
    from nemt.explainers import available
    from nemt.explainers.base import _REGISTRY
    from nemt.models.training import probe_network
    from nemt.models.zoo import ARCHITECTURES

    if arch not in ARCHITECTURES:
        raise NemtError(f"--arch {arch!r}: not an architecture; choose one of {', '.join(sorted(ARCHITECTURES))}")
    probe_network(arch, {}, (size, size), kwargs_name="--arch", size_name="--size", size_label=str(size))
    methods = _csv_list(bench_methods) or []
    if not methods:
        raise NemtError(f"--bench-methods {bench_methods!r}: no method; give one or more of {', '.join(available())}")
    unknown = [m for m in methods if m not in available()]
    if unknown:
        raise NemtError(f"--bench-methods: unknown method(s) {', '.join(map(repr, unknown))}; available: "
                        f"{', '.join(available())}")
    if "nem" in methods:
        raise NemtError("--bench-methods: nem needs an explainer fitted for it (NEM), and the demo fits NEMt only; "
                        "leave it out (benchmark it with `nemt benchmark --explainer DIR`)")
    for m in methods:
        need = getattr(_REGISTRY[m], "model_arch", None)
        if need is not None and need != arch:
            raise NemtError(f"--bench-methods: {m} explains a {need} model only; this demo trains --arch {arch}: "
                            f"leave {m} out or give --arch {need}")
    return methods


#: what ``nemt demo`` writes in its --out folder: ``--restart`` removes these (and only these) first; the phantoms in
#: ``data`` are removed by the files their manifest lists (a data set the demo did not write is kept, and refused)
_DEMO_OUTPUTS = {"model": ("model.safetensors", "model.json", "splits.csv", "history.json", "state"),
                 "explainer": ("explainer.safetensors", "explainer.json", "collapse.json", "state", "teacher"),
                 ".": ("summary.md",)}


def _clear_demo(out: Path) -> None:
    """``demo --restart``: remove what an earlier demo wrote in ``out`` (see :data:`_DEMO_OUTPUTS`; the benchmark's
    run as ``nemt benchmark --restart`` clears it; the phantoms as ``nemt data phantoms --overwrite`` replaces
    them), leaving any other file; folders left empty are removed."""
    from nemt.bench.runner import _remove, clear_run
    from nemt.data.generated import _remove_listed

    if not out.is_dir():
        return
    bench = out / "benchmark"
    if bench.is_dir():
        clear_run(bench)
    for sub, names in _DEMO_OUTPUTS.items():
        for name in names:
            _remove(out / sub / name)
    data = out / "data"
    meta = data / "phantoms.json"
    try:
        generator = json.loads(meta.read_text(encoding="utf-8")).get("generator") if meta.is_file() else None
    except (OSError, ValueError, AttributeError):
        generator = None
    if generator == "nemt.data.phantoms":  # a phantom set (any settings): its files, as --overwrite removes them
        if (data / "manifest.csv").is_file():
            _remove_listed(data, data / "manifest.csv")
        meta.unlink()
    for folder in (bench, out / "model", out / "explainer", data / "images", data / "masks", data):
        try:
            folder.rmdir()  # only where nothing else is left
        except OSError:
            pass


def _demo_error(exc: NemtError) -> NemtError:
    """A stage's refusal as the demo's: a remedy that names the stage's own options (``--overwrite``,
    ``--fresh``, ``--restart``, another ``--out`` or output folder, ``--allow-collapse``) replaced by the demo's
    (``--restart`` or another ``--out``); any other error unchanged."""
    import re

    text = str(exc)
    if "--allow-collapse" in text:  # nemt fit's option; the demo saves no collapsed explainer
        return NemtError(text.replace("Pass --allow-collapse to save it anyway",
                                      "Try another --seed or more --fit-epochs, or fit it with `nemt fit "
                                      "--allow-collapse` (the demo has no such option)"))
    head, sep, tail = text.rpartition("; ")
    if not sep or not re.search(r"--overwrite|--fresh|--restart|another (?:--out|output folder|folder)"
                                r"|delete it", tail):
        return exc
    if "did not write" in head:  # a data set of the user's in OUT/data: never removed, so --restart cannot help
        return NemtError(f"{head}; give the demo another --out")
    return NemtError(f"{head}; run the demo with --restart to start over (it removes what the demo wrote in "
                     "--out), or give another --out")


def _demo(out: Path, *, n: int, size: int, arch: str, epochs: int, fit_epochs: int, seed: int, device: str,
          bench_images: int, methods: list[str], open_report: bool, progress: bool) -> None:
    """``nemt demo``'s stages, its options checked."""
    from torch.utils.data import DataLoader

    from nemt.data import ImageDataset
    from nemt.data.check import check_dataset
    from nemt.data.manifest import open_dataset
    from nemt.data.phantoms import write_phantom_dataset
    from nemt.explainers import NEMt
    from nemt.files import atomic_open
    from nemt.models.training import TrainConfig, load_splits, train_classifier

    console.rule("1. phantoms")
    manifest_path = write_phantom_dataset(out / "data", n, size, task="multiclass", seed=seed)
    label_names = json.loads((out / "data" / "phantoms.json").read_text())["label_names"]
    manifest = open_dataset(manifest_path, labels=label_names)  # keep "normal" first
    console.rule("2. data check")
    rep = check_dataset(manifest)
    console.print(f"{rep.n_images} images {rep.per_label}, {rep.nonempty_masks} non-empty masks, "
                  f"{len(rep.fatal)} fatal problems")
    if not rep.ok:
        raise NemtError(f"phantom data failed its own check: {rep.fatal[0]}")
    console.rule("3. train the classifier")
    cfg = TrainConfig(arch=arch, size=(size, size), epochs=epochs, batch_size=32, lr=3e-3, seed=seed)
    clf, result = train_classifier(manifest, out / "model", cfg, device=device, progress=progress)
    console.rule("4. fit NEMt")
    splits = load_splits(out / "model", manifest)
    train_ds = ImageDataset(manifest, clf.preprocessing, splits["train"])
    val_loader = DataLoader(ImageDataset(manifest, clf.preprocessing, splits["val"]), batch_size=32)
    explainer = NEMt(clf, epochs=fit_epochs, seed=seed, device=device)  # batches of 16 (its batch_size), seeded
    explainer.fit(train_ds, val_data=val_loader, out_dir=out / "explainer", progress=progress)  # collapse guard
    console.rule("5. benchmark NEMt against the baselines on the test split (true label)")
    from nemt.bench.runner import benchmark_model, markdown_summary
    budgets = {"rise": {"n_masks": 500}, "extremal": {"steps": 100}}  # the demo's time budget; see docs/results.md
    # deletion and insertion AUC on a blurred substrate: faithfulness to the classifier, beside localisation's
    # agreement with the finding (they part on the opacities: docs/results.md, "The main job")
    metric_list = ["relevance_mass", "relevance_rank", "pointing_game", "pointing_game_expected",
                   "energy_pointing_game", "complexity", "sparseness", "faithfulness_estimate", "deletion_auc",
                   "insertion_auc"]
    metric_params = {"deletion_auc": {"baseline": "blur"}, "insertion_auc": {"baseline": "blur"}}
    summary = benchmark_model(out / "model", manifest_path, out / "benchmark", explainer_dir=out / "explainer",
                              methods=methods, metrics=metric_list, limit=bench_images,
                              params={**{k: v for k, v in budgets.items() if k in methods}, **metric_params},
                              seed=seed,
                              device=device, progress=progress, metric_workers=_metric_workers(None))
    table = markdown_summary(summary, metric_list)
    console.print(table)
    guard_text = ", ".join(f"{k} map area {v['area']:.3f}, empty {v['empty']:.0%}"
                           for k, v in explainer.collapse_["targets"].items())
    collapsed = len(explainer.collapse_["collapsed"])
    console.print(f"NEMt collapsed channels: {collapsed} of {len(clf.label_names)}")
    report = out / "benchmark" / "report.html"
    with atomic_open(out / "summary.md", "w", encoding="utf-8") as fh:
        fh.write(f"# nemt demo (seed {seed})\n\nClassifier test figures: "
                 f"{json.dumps(result['metrics'].get('test', {}))}\n\n"
                 f"NEMt collapsed channels: {collapsed} of {len(clf.label_names)} (validation split: {guard_text})"
                 f"\n\n{table}\nReport: {report}\n")
    console.rule("done")
    typer.echo(json.dumps({"model": str(out / "model"), "explainer": str(out / "explainer"),
                           "nemt_collapsed_channels": collapsed,
                           "test": result["metrics"].get("test", {}), "report": str(report)}, indent=2))
    if open_report:
        import webbrowser
        webbrowser.open(report.resolve().as_uri())


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


class _Ticking:
    """A map-style data set that calls ``tick`` at every item read (a progress bar over code that reads it)."""

    def __init__(self, data: Any, tick: Callable[[], None]):
        self.data, self.tick = data, tick

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        self.tick()
        return self.data[i]


@app.command()
@_friendly
def concepts(
    model: Path = typer.Option(..., help="model folder"),
    layer: str = typer.Option(..., help="module name in the network (e.g. stage4, layer4, fc), or 'output'"),
    data: Path = typer.Option(..., help="probe images: manifest.csv, a folder with one, a class-per-folder tree"),
    vlm: str = typer.Option("tiny", help="a local vision-language model folder (open_clip, Hugging Face CLIP, a "
                                         "saved tiny CLIP) or 'tiny' (nemt's tiny CLIP, trained on phantoms)"),
    concepts_file: Optional[Path] = typer.Option(None, "--concepts", help="concept file, one a line "
                                                 "[default: nemt's radiology/ultrasound list]"),
    method: str = typer.Option("mammi", help="mammi | clip-dissect"),
    template: Optional[str] = typer.Option(None, help="prompt before each concept [default: 'a chest x-ray image "
                                                      "of a' for mammi, none for clip-dissect]"),
    out: Path = typer.Option(..., help="output folder"),
    limit: Optional[int] = typer.Option(None, min=1, help="probe only the first N images"),
    sheets: int = typer.Option(24, min=0, help="contact sheets in the report (labelled neurons first)"),
    batch_size: int = typer.Option(32, min=1, help="images per forward pass"),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="random seed (the tiny CLIP's training)"),
    device: str = typer.Option("cpu", help="torch device"),
    max_pixels: Optional[float] = MaxPixelsOpt,
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """What a layer's neurons detect (CLIP-Dissect or MAMMI): tables per neuron, a summary, an HTML report."""
    import csv
    import hashlib

    import torch
    import torch.nn.functional as F

    from nemt.concepts import DEFAULT_CONCEPTS, METHODS, annotate, load_vlm, read_concepts
    from nemt.concepts.report import contact_sheet, write_concept_report
    from nemt.data import ImageDataset
    from nemt.explainers import GradCAM
    from nemt.explainers.layers import FeatureTap
    from nemt.files import atomic_open, write_json
    from nemt.models import load_model
    from nemt.ops import evaluating

    _out_dir(out)
    if method not in METHODS:  # before the tiny CLIP trains
        raise NemtError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    torch.manual_seed(seed)
    clf = load_model(model, device=_device(device))
    if clf.spatial_dims != 2:  # before the tiny CLIP trains: every vision-language model here embeds 2D images
        raise NemtError(f"concept annotation embeds the probe images with a vision-language model, which takes 2D "
                        f"images; this model takes {clf.spatial_dims}D inputs")
    manifest = _open(data, None, None, max_pixels=max_pixels)
    n = len(manifest.samples) if limit is None else min(limit, len(manifest.samples))
    ds = ImageDataset(manifest, clf.preprocessing, list(range(n)))
    words = read_concepts(concepts_file or DEFAULT_CONCEPTS)
    if layer != "output":  # a wrong layer name is refused before the tiny CLIP trains
        FeatureTap(clf, [layer]).remove()
    out.mkdir(parents=True, exist_ok=True)
    size = min(clf.preprocessing.size) if clf.spatial_dims == 2 else 48
    from nemt.progress import progress_bar
    src = manifest.path if getattr(manifest, "path", None) else data
    key = hashlib.sha256(json.dumps([str(Path(src).resolve()), n, clf.preprocessing.to_dict()],
                                    sort_keys=True, default=str).encode()).hexdigest()
    with progress_bar(progress) as bar:
        tid = bar.add_task(f"vision-language model ({vlm})", total=None, info="")
        vl = load_vlm(vlm, device=device, seed=seed, size=max(32, int(size)), cache_dir=out / "tiny-clip")
        bar.update(tid, total=1, completed=1)
        # the probe images are read once for the layer's activations and once more for the image embeddings
        # (unless cached): the bar counts reads, so it has no fixed total
        tid = bar.add_task("probe images read", total=None, info="")
        ann = annotate(clf, layer, _Ticking(ds, lambda: bar.update(tid, advance=1)), vl, words, method=method,
                       template=template, batch_size=batch_size, device=device,
                       cache=out / "cache" / "image_embeddings.safetensors", cache_key=key)
    left_out = ann.left_out()  # concepts with no word in the VLM's vocabulary, and those whose words it never learnt
    if left_out:
        from rich.markup import escape
        console.print(f"[yellow]left out:[/yellow] {escape(left_out)}", highlight=False)
    rows = ann.rows()
    write_json(out / "neurons.json", {"method": method, "layer": layer, "vlm": vl.name, "params": ann.params,
                                      "probe_images": n, "concepts": words, "neurons": rows})
    with atomic_open(out / "neurons.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["neuron", "status", "n_images", "label", "concepts", "best", "best_score"])
        for r in rows:
            w.writerow([r["neuron"], r["status"], r["n_images"], r["label"] or "",
                        "; ".join(f"{c} ({s:.4g})" for c, s in r["concepts"]), r["best"], r["best_score"]])
    summary = ann.summary()
    write_json(out / "summary.json", {c: {"neurons": len(v), "which": v} for c, v in summary.items()})
    with atomic_open(out / "summary.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["concept", "neurons", "which"])
        w.writerows([c, len(v), " ".join(v)] for c, v in summary.items())
    order = sorted(range(len(rows)), key=lambda k: (rows[k]["status"] != "ok", -(rows[k]["best_score"] or 0)))
    is_output = ann.neurons == list(clf.label_names)
    sheet_png: dict[int, bytes] = {}
    for k in order[:sheets]:
        idx = ann.top_images[k].tolist()
        units = torch.stack([ds.unit_item(i)[0] for i in idx])
        x = clf.preprocessing.normalise(units).to(device)
        if is_output:
            maps = GradCAM(clf, device=device).explain(x, target=k)[:, 0].detach().cpu()
        else:
            with evaluating(clf), torch.no_grad(), FeatureTap(clf, [layer]) as tap:
                clf(x)
                f = tap.features[layer][:, k:k + 1].float().cpu()
            if f.ndim < 4:
                maps = None
            else:
                f = F.interpolate(f, size=units.shape[2:], mode="bilinear" if f.ndim == 4 else "trilinear",
                                  align_corners=False)[:, 0]
                lo, hi = f.amin(), f.amax()
                maps = (f - lo) / (hi - lo) if hi > lo else torch.zeros_like(f)
        caps = [f"#{i} {float(ann.activations[i, k]):.3g}" for i in idx]
        label = ", ".join(c for c, _ in rows[k]["concepts"][:3]) or rows[k]["status"]
        png = contact_sheet(units.numpy(), None if maps is None else maps.numpy(), f"{ann.neurons[k]}: {label}",
                            caps)
        with atomic_open(out / "sheets" / f"neuron_{k:04d}.png", "wb") as fh:
            fh.write(png)
        sheet_png[k] = png
    facts = {"model": str(model), "layer": layer, "method": method, "vision-language model": vl.name,
             "probe images": str(n), "concepts": f"{len(words)} ({concepts_file or DEFAULT_CONCEPTS.name})",
             "prompt": repr(ann.params.get("template", "")), "seed": str(seed)}
    report = write_concept_report(out, ann, title=f"Concepts of {layer} ({method})", facts=facts, sheets=sheet_png)
    typer.echo(json.dumps({"neurons": len(rows), "labelled": sum(1 for r in rows if r["label"]),
                           "dead": sum(1 for r in rows if r["status"] == "dead"),
                           "summary": {c: len(v) for c, v in summary.items()}, "report": str(report)}, indent=2))


@app.command()
@_friendly
def clusters(
    model: Path = typer.Option(..., help="model folder written by `nemt train`"),
    data: Path = typer.Option(..., help="the data set the model was trained on"),
    out: Path = typer.Option(..., help="output folder: clustering, label/uncertainty maps, report.html"),
    layers: Optional[str] = typer.Option(None, help="comma-separated module names (default: the last 3 stages)"),
    k: int = typer.Option(12, min=2, help="number of clusters"),
    method: str = typer.Option("kmeans", help="kmeans | module (the clustering module of Boubekki et al. 2021)"),
    fit_split: str = typer.Option("train", help="split the clustering is fitted on: train | val | test | all"),
    split: str = typer.Option("test", help="split mapped and reported: train | val | test | all"),
    max_samples: int = typer.Option(20000, min=2, help="pixels clustered (a seeded uniform draw over all images)"),
    epochs: int = typer.Option(20, min=1, help="module: training epochs"),
    batch_size: int = typer.Option(32, min=1, help="images per forward pass"),
    limit: Optional[int] = typer.Option(None, min=1, help="map at most this many images of --split"),
    gallery: int = typer.Option(6, min=1, help="images per cluster in the gallery"),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="random seed (pixel draw, k-means, module)"),
    device: str = typer.Option("cpu", help="torch device"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """Activation clusters (NAVE / NAS): fit on the model's training split, label and uncertainty maps, a report."""
    from nemt.bench.clusters import run_clusters

    _out_dir(out)
    _device(device)
    if max_samples < k:
        raise NemtError(f"--max-samples ({max_samples}) must be at least --k ({k}): each cluster needs a pixel")
    summary = run_clusters(model, data, out, layers=_csv_list(layers), k=k, method=method, seed=seed,
                           fit_split=fit_split, split=split, max_samples=max_samples, epochs=epochs,
                           batch_size=batch_size, limit=limit, per_cluster=gallery, device=device, progress=progress)
    typer.echo(json.dumps({key: summary[key] for key in ("clustering", "maps", "report", "layers", "grid", "k",
                                                         "images", "localisation")}, indent=2))
