"""The command line's audit findings (explain --data's run key and index, explain's options, methods, demo):
each refusal is one line with exit status 2, before any work where the options alone decide it."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import folder_bytes, train_phantom_model
from nemt.cli import app

runner = CliRunner()
TINY_DEMO = ["--n", "40", "--size", "32", "--epochs", "1", "--fit-epochs", "1", "--bench-images", "4",
             "--bench-methods", "nemt,random", "--no-progress"]


def _ok(args) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def _refused(args, *needles) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    text = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and res.output.count("error:") == 1, res.output
    for needle in needles:
        assert needle in text, text
    return text


def _fit(model: Path, manifest: Path, out: Path, seed: int) -> Path:
    _ok(["fit", "--model", model, "--data", manifest, "--out", out, "--epochs", "1", "--batch-size", "8",
         "--seed", seed, "--no-progress"])
    return out


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """(root, manifest, model): 40 phantoms of 32 px and a 1-epoch smallcnn."""
    root = tmp_path_factory.mktemp("api-cli")
    manifest, model = train_phantom_model(root, n=40, size=32, threads=1)
    return root, manifest, model


def _explain(model, manifest, out, *extra):
    return ["explain", "--data", manifest, "--model", model, "--method", "gradcam", "--target", "predicted",
            "--out", out, "--no-progress", *extra]


def _index(out: Path) -> list[dict]:
    return json.loads((out / "explanations.json").read_text())


# A: the run key records checksums, not paths ---------------------------------------------------------------

def test_explain_data_key_is_the_models_weights_not_its_path(phantom, tmp_path):
    """The same model by an absolute path resumes (it was refused as 'other settings'); another model copied to
    the same path is refused (it was resumed, mixing two models' maps in one index)."""
    root, manifest, model = phantom
    mine = tmp_path / "m"
    shutil.copytree(model, mine)
    out = tmp_path / "x"
    _ok(_explain(mine, manifest, out, "--limit", "2"))
    _ok(_explain(mine.resolve(), manifest, out, "--limit", "2"))  # the same weights by another path
    assert len(_index(out)) == 2
    _ok(["train", "--data", manifest, "--out", tmp_path / "other", "--arch", "smallcnn", "--size", "32",
         "--epochs", "1", "--batch-size", "8", "--seed", "0", "--lr", "0.01", "--no-progress"])
    shutil.rmtree(mine)
    shutil.copytree(tmp_path / "other", mine)  # another model at the same path
    before = folder_bytes(out)
    _refused(_explain(mine, manifest, out, "--limit", "3"), "other settings", "model (weights checksum)",
             "use another --out")
    assert folder_bytes(out) == before


def test_explain_data_key_is_the_fitted_explainers_files_not_its_path(phantom, tmp_path):
    """Another fitted explainer at the same --explainer path is refused; --superpixelify slic:N of another N too."""
    root, manifest, model = phantom
    e = _fit(model, manifest, tmp_path / "e", seed=0)
    other = _fit(model, manifest, tmp_path / "e1", seed=1)
    args = ["explain", "--data", manifest, "--model", model, "--explainer", e, "--target", "all", "--out",
            tmp_path / "x", "--limit", "2", "--no-progress"]
    _ok(args)
    shutil.rmtree(e)
    shutil.copytree(other, e)
    _refused(args, "other settings", "fitted explainer")
    _ok(_explain(model, manifest, tmp_path / "s", "--limit", "1", "--superpixelify", "slic:4"))
    _refused(_explain(model, manifest, tmp_path / "s", "--limit", "1", "--superpixelify", "slic:9"),
             "--superpixelify segments")


# D: the index lists every item done in the folder, each with its files ----------------------------------

def test_explain_data_index_lists_every_item_of_the_folder(phantom, tmp_path):
    """--limit 2 then --limit 4 extends the run (the index lists all 4, not the last call's); a smaller limit
    lists them all still; another --split into the same --out is refused; an item whose map is gone is redone."""
    root, manifest, model = phantom
    out = tmp_path / "x"
    _ok(_explain(model, manifest, out, "--limit", "2"))
    _ok(_explain(model, manifest, out, "--limit", "4"))
    index = _index(out)
    assert len(index) == 4 and len({r["outputs"] for r in index}) == 4
    _ok(_explain(model, manifest, out, "--limit", "1"))
    assert _index(out) == index
    _refused(_explain(model, manifest, out, "--split", "val"), "other settings", "--split")
    victim = out / f"{index[3]['files'][0]}.npy"
    victim.unlink()
    _ok(_explain(model, manifest, out, "--limit", "4"))
    assert victim.is_file() and _index(out) == index
    for rec in index:
        for f in rec["files"]:
            assert (out / f"{f}.npy").is_file() and (out / f"{f}.png").is_file()


# F: --split and --limit without --data -------------------------------------------------------------------

@pytest.mark.parametrize("option,value", [("--split", "val"), ("--split", "test"), ("--limit", "1")])
def test_explain_files_refuse_split_and_limit(phantom, tmp_path, option, value):
    root, manifest, model = phantom
    img = sorted((root / "data" / "images").glob("*.png"))[0]
    _refused(["explain", img, "--model", model, "--method", "gradcam", "--out", tmp_path / "x", option, value],
             f"{option} applies to --data only")
    assert not (tmp_path / "x").exists()


# E: nemt methods tells explanation-time parameters from fit options ----------------------------------------

def test_methods_lists_a_fitted_explainers_parameters_apart(phantom, tmp_path):
    """`nemt methods` listed all of NEMt's 45 parameters as explain's --param, which refuses all but the
    explanation-time ones for a fitted explainer: now those are listed apart, each parameter with its default."""
    from nemt.cli import _method_parameters
    from nemt.explainers.base import _REGISTRY

    nemt_cls = _REGISTRY["nemt"]
    late = list(nemt_cls.EXPLANATION_TIME_PARAMS)
    text = _method_parameters(nemt_cls)
    now, _, fitted = text.partition("Fixed when it is fitted")
    assert fitted and "nemt fit" in fitted
    for name in late:
        assert f"{name}=" in now and f"{name}=" not in fitted
    assert "areas=(0.01, 0.025" in fitted and "epochs=10" in fitted and "epochs" not in now
    assert "none." in _method_parameters(_REGISTRY["nem"]).split("Fixed")[0]  # NEM takes none once fitted
    assert "n_masks=4000" in _method_parameters(_REGISTRY["rise"])
    assert "Fixed" not in _method_parameters(_REGISTRY["rise"])
    _ok(["methods"])
    # what it says holds: an explanation-time parameter is taken by a fitted explainer, a fit option refused
    root, manifest, model = phantom
    e = _fit(model, manifest, tmp_path / "e", seed=0)
    img = sorted((root / "data" / "images").glob("*.png"))[0]
    base = ["explain", img, "--model", model, "--explainer", e, "--out", tmp_path / "x"]
    _ok(base + ["--param", "map_smoothing=true"])
    _refused(base + ["--param", "epochs=3"], "epochs")


# B, C: the demo checks every option first; its refusals name its own remedies ------------------------------

@pytest.mark.parametrize("option,value,needle", [
    ("--bench-methods", "nemt,bogus", "unknown method(s) 'bogus'"),
    ("--bench-methods", ",", "no method"),
    ("--bench-methods", "nemt,nem", "nem needs an explainer fitted for it"),
    ("--bench-methods", "prototypes", "prototypes explains a pantypes model only"),
    ("--arch", "nope", "--arch 'nope': not an architecture"),
])
def test_demo_checks_every_option_before_stage_1(tmp_path, option, value, needle):
    """A bad --bench-methods or --arch was found only at the stage using it (after the phantoms, the training
    and the fit): now refused before anything is written."""
    args = ["demo", "--out", tmp_path / "d", *TINY_DEMO, option, value]
    _refused(args, needle)
    assert not (tmp_path / "d").exists()


def test_demo_error_names_the_demos_remedies():
    """The stages' refusals suggest --overwrite, --fresh, an 'output folder' or --allow-collapse, none of
    them the demo's: the demo names --restart or another --out instead."""
    from nemt.cli import _demo_error
    from nemt.errors import NemtError

    for msg in ("d/data: holds a `nemt data phantoms` data set of other settings (n); nothing was changed: pass "
                "--overwrite to replace it, or choose another folder",
                "d/model holds a run with other config.epochs; use another --out or --fresh",
                "d/explainer holds an explainer trained with other epochs; use another output folder",
                "d/benchmark: holds a run with other seed; use another --out or --restart"):
        text = str(_demo_error(NemtError(msg)))
        assert "--restart" in text and "another --out" in text, text
        assert "--overwrite" not in text and "--fresh" not in text and "output folder" not in text, text
        assert text.startswith(msg.rpartition("; ")[0]), text
    text = str(_demo_error(NemtError("d/data: holds a data set (manifest.csv) that `nemt data phantoms` did not "
                                     "write; nothing was changed: choose another folder")))
    assert text.endswith("give the demo another --out"), text  # --restart never removes a user's data set
    text = str(_demo_error(NemtError("NEMt collapsed for target(s) a: ... Pass --allow-collapse to save it anyway")))
    assert "the demo has no such option" in text and "--seed" in text
    other = NemtError("the train split is empty; add data or change the fractions")
    assert _demo_error(other) is other


def test_demo_refusal_names_restart_and_restart_clears_what_the_demo_wrote(tmp_path):
    """A demo into a folder of another demo's phantoms was told to 'pass --overwrite' (no demo option); now
    --restart, which removes (once the options are checked) the demo's own files only, and then runs."""
    from nemt.data import write_phantom_dataset

    out = tmp_path / "d"
    write_phantom_dataset(out / "data", 48, 32, task="multiclass", seed=0)  # another demo's phantoms (--n 48)
    (out / "notes.txt").write_text("mine")
    (out / "benchmark").mkdir()
    (out / "benchmark" / "run.json").write_text("{}")  # an earlier run's
    before = folder_bytes(out)
    text = _refused(["demo", "--out", out, *TINY_DEMO], "other settings", "--restart", "another --out")
    assert "--overwrite" not in text
    # --restart with a bad option: refused before anything is removed
    _refused(["demo", "--out", out, *TINY_DEMO, "--restart", "--bench-methods", "bogus"], "unknown method")
    assert folder_bytes(out) == before
    _ok(["demo", "--out", out, *TINY_DEMO, "--restart"])
    assert (out / "notes.txt").read_text() == "mine"
    images = sorted(p.name for p in (out / "data" / "images").iterdir())
    assert len(images) == 40 and "00047.png" not in images  # the 48-image set's files removed
    assert (out / "benchmark" / "results.csv").is_file()


def test_demo_rerun_resumes_with_the_same_results(tmp_path):
    """`nemt demo` run twice into one folder (two processes of other hash seeds, as two shell commands are): the
    second run reuses every stage and ends with the same results. Before the explainer-card fix (commit 655c8d8,
    nemt.explainers.nemt: a card's parameters in sorted order, not the hash seed's) the second run was refused at
    the benchmark: 'holds a run with other fitted explainer of nemt; use another --out or --restart'."""
    import os
    import subprocess
    import sys

    out = tmp_path / "d"
    cmd = [sys.executable, "-m", "nemt", "demo", "--out", str(out), *TINY_DEMO]
    runs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        runs.append((out / "benchmark" / "results.csv").read_text())
    assert "resuming" in p.stdout + p.stderr
    assert runs[0] == runs[1]
    with open(out / "benchmark" / "results.csv", newline="") as fh:
        assert {r["method"] for r in csv.DictReader(fh)} == {"nemt", "random"}


def test_train_takes_the_number_of_axes_from_the_data_when_size_is_one_number(tmp_path):
    """`train --size 16` on volumes read the size as 16x16 and refused with 'the size gives 2 sizes' (audit)."""
    from nemt.data import write_phantom_dataset
    from nemt.models import load_model
    manifest = write_phantom_dataset(tmp_path / "d", 16, 16, spatial_dims=3, seed=0)
    res = CliRunner().invoke(app, ["train", "--data", str(manifest), "--out", str(tmp_path / "m"), "--arch",
                                   "smallcnn", "--size", "16", "--epochs", "1", "--batch-size", "8", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert load_model(tmp_path / "m").card.input_size == [16, 16, 16]
