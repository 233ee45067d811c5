"""Preprocessing: the same geometry for images, masks and boxes; channels; normalisation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nemt.data import Image, Preprocessing
from nemt.data.preprocess import convert_channels
from nemt.errors import DataError


def _image(a, lo=0.0, hi=255.0):
    return Image(array=a.astype(np.float32), spacing=(1.0,) * (a.ndim - 1), affine=None,
                 value_range=(lo, hi), modality="png", path="x.png", meta={})


def test_unit_scale_by_nominal_range_and_minmax():
    a = np.array([[[0, 51, 255]]], np.float32)
    np.testing.assert_allclose(Preprocessing(size=(1, 3)).unit_scale(_image(a)), [[[0.0, 0.2, 1.0]]], rtol=1e-6)
    b = np.array([[[10, 20, 30]]], np.float32)
    out = Preprocessing(size=(1, 3), scale="minmax").unit_scale(_image(b))
    np.testing.assert_allclose(out, [[[0.0, 0.5, 1.0]]])


def test_mask_resized_nearest_with_image_geometry():
    pre = Preprocessing(size=(8, 8))
    m = np.zeros((1, 16, 16), bool)
    m[:, 4:8, 8:12] = True
    r = pre.resize(m, mask=True)
    assert r.dtype == torch.bool and r.shape == (1, 8, 8)
    expected = torch.zeros(1, 8, 8, dtype=torch.bool)
    expected[:, 2:4, 4:6] = True
    assert torch.equal(r, expected)
    # the image's bright block lands where the mask does
    img = pre.resize(m.astype(np.float32))
    assert img[0, 2:4, 4:6].min() > 0.5 and img[0, :2].max() < 0.5


def test_boxes_scale_with_the_same_factors_and_rasterise():
    pre = Preprocessing(size=(50, 100))  # H, W
    boxes = pre.boxes([(10, 20, 30, 40)], original=(100, 200))
    assert boxes == [(5.0, 10.0, 15.0, 20.0)]
    m = pre.box_mask(boxes)
    assert m.shape == (1, 50, 100) and int(m.sum()) == 15 * 20
    assert m[0, 10, 5] and not m[0, 9, 5] and not m[0, 10, 20]


def test_channels():
    rgb = np.stack([np.full((2, 2), v, np.float32) for v in (1.0, 0.0, 0.0)])
    np.testing.assert_allclose(convert_channels(rgb, 1), np.full((1, 2, 2), 0.299), rtol=1e-6)
    assert convert_channels(np.ones((1, 2, 2), np.float32), 3).shape == (3, 2, 2)
    with pytest.raises(DataError, match="2 channels"):
        convert_channels(np.ones((2, 2, 2), np.float32), 3, "a.png")


def test_normalise_round_trip_and_dict():
    pre = Preprocessing(size=(4, 4, 4), channels=1, mean=[0.25], std=[0.5])
    x = torch.rand(2, 1, 4, 4, 4)
    assert torch.allclose(pre.denormalise(pre.normalise(x)), x, atol=1e-6)
    assert torch.allclose(pre.normalise(torch.full((1, 1, 1, 1), 0.75)), torch.ones(1, 1, 1, 1))
    again = Preprocessing.from_dict(pre.to_dict())
    assert again == pre and again.spatial_dims == 3


def test_wrong_dimensionality_named():
    pre = Preprocessing(size=(8, 8, 8))
    with pytest.raises(DataError, match="x.png: shape: image has 2 spatial dimensions"):
        pre.unit_scale(_image(np.zeros((1, 4, 4))))


@pytest.mark.parametrize("src,size", [((1, 16, 12), (8, 8)), ((1, 5, 7), (9, 11)),
                                      ((1, 16, 12, 10), (8, 8, 8)), ((1, 4, 6, 5), (8, 8, 8))])
def test_resize_keeps_constant_images_constant(src, size):
    out = Preprocessing(size=size)(_image(np.full(src, 255.0)))
    assert tuple(out.shape) == (1, *size) and torch.allclose(out, torch.ones_like(out))
