"""Bad command-line input: one clear line naming the option and the reason, exit 2, no traceback.

Most checks run before any data or model is read, so they are given paths that do not exist; the few that need
a model share one 1-epoch phantom smallcnn (module fixture).
"""
from __future__ import annotations

import errno
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from nemt.cli import app
from nemt.errors import NemtError

from conftest import train_phantom_model

runner = CliRunner()


def _refused(args: list[str], *needles: str) -> str:
    """Run ``nemt ARGS``; it must exit 2 without a traceback and name every needle; the flattened output."""
    res = runner.invoke(app, args)
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", res.output).split())
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)  # no uncaught exception behind the exit
    assert "Traceback" not in res.output, res.output
    for needle in needles:
        assert needle in text, text
    return text


@pytest.fixture(scope="module")
def phantom_model(tmp_path_factory):
    """(root, manifest, model folder, an image): 48 phantoms of 32 px and a 1-epoch smallcnn."""
    root = tmp_path_factory.mktemp("cli-input")
    manifest, model = train_phantom_model(root, threads=1)
    return root, manifest, model, sorted((root / "data" / "images").glob("*.png"))[0]


# argument lists of each command with everything it requires, all to paths that need not exist
def _cmd(name: str, tmp) -> list[str]:
    d, m, o = str(tmp / "data"), str(tmp / "m"), str(tmp / "out")
    return {
        "train": ["train", "--data", d, "--out", o, "--arch", "smallcnn", "--size", "32", "--no-progress"],
        "fit": ["fit", "--model", m, "--data", d, "--out", o, "--no-progress"],
        "explain": ["explain", "--model", m, "--data", d, "--method", "gradcam", "--out", o, "--no-progress"],
        "benchmark": ["benchmark", "--model", m, "--data", d, "--methods", "gradcam", "--out", o, "--no-progress"],
        "fidelity": ["fidelity", "--model", m, "--data", d, "--explainer", str(tmp / "e"), "--out", o,
                     "--no-progress"],
        "clusters": ["clusters", "--model", m, "--data", d, "--out", o, "--no-progress"],
        "demo": ["demo", "--out", o, "--no-progress"],
    }[name]


@pytest.mark.parametrize("cmd,option,value", [
    ("train", "--epochs", "0"), ("train", "--epochs", "-1"), ("fit", "--epochs", "0"), ("fit", "--epochs", "-1"),
    ("demo", "--epochs", "0"), ("demo", "--fit-epochs", "0"),
    ("train", "--batch-size", "0"), ("fit", "--batch-size", "0"), ("benchmark", "--batch-size", "0"),
    ("fidelity", "--batch-size", "0"),
    ("train", "--accumulate", "0"), ("fit", "--accumulate", "0"),
    ("explain", "--limit", "0"), ("explain", "--limit", "-1"), ("benchmark", "--limit", "0"),
    ("benchmark", "--limit", "-2"), ("fidelity", "--limit", "0"),
    ("fit", "--targets-per-image", "0"), ("fit", "--teacher-budget", "0"), ("fit", "--kernel-size", "0"),
])
def test_counts_below_one_are_refused(tmp_path, cmd, option, value):
    text = _refused(_cmd(cmd, tmp_path) + [option, value], f"Invalid value for '{option}'")
    assert re.search(r">=\s*1|greater than or equal to 1", text), text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cmd", ["train", "fit"])
@pytest.mark.parametrize("value", ["-1", "0", "inf", "nan"])
def test_learning_rate_must_be_positive(tmp_path, cmd, value):
    """inf passed the former "> 0" check (NaN did not); both are refused now, with zero and negative rates."""
    _refused(_cmd(cmd, tmp_path) + ["--lr", value], "Invalid value for '--lr'", "is not a finite number > 0")


def test_train_size_and_fractions(tmp_path):
    base = _cmd("train", tmp_path)
    for size in ("abc", "0", "32x0", "x"):
        _refused(base + ["--size", size], f"--size '{size}'", "positive integers")
    _refused(base + ["--fractions", "a,b,c"], "--fractions", "'a,b,c'", "numbers")
    _refused(_cmd("fit", tmp_path) + ["--decoder-channels", "64,a"], "--decoder-channels '64,a'", "positive integers")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cmd", ["train", "fit", "explain", "benchmark", "clusters", "fidelity", "demo"])
def test_device_is_checked(tmp_path, monkeypatch, cmd):
    _refused(_cmd(cmd, tmp_path) + ["--device", "gpu"], "--device 'gpu'", "cpu, cuda, cuda:N or mps")
    _refused(_cmd(cmd, tmp_path) + ["--device", "meta"], "--device 'meta'", "no such device here")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _refused(_cmd(cmd, tmp_path) + ["--device", "cuda"], "--device cuda: no CUDA device is available here",
             "use --device cpu")
    _refused(_cmd(cmd, tmp_path) + ["--device", "cuda:1"], "--device cuda:1: no CUDA device")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    _refused(_cmd(cmd, tmp_path) + ["--device", "mps"], "--device mps: no MPS device is available here")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cmd", ["train", "fit", "explain", "benchmark", "clusters", "fidelity", "demo"])
def test_out_is_a_file(tmp_path, cmd):
    (tmp_path / "out").write_text("not a folder")
    _refused(_cmd(cmd, tmp_path), f"--out {tmp_path / 'out'} is a file, not a folder")


def test_data_outputs(tmp_path):
    (tmp_path / "f").write_text("x")
    _refused(["data", "phantoms", str(tmp_path / "f"), "--n", "4", "--size", "16"],
             f"OUT {tmp_path / 'f'} is a file, not a folder")
    _refused(["data", "phantoms", str(tmp_path / "p"), "--size", "0"], "Invalid value for '--size'")
    _refused(["data", "ecg", "--out", str(tmp_path / "f"), "--n", "5"], "--out", "is a file, not a folder")
    # data check --json at a folder: refused before the data are read (the data need not exist)
    _refused(["data", "check", str(tmp_path / "nodata"), "--json", str(tmp_path)],
             f"--json {tmp_path} is a folder, not a file")


def test_export_out_is_a_folder(tmp_path, monkeypatch):
    import nemt.deploy.export as export

    def must_not_run(*a, **k):
        raise AssertionError("export ran before --out was checked")
    monkeypatch.setattr(export, "export_model", must_not_run)
    _refused(["export", "--model", str(tmp_path / "m"), "--explainer", str(tmp_path / "e"), "--out", str(tmp_path)],
             f"--out {tmp_path} is a folder, not a file")


def test_explain_missing_input_makes_no_folder(tmp_path):
    _refused(["explain", str(tmp_path / "missing.png"), "--model", str(tmp_path / "m"), "--method", "gradcam",
              "--out", str(tmp_path / "x")], f"{tmp_path / 'missing.png'}: file: no such file")
    assert not (tmp_path / "x").exists()


def test_explain_missing_data_makes_no_folder(phantom_model, tmp_path):
    root, manifest, model, img = phantom_model
    _refused(["explain", "--data", str(tmp_path / "nodata"), "--model", str(model), "--method", "gradcam",
              "--out", str(tmp_path / "x"), "--no-progress"], f"{tmp_path / 'nodata'}")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("exc,needle", [
    (OSError(errno.EROFS, "Read-only file system", "/ro/run/model.safetensors"),
     "cannot write /ro/run/model.safetensors: Read-only file system"),
    (OSError(errno.ENOSPC, "No space left on device", "/full/.manifest.csv.0123456789ab.tmp"),
     "cannot write /full/manifest.csv: No space left on device"),  # atomic_open's temporary file: its target
    (PermissionError(errno.EACCES, "Permission denied", "/locked/images"), "cannot access /locked/images: "
                                                                           "Permission denied"),
])
def test_unwritable_output(tmp_path, monkeypatch, exc, needle):
    import nemt.data.phantoms as phantoms

    def fail(*a, **k):
        raise exc
    monkeypatch.setattr(phantoms, "write_phantom_dataset", fail)
    _refused(["data", "phantoms", str(tmp_path / "p"), "--n", "4", "--size", "16"], needle)


def test_other_os_errors_still_raise(tmp_path, monkeypatch):
    import nemt.data.phantoms as phantoms

    def fail(*a, **k):
        raise OSError(errno.EIO, "Input/output error", "/disk/x")
    monkeypatch.setattr(phantoms, "write_phantom_dataset", fail)
    res = runner.invoke(app, ["data", "phantoms", str(tmp_path / "p"), "--n", "4", "--size", "16"])
    assert res.exit_code == 1 and isinstance(res.exception, OSError)


def test_explain_params(phantom_model, tmp_path):
    root, manifest, model, img = phantom_model
    base = ["explain", str(img), "--model", str(model), "--method", "rise"]
    # construction, call and reserved names
    # a count below 1 or not a number: refused when the method is built (nemt.explainers.base._check_counts)
    _refused(base + ["--param", "n_masks=abc", "--out", str(tmp_path / "a")],
             "method 'rise'", "n_masks must be a whole number >= 1", "'abc'")
    _refused(base + ["--param", "n_masks=-5", "--out", str(tmp_path / "b")],
             "method 'rise'", "n_masks must be a whole number >= 1, got -5")
    _refused(base + ["--param", "batch_size=0", "--param", "n_masks=8", "--out", str(tmp_path / "c")],
             "batch_size must be a whole number >= 1, got 0")
    _refused(base + ["--param", "device=cpu", "--out", str(tmp_path / "d")], "--param device=cpu", "--device")
    _refused(base + ["--param", "path=x", "--out", str(tmp_path / "d")], "--param path=x", "--explainer")
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()
    # --param seed=S is the method's seed: the same maps as --seed S
    for name, extra in (("s1", ["--param", "seed=7"]), ("s2", ["--seed", "7"]), ("s3", [])):
        res = runner.invoke(app, base + ["--param", "n_masks=16", "--target", "0", "--out", str(tmp_path / name)]
                            + extra)
        assert res.exit_code == 0, res.output
    maps = {k: np.load(next((tmp_path / k).glob("*.npy"))) for k in ("s1", "s2", "s3")}
    assert np.array_equal(maps["s1"], maps["s2"]) and not np.array_equal(maps["s1"], maps["s3"])


def test_benchmark_params(phantom_model, tmp_path):
    root, manifest, model, img = phantom_model
    base = ["benchmark", "--model", str(model), "--data", str(manifest), "--methods", "rise", "--metrics",
            "relevance_mass", "--limit", "2", "--gallery", "0", "--no-progress"]
    _refused(base + ["--param", "rise.n_masks=abc", "--out", str(tmp_path / "a")],
             "method 'rise'", "n_masks must be a whole number >= 1")
    _refused(base + ["--param", "rise.n_masks=-5", "--out", str(tmp_path / "b")],
             "method 'rise'", "n_masks must be a whole number >= 1, got -5")
    _refused(base + ["--param", "rise.device=cpu", "--out", str(tmp_path / "c")], "--param rise.device=cpu",
             "--device")
    res = runner.invoke(app, base + ["--param", "rise.seed=7", "--param", "rise.n_masks=16",
                                     "--out", str(tmp_path / "ok")])
    assert res.exit_code == 0, res.output


def test_runner_limit(tmp_path):
    from nemt.bench.runner import benchmark_model, load_benchmark_data
    for bad in (0, -2):
        with pytest.raises(NemtError, match="--limit"):
            benchmark_model(tmp_path / "m", tmp_path / "d", tmp_path / "out", limit=bad)
        with pytest.raises(NemtError, match="--limit"):
            load_benchmark_data(None, None, [0, 1, 2], limit=bad)
    assert not (tmp_path / "out").exists()


def test_concepts_refuses_an_unknown_layer_before_training_the_tiny_clip(phantom_model, tmp_path):
    root, manifest, model, _ = phantom_model
    _refused(["concepts", "--model", str(model), "--data", str(manifest), "--layer", "no_such_stage",
              "--out", str(tmp_path / "c")], "no_such_stage", "not found")
    assert not (tmp_path / "c").exists()


def test_explain_reads_every_input_before_writing_any(phantom_model, tmp_path):
    """A corrupt second image: nothing is written for the first (its maps without its printed predictions)."""
    root, manifest, model, img = phantom_model
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    _refused(["explain", str(img), str(bad), "--model", str(model), "--method", "gradcam", "--out",
              str(tmp_path / "x")], "bad.png")
    assert not (tmp_path / "x").exists()



@pytest.mark.parametrize("cmd,option,value", [
    ("fit", "--init-keep", "1.5"), ("train", "--weight-decay", "-0.1"), ("train", "--copies", "1"),
    ("benchmark", "--gallery", "-1"),
])
def test_other_options_out_of_range_are_refused(tmp_path, cmd, option, value):
    _refused(_cmd(cmd, tmp_path) + [option, value], f"Invalid value for '{option}'")
    assert not (tmp_path / "out").exists()


def test_serve_and_gaze_ranges(tmp_path):
    _refused(["serve", "--model", str(tmp_path / "m"), "--port", "70000"], "Invalid value for '--port'")
    _refused(["serve", "--model", str(tmp_path / "m"), "--workers", "0"], "Invalid value for '--workers'")
    _refused(["data", "gaze", str(tmp_path), "--simulate", "--p-finding", "1.5"], "Invalid value for '--p-finding'")


def test_data_phantoms_takes_its_folder_as_an_argument_or_as_out(tmp_path):
    """`data phantoms OUT` as before, or `--out OUT` as `data ecg` takes it; neither or two different: exit 2."""
    runner = CliRunner()
    a, b, c = (str(tmp_path / v) for v in "abc")
    for args, folder in (([a], "a"), (["--out", b], "b"), ([c, "--out", c], "c")):
        res = runner.invoke(app, ["data", "phantoms", *args, "--n", "2", "--size", "16"])
        assert res.exit_code == 0, res.output
        assert (tmp_path / folder / "manifest.csv").is_file()
    res = runner.invoke(app, ["data", "phantoms", "--n", "2"])
    assert res.exit_code == 2 and "output folder" in res.output
    res = runner.invoke(app, ["data", "phantoms", str(tmp_path / "d"), "--out", str(tmp_path / "e"), "--n", "2"])
    assert res.exit_code == 2 and "two output folders" in " ".join(res.output.split())
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()


def test_benchmark_error_met_while_a_method_runs_leaves_out_as_it_was(phantom_model, tmp_path):
    """A --param that only fails when the method runs (rise.p=2) exits 2 and leaves no run.json or folder
    behind; in a folder that already holds a run, its run.json is kept as it was."""
    root, manifest, model, img = phantom_model
    base = ["benchmark", "--model", str(model), "--data", str(manifest), "--metrics", "relevance_mass",
            "--limit", "2", "--gallery", "0", "--no-progress"]
    out = tmp_path / "new" / "b"
    _refused(base + ["--methods", "rise", "--param", "rise.p=2", "--out", str(out)], "p must be in (0, 1]")
    assert not (tmp_path / "new").exists()
    done = tmp_path / "done"
    assert runner.invoke(app, base + ["--methods", "random", "--out", str(done)]).exit_code == 0
    before = (done / "run.json").read_text()
    _refused(base + ["--methods", "random,rise", "--param", "rise.p=2", "--out", str(done)], "p must be in (0, 1]")
    assert (done / "run.json").read_text() == before


@pytest.mark.parametrize("args", [["data", "phantoms", "OUT", "--n", "2", "--size", "16"],
                                  ["data", "ecg", "--out", "OUT", "--n", "2"],
                                  ["explain", "x.png", "--model", "m", "--out", "OUT"]])
@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_every_seed_is_checked_before_anything_runs(tmp_path, args, seed):
    """--seed takes [0, 2**32 - 1] (what NumPy, torch and scikit-learn accept) on every command: a seed outside
    is a usage error naming --seed (exit 2), not a traceback from deep inside, and nothing is written."""
    from typer.testing import CliRunner

    from nemt.cli import app

    out = tmp_path / "o"
    res = CliRunner().invoke(app, [a.replace("OUT", str(out)) for a in args] + ["--seed", seed])
    assert res.exit_code == 2 and "--seed" in res.output, res.output
    assert not out.exists()


def test_a_size_too_small_for_the_architecture_is_refused_before_training(tmp_path):
    """smallcnn halves its input four times: at --size 8 one input through it fails, which `train` reports as
    a usage error naming --size and the architecture, before training or writing anything."""
    from typer.testing import CliRunner

    from nemt.cli import app
    from nemt.data import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "d", 8, 16, seed=0)
    res = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "m"),
                                   "--arch", "smallcnn", "--size", "8"])
    assert res.exit_code != 0 and "--size 8x8: too small for smallcnn" in res.output, res.output
    assert not (tmp_path / "m").exists()


def test_version_and_a_size_with_an_empty_part():
    """`nemt --version` prints the package's version; `--size 32x` (an empty part) is refused, not read as 32."""
    from typer.testing import CliRunner

    from nemt import __version__
    from nemt.cli import _size, app

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"nemt {__version__}"
    assert _size("32x32") == (32, 32)
    for bad in ("32x", "x32", "32,,32"):
        with pytest.raises(NemtError, match="expected positive integers"):
            _size(bad)


def test_gaze_is_not_written_into_a_read_only_data_folder(tmp_path):
    """`data gaze --simulate` writes gaze.csv beside the manifest by default; a data folder without write
    permission bits (a shared, read-only copy; root could write there anyway) is refused with nothing written,
    and --out FILE elsewhere works."""
    import os

    from typer.testing import CliRunner

    from nemt.cli import app
    from nemt.data import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "d", 6, 16, seed=0).parent
    os.chmod(data, 0o555)
    try:
        res = CliRunner().invoke(app, ["data", "gaze", str(data), "--simulate", "--no-progress"])
        assert res.exit_code != 0 and "read-only" in res.output and not (data / "gaze.csv").exists()
        res = CliRunner().invoke(app, ["data", "gaze", str(data), "--simulate", "--no-progress",
                                       "--out", str(tmp_path / "g.csv")])
        assert res.exit_code == 0, res.output
        assert (tmp_path / "g.csv").is_file()
    finally:
        os.chmod(data, 0o755)


def test_methods_lists_plain_summaries():
    """`nemt methods` shows each method's first docstring paragraph as plain text: no reST literal quotes or
    roles, no sentence cut at the docstring's first line end."""
    from typer.testing import CliRunner

    from nemt.cli import _plain_summary, app

    res = CliRunner().invoke(app, ["methods"])
    assert res.exit_code == 0 and "``" not in res.output and ":class:" not in res.output
    assert _plain_summary("Uniform noise from ``seed``:\n    a :class:`~x.Random` map.\n\n    More.") == \
        "Uniform noise from seed: a Random map."


def test_a_repeated_item_in_a_list_option_counts_once():
    """`--layers stage1,stage1` or `--methods gradcam,,gradcam`: one item each, in the order first given."""
    from nemt.cli import _csv_list

    assert _csv_list("stage1, stage1,stage2") == ["stage1", "stage2"]
    assert _csv_list("gradcam,,ig,gradcam") == ["gradcam", "ig"] and _csv_list("") is None
