"""The classifiers we train and explain, built by name for 1D signals, 2D images or 3D volumes.

ResNet-10/18/34/50 and DenseNet-121 come from MONAI (``monai.networks.nets``),
built with the standard ImageNet-style stem (7x7 stride-2 convolution and
max-pool; MONAI's default stride is 1) and non-in-place activations, so that
hooks and gradient-based explainers see each stage's output unchanged.
``smallcnn`` is a four-stage CNN for tests and quick runs. ``linear``, ``mlp``
and ``cnn`` are the small models of the XAI-TRIS benchmark (Clark, Wilming &
Haufe 2024); they take the optional ``input_size`` keyword (spatial size) to
size their dense layers, which training fills in (:data:`SIZED_BY_INPUT`), and
infer it at the first forward pass without it. No weights are ever downloaded: every model
starts from random initialisation. ``pantypes`` (2D) is the Pantypes prototype
classifier (:mod:`nemt.models.pantypes`): logits like the others, plus loss
terms of its own that training adds (its ``auxiliary_loss``), and layers sized
by ``input_size``, which training fills in (:data:`SIZED_BY_INPUT`). ``mimic``
is M copies of a ``base`` architecture whose outputs are the mean of the copies'
log-softmax (:class:`nemt.models.guided.GuidedEnsemble`, trained by ``nemt train --guide mimic``).

1D (``spatial_dims=1``, inputs (B, C, L), e.g. ECG leads as channels): every
architecture is built with MONAI's 1D layers. ``resnet10`` (one basic residual
block per stage, so ``layer1`` … ``layer4`` are the four residual blocks) is the
1D ResNet of the ECG examples; ``widen_factor=0.5`` halves its widths
(32/64/128/256) and ``no_max_pool=True`` keeps twice the time resolution
(stages at L/2 … L/16 instead of L/4 … L/32).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from monai.networks.layers.factories import Conv, Norm, Pool
from monai.networks.nets import DenseNet121, resnet10, resnet18, resnet34, resnet50
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


def _dense(in_features: int | None, out_features: int, bias: bool = True) -> nn.Module:
    """``nn.Linear``, or ``nn.LazyLinear`` when the input size is not known yet."""
    if in_features is None:
        return nn.LazyLinear(out_features, bias=bias)
    return nn.Linear(in_features, out_features, bias=bias)


def _numel(input_size: Any, spatial_dims: int) -> int | None:
    if input_size is None:
        return None
    size = [int(s) for s in input_size]
    if len(size) != spatial_dims or min(size) < 1:
        raise NemtError(f"input_size needs {spatial_dims} positive sizes, got {list(input_size)}")
    return math.prod(size)


class LinearNet(nn.Module):
    """Flatten and one linear layer (XAI-TRIS's linear logistic regression, ``LLR``).

    ``fc.weight`` reshaped to the input is the model's weight map.
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 2,
                 input_size: Any = None, bias: bool = True):
        super().__init__()
        n = _numel(input_size, spatial_dims)
        self.fc = _dense(None if n is None else n * in_channels, out_channels, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class MLP(nn.Module):
    """Flatten, hidden [linear, ReLU, dropout] layers, linear head (XAI-TRIS's MLP: 256, 256, 64, dropout 0.3)."""

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 2,
                 input_size: Any = None, hidden: Any = (256, 256, 64), dropout: float = 0.3,
                 bias: bool = True):
        super().__init__()
        n = _numel(input_size, spatial_dims)
        width = None if n is None else n * in_channels
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [_dense(width, int(h), bias), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = int(h)
        self.hidden = nn.Sequential(*layers)
        self.fc = _dense(width, out_channels, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(x.flatten(1)))


class XaiTrisCNN(nn.Module):
    """Four [conv, ReLU, max-pool] stages, flatten, linear head (XAI-TRIS's CNN).

    Channels ``width * (1, 2, 4, 8)`` (XAI-TRIS: 4, 8, 16, 32). XAI-TRIS
    uses 4x4 kernels padded by 1 (a 64 px input shrinks to 63, 31, 30, ...);
    here an odd kernel (3 by default) is padded to keep the size, so the
    stages ``stage1`` … ``stage4`` halve the resolution exactly (/2 … /16)
    like ``smallcnn``'s (Grad-CAM and the NEMt decoder read them) and maps
    are not shifted by asymmetric padding. The head sees the flattened last
    stage (32 x 4 x 4 at 64 px).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 2,
                 input_size: Any = None, width: int = 4, kernel_size: int = 3, bias: bool = True):
        super().__init__()
        if kernel_size % 2 != 1:
            raise NemtError(f"kernel_size must be odd, got {kernel_size}")
        conv, pool = Conv[Conv.CONV, spatial_dims], Pool[Pool.MAX, spatial_dims]
        chans = [in_channels, width, 2 * width, 4 * width, 8 * width]
        for i in range(4):
            self.add_module(f"stage{i + 1}", nn.Sequential(
                conv(chans[i], chans[i + 1], kernel_size, padding=kernel_size // 2), nn.ReLU(), pool(2)))
        n = None
        if input_size is not None:
            _numel(input_size, spatial_dims)
            n = chans[-1] * math.prod(int(s) // 16 for s in input_size)
            if n == 0:
                raise NemtError(f"input_size {list(input_size)} is too small for four 2x poolings (need >= 16)")
        self.fc = _dense(n, out_channels, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(4):
            x = getattr(self, f"stage{i + 1}")(x)
        return self.fc(x.flatten(1))


def _linear(spatial_dims: int, in_channels: int, out_channels: int, **kw: Any) -> nn.Module:
    return LinearNet(spatial_dims, in_channels, out_channels, **kw)


def _mlp(spatial_dims: int, in_channels: int, out_channels: int, **kw: Any) -> nn.Module:
    return MLP(spatial_dims, in_channels, out_channels, **kw)


def _xaitris_cnn(spatial_dims: int, in_channels: int, out_channels: int, **kw: Any) -> nn.Module:
    return XaiTrisCNN(spatial_dims, in_channels, out_channels, **kw)


def _pantypes(spatial_dims: int, in_channels: int, out_channels: int, **kw: Any) -> nn.Module:
    from nemt.models.pantypes import Pantypes  # a prototype model with its own loss terms (see that module)
    return Pantypes(spatial_dims, in_channels, out_channels, **kw)


def _mimic(spatial_dims: int, in_channels: int, out_channels: int, **kw: Any) -> nn.Module:
    from nemt.models.guided import GuidedEnsemble  # M copies of a base architecture (``nemt train --guide mimic``)
    return GuidedEnsemble(spatial_dims, in_channels, out_channels, **kw)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet10": _resnet(resnet10),
    "resnet18": _resnet(resnet18),
    "resnet34": _resnet(resnet34),
    "resnet50": _resnet(resnet50),
    "densenet121": _densenet121,
    "smallcnn": _smallcnn,
    "linear": _linear,
    "mlp": _mlp,
    "cnn": _xaitris_cnn,
    "pantypes": _pantypes,
    "mimic": _mimic,
}

#: architectures whose layers are sized by the input: training passes ``input_size`` (the training size)
#: unless the architecture keywords give it, so that the card rebuilds the same network (the XAI-TRIS models'
#: dense layers would otherwise be lazy, and a saved model of them could not be loaded)
SIZED_BY_INPUT = frozenset({"pantypes", "linear", "mlp", "cnn"})


#: keywords that training writes into every new card (unless given): choices whose class default is kept
#: for cards written before them, so that an older model is rebuilt as it was trained. Pantypes: the
#: public codes' Euclidean distance in the similarity (with the paper's squared distance, z sampled in
#: training under-fits: see :mod:`nemt.models.pantypes`).
RECORDED_DEFAULTS = {"pantypes": {"distance": "euclidean"}}


def sized_arch_kwargs(arch: str, arch_kwargs: dict, size: Any) -> dict:
    """``arch_kwargs`` plus ``input_size`` (``size``) for the architectures of :data:`SIZED_BY_INPUT`, and the
    :data:`RECORDED_DEFAULTS` of new models."""
    out = dict(arch_kwargs)
    if arch in SIZED_BY_INPUT:
        out.setdefault("input_size", [int(s) for s in size])
    for key, value in RECORDED_DEFAULTS.get(arch, {}).items():
        out.setdefault(key, value)
    return out


def build_model(arch: str, *, spatial_dims: int, in_channels: int, out_channels: int,
                **arch_kwargs: Any) -> nn.Module:
    """A freshly initialised network by name (see :data:`ARCHITECTURES`).

    >>> net = build_model("smallcnn", spatial_dims=2, in_channels=1, out_channels=3)
    >>> net(torch.zeros(2, 1, 32, 32)).shape
    torch.Size([2, 3])
    >>> ecg = build_model("resnet10", spatial_dims=1, in_channels=12, out_channels=5, widen_factor=0.5)
    >>> ecg(torch.zeros(2, 12, 1000)).shape
    torch.Size([2, 5])
    """
    if arch not in ARCHITECTURES:
        raise NemtError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if spatial_dims not in (1, 2, 3):
        raise NemtError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
    try:
        return ARCHITECTURES[arch](spatial_dims, in_channels, out_channels, **arch_kwargs)
    except TypeError as err:  # an unknown or ill-typed keyword: name the architecture and what it was given
        if not arch_kwargs:
            raise
        raise NemtError(f"{arch} cannot be built with {arch_kwargs}: TypeError: {err}") from err
