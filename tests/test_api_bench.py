"""The benchmark's audit (bench runner, report, fidelity, localisation, XAI-TRIS suite, seed summary): bad input
refused before any work with a clear error, resumes that never mix two runs or two data sets, reports that say
what they cover."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from nemt.bench.runner import RunConfig, run_benchmark
from nemt.cli import app
from nemt.errors import NemtError
from nemt.explainers import get_explainer

from conftest import Interrupted, bench_setup, folder_bytes, train_phantom_model

ROOT = Path(__file__).resolve().parents[1]


def _text(res) -> str:
    return " ".join(res.output.split())  # the console wraps long lines




class _Counting:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def explain(self, x, target=None):
        self.calls += 1
        return self.inner.explain(x, target)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """Phantoms (40 images, 32 px; normal images have an empty mask file) and a 1-epoch smallcnn."""
    root = tmp_path_factory.mktemp("phantom")
    manifest, model = train_phantom_model(root, n=40, size=32)
    return root, manifest, model


def _bench(phantom, out, *extra, data=None, metrics="relevance_mass,pointing_game", methods="random,sobel"):
    _, manifest, model = phantom
    return CliRunner().invoke(app, ["benchmark", "--model", str(model), "--data", str(data or manifest), "--out",
                                    str(out), "--limit", "4", "--methods", methods, "--metrics", metrics,
                                    "--gallery", "0", "--metric-workers", "0", "--no-progress", *extra])


# ---------------------------------------------------------------- 1: metric parameters checked up front

@pytest.mark.parametrize("param, message", [
    ("relevance_mass.bogus=1", "metric 'relevance_mass' has no parameter ['bogus']; its parameters are "
                               "['abs', 'normalise']"),
    ("faithfulness_estimate.features_in_step=abc", "features_in_step must be int or None, got 'abc'"),
    ("faithfulness_estimate.features_in_step=-3", "features_in_step must be a whole number >= 1, got -3"),
    ("faithfulness_estimate.batch_size=0", "batch_size must be a whole number >= 1, got 0"),
    ("relevance_mass.normalise=foo", "metric 'relevance_mass' cannot run with --param relevance_mass.normalise=foo"),
    ("deletion_auc.return_curve=true", "not one value per map"),
])
def test_cli_bad_metric_param_is_one_line_exit_2_before_any_work(phantom, tmp_path, param, message):
    res = _bench(phantom, tmp_path / "b", "--param", param,
                 metrics="relevance_mass,faithfulness_estimate,deletion_auc")
    assert res.exit_code == 2, res.output
    assert message in _text(res) and "Traceback" not in res.output
    assert not (tmp_path / "b").exists()  # nothing explained, nothing written


def test_api_bad_metric_params_raise_before_any_map_is_made(tmp_path):
    clf, data = bench_setup()
    ex = _Counting(get_explainer("sobel", clf))
    for params, match in (({"relevance_mass": {"bogus": 1}}, "has no parameter"),
                          ({"faithfulness_estimate": {"batch_size": 0}}, "whole number >= 1"),
                          ({"faithfulness_estimate": {"baseline": "nope"}}, "unknown baseline"),
                          ({"relevance_mass": {"abs": 1}}, "abs must be bool"),
                          ({"sparseness": {}}, "not a metric of this run")):
        cfg = RunConfig(["sobel"], ["relevance_mass", "faithfulness_estimate"], metric_params=params)
        with pytest.raises(NemtError, match=match):
            run_benchmark(clf, data, {"sobel": ex}, cfg, tmp_path / "b", progress=False)
    assert ex.calls == 0 and not (tmp_path / "b").exists()
    state = torch.random.get_rng_state()  # the trial call leaves the caller's random state alone
    cfg = RunConfig(["sobel"], ["faithfulness_estimate"], metric_params={"faithfulness_estimate":
                                                                         {"features_in_step": 32}})
    run_benchmark(clf, data, {"sobel": ex}, cfg, tmp_path / "ok", progress=False)
    assert torch.equal(state, torch.random.get_rng_state())


# ---------------------------------------------------------------- 2, 3, 10, 17: data, facts

def test_resume_is_refused_when_an_image_changed_under_the_same_name(phantom, tmp_path):
    root, manifest, _ = phantom
    shutil.copytree(manifest.parent, tmp_path / "data")
    res = _bench(phantom, tmp_path / "b", data=tmp_path / "data" / "manifest.csv")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp_path / "b" / "results.csv")))
    img = tmp_path / "data" / "images" / rows[0]["image"]
    Image.fromarray(255 - np.array(Image.open(img))).save(img)  # the same manifest bytes, another image
    before = folder_bytes(tmp_path / "b")
    res = _bench(phantom, tmp_path / "b", data=tmp_path / "data" / "manifest.csv")
    assert res.exit_code == 2 and "holds a run with other data" in _text(res), res.output
    assert folder_bytes(tmp_path / "b") == before


def test_other_data_than_the_models_is_evaluated_with_a_warning_recorded(phantom, tmp_path):
    """External validation is allowed, but said: both checksums in a warning, run.json and the report."""
    from nemt.data import write_phantom_dataset
    _, _, model = phantom
    other = write_phantom_dataset(tmp_path / "other", 40, 32, seed=1)  # the same image names, other images
    res = _bench(phantom, tmp_path / "b", data=other)
    assert res.exit_code == 0, res.output
    card = json.loads((model / "model.json").read_text())["data"]["sha256"]
    from nemt.data.manifest import open_dataset
    theirs = open_dataset(other).fingerprint()
    said = _text(res)
    assert "warning:" in said and card in said and theirs in said and "applied by image name" in said
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["other_data"]["model_data_sha256"] == card and run["other_data"]["data_sha256"] == theirs
    assert "- data check: not the data the model was trained on" in (tmp_path / "b" / "report.md").read_text()
    # the model's own data: no warning, nothing recorded
    res = _bench(phantom, tmp_path / "own")
    assert res.exit_code == 0 and "warning" not in res.output
    assert "other_data" not in json.loads((tmp_path / "own" / "run.json").read_text())


def test_report_facts_count_empty_masks_as_the_note_does_and_list_metric_parameters(phantom, tmp_path):
    res = _bench(phantom, tmp_path / "b", "--limit", "8", "--param", "relevance_mass.abs=true")
    assert res.exit_code == 0, res.output
    report = (tmp_path / "b" / "report.md").read_text()
    facts = re.search(r"items \((\d+) without ground truth", report)
    note = re.search(r"Items without ground truth \(excluded from the localisation means\): (\d+)", report)
    assert facts and note and facts.group(1) == note.group(1) != "0", report  # normal images: empty mask files
    assert '- metric parameters: {"relevance_mass": {"abs": true}}' in report
    assert "- parameters: defaults" in report  # the methods'


# ---------------------------------------------------------------- 4, 11-14: shards, merge, restart

def test_shards_of_another_count_are_refused_before_any_work_and_restart_clears_them(tmp_path):
    clf, data = bench_setup()
    ex = _Counting(get_explainer("sobel", clf))
    cfg = RunConfig(["sobel"], ["relevance_mass"], batch_size=2)
    run_benchmark(clf, data, {"sobel": ex}, cfg, tmp_path, progress=False, shard=(0, 3))
    calls = ex.calls
    with pytest.raises(NemtError, match=r"split 3 ways \(0-of-3\); this run is split 2 ways.*--restart"):
        run_benchmark(clf, data, {"sobel": ex}, cfg, tmp_path, progress=False, shard=(1, 2))
    assert ex.calls == calls and not (tmp_path / "shards" / "1-of-2").exists()
    from nemt.bench.runner import clear_run
    clear_run(tmp_path, (1, 2))  # --restart of shard 1 of 2: its folder and those of another split
    assert not (tmp_path / "shards" / "0-of-3").exists()
    got = run_benchmark(clf, data, {"sobel": ex}, cfg, tmp_path, progress=False, shard=(1, 2))
    assert got["rows"] > 0


def test_torchrun_with_another_process_count_is_refused_up_front(phantom, tmp_path):
    _, manifest, model = phantom
    args = ["benchmark", "--model", str(model), "--data", str(manifest), "--methods", "random", "--metrics",
            "relevance_mass", "--batch-size", "2", "--limit", "4", "--gallery", "0", "--metric-workers", "0",
            "--no-progress", "--out", str(tmp_path / "b")]
    res = CliRunner().invoke(app, args + ["--shard", "0/3"])
    assert res.exit_code == 0, res.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                          "-m", "nemt", *args], env=env, capture_output=True, text=True, timeout=300)
    said = " ".join((two.stdout + two.stderr).split())
    assert two.returncode != 0 and "split 3 ways" in said and "--restart" in said, said[-2000:]
    assert not (tmp_path / "b" / "shards" / "0-of-2").exists()  # nothing computed
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                          "-m", "nemt", *args, "--restart"], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "b" / "shards").iterdir()) == ["0-of-2", "1-of-2"]
    assert (tmp_path / "b" / "results.csv").is_file()


def test_a_killed_restart_leaves_no_output_of_the_earlier_run(phantom, tmp_path, monkeypatch):
    import nemt.bench.runner as runner
    assert _bench(phantom, tmp_path / "b").exit_code == 0
    assert (tmp_path / "b" / "results.csv").is_file() and (tmp_path / "b" / "report.html").is_file()

    def killed(*a, **k):
        raise Interrupted

    monkeypatch.setattr(runner, "_explain_and_score", killed)
    _, manifest, model = phantom
    with pytest.raises(Interrupted):
        runner.benchmark_model(model, manifest, tmp_path / "b", methods=["random"], metrics=["sparseness"], limit=4,
                               gallery=0, progress=False, restart=True)
    left = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert not set(left) & {"results.csv", "summary.csv", "summary.md", "summary.json", "report.html",
                            "report.md", "results.partial.csv"}, left


def test_a_bad_restart_keeps_the_earlier_results(phantom, tmp_path):
    """--restart forgets the earlier run only once the new one's options passed their checks."""
    assert _bench(phantom, tmp_path / "b").exit_code == 0
    before = folder_bytes(tmp_path / "b")
    res = _bench(phantom, tmp_path / "b", "--restart", "--param", "relevance_mass.bogus=1")
    assert res.exit_code == 2 and folder_bytes(tmp_path / "b") == before


def test_merge_of_shards_with_other_parameters_writes_nothing(phantom, tmp_path):
    for i in range(2):
        assert _bench(phantom, tmp_path / "b", "--shard", f"{i}/2").exit_code == 0
    before = folder_bytes(tmp_path / "b")
    res = _bench(phantom, tmp_path / "b", "--merge", "--param", "relevance_mass.abs=true")
    assert res.exit_code == 2 and "other metric_params" in _text(res), res.output
    assert folder_bytes(tmp_path / "b") == before  # no results.partial.csv, no run.json
    res = _bench(phantom, tmp_path / "b", "--merge")
    assert res.exit_code == 0 and (tmp_path / "b" / "results.csv").is_file(), res.output


def test_shard_and_merge_together_are_refused(phantom, tmp_path):
    res = _bench(phantom, tmp_path / "b", "--shard", "0/2", "--merge")
    assert res.exit_code == 2 and "give --shard or --merge, not both" in _text(res), res.output
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("option", [["--shard", "0/2"], ["--merge"]])
def test_shard_or_merge_under_torchrun_is_refused(phantom, tmp_path, monkeypatch, option):
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = _bench(phantom, tmp_path / "b", *option)
    assert res.exit_code == 2 and "do not run under torchrun (WORLD_SIZE=2)" in _text(res), res.output
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------- 9, 18, 19: summary and report

def test_interval_method_is_fixed_per_metric_and_clipped_to_its_range():
    from nemt.bench.runner import summarise_results
    from nemt.metrics import summarise
    ranks = [1.0, 1.0, 0.0, 1.0, 1.0]  # a continuous metric whose values happen to be 0 or 1
    near = [0.99, 0.97, 1.0, 0.98, 0.60]  # a t interval over 1
    rows = [{"method": "m", "relevance_rank": r, "pointing_game": r, "relevance_mass": v, "complexity": v,
             "faithfulness_estimate": -v, "ms": 1.0} for r, v in zip(ranks, near)]
    s = summarise_results(rows, ["m"], ["relevance_rank", "pointing_game", "relevance_mass", "complexity",
                                        "faithfulness_estimate"])["m"]
    t = summarise(ranks, method="t")
    assert (s["relevance_rank"]["ci_low"], s["relevance_rank"]["ci_high"]) == (t["ci_low"], min(1.0, t["ci_high"]))
    w = summarise(ranks, method="wilson")
    assert (s["pointing_game"]["ci_low"], s["pointing_game"]["ci_high"]) == (w["ci_low"], w["ci_high"])
    assert summarise(near, method="t")["ci_high"] > 1 and s["relevance_mass"]["ci_high"] == 1.0
    assert s["faithfulness_estimate"]["ci_low"] == -1.0  # a correlation: [-1, 1]
    assert s["complexity"]["ci_high"] == summarise(near, method="t")["ci_high"] > 1  # no range: not clipped
    # a value outside the documented range (signed maps): the range does not hold, nothing is clipped
    out = summarise_results([{"method": "m", "relevance_mass": v, "ms": 1.0} for v in (1.3, 0.9, 1.1)], ["m"],
                            ["relevance_mass"])["m"]["relevance_mass"]
    assert out["ci_high"] == summarise([1.3, 0.9, 1.1], method="t")["ci_high"]


def test_html_report_highlights_every_method_tied_at_the_best_mean():
    from nemt.bench.report import html_table
    cell = {"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 5, "n_excluded": 0}
    summary = {"a": {"pointing_game": dict(cell), "ms": 1.0}, "b": {"pointing_game": dict(cell), "ms": 1.0},
               "c": {"pointing_game": {**cell, "mean": 0.1}, "ms": 1.0}}
    rows = {r.split("</th>")[0].split("<th>")[-1]: r for r in html_table(summary, ["pointing_game"]).split("<tr>")
            if r.startswith("<th>") and "method" not in r}
    assert 'class="best"' in rows["a"] and 'class="best"' in rows["b"] and 'class="best"' not in rows["c"]


def test_an_empty_split_names_the_split_and_the_models_splits_file(phantom, tmp_path):
    _, manifest, model = phantom
    shutil.copytree(model, tmp_path / "m")
    raw = (tmp_path / "m" / "splits.csv").read_bytes()
    (tmp_path / "m" / "splits.csv").write_bytes(re.sub(rb",val(\r?\n)", rb",train\1", raw))
    res = CliRunner().invoke(app, ["benchmark", "--model", str(tmp_path / "m"), "--data", str(manifest), "--out",
                                   str(tmp_path / "b"), "--split", "val", "--methods", "random", "--no-progress"])
    said = _text(res)
    assert res.exit_code == 2 and "--split val: the model's val split is empty" in said, res.output
    assert "splits.csv" in said and "val 0" in said
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------- 15: the XAI-TRIS suite

@pytest.mark.parametrize("extra, named", [(["--model", "m"], "--model"), (["--data", "d"], "--data"),
                                          (["--shard", "0/2"], "--shard"), (["--metrics", "pointing_game"],
                                                                            "--metrics")])
def test_suite_refuses_options_that_do_not_apply(tmp_path, extra, named):
    res = CliRunner().invoke(app, ["benchmark", "--suite", "xai-tris", "--out", str(tmp_path / "s"),
                                   "--no-progress", *extra])
    assert res.exit_code == 2 and f"--suite xai-tris: {named}" in _text(res) and "do(es) not apply" in _text(res)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("kw, match", [
    ({"methods": ["saliency", "bogus"]}, r"unknown method\(s\) \['bogus'\]"),
    ({"methods": ["rise"], "params": {"rise": {"bogus": 1}}}, "method 'rise' has no parameter"),
    ({"methods": ["saliency"], "params": {"emd_score": {"max_side": "big"}}}, "max_side must be int"),
    ({"methods": ["saliency"], "params": {"relevance_mass": {"abs": True}}}, "nor a suite metric"),
])
def test_suite_checks_methods_and_parameters_before_training(tmp_path, kw, match):
    from nemt.bench.xaitris import run_suite
    with pytest.raises(NemtError, match=match):
        run_suite(tmp_path / "s", scenarios=["lin"], backgrounds=["white"], n=200, epochs=1, max_samples=2,
                  models=("linear",), progress=False, **kw)
    assert not (tmp_path / "s").exists()  # no model trained


# ---------------------------------------------------------------- 16: localisation without masks

def test_score_methods_without_a_masked_image_says_so():
    from nemt.bench.localisation import score_methods
    clf, data = bench_setup(n=4)
    with pytest.raises(NemtError, match="none of the 4 images has a non-empty ground-truth mask"):
        score_methods(clf, data.x, torch.zeros(4, dtype=torch.long), torch.zeros_like(data.gt), {}, ["sobel"])


# ---------------------------------------------------------------- 6-8: fidelity

class _Student:
    """What fidelity_report reads of a student: a teacher (Sobel) and maps that are constant for even items."""

    teacher, teacher_params, teacher_seed, teacher_seconds_ = "sobel", {}, 0, None
    device = torch.device("cpu")

    def __init__(self, model):
        self.model = model

    def make_teacher(self):
        return get_explainer("sobel", self.model)

    def explain(self, x, target=None):
        maps = get_explainer("sobel", self.model).explain(x, target)
        return maps * torch.tensor([float(i % 2) for i in range(len(x))]).view(-1, 1, 1, 1)


def test_fidelity_headline_says_how_many_maps_each_figure_covers(tmp_path):
    from nemt.bench.fidelity import fidelity_report, markdown
    clf, data = bench_setup(n=4, empty_masks=(2,))  # item 2 has a mask file, but an empty one
    data.items = data.items[:3]  # items 1 and 2 have a mask file
    rep = fidelity_report(_Student(clf), data, tmp_path / "f", batch_size=4, progress=False, log=lambda s: None)
    assert rep["n_with_mask"] == 1  # the empty mask is no mask
    assert rep["pearson"]["n"] == 1 and rep["pearson"]["n_undefined"] == 2  # constant student maps
    head = (tmp_path / "f" / "fidelity.md").read_text().splitlines()[0]
    assert "(1 with a non-empty mask)" in head and "Pearson " in head
    assert re.search(r"Pearson -?\d\.\d{3} \(n = 1 of 3; 2 undefined", head) and "±" not in head, head
    two = {**rep, "pearson": {"mean": 0.5, "sd": 0.1, "n": 2, "n_undefined": 0}}
    assert "Pearson 0.500 ± 0.100 (n = 2 of 3)" in markdown(two)


def test_fidelity_refuses_another_seed_and_says_a_folder_holds_other_items(tmp_path):
    from nemt.bench.fidelity import fidelity_report
    clf, data = bench_setup(n=6)
    student = _Student(clf)
    with pytest.raises(NemtError, match=r"--seed 3: .*teacher seed 0"):
        fidelity_report(student, data, tmp_path / "f", seed=3, progress=False, log=lambda s: None)
    from nemt.bench.fidelity import teacher_seed
    assert not (tmp_path / "f").exists() and teacher_seed(student, None) == teacher_seed(student, 0) == 0
    fidelity_report(student, data, tmp_path / "f", progress=False, log=lambda s: None)
    data.items = data.items[:4]  # another --limit
    with pytest.raises(NemtError, match=r"holds the teacher's maps of other items .*delete .* to start over"):
        fidelity_report(student, data, tmp_path / "f", progress=False, log=lambda s: None)


def test_cli_fidelity_help_says_the_seed_is_the_students():
    res = CliRunner().invoke(app, ["fidelity", "--help"], env={"COLUMNS": "200"})
    assert "teacher seed" in _text(res)


# ---------------------------------------------------------------- 5: seed summary

def _seed_summary(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "seed_summary.py"), *args], capture_output=True,
                          text=True, timeout=120)


def _fake_run(folder: Path, seed: int, *, split="test", model=None, metrics=("relevance_mass", "pointing_game"),
              rm=0.5, data="d" * 64, given=None, settings=None, arch="smallcnn"):
    folder.mkdir(parents=True)
    meta = {"methods": ["nemt"], "metrics": list(metrics), "batch_size": 16, "seed": seed, "items": 40,
            "data": f"fp{seed}", "metric_params": {}, "method_params": {"nemt": given or {}},
            "model_sha256": model or f"{seed:064d}", "explainer_sha256": {"nemt": f"e{seed}"}, "split": split,
            "limit": None, "data_set_sha256": data, "model_config": {"arch": arch, "training_seed": seed}}
    if settings is not None:
        meta["method_settings"] = {"nemt": settings}
    cell = {"ci_low": 0.0, "ci_high": 1.0, "n": 40, "n_excluded": 0, "n_undefined": 0}
    summary = {"nemt": {**{m: {**cell, "mean": rm if m == "relevance_mass" else 0.8} for m in metrics}, "ms": 2.0,
                        "n_items": 40}}
    (folder / "run.json").write_text(json.dumps(meta))
    (folder / "summary.json").write_text(json.dumps(summary))
    return str(folder)


def test_seed_summary_averages_alike_runs_only(tmp_path):
    """Runs that differ in their seed only (the explainer's and the classifier's own training seed: the demo
    trains a classifier per seed, which was refused as "another model configuration") are averaged."""
    a = _fake_run(tmp_path / "s0", 0, rm=0.4)
    b = _fake_run(tmp_path / "s1", 1, rm=0.6)
    c = _fake_run(tmp_path / "s2", 2, rm=0.5, metrics=("relevance_mass",))
    done = _seed_summary(a, b, c, "--metrics", "relevance_mass,pointing_game")
    assert done.returncode == 0, done.stderr
    assert "| nemt | 3 | 0.500 ± 0.100 | 0.800 ± 0.000 (n = 2) | 2.0 |" in done.stdout, done.stdout
    for folder, kw, msg in (("val", {"split": "val"}, "another split"),
                            ("dup", {"model": f"{0:064d}"}, "same replicate"),
                            ("other", {"data": "e" * 64}, "another data set"),
                            ("arch", {"arch": "resnet18"}, "another model configuration")):
        d = _fake_run(tmp_path / folder, 0 if folder == "dup" else 5, **kw)
        done = _seed_summary(a, d, "--metrics", "relevance_mass")
        assert done.returncode == 2 and msg in done.stderr and "Traceback" not in done.stderr, done.stderr
    only = ["--metrics", "relevance_mass"]
    assert _seed_summary(a, str(tmp_path / "dup"), "--allow-duplicates", *only).returncode == 0
    assert _seed_summary(a, str(tmp_path / "other"), "--allow-other-data", *only).returncode == 0
    done = _seed_summary(a, b, "--metrics", "pointing_gam")
    assert done.returncode == 2 and "['pointing_gam'] in none of the runs' summaries" in done.stderr, done.stderr
    done = _seed_summary(a, str(tmp_path / "missing"))
    assert done.returncode == 2 and "missing: no such folder" in done.stderr and "Traceback" not in done.stderr


def test_seed_summary_compares_the_settings_runs_ran_with_where_recorded(tmp_path):
    """A parameter given explicitly at its default is the same run as one left at the default when both run.json
    record the settings; without them the parameters are compared as given (the default may have changed)."""
    only = ["--metrics", "relevance_mass"]
    same = {"map_smoothing": False, "objective": "nested"}
    a = _fake_run(tmp_path / "a", 0, given={"map_smoothing": False}, settings=same)
    b = _fake_run(tmp_path / "b", 1, given={}, settings=same)
    assert _seed_summary(a, b, *only).returncode == 0
    c = _fake_run(tmp_path / "c", 2, given={}, settings={**same, "map_smoothing": True})
    done = _seed_summary(a, c, *only)
    assert done.returncode == 2 and "other parameters of nemt" in done.stderr, done.stderr
    d = _fake_run(tmp_path / "d", 3, given={})  # an older run.json: no settings, so compared as given
    done = _seed_summary(a, d, *only)
    assert done.returncode == 2 and "other parameters of nemt" in done.stderr, done.stderr


def test_seed_summary_reads_a_real_run(phantom, tmp_path):
    """A benchmark's run.json records what seed_summary compares: split, limit, data set, model configuration,
    each method's settings with its defaults."""
    assert _bench(phantom, tmp_path / "b").exit_code == 0
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["split"] == "test" and run["limit"] == 4 and len(run["data_set_sha256"]) == 64
    assert run["model_config"]["arch"] == "smallcnn"
    assert set(run["method_settings"]) == set(run["methods"])
    for method, settings in run["method_settings"].items():
        assert "seed" not in settings and "device" not in settings
        if method == "nemt":  # a fitted explainer: its card's parameters
            assert settings["map_smoothing"] is False and "objective" in settings
    done = _seed_summary(str(tmp_path / "b"), str(tmp_path / "b"))
    assert done.returncode == 2 and "same replicate" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------- 20: README

def test_readme_names_each_commands_own_start_over_option():
    text = (ROOT / "README.md").read_text()
    line = next(ln for ln in text.splitlines() if "resume;" in ln and "start over" in ln)
    named = re.findall(r"`(train|fit|benchmark) (--[a-z-]+)`", line)
    assert ("train", "--fresh") in named and ("benchmark", "--restart") in named
    for command, option in named:
        res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert option in res.output, (command, option)


def test_explainer_settings_are_the_defaults_with_the_given_parameters_over_them():
    from torch import nn

    from nemt.explainers import get_explainer
    from nemt.explainers.base import explainer_settings
    from nemt.explainers.nemt import NEMt
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 3))
    size = {"input_size": (16, 16), "in_channels": 1}
    rise = explainer_settings(get_explainer("rise", net, n_masks=10, seed=3), {"n_masks": 10})
    assert rise["n_masks"] == 10 and "seed" not in rise and "device" not in rise
    assert explainer_settings(get_explainer("rise", net), {}) == {**rise, "n_masks": get_explainer("rise", net).n_masks}
    assert explainer_settings(NEMt(net, map_smoothing=False, **size)) == explainer_settings(NEMt(net, **size))
    assert explainer_settings(NEMt(net, map_smoothing=True, **size)) != explainer_settings(NEMt(net, **size))
    json.dumps(explainer_settings(get_explainer("gradcam++", net), {}))  # JSON whatever the defaults hold


def test_a_constant_maps_nan_on_an_item_with_a_lesion_is_undefined_not_excluded():
    """A localisation metric is NaN for an item without a lesion (excluded) and for a constant map (undefined: a
    failing explainer, which must show in the report, not pass as 'no ground truth')."""
    from nemt.bench.runner import summarise_results
    nan = float("nan")
    rows = [{"method": "m", "has_gt": h, "pointing_game": v, "ms": 1.0}
            for h, v in (("True", 1.0), ("True", 0.0), ("True", nan), ("False", nan), ("False", nan))]
    s = summarise_results(rows, ["m"], ["pointing_game"])["m"]["pointing_game"]
    assert (s["n"], s["n_undefined"], s["n_excluded"], s["mean"]) == (2, 1, 2, 0.5)
