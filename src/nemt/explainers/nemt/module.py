"""The explanation module: an encoder's stage features in, one keep-mask per output out.

Encoder: the frozen explained model itself (its stage outputs read with
forward hooks; one forward pass gives both the model's outputs and the skip
features), or, in the model-agnostic mode, a small trainable CNN of its own.

Decoder (as in the paper): from the deepest stage up, each block upsamples
(nearest) to the next skip's size, concatenates the skip, and applies twice
[3x3 conv, BatchNorm, SiLU]; the last block's skip is the input image at full
resolution. Channels 256/128/64/32/16 (the last ones when there are fewer
stages). A 1x1 conv gives T channels, a learnable per-channel affine and a
sigmoid give the keep-mask, and the smoothing operator follows. The affine's
bias starts at logit(init_keep), so the first masks delete only a little of
the image: a head that starts at sigmoid(0) = 0.5 deletes half the image and,
with few training steps, never leaves that start.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Norm, Pool
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from nemt.ops import evaluating, probe_input, resize_linear
from nemt.explainers.layers import FeatureTap
from nemt.explainers.nemt.losses import staircase
from nemt.explainers.nemt.smoothing import RandomSmoothing

MIN_STEP_CELLS = 8
"""Cells of the decoder's grid the smallest map step needs before the map is made on that grid and resized.
BreastMNIST (28 px, a 14 px grid): 1 % is 2 cells there, and after the linear resize 1-5 % of the validation
maps had no pixel at 0.5; cut at 28 px, none (docs/results.md, "Do NEMt's defaults carry?"). Every other 2D and 3D
input here has at least 10 cells in its 1 % step and keeps the cheaper path."""


def conv_block(spatial_dims: int, cin: int, cout: int) -> nn.Sequential:
    """Twice [3x3 conv, BatchNorm, SiLU]."""
    conv, norm = Conv[Conv.CONV, spatial_dims], Norm[Norm.BATCH, spatial_dims]
    return nn.Sequential(conv(cin, cout, 3, padding=1, bias=False), norm(cout), nn.SiLU(),
                         conv(cout, cout, 3, padding=1, bias=False), norm(cout), nn.SiLU())


class MaskDecoder(nn.Module):
    """U-Net decoder over skip features (shallow first) plus the image; outputs keep-mask logits.

    ``full_resolution=True`` ends with a block at the image's resolution
    whose skip is the image itself (the first design). ``False`` (the
    default of new fits) stops at the finest feature stage: the image,
    resized to that stage's grid, joins that stage's skip, and the logits are
    upsampled (bilinear / trilinear) to the image. That drops the costliest
    block (with the first widths at 224 px, about 20 of 55 ms per image of
    decoder time on 2 CPU threads) and loses no detail the maps keep: the
    smoothing operator's box (21 px at 224 px) is wider than the 2-pixel
    cells of the finest stage.
    """

    def __init__(self, spatial_dims: int, image_channels: int, skip_channels: Sequence[int], n_maps: int,
                 channels: Sequence[int] = (256, 128, 64, 32, 16), init_keep: float = 0.95,
                 full_resolution: bool = True):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.full_resolution = bool(full_resolution) or len(skip_channels) < 2  # one stage: the image block stays
        n_blocks = len(skip_channels)  # deepest stage is the start; one block per other stage + image
        chans = list(channels)[-n_blocks:] if n_blocks <= len(channels) else \
            [channels[0]] * (n_blocks - len(channels)) + list(channels)
        skips = list(skip_channels[-2::-1]) + [image_channels]
        if not self.full_resolution:  # the image joins the finest stage's skip instead of its own block
            chans = chans[:-1]
            skips = skips[:-2] + [skips[-2] + image_channels]
        ins = [skip_channels[-1]] + chans[:-1]
        self.blocks = nn.ModuleList(conv_block(spatial_dims, i + s, c) for i, s, c in zip(ins, skips, chans))
        conv = Conv[Conv.CONV, spatial_dims]
        self.head = conv(chans[-1], n_maps, 1)
        self.affine = conv(n_maps, n_maps, 1, groups=n_maps)  # learnable per-map scale and shift
        object.__setattr__(self, "_fused", None)
        with torch.no_grad():
            self.affine.weight.fill_(1.0)
            self.affine.bias.fill_(math.log(init_keep / (1 - init_keep)))

    def train(self, mode: bool = True) -> "MaskDecoder":
        object.__setattr__(self, "_fused", None)  # weights may change: rebuild the fused copy on the next eval pass
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        object.__setattr__(self, "_fused", None)
        return super()._load_from_state_dict(*args, **kwargs)

    def _eval_blocks(self) -> list[nn.Module]:
        """The blocks with each BatchNorm folded into its convolution, channels-last (eval only; same outputs)."""
        if getattr(self, "_fused", None) is None:
            fused = []
            for block in self.blocks:
                c1, b1, a1, c2, b2, a2 = block
                fused.append(nn.Sequential(fuse_conv_bn_eval(c1, b1), a1, fuse_conv_bn_eval(c2, b2), a2)
                             .to(memory_format=self._channels_last))
            object.__setattr__(self, "_fused", fused)  # a cache, not a submodule: stays out of state_dict
        return self._fused

    @property
    def _channels_last(self) -> torch.memory_format:
        if self.spatial_dims == 1:  # (B, C, L) has no channels-last format
            return torch.contiguous_format
        return torch.channels_last if self.spatial_dims == 2 else torch.channels_last_3d

    def forward(self, feats: Sequence[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        """Skip features (shallow first) and the image -> keep logits (B, T, *spatial)."""
        fast = not (self.training or torch.is_grad_enabled())
        blocks = self._eval_blocks() if fast else self.blocks
        if fast:  # channels-last tensors make the convolutions and concatenations about a quarter faster on CPU
            feats = [f.contiguous(memory_format=self._channels_last) for f in feats]
            image = image.contiguous(memory_format=self._channels_last)
        x = feats[-1]
        skips = list(feats[-2::-1])
        if self.full_resolution:
            skips.append(image)
        else:
            skips[-1] = torch.cat([skips[-1], resize_linear(image, skips[-1].shape[2:])], dim=1)
        for block, skip in zip(blocks, skips):
            x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
            x = block(torch.cat([x, skip], dim=1))
        return self.affine(self.head(x)).contiguous()  # at the finest decoded grid (see ``full_resolution``)


class OwnEncoder(nn.Module):
    """Model-agnostic mode: a small trainable CNN with four stages (/2 … /16)."""

    def __init__(self, spatial_dims: int, in_channels: int, widths: Sequence[int] = (32, 64, 128, 256)):
        super().__init__()
        pool = Pool[Pool.MAX, spatial_dims]
        chans = [in_channels, *widths]
        self.stages = nn.ModuleList(nn.Sequential(conv_block(spatial_dims, chans[i], chans[i + 1]), pool(2))
                                    for i in range(len(widths)))
        self.widths = list(widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class ExplanationModule(nn.Module):
    """Encoder (frozen model's stages, or its own) + decoder + sigmoid + smoothing.

    ``forward(x)`` returns (explanation maps (B, T, *spatial), model outputs
    of the clean x (B, n_outputs)); ``logits(x)`` the decoder's raw mask logits
    instead of the maps (training uses them). The explained model is kept outside this module's
    parameters, stays in eval mode and never receives a gradient step.
    """

    def __init__(self, model: nn.Module, *, spatial_dims: int, in_channels: int, input_size: Sequence[int],
                 n_maps: int, layers: Sequence[str] | None, own_encoder: bool,
                 decoder_channels: Sequence[int], init_keep: float, kernel_size: int, smoothing: bool,
                 map_kind: str = "keep", map_areas: Sequence[float] = (), map_temperature: float = 0.02,
                 map_smoothing: bool = False, decoder_full_resolution: bool = True):
        super().__init__()
        self.map_kind, self.map_areas, self.map_temperature = map_kind, tuple(map_areas), float(map_temperature)
        self.map_smoothing = bool(map_smoothing)
        object.__setattr__(self, "model", model)  # not a submodule: no parameters, no train()
        self.own_encoder = own_encoder
        if own_encoder:
            self.encoder = OwnEncoder(spatial_dims, in_channels)
            skip_channels = self.encoder.widths
            self.layers: list[str] = []
        else:
            self.layers = list(layers)
            with FeatureTap(model, self.layers) as tap, torch.no_grad(), evaluating(model):
                model(probe_input(model, (in_channels, *input_size), batch=2))
                skip_channels = [int(tap.features[n].shape[1]) for n in self.layers]
        self.decoder = MaskDecoder(spatial_dims, in_channels, skip_channels, n_maps, decoder_channels, init_keep,
                                   full_resolution=decoder_full_resolution)
        self.smoothing = RandomSmoothing(spatial_dims, kernel_size, enabled=smoothing)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(explanation maps (B, T, *spatial) in [0, 1], model outputs of the clean x (B, n_outputs))."""
        logits, out = self.logits(x, native=True)
        return self.maps(logits, size=x.shape[2:]), out

    def maps(self, logits: torch.Tensor, smooth: bool = True, size: Sequence[int] | None = None) -> torch.Tensor:
        """Explanation maps from the decoder's logits, by the objective's map kind.

        ``keep`` (the paper's objective): the deleted region 1 - smooth(sigmoid(logits)).
        ``sigmoid`` (a student of another explainer): sigmoid(logits), resized.
        ``nested``: the mean of the nested fixed-area masks (``map_areas``), smoothed if ``map_smoothing``.
        Logits on a coarser grid (``logits(x, native=True)``) are turned into a
        map there and the map is resized to ``size`` before the smoothing
        (a quarter of the per-map work at half resolution; the box is wider
        than the grid's cells), unless the smallest map area covers fewer
        than :data:`MIN_STEP_CELLS` cells of that grid: then the logits are
        resized first and the steps cut at ``size``, as in training.
        ``smooth=False`` leaves out the smoothing operator.
        """
        sm = self.smoothing if smooth else (lambda m: m)
        size = tuple(size) if size is not None else tuple(logits.shape[2:])
        if self.map_kind == "sigmoid":  # a student: the teacher's map as a per-pixel probability, no smoothing
            return resize_linear(torch.sigmoid(logits), size)
        if self.map_kind == "keep":
            return 1 - sm(resize_linear(torch.sigmoid(logits), size))
        if size != tuple(logits.shape[2:]) and min(self.map_areas) * math.prod(logits.shape[2:]) < MIN_STEP_CELLS:
            logits = resize_linear(logits, size)  # a step of a few cells would blur below 0.5 when resized
        if self.map_smoothing:  # the box resolves the top; the sigmoid order keeps older fits' maps as they were
            return sm(resize_linear(staircase(logits, self.map_areas, self.map_temperature), size))
        # unsmoothed: a tie-break that keeps the largest logits apart in float32 (see staircase)
        return resize_linear(staircase(logits, self.map_areas, self.map_temperature, order="linear"), size)

    def logits(self, x: torch.Tensor, native: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits (B, T, *spatial) and the model's outputs (B, n_outputs), from one pass of the model.

        ``native``: the logits on the decoder's own grid (the finest feature
        stage's, unless the decoder has a full-resolution block), not resized to x.
        """
        if self.own_encoder:
            with torch.no_grad(), evaluating(self.model):
                out = self.model(x)
            feats = self.encoder(x)
        else:  # hooks for this pass only: the caller's model keeps no hook of ours between calls
            with FeatureTap(self.model, self.layers) as tap, torch.no_grad(), evaluating(self.model):
                out = self.model(x)
            feats = [tap.features[n] for n in self.layers]
        logits = self.decoder(feats, x)
        return (logits if native else resize_linear(logits, x.shape[2:])), out
