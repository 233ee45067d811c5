"""Activation clusters (issue 16, core): known answers for the clustering module, k-means on a fixed encoder,
entropy, superpixelification, 1D/3D shapes, and the caller's state."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score
from torch import nn

from nemt.clustering import (ClusteringModule, composite_activations, entropy, fit_clustering_module, fit_kmeans,
                             label_map, squared_distances, superpixel_postprocess, superpixelify)

K = 4


def stages(d: int, c: int = 3) -> nn.Sequential:
    """A fixed encoder of 1x1 convolutions (no mixing across pixels): 'stem' at full resolution, then 'pool'
    (/2), 'a' and 'b' (/2) and 'down' (/4), with Dropout and BatchNorm so that eval mode matters."""
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[d - 1]
    pool = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[d - 1]
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[d - 1]
    g = torch.Generator().manual_seed(1)

    def init(m):
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)

    with torch.random.fork_rng():
        net = nn.Sequential()
        net.add_module("stem", conv(c, 8, 1))
        net.add_module("pool", pool(2))
        net.add_module("a", nn.Sequential(conv(8, 8, 1), nn.Tanh()))
        net.add_module("drop", nn.Dropout(0.5))
        net.add_module("b", nn.Sequential(conv(8, 6, 1), bn(6), nn.Tanh()))
        net.add_module("down", pool(2))
    net.apply(init)
    return net


def region_images(n: int = 6, block: int = 2, blocks: int = 8, seed: int = 0):
    """n RGB images made of K constant colours laid out on a grid of blocks x blocks squares of block pixels;
    returns images (n, 3, H, W) and the region labels on the /block grid (n, blocks, blocks)."""
    rng = np.random.default_rng(seed)
    colours = torch.tensor(rng.uniform(-1, 1, size=(K, 3)), dtype=torch.float32)
    labels = torch.tensor(rng.integers(0, K, size=(n, blocks, blocks)))
    labels.view(-1)[:K] = torch.arange(K)  # every region present
    img = colours[labels].permute(0, 3, 1, 2)  # (n, 3, blocks, blocks)
    img = img.repeat_interleave(block, 2).repeat_interleave(block, 3)
    return img, labels


# ---------------------------------------------------------------------------- the clustering module

def test_module_loss_terms_sum_to_gamma_weighted_distances():
    torch.manual_seed(0)
    x = torch.randn(200, 7, dtype=torch.float64)
    m = ClusteringModule(7, 5, seed=3).double()
    with torch.no_grad():
        m.bias.copy_(torch.randn(5, dtype=torch.float64))
    with torch.no_grad():
        terms = m.loss_terms(x)
        gamma, _ = m(x)
        direct = (gamma * squared_distances(x, m.centroids)).sum()
        explicit = sum(gamma[:, k:k + 1] * ((x - m.centroids[k]) ** 2) for k in range(5)).sum()
    assert torch.allclose(direct, explicit, rtol=0, atol=1e-9)
    total = terms["E1"] + terms["E2"] + terms["E3"]
    assert abs(float(total - explicit)) < 1e-6
    assert float(terms["E4"]) == 0.0  # alpha = 1: no prior
    m2 = ClusteringModule(7, 5, alpha=2.0, seed=3).double()
    assert float(m2.loss_terms(x)["E4"].detach()) != 0.0
    assert torch.allclose(m.loss(x), total / x.numel())


def test_module_construction_is_seeded_locally():
    state = torch.get_rng_state()
    a, b = ClusteringModule(6, 3, seed=1), ClusteringModule(6, 3, seed=1)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.centroids, b.centroids)
    assert not torch.equal(a.weight, ClusteringModule(6, 3, seed=2).weight)
    assert torch.equal(state, torch.get_rng_state())


# ---------------------------------------------------------------------------- clusters of a fixed encoder

def test_kmeans_and_module_recover_constant_regions():
    net = stages(2)
    x, truth = region_images()
    feats = composite_activations(net, x, layers=["pool", "a", "b"])
    assert feats.shape == (6, 8 + 8 + 6, 8, 8)
    # each stage's pixel vectors have unit norm: squared norm = number of stages
    assert torch.allclose((feats ** 2).sum(1), torch.full((6, 8, 8), 3.0), atol=1e-5)
    km = fit_kmeans(feats, K, seed=0)
    labels, gamma = km.assign(feats)
    assert labels.shape == (6, 8, 8) and labels.dtype == torch.long and gamma.shape == (6, K, 8, 8)
    assert torch.allclose(gamma.sum(1), torch.ones(6, 8, 8), atol=1e-5)
    assert torch.equal(gamma.argmax(1), labels)
    assert adjusted_rand_score(truth.flatten().numpy(), labels.flatten().numpy()) == 1.0
    cm = fit_clustering_module(feats, K, epochs=10, seed=0)
    labels2, gamma2 = cm.assign(feats)
    assert gamma2.shape == (6, K, 8, 8)
    assert adjusted_rand_score(truth.flatten().numpy(), labels2.flatten().numpy()) == 1.0
    # label map at the image's size: nearest upsampling of the grid labels
    lm = label_map(gamma, x.shape[2:])
    assert lm.shape == (6, 16, 16)
    assert torch.equal(lm, labels.repeat_interleave(2, 1).repeat_interleave(2, 2))


def test_default_layers_and_size():
    net = stages(2)
    x, _ = region_images(n=2, block=4)
    # find_stages: the last shallowest module per resolution, 'b' (/2) and 'down' (/4): both taken (last 3)
    feats = composite_activations(net, x)
    assert feats.shape == (2, 6 + 6, 16, 16)
    assert torch.allclose((feats ** 2).sum(1), torch.full((2, 16, 16), 2.0), atol=1e-5)
    assert torch.equal(feats, composite_activations(net, x, layers=["b", "down"]))
    small = composite_activations(net, x, layers=["down", net.a], size=(5, 5))  # names or modules, any size
    assert small.shape == (2, 6 + 8, 5, 5)


# ---------------------------------------------------------------------------- entropy

def test_entropy_known_answers():
    one_hot = torch.nn.functional.one_hot(torch.randint(0, 6, (2, 4, 5)), 6).permute(0, 3, 1, 2).float()
    assert torch.equal(entropy(one_hot), torch.zeros(2, 4, 5))
    uniform = torch.full((2, 6, 4, 5), 1 / 6, dtype=torch.float64)
    assert torch.allclose(entropy(uniform), torch.full((2, 4, 5), math.log(6), dtype=torch.float64))
    assert entropy(uniform, (8, 10)).shape == (2, 8, 10)
    assert label_map(one_hot, (8, 10)).shape == (2, 8, 10)


# ---------------------------------------------------------------------------- superpixels

@pytest.mark.parametrize("spatial", [(40,), (12, 10), (6, 5, 4)])
def test_superpixelify_known_answers(spatial):
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 2, *spatial, generator=g, dtype=torch.float64)
    segments = torch.randint(-3, 9, (3, *spatial), generator=g) * 7  # arbitrary, negative, shared across images
    out = superpixelify(maps, segments)
    assert out.shape == maps.shape
    for b in range(3):
        for s in segments[b].unique():
            vals = out[b][:, segments[b] == s]  # (T, n)
            assert torch.allclose(vals, vals[:, :1].expand_as(vals), rtol=0, atol=1e-12)
            assert torch.allclose(vals[:, 0], maps[b][:, segments[b] == s].mean(1))
    assert torch.allclose(superpixelify(out, segments), out, rtol=0, atol=1e-12)
    assert torch.allclose(out.flatten(2).sum(-1), maps.flatten(2).sum(-1), rtol=0, atol=1e-9)
    # one segment per image: the mean everywhere; every pixel its own segment: unchanged
    whole = superpixelify(maps, torch.zeros(3, *spatial, dtype=torch.long))
    assert torch.allclose(whole, maps.flatten(2).mean(-1).view(3, 2, *[1] * len(spatial)).expand_as(maps))
    ids = torch.arange(math.prod(spatial)).view(1, *spatial).expand(3, *spatial)
    assert torch.allclose(superpixelify(maps, ids), maps)


def test_superpixel_postprocess_with_an_explainer():
    from nemt.explainers import get_explainer

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    x, truth = region_images(n=2, block=2)
    segments = truth.repeat_interleave(2, 1).repeat_interleave(2, 2)
    pp = superpixel_postprocess(segments)
    maps = get_explainer("saliency", net, postprocess=pp).explain(x, target=0)
    raw = get_explainer("saliency", net).explain(x, target=0)
    assert torch.allclose(maps, superpixelify(raw, segments), atol=1e-6)
    lazy = superpixel_postprocess(lambda m: segments, base="none")
    assert torch.allclose(lazy(raw, 2), superpixelify(raw, segments))
    with pytest.raises(ValueError):
        superpixelify(raw, segments[:, :3])
    with pytest.raises(ValueError):
        superpixelify(raw, segments.float())


# ---------------------------------------------------------------------------- 1D, 3D and the caller's state

@pytest.mark.parametrize("d,spatial", [(1, (32,)), (3, (8, 8, 8))])
def test_other_spatial_dims(d, spatial):
    net = stages(d)
    x = torch.randn(2, 3, *spatial)
    feats = composite_activations(net, x, layers=["pool", "b", "down"])
    grid = tuple(s // 2 for s in spatial)
    assert feats.shape == (2, 8 + 6 + 6, *grid)
    km = fit_kmeans(feats, 3, seed=0)
    labels, gamma = km.assign(feats)
    assert labels.shape == (2, *grid) and gamma.shape == (2, 3, *grid)
    assert label_map(gamma, spatial).shape == (2, *spatial)
    assert entropy(gamma, spatial).shape == (2, *spatial)
    cm = fit_clustering_module(feats, 3, epochs=2, seed=0)
    assert cm.assign(feats)[1].shape == (2, 3, *grid)


def test_caller_state_unchanged():
    net = stages(2)
    net.train()
    net.b.eval()  # mixed flags
    net.a[0].weight.requires_grad_(False)
    flags = {n: m.training for n, m in net.named_modules()}
    grads = {n: p.requires_grad for n, p in net.named_parameters()}
    bn = net.b[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    x, _ = region_images(n=2)
    f1 = composite_activations(net, x, layers=["pool", "a", "b"])
    f2 = composite_activations(net, x)
    km = fit_kmeans(f1, K, seed=0)
    cm = fit_clustering_module(f1, K, epochs=1, seed=0)
    assert {n: m.training for n, m in net.named_modules()} == flags
    assert {n: p.requires_grad for n, p in net.named_parameters()} == grads
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == stats[2]
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    assert not f1.requires_grad and not f2.requires_grad
    # deterministic in the seed, and eval mode makes features independent of dropout
    assert torch.equal(f1, composite_activations(net, x, layers=["pool", "a", "b"]))
    assert torch.equal(km.centroids, fit_kmeans(f1, K, seed=0).centroids)
    assert torch.equal(cm.centroids, fit_clustering_module(f1, K, epochs=1, seed=0).centroids)
