"""Issue 16, items 1-2: MaxBoxAccV2 by definition (a data-set-level maximum, pooled by the runner), the
fitted activation clustering (save / reload), superpixelified explainers in `nemt explain` and
`nemt benchmark`, and `nemt clusters` end to end on tiny phantoms."""
from __future__ import annotations

import csv
import json
import math
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from nemt.bench.clusters import area_fractions, cluster_localisation, segment_ious
from nemt.bench.runner import BenchmarkData, RunConfig, make_items, run_benchmark
from nemt.cli import app
from nemt.clustering import (ActivationClustering, NasSegments, SlicSegments, Superpixelified, load_segmenter,
                             superpixelify)
from nemt.errors import NemtError
from nemt.explainers import get_explainer
from nemt.metrics import box_iou_curves, get_metric, max_box_acc_reduce, max_box_acc_v2

from conftest import train_phantom_model


# ---------------------------------------------------------------------------- MaxBoxAccV2 by definition

def test_a_map_equal_to_its_mask_scores_one_and_a_map_off_the_object_zero():
    gt = torch.zeros(4, 1, 24, 24, dtype=torch.bool)
    gt[0, 0, 2:9, 3:15] = True
    gt[1, 0, 10:20, 10:12] = True
    gt[2, 0, 0:24, 0:5] = True
    gt[3, 0, 5:6, 7:8] = True  # one pixel
    on = gt.float()
    assert torch.equal(max_box_acc_v2(on, gt), torch.ones(4, 1))  # IoU 1 at every threshold below 1
    assert torch.equal(max_box_acc_v2(on, gt, multi_contour=False), torch.ones(4, 1))
    off = torch.zeros_like(on)
    off[:, 0, 21:24, 20:24] = 1.0  # a blob whose box does not meet any of the ground-truth boxes
    assert torch.equal(max_box_acc_v2(off, gt), torch.zeros(4, 1))
    # no score without ground truth; a constant map has no foreground above any threshold: IoU 0
    assert math.isnan(float(max_box_acc_v2(on[:1], torch.zeros_like(gt[:1]))))
    assert float(box_iou_curves(torch.full((1, 1, 24, 24), 0.3), gt[:1]).abs().sum()) == 0.0


def _hand_case():
    """Three 10x10 maps (values 0, 0.5, 1) whose IoU changes at tau = 0.5, and their ground truth.

    A: GT rows 0-3, cols 0-3; map 1 there and 0.5 on cols 4-7 -> box cols 0-7 (IoU 16/32 = 0.5) for
       tau < 0.5, the GT box (IoU 1) for tau >= 0.5.
    B: GT rows 0-3, cols 0-7; map 1 on cols 0-3 and 0.5 on cols 4-7 -> IoU 1 for tau < 0.5, 0.5 after.
    C: GT rows 6-9, cols 6-9 with map 1 there, and a larger blob rows 0-4, cols 0-4 (not touching): the best
       box is the GT's (IoU 1), the largest component's box misses it (IoU 0).
    """
    maps = torch.zeros(3, 1, 10, 10)
    gt = torch.zeros(3, 1, 10, 10, dtype=torch.bool)
    maps[0, 0, 0:4, 0:4], maps[0, 0, 0:4, 4:8] = 1.0, 0.5
    gt[0, 0, 0:4, 0:4] = True
    maps[1, 0, 0:4, 0:4], maps[1, 0, 0:4, 4:8] = 1.0, 0.5
    gt[1, 0, 0:4, 0:8] = True
    maps[2, 0, 6:10, 6:10], maps[2, 0, 0:5, 0:5] = 1.0, 1.0
    gt[2, 0, 6:10, 6:10] = True
    return maps, gt


def test_hand_computed_case_takes_the_maximum_over_thresholds_for_the_data_set():
    maps, gt = _hand_case()
    curves = box_iou_curves(maps, gt)[:, 0].float()  # (3, 100) (float64 computed): tau = 0, 0.01, ..., 0.99
    assert torch.allclose(curves[0, :50], torch.full((50,), 0.5)) and torch.allclose(curves[0, 50:], torch.ones(50))
    assert torch.allclose(curves[1, :50], torch.ones(50)) and torch.allclose(curves[1, 50:], torch.full((50,), 0.5))
    assert torch.equal(curves[2], torch.ones(100))
    # A and B: delta 0.3 and 0.5 hit at every tau (IoU 0.5 >= 0.5); delta 0.7: 1 of 2 at every tau, so
    # MaxBoxAcc(0.7) = 0.5 although each image alone reaches IoU 1 at some tau: (1 + 1 + 0.5) / 3
    ab = max_box_acc_v2(maps[:2], gt[:2])  # shares in the maps' dtype (float32): means to 1e-6
    assert float(ab.mean()) == pytest.approx(2.5 / 3, abs=1e-6)
    share, info = max_box_acc_reduce(curves[:2])
    assert info["max_box_acc"] == {"0.3": 1.0, "0.5": 1.0, "0.7": 0.5}
    assert info["best_threshold"]["0.7"] == 0.0  # the first tau with the best accuracy
    # at tau = 0 only B hits 0.7: its share is (1 + 1 + 1) / 3, A's (1 + 1 + 0) / 3
    assert share.tolist() == pytest.approx([2 / 3, 1.0], abs=1e-12)
    # C: the V2 mining (every component's box) finds it; the largest component alone does not
    assert float(max_box_acc_v2(maps[2:], gt[2:])) == 1.0
    assert float(max_box_acc_v2(maps[2:], gt[2:], multi_contour=False)) == 0.0
    # all three: delta 0.7 hits A or B and C -> 2/3; MaxBoxAccV2 = (1 + 1 + 2/3) / 3
    assert float(max_box_acc_v2(maps, gt).mean()) == pytest.approx((2 + 2 / 3) / 3, abs=1e-6)
    # a threshold grid of 2 (tau = 0, 0.5) gives the same here; 3D boxes and 1D intervals use the same code
    assert float(max_box_acc_v2(maps, gt, thresholds=2).mean()) == pytest.approx((2 + 2 / 3) / 3, abs=1e-6)
    vol, vgt = maps[:, :, None].repeat(1, 1, 3, 1, 1), gt[:, :, None].repeat(1, 1, 3, 1, 1)
    assert float(max_box_acc_v2(vol, vgt).mean()) == pytest.approx((2 + 2 / 3) / 3, abs=1e-6)
    assert float(max_box_acc_v2(maps[:2, :, 0], gt[:2, :, 0]).mean()) == pytest.approx(2.5 / 3, abs=1e-6)


class _Fixed:
    """An 'explainer' returning precomputed maps, looked up by the sample index written in x[:, 0, 0, 0]."""

    def __init__(self, maps):
        self.maps = maps

    def explain(self, x, target=None):
        return self.maps[x[:, 0, 0, 0].long()]


def test_the_runner_pools_every_chunk_before_taking_the_maximum(tmp_path):
    maps, gt = _hand_case()
    x = torch.arange(3.0)[:, None, None, None].expand(3, 1, 10, 10).contiguous()
    items = make_items(torch.tensor([1, 1, 1]), "multiclass", ["normal", "lesion"], ["a", "b", "c"], [True] * 3)
    data = BenchmarkData(x, x / 2, gt, items, ["normal", "lesion"], "hand")
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(100, 2))
    cfg = RunConfig(["fixed"], ["max_box_acc_v2", "relevance_mass"], batch_size=1)  # one map per chunk
    summary = run_benchmark(net, data, {"fixed": _Fixed(maps)}, cfg, tmp_path, progress=False)
    assert summary["fixed"]["max_box_acc_v2"]["mean"] == pytest.approx((2 + 2 / 3) / 3, abs=1e-12)  # float64 rows
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [float(r["max_box_acc_v2"]) for r in rows] == pytest.approx(max_box_acc_v2(maps, gt)[:, 0].tolist())
    details = json.loads((tmp_path / "dataset_metrics.json").read_text())["fixed"]["max_box_acc_v2"]
    assert details["max_box_acc"]["0.7"] == pytest.approx(2 / 3) and details["n"] == 3
    # resuming reads the statistics back: the same figures without explaining again
    again = run_benchmark(net, data, {"fixed": None}, cfg, tmp_path, progress=False)
    assert again["fixed"]["max_box_acc_v2"]["mean"] == summary["fixed"]["max_box_acc_v2"]["mean"]
    assert get_metric("max_box_acc_v2").dataset_level and not get_metric("relevance_mass").dataset_level
    # two shards (independent jobs) merged: the statistics travel with the rows, the same figure
    from nemt.bench.runner import merge_shards
    for i in range(2):
        run_benchmark(net, data, {"fixed": _Fixed(maps)}, cfg, tmp_path / "sharded", progress=False, shard=(i, 2))
    assert merge_shards(tmp_path / "sharded", cfg.metrics) == 3
    merged = run_benchmark(net, data, {"fixed": None}, cfg, tmp_path / "sharded", progress=False)
    assert merged["fixed"]["max_box_acc_v2"]["mean"] == summary["fixed"]["max_box_acc_v2"]["mean"]


# ---------------------------------------------------------------------------- segments against masks

def test_segment_ious_and_cluster_localisation_by_hand():
    labels = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1]],
                           [[2, 2, 2, 2], [1, 1, 1, 1]]])  # (2, 2, 4)
    gt = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 0]],
                       [[0, 0, 0, 0], [1, 1, 1, 1]]], dtype=torch.bool)
    iou = segment_ious(labels, gt, 3)
    # image 0: cluster 1 covers 4 pixels, 3 of them in the 3-pixel mask: 3 / 4; cluster 0: 0; cluster 2 absent
    assert iou[0].tolist() == pytest.approx([0.0, 0.75, 0.0])
    assert iou[1].tolist() == pytest.approx([0.0, 1.0, 0.0])
    assert torch.isnan(segment_ious(labels, torch.zeros_like(gt), 3)).all()
    assert area_fractions(labels, 3).flatten().tolist() == [0.5, 0.5, 0.0, 0.0, 0.5, 0.5]  # exact: k/8
    members = torch.tensor([[False, True], [False, True]])
    loc = cluster_localisation(labels, gt, members, ["normal", "finding"], 3)
    assert set(loc) == {"finding"}
    r = loc["finding"]
    assert r["best_cluster"] == 1 and r["fixed"] == pytest.approx(0.875) and r["per_image"] == pytest.approx(0.875)
    assert r["clusters_per_image"] == 2.0


# ---------------------------------------------------------------------------- the estimator and superpixelification

def _encoder() -> torch.nn.Sequential:
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
                              torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Dropout(0.3),
                              torch.nn.AvgPool2d(2), torch.nn.Conv2d(8, 4, 1), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return net


@pytest.mark.parametrize("method", ["kmeans", "module"])
def test_clustering_fits_saves_and_reloads_the_same_labels_without_touching_the_caller(tmp_path, method):
    net = _encoder().train()
    x = torch.randn(10, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    random.seed(5)
    state = torch.get_rng_state()
    est = ActivationClustering(net, layers=["2", "6"], k=3, method=method, seed=0, max_samples=200, epochs=2,
                               batch_size=4).fit(x)
    assert torch.equal(torch.get_rng_state(), state) and random.random() == random.Random(5).random()
    assert all(m.training for m in net.modules())  # the caller's training flags are restored
    assert est.layers_ == ["2", "6"] and est.grid_ == (8, 8) and est.n_pixels_ == 10 * 64
    labels, unc, gamma = est.assign(x)
    assert labels.shape == (10, 16, 16) and unc.shape == (10, 16, 16) and gamma.shape == (10, 3, 8, 8)
    assert float(unc.min()) >= 0 and float(unc.max()) <= math.log(3) + 1e-6
    est.save(tmp_path / "c")
    again = ActivationClustering.load(tmp_path / "c", net)
    assert torch.equal(again.assign(x)[0], labels) and torch.allclose(again.assign(x)[1], unc)
    # the same seed gives the same clustering; the segments are what superpixelification uses
    twin = ActivationClustering(net, layers=["2", "6"], k=3, method=method, seed=0, max_samples=200, epochs=2,
                                batch_size=5).fit(x)
    if method == "kmeans":  # the draw of pixels does not depend on the batch size (keys drawn per pixel)
        assert torch.equal(twin.segments(x), labels)
    other = _encoder()
    with torch.no_grad():
        other[0].bias.add_(1.0)
    with pytest.raises(NemtError, match="another model"):
        ActivationClustering.load(tmp_path / "c", other)
    with pytest.raises(NemtError, match="missing"):
        ActivationClustering.load(tmp_path / "nothing", net)


def test_superpixelified_maps_are_segment_means_of_the_explainers_maps():
    net = _encoder().eval()
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    est = ActivationClustering(net, k=4, max_samples=300, seed=0).fit(x)
    base = get_explainer("sobel", net)
    sp = Superpixelified(base, est)
    maps = sp.explain(x, target=0)
    seg = est.segments(x)
    means = superpixelify(base.explain(x, target=0), seg)  # segment means, then each map's maximum back at 1
    assert torch.allclose(maps, means / means.flatten(2).amax(-1)[..., None, None])
    assert torch.allclose(maps.flatten(2).amax(-1), torch.ones(4, 1))
    for i in range(4):
        for s in torch.unique(seg[i]):
            vals = maps[i, 0][seg[i] == s]
            assert float(vals.max() - vals.min()) < 1e-6
    assert sp.name == "sobel@clusters"
    slic = load_segmenter("slic:5", net)
    assert isinstance(slic, SlicSegments) and slic(x).shape == (4, 16, 16)
    assert all(len(torch.unique(s)) >= 6 for s in SlicSegments(6, at_least=True)(x))
    with pytest.raises(NemtError, match="slic:N"):
        load_segmenter("slic:x", net)
    # per-image NAS: k-means on each image's own activations, k segments (ids 0..k-1) at the input's size
    nas = load_segmenter("nas:3", net)
    assert isinstance(nas, NasSegments) and nas.k == 3
    seg = nas(x)
    assert seg.shape == (4, 16, 16) and int(seg.max()) <= 2
    assert torch.equal(nas(x[1:2]), seg[1:2])  # each image on its own: independent of the batch


def _square_encoder() -> torch.nn.Sequential:
    """A 1x1 convolution giving (v, 1 - v), then 4x4 average pooling: on a 0/1 image, orthonormal features
    inside and outside a region, mixed in the grid cells its border crosses; 'pool' is the grid's layer."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.AvgPool2d(4), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[[[1.0]]], [[[-1.0]]]]))
        net[0].bias.copy_(torch.tensor([0.0, 1.0]))
    return net


def test_nas_assigns_every_input_pixel_so_borders_need_not_follow_the_grid():
    net = _square_encoder()
    x = torch.zeros(2, 1, 32, 32)
    x[0, :, 8:24, 8:24] = 1  # a square on the 8 x 8 grid's cell borders
    x[1, :, 9:23, 9:23] = 1  # a square one pixel inside them: its border cells are 75 % (corners 56 %) square
    gt = x[:, 0] > 0.5

    def best(**kw):
        return segment_ious(NasSegments(net, 2, layers=["1"], **kw)(x), gt).amax(1).tolist()

    plain, inp = best(fit_scale=1, assign="grid"), best(fit_scale=1, assign="input")
    # on the grid the segment is whole cells: exact on the aligned square, the 16 x 16 block around the other
    assert plain == pytest.approx([1.0, 196 / 256], abs=1e-12)
    # every input pixel takes the nearer of the two (orthonormal, so equidistant at a 50 % mix) centroids of
    # the bilinearly interpolated features: inside where the square's weight is above 1/2. On the aligned
    # square that loses exactly its 4 corner pixels (weight 0.625^2 < 1/2; edge pixels 0.625 stay in)
    assert inp[0] == pytest.approx(252 / 256, abs=1e-12)
    assert inp[1] > plain[1] + 0.05  # off the grid the pixel-level border is the closer one (0.86 vs 0.77)
    assert best()[1] > plain[1] + 0.05  # the default (fitted on the 2x grid) too
    # a count per image is honoured, the fit grid is capped at the input, bad settings are refused by name
    nas = NasSegments(net, 2, layers=["1"])
    assert [len(torch.unique(s)) for s in nas(x, [2, 3])] == [2, 3]
    assert nas.fit_size((8, 8), (32, 32)) == (16, 16) and NasSegments(net, 2, fit_scale=8).fit_size((8, 8), (32, 32)) == (32, 32)
    with pytest.raises(ValueError, match="fit_scale"):
        NasSegments(net, 2, fit_scale=0.5)
    with pytest.raises(ValueError, match="assign"):
        NasSegments(net, 2, assign="nearest")


@pytest.mark.parametrize("spatial,grids,chunk", [((20, 24), [(5, 6), (10, 12)], 3),
                                                 ((12, 10, 14), [(3, 3, 4), (6, 5, 7)], 2)])
def test_nearest_centroid_equals_the_composite_without_building_it(spatial, grids, chunk):
    """NAS's per-pixel assignment at the input's size, channel chunk by chunk: the labels of the composite's
    nearest centroid (distances recomputed from the composite; a label may differ only where two centroids are
    within float rounding of each other), in 2D and 3D, with chunks smaller than a stage."""
    from nemt.clustering import compose, nearest_centroid, squared_distances
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, c, *grid, generator=g) for c, grid in zip((5, 7), grids)]
    feats[0][0, :, 0, 0] = 0  # a zero vector stays zero, as in compose
    centroids = torch.randn(6, 12, generator=g)
    full = compose(feats, spatial)
    d = squared_distances(full.movedim(1, -1).reshape(-1, 12), centroids)
    labels = nearest_centroid(feats, centroids, spatial, chunk=chunk)
    assert labels.shape == (2, *spatial) and labels.dtype == torch.long
    picked = d.gather(1, labels.reshape(-1, 1))[:, 0]
    assert torch.allclose(picked, d.min(1).values, atol=1e-5)  # float32 distances of order 1-10
    assert (labels.reshape(-1) == d.argmin(1)).float().mean() > 0.999
    with pytest.raises(ValueError, match="channels"):
        nearest_centroid(feats, centroids[:, :5], spatial)


def test_cluster_localisation_gives_every_baseline_the_matched_ones_counts():
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    gt = torch.zeros(2, 8, 8, dtype=torch.bool)
    gt[:, :4, :4] = True
    asked = {}

    def fixed(n):  # a segmenter that returns n[i] vertical bands for image i, recording what it was asked
        def seg(x, counts):
            asked[n] = counts
            c = counts if isinstance(counts, list) else [counts] * x.shape[0]
            return torch.stack([torch.arange(8).div(8 / ci, rounding_mode="floor").long().expand(8, 8) for ci in c])
        return seg

    def more(x, counts):  # like SLIC: more segments than asked, a different number per image
        asked["more"] = counts
        return torch.stack([torch.arange(8).div(8 / c, rounding_mode="floor").long().expand(8, 8) for c in (4, 8)])

    members = torch.ones(2, 1, dtype=torch.bool)
    loc = cluster_localisation(labels, gt, members, ["finding"], 3, baselines={"a": fixed("a"), "more": more},
                               x=torch.zeros(2, 1, 8, 8), match="more")
    assert asked == {"more": 3, "a": [4, 8]}
    assert loc["finding"]["a_segments_per_image"] == loc["finding"]["more_segments_per_image"] == 6.0
    with pytest.raises(NemtError, match="match"):
        cluster_localisation(labels, gt, members, ["finding"], 3, baselines={"a": fixed("a")},
                             x=torch.zeros(2, 1, 8, 8), match="slic")


# ---------------------------------------------------------------------------- the commands end to end

def test_clusters_command_then_superpixelified_benchmark_and_explain(tmp_path):
    torch.set_num_threads(1)
    manifest, model = train_phantom_model(tmp_path, n=40, size=32)
    runner = CliRunner()
    out = tmp_path / "clusters"
    res = runner.invoke(app, ["clusters", "--model", str(model), "--data", str(manifest), "--out", str(out),
                              "--k", "4", "--max-samples", "2000", "--gallery", "3", "--no-progress"])
    assert res.exit_code == 0, res.output
    for name in ("clustering.safetensors", "clustering.json", "maps.safetensors", "maps.json", "proportions.csv",
                 "localisation.json", "summary.json", "report.html"):
        assert (out / name).is_file(), name
    loc = json.loads((out / "localisation.json").read_text())
    assert loc and all({"fixed", "per_image", "nas", "slic"} <= set(r) for r in loc.values())
    for r in loc.values():  # per image, the best cluster is at least the best fixed cluster; IoUs in [0, 1]
        assert 0 <= r["fixed"] <= r["per_image"] + 1e-12 <= 1 + 1e-12 and 0 <= r["nas"] <= 1 and 0 <= r["slic"] <= 1
        assert r["slic_segments_per_image"] >= 4
    page = (out / "report.html").read_text()
    assert "Cluster gallery" in page and "Clusters per class" in page and "data:image/png;base64," in page
    saved = load_file(str(out / "maps.safetensors"))
    meta = json.loads((out / "maps.json").read_text())
    n = len(meta["images"])
    assert saved["labels"].shape == (n, 32, 32) and saved["uncertainty"].shape == (n, 32, 32)
    props = list(csv.DictReader(open(out / "proportions.csv")))
    for row in props:  # shares of the image: they sum to 1 per class with images
        if int(row["images"]):
            assert sum(float(row[f"cluster_{c}"]) for c in range(4)) == pytest.approx(1.0, abs=1e-5)
    # reloading the saved clustering gives the saved labels
    from nemt.data import ImageDataset
    from nemt.data.manifest import open_dataset
    from nemt.models import load_model
    clf = load_model(model)
    ds = ImageDataset(open_dataset(manifest, labels=list(clf.label_names)), clf.preprocessing,
                      saved["index"].tolist())
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    assert torch.equal(ActivationClustering.load(out, clf).segments(x).to(torch.int16), saved["labels"])

    bench = tmp_path / "bench"
    res = runner.invoke(app, ["benchmark", "--model", str(model), "--data", str(manifest), "--out", str(bench),
                              "--methods", "gradcam,sobel", "--metrics", "relevance_mass,max_box_acc_v2",
                              "--superpixelify", str(out), "--superpixelify", "nas:4", "--gallery", "2",
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(bench / "results.csv")))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    assert methods == ["gradcam", "gradcam@clusters", "gradcam@nas", "sobel", "sobel@clusters", "sobel@nas"]
    assert all(r["max_box_acc_v2"] != "" for r in rows)
    summary = json.loads((bench / "summary.json").read_text())
    assert set(summary) == set(methods)
    details = json.loads((bench / "dataset_metrics.json").read_text())
    assert set(details) == set(methods)
    report = (bench / "report.html").read_text()
    assert "gradcam@clusters" in report and "MaxBoxAcc at IoU 0.3 / 0.5 / 0.7" in report
    # the rows of another clustering are not mixed in (resume safety)
    ActivationClustering(clf, k=3, max_samples=500).fit(x).save(tmp_path / "other")
    res = runner.invoke(app, ["benchmark", "--model", str(model), "--data", str(manifest), "--out", str(bench),
                              "--methods", "gradcam,sobel", "--metrics", "relevance_mass,max_box_acc_v2",
                              "--superpixelify", str(tmp_path / "other"), "--no-progress"])
    assert res.exit_code == 2 and "fitted explainer of gradcam@clusters" in res.output

    img = sorted((tmp_path / "data" / "images").glob("*.png"))[0]
    res = runner.invoke(app, ["explain", str(img), "--model", str(model), "--method", "gradcam", "--target", "0",
                              "--out", str(tmp_path / "maps"), "--superpixelify", str(out)])
    assert res.exit_code == 0, res.output
    arr = np.load(next((tmp_path / "maps").glob("*.npy")))
    from nemt.data.readers import read_image
    xi = clf.preprocessing.normalise(clf.preprocessing.unit(read_image(img)))[None]
    seg = ActivationClustering.load(out, clf).segments(xi)[0].numpy()
    for s in np.unique(seg):
        assert np.ptp(arr[seg == s]) < 1e-6  # constant within each cluster's segment


    # the same data without masks, into the same folder: the earlier run's localisation must not stay beside
    # this run's maps (it scored other maps), and the summary is this run's
    rows = list(csv.DictReader(open(manifest)))
    bare = manifest.parent / "manifest-nomask.csv"
    with open(bare, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[c for c in rows[0] if c != "mask"])
        w.writeheader()
        w.writerows({c: r[c] for c in w.fieldnames} for r in rows)
    res = runner.invoke(app, ["clusters", "--model", str(model), "--data", str(bare), "--out", str(out),
                              "--k", "4", "--max-samples", "2000", "--gallery", "3", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert not (out / "localisation.json").exists()
    assert json.loads((out / "summary.json").read_text())["localisation"] == {}
    # fewer pixels than clusters: refused before any work, naming both options
    res = runner.invoke(app, ["clusters", "--model", str(model), "--data", str(manifest), "--out",
                              str(tmp_path / "few"), "--k", "5", "--max-samples", "3", "--no-progress"])
    assert res.exit_code == 2 and "--max-samples (3) must be at least --k (5)" in res.output
    assert not (tmp_path / "few").exists()
