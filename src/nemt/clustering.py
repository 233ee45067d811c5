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

Any ``spatial_dims`` (1, 2, 3). Nothing here changes the caller's state: models run under
:func:`~nemt.ops.evaluating` and ``torch.no_grad``, random draws come from local generators.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nemt.explainers.layers import FeatureTap, find_stages, layer_name
from nemt.ops import ParameterError, evaluating, postprocess, resize_linear

#: restarts of scikit-learn's k-means (fixed, so a seed gives one answer whatever scikit-learn's default)
KMEANS_N_INIT = 10


# ---------------------------------------------------------------------------- 1. composite activations

@torch.no_grad()
def composite_activations(model: nn.Module, x: torch.Tensor, layers: Sequence[str | nn.Module] | None = None,
                          size: Sequence[int] | None = None, eps: float = 1e-12) -> torch.Tensor:
    """(B, C, *spatial) images -> (B, D, *grid) composite activations.

    ``layers``: module names (in ``model.net`` for a :class:`~nemt.models.Classifier`) or modules; default
    the last 3 stages of :func:`find_stages`. Each stage's output (B, C_l, *grid_l) is resized linearly to
    ``size`` (default: the finest grid among the chosen stages, the one with most pixels), then each pixel
    vector is divided by its L2 norm (``eps`` guards zero vectors, which stay zero); D = sum of C_l.
    Stages are concatenated in the order given. The model runs once, in eval mode, without gradients.
    """
    if x.ndim < 3:
        raise ParameterError(f"x must be (B, C, *spatial), got shape {tuple(x.shape)}")
    with evaluating(model):
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
    if size is None:
        size = max((tuple(f.shape[2:]) for f in feats), key=math.prod)
    size = tuple(int(s) for s in size)
    parts = [F.normalize(resize_linear(f.float() if not f.is_floating_point() else f, size), dim=1, eps=eps)
             for f in feats]
    return torch.cat(parts, dim=1)


def _pixels(features: torch.Tensor) -> torch.Tensor:
    """(N, D, *grid) -> (N * pixels, D)."""
    if features.ndim < 3:
        raise ParameterError(f"features must be (N, D, *grid), got shape {tuple(features.shape)}")
    return features.movedim(1, -1).reshape(-1, features.shape[1])


def _unpixels(values: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """(N * pixels, K) -> (N, K, *grid) for the grid of ``features``."""
    n, grid = features.shape[0], features.shape[2:]
    return values.reshape(n, *grid, values.shape[-1]).movedim(-1, 1)


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

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    def assign(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D, *grid) -> labels (N, *grid) int64 (nearest centroid) and gamma (N, K, *grid), where
        gamma_k = softmax_k(-||x - mu_k||^2 / temperature)."""
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

    x = _subsample(_pixels(features).detach(), max_samples, seed)
    if x.shape[0] < k:
        raise ParameterError(f"k={k} clusters need at least {k} pixels, got {x.shape[0]}")
    km = KMeans(n_clusters=int(k), n_init=KMEANS_N_INIT, random_state=int(seed))
    km.fit(x.cpu().double().numpy())
    if temperature is None:
        temperature = max(float(km.inertia_) / x.shape[0], 1e-12)
    if temperature <= 0:
        raise ParameterError(f"temperature must be positive, got {temperature}")
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
        self.dim, self.k, self.alpha = int(dim), int(k), float(alpha)
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

    x = _subsample(_pixels(features).detach(), max_samples, seed)
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


def label_map(gamma: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
    """(B, K, *grid) assignments -> (B, *size) int64 cluster ids (argmax over K), upsampled nearest to
    ``size`` (e.g. the image's spatial shape; default: the grid itself)."""
    return _nearest(gamma.argmax(1), size)


def entropy(gamma: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
    """(B, K, *grid) assignments -> (B, *size) entropy -sum_k gamma_k log gamma_k (natural log, 0 log 0 = 0):
    0 for a one-hot assignment, log K for a uniform one; upsampled nearest like :func:`label_map`."""
    return _nearest(-torch.special.xlogy(gamma, gamma).sum(1), size)


# ---------------------------------------------------------------------------- 4. superpixelification

def superpixelify(maps: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Every pixel of ``maps`` (B, T, *spatial) replaced by the mean of its map over its segment.

    ``segments``: integer ids (B, *spatial) (or (B, 1, *spatial)), any values; ids are per image (the same id
    in two images is two segments). The result is constant within segments, idempotent, and keeps each map's
    sum over pixels. Vectorised: one ``index_add_`` over all images, targets and segments.
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
    seg = seg.long().reshape(b, -1)
    seg = seg - seg.amin(dim=1, keepdim=True)                       # ids from 0 per image
    key = seg + torch.arange(b, device=seg.device)[:, None] * (int(seg.max()) + 1)
    _, inverse = torch.unique(key.reshape(-1), return_inverse=True)   # (B * P,) in 0..S-1
    n_seg = int(inverse.max()) + 1
    values = maps.reshape(b, t, -1).transpose(1, 2).reshape(-1, t)    # (B * P, T)
    sums = torch.zeros(n_seg, t, dtype=maps.dtype, device=maps.device).index_add_(0, inverse, values)
    counts = torch.bincount(inverse, minlength=n_seg).to(maps.dtype)
    means = sums / counts[:, None]
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
