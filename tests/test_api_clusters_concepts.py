"""The API of activation clusters and concept annotation on bad or unusual input (audit of issues 15 and 16).

Every bad input is one of nemt's errors naming the argument (or the file and the field) and the reason; float64
input meets a float32 model; 1D signals work as 2D and 3D images do. A tiny CNN keeps the file to a few seconds.
"""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from torch import nn

from nemt.clustering import (ActivationClustering, ClusteringModule, NasSegments, SlicSegments,
                             composite_activations, entropy, fit_clustering_module, fit_kmeans, label_map,
                             load_segmenter, superpixelify)
from nemt.concepts import annotate, clip_dissect, image_embeddings, load_vlm, mammi, soft_wpmi, train_tiny_clip
from nemt.errors import CardError, NemtError
from nemt.ops import ParameterError


def net2d() -> nn.Sequential:
    """Three conv stages (16 -> 8 -> 4 cells), then a linear head: find_stages finds the stages."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return net


def images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def fitted():
    net = net2d()
    return net, ActivationClustering(net, k=3, max_samples=300).fit(images())


# ---------------------------------------------------------------------------- 1. SLIC: 1D signals, channel-last

def test_slic_segments_a_1d_signal_into_contiguous_runs_that_follow_its_steps():
    x = torch.zeros(2, 1, 64)
    x[0, 0, 30:50] = 1.0
    x[1, 0, :20] = 1.0
    x += 0.02 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    seg = SlicSegments(4)(x)
    assert seg.shape == (2, 64) and seg.dtype == torch.int64
    for row in seg:  # contiguous runs: an id never comes back after another one
        changes = (row[1:] != row[:-1]).nonzero().flatten() + 1
        assert len(torch.unique(row)) == len(changes) + 1 >= 2
    def cuts(row):
        return ((row[1:] != row[:-1]).nonzero().flatten() + 1).tolist()

    # a cut at each step, give or take the sample that the Gaussian smoothing (sigma = 1) blurs
    assert all(any(abs(c - step) <= 1 for c in cuts(seg[0])) for step in (30, 50))
    assert any(abs(c - 20) <= 1 for c in cuts(seg[1]))
    multi = SlicSegments(4)(torch.cat([x, 1 - x], 1))  # several channels (e.g. ECG leads)
    assert multi.shape == (2, 64)
    # a signal that oscillates throughout is cut into about n runs, not merged into one (plain SLIC's value
    # clusters of it are many short runs, which connectivity enforcement merges along the line)
    wave = torch.sin(torch.arange(1000.0) / 5).view(1, 1, -1)
    seg = SlicSegments(12)(wave)[0]
    assert len(torch.unique(seg)) >= 10 and len(cuts(seg)) == len(torch.unique(seg)) - 1


def test_slic_refuses_channel_last_input_instead_of_segmenting_the_wrong_axes():
    with pytest.raises(ParameterError, match=r"channel-last.*movedim"):
        SlicSegments(4)(torch.rand(2, 16, 16, 1))
    assert SlicSegments(4)(torch.rand(2, 1, 16, 16)).shape == (2, 16, 16)


# ---------------------------------------------------------------------------- 2. the tiny CLIP of another seed

def _saved_tiny(folder, seed: int = 0):
    """A tiny CLIP saved as load_vlm('tiny', size=32) would save it: trained briefly (a fraction of a second),
    its card then saying the default training settings (n, epochs), so load_vlm takes it for its own."""
    import inspect

    tiny = train_tiny_clip(n=64, size=32, epochs=1, seed=seed, out_dir=folder)
    card = json.loads((folder / "tiny_clip.json").read_text())
    defaults = inspect.signature(train_tiny_clip).parameters
    card["trained_on"].update(n=defaults["n"].default, epochs=defaults["epochs"].default)
    (folder / "tiny_clip.json").write_text(json.dumps(card))
    return tiny


def test_load_vlm_reuses_a_saved_tiny_clip_only_for_its_seed_and_size(tmp_path):
    folder = tmp_path / "tiny-clip"
    tiny = _saved_tiny(folder, seed=0)
    again = load_vlm("tiny", cache_dir=folder, seed=0, size=32)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(again.encode_image(x), tiny.encode_image(x), atol=1e-6)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for seed, size in ((1, 32), (0, 48)):
        with pytest.raises(NemtError) as info:
            load_vlm("tiny", cache_dir=folder, seed=seed, size=size)
        said = str(info.value)
        assert str(folder) in said and "seed 0, size 32" in said and f"seed {seed}, size {size}" in said
        assert "--out" in said and "delete" in said
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the user's folder is left as it was


def test_the_image_embedding_cache_of_one_tiny_clip_seed_is_not_reused_for_another(tmp_path):
    a = train_tiny_clip(n=64, size=32, epochs=1, seed=0)
    b = train_tiny_clip(n=64, size=32, epochs=1, seed=1)
    assert a.name != b.name and "seed=0" in a.name and "seed=1" in b.name
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    cache = tmp_path / "emb.safetensors"
    image_embeddings(a, [x], cache=cache, key="k")
    assert torch.allclose(image_embeddings(b, [x], cache=cache, key="k"), b.encode_image(x), atol=1e-6)


# ---------------------------------------------------------------------------- 3. NaN and inf

class _VLM:
    """Image embeddings from simple image statistics; text embeddings from a hash of the text."""
    name = "stats"

    def __init__(self, nan_image: bool = False, nan_text: bool = False):
        self.nan_image, self.nan_text = nan_image, nan_text

    def encode_image(self, x):
        e = torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, :, :8].mean((1, 2, 3)), torch.ones(len(x))], 1)
        if self.nan_image:
            e[0, 0] = float("nan")
        return e

    def encode_text(self, texts):
        out = torch.stack([torch.randn(4, generator=torch.Generator().manual_seed(sum(map(ord, t)))) for t in texts])
        if self.nan_text:
            out[-1, 0] = float("nan")
        return out


def test_non_finite_pixels_features_temperatures_and_embeddings_are_refused_by_name(fitted):
    net, est = fitted
    x = images(2)
    for bad in (float("inf"), float("nan")):
        xb = x.clone()
        xb[0, 0, 5, 5] = bad
        with pytest.raises(ParameterError, match=r"^x has 1 NaN or infinite values"):
            est.assign(xb)
        with pytest.raises(ParameterError, match=r"^x has"):
            NasSegments(net, 3)(xb)
        with pytest.raises(ParameterError, match=r"^x has"):
            SlicSegments(4)(xb)
    f = composite_activations(net, x)
    fb = f.clone()
    fb[0, 0, 0, 0] = float("nan")
    for fit in (fit_kmeans, fit_clustering_module):
        with pytest.raises(ParameterError, match=r"^features hold 1 NaN"):
            fit(fb, 2)
    with pytest.raises(ParameterError, match=r"^features hold"):
        fit_kmeans(f, 2).assign(fb)
    for t in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(ParameterError, match="temperature must be a finite number > 0"):
            fit_kmeans(f, 2, temperature=t)
    probes = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    nan_probe = probes.clone()
    nan_probe[0] = float("nan")
    with pytest.raises(ParameterError, match=r"^x has 256 NaN"):
        annotate(net, "3", nan_probe, _VLM(), ["nodule", "cyst"])
    with pytest.raises(NemtError, match="'stats' gave image embeddings with 1 NaN"):
        annotate(net, "3", probes, _VLM(nan_image=True), ["nodule", "cyst"], method="clip-dissect")
    with pytest.raises(NemtError, match="'stats' gave text embeddings with NaN"):
        annotate(net, "3", probes, _VLM(nan_text=True), ["nodule", "cyst"], method="clip-dissect")
    sim = torch.rand(20, 4)
    sim[3, 1] = float("nan")
    with pytest.raises(ParameterError, match="^concept_similarity holds 1 NaN"):
        mammi(torch.rand(20, 3), sim)
    with pytest.raises(ParameterError, match="^similarity holds 1 NaN"):
        clip_dissect(torch.rand(20, 3), sim)


# ---------------------------------------------------------------------------- 5. float64, channel-last, lists

def test_float64_input_meets_a_float32_model_as_in_the_explainers(fitted):
    net, est = fitted
    x = images(2, seed=4)
    assert torch.allclose(composite_activations(net, x.double()), composite_activations(net, x))
    assert torch.equal(est.assign(x.double())[0], est.assign(x)[0])
    assert torch.equal(NasSegments(net, 3)(x.double()), NasSegments(net, 3)(x))
    f64 = ActivationClustering(net, k=3, max_samples=300).fit(images().double())
    assert torch.equal(f64.clusters_.centroids, est.clusters_.centroids)
    probes = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    a, b = (annotate(net, "3", p, _VLM(), ["nodule", "cyst"], method="clip-dissect") for p in (probes, probes.double()))
    assert torch.equal(a.activations, b.activations) and a.status == b.status


def test_channel_last_wrong_channels_and_lists_of_single_images_are_refused_clearly(fitted):
    net, est = fitted
    x = images(2)
    last = x.permute(0, 2, 3, 1)
    for call in (lambda: composite_activations(net, last), lambda: est.assign(last), lambda: NasSegments(net, 3)(last),
                 lambda: ActivationClustering(net, k=3).fit(last),
                 lambda: annotate(net, "3", torch.rand(4, 16, 16, 1), _VLM(), ["nodule"])):
        with pytest.raises(ParameterError, match=r"cannot take x of shape .*channel-first \(B, C, \*spatial\)"):
            call()
    with pytest.raises(ParameterError, match=r"cannot take x of shape \(2, 3, 16, 16\)"):
        composite_activations(net, x.repeat(1, 3, 1, 1))
    singles = [images(1, seed=i)[0] for i in range(6)]  # (C, H, W) each
    with pytest.raises(ParameterError, match=r"list of batches.*torch\.stack\(data\)"):
        ActivationClustering(net, k=3, max_samples=300).fit(singles)
    with pytest.raises(ParameterError, match=r"list of batches.*torch\.stack\(data\)"):
        annotate(net, "3", singles, _VLM(), ["nodule", "cyst"])
    assert ActivationClustering(net, k=3, max_samples=300).fit(torch.stack(singles)).n_pixels_ == 6 * 64


# ---------------------------------------------------------------------------- 6. one rule for k and the settings

@pytest.mark.parametrize("call,name", [
    (lambda f, net, x: fit_kmeans(f, 0), "k"),
    (lambda f, net, x: fit_kmeans(f, -1), "k"),
    (lambda f, net, x: fit_kmeans(f, 1), "k"),
    (lambda f, net, x: fit_kmeans(f, 2.5), "k"),
    (lambda f, net, x: fit_clustering_module(f, -1), "k"),
    (lambda f, net, x: fit_clustering_module(f, 2, batch_size=0), "batch_size"),
    (lambda f, net, x: fit_clustering_module(f, 2, init_temperature=0), "init_temperature"),
    (lambda f, net, x: fit_clustering_module(f, 2, epochs=-1), "epochs"),
    (lambda f, net, x: ClusteringModule(f.shape[1], 1), "k"),
    (lambda f, net, x: ActivationClustering(net, k=2.7).fit(x), "k"),
    (lambda f, net, x: ActivationClustering(net, k="3").fit(x), "k"),
    (lambda f, net, x: ActivationClustering(net, k=2, batch_size=0).fit(x), "batch_size"),
    (lambda f, net, x: ActivationClustering(net, k=2, epochs=-1, method="module").fit(x), "epochs"),
    (lambda f, net, x: NasSegments(net, 2.5), "k"),
    (lambda f, net, x: NasSegments(net, 3, fit_scale=float("inf")), "fit_scale"),
    (lambda f, net, x: NasSegments(net, 3)(x, 0), "n_segments"),
    (lambda f, net, x: NasSegments(net, 3)(x, 1), "n_segments"),
    (lambda f, net, x: NasSegments(net, 3)(x[:2], [3]), "n_segments"),
    (lambda f, net, x: NasSegments(net, 3)(x[:2], [3, 1]), r"n_segments\[1\]"),
    (lambda f, net, x: SlicSegments(4)(x, 0), "n_segments"),
    (lambda f, net, x: SlicSegments(1), "n_segments"),
    (lambda f, net, x: NasSegments(net, 3)(x[:0]), "no image"),
    (lambda f, net, x: SlicSegments(4)(x[:0]), "no image"),
])
def test_counts_and_settings_are_refused_naming_the_parameter(call, name):
    net = net2d()
    x = images(4)
    f = composite_activations(net, x[:2])
    with pytest.raises(ParameterError, match=name):
        call(f, net, x)


def test_assign_refuses_features_of_another_width(fitted):
    net, _ = fitted
    f = composite_activations(net, images(2))
    for clusters in (fit_kmeans(f, 2), fit_clustering_module(f, 2, epochs=1)):
        with pytest.raises(ParameterError, match=f"features have D=5 channels.*fitted on D={f.shape[1]}"):
            clusters.assign(f[:, :5])


# ---------------------------------------------------------------------------- 7. damaged clustering folders

def test_a_damaged_clustering_folder_is_refused_naming_the_file_and_the_field(fitted, tmp_path):
    net, est = fitted
    good = est.save(tmp_path / "good")
    meta = json.loads((good / "clustering.json").read_text())

    def variant(raw=None, weights=None, **edit):
        d = tmp_path / f"v{len(list(tmp_path.iterdir()))}"
        shutil.copytree(good, d)
        if raw is not None:
            (d / "clustering.json").write_text(raw)
        elif edit:
            (d / "clustering.json").write_text(json.dumps({**meta, **edit}))
        if weights is not None:
            (d / "clustering.safetensors").write_bytes(weights)
        return d

    cases = [(variant(raw="42"), "clustering.json", "not a JSON object"),
             (variant(raw="null"), "clustering.json", "not a JSON object"),
             (variant(k="three"), "clustering.json: k", "whole number >= 2"),
             (variant(grid=[0, 0]), "clustering.json: grid", "whole numbers >= 1"),
             (variant(grid="8x8"), "clustering.json: grid", "whole numbers >= 1"),
             (variant(layers="3"), "clustering.json: layers", "list of module names"),
             (variant(temperature=-1), "clustering.json: temperature", "finite number > 0"),
             (variant(temperature="nan"), "clustering.json: temperature", "finite number > 0"),
             (variant(weights=b""), "clustering.safetensors", "not a readable safetensors file"),
             (variant(weights=b"garbage"), "clustering.safetensors", "not a readable safetensors file")]
    for folder, where, why in cases:
        with pytest.raises(CardError, match=why) as info:
            ActivationClustering.load(folder, net)
        assert str(folder / where) in str(info.value)
    bad_rank = variant(grid=[8])  # a plain module has no card: the rank is checked on the first input
    with pytest.raises(ParameterError, match=r"fitted on 1D inputs"):
        ActivationClustering.load(bad_rank, net).assign(images(1))
    with pytest.raises(ParameterError, match="a file is there, not a folder"):
        est.save(good / "clustering.json")
    assert torch.equal(ActivationClustering.load(good, net).assign(images(2))[0], est.assign(images(2))[0])


# ---------------------------------------------------------------------------- 11. MAMMI and soft-WPMI settings

def test_mammi_and_soft_wpmi_refuse_settings_out_of_range():
    acts, sim = torch.rand(20, 3), torch.rand(20, 4)
    for kw, name in (({"keep": 1.5}, "keep"), ({"keep": -0.1}, "keep"), ({"quantile": -1.0}, "quantile"),
                     ({"quantile": 1.0}, "quantile")):
        with pytest.raises(ParameterError, match=rf"^{name} must be a number in \[0, 1\)"):
            mammi(acts, sim, **kw)
    for template in (torch.rand(5), torch.rand(1)):  # a single value would broadcast silently
        with pytest.raises(ParameterError, match=r"template_similarity must be \(N,\) = \(20,\)"):
            mammi(acts, sim, template)
    probs = torch.softmax(sim, 1)
    with pytest.raises(ParameterError, match="^top_k must be a whole number >= 1"):
        soft_wpmi(acts, probs, top_k=0)
    with pytest.raises(ParameterError, match="activations hold no probe image"):
        soft_wpmi(acts[:0], probs[:0])
    with pytest.raises(ParameterError, match="p_end"):
        soft_wpmi(acts, probs, p_end=1.5)


# ---------------------------------------------------------------------------- 12. superpixels, label maps, entropy

def test_superpixelify_keeps_a_constant_exactly_and_an_empty_batch_empty():
    seg = torch.randint(0, 4, (2, 5, 7), generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.float64, torch.float16):
        const = torch.full((2, 1, 5, 7), 0.1, dtype=dtype)
        assert torch.equal(superpixelify(const, seg), const)
    assert superpixelify(torch.rand(0, 1, 5, 7), seg[:0]).shape == (0, 1, 5, 7)
    assert superpixelify(torch.rand(2, 0, 5, 7), seg).shape == (2, 0, 5, 7)


def test_label_map_and_entropy_refuse_a_size_that_does_not_fit_and_entropy_a_gamma_that_is_no_assignment():
    gamma = torch.softmax(torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(0)), 1)
    for size in ((8, 8), (0, 8, 8), (4.5, 8, 8)):
        with pytest.raises(ParameterError, match=r"^size must be 3 whole numbers >= 1"):
            label_map(gamma, size)
        with pytest.raises(ParameterError, match=r"^size must be 3 whole numbers >= 1"):
            entropy(gamma, size)
    assert label_map(gamma, (8, 8, 8)).shape == (2, 8, 8, 8)
    with pytest.raises(ParameterError, match="does not sum to 1"):
        entropy(gamma * 2)
    with pytest.raises(ParameterError, match="negative"):
        entropy(torch.tensor([[[[-0.5]], [[1.5]]]]))
    assert torch.allclose(entropy(torch.full((1, 12, 2, 2), 1 / 12)), torch.full((1, 2, 2), math.log(12)))


# ---------------------------------------------------------------------------- 13. load_segmenter's message

def test_load_segmenter_says_the_count_must_be_at_least_2():
    for text in ("nas:1", "slic:0", "nas:x"):
        with pytest.raises(NemtError, match="N a whole number >= 2"):
            load_segmenter(text, net2d())


def test_segment_ious_and_area_fractions_refuse_other_shapes_and_ids_outside_k():
    from nemt.bench.clusters import area_fractions, segment_ious

    # a 2x2 label map against a 3x3 mask used to give IoUs of the flattened pixels, without a word
    with pytest.raises(NemtError, match=r"segments \(1, 2, 2\) and gt \(1, 3, 3\) must have the same shape"):
        segment_ious(torch.tensor([[[0, 1], [2, 5]]]), torch.ones(1, 3, 3, dtype=torch.bool), 6)
    labels = torch.tensor([[[0, 1], [2, 5]]])
    with pytest.raises(NemtError, match=r"labels hold id 5: ids must be 0..2 \(k = 3\)"):
        area_fractions(labels, 3)
    with pytest.raises(NemtError, match=r"segments hold id 5: ids must be 0..2"):
        segment_ious(labels, torch.ones(1, 2, 2, dtype=torch.bool), 3)
    with pytest.raises(NemtError, match=r"labels hold id -1"):
        area_fractions(torch.tensor([[[0, -1]]]), 3)
    # within range they are what they were
    assert torch.equal(area_fractions(labels, 6), torch.tensor([[0.25, 0.25, 0.25, 0, 0, 0.25]], dtype=torch.float64))


def test_concepts_refuse_a_signal_model_before_the_tiny_clip_trains(tmp_path):
    """Every vision-language model here embeds 2D images: a 1D (or 3D) model was refused only after ~20 s of
    training the tiny CLIP, leaving its folder behind (audit of 1D/3D)."""
    from typer.testing import CliRunner

    from nemt.cli import app
    res = CliRunner().invoke(app, ["data", "ecg", "--out", str(tmp_path / "d"), "--n", "24", "--duration", "2",
                                   "--seed", "0"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "m"), "--arch",
                                   "smallcnn", "--dims", "1", "--size", "200", "--epochs", "1", "--batch-size", "8",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["concepts", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d"),
                                   "--layer", "output", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "takes 2D images; this model takes 1D inputs" in res.output, res.output
    assert not (tmp_path / "c" / "tiny-clip").exists()
