"""Extremal perturbation and counterfactual inpainting: shapes, batch independence, seeds, area, a known answer."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import nemt.explainers.optimised  # noqa: F401  (registers extremal, inpainting)
from nemt.errors import NemtError
from nemt.explainers import get_explainer
from nemt.models import Classifier, build_model

METHODS = ["extremal", "inpainting"]


def _clf(dims: int = 2, size: int = 32, task: str = "multiclass") -> Classifier:
    torch.manual_seed(0)
    net = build_model("smallcnn", spatial_dims=dims, in_channels=1, out_channels=3, width=4)
    return Classifier.from_module(net, spatial_dims=dims, in_channels=1, input_size=(size,) * dims,
                                  task=task, label_names=["a", "b", "c"], arch="smallcnn").eval()


def _input(b: int, dims: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 1, *(size,) * dims, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dims", [2, 3])
def test_shape_and_range(name, dims):
    size = 32 if dims == 2 else 16
    extra = dict(refresh=4) if name == "inpainting" else {}  # a few inpaintings within the 12 steps
    ex = get_explainer(name, _clf(dims, size), steps=12, mask_stride=4, **extra)
    m = ex.explain(_input(2, dims, size), target="all")
    assert m.shape == (2, 3, *(size,) * dims)
    assert 0 <= float(m.min()) and float(m.max()) <= 1


@pytest.mark.parametrize("name", METHODS)
def test_per_sample_targets_equal_one_by_one(name):
    """Samples do not interact and each mask's loss is its own: a batch (in chunks of 2) equals one-by-one runs.

    Which guarantee this tests, and why in float64: the method is batch-independent in exact arithmetic (a sum
    of per-mask losses, element-wise Adam, an eval-mode network, one shared seeded start), not bit for bit: the
    network's kernels block their sums by batch size, so a sample's logits round differently in a batch, and
    the optimiser amplifies that rounding where the score carries almost no signal (Adam takes a full step on
    a gradient of any size). In float32 (rounding ~6e-8) that reached 2e-4 after 25 steps on an AMD EPYC,
    against ~1e-7 on a Xeon: no float32 tolerance follows from the method. Making it bit-invariant (one mask
    at a time) made it 1.6-4x slower for a ResNet-18 on a 2-core CPU. In float64 the rounding is ~1e-16, and
    the tolerance 1e-5 (any interaction between samples, a shared Adam state or a batch-wide normalisation,
    moves masks by far more) leaves a margin of 1e11 for its amplification (3e3 in the float32 case above).
    """
    ex = get_explainer(name, _clf().double(), steps=25, mask_stride=4, batch_size=2)
    x = _input(3, 2, 32).double()
    t = torch.tensor([2, 0, 1])
    batch = ex.explain(x, target=t)
    single = torch.cat([ex.explain(x[i:i + 1], target=int(t[i])) for i in range(3)])
    assert batch.shape == (3, 1, 32, 32) and batch.dtype == single.dtype == torch.float64
    assert torch.allclose(batch, single, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_same_seed_same_maps(name):
    clf, x = _clf(), _input(2, 2, 32)
    a = get_explainer(name, clf, steps=15, mask_stride=4, seed=7).explain(x, target="all")
    b = get_explainer(name, clf, steps=15, mask_stride=4, seed=7).explain(x, target="all")
    assert torch.equal(a, b)


def test_extremal_mask_has_the_requested_area():
    """The area constraint is nearly hard at the last step: each mask keeps about ``area`` of the image."""
    ex = get_explainer("extremal", _clf(), area=0.1, steps=300, mask_stride=4)
    m = ex.explain(_input(2, 2, 32), target="all")
    assert (m.flatten(2).mean(dim=2) - 0.1).abs().max() < 0.03


def test_model_is_left_unchanged():
    clf = _clf()
    clf.net.fc.weight.requires_grad_(True)
    clf.net.stage1[0].weight.requires_grad_(False)
    flags = [p.requires_grad for p in clf.parameters()]
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    for name in METHODS:
        get_explainer(name, clf, steps=5, mask_stride=4).explain(_input(2, 2, 32), target="all")
    assert all(p.grad is None for p in clf.parameters())
    assert [p.requires_grad for p in clf.parameters()] == flags
    assert all(torch.equal(before[k], v) for k, v in clf.state_dict().items())
    assert not clf.training


class _RegionMeans(nn.Module):
    """Output c = ``scale`` x the mean intensity inside the square region c; blind to every other pixel."""

    def __init__(self, regions: torch.Tensor, scale: float):
        super().__init__()
        self.register_buffer("regions", regions)  # (K, *spatial)
        self.scale = scale

    def forward(self, x):
        r = self.regions
        return self.scale * (x[:, :1] * r[None]).flatten(2).sum(2) / r.flatten(1).sum(1)


def _regions_case() -> tuple[Classifier, torch.Tensor, torch.Tensor]:
    """Three bright 8x8 squares (6 % of a 32 px image each), one per class, on the 4 px mask grid."""
    regions = torch.zeros(3, 32, 32)
    regions[0, 4:12, 4:12] = 1
    regions[1, 20:28, 4:12] = 1
    regions[2, 12:20, 20:28] = 1
    x = regions.sum(0)[None, None] + 0.1 * _input(1, 2, 32)
    # scale 5: a confident classifier whose class probability drops from 1/3 to ~0 without its square
    clf = Classifier.from_module(_RegionMeans(regions, 5.0), spatial_dims=2, in_channels=1, input_size=(32, 32),
                                 task="multiclass", label_names=["a", "b", "c"]).eval()
    return clf, x, regions


@pytest.mark.parametrize("name, params", [
    ("extremal", dict(steps=150)),
    ("extremal", dict(steps=150, perturbation="fade")),
    ("inpainting", dict(steps=150)),
    ("inpainting", dict(steps=150, inpainter="diffusion")),
])
def test_known_answer_mask_lies_on_the_target_region(name, params):
    """Class c's score depends only on square c. Preserving it (extremal: 5 % of the image fits in the 6 %
    square) or deleting it (inpainting: filled from the dark surroundings) is all that changes the score, and
    any mask outside the square only costs area: most of the mask must lie on square c, for every class.
    Not all of it: the bilinear mask is smooth at the 4 px grid scale and bleeds past the square's edge."""
    clf, x, regions = _regions_case()
    m = get_explainer(name, clf, mask_stride=4, **params).explain(x, target="all")[0]
    mass = (m * regions).flatten(1).sum(1) / m.flatten(1).sum(1)
    assert (mass > 0.5).all(), mass


def test_regression_and_bad_parameters():
    clf = Classifier.from_module(_RegionMeans(torch.ones(1, 16, 16), 1.0), spatial_dims=2, in_channels=1,
                                 input_size=(16, 16), task="regression", label_names=["value"]).eval()
    m = get_explainer("extremal", clf, steps=3, mask_stride=4, direction=-1).explain(_input(2, 2, 16))
    assert m.shape == (2, 1, 16, 16)
    with pytest.raises(NemtError, match="area"):
        get_explainer("extremal", clf, area=1.5)
    with pytest.raises(NemtError, match="inpainter"):
        get_explainer("inpainting", clf, inpainter="telea")
    with pytest.raises(NemtError, match="score"):
        get_explainer("inpainting", clf, score="one_minus_prob")
