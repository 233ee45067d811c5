"""The benchmark runner: items, scores, resume after an interruption, summary, report; the CLI end to end."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from nemt.bench.runner import RunConfig, make_items, markdown_summary, run_benchmark, tie_notes
from nemt.cli import app
from nemt.data import write_phantom_dataset
from nemt.explainers import get_explainer
from nemt.models import Classifier, build_model

from conftest import Interrupted, bench_setup, folder_bytes, train_phantom_model




class _Counting:
    def __init__(self, inner, fail_at=None):
        self.inner, self.calls, self.fail_at = inner, 0, fail_at

    def explain(self, x, target=None):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise Interrupted
        return self.inner.explain(x, target)


def test_make_items_per_task():
    y = torch.tensor([[1, 0, 1], [0, 0, 0]])
    items = make_items(y, "multilabel", ["p", "q", "r"], ["i0", "i1"], [True, False])
    assert [(it.sample, it.target, it.label) for it in items] == [(0, 0, "p"), (0, 2, "r")]
    items = make_items(torch.tensor([2, 0]), "multiclass", ["p", "q", "r"], ["i0", "i1"], [True, False])
    assert [(it.target, it.has_gt) for it in items] == [(2, True), (0, False)]


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path):
    clf, data = bench_setup()
    metrics = ["relevance_mass", "pointing_game", "complexity", "faithfulness_estimate"]
    cfg = RunConfig(["gradcam", "sobel"], metrics, batch_size=3, metric_params={"faithfulness_estimate":
                                                                                {"features_in_step": 32}})
    full = run_benchmark(clf, data, {"gradcam": get_explainer("gradcam", clf), "sobel": get_explainer("sobel", clf)},
                         cfg, tmp_path / "a", progress=False)
    flaky = _Counting(get_explainer("gradcam", clf), fail_at=3)
    with pytest.raises(Interrupted):
        run_benchmark(clf, data, {"gradcam": flaky, "sobel": get_explainer("sobel", clf)}, cfg, tmp_path / "b",
                      progress=False)
    assert not (tmp_path / "b" / "results.csv").exists()  # nothing final written by an interrupted run
    again = _Counting(get_explainer("gradcam", clf))
    resumed = run_benchmark(clf, data, {"gradcam": again, "sobel": get_explainer("sobel", clf)}, cfg,
                            tmp_path / "b", progress=False)
    assert again.calls == 2  # 4 chunks of gradcam; 2 were done before the interruption
    for method in full:
        for m in metrics:
            a, b = full[method][m], resumed[method][m]
            assert (math.isnan(a["mean"]) and math.isnan(b["mean"])) or abs(a["mean"] - b["mean"]) < 1e-12
    rows = list(csv.DictReader(open(tmp_path / "b" / "results.csv")))
    assert len(rows) == 2 * len(data.items)
    # normal images (no ground truth) are excluded from localisation and counted; not from complexity
    s = full["gradcam"]["relevance_mass"]
    assert s["n_excluded"] == sum(not it.has_gt for it in data.items) == 4 and s["n"] == 6
    assert full["gradcam"]["complexity"]["n"] == 10
    table = markdown_summary(full, metrics)
    assert "excluded from the localisation means): 4" in table and "| gradcam |" in table


def test_a_run_with_other_metrics_is_not_mixed_in(tmp_path):
    clf, data = bench_setup()
    ex = {"sobel": get_explainer("sobel", clf)}
    run_benchmark(clf, data, ex, RunConfig(["sobel"], ["complexity"]), tmp_path, progress=False)
    from nemt.errors import NemtError
    with pytest.raises(NemtError, match="other metrics"):
        run_benchmark(clf, data, ex, RunConfig(["sobel"], ["sparseness"]), tmp_path, progress=False)


def test_cli_benchmark_writes_results_summary_and_a_self_contained_report(tmp_path):
    runner = CliRunner()
    manifest = write_phantom_dataset(tmp_path / "data", 40, 32, task="multiclass", seed=0)
    labels = json.loads((tmp_path / "data" / "phantoms.json").read_text())["label_names"]
    res = runner.invoke(app, ["train", "--data", str(manifest), "--out", str(tmp_path / "m"), "--arch", "smallcnn",
                              "--size", "32", "--epochs", "1", "--batch-size", "8", "--labels", ",".join(labels),
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    args = ["benchmark", "--model", str(tmp_path / "m"), "--data", str(manifest), "--out", str(tmp_path / "b"),
            "--methods", "gradcam++,rise,random", "--param", "rise.n_masks=20", "--metrics",
            "relevance_mass,relevance_rank,sparseness", "--gallery", "2", "--no-progress"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    out = tmp_path / "b"
    for name in ("results.csv", "summary.csv", "summary.md", "report.html", "report.md"):
        assert (out / name).is_file(), name
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "http://" not in page and "https://" not in page
    assert page.count("<h3>") >= 1  # gallery grouped by label
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["method"] for r in rows} == {"gradcam++", "rise", "random"}
    assert all(float(r["ms"]) >= 0 for r in rows)
    # run again: everything is done, nothing is recomputed, same table
    before = (out / "summary.md").read_text()
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and (out / "summary.md").read_text() == before
    # other budget parameters for a method with results are refused, not mixed in
    res = runner.invoke(app, [a if a != "rise.n_masks=20" else "rise.n_masks=30" for a in args])
    assert res.exit_code == 2 and "parameters of rise" in " ".join(res.output.split())
    # a parameter for a method that is not in the run is an error that names it
    res = runner.invoke(app, args[:-1] + ["--param", "ig.n_steps=4", "--no-progress"])
    assert res.exit_code == 2 and "ig" in res.output


def test_demo_runs_end_to_end_small(tmp_path):
    """The main job, shrunk: phantoms, check, classifier, NEMt, benchmark, report."""
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--n", "60", "--size", "32", "--epochs", "1",
                                   "--fit-epochs", "1", "--bench-images", "6", "--bench-methods",
                                   "nemt,gradcam++,random", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "benchmark" / "report.html").is_file()
    table = (tmp_path / "summary.md").read_text()
    assert "| nemt |" in table and "| gradcam++ |" in table
    assert "deletion_auc" in table and "insertion_auc" in table  # faithfulness beside localisation
    run = json.loads((tmp_path / "benchmark" / "run.json").read_text())
    assert run["metric_params"]["deletion_auc"] == {"baseline": "blur"}, run  # the substrate the README states


def test_xaitris_suite_small(tmp_path):
    """Train, explain the correctly classified test samples, score against the placed pattern; resume reuses."""
    from nemt.bench.xaitris import run_suite
    kw = dict(scenarios=["lin"], backgrounds=["white"], n=200, epochs=2, max_samples=4, min_accuracy=0.0,
              methods=["nemt", "saliency", "random", "sobel"], progress=False, models=("linear", "cnn"),
              params={"nemt": {"epochs": 1, "decoder_channels": [8, 8, 8, 8, 8]}})
    table = run_suite(tmp_path, **kw)
    assert "### top_k_precision" in table and "lin-white/cnn" in table and "beat the random and Sobel" in table
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    # NEMt reads the CNN's stages: fitted for the CNN only, like Grad-CAM
    assert {(r["model"], r["method"]) for r in rows} == {(m, k) for m in ("linear", "cnn")
                                                         for k in ("saliency", "random", "sobel")} | {("cnn", "nemt")}
    fitted = list((tmp_path / "models" / "lin-white" / "cnn").glob("nemt-*/explainer.json"))
    assert len(fitted) == 1 and not list((tmp_path / "models" / "lin-white" / "linear").glob("nemt-*"))
    assert all(0 <= float(r["top_k_precision"]) <= 1 and 0 <= float(r["emd_score"]) <= 1 for r in rows)
    assert (tmp_path / "report.html").is_file() and (tmp_path / "models" / "lin-white" / "cnn" / "model.json").is_file()
    # the NEMt fit is checked on the validation split: its collapse report is saved and counted in the summary
    assert (fitted[0].parent / "collapse.json").is_file()
    assert "NEMt collapse guard (validation split):" in table and "of 1 fitted models collapsed" in table
    assert run_suite(tmp_path, **kw) == table  # models (and the collapse report) read back: same table


# ---------------------------------------------------------------- issue 12: what a resumed run may reuse

def test_results_of_another_model_or_explainer_are_refused_not_reused(tmp_path):
    """Issue 12, item 1: the resume key holds the model's weights checksum and each fitted explainer's."""
    from nemt.errors import NemtError
    clf, data = bench_setup()
    cfg = RunConfig(["gradcam"], ["relevance_mass"], batch_size=4)
    run_benchmark(clf, data, {"gradcam": get_explainer("gradcam", clf)}, cfg, tmp_path, progress=False)
    before = (tmp_path / "results.csv").read_bytes()
    other = Classifier.from_module(build_model("smallcnn", spatial_dims=2, in_channels=1, out_channels=3, width=4),
                                   spatial_dims=2, in_channels=1, input_size=(16, 16), task="multiclass",
                                   label_names=["normal", "a", "b"]).eval()
    other.load_state_dict(clf.state_dict())
    with torch.no_grad():
        other.net.fc.weight.add_(0.01)  # same card, perturbed weights
    with pytest.raises(NemtError, match="another model"):
        run_benchmark(other, data, {"gradcam": get_explainer("gradcam", other)}, cfg, tmp_path, progress=False)
    assert (tmp_path / "results.csv").read_bytes() == before
    # the same model again resumes; a fitted explainer is keyed by its checksum
    run_benchmark(clf, data, {"gradcam": get_explainer("gradcam", clf)}, cfg, tmp_path, progress=False)
    ex = {"sobel": get_explainer("sobel", clf)}
    run_benchmark(clf, data, ex, RunConfig(["sobel"], ["relevance_mass"], batch_size=4), tmp_path, progress=False,
                  explainer_sha256={"sobel": "a" * 64})
    with pytest.raises(NemtError, match="fitted explainer of sobel"):
        run_benchmark(clf, data, ex, RunConfig(["sobel"], ["relevance_mass"], batch_size=4), tmp_path,
                      progress=False, explainer_sha256={"sobel": "b" * 64})


def test_results_of_edited_nemt_code_are_refused_not_reused(tmp_path, monkeypatch):
    """The run records nemt's code fingerprint: a folder resumed after the code was edited is refused, untouched."""
    import nemt.bench.runner as runner
    from nemt.errors import NemtError
    clf, data = bench_setup()
    cfg = RunConfig(["gradcam"], ["relevance_mass"], batch_size=4)
    run_benchmark(clf, data, {"gradcam": get_explainer("gradcam", clf)}, cfg, tmp_path, progress=False)
    before = folder_bytes(tmp_path)
    monkeypatch.setattr(runner, "code_fingerprint", lambda: "0123456789abcdef")
    with pytest.raises(NemtError, match=r"other nemt code \(edited since\)"):
        run_benchmark(clf, data, {"gradcam": get_explainer("gradcam", clf)}, cfg, tmp_path, progress=False)
    assert folder_bytes(tmp_path) == before


def test_explainer_checksum_covers_weights_and_card(tmp_path):
    from nemt.bench.runner import explainer_checksum
    from nemt.errors import NemtError
    (tmp_path / "explainer.safetensors").write_bytes(b"weights")
    (tmp_path / "explainer.json").write_text("{}")
    a = explainer_checksum(tmp_path)
    (tmp_path / "explainer.safetensors").write_bytes(b"weightz")
    b = explainer_checksum(tmp_path)
    (tmp_path / "explainer.json").write_text("{ }")
    assert len({a, b, explainer_checksum(tmp_path)}) == 3
    (tmp_path / "explainer.json").unlink()
    with pytest.raises(NemtError, match="explainer.json: missing"):
        explainer_checksum(tmp_path)


def test_cli_benchmark_refuses_the_results_of_another_model(tmp_path):
    """Issue 12, item 1, end to end: `nemt benchmark --model OTHER --out X` after `--model M --out X`."""
    runner = CliRunner()
    manifest = write_phantom_dataset(tmp_path / "data", 30, 32, task="multiclass", seed=0)
    labels = json.loads((tmp_path / "data" / "phantoms.json").read_text())["label_names"]
    for name, seed in (("m", "0"), ("other", "0")):
        res = runner.invoke(app, ["train", "--data", str(manifest), "--out", str(tmp_path / name), "--arch",
                                  "smallcnn", "--size", "32", "--epochs", "1", "--batch-size", "8", "--labels",
                                  ",".join(labels), "--seed", seed, "--lr", "0.01" if name == "m" else "0.02",
                                  "--no-progress"])
        assert res.exit_code == 0, res.output
    args = ["benchmark", "--data", str(manifest), "--out", str(tmp_path / "b"), "--methods", "gradcam++,random",
            "--metrics", "relevance_mass", "--gallery", "0", "--no-progress"]
    res = runner.invoke(app, args + ["--model", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    before = (tmp_path / "b" / "summary.md").read_text()
    res = runner.invoke(app, args + ["--model", str(tmp_path / "other")])
    assert res.exit_code == 2 and "another model" in " ".join(res.output.split()), res.output
    assert (tmp_path / "b" / "summary.md").read_text() == before


# ---------------------------------------------------------------- issue 12, item 12: the results log read strictly

def _partial_run(tmp_path):
    clf, data = bench_setup()
    cfg = RunConfig(["sobel"], ["relevance_mass", "complexity"], batch_size=4)
    full = run_benchmark(clf, data, {"sobel": get_explainer("sobel", clf)}, cfg, tmp_path / "full", progress=False)
    return clf, data, cfg, full


def test_a_torn_last_row_is_dropped_and_recomputed_with_a_message(tmp_path):
    clf, data, cfg, full = _partial_run(tmp_path)
    log = tmp_path / "full" / "results.partial.csv"
    raw = log.read_bytes()
    assert raw.endswith(b"\r\n")
    log.write_bytes(raw[:-6])  # the last row's last number cut mid-way, as an interrupted append leaves it
    (tmp_path / "full" / "results.csv").unlink()
    again = _Counting(get_explainer("sobel", clf))
    said = []
    resumed = run_benchmark(clf, data, {"sobel": again}, cfg, tmp_path / "full", progress=False, log=said.append)
    assert again.calls == 1  # the chunk of the torn row, only
    assert len(said) == 1 and "cut short" in said[0] and "results.partial.csv" in said[0]
    assert {k: v for k, v in resumed["sobel"].items() if k != "ms"} == \
        {k: v for k, v in full["sobel"].items() if k != "ms"}
    rows = list(csv.DictReader(open(tmp_path / "full" / "results.csv")))
    assert [int(r["item"]) for r in rows] == list(range(len(data.items)))  # each item once
    # the log now holds every row whole; a further run reads it without a message
    said.clear()
    run_benchmark(clf, data, {"sobel": _Counting(get_explainer("sobel", clf))}, cfg, tmp_path / "full",
                  progress=False, log=said.append)
    assert said == []


@pytest.mark.parametrize("damage, message", [
    (lambda line: line.rsplit(",", 2)[0], r"line 4: 8 fields, expected 10"),
    (lambda line: line.rsplit(",", 1)[0] + ",0.1x", r"line 4: field 'complexity': '0.1x' is not a number"),
    (lambda line: line.replace(",True,", ",yes,").replace(",False,", ",yes,"), r"line 4: field 'has_gt'"),
])
def test_a_damaged_row_is_an_error_naming_line_and_field(tmp_path, damage, message):
    from nemt.errors import NemtError
    clf, data, cfg, full = _partial_run(tmp_path)
    log = tmp_path / "full" / "results.partial.csv"
    lines = log.read_text().split("\n")
    lines[3] = damage(lines[3].rstrip("\r")) + "\r"
    log.write_text("\n".join(lines))
    (tmp_path / "full" / "results.csv").unlink()
    with pytest.raises(NemtError, match=message):
        run_benchmark(clf, data, {"sobel": get_explainer("sobel", clf)}, cfg, tmp_path / "full", progress=False)
    assert not (tmp_path / "full" / "results.csv").exists()


def test_a_run_that_does_not_record_its_model_is_not_reused(tmp_path):
    from nemt.errors import NemtError
    clf, data = bench_setup()
    cfg = RunConfig(["sobel"], ["complexity"], batch_size=4)
    run_benchmark(clf, data, {"sobel": get_explainer("sobel", clf)}, cfg, tmp_path, progress=False)
    meta = json.loads((tmp_path / "run.json").read_text())
    del meta["model_sha256"]  # as written before the checksum was recorded
    (tmp_path / "run.json").write_text(json.dumps(meta))
    with pytest.raises(NemtError, match="run.json: does not record its model's checksum"):
        run_benchmark(clf, data, {"sobel": get_explainer("sobel", clf)}, cfg, tmp_path, progress=False)


def test_figures_leave_the_callers_matplotlib_backend_alone(tmp_path):
    """Importing and drawing (overlay PNGs, the report's plots) never selects a backend: the caller's stays."""
    import importlib

    import matplotlib
    import numpy as np

    import nemt.bench.report as report
    import nemt.visualize as visualize
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a caller's choice (not the Agg that the library used to force on import)
    try:
        importlib.reload(visualize)
        importlib.reload(report)
        out = visualize.save_overlay(tmp_path / "o.png", np.zeros((8, 8)), [np.ones((8, 8))], ["m"])
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


def test_a_metric_defined_here_runs_in_the_benchmark_without_editing_the_runner(tmp_path):
    """A metric registered with @metric where it is defined (here) is checked, called with its inputs and its
    --param keywords, and given its column, direction and ground-truth note, by the runner's dispatch."""
    import nemt.metrics as M
    from nemt.bench.runner import check_metrics, runnable_metrics
    from nemt.errors import NemtError

    @M.metric("lower", inputs=("maps", "gt"), name="test_outside_share")
    def test_outside_share(maps, masks, *, scale=1.0):
        """Share of |map| outside the ground truth, times ``scale``; NaN where there is none (B, T)."""
        a = maps.abs().flatten(2)
        m = masks.expand_as(maps).flatten(2)
        v = scale * (a * ~m).sum(-1) / a.sum(-1).clamp_min(1e-12)
        return torch.where(m.any(-1), v, torch.full_like(v, float("nan")))

    @M.metric("higher", inputs=("model", "x", "maps", "target"), name="test_target_logit")
    def test_target_logit(model, x, maps, target):
        """The model's output for the explained target (one value per map, the same for every map of an image)."""
        with torch.no_grad():
            return model(x).gather(1, target.view(-1, 1))

    @M.metric("higher", inputs=("maps", "gaze"), name="test_needs_gaze")
    def test_needs_gaze(maps, gaze):
        """A metric whose inputs the benchmark does not have: registered, but not runnable by the runner."""
        return maps.flatten(2).sum(-1)

    try:
        assert {"test_outside_share", "test_target_logit"} <= set(runnable_metrics())
        assert "test_needs_gaze" not in runnable_metrics() and "test_needs_gaze" in M.available_metrics()
        with pytest.raises(NemtError, match="test_needs_gaze needs gaze"):
            check_metrics(["relevance_mass", "test_needs_gaze"])
        clf, data = bench_setup()
        metrics = ["test_outside_share", "relevance_mass", "test_target_logit"]
        cfg = RunConfig(["sobel"], metrics, batch_size=4, metric_params={"test_outside_share": {"scale": 2.0}})
        summary = run_benchmark(clf, data, {"sobel": get_explainer("sobel", clf)}, cfg, tmp_path, progress=False)
        rows = list(csv.DictReader(open(tmp_path / "results.csv")))
        assert list(rows[0])[-3:] == metrics and len(rows) == len(data.items)
        maps = get_explainer("sobel", clf).explain(data.x, target=torch.tensor([it.target for it in data.items]))
        share = test_outside_share(maps.float(), data.gt, scale=2.0).reshape(-1)
        rm = M.relevance_mass(maps.float(), data.gt).reshape(-1)
        for r, it in zip(rows, data.items):
            assert (r["test_outside_share"] == "nan") == (not it.has_gt)
            if it.has_gt:
                assert float(r["test_outside_share"]) == pytest.approx(float(share[it.item]), rel=1e-6)
                assert float(r["test_outside_share"]) == pytest.approx(2 * (1 - float(rm[it.item])), rel=1e-5)
            logit = clf(data.x[it.sample:it.sample + 1])[0, it.target].item()
            assert float(r["test_target_logit"]) == pytest.approx(logit, rel=1e-5, abs=1e-6)
        assert summary["sobel"]["test_outside_share"]["n_excluded"] == 4
        directions = {r["metric"]: r["direction"] for r in csv.DictReader(open(tmp_path / "summary.csv"))}
        assert directions["test_outside_share"] == "lower" and directions["test_target_logit"] == "higher"
        table = markdown_summary(summary, ["test_outside_share", "test_target_logit"])
        assert "test_outside_share ↓" in table and "excluded from the localisation means): 4" in table
    finally:
        for name in ("test_outside_share", "test_target_logit", "test_needs_gaze"):
            M.unregister_metric(name)
    assert "test_outside_share" not in M.registry() and "test_outside_share" not in M.DIRECTIONS
    with pytest.raises(NemtError, match="unknown metric"):
        check_metrics(["test_outside_share"])


def test_metric_workers_give_the_same_results(tmp_path, monkeypatch):
    """run_benchmark(metric_workers=2) spreads the per-map metrics' slices over worker threads (opt-in), with
    results identical to the default (serial, in the calling thread, torch's thread count untouched)."""
    import nemt.metrics._common as common
    from nemt.bench.runner import runnable_metrics
    clf, data = bench_setup()
    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 256)  # one 16 x 16 map per slice
    used = []  # worker counts of the thread pools that chunked starts

    class Pool(common.ThreadPoolExecutor):
        def __init__(self, workers):
            used.append(workers)
            super().__init__(workers)

    monkeypatch.setattr(common, "ThreadPoolExecutor", Pool)
    metrics = runnable_metrics()
    params = {"faithfulness_estimate": {"features_in_step": 32}, "deletion_auc": {"steps": 4},
              "insertion_auc": {"steps": 4}, "road": {"percentages": [10, 50]}}
    ex = {"sobel": get_explainer("sobel", clf)}
    threads = torch.get_num_threads()
    run_benchmark(clf, data, ex, RunConfig(["sobel"], metrics, batch_size=5, metric_params=params),
                  tmp_path / "a", progress=False)
    assert used == [] and torch.get_num_threads() == threads
    run_benchmark(clf, data, ex, RunConfig(["sobel"], metrics, batch_size=5, metric_params=params),
                  tmp_path / "b", progress=False, metric_workers=2)
    assert used and set(used) == {2} and torch.get_num_threads() == threads
    a, b = (list(csv.DictReader(open(tmp_path / d / "results.csv"))) for d in "ab")
    assert len(a) == len(b) == len(data.items) and set(metrics) <= set(a[0])
    for ra, rb in zip(a, b):
        ra.pop("ms"), rb.pop("ms")  # timings
        assert ra == rb  # the numbers as written: bit-identical


def test_sharded_benchmark_merges_to_the_single_run_row_for_row(tmp_path):
    """N independent jobs (--shard I/N), then --merge: the same results.csv as one process (timings aside)."""
    import csv

    from typer.testing import CliRunner

    from conftest import train_phantom_model
    from nemt.cli import app

    manifest, model = train_phantom_model(tmp_path, n=60)
    base = ["benchmark", "--model", str(model), "--data", str(manifest), "--methods", "gradcam,random,sobel",
            "--metrics", "relevance_mass,pointing_game,complexity", "--batch-size", "3", "--no-progress"]
    runner = CliRunner()
    res = runner.invoke(app, base + ["--out", str(tmp_path / "one")])
    assert res.exit_code == 0, res.output
    for i in range(3):
        res = runner.invoke(app, base + ["--out", str(tmp_path / "sh"), "--shard", f"{i}/3"])
        assert res.exit_code == 0, res.output
        assert not (tmp_path / "sh" / "results.csv").exists(), "a shard writes no results"
    res = runner.invoke(app, base + ["--out", str(tmp_path / "sh"), "--merge"])
    assert res.exit_code == 0, res.output

    def rows(p):
        with open(p, newline="") as fh:
            return [{k: v for k, v in r.items() if k != "ms"} for r in csv.DictReader(fh)]

    one, merged = rows(tmp_path / "one" / "results.csv"), rows(tmp_path / "sh" / "results.csv")
    assert len(one) > 9 and merged == one
    res = runner.invoke(app, base + ["--out", str(tmp_path / "bad"), "--shard", "3/3"])
    assert res.exit_code != 0 and "0 <= I < N" in res.output
    (tmp_path / "part").mkdir()
    res = runner.invoke(app, base + ["--out", str(tmp_path / "part"), "--shard", "0/2"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, base + ["--out", str(tmp_path / "part"), "--merge"])
    assert res.exit_code != 0 and "missing" in res.output  # shard 1 of 2 never ran


def test_a_shard_without_items_says_why_and_how_to_spread_them(tmp_path):
    """Shards take whole chunks of --batch-size items (the same chunks as one process): with 10 items in
    chunks of 8, shard 1 of 2 gets 2 items and shard 2 of 3 none; the idle shard says so and names the
    batch size that gives every shard work (ceil(10 / 3) = 4), and logs no rows."""
    clf, data = bench_setup(n=10)
    ex = {"sobel": get_explainer("sobel", clf)}
    cfg = RunConfig(["sobel"], ["relevance_mass"], batch_size=8)
    said = []
    got = run_benchmark(clf, data, ex, cfg, tmp_path / "a", progress=False, shard=(1, 2), log=said.append)
    assert got["rows"] == 2 and said == []
    got = run_benchmark(clf, data, ex, cfg, tmp_path / "b", progress=False, shard=(2, 3), log=said.append)
    assert got["rows"] == 0 and len(said) == 1
    assert "has no items" in said[0] and "2 chunk(s)" in said[0] and "at most 4 " in said[0]


def test_torchrun_benchmark_equals_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m nemt benchmark`: ranks take shards, rank 0 merges: the single run's rows."""
    import csv
    import os
    import subprocess
    import sys

    from conftest import train_phantom_model

    manifest, model = train_phantom_model(tmp_path, n=40)
    args = ["benchmark", "--model", str(model), "--data", str(manifest), "--methods", "gradcam,random",
            "--metrics", "relevance_mass,pointing_game", "--batch-size", "2", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "nemt", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--standalone", "-m", "nemt", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "two" / "shards").iterdir()) == ["0-of-2", "1-of-2"]

    def rows(p):
        with open(p, newline="") as fh:
            return [{k: v for k, v in r.items() if k != "ms"} for r in csv.DictReader(fh)]

    assert rows(tmp_path / "two" / "results.csv") == rows(tmp_path / "one" / "results.csv")
    assert (tmp_path / "two" / "report.html").is_file()


class _Flat:
    """A map with every pixel but one tied at its maximum: Quantus' pointing game calls it a hit on every mask
    that does not lie in the corner pixel alone. (Not every pixel: a constant map localises nothing, NaN.)"""

    def explain(self, x, target=None):
        t = 1 if target is None or target.ndim == 1 else target.shape[1]
        maps = torch.ones(x.shape[0], t, *x.shape[2:])
        maps[:, :, 0, 0] = 0.0
        return maps


def test_tie_notes_name_methods_whose_pointing_game_is_a_plateau(tmp_path):
    clf, data = bench_setup()
    metrics = ["pointing_game", "pointing_game_expected"]
    summary = run_benchmark(clf, data, {"flat": _Flat(), "random": get_explainer("random", clf)},
                            RunConfig(["flat", "random"], metrics), tmp_path, progress=False)
    flat = summary["flat"]
    assert flat["pointing_game"]["mean"] == 1.0          # every tied pixel counts: always a hit
    gt = data.gt[[it.sample for it in data.items if it.has_gt]].flatten(1).float()
    assert not gt[:, 0].any()  # the corner pixel lies outside every mask
    share = gt.sum(1) / (gt.shape[1] - 1)  # the mask's share of the plateau (every pixel but the corner)
    assert abs(flat["pointing_game_expected"]["mean"] - share.mean().item()) < 1e-6
    notes = tie_notes(summary, metrics)
    assert len(notes) == 2 and notes[1].startswith("flat:")  # uniform noise has a single maximum: no note
    assert summary["random"]["pointing_game"]["mean"] == summary["random"]["pointing_game_expected"]["mean"]
    assert notes[1] in markdown_summary(summary, metrics)
    assert tie_notes(summary, ["pointing_game"]) == []


def test_markdown_summary_bolds_every_method_tied_at_the_best_mean():
    cell = {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.1, "n": 5, "n_excluded": 0}
    summary = {"a": {"pointing_game": dict(cell), "ms": 1.0}, "b": {"pointing_game": dict(cell), "ms": 1.0},
               "c": {"pointing_game": {**cell, "mean": -0.5}, "ms": 1.0}}
    rows = {line.split("|")[1].strip(): line for line in markdown_summary(summary, ["pointing_game"]).splitlines()
            if line.startswith("| ") and "method" not in line}
    assert "**" in rows["a"] and "**" in rows["b"] and "**" not in rows["c"]


def test_benchmark_summary_counts_collapsed_maps_as_undefined_not_as_excluded():
    """A constant (collapsed) map scores NaN in faithfulness_estimate; the summary used to count it as
    "excluded" (no ground truth), hiding a failing explainer: it is now n_undefined, named under the table,
    while a localisation metric's NaN (an image without a lesion) stays excluded."""
    from nemt.bench.runner import summarise_results
    rows = [{"method": "flat", "faithfulness_estimate": v, "relevance_mass": r, "ms": 1.0}
            for v, r in ((float("nan"), 0.2), (0.5, float("nan")), (0.3, 0.4))]
    summary = summarise_results(rows, ["flat"], ["faithfulness_estimate", "relevance_mass"])
    fe, rm = summary["flat"]["faithfulness_estimate"], summary["flat"]["relevance_mass"]
    assert (fe["n"], fe["n_excluded"], fe["n_undefined"]) == (2, 0, 1)
    assert (rm["n"], rm["n_excluded"], rm["n_undefined"]) == (2, 1, 0)
    text = markdown_summary(summary, ["faithfulness_estimate", "relevance_mass"])
    assert "undefined for (constant, collapsed maps; left out of the mean): flat faithfulness_estimate: 1." in text


def test_cli_benchmark_split_all_takes_every_image(tmp_path):
    """`--split all` (as `nemt explain --split all`): every row of the manifest, train, val and test together."""
    runner = CliRunner()
    manifest, model = train_phantom_model(tmp_path, n=20, size=16)
    for split in ("all", "test"):
        res = runner.invoke(app, ["benchmark", "--model", str(model), "--data", str(manifest), "--out",
                                  str(tmp_path / split), "--methods", "random", "--metrics", "sparseness",
                                  "--gallery", "0", "--split", split, "--no-progress"])
        assert res.exit_code == 0, res.output
    rows = {s: {r["image"] for r in csv.DictReader(open(tmp_path / s / "results.csv"))} for s in ("all", "test")}
    assert len(rows["all"]) == 20 and rows["test"] < rows["all"]
