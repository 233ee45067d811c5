"""Shared fixtures: real data locations (skipped when absent) and small synthetic data sets."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(name: str) -> Path:
    """Path of a folder of ../shared/data, or skip the test when it is absent."""
    p = SHARED_DATA / name
    if not p.exists():
        pytest.skip(f"real data {p} not present")
    return p


class Interrupted(Exception):
    """Raised by :func:`stop_after_first_epoch` to simulate a run killed after its first epoch."""


def stop_after_first_epoch(line: str) -> None:
    """A ``log`` callback that interrupts training once epoch 1 is logged (its checkpoint written)."""
    if line.startswith("epoch 1/"):
        raise Interrupted


def folder_bytes(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes: two snapshots are equal iff nothing was written, moved or removed."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(array).save(path)
    return path


@pytest.fixture
def small_csv(tmp_path: Path):
    """A 3-class CSV data set of 24 random 20x16 PNGs with masks; 12 patients of two images each."""
    rng = np.random.default_rng(0)
    rows = ["image,mask,label,patient"]
    for i in range(24):
        write_png(tmp_path / "img" / f"case ({i}).png", rng.integers(0, 255, (20, 16), dtype=np.uint8))
        m = np.zeros((20, 16), np.uint8)
        if i % 3:
            m[5:10, 4:8] = 255
        write_png(tmp_path / "msk" / f"case ({i}).png", m)
        rows.append(f"img/case ({i}).png,msk/case ({i}).png,{['normal', 'benign', 'malignant'][i % 3]},p{i // 2}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "manifest.csv"


def train_phantom_model(root: Path, n: int = 48, size: int = 32, threads: int | None = None) -> tuple[Path, Path]:
    """Phantoms in ``root/data`` and a 1-epoch smallcnn in ``root/m``, via the CLI: (manifest, model folder).
    ``threads``: torch's thread count while training (the one before restored: the other tests' stays theirs)."""
    if threads is not None:
        import torch
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return train_phantom_model(root, n, size)
        finally:
            torch.set_num_threads(before)
    from typer.testing import CliRunner

    from nemt.cli import app
    from nemt.data import write_phantom_dataset

    manifest = write_phantom_dataset(root / "data", n, size, seed=0)
    res = CliRunner().invoke(app, ["train", "--data", str(manifest), "--out", str(root / "m"), "--arch", "smallcnn",
                                   "--size", str(size), "--epochs", "1", "--batch-size", "8", "--no-progress"])
    assert res.exit_code == 0, res.output
    return manifest, root / "m"


def train_and_fit(root: Path, n: int = 48, size: int = 32):
    """Phantoms in ``root/data``, a 1-epoch smallcnn in ``root/m`` and a 1-epoch NEMt in ``root/e``, via the CLI.

    Returns the loaded classifier and the phantom image paths (sorted). Sets torch to one thread, as the
    deploy tests run the model from worker threads.
    """
    import torch
    from typer.testing import CliRunner

    from nemt.cli import app
    from nemt.models import load_model

    torch.set_num_threads(1)

    manifest, model = train_phantom_model(root, n, size)
    res = CliRunner().invoke(app, ["fit", "--model", str(model), "--data", str(manifest), "--out", str(root / "e"),
                                   "--epochs", "1", "--batch-size", "4", "--optimizer", "adamw", "--no-progress"])
    assert res.exit_code == 0, res.output
    return load_model(model), sorted((root / "data" / "images").glob("*.png"))


def bench_setup(n: int = 10, size: int = 16, empty_masks=()):
    """A tiny untrained 3-class classifier and a BenchmarkData of ``n`` random images: classes i % 3, a 6x6
    mask on each finding image (class > 0), except the images of ``empty_masks``, whose mask file is empty."""
    import torch

    from nemt.bench.runner import BenchmarkData, make_items
    from nemt.models import Classifier, build_model

    torch.manual_seed(0)
    net = build_model("smallcnn", spatial_dims=2, in_channels=1, out_channels=3, width=4)
    clf = Classifier.from_module(net, spatial_dims=2, in_channels=1, input_size=(size, size), task="multiclass",
                                 label_names=["normal", "a", "b"]).eval()
    x = torch.randn(n, 1, size, size)
    y = torch.tensor([i % 3 for i in range(n)])
    gt = torch.zeros(n, 1, size, size, dtype=torch.bool)
    for i in range(n):
        if y[i] > 0 and i not in empty_masks:
            gt[i, 0, 2:8, 3:9] = True
    has = [bool(y[i] > 0) for i in range(n)]  # a mask file; those of empty_masks are empty
    items = make_items(y, "multiclass", clf.label_names, [f"img{i}" for i in range(n)], has)
    return clf, BenchmarkData(x, (x - x.min()) / (x.max() - x.min()), gt, items, clf.label_names, "fp")
