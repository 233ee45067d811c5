"""Grad-CAM(++) batch correctness and known answer; reference maps; localisation metrics by definition."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nemt.explainers import get_explainer
from nemt.explainers.reference import CentredGaussian
from nemt.metrics import relevance_mass, relevance_rank
from nemt.models import Classifier, build_model


def _clf(dims=2, size=32):
    torch.manual_seed(0)
    net = build_model("smallcnn", spatial_dims=dims, in_channels=1, out_channels=3, width=4)
    return Classifier.from_module(net, spatial_dims=dims, in_channels=1, input_size=(size,) * dims,
                                  task="multiclass", label_names=["a", "b", "c"], arch="smallcnn").eval()


@pytest.mark.parametrize("name", ["gradcam", "gradcam++"])
@pytest.mark.parametrize("dims", [2, 3])
def test_per_sample_targets_equal_one_by_one(name, dims):
    size = 32 if dims == 2 else 16
    clf = _clf(dims, size)
    ex = get_explainer(name, clf)
    x = torch.randn(3, 1, *(size,) * dims)
    t = torch.tensor([2, 0, 1])
    batch = ex.explain(x, target=t)
    single = torch.cat([ex.explain(x[i:i + 1], target=int(t[i])) for i in range(3)])
    assert batch.shape == (3, 1, *(size,) * dims)
    assert torch.allclose(batch, single, atol=1e-5)
    assert 0 <= float(batch.min()) and float(batch.max()) <= 1


class _Known(nn.Module):
    """Output c = mean of feature channel c; features = the input's channels (ReLU)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Identity(), nn.ReLU(), nn.AvgPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.features(x)).flatten(1)


def test_gradcam_known_answer():
    """With logit_c = mean(A_c), Grad-CAM's weights are one-hot on channel c: the map is A_c itself."""
    x = torch.zeros(1, 2, 8, 8)
    x[0, 0, :4, :4] = 1.0  # channel 0 bright top-left
    x[0, 1, 4:, 4:] = 1.0  # channel 1 bright bottom-right
    clf = Classifier.from_module(_Known(), spatial_dims=2, in_channels=2, input_size=(8, 8), task="multiclass",
                                 label_names=["tl", "br"]).eval()
    ex = get_explainer("gradcam", clf, layer="features")
    m = ex.explain(x, target="all")
    acts = torch.nn.functional.avg_pool2d(x, 2)  # A, the 4x4 features
    expected = torch.nn.functional.interpolate(acts, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(m, expected / expected.amax(dim=(2, 3), keepdim=True), atol=1e-6)
    assert m[0, 0, :3, :3].min() == 1.0 and m[0, 0, 5:, 5:].max() == 0.0


def test_reference_maps():
    clf = _clf()
    x = torch.zeros(2, 1, 32, 32)
    x[:, :, :, 16:] = 1.0  # a vertical edge at column 16
    sob = get_explainer("sobel", clf).explain(x, "all")
    assert sob.shape == (2, 3, 32, 32) and sob[0, 0, 10, 15:17].min() == 1.0 and sob[0, 0, 10, :10].max() == 0
    g = CentredGaussian.blob((40, 40), 0.1)
    assert abs(float(g.mean()) - 0.1) < 1e-4 and float(g.max()) > 0.99
    r1 = get_explainer("random", clf, seed=3).explain(x)
    assert torch.equal(r1, get_explainer("random", clf, seed=3).explain(x))


def test_relevance_mass_and_rank_by_definition():
    maps = torch.tensor([[[[0.0, 1.0], [3.0, 0.0]]]])  # min-max -> [[0, 1/3], [1, 0]]
    gt = torch.tensor([[[[False, True], [False, False]]]])
    assert math.isclose(float(relevance_mass(maps, gt)), (1 / 3) / (4 / 3), rel_tol=1e-6)
    assert float(relevance_rank(maps, gt)) == 0.0  # |GT| = 1, the top pixel is outside
    gt2 = torch.tensor([[[[False, True], [True, False]]]])
    assert float(relevance_mass(maps, gt2)) == pytest.approx(1.0)
    assert float(relevance_rank(maps, gt2)) == 1.0
    empty = torch.zeros_like(gt)
    assert math.isnan(float(relevance_mass(maps, empty))) and math.isnan(float(relevance_rank(maps, empty)))


def test_laplace_reference_known_answer():
    """|Laplacian| of a single bright pixel: 4 at the pixel, 1 at its four neighbours, 0 elsewhere (before scaling)."""
    x = torch.zeros(1, 1, 7, 7)
    x[0, 0, 3, 3] = 1.0
    m = get_explainer("laplace", _clf())._map(x)[0, 0]
    expected = torch.zeros(7, 7)
    expected[3, 3] = 4
    expected[2, 3] = expected[4, 3] = expected[3, 2] = expected[3, 4] = 1
    assert torch.equal(m, expected)
    assert get_explainer("laplace", _clf(3, 16))._map(torch.zeros(1, 1, 5, 5, 5)).abs().sum() == 0


@pytest.mark.parametrize("dims", [2, 3])
def test_default_layer_skips_a_two_cell_grid(dims):
    """The default layer has at least 3 cells per axis: a 2-cell grid, upsampled, can only peak in a corner.

    smallcnn halves 4 times: at 32 px its last stage is 2 cells per axis and the default is the 4-cell stage
    before it; at 64 px the last stage has 4 cells and stays the default. The corner property is checked on
    random 2-cell maps directly (linear upsampling with replicated edges puts the maximum where the largest
    cell's value is held, the outer quarter of each axis): exactly, so no tolerance.
    """
    from nemt.explainers.base import resize_linear
    from nemt.explainers.layers import find_stages
    for size, expected in ((32, "stage3"), (64, "stage4")):
        clf = _clf(dims, size)
        ex = get_explainer("gradcam", clf)
        assert ex.layer == expected, (size, ex.layer)
        assert find_stages(clf, (1, *(size,) * dims))[-1] == "stage4"  # what the former default took
    torch.manual_seed(1)
    cells = torch.rand(64, 1, *(2,) * dims)
    up = resize_linear(cells, (32,) * dims).flatten(2)
    peak = torch.stack(torch.unravel_index(up.argmax(-1).flatten(), (32,) * dims), -1)  # (64, dims)
    assert bool(((peak < 8) | (peak >= 24)).all())  # every peak in a corner block of a quarter per side
