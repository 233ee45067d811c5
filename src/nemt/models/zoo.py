"""The classifiers we train and explain, built by name for 2D or 3D.

ResNet-18/34/50 and DenseNet-121 come from MONAI (``monai.networks.nets``),
built with the standard ImageNet-style stem (7x7 stride-2 convolution and
max-pool; MONAI's default stride is 1) and non-in-place activations, so that
hooks and gradient-based explainers see each stage's output unchanged.
``smallcnn`` is a four-stage CNN for tests and quick runs. No weights are ever
downloaded: every model starts from random initialisation.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from monai.networks.layers.factories import Conv, Norm, Pool
from monai.networks.nets import DenseNet121, resnet18, resnet34, resnet50
from torch import nn

from nemt.errors import NemtError


class SmallCNN(nn.Module):
    """Four [conv, BatchNorm, ReLU, conv, BatchNorm, ReLU, max-pool] stages, global pooling, linear head.

    Stages are ``stage1`` … ``stage4`` (resolution /2 … /16), so the NEMt
    decoder can read them like a ResNet's layers.
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 2, width: int = 16):
        super().__init__()
        conv, norm = Conv[Conv.CONV, spatial_dims], Norm[Norm.BATCH, spatial_dims]
        pool = Pool[Pool.MAX, spatial_dims]
        chans = [in_channels, width, 2 * width, 4 * width, 8 * width]
        for i in range(4):
            self.add_module(f"stage{i + 1}", nn.Sequential(
                conv(chans[i], chans[i + 1], 3, padding=1, bias=False), norm(chans[i + 1]), nn.ReLU(),
                conv(chans[i + 1], chans[i + 1], 3, padding=1, bias=False), norm(chans[i + 1]), nn.ReLU(),
                pool(2),
            ))
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.fc = nn.Linear(chans[-1], out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(4):
            x = getattr(self, f"stage{i + 1}")(x)
        return self.fc(self.pool(x).flatten(1))


def _resnet(factory: Callable) -> Callable[..., nn.Module]:
    def build(spatial_dims: int, in_channels: int, out_channels: int, **kw: Any) -> nn.Module:
        opts = dict(conv1_t_size=7, conv1_t_stride=2, shortcut_type="B", bias_downsample=False,
                    act=("relu", {"inplace": False}))
        opts.update(kw)
        return factory(pretrained=False, spatial_dims=spatial_dims, n_input_channels=in_channels,
                       num_classes=out_channels, **opts)
    return build


def _densenet121(spatial_dims: int, in_channels: int, out_channels: int, **kw: Any) -> nn.Module:
    opts = dict(act=("relu", {"inplace": False}))
    opts.update(kw)
    return DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **opts)


def _smallcnn(spatial_dims: int, in_channels: int, out_channels: int, **kw: Any) -> nn.Module:
    return SmallCNN(spatial_dims, in_channels, out_channels, **kw)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": _resnet(resnet18),
    "resnet34": _resnet(resnet34),
    "resnet50": _resnet(resnet50),
    "densenet121": _densenet121,
    "smallcnn": _smallcnn,
}


def build_model(arch: str, *, spatial_dims: int, in_channels: int, out_channels: int,
                **arch_kwargs: Any) -> nn.Module:
    """A freshly initialised network by name (see :data:`ARCHITECTURES`).

    >>> net = build_model("smallcnn", spatial_dims=2, in_channels=1, out_channels=3)
    >>> net(torch.zeros(2, 1, 32, 32)).shape
    torch.Size([2, 3])
    """
    if arch not in ARCHITECTURES:
        raise NemtError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if spatial_dims not in (2, 3):
        raise NemtError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return ARCHITECTURES[arch](spatial_dims, in_channels, out_channels, **arch_kwargs)
