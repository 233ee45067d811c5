"""The benchmark runner: items, scores, resume after an interruption, summary, report; the CLI end to end."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from nemt.bench.runner import BenchmarkData, RunConfig, make_items, markdown_summary, run_benchmark
from nemt.cli import app
from nemt.data import write_phantom_dataset
from nemt.explainers import get_explainer
from nemt.models import Classifier, build_model

from conftest import Interrupted


def _setup(n=10, size=16):
    torch.manual_seed(0)
    net = build_model("smallcnn", spatial_dims=2, in_channels=1, out_channels=3, width=4)
    clf = Classifier.from_module(net, spatial_dims=2, in_channels=1, input_size=(size, size), task="multiclass",
                                 label_names=["normal", "a", "b"]).eval()
    x = torch.randn(n, 1, size, size)
    y = torch.tensor([i % 3 for i in range(n)])
    gt = torch.zeros(n, 1, size, size, dtype=torch.bool)
    for i in range(n):
        if y[i] > 0:
            gt[i, 0, 2:8, 3:9] = True
    items = make_items(y, "multiclass", clf.label_names, [f"img{i}" for i in range(n)], gt.flatten(1).any(1).tolist())
    return clf, BenchmarkData(x, (x - x.min()) / (x.max() - x.min()), gt, items, clf.label_names, "fp")


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
    clf, data = _setup()
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
    clf, data = _setup()
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
    assert run_suite(tmp_path, **kw) == table  # models read back, every run already done: same table
