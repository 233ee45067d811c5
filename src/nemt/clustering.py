"""Clusters of a frozen network's activations (the core of NAVE / NAS / time-localised ECG clusters, issue 16).

The recipe of Boubekki et al. (NAVE, arXiv 2411.19700; NAS, arXiv 2406.04933; ECG, arXiv 2509.15198):

1. :func:`composite_activations`: the outputs of a few stages (default: the last 3 that
   :func:`~nemt.explainers.layers.find_stages` finds), each resized to the finest chosen grid
   (:func:`~nemt.ops.resize_linear`), each pixel vector L2-normalised per stage, concatenated along channels:
   (B, D, *grid), every pixel of norm sqrt(number of stages).
2. A clustering fitted on the pixels (time steps, voxels) pooled over a data set, so cluster ids are shared
   concepts: :func:`fit_kmeans` (scikit-learn) or :func:`fit_clustering_module` (the differentiable
   clustering module of Boubekki et al. 2021, :class:`ClusteringModule`). Both give an object whose
   ``assign(features)`` returns hard labels (N, *grid) and soft assignments gamma (N, K, *grid).
3. :func:`label_map` (argmax of gamma, nearest upsampling to the image) and :func:`entropy` (the per-pixel
   uncertainty of the assignment).
4. :func:`superpixelify`: any saliency map averaged within each segment; :func:`superpixel_postprocess` makes
   it an explainer's ``postprocess=`` step, so every explainer gets it without being edited.
5. :class:`ActivationClustering`: the estimator behind ``nemt clusters``: ``fit`` on a data set (a seeded
   uniform draw of pixels), ``assign`` (label map, uncertainty), ``save`` / ``load`` (safetensors + JSON,
   refused for another model's weights).
6. Segments for superpixelification, computed from each input: the fitted clusters (shared concepts, tag
   ``clusters``), :class:`NasSegments` (k-means on each image's own activations, tag ``nas``) and
   :class:`SlicSegments` (scikit-image SLIC, the baseline, tag ``slic``); :class:`Superpixelified` wraps any
   explainer with one of them (``nemt explain/benchmark --superpixelify``), :func:`load_segmenter` reads
   the command line's choice.

Any ``spatial_dims`` (1, 2, 3). Nothing here changes the caller's state: models run under
:func:`~nemt.ops.evaluating` and ``torch.no_grad``, random draws come from local generators.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nemt.errors import CardError, NemtError
from nemt.explainers.layers import FeatureTap, find_stages, layer_name
from nemt.ops import (ParameterError, blame_shape, checked_input, count_param, device_of, evaluating, is_count,
                      is_finite_number, is_whole_number, nonfinite_problem, postprocess, resize_linear)

#: restarts of scikit-learn's k-means (fixed, so a seed gives one answer whatever scikit-learn's default)
KMEANS_N_INIT = 10


# ---------------------------------------------------------------------------- settings

def _count(value, name: str, least: int = 2) -> int:
    """:func:`~nemt.ops.count_param` with this module's rule for counts of clusters or segments: at least 2
    (a map of one segment says nothing)."""
    return count_param(value, name, least)


def _positive(value, name: str) -> float:
    """``value`` as a float, or a ParameterError naming ``name`` (NaN, inf, 0 and below refused)."""
    if not (is_finite_number(value) and value > 0):
        raise ParameterError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _checked_features(features: torch.Tensor, name: str = "features") -> torch.Tensor:
    """Composite activations (N, D, *grid) without NaN or inf, or a ParameterError naming ``name``."""
    if not torch.is_tensor(features):
        raise ParameterError(f"{name} must be a tensor (N, D, *grid), got {type(features).__name__}")
    if features.ndim < 3:
        raise ParameterError(f"{name} must be (N, D, *grid), got shape {tuple(features.shape)}")
    why = nonfinite_problem(features)
    if why:
        raise ParameterError(f"{name} hold {why}: a clustering of such features means nothing")
    return features


def _model_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` checked as the explainers check theirs (:func:`nemt.ops.checked_input`: a floating tensor
    (B, C, *spatial) without NaN/inf, at least one image), on the model's device in its dtype."""
    return checked_input(x, model, device_of(model), use="clustering")


# ---------------------------------------------------------------------------- 1. composite activations

@torch.no_grad()
def stage_activations(model: nn.Module, x: torch.Tensor, layers: Sequence[str | nn.Module] | None = None
                      ) -> tuple[list[str], list[torch.Tensor]]:
    """The outputs (B, C_l, *grid_l) of ``layers`` (default the last 3 stages of :func:`find_stages`) for
    ``x`` (B, C, *spatial), with their module names: one forward pass in eval mode, without gradients.

    ``x`` is checked as the explainers check theirs: a floating tensor without NaN/inf, cast to the model's
    dtype (float64 input meets a float32 model) on its device; an input the model cannot take (channel-last,
    another channel count or rank) is one error naming x's shape and nemt's channel-first layout."""
    x = _model_input(model, x)
    with evaluating(model), blame_shape(x):
        if layers is None:
            layers = find_stages(model, tuple(x.shape[1:]))[-3:]
        names = [layer_name(model, layer) for layer in layers]
        if not names:
            raise ParameterError("composite_activations needs at least one layer")
        with FeatureTap(model, names) as tap:
            model(x)
            feats = [tap.features[n] for n in names]
    for n, f in zip(names, feats):
        if not torch.is_tensor(f) or f.ndim != x.ndim:
            raise ParameterError(f"layer {n!r} gives {getattr(f, 'shape', type(f))}, not (B, C, *spatial) "
                                 f"with {x.ndim - 2} spatial axes")
    return names, feats


def finest_grid(feats: Sequence[torch.Tensor]) -> tuple[int, ...]:
    """The spatial shape with most pixels among stage outputs (B, C_l, *grid_l)."""
    return tuple(int(s) for s in max((tuple(f.shape[2:]) for f in feats), key=math.prod))


def _checked_size(size: Sequence[int], rank: int, name: str = "size") -> tuple[int, ...]:
    """``size`` as ``rank`` ints >= 1 (one per spatial axis), or a ParameterError naming ``name``."""
    try:
        parts = list(size)
    except TypeError:
        parts = None
    if parts is None or len(parts) != rank or not all(is_count(v) for v in parts):
        raise ParameterError(f"{name} must be {rank} whole numbers >= 1 (one per spatial axis), got {size!r}")
    return tuple(int(v) for v in parts)


def compose(feats: Sequence[torch.Tensor], size: Sequence[int], eps: float = 1e-12) -> torch.Tensor:
    """Stage outputs -> (B, D, *size): each resized linearly to ``size``, each pixel vector divided by its L2
    norm (``eps`` guards zero vectors, which stay zero), concatenated in order (D = sum of C_l)."""
    size = _checked_size(size, feats[0].ndim - 2)
    return torch.cat([F.normalize(resize_linear(f.float() if not f.is_floating_point() else f, size), dim=1,
                                  eps=eps) for f in feats], dim=1)


def nearest_centroid(feats: Sequence[torch.Tensor], centroids: torch.Tensor, size: Sequence[int], *,
                     eps: float = 1e-12, chunk: int = 64) -> torch.Tensor:
    """Index of the nearest of ``centroids`` (K, D) for every pixel of ``compose(feats, size)``: (B, *size).

    The same labels as ``squared_distances(_pixels(compose(feats, size)), centroids).argmin(1)`` (up to the
    float rounding of another summation order), without building the (B, D, *size) composite: the squared
    distance is a sum over stages, and each stage's resize is linear per channel, so its channels are resized
    ``chunk`` at a time, twice (once for the pixel vectors' norms, once for the distances). A pixel's own
    ``||x||^2`` is the same for every centroid, so only ``||c||^2 - 2 x.c`` is summed. Peak memory is about
    ``chunk + K + 1`` values per pixel instead of D: what makes per-voxel assignment of a large 3D volume fit
    (at 96³ with D = 448 and K = 12, 722 MB instead of 3,083 MB: ``benchmarks/nas_memory.py``).
    """
    size = tuple(int(v) for v in size)
    if sum(int(f.shape[1]) for f in feats) != centroids.shape[1]:
        raise ParameterError(f"the stages have {sum(int(f.shape[1]) for f in feats)} channels in all, "
                             f"the centroids {centroids.shape[1]}")
    b, chunk = int(feats[0].shape[0]), max(1, int(chunk))
    dev = feats[0].device
    cen = centroids.to(dev, torch.float32)
    d = (cen * cen).sum(1)[None].repeat(b * math.prod(size), 1)  # ||c||^2, then - 2 x.c stage by stage
    off = 0
    for f in feats:
        f = f if f.is_floating_point() else f.float()
        c = int(f.shape[1])
        sq = torch.zeros(b, *size, device=dev)
        for lo in range(0, c, chunk):
            sq += resize_linear(f[:, lo:lo + chunk], size).float().pow(2).sum(1)
        norm = sq.sqrt().clamp_min(eps)[:, None]  # F.normalize divides by max(||v||, eps)
        for lo in range(0, c, chunk):
            p = _pixels(resize_linear(f[:, lo:lo + chunk], size).float() / norm)
            d -= 2 * p @ cen[:, off + lo:off + lo + p.shape[1]].T
        off += c
    return d.argmin(1).reshape(b, *size)


def composite_activations(model: nn.Module, x: torch.Tensor, layers: Sequence[str | nn.Module] | None = None,
                          size: Sequence[int] | None = None, eps: float = 1e-12) -> torch.Tensor:
    """(B, C, *spatial) images -> (B, D, *grid) composite activations.

    ``layers``: module names (in ``model.net`` for a :class:`~nemt.models.Classifier`) or modules; default
    the last 3 stages of :func:`find_stages`. Each stage's output (B, C_l, *grid_l) is resized linearly to
    ``size`` (default: the finest grid among the chosen stages, the one with most pixels), then each pixel
    vector is divided by its L2 norm (``eps`` guards zero vectors, which stay zero); D = sum of C_l.
    Stages are concatenated in the order given. The model runs once, in eval mode, without gradients.
    """
    if size is not None and torch.is_tensor(x):
        _checked_size(size, x.ndim - 2)
    _, feats = stage_activations(model, x, layers)
    return compose(feats, finest_grid(feats) if size is None else size, eps)


def _pixels(features: torch.Tensor) -> torch.Tensor:
    """(N, D, *grid) -> (N * pixels, D)."""
    if features.ndim < 3:
        raise ParameterError(f"features must be (N, D, *grid), got shape {tuple(features.shape)}")
    return features.movedim(1, -1).reshape(-1, features.shape[1])


def _unpixels(values: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """(N * pixels, K) -> (N, K, *grid) for the grid of ``features``."""
    n, grid = features.shape[0], features.shape[2:]
    return values.reshape(n, *grid, values.shape[-1]).movedim(-1, 1)


def _check_dim(features: torch.Tensor, dim: int) -> None:
    """A ParameterError when ``features`` (N, D, *grid) have another D than the clustering was fitted on."""
    if int(features.shape[1]) != int(dim):
        raise ParameterError(f"features have D={features.shape[1]} channels (shape {tuple(features.shape)}), the "
                             f"clustering was fitted on D={dim}: give the composite activations of the same layers")


def _subsample(x: torch.Tensor, max_samples: int | None, seed: int) -> torch.Tensor:
    if max_samples is None or x.shape[0] <= max_samples:
        return x
    g = torch.Generator().manual_seed(int(seed))
    return x[torch.randperm(x.shape[0], generator=g)[:max_samples].to(x.device)]


def squared_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(n, D), (K, D) -> (n, K) squared Euclidean distances (clamped at 0 against rounding)."""
    d = (x * x).sum(1, keepdim=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)[None]
    return d.clamp_min(0)


# ---------------------------------------------------------------------------- 2a. k-means

@dataclass
class KMeansClusters:
    """A k-means clustering of composite activations: ``centroids`` (K, D) and the softmax ``temperature``."""

    centroids: torch.Tensor
    temperature: float

    def __post_init__(self):
        if not torch.is_tensor(self.centroids) or self.centroids.ndim != 2:
            raise ParameterError(f"centroids must be a tensor (K, D), got "
                                 f"{getattr(self.centroids, 'shape', type(self.centroids).__name__)}")
        why = nonfinite_problem(self.centroids)
        if why:
            raise ParameterError(f"centroids have {why.replace('images', 'centroids')}")
        self.temperature = _positive(self.temperature, "temperature")

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    def assign(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D, *grid) -> labels (N, *grid) int64 (nearest centroid) and gamma (N, K, *grid), where
        gamma_k = softmax_k(-||x - mu_k||^2 / temperature)."""
        _check_dim(_checked_features(features), self.centroids.shape[1])
        x = _pixels(features)
        d = squared_distances(x, self.centroids.to(x.device, x.dtype))
        gamma = _unpixels(torch.softmax(-d / self.temperature, dim=1), features)
        return d.argmin(1).reshape(features.shape[0], *features.shape[2:]), gamma


def fit_kmeans(features: torch.Tensor, k: int, seed: int = 0, *, temperature: float | None = None,
               max_samples: int | None = None) -> KMeansClusters:
    """scikit-learn ``KMeans(k, n_init=KMEANS_N_INIT, random_state=seed)`` on the pixels of ``features``
    (N, D, *grid) pooled over the data set (N * pixels samples; at most ``max_samples`` of them, drawn with
    ``seed``, when given).

    ``temperature`` of the soft assignments: default the mean squared distance of a pixel to its own
    centroid (k-means' inertia per sample, at least 1e-12), the within-cluster scale, so a pixel that is
    one such unit farther from centroid j than from its own has gamma_j / gamma_own = 1/e.
    """
    from sklearn.cluster import KMeans

    k = _count(k, "k")
    if temperature is not None:
        temperature = _positive(temperature, "temperature")
    if max_samples is not None:
        _count(max_samples, "max_samples", 1)
    x = _subsample(_pixels(_checked_features(features)).detach(), max_samples, seed)
    if x.shape[0] < k:
        raise ParameterError(f"k={k} clusters need at least {k} pixels, got {x.shape[0]}")
    km = KMeans(n_clusters=k, n_init=KMEANS_N_INIT, random_state=int(seed))
    km.fit(x.cpu().double().numpy())
    if temperature is None:
        temperature = max(float(km.inertia_) / x.shape[0], 1e-12)
    centroids = torch.as_tensor(km.cluster_centers_, dtype=features.dtype, device=features.device)
    return KMeansClusters(centroids, float(temperature))


# ---------------------------------------------------------------------------- 2b. the clustering module

class ClusteringModule(nn.Module):
    """The clustering module of Boubekki et al. 2021 ("Joint optimization of an autoencoder for clustering
    and embedding", Machine Learning 110): a soft k-means written as a one-layer autoencoder.

    Encoder: gamma = softmax(W x + b) (K soft assignments); decoder: x_hat = sum_k gamma_k mu_k with the
    centroids mu (K, D) as its weights. Its loss (:meth:`loss_terms`), for n samples,

    - E1 = sum_i ||x_i - x_hat_i||^2 (reconstruction),
    - E2 = sum_k (sum_i gamma_ik (1 - gamma_ik)) ||mu_k||^2 (sparsity of the assignments),
    - E3 = - sum_{k != l} (sum_i gamma_ik gamma_il) <mu_k, mu_l> (cross terms),
    - E4 = (1 - alpha) sum_k log(mean_i gamma_ik) (a Dirichlet prior on the cluster sizes; 0 for alpha = 1),

    with E1 + E2 + E3 = sum_i sum_k gamma_ik ||x_i - mu_k||^2 exactly: the soft k-means objective. The
    training loss is (E1 + E2 + E3) / (n D) + E4, the normalised form of the authors' code. ``bias=True``
    (the authors' code defaults to no bias) lets the encoder express nearest-centroid assignments exactly:
    W = 2 mu / T, b = -||mu||^2 / T gives softmax(-||x - mu||^2 / T), the initialisation used by
    :func:`fit_clustering_module`. Parameters are drawn from a local generator seeded with ``seed``.
    """

    def __init__(self, dim: int, k: int, *, bias: bool = True, alpha: float = 1.0, seed: int = 0):
        super().__init__()
        if not is_finite_number(alpha):
            raise ParameterError(f"alpha must be a finite number, got {alpha!r}")
        self.dim, self.k, self.alpha = _count(dim, "dim", 1), _count(k, "k"), float(alpha)
        self.weight = nn.Parameter(torch.empty(self.k, self.dim))
        self.bias = nn.Parameter(torch.zeros(self.k)) if bias else None
        self.centroids = nn.Parameter(torch.empty(self.k, self.dim))
        g = torch.Generator().manual_seed(int(seed))
        bound = 1 / math.sqrt(self.dim)
        with torch.no_grad():
            self.weight.copy_(torch.rand(self.k, self.dim, generator=g) * 2 * bound - bound)
            self.centroids.copy_(torch.randn(self.k, self.dim, generator=g) * bound)

    def gamma(self, x: torch.Tensor) -> torch.Tensor:
        """(n, D) -> (n, K) soft assignments softmax(W x + b)."""
        return torch.softmax(F.linear(x, self.weight, self.bias), dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, D) -> (gamma (n, K), reconstruction (n, D))."""
        g = self.gamma(x)
        return g, g @ self.centroids

    def loss_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unnormalised terms E1, E2, E3 (their sum: the gamma-weighted squared distances) and E4."""
        g, x_hat = self(x)
        mu = self.centroids
        e1 = ((x - x_hat) ** 2).sum()
        e2 = ((g * (1 - g)).sum(0) * (mu * mu).sum(1)).sum()
        off = 1 - torch.eye(self.k, dtype=x.dtype, device=x.device)
        e3 = -((g.T @ g) * (mu @ mu.T) * off).sum()
        e4 = (1 - self.alpha) * torch.log(g.mean(0) + 1e-10).sum()
        return {"E1": e1, "E2": e2, "E3": e3, "E4": e4}

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        t = self.loss_terms(x)
        return (t["E1"] + t["E2"] + t["E3"]) / x.numel() + t["E4"]

    @torch.no_grad()
    def assign(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D, *grid) -> labels (N, *grid) int64 (argmax gamma) and gamma (N, K, *grid)."""
        _check_dim(_checked_features(features), self.dim)
        x = _pixels(features).to(self.weight.device, self.weight.dtype)
        gamma = _unpixels(self.gamma(x), features)
        return gamma.argmax(1), gamma


def fit_clustering_module(features: torch.Tensor, k: int, epochs: int = 20, seed: int = 0, *,
                          lr: float = 1e-2, batch_size: int = 4096, alpha: float = 1.0, bias: bool = True,
                          init_temperature: float = 0.1, max_samples: int | None = None) -> ClusteringModule:
    """Train a :class:`ClusteringModule` on the pixels of ``features`` (N, D, *grid) pooled over the data set.

    Centroids start at scikit-learn's k-means++ seeding (``random_state=seed``), the encoder at the matching
    nearest-centroid assignment at ``init_temperature`` (see :class:`ClusteringModule`); then ``epochs``
    passes of Adam (``lr``) over shuffled minibatches of ``batch_size`` pixels. Every draw comes from local
    generators seeded with ``seed``; the module is returned in eval mode, on the features' device and dtype.
    """
    from sklearn.cluster import kmeans_plusplus

    k, epochs, batch_size = _count(k, "k"), _count(epochs, "epochs", 0), _count(batch_size, "batch_size", 1)
    lr, init_temperature = _positive(lr, "lr"), _positive(init_temperature, "init_temperature")
    if max_samples is not None:
        _count(max_samples, "max_samples", 1)
    x = _subsample(_pixels(_checked_features(features)).detach(), max_samples, seed)
    if x.shape[0] < k:
        raise ParameterError(f"k={k} clusters need at least {k} pixels, got {x.shape[0]}")
    dtype = x.dtype if x.is_floating_point() else torch.float32
    x = x.to(dtype)
    module = ClusteringModule(x.shape[1], k, bias=bias, alpha=alpha, seed=seed).to(x.device, dtype)
    centers, _ = kmeans_plusplus(x.cpu().double().numpy(), int(k), random_state=int(seed))
    mu = torch.as_tensor(centers, dtype=dtype, device=x.device)
    with torch.no_grad():
        module.centroids.copy_(mu)
        module.weight.copy_(2 * mu / init_temperature)
        if module.bias is not None:
            module.bias.copy_(-(mu * mu).sum(1) / init_temperature)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    g = torch.Generator().manual_seed(int(seed))
    n = x.shape[0]
    with torch.enable_grad():
        module.train()
        for _ in range(int(epochs)):
            order = torch.randperm(n, generator=g).to(x.device)
            for i in range(0, n, batch_size):
                batch = x[order[i:i + batch_size]]
                opt.zero_grad(set_to_none=True)
                module.loss(batch).backward()
                opt.step()
    return module.eval()


# ---------------------------------------------------------------------------- 3. label maps and uncertainty

def _nearest(t: torch.Tensor, size: Sequence[int] | None) -> torch.Tensor:
    """(B, *grid) -> (B, *size) by nearest-neighbour upsampling (dtype kept)."""
    if size is None or tuple(t.shape[1:]) == tuple(int(s) for s in size):
        return t
    out = F.interpolate(t[:, None].double(), size=tuple(int(s) for s in size), mode="nearest")[:, 0]
    return out.to(t.dtype)


def _checked_gamma(gamma: torch.Tensor, size: Sequence[int] | None) -> tuple[int, ...] | None:
    """A ParameterError for ``gamma`` that is not (B, K, *grid) with 1 to 3 grid axes, or a ``size`` that is
    not one whole number >= 1 per grid axis; ``size`` as a tuple."""
    if not torch.is_tensor(gamma) or not 3 <= gamma.ndim <= 5:
        raise ParameterError(f"gamma must be (B, K, *grid) with 1 to 3 grid axes, got "
                             f"{tuple(gamma.shape) if torch.is_tensor(gamma) else type(gamma).__name__}")
    return None if size is None else _checked_size(size, gamma.ndim - 2)


def label_map(gamma: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
    """(B, K, *grid) assignments -> (B, *size) int64 cluster ids (argmax over K), upsampled nearest to
    ``size`` (e.g. the image's spatial shape, one whole number per grid axis; default: the grid itself)."""
    size = _checked_gamma(gamma, size)
    return _nearest(gamma.argmax(1), size)


def entropy(gamma: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
    """(B, K, *grid) assignments -> (B, *size) entropy -sum_k gamma_k log gamma_k (natural log, 0 log 0 = 0):
    0 for a one-hot assignment, log K for a uniform one; upsampled nearest like :func:`label_map`.

    ``gamma`` must be soft assignments: finite, non-negative, summing to 1 over K at every pixel (up to
    rounding: 1e-4, or 8 K ulps of a half-precision dtype); anything else is refused (its "entropy" would be
    a number without meaning, NaN for a negative value)."""
    size = _checked_gamma(gamma, size)
    if not gamma.is_floating_point():
        raise ParameterError(f"gamma must be a floating tensor of soft assignments, got {gamma.dtype}")
    if gamma.numel():
        why = nonfinite_problem(gamma)
        if why:
            raise ParameterError(f"gamma has {why}")
        if bool((gamma < 0).any()):
            raise ParameterError(f"gamma has negative values (the smallest {float(gamma.min()):.4g}): entropy needs "
                                 "soft assignments (non-negative, summing to 1 over K)")
        tol = max(1e-4, 8 * gamma.shape[1] * torch.finfo(gamma.dtype).eps)
        off = float((gamma.sum(1, dtype=torch.float64) - 1).abs().max())
        if off > tol:
            raise ParameterError(f"gamma does not sum to 1 over K (off by up to {off:.4g} at a pixel): entropy needs "
                                 "soft assignments, e.g. a softmax over K")
    return _nearest(-torch.special.xlogy(gamma, gamma).sum(1), size)


# ---------------------------------------------------------------------------- 4. superpixelification

def superpixelify(maps: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Every pixel of ``maps`` (B, T, *spatial) replaced by the mean of its map over its segment.

    ``segments``: integer ids (B, *spatial) (or (B, 1, *spatial)), any values; ids are per image (the same id
    in two images is two segments). The result is constant within segments, idempotent, and keeps each map's
    sum over pixels. Vectorised: one ``index_add_`` over all images, targets and segments. A map that is
    constant on a segment keeps its value there exactly (each segment's mean is taken of the differences
    from one of its values, in float64 for a float32 or half map). An empty batch (B = 0 or T = 0) gives an
    empty result.
    """
    if maps.ndim < 3:
        raise ParameterError(f"maps must be (B, T, *spatial), got shape {tuple(maps.shape)}")
    b, t, spatial = maps.shape[0], maps.shape[1], tuple(maps.shape[2:])
    seg = torch.as_tensor(segments, device=maps.device)
    if seg.ndim == maps.ndim and seg.shape[1] == 1:
        seg = seg[:, 0]
    if tuple(seg.shape) != (b, *spatial):
        raise ParameterError(f"segments must be (B, *spatial) = {(b, *spatial)}, got {tuple(seg.shape)}")
    if seg.is_floating_point() or seg.is_complex():
        raise ParameterError("segments must be integer ids")
    if maps.numel() == 0 or seg.numel() == 0:  # no image, no target or no pixel: nothing to average
        return maps.clone()
    seg = seg.long().reshape(b, -1)
    seg = seg - seg.amin(dim=1, keepdim=True)                       # ids from 0 per image
    key = seg + torch.arange(b, device=seg.device)[:, None] * (int(seg.max()) + 1)
    _, inverse = torch.unique(key.reshape(-1), return_inverse=True)   # (B * P,) in 0..S-1
    n_seg = int(inverse.max()) + 1
    values = maps.reshape(b, t, -1).transpose(1, 2).reshape(-1, t)    # (B * P, T)
    acc = torch.float64  # integer or bool maps give float32 means
    # each segment's mean = one of its values + the mean of the differences from it: a constant stays exact
    first = torch.full((n_seg,), values.shape[0], dtype=torch.long, device=maps.device).scatter_reduce_(
        0, inverse, torch.arange(values.shape[0], device=maps.device), reduce="amin")
    ref = values[first].to(acc)                                        # (S, T)
    diffs = values.to(acc) - ref[inverse]
    sums = torch.zeros(n_seg, t, dtype=acc, device=maps.device).index_add_(0, inverse, diffs)
    counts = torch.bincount(inverse, minlength=n_seg).to(acc)
    means = (ref + sums / counts[:, None]).to(maps.dtype if maps.is_floating_point() else torch.float32)
    return means[inverse].reshape(b, -1, t).transpose(1, 2).reshape(maps.shape)


def superpixel_postprocess(segments: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
                           base: str | Callable[[torch.Tensor, int], torch.Tensor] = "minmax"
                           ) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """A ``postprocess=`` step for any explainer: ``base`` (any choice of :func:`nemt.ops.postprocess`, e.g. the
    explainer's default), then :func:`superpixelify` with ``segments``.

    ``segments``: an integer tensor (B, *spatial) for the batch that will be explained, or a callable
    ``maps -> segments`` (e.g. one that looks up precomputed segments). With activation clusters::

        _, gamma = clusters.assign(composite_activations(model, x))
        pp = superpixel_postprocess(label_map(gamma, x.shape[2:]))
        maps = get_explainer("gradcam", model, postprocess=pp).explain(x)

    After ``"minmax"`` the maps stay in [0, 1] (segment means) but are not rescaled again.
    """
    def step(maps: torch.Tensor, spatial_dims: int) -> torch.Tensor:
        m = postprocess(maps, base, spatial_dims)
        seg = segments(maps) if callable(segments) else segments
        return superpixelify(m, seg)

    step.__name__ = "superpixelify"
    return step


# ---------------------------------------------------------------------------- 5. a fitted clustering (estimator)

#: the methods of :class:`ActivationClustering`
CLUSTER_METHODS = ("kmeans", "module")
_CLUSTERING_FORMAT = 1


def _image_batches(data, batch_size: int):
    """Batches (b, C, *spatial) of model inputs from a tensor (N, C, *spatial), a map-style Dataset of tensors,
    dicts with ``"image"`` or (x, y) pairs, or an iterable of such batches."""
    def image_of(item):
        if torch.is_tensor(item):
            return item
        if isinstance(item, dict):
            if "image" not in item:
                raise ParameterError(f"a data item is a dict without 'image' (keys {sorted(item)})")
            return item["image"]
        if isinstance(item, (tuple, list)) and item and torch.is_tensor(item[0]):
            return item[0]
        raise ParameterError(f"cannot read images from a data item of type {type(item).__name__}")

    if torch.is_tensor(data):
        for i in range(0, data.shape[0], batch_size):
            yield data[i:i + batch_size]
        return
    if hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(data, (list, tuple)):
        for i in range(0, len(data), batch_size):
            yield torch.stack([image_of(data[j]) for j in range(i, min(i + batch_size, len(data)))])
        return
    for batch in data:
        yield image_of(batch)


class ActivationClustering:
    """Clusters of a frozen model's composite activations fitted over a data set: shared concepts (NAVE) whose
    label maps are segments (NAS), with a per-pixel uncertainty.

    Hyper-parameters (``__init__``, nothing else there): ``layers`` (module names; None: the last 3 stages of
    :func:`~nemt.explainers.layers.find_stages`), ``k`` clusters, ``method`` (``"kmeans"``: scikit-learn, or
    ``"module"``: the clustering module), ``seed``, ``max_samples`` (pixels clustered, a seeded uniform draw
    from all pixels of all images: bounds memory and time), ``epochs`` (the module's), ``batch_size`` (images
    per forward pass).

    ``fit(data)`` (a tensor (N, C, *spatial) of model inputs, a Dataset of them, e.g.
    :class:`~nemt.data.ImageDataset`, or batches) learns ``layers_`` (names), ``grid_`` (the composite grid),
    ``clusters_`` (:class:`KMeansClusters` or :class:`ClusteringModule`), ``n_pixels_`` (pixels seen) and
    ``model_sha256_``, and returns ``self``. Then for inputs x (B, C, *spatial): :meth:`assign` gives the
    label map (B, *spatial) int64, the uncertainty (entropy, B, *spatial) and gamma (B, K, *grid);
    :meth:`segments` (also ``self(x)``) the label map alone, the segments of :class:`Superpixelified`.
    :meth:`save` writes ``clustering.safetensors`` and ``clustering.json`` atomically; :meth:`load` refuses
    another model's weights. The model is never changed (eval mode inside calls, restored after).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None, k: int = 12, method: str = "kmeans",
                 seed: int = 0, max_samples: int = 20_000, epochs: int = 20, batch_size: int = 32):
        self.model = model
        self.layers = None if layers is None else [layers] if isinstance(layers, str) else list(layers)
        self.k = k
        self.method = method
        self.seed = seed
        self.max_samples = max_samples
        self.epochs = epochs
        self.batch_size = batch_size

    def get_params(self, deep: bool = False) -> dict:
        return {k: getattr(self, k) for k in ("model", "layers", "k", "method", "seed", "max_samples", "epochs",
                                               "batch_size")}

    def _check(self) -> None:
        if self.method not in CLUSTER_METHODS:
            raise ParameterError(f"method must be one of {CLUSTER_METHODS}, got {self.method!r}")
        k = _count(self.k, "k")
        if _count(self.max_samples, "max_samples", 1) < k:
            raise ParameterError(f"max_samples ({self.max_samples}) must be at least k ({self.k})")
        _count(self.epochs, "epochs", 0)
        _count(self.batch_size, "batch_size", 1)
        if self.layers is not None and not (self.layers and all(
                (isinstance(n, str) and n) or isinstance(n, nn.Module) for n in self.layers)):
            raise ParameterError(f"layers must be a non-empty list of module names (or modules), or None, got "
                                 f"{self.layers!r}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) -> composite activations (B, D, *grid_) of the fitted layers and grid."""
        self._fitted()
        if torch.is_tensor(x) and x.ndim - 2 != len(self.grid_):
            raise ParameterError(f"this clustering was fitted on {len(self.grid_)}D inputs (grid "
                                 f"{'x'.join(map(str, self.grid_))}), got x of shape {tuple(x.shape)}; nemt wants "
                                 "channel-first (B, C, *spatial)")
        return composite_activations(self.model, x, self.layers_, self.grid_)

    def fit(self, data, progress: Callable[[int], None] | None = None) -> "ActivationClustering":
        """Cluster the composite activations of every image of ``data`` (pixels pooled; ``max_samples`` of them
        drawn uniformly without replacement: each pixel gets a seeded random key and the smallest keys are
        kept, batch by batch). ``progress(n)`` is called after each batch of n images."""
        self._check()
        from nemt.explainers.nemt.estimator import model_checksum
        g = torch.Generator().manual_seed(int(self.seed))
        keys = feats = None
        layers, grid, seen = self.layers, None, 0
        for x in _image_batches(data, int(self.batch_size)):
            try:
                x = _model_input(self.model, x)
                if layers is None:
                    with evaluating(self.model), blame_shape(x):
                        layers = find_stages(self.model, tuple(x.shape[1:]))[-3:]
                layers = [layer_name(self.model, layer) for layer in layers]
                if grid is not None and x.ndim - 2 != len(grid):
                    raise ParameterError(f"a batch of shape {tuple(x.shape)} has {x.ndim - 2} spatial axes, the "
                                         f"ones before {len(grid)}")
                f = composite_activations(self.model, x, layers, grid)
            except ParameterError as exc:
                if isinstance(data, (list, tuple)) and "shape" in str(exc):
                    raise ParameterError(f"{exc}; a list is read as a list of batches (b, C, *spatial): for a list "
                                         "of single images (C, *spatial) give torch.stack(data)") from exc
                raise
            grid = tuple(f.shape[2:])
            px = _pixels(f).cpu()
            seen += px.shape[0]
            k = torch.rand(px.shape[0], generator=g, dtype=torch.float64)
            keys = k if keys is None else torch.cat([keys, k])
            feats = px if feats is None else torch.cat([feats, px])
            if keys.shape[0] > self.max_samples:
                keep = torch.topk(keys, int(self.max_samples), largest=False).indices.sort().values
                keys, feats = keys[keep], feats[keep]
            if progress is not None:
                progress(int(x.shape[0]))
        if feats is None:
            raise ParameterError("fit needs at least one image")
        if feats.shape[0] < int(self.k):
            raise ParameterError(f"k={self.k} clusters need at least {self.k} pixels, got {feats.shape[0]}")
        pixels = feats.T[None, :, :]  # (1, D, n): the sample as a 1D "image" of n pixels
        if self.method == "kmeans":
            clusters = fit_kmeans(pixels, int(self.k), seed=int(self.seed))
        else:
            clusters = fit_clustering_module(pixels, int(self.k), epochs=int(self.epochs), seed=int(self.seed))
        self.layers_, self.grid_, self.clusters_, self.n_pixels_ = list(layers), tuple(grid), clusters, seen
        self.model_sha256_ = model_checksum(self.model)
        return self

    def _fitted(self) -> None:
        if not hasattr(self, "clusters_"):
            raise ParameterError("this ActivationClustering is not fitted: call fit(data) or load(path, model)")

    def _clusters_on(self, device, dtype):
        c = self.clusters_
        if isinstance(c, KMeansClusters):
            return KMeansClusters(c.centroids.to(device, dtype), c.temperature)
        return c.to(device, dtype)

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, C, *spatial) -> label map (B, *spatial) int64, uncertainty (B, *spatial) (entropy of gamma, nats,
        in [0, log K]) and gamma (B, K, *grid_); both maps upsampled nearest to the input's grid."""
        f = self.features(x)
        _, gamma = self._clusters_on(f.device, f.dtype).assign(f)
        size = tuple(x.shape[2:])  # x passed the checks of features(): a tensor (B, C, *spatial)
        return label_map(gamma, size), entropy(gamma, size), gamma

    def segments(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) -> cluster ids (B, *spatial) int64: the segments for :func:`superpixelify`."""
        return self.assign(x)[0]

    __call__ = segments

    #: short name in the method names of superpixelified maps (``gradcam++@clusters``)
    tag = "clusters"

    def save(self, directory: str | Path) -> Path:
        """``directory/clustering.safetensors`` (centroids; the module's weights) and ``clustering.json`` (method,
        k, layers, grid, temperature, seed, the model's checksum), each written atomically."""
        from safetensors.torch import save_file

        from nemt.files import atomic_path, write_json
        self._fitted()
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise ParameterError(f"directory {directory}: a file is there, not a folder; give a folder (new or "
                                 "existing) to save the clustering in")
        c = self.clusters_
        if isinstance(c, KMeansClusters):
            tensors = {"centroids": c.centroids.detach().cpu().contiguous()}
            extra = {"temperature": c.temperature}
        else:
            tensors = {k: v.detach().cpu().contiguous() for k, v in c.state_dict().items()}
            extra = {"dim": c.dim, "bias": c.bias is not None, "alpha": c.alpha}
        with atomic_path(directory / "clustering.safetensors") as tmp:
            save_file(tensors, str(tmp))
        write_json(directory / "clustering.json", {
            "format": _CLUSTERING_FORMAT, "method": self.method, "k": int(self.k), "layers": self.layers_,
            "grid": list(self.grid_), "seed": int(self.seed), "max_samples": int(self.max_samples),
            "epochs": int(self.epochs), "batch_size": int(self.batch_size), "n_pixels": int(self.n_pixels_),
            "model_sha256": self.model_sha256_, **extra})
        return directory

    @classmethod
    def load(cls, directory: str | Path, model: nn.Module, *, check_model: bool = True) -> "ActivationClustering":
        """A clustering saved by :meth:`save` (or ``nemt clusters --out``), for ``model``; refuses another model's
        weights (``check_model=False`` skips the check). A damaged file is one :class:`~nemt.errors.CardError`
        (or :class:`~nemt.errors.NemtError`) naming the file, the field and the reason."""
        import json

        from safetensors.torch import load_file

        directory = Path(directory)
        if directory.is_file():
            raise NemtError(f"{directory}: a file, not a folder written by `nemt clusters --out`")
        meta_path, weights = directory / "clustering.json", directory / "clustering.safetensors"
        for p in (meta_path, weights):
            if not p.is_file():
                raise NemtError(f"{p}: missing; is {directory} a folder written by `nemt clusters --out`?")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise NemtError(f"{meta_path}: not valid JSON ({exc})") from None
        if not isinstance(meta, dict):
            raise CardError(meta_path, None, f"not a JSON object (got {type(meta).__name__}); is {directory} a "
                                             "folder written by `nemt clusters --out`?")
        need = ("format", "method", "k", "layers", "grid", "seed", "model_sha256")
        missing = [k for k in need if k not in meta]
        if missing:
            raise NemtError(f"{meta_path}: field(s) {missing} missing")
        if meta["format"] != _CLUSTERING_FORMAT:
            raise NemtError(f"{meta_path}: field 'format' is {meta['format']!r}; this nemt reads {_CLUSTERING_FORMAT}")
        if meta["method"] not in CLUSTER_METHODS:
            raise NemtError(f"{meta_path}: field 'method' is {meta['method']!r}, not one of {CLUSTER_METHODS}")
        _check_meta(meta, meta_path)
        card = getattr(model, "card", None)
        dims = getattr(card, "spatial_dims", None)
        if isinstance(dims, int) and len(meta["grid"]) != dims:
            raise CardError(meta_path, "grid", f"{meta['grid']} has {len(meta['grid'])} axes, the model takes "
                                               f"{dims}D inputs")
        if check_model:
            from nemt.explainers.nemt.estimator import model_checksum
            if model_checksum(model) != meta["model_sha256"]:
                raise NemtError(f"{meta_path}: fitted on another model (weights checksum "
                                f"{str(meta['model_sha256'])[:16]}...); fit it again for this model")
        try:
            t = load_file(str(weights))
        except Exception as exc:  # safetensors' own error (a damaged or empty file): one line naming the file
            first = str(exc).strip().splitlines()
            raise CardError(weights, None, f"not a readable safetensors file "
                                           f"({first[0] if first else type(exc).__name__})") from None
        for name, v in t.items():
            why = nonfinite_problem(v.reshape(1, -1)) if v.is_floating_point() else None
            if why:
                raise CardError(weights, name, f"{why.split(',')[0]}: the file is damaged")
        self = cls(model, layers=meta["layers"], k=meta["k"], method=meta["method"], seed=meta["seed"],
                   max_samples=meta.get("max_samples", 20_000), epochs=meta.get("epochs", 20),
                   batch_size=meta.get("batch_size", 32))
        try:
            if meta["method"] == "kmeans":
                if t.get("centroids") is None or t["centroids"].ndim != 2:
                    raise KeyError("no centroids (K, D)")
                clusters = KMeansClusters(t["centroids"], meta["temperature"])
            else:
                clusters = ClusteringModule(meta["dim"], meta["k"], bias=meta["bias"], alpha=meta["alpha"])
                clusters.load_state_dict(t)
                clusters.eval()
        except (KeyError, RuntimeError) as exc:
            raise NemtError(f"{weights}: does not hold a {meta['method']} clustering of k={meta['k']} ({exc})") \
                from None
        if clusters.k != int(meta["k"]):
            raise NemtError(f"{weights}: {clusters.k} clusters, but {meta_path} says k={meta['k']}")
        self.layers_, self.grid_, self.clusters_ = list(meta["layers"]), tuple(meta["grid"]), clusters
        self.n_pixels_, self.model_sha256_ = int(meta.get("n_pixels", 0)), meta["model_sha256"]
        return self


def _check_meta(meta: dict, path: Path) -> None:
    """A :class:`~nemt.errors.CardError` naming ``path`` and the field for a value of ``clustering.json`` that
    :meth:`ActivationClustering.save` would not have written (read: a damaged or hand-edited file)."""
    def need(ok: bool, field: str, what: str) -> None:
        if not ok:
            raise CardError(path, field, f"need {what}, got {meta.get(field)!r}")

    need(is_whole_number(meta["k"]) and meta["k"] >= 2, "k", "a whole number >= 2")
    layers = meta["layers"]
    need(isinstance(layers, list) and bool(layers) and all(isinstance(n, str) and n for n in layers), "layers",
         "a non-empty list of module names")
    grid = meta["grid"]
    need(isinstance(grid, list) and 1 <= len(grid) <= 3 and all(is_whole_number(v) and v >= 1 for v in grid),
         "grid", "a list of 1 to 3 whole numbers >= 1 (the grid's size per spatial axis)")
    need(is_whole_number(meta["seed"]) and meta["seed"] >= 0, "seed", "a whole number >= 0")
    need(isinstance(meta["model_sha256"], str), "model_sha256", "the model's checksum (a string)")
    for field, least in (("max_samples", meta["k"]), ("epochs", 0), ("batch_size", 1), ("n_pixels", 0)):
        if field in meta:
            need(is_whole_number(meta[field]) and meta[field] >= least, field, f"a whole number >= {least}")
    if meta["method"] == "kmeans":
        need(is_finite_number(meta.get("temperature")) and meta.get("temperature", 0) > 0, "temperature",
             "a finite number > 0")
    else:
        need(is_whole_number(meta.get("dim")) and meta.get("dim", 0) >= 1, "dim", "a whole number >= 1")
        need(isinstance(meta.get("bias"), bool), "bias", "true or false")
        need(is_finite_number(meta.get("alpha")), "alpha", "a finite number")


def _segment_counts(n_segments, default: int, batch: int) -> list[int]:
    """``n_segments`` of a segmenter's call (None: ``default``; one count for all images; or one per image) as
    ``batch`` ints, each a whole number >= 2, or a ParameterError naming it."""
    if n_segments is None:
        return [default] * batch
    if torch.is_tensor(n_segments) or hasattr(n_segments, "tolist"):
        n_segments = n_segments.tolist()
    if isinstance(n_segments, (list, tuple)):
        if len(n_segments) != batch:
            raise ParameterError(f"n_segments gives {len(n_segments)} counts for {batch} images: give one count for "
                                 "all images or one per image")
        return [_count(v, f"n_segments[{i}]") for i, v in enumerate(n_segments)]
    return [_count(n_segments, "n_segments")] * batch


def _image_input(x: torch.Tensor) -> torch.Tensor:
    """A model-free segmenter's input: :func:`nemt.ops.checked_input`'s checks (a tensor (B, C, *spatial) with 1 to
    3 spatial axes, at least one image, no NaN/inf; integer images are read as float64), and channel-last input
    ((B, *spatial, C): a last axis of 1 to 4 after a "channel" axis longer than 4) refused with nemt's layout."""
    if torch.is_tensor(x) and not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        x = x.double()
    x = checked_input(x, nn.Module(), use="segmentation")  # a module without parameters: x keeps its dtype
    if x.shape[-1] <= 4 and x.shape[1] > 4:
        raise ParameterError(f"x of shape {tuple(x.shape)} looks channel-last (B, *spatial, {x.shape[-1]}): its "
                             f"channel axis ({x.shape[1]}) is as long as a spatial axis and its last axis "
                             f"({x.shape[-1]}) as short as a channel axis; nemt takes channel-first (B, C, *spatial): "
                             "use x.movedim(-1, 1)")
    return x


# ---------------------------------------------------------------------------- 6. superpixelified explainers

class SlicSegments:
    """SLIC superpixels (scikit-image) of each input, the classic baseline of NAS: ``SlicSegments(12)(x)`` ->
    (B, *spatial) int64 ids. Each image is min-max scaled to [0, 1] first (per image, all channels);
    ``compactness`` as scikit-image's (for [0, 1] intensities, 0.1 to 1 is the usual range). SLIC often
    returns fewer segments than asked; ``at_least=True`` raises the request (up to 4x) until an image has
    at least ``n_segments``, for comparisons at equal segment count.

    1D signals (B, C, L) are segmented as images of L x 1 pixels: scikit-image's ``slic`` on the (L, 1, C) array
    (``channel_axis=-1``) in its zero-parameter mode (SLIC-zero, ``slic_zero=True``, which adapts the
    compactness of each segment, so ``compactness`` is only its start): about ``n_segments`` contiguous runs,
    cut where the values change (a step) and evenly where they oscillate throughout (an ECG). Plain SLIC
    clusters an oscillating signal by value into many short runs, which connectivity enforcement then merges
    along the line into a single segment."""

    tag = "slic"

    def __init__(self, n_segments: int = 12, compactness: float = 0.1, sigma: float = 1.0, at_least: bool = False):
        self.n_segments = _count(n_segments, "n_segments")
        self.compactness = _positive(compactness, "compactness")
        if not (is_finite_number(sigma) and sigma >= 0):
            raise ParameterError(f"sigma must be a finite number >= 0, got {sigma!r}")
        self.sigma, self.at_least = float(sigma), bool(at_least)

    def _one(self, img, n: int):
        import numpy as np
        from skimage.segmentation import slic
        one_d = img.ndim == 2  # (C, L): a signal, segmented as an image of L x 1 pixels
        a = np.moveaxis(img, 0, -1)
        if one_d:
            a = a[:, None, :]
        ask = n
        while True:
            seg = slic(a, n_segments=ask, compactness=self.compactness, sigma=self.sigma, channel_axis=-1,
                       start_label=0, enforce_connectivity=True, slic_zero=one_d)
            if not self.at_least or len(np.unique(seg)) >= n or ask >= 4 * n:
                return seg[:, 0] if one_d else seg
            ask += max(1, n // 8)

    def __call__(self, x: torch.Tensor, n_segments: Sequence[int] | int | None = None) -> torch.Tensor:
        """``n_segments``: a count for all images or one per image, each a whole number >= 2 (default: the
        constructor's). ``x`` (B, C, *spatial), 1 to 3 spatial axes, channel-first."""
        import numpy as np
        x = _image_input(x)
        counts = _segment_counts(n_segments, self.n_segments, x.shape[0])
        a = x.detach().cpu().double().numpy()
        out = []
        for img, n in zip(a, counts):
            lo, hi = img.min(), img.max()
            img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
            out.append(torch.from_numpy(np.asarray(self._one(img, n), dtype=np.int64)))
        return torch.stack(out).to(x.device)


class NasSegments:
    """Neuro-activated superpixels of each image on its own: ``NasSegments(clf, 12)(x)`` -> (B, *spatial) int64.

    For each image, k-means (``k`` clusters, scikit-learn, seeded) on the pixels of its composite activations
    (:func:`compose` of ``layers``, default the last 3 stages) resized to ``fit_scale`` times the finest
    stage's grid (capped at the input's size); then every *input* pixel gets the nearest centroid of the
    composite activations resized linearly to the input (``assign="input"``), so segment borders follow
    the interpolated features instead of the grid's blocks. ``fit_scale=1, assign="grid"`` is the plain
    recipe: k-means on the grid, labels upsampled nearest. Why the default (phantoms, 147 test images with a
    finding, K = 12, mean best-segment IoU nodule / opacity / cyst at SLIC's count per image): plain 0.132 /
    0.270 / 0.354; assigned at the input 0.134 / 0.274 / 0.362; fitted on the 2x grid and assigned at the
    input 0.152 / 0.281 / 0.408 (SLIC 0.123 / 0.275 / 0.276); fitted on the input's own 96 x 96 pixels
    0.142 / 0.301 / 0.402 at 3x the time.

    Unlike :class:`ActivationClustering` (clusters fitted once over a data set, shared ids: concepts), the
    segments adapt to each image, as a superpixel algorithm's do. Memory: one image's activations at the
    fitting grid, and at the input's size 64 channels at a time (:func:`nearest_centroid`), so a large
    volume fits. The model is never changed.
    """

    tag = "nas"
    ASSIGN = ("input", "grid")

    def __init__(self, model: nn.Module, k: int = 12, layers: Sequence[str] | None = None, seed: int = 0, *,
                 fit_scale: float = 2.0, assign: str = "input"):
        k = _count(k, "k")
        if not (is_finite_number(fit_scale) and fit_scale >= 1):
            raise ParameterError(f"fit_scale must be a finite number >= 1 (the finest stage's grid), got {fit_scale!r}")
        if assign not in self.ASSIGN:
            raise ParameterError(f"assign must be one of {self.ASSIGN}, got {assign!r}")
        self.model, self.k, self.seed = model, k, int(seed)
        self.layers = None if layers is None else [layers] if isinstance(layers, str) else list(layers)
        self.fit_scale, self.assign = float(fit_scale), assign

    def fit_size(self, grid: Sequence[int], spatial: Sequence[int]) -> tuple[int, ...]:
        """The grid k-means runs on: ``fit_scale`` x the finest stage's ``grid``, at most the input's size."""
        return tuple(min(int(round(g * self.fit_scale)), int(n)) for g, n in zip(grid, spatial))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, n_segments: Sequence[int] | int | None = None) -> torch.Tensor:
        """``n_segments``: a count for all images or one per image, each a whole number >= 2 (default: the
        constructor's ``k``; at most the fitting grid's pixels are used). ``x`` as :func:`stage_activations`."""
        where = x.device if torch.is_tensor(x) else None
        x = _model_input(self.model, x)
        counts = _segment_counts(n_segments, self.k, x.shape[0])
        _, feats = stage_activations(self.model, x, self.layers)
        spatial = tuple(x.shape[2:])
        size = self.fit_size(finest_grid(feats), spatial)
        out = []
        for i, k in enumerate(counts):
            one = [f[i:i + 1] for f in feats]
            f = compose(one, size)
            km = fit_kmeans(f, max(2, min(k, math.prod(size))), seed=self.seed)
            if self.assign == "input":  # nearest centroid only (no soft assignment at the input's size)
                labels = nearest_centroid(one, km.centroids, spatial)
            else:
                labels = _nearest(km.assign(f)[0], spatial)
            out.append(labels)
        return torch.cat(out).to(where)


class Superpixelified:
    """Any explainer's maps averaged within segments of the image (NAS superpixelification): the explainer's own
    post-processing runs first, then :func:`superpixelify` with ``segmenter(x)`` (B, *spatial) ids, e.g. an
    :class:`ActivationClustering` (fitted clusters of the model's activations) or :class:`SlicSegments`.

    ``Superpixelified(get_explainer("gradcam++", clf), clustering).explain(x, target=y)`` -> (B, T, *spatial),
    constant within each segment. Each map is then divided by its largest magnitude (maps that were in
    [0, 1] have their maximum at 1 again; signs, zeros and the ratios between segments are kept): a small
    bright spot averaged over a large segment would otherwise be a faint map. Segments are computed per call
    from ``x`` (the segmenter's forward pass is part of the time per image).
    """

    def __init__(self, explainer, segmenter: Callable[[torch.Tensor], torch.Tensor]):
        self.explainer, self.segmenter = explainer, segmenter
        self.name = f"{getattr(explainer, 'name', 'explainer')}@{getattr(segmenter, 'tag', 'sp')}"

    def __getattr__(self, name):  # card, spatial_dims, model, ... of the wrapped explainer
        if name in ("explainer", "segmenter"):
            raise AttributeError(name)
        return getattr(self.explainer, name)

    def _average(self, maps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        m = superpixelify(maps, self.segmenter(x).to(maps.device))
        top = m.abs().flatten(2).amax(-1)
        top = torch.where(top > 0, top, torch.ones_like(top))
        return m / top.view(*top.shape, *[1] * (m.ndim - 2))

    def explain(self, x: torch.Tensor, target=None) -> torch.Tensor:
        return self._average(self.explainer.explain(x, target), x)

    def explain_and_predict(self, x: torch.Tensor, target=None) -> tuple[torch.Tensor, torch.Tensor]:
        maps, probs = self.explainer.explain_and_predict(x, target)
        return self._average(maps, x), probs


def load_segmenter(source: str | Path, model: nn.Module, seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """The segments of ``--superpixelify SOURCE``: a folder written by ``nemt clusters --out`` (the model's
    activation clusters fitted over its training split, shared by all images: :class:`ActivationClustering`,
    tag ``clusters``), ``nas:K`` (K neuro-activated superpixels per image, :class:`NasSegments`, tag ``nas``)
    or ``slic:N`` (SLIC with N segments per image, :class:`SlicSegments`, tag ``slic``); K, N default 12,
    each a whole number >= 2."""
    text = str(source)
    head, sep, n = text.partition(":")
    if head.lower() in ("slic", "nas") and not Path(text).is_dir():
        try:
            count = int(n) if sep else 12
            return SlicSegments(count) if head.lower() == "slic" else NasSegments(model, count, seed=seed)
        except (ValueError, ParameterError):
            raise NemtError(f"--superpixelify {text!r}: expected {head.lower()} or {head.lower()}:N with N a whole "
                            "number >= 2") from None
    if not Path(text).is_dir():
        raise NemtError(f"--superpixelify {text!r}: neither a folder written by `nemt clusters --out` nor "
                        "nas:K or slic:N")
    return ActivationClustering.load(text, model)


def segmenter_checksum(source: str | Path) -> str:
    """What identifies ``--superpixelify SOURCE`` for resuming a benchmark: ``slic:N``, or the SHA-256 of a
    clustering folder's two files."""
    import hashlib
    text = str(source)
    if text.split(":")[0].lower() in ("slic", "nas") and not Path(text).is_dir():
        return text.lower()
    h = hashlib.sha256()
    for name in ("clustering.safetensors", "clustering.json"):
        h.update((Path(text) / name).read_bytes())
    return h.hexdigest()
