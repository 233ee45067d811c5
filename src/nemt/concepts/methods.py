"""The two annotation rules, on plain tensors: CLIP-Dissect's soft-WPMI and MAMMI's template-adjusted sum.

Both take a layer's activations ``A`` (N images x K neurons; a neuron's value
per image is the spatial mean of its channel) and image-concept similarities
from a vision-language model, and return a (K x C) score per neuron and
concept. Neither holds more than one chunk of neurons' top images at once
(``neuron_chunk``), so 1000 images x 512 neurons x 500 concepts runs in a few
tens of MB.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nemt.ops import ParameterError, count_param, is_finite_number, nonfinite_problem

__all__ = ["MammiResult", "clip_dissect", "concept_probabilities", "cosine", "dead_neurons", "mammi",
           "soft_wpmi"]


def _finite(t: torch.Tensor, name: str) -> None:
    """A ParameterError naming ``name`` when ``t`` (N, ...) (one row per probe image) holds NaN or inf."""
    why = nonfinite_problem(t.reshape(t.shape[0], -1) if t.ndim and t.numel() else t.reshape(-1, 1))
    if why:
        raise ParameterError(f"{name} hold{'' if name.endswith('s') else 's'} {why}: a concept score of such "
                             "values means nothing")


def _in_range(value, name: str, lo: float, hi: float, hi_open: bool = False, lo_open: bool = False) -> float:
    """``value`` as a float in [lo, hi] (an end left open where asked), or a ParameterError naming ``name``."""
    ok = is_finite_number(value)
    ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        span = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ParameterError(f"{name} must be a number in {span}, got {value!r}")
    return float(value)


def cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(N, D) x (M, D) -> (N, M) cosine similarities; a zero vector has cosine 0 with everything."""
    a = a.float() / a.float().norm(dim=1, keepdim=True).clamp_min(eps)
    b = b.float() / b.float().norm(dim=1, keepdim=True).clamp_min(eps)
    return a @ b.T


def dead_neurons(activations: torch.Tensor) -> torch.Tensor:
    """(K,) bool: neurons whose activation is the same on every probe image (max == min), or not finite."""
    a = activations.float()
    return (a.amax(0) == a.amin(0)) | ~torch.isfinite(a).all(0)


def concept_probabilities(similarity: torch.Tensor, alpha: float = 10.0) -> torch.Tensor:
    """p(c | x) = softmax(alpha * P) over concepts, P the (N, C) image-concept cosines."""
    if not is_finite_number(alpha):
        raise ParameterError(f"alpha must be a finite number, got {alpha!r}")
    _finite(similarity, "similarity")
    return torch.softmax(alpha * similarity.float(), dim=1)


def soft_wpmi(activations: torch.Tensor, probs: torch.Tensor, *, top_k: int = 100, lam: float = 1.0,
              p_start: float = 0.998, p_end: float = 0.97, min_prob: float = 1e-7,
              neuron_chunk: int = 64) -> torch.Tensor:
    """CLIP-Dissect's soft-WPMI (Oikarinen & Weng 2023), (K, C).

    For neuron k with top images x_1..x_m (m = min(top_k, N), by activation,
    highest first) and weights p_j falling linearly from ``p_start`` to
    ``p_end`` (both included)::

        log p(c | B_k) = sum_j log(1 + p_j (p(c | x_j) - 1) + min_prob)
        log p(c)       = logsumexp_k log p(c | B_k) - log K
        score          = log p(c | B_k) - lam * log p(c)

    ``probs``: (N, C) p(c | x) (rows sum to 1, see :func:`concept_probabilities`). ``top_k`` and
    ``neuron_chunk`` are whole numbers >= 1, ``p_start`` and ``p_end`` in (0, 1], ``min_prob`` >= 0.
    """
    a, q = activations.float(), probs.float()
    if a.ndim != 2 or q.ndim != 2 or a.shape[0] != q.shape[0]:
        raise ParameterError(f"activations (N, K) and probabilities (N, C) need the same N, got "
                             f"{tuple(a.shape)} and {tuple(q.shape)}")
    top_k, neuron_chunk = count_param(top_k, "top_k"), count_param(neuron_chunk, "neuron_chunk")
    p_start = _in_range(p_start, "p_start", 0, 1, lo_open=True)
    p_end = _in_range(p_end, "p_end", 0, 1, lo_open=True)
    min_prob = _in_range(min_prob, "min_prob", 0, 1)
    if not is_finite_number(lam):
        raise ParameterError(f"lam must be a finite number, got {lam!r}")
    if a.shape[0] == 0:
        raise ParameterError(f"activations hold no probe image (shape {tuple(a.shape)}): soft-WPMI needs at least one")
    _finite(q, "probs")
    m = min(top_k, a.shape[0])
    p = torch.linspace(p_start, p_end, m, dtype=q.dtype) if m > 1 else torch.tensor([p_start], dtype=q.dtype)
    top = torch.topk(a, m, dim=0).indices.T  # (K, m), highest first
    out = torch.empty(a.shape[1], q.shape[1])
    for s in range(0, a.shape[1], max(1, int(neuron_chunk))):
        qk = q[top[s:s + neuron_chunk]]  # (k, m, C)
        out[s:s + neuron_chunk] = torch.log(1 + p.view(1, -1, 1) * (qk - 1) + min_prob).sum(dim=1)
    log_pc = torch.logsumexp(out, dim=0, keepdim=True) - torch.log(torch.tensor(float(out.shape[0])))
    return out - lam * log_pc


def clip_dissect(activations: torch.Tensor, similarity: torch.Tensor, *, alpha: float = 10.0,
                 **kwargs) -> torch.Tensor:
    """Soft-WPMI scores (K, C) from activations (N, K) and image-concept cosines P (N, C); label = argmax."""
    return soft_wpmi(activations, concept_probabilities(similarity, alpha), **kwargs)


@dataclass
class MammiResult:
    """MAMMI per neuron: ``weights`` (K, C) w_k(c); ``selected`` the kept concept indices, best first;
    ``n_images`` the images above the neuron's threshold; ``status`` "ok", "dead" or "no-positive-concept"."""

    weights: torch.Tensor
    selected: list[list[int]]
    n_images: torch.Tensor
    status: list[str] = field(default_factory=list)


def mammi(activations: torch.Tensor, concept_similarity: torch.Tensor,
          template_similarity: torch.Tensor | None = None, *, quantile: float = 0.93, keep: float = 0.95
          ) -> MammiResult:
    """MAMMI's concept matching (Kim, Ahn, Kim, MICCAI 2024).

    Images of neuron k: those with a_k(i) > min_i a_k + ``quantile`` (max_i a_k - min_i a_k).
    s_i(c) = cos(E_I(x_i), E_T(template + c)) - cos(E_I(x_i), E_T(template)), given as
    ``concept_similarity`` (N, C) and ``template_similarity`` (N,) (zero when None);
    w_k(c) = sum over the neuron's images of s_i(c); kept: w_k(c) > ``keep`` * max_c w_k(c), sorted.

    Edge cases (the paper leaves them open):

    - a dead neuron (max == min): no image passes the strict threshold, so w_k = 0,
      nothing is kept, status "dead" (the authors' code also selects no image);
    - max_c w_k(c) <= 0 (no concept more similar to the neuron's images than the bare
      template): nothing is kept, status "no-positive-concept"; the weights are still
      returned (the rule ``w > 0.95 max`` keeps nothing for a negative max in the authors'
      code too, and would keep the *less* similar concepts if read with |max|).

    ``quantile`` and ``keep`` are in [0, 1) (at 1 no image, or no concept, could pass the strict threshold);
    the similarities must be finite (NaN or inf is refused, naming the argument).
    """
    quantile = _in_range(quantile, "quantile", 0, 1, hi_open=True)
    keep = _in_range(keep, "keep", 0, 1, hi_open=True)
    a = activations.float()
    s = concept_similarity.float()
    if a.ndim != 2 or s.ndim != 2 or a.shape[0] != s.shape[0]:
        raise ParameterError(f"activations (N, K) and similarities (N, C) need the same N, got "
                             f"{tuple(a.shape)} and {tuple(s.shape)}")
    _finite(s, "concept_similarity")
    if template_similarity is not None:
        t = template_similarity.float()
        if t.numel() != a.shape[0] or (t.ndim > 1 and t.shape not in ((a.shape[0], 1), (a.shape[0],))):
            raise ParameterError(f"template_similarity must be (N,) = ({a.shape[0]},), one value per probe image, "
                                 f"got shape {tuple(t.shape)}")
        _finite(t.reshape(-1, 1), "template_similarity")
        s = s - t.reshape(-1, 1)
    lo, hi = a.amin(0), a.amax(0)
    chosen = a > (lo + quantile * (hi - lo))  # (N, K); strict, so a dead neuron has no image
    dead = dead_neurons(a)
    chosen[:, dead] = False
    w = chosen.T.float() @ s  # (K, C)
    selected, status = [], []
    for k in range(w.shape[0]):
        top = float(w[k].max()) if w.shape[1] else 0.0
        if bool(dead[k]):
            selected.append([])
            status.append("dead")
        elif top <= 0:
            selected.append([])
            status.append("no-positive-concept")
        else:
            idx = torch.nonzero(w[k] > keep * top).flatten()
            selected.append(idx[torch.argsort(w[k, idx], descending=True)].tolist())
            status.append("ok")
    return MammiResult(w, selected, chosen.sum(0), status)
