"""Pantypes: a prototype self-explainable classifier whose prototypes span each class's whole distribution.

Kjærsgaard, Boubekki & Clemmensen, "Pantypes: Diverse Representatives for
Self-Explainable Models", AAAI 2024 (authors' code: ``pantypes``). The model
is ProtoVAE (Gautam et al., NeurIPS 2022) with its orthogonality loss
replaced by a *volume* loss:

- encoder ``x -> (mu, log sigma^2)``, each ``(B, L)``; ``z = mu + sigma * eps``
  in training, ``z = mu`` at test;
- ``M`` prototypes per class, ``p_j`` in the latent space (``K * M`` rows of
  :attr:`Pantypes.prototypes`, class ``j // M``);
- similarity ``s_j = log((d_j + 1) / (d_j + 1e-4))`` with ``d_j = ||z - p_j||^2``
  (computed as ``log1p((1 - 1e-4) / (d_j + 1e-4))``: the same value, and > 0 however far z is);
- logits ``= W s``, a bias-free linear layer (initialised +1 to the own class,
  -0.5 to the others, as ProtoPNet and the authors do);
- a decoder ending in ``tanh`` that reconstructs the input from ``z`` (MSE);
- KL of ``N(mu, sigma^2)`` to ``N(p_j, I)`` for the own class's prototypes,
  mean over latent dimensions, weighted by ``s_j / sum_own s``;
- volume loss: per class ``G_k = P_k P_k^T`` (``M x M`` Gram matrix of the
  class's prototypes), ``L_vol = mean_k 1 / sqrt(det G_k)``.

The total loss is ``CE + reconstruction + KL + volume`` (all weights 1),
trained with Adam at 1e-3 and 5 prototypes per class in the paper.

Choices where the paper or its code are silent or unsafe:

- **Duplicate prototypes.** ``det G_k`` is 0 when two prototypes of a class
  coincide and the paper's ``1 / sqrt(det G_k)`` is then infinite (the public
  code computes it as is and gives inf/NaN). Here ``G_k + eps I`` is used, with
  ``eps = volume_eps = 1e-4`` (latent units squared), and the determinant is
  taken as ``exp(log det)`` from a float64 ``slogdet``: a duplicate pair gives a
  large but finite loss and finite gradients, and a near-duplicate pair is
  pushed apart (an exact pair is a saddle: both get the same gradient). The
  bias is ``(1 + eps / lambda_i)`` per eigenvalue ``lambda_i`` of ``G_k``:
  negligible for prototypes of norm ~1 and more (``eps = 0`` gives the
  paper's formula, see :func:`class_volumes`).
- **Distance.** ``d_j`` is the squared Euclidean distance, as in the ProtoVAE
  paper, by default of this class; both public codes pass the unsquared ``cdist``
  (``distance="euclidean"``), which ``nemt train`` records in every new card:
  with it a sampled z trains (planted-modes benchmark: accuracy 1.0 in 3 of 3
  seeds, against 1 of 3 with the squared distance; see docs/guide.md).
- **Sampling.** ``z = mu + sigma * eps`` in training (the public codes test
  ``~is_train``, which is always truthy, so they always use ``mu``). ``eps``
  comes from a generator owned by the model, seeded by the persistent buffers
  ``noise_seed`` and ``noise_step`` (one step per training forward; ``nemt train``
  keys it by the micro-batch instead, see :meth:`Pantypes.set_noise_key`), so a run
  resumed from a checkpoint draws the same noise and the caller's global RNG
  is never touched. ``sample=False`` keeps ``z = mu`` in training too, which
  is what the public codes run. Measured consequence (planted-modes benchmark, 28 px, L = 256): the
  KL to ``N(p_j, I)`` holds sigma^2 at ~1, so a sampled z lies at ``d_j >= L sigma^2 ~ 250`` from every
  prototype, ``s_j ~ 1 / d_j ~ 0.004`` and the logits differ by < 0.1: cross-entropy 0.68 after 6
  epochs, every image called one class. With ``z = mu`` the same run reaches CE < 0.001 and
  accuracy 1.0 (``benchmarks/pantypes_modes.py --z-train mu``).
- **Reconstruction target.** nemt standardises inputs (``(unit - mean) / std``
  with ``unit`` in [0, 1], see :class:`~nemt.data.Preprocessing`); the tanh
  decoder reconstructs ``2 * unit - 1`` in [-1, 1] (the authors' MNIST
  inputs are normalised to [-1, 1] the same way), so a decoded image ``d``
  shows as the intensity ``(d + 1) / 2`` in [0, 1].
- **Sizes.** 2D only (the paper's image models). The encoder follows the
  authors' MNIST network ([conv 3x3, ReLU, BatchNorm, 2x average pooling] per
  stage, flatten, two linear layers); it has 2 stages up to 32 px (28 px:
  7 x 7 cells, exactly the authors' net) and one more per doubling above
  (64 px: 3 stages, 128 px: 4), chosen from ``input_size`` (``nemt train``
  passes the training size). Any input size runs: the last stage is average
  pooled to the grid the linear layers were made for, and the decoder's
  output is resized to the input's size.
- **Initialisation** follows the authors' code (uniform +-0.08 for the encoder
  and the decoder's linear and transposed convolutions, He normal for the
  decoder's convolutions, standard normal prototypes).

Training in ``nemt train --arch pantypes``: :meth:`Pantypes.forward` in
training mode keeps what the extra terms need, and the training loop adds
:meth:`Pantypes.auxiliary_loss` to its (class-weighted) cross-entropy; the
loop's optimiser (AdamW, one-cycle) and augmentation stay those of every nemt
model (``--weight-decay 0`` is closest to the paper's Adam). Without the
training loop, :func:`fit_pantypes` trains on tensors exactly as the paper
(Adam 1e-3, constant rate).

Explanations: :func:`top_prototypes` (the nearest prototypes of an input with
their similarities and decoded images) and the ``prototypes`` explainer
(:mod:`nemt.explainers.prototypes`). Since :meth:`Pantypes.forward` returns
logits (B, K), every other explainer works on the model unchanged.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nemt.errors import NemtError
from nemt.ops import ParameterError, evaluating, is_whole_number, seeded

__all__ = ["Pantypes", "PantypesParts", "is_pantypes", "class_volumes", "volume_loss", "kl_to_prototypes", "similarity",
           "fit_pantypes", "pantypes_of", "top_prototypes", "restart_dead_prototypes"]

#: the similarity's epsilon (ProtoPNet, ProtoVAE, Pantypes)
SIMILARITY_EPS = 1e-4
#: d_j of the similarity: the ProtoVAE paper's squared distance, or the public codes' ``cdist``
DISTANCES = ("squared", "euclidean")
#: log-variance clamp of the authors' code: sigma^2 in [1e-8, 1e8]
_LOGVAR_LIMIT = math.log(1e8)


# ----------------------------------------------------------------------------- the losses, as functions

def similarity(z: torch.Tensor, prototypes: torch.Tensor, distance: str = "squared") -> torch.Tensor:
    """``s_j = log((d_j + 1) / (d_j + 1e-4))``, ``d_j = ||z - p_j||^2``; z (B, L), prototypes (P, L) -> (B, P).

    Between ``log(1) = 0`` (far) and ``log(1e4) = 9.21`` (on the prototype). The squared distance is
    written out (not ``cdist``) so that its gradient is 0, not NaN, at distance 0. ``distance="euclidean"``
    uses ``d_j = ||z - p_j||`` as the public codes' ``cdist`` does (``sqrt(||.||^2 + 1e-8)``: a finite
    gradient at 0). Computed as ``log1p((1 - 1e-4) / (d + 1e-4))``, the same value: the difference of two
    logs cancels to exactly 0 in float32 for d beyond ~1.7e7, where this stays positive (~1 / d), so the
    KL term's and the explainer's weights ``s_j / sum s`` stay defined far from every prototype.
    """
    _check_distance(distance)
    d = (z[:, None, :] - prototypes[None, :, :]).pow(2).sum(-1)
    if distance == "euclidean":
        d = (d + 1e-8).sqrt()
    return torch.log1p((1 - SIMILARITY_EPS) / (d + SIMILARITY_EPS))


def _logdet_gram(prototypes: torch.Tensor, eps: float) -> torch.Tensor:
    """``log det(P_k P_k^T + eps I)`` per class in float64 (float32 on devices without it); (K, M, L) -> (K,)."""
    dtype = torch.float32 if prototypes.device.type == "mps" else torch.float64
    p = prototypes.to(dtype)
    gram = p @ p.transpose(1, 2)
    if eps:
        gram = gram + eps * torch.eye(gram.shape[-1], dtype=dtype, device=gram.device)
    sign, logabs = torch.linalg.slogdet(gram)
    # a Gram matrix plus eps I is positive definite: a non-positive sign is float rounding at det ~ 0
    return torch.where(sign > 0, logabs, torch.full_like(logabs, -math.inf))


def class_volumes(prototypes: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """``sqrt(det(P_k P_k^T + eps I))`` per class: the M-dimensional volume of the parallelotope spanned
    by the class's prototypes; prototypes (K, M, L) -> (K,), in the prototypes' dtype.

    ``eps = 0`` is the paper's volume: orthonormal prototypes give exactly 1, and scaling them by ``c``
    multiplies it by ``|c|^M``. With ``eps > 0`` (the loss's guard) orthonormal prototypes scaled by ``c``
    give ``(c^2 + eps)^(M/2)``.
    """
    _check_prototypes(prototypes)
    return torch.exp(0.5 * _logdet_gram(prototypes, eps)).to(prototypes.dtype)


VOLUME_FORMS = ("inverse", "log")


def volume_loss(prototypes: torch.Tensor, eps: float = 1e-4, centred: bool = False,
                form: str = "inverse") -> torch.Tensor:
    """``mean_k 1 / sqrt(det(P_k P_k^T + eps I))`` (``form="log"``: its log): prototypes (K, M, L) -> scalar.

    Computed as ``mean_k exp(-log det / 2)`` in float64, so it is finite for ``eps > 0`` even when
    prototypes coincide (see the module docstring). The paper's parallelotope is spanned from the origin,
    so it also grows with the prototypes' norms (for orthogonal ones det G = prod |p_i|^2): the loss pays
    a prototype for moving *away from the origin*, not only from its class-mates. ``centred=True`` (not in
    the paper) spans it from the class's first prototype instead, ``D_k = P_k[1:] - P_k[0]`` (M - 1 edges:
    (M - 1)! times the volume of the prototypes' simplex, whichever vertex is used), so only their spread
    counts.

    ``form="log"`` (not in the paper) is ``mean_k -log sqrt(det(...))``, the log-determinant of a DPP's
    likelihood. With the prototypes scaled by c the inverse form's gradient falls as c^-(M+1): for
    prototypes at the data's scale in a 256-dimensional latent it is ~1e-6 and moves nothing (docs/guide.md,
    "Pantypes"); the log form's falls only as 1/c, so it keeps pushing the prototypes apart (on the planted
    modes: out of the data, where the KL term's similarity-weighted pull no longer holds them).
    """
    _check_prototypes(prototypes)
    if form not in VOLUME_FORMS:
        raise NemtError(f"volume form must be one of {VOLUME_FORMS}, got {form!r}")
    if centred:
        prototypes = prototypes[:, 1:] - prototypes[:, :1]
    logdet = _logdet_gram(prototypes, eps)
    if form == "log":
        return (-0.5 * logdet).mean().to(prototypes.dtype)
    return torch.exp(-0.5 * logdet).mean().to(prototypes.dtype)


def kl_to_prototypes(mu: torch.Tensor, logvar: torch.Tensor, sims: torch.Tensor, y: torch.Tensor,
                     prototypes: torch.Tensor) -> torch.Tensor:
    """ProtoVAE's KL term: ``KL(N(mu, sigma^2) || N(p_j, I))`` (mean over the L latent dimensions) to each
    prototype ``j`` of the sample's own class, weighted by ``s_j / sum_own s``, summed over those
    prototypes, mean over the batch.

    mu, logvar (B, L); sims (B, K * M); y (B,) class indices; prototypes (K, M, L) -> scalar.
    """
    k, m, _ = prototypes.shape
    own = prototypes[y]  # (B, M, L)
    var = logvar.exp()[:, None, :]
    kl = 0.5 * (var + (mu[:, None, :] - own).pow(2) - 1.0 - logvar[:, None, :]).mean(-1)  # (B, M)
    s = sims.view(-1, k, m)[torch.arange(len(y), device=y.device), y]  # (B, M), all > 0
    return ((s * kl).sum(1) / s.sum(1)).mean()


def _check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise NemtError(f"distance must be 'squared' (the ProtoVAE paper) or 'euclidean' (the public codes' "
                        f"cdist), got {distance!r}")


def _check_prototypes(prototypes: torch.Tensor) -> None:
    if prototypes.ndim != 3:
        raise NemtError(f"prototypes must be (classes, prototypes per class, latent dims), got shape "
                        f"{tuple(prototypes.shape)}")


# ----------------------------------------------------------------------------- the network

class PantypesParts(NamedTuple):
    """What one forward pass computes: logits (B, K), mu and logvar (B, L), z (B, L), similarities (B, K * M)."""

    logits: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor
    similarities: torch.Tensor


def _n_stages(input_size: Sequence[int] | None) -> int:
    """2 stages up to 32 px (28 px: the authors' 7 x 7 cells), one more per doubling above."""
    if input_size is None:
        return 2
    return max(2, math.ceil(math.log2(min(input_size) / 8)))


class Pantypes(nn.Module):
    """A Pantypes (ProtoVAE with a volume loss) classifier for 2D images; ``forward`` returns logits (B, K).

    ``out_channels`` classes (multi-class, at least 2), ``prototypes_per_class`` prototypes each (M = 5 in
    the paper) in a ``latent_dim``-dimensional latent space (256 for the authors' 28 px data sets).
    ``input_size`` (H, W) sizes the encoder (see the module docstring; ``None``: 28 px); ``width`` is the
    first stage's channels (doubled per stage). Loss weights: ``volume_weight`` (0 gives ProtoVAE without
    its orthogonality term, the ablation of the paper), ``kl_weight``, ``reconstruction_weight``; the
    cross-entropy's weight is 1. ``volume_eps`` guards the determinant. ``sample``: z = mu + sigma * eps in
    training (the paper; False: z = mu, what the public codes run). With the volume loss on, a class's M
    prototypes (M - 1 edges with ``volume_centred``) must fit in the latent space, M <= L: more span no
    volume. ``seed``: the initial weights and
    the noise seed, drawn inside a forked RNG (the caller's global generator is left as it was); ``None``
    draws them from the global generator like any torch module (nemt train seeds it).

    >>> net = Pantypes(out_channels=3, input_size=(28, 28), seed=0).eval()
    >>> net(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 3])
    >>> net.prototypes.shape      # K * M prototypes; class of prototype j: j // M
    torch.Size([15, 256])
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 2, *,
                 input_size: Sequence[int] | None = None, latent_dim: int = 256, prototypes_per_class: int = 5,
                 width: int = 32, volume_weight: float = 1.0, kl_weight: float = 1.0,
                 reconstruction_weight: float = 1.0, volume_eps: float = 1e-4, sample: bool = True,
                 distance: str = "squared", volume_centred: bool = False, volume_form: str = "inverse",
                 seed: int | None = None):
        super().__init__()
        if spatial_dims != 2:
            raise NemtError(f"pantypes is a 2D model (the paper's image networks); got spatial_dims={spatial_dims}")
        if out_channels < 2:
            raise NemtError(f"pantypes is a multi-class classifier: out_channels (classes) must be >= 2, "
                            f"got {out_channels}")
        if input_size is not None and (len(input_size) != 2 or min(int(s) for s in input_size) < 8):
            raise NemtError(f"input_size must be 2 sizes >= 8, got {list(input_size)}")
        for name, v in (("latent_dim", latent_dim), ("prototypes_per_class", prototypes_per_class),
                        ("width", width)):
            if int(v) < 1:
                raise NemtError(f"{name} must be a positive integer, got {v}")
        if volume_eps < 0 or min(volume_weight, kl_weight, reconstruction_weight) < 0:
            raise NemtError("volume_eps and the loss weights must be >= 0")
        if volume_weight > 0 and volume_eps == 0:
            raise NemtError("volume_eps must be > 0 when the volume loss is on: det G is 0 for duplicate "
                            "prototypes and 1/sqrt(det G) infinite")
        self.n_classes, self.per_class, self.latent_dim = int(out_channels), int(prototypes_per_class), int(latent_dim)
        self.in_channels = int(in_channels)
        self.input_size = None if input_size is None else tuple(int(s) for s in input_size)
        self.volume_weight, self.kl_weight = float(volume_weight), float(kl_weight)
        self.reconstruction_weight, self.volume_eps = float(reconstruction_weight), float(volume_eps)
        self.sample = bool(sample)
        _check_distance(distance)
        self.distance = distance
        self.volume_centred = bool(volume_centred)
        if volume_form not in VOLUME_FORMS:
            raise NemtError(f"volume_form must be one of {VOLUME_FORMS}, got {volume_form!r}")
        self.volume_form = volume_form
        edges = self.per_class - 1 if self.volume_centred else self.per_class
        if self.volume_weight > 0 and edges > self.latent_dim:
            raise NemtError(f"prototypes_per_class={self.per_class} with latent_dim={self.latent_dim}: "
                            f"{edges} {'edge vectors' if self.volume_centred else 'prototypes'} of a class in "
                            f"{self.latent_dim} dimensions span no volume (their Gram matrix is always "
                            f"singular), so the volume loss stays at its largest and swamps training; give "
                            f"latent_dim >= {edges}, fewer prototypes_per_class, or volume_weight=0")
        self._cache: tuple[torch.Tensor, PantypesParts] | None = None
        self._noise_key: int | None = None
        if seed is None:
            self._build(width)
        else:
            with seeded(int(seed)):  # forked: the caller's generator continues as if nothing was drawn
                self._build(width)

    def _build(self, width: int) -> None:
        n = self.n_stages = _n_stages(self.input_size)
        size = self.input_size or (28, 28)
        self.grid = tuple(max(1, math.ceil(s / 2 ** n)) for s in size)
        chans = [self.in_channels] + [width * 2 ** i for i in range(n)]
        for i in range(n):  # the authors' stage: conv, ReLU, BatchNorm, 2x average pooling
            self.add_module(f"stage{i + 1}", nn.Sequential(
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1), nn.ReLU(), nn.BatchNorm2d(chans[i + 1]),
                nn.AvgPool2d(2)))
        self.pool = nn.AdaptiveAvgPool2d(self.grid)
        cells = chans[-1] * math.prod(self.grid)
        self.to_latent = nn.Sequential(nn.Flatten(), nn.Linear(cells, 2 * self.latent_dim), nn.ReLU(),
                                       nn.Linear(2 * self.latent_dim, 2 * self.latent_dim))
        self.from_latent = nn.Sequential(nn.Linear(self.latent_dim, cells), nn.ReLU(), nn.BatchNorm1d(cells))
        up: list[nn.Module] = []
        dchans = [chans[-1]] + [max(width, chans[-1] // 2 ** (i + 1)) for i in range(n)]
        for i in range(n):  # conv, ReLU, BatchNorm, 2x transposed conv, ReLU, BatchNorm
            up += [nn.Conv2d(dchans[i], dchans[i + 1], 3, padding=1), nn.ReLU(), nn.BatchNorm2d(dchans[i + 1]),
                   nn.ConvTranspose2d(dchans[i + 1], dchans[i + 1], 4, stride=2, padding=1), nn.ReLU(),
                   nn.BatchNorm2d(dchans[i + 1])]
        up.append(nn.Conv2d(dchans[-1], self.in_channels, 3, padding=1))
        self.decoder = nn.Sequential(*up)
        self._decoder_channels = chans[-1]
        self.prototypes = nn.Parameter(torch.randn(self.n_classes * self.per_class, self.latent_dim))
        self.last_layer = nn.Linear(self.n_classes * self.per_class, self.n_classes, bias=False)
        self.register_buffer("prototype_class", torch.arange(self.n_classes * self.per_class) // self.per_class,
                             persistent=False)
        # the reparameterisation's noise: a generator seeded by (noise_seed, noise_step), saved with the weights
        self.register_buffer("noise_seed", torch.randint(0, 2 ** 31 - 1, ()))
        self.register_buffer("noise_step", torch.zeros((), dtype=torch.int64))
        self._initialise()

    def _initialise(self) -> None:
        for part, conv_init in ((self.encoder_modules(), "uniform"), (self.decoder_modules(), "kaiming")):
            for m in part:
                if isinstance(m, nn.ConvTranspose2d) or isinstance(m, nn.Linear) or (
                        isinstance(m, nn.Conv2d) and conv_init == "uniform"):
                    nn.init.uniform_(m.weight, -0.08, 0.08)
                elif isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and m.bias is not None:
                    nn.init.zeros_(m.bias)
        own = F.one_hot(self.prototype_class, self.n_classes).T.float()  # (K, P)
        with torch.no_grad():
            self.last_layer.weight.copy_(own - 0.5 * (1 - own))

    def encoder_modules(self) -> list[nn.Module]:
        return [m for name, mod in self.named_children() if name.startswith("stage") or name == "to_latent"
                for m in mod.modules()]

    def decoder_modules(self) -> list[nn.Module]:
        return list(self.from_latent.modules()) + list(self.decoder.modules())

    @property
    def prototypes_by_class(self) -> torch.Tensor:
        """The prototypes as (K, M, L): row ``k`` holds class ``k``'s."""
        return self.prototypes.view(self.n_classes, self.per_class, self.latent_dim)

    # --------------------------------------------------------------------- forward pieces
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``mu`` and ``log sigma^2`` (clamped to sigma^2 in [1e-8, 1e8]) of inputs (B, C, H, W); each (B, L)."""
        if x.ndim != 4:
            raise NemtError(f"pantypes takes 2D images (B, C, H, W), got shape {tuple(x.shape)}")
        h = x
        for i in range(self.n_stages):
            h = getattr(self, f"stage{i + 1}")(h)
        out = self.to_latent(self.pool(h))
        mu, logvar = out[:, :self.latent_dim], out[:, self.latent_dim:]
        return mu, logvar.clamp(-_LOGVAR_LIMIT, _LOGVAR_LIMIT)

    def decode(self, z: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """Images in [-1, 1] decoded from latents z (B, L): (B, C, H, W) at ``size`` (default: ``input_size``,
        else the decoder's own 28 px-style size). ``(decode(z) + 1) / 2`` is the intensity in [0, 1]."""
        h = self.from_latent(z).view(len(z), self._decoder_channels, *self.grid)
        h = self.decoder(h)
        size = tuple(int(s) for s in (size or self.input_size or h.shape[2:]))
        if tuple(h.shape[2:]) != size:
            h = F.interpolate(h, size=size, mode="bilinear", align_corners=False)
        return torch.tanh(h)

    def similarities(self, z: torch.Tensor) -> torch.Tensor:
        """Similarities (B, K * M) of latents z (B, L) to every prototype (see :func:`similarity`)."""
        return similarity(z, self.prototypes, self.distance)

    def parts(self, x: torch.Tensor, sample: bool | None = None) -> PantypesParts:
        """Everything one forward pass computes for inputs (B, C, H, W). ``sample`` (default: the training
        flag) draws ``z = mu + sigma * eps`` from the model's own noise generator instead of ``z = mu``."""
        mu, logvar = self.encode(x)
        z = mu
        if (self.training and self.sample) if sample is None else sample:
            z = mu + torch.exp(0.5 * logvar) * self._noise(mu)
        s = self.similarities(z)
        return PantypesParts(self.last_layer(s), mu, logvar, z, s)

    def set_noise_key(self, key: int | None) -> None:
        """Key the next training forward's noise by ``key`` (with the model's ``noise_seed``) instead of the
        step counter: the training loop passes the micro-batch's seed (:func:`nemt.distributed.batch_seed`),
        so that under torchrun each micro-batch draws the noise it draws in one process, whichever rank
        runs it. Used once, then cleared."""
        self._noise_key = None if key is None else int(key)

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator(device=like.device)
        key = self._noise_key
        if key is None:
            gen.manual_seed(int(self.noise_seed) * 1_000_003 + int(self.noise_step))
        else:
            gen.manual_seed((key ^ (int(self.noise_seed) * 1_000_003)) & ((1 << 63) - 1))
            self._noise_key = None
        with torch.no_grad():
            self.noise_step += 1
        return torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) of inputs (B, C, H, W). In training mode with gradients on, the pass is kept for
        :meth:`auxiliary_loss` (the training loop's hook), which releases it."""
        self._cache = None
        p = self.parts(x)
        if self.training and torch.is_grad_enabled():
            self._cache = (x, p)
        return p.logits

    # --------------------------------------------------------------------- losses
    def loss_terms(self, x: torch.Tensor, y: torch.Tensor, parts: PantypesParts, *,
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
        """The terms besides the cross-entropy, unweighted: ``kl``, ``reconstruction``, ``volume`` (scalars).

        x (B, C, H, W) are the standardised inputs of ``parts``; y (B,) class indices; ``mean`` and ``std``
        (one per channel or one for all) undo the standardisation to get the [0, 1] intensities the
        decoder reconstructs as ``2 * unit - 1``. Without them the inputs are taken as standardised with
        mean = std = 0.5 (the reconstruction target is then ``x`` itself, clamped to [-1, 1]).
        """
        if y.ndim != 1 or y.dtype not in (torch.int64, torch.int32, torch.uint8, torch.int16, torch.int8):
            raise NemtError(f"pantypes trains on multi-class labels: y must be class indices (B,), got "
                            f"{tuple(y.shape)} {y.dtype}")
        y = y.long()
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.n_classes):
            raise NemtError(f"labels must be in [0, {self.n_classes - 1}], got {int(y.min())}..{int(y.max())}")
        target = self.reconstruction_target(x, mean, std)
        decoded = self.decode(parts.z, x.shape[2:])
        return {
            "kl": kl_to_prototypes(parts.mu, parts.logvar, parts.similarities, y, self.prototypes_by_class),
            "reconstruction": F.mse_loss(decoded, target),
            "volume": (volume_loss(self.prototypes_by_class, self.volume_eps, self.volume_centred,
                                   self.volume_form)
                       if self.volume_weight else parts.logits.new_zeros(())),
        }

    @staticmethod
    def reconstruction_target(x: torch.Tensor, mean: Sequence[float] | None = None,
                              std: Sequence[float] | None = None) -> torch.Tensor:
        """``2 * unit - 1`` clamped to [-1, 1], ``unit = x * std + mean`` per channel; x (B, C, H, W)."""
        shape = (1, -1, 1, 1)
        m = torch.as_tensor(0.5 if mean is None else list(mean), dtype=x.dtype, device=x.device).reshape(shape)
        s = torch.as_tensor(0.5 if std is None else list(std), dtype=x.dtype, device=x.device).reshape(shape)
        return (2 * (x * s + m) - 1).clamp(-1, 1)

    def weighted_terms(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """``kl_weight * kl + reconstruction_weight * reconstruction + volume_weight * volume``."""
        return (self.kl_weight * terms["kl"] + self.reconstruction_weight * terms["reconstruction"]
                + self.volume_weight * terms["volume"])

    def auxiliary_loss(self, y: torch.Tensor, preprocessing: Any = None) -> torch.Tensor:
        """The weighted KL, reconstruction and volume terms of the last training forward pass (the hook of
        :mod:`nemt.models.training`, which adds it to its cross-entropy); ``preprocessing`` (a
        :class:`~nemt.data.Preprocessing`) gives the inputs' mean and std. Releases the kept pass."""
        if self._cache is None:
            raise NemtError("auxiliary_loss needs a forward pass in training mode with gradients on just before")
        x, parts = self._cache
        self._cache = None
        terms = self.loss_terms(x, y, parts, mean=getattr(preprocessing, "mean", None),
                                std=getattr(preprocessing, "std", None))
        return self.weighted_terms(terms)

    def train(self, mode: bool = True) -> "Pantypes":
        self._cache = None  # a kept pass never outlives a change of mode (nor blocks deepcopy after training)
        return super().train(mode)

    @torch.no_grad()
    def decoded_prototypes(self, size: Sequence[int] | None = None) -> torch.Tensor:
        """Every prototype decoded, as intensities in [0, 1]: (K * M, C, H, W) (eval-mode BatchNorm)."""
        was = self.training
        self.eval()
        try:
            return (self.decode(self.prototypes, size) + 1) / 2
        finally:
            self.train(was)


# ----------------------------------------------------------------------------- explanation

def is_pantypes(model: nn.Module) -> bool:
    """Whether ``model`` is a :class:`Pantypes` network or a :class:`~nemt.models.Classifier` holding one."""
    return isinstance(model, Pantypes) or isinstance(getattr(model, "net", None), Pantypes)


def pantypes_of(model: nn.Module) -> Pantypes:
    """The :class:`Pantypes` network of ``model`` (itself, or a :class:`~nemt.models.Classifier`'s ``net``)."""
    if isinstance(model, Pantypes):
        return model
    net = getattr(model, "net", None)
    if isinstance(net, Pantypes):
        return net
    raise NemtError(f"prototype explanations need a Pantypes model (nemt train --arch pantypes), got "
                    f"{type(net if isinstance(net, nn.Module) else model).__name__}")


@torch.no_grad()
def top_prototypes(model: nn.Module, x: torch.Tensor, k: int = 3, *, target: int | None = None
                   ) -> dict[str, torch.Tensor]:
    """The ``k`` prototypes most similar to each input, with their similarities and decoded images.

    x (B, C, H, W) standardised inputs; ``target``: only that class's prototypes (default: all). Returns
    ``index`` (B, k) prototype indices, ``class`` (B, k) their classes, ``similarity`` (B, k) (``s_j``,
    between 0 and 9.21, descending), ``distance`` (B, k) squared latent distances, ``weight`` (B, k) the
    last layer's weight from each prototype to the predicted class, ``image`` (B, k, C, H, W) the decoded
    prototypes as intensities in [0, 1], and ``predicted`` (B,) the predicted class. Eval mode for the call
    (the model's flags restored after).
    """
    net = pantypes_of(model)
    with evaluating(net):
        mu, _ = net.encode(x)
        s = net.similarities(mu)
        pred = net.last_layer(s).argmax(1)
        cand = torch.arange(s.shape[1], device=s.device)
        if target is not None:
            if not 0 <= int(target) < net.n_classes:
                raise NemtError(f"target must be a class index in [0, {net.n_classes - 1}], got {target}")
            cand = cand[net.prototype_class == int(target)]
        k = min(int(k), len(cand))
        if k < 1:
            raise NemtError(f"k must be >= 1, got {k}")
        sim, order = s[:, cand].topk(k, dim=1)
        idx = cand[order]
        images = net.decoded_prototypes(x.shape[2:])[idx]  # (B, k, C, H, W)
    d = (mu[:, None, :] - net.prototypes[idx]).pow(2).sum(-1)
    return {"index": idx, "class": net.prototype_class[idx], "similarity": sim, "distance": d,
            "weight": net.last_layer.weight[pred[:, None], idx], "image": images, "predicted": pred}


# ----------------------------------------------------------------------------- dead prototypes

@torch.no_grad()
def restart_dead_prototypes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256
                            ) -> torch.Tensor:
    """Move each class's *dead* prototypes (no training image of the class has it as its nearest among the
    class's prototypes) onto the latent mean ``mu`` of the class's image farthest from the class's live
    prototypes, one at a time (k-means++'s farthest-point rule, deterministic; a restarted prototype is live
    for the next). Not in the Pantypes paper: the codebook restart of vector-quantised models, for the dead
    prototypes its origin-spanned volume produces. x (N, C, H, W) standardised images, y (N,) class indices.
    Returns the indices (into ``net.prototypes``) of the prototypes moved. Eval mode for the call.
    """
    net = pantypes_of(model)
    if len(x) != len(y):
        raise NemtError(f"x and y need the same length, got {len(x)} and {len(y)}")
    with evaluating(net):
        mu = torch.cat([net.encode(x[i:i + batch_size])[0] for i in range(0, len(x), batch_size)])
    y = y.to(mu.device).long()
    protos = net.prototypes
    moved = []
    for k in range(net.n_classes):
        zk = mu[y == k]
        if len(zk) == 0:
            continue
        idx = torch.nonzero(net.prototype_class == k).flatten()
        live = set(net.similarities(zk)[:, idx].argmax(1).unique().tolist())   # positions within the class
        for pos in range(len(idx)):
            if pos in live:
                continue
            ref = protos[idx[sorted(live)]] if live else zk.mean(0, keepdim=True)
            far = torch.cdist(zk, ref.to(zk.dtype)).min(1).values.argmax()
            protos[idx[pos]] = zk[far].to(protos.dtype)
            live.add(pos)
            moved.append(int(idx[pos]))
    return torch.tensor(moved, dtype=torch.long)


# ----------------------------------------------------------------------------- training without the CLI

def fit_pantypes(net: Pantypes, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 10, batch_size: int = 64,
                 lr: float = 1e-3, seed: int = 0, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, restart_dead: bool = False,
                 callback: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Train ``net`` in place on tensors as the paper does: Adam at ``lr``, loss ``CE + KL +
    reconstruction + volume`` (the net's weights), shuffled by a generator seeded with ``seed``.
    ``restart_dead`` (not in the paper): after every epoch but the last, :func:`restart_dead_prototypes`
    on the training data, and the moved prototypes' Adam moments are reset; each epoch's dict then has
    ``restarted`` (the count).

    x (N, C, H, W) standardised images (``mean``/``std`` as in :meth:`Pantypes.loss_terms`), y (N,) class
    indices; ``batch_size`` >= 2 (a last batch of one sample is skipped: BatchNorm cannot train on it).
    Returns one dict of mean terms per epoch (``loss``, ``ce``, ``kl``, ``reconstruction``, ``volume``);
    ``callback(epoch, figures)`` is called after each epoch (the net in eval mode). The caller's global RNG
    is untouched; the net is left in eval mode.
    """
    if len(x) != len(y) or len(x) == 0:
        raise NemtError(f"x and y need the same, non-zero length, got {len(x)} and {len(y)}")
    if len(x) < 2:
        raise NemtError(f"fit_pantypes needs at least 2 samples (BatchNorm cannot train on one), got {len(x)}")
    if not (is_whole_number(batch_size) and batch_size >= 2):
        raise ParameterError(f"batch_size must be a whole number >= 2 (BatchNorm cannot train on one sample), "
                             f"got {batch_size!r}")
    gen = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    history = []
    for _ in range(int(epochs)):
        net.train()
        sums: dict[str, float] = {}
        seen = 0
        for idx in torch.randperm(len(x), generator=gen).split(int(batch_size)):
            if len(idx) < 2:  # BatchNorm cannot train on one sample
                continue
            xb, yb = x[idx], y[idx]
            parts = net.parts(xb)
            terms = net.loss_terms(xb, yb, parts, mean=mean, std=std)
            terms["ce"] = F.cross_entropy(parts.logits, yb)
            loss = terms["ce"] + net.weighted_terms(terms)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for name, v in [("loss", loss)] + list(terms.items()):
                sums[name] = sums.get(name, 0.0) + float(v.detach()) * len(idx)
            seen += len(idx)
        history.append({k: v / max(seen, 1) for k, v in sums.items()})
        net.eval()
        if restart_dead and len(history) < int(epochs):
            moved = restart_dead_prototypes(net, x, y)
            state = opt.state.get(net.prototypes, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state and len(moved):
                    state[key][moved.to(state[key].device)] = 0
            history[-1]["restarted"] = float(len(moved))
        if callback is not None:
            callback(len(history), history[-1])
    net.eval()
    return history
