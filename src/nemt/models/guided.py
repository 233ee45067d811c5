"""Explanation-guided training: MIMIC (Watson et al., WACV 2023) and "right for the right reasons" (Ross et al. 2017).

``nemt train --guide mimic`` and ``--guide mask`` call :func:`train_guided`,
which writes the same folder as plain training (:mod:`nemt.models.training`):
``model.safetensors`` + ``model.json`` (the best checkpoint by validation
macro AUROC), ``splits.csv``, ``history.json`` and the resume point
``state/last.{safetensors,json}``; running the same command again continues
from it. The model is an ordinary :class:`~nemt.models.Classifier` giving
(B, n_classes) outputs, so every explainer, the benchmark and the service
take the folder as they take any other. Under torchrun the ranks share each
optimiser step's micro-batches as in plain training (:mod:`nemt.distributed`)
and their gradients are averaged by :func:`~nemt.distributed.average_gradients`
(DDP does not take MIMIC's double back-propagation).

MIMIC
-----
M copies of one zoo architecture (:class:`GuidedEnsemble`, differently
initialised, fed the same batches) learn together with a discriminator
(:class:`Discriminator`: flattened map -> 512 -> M, ReLU) that learns which
copy made an explanation. Epochs alternate, as in the authors' code
(``learning-to-mimic/explanation_ensemble.py``; 1-based epochs):

- odd epochs: the copies minimise Σ_i CE_i − β · CE_D, the discriminator's
  cross-entropy on their maps (β = 1); the discriminator is fixed;
- even epochs: the copies minimise Σ_i CE_i, and the discriminator (Adam,
  1e-4) learns from their maps (detached).

Inference is the mean of the copies' log-softmax (the output is a
log-probability; its softmax is the normalised geometric mean of the copies'
probabilities). Each copy's explanation (:func:`explanation_maps`) is
input-gradient x input of the true class's logit, absolute, summed over
channels, min-max per sample: a one-point, noise-free stand-in for the paper's
Gradient SHAP (the gradient at the input itself, baseline 0 = the data mean in
the normalised space), computed with ``create_graph=True`` so that the
adversarial term reaches the copies' weights through double back-propagation.
The public code computes Captum attributions without ``create_graph`` and its
adversarial term never reaches the weights; ``tests/test_guided.py`` checks
that here it does. The discriminator sees the maps average-pooled to at most
``disc_size`` (64) pixels per axis (the paper flattens 224 x 224 maps; pooling
keeps its first layer small for large inputs).

``disc_input="deviation"`` (not in the paper) shows the discriminator each
map minus the mean of the copies' maps of the same image instead of the map
itself. The paper's discriminator sees one map at a time, so it can only tell
the copies apart by how their maps look *in general*; copies that fool it
have maps of the same distribution, not the same map of each image (measured:
their pairwise correlation does not rise; docs/guide.md). The deviation is what one
copy's map has that the others' maps of that very image have not, so fooling
a discriminator of it asks the copies to agree image by image; it is zero,
and carries nothing to tell apart, when they agree exactly.
``adversary="confusion"`` (not in the paper either) has the copies bring the
discriminator's cross-entropy to the uniform label's (log M, its minimum at
"cannot tell") instead of maximising it, which rewards a confidently wrong
discriminator, i.e. copies that swap looks rather than share one. Neither
raised the copies' agreement above the β = 0 ensemble's on the phantoms'
validation split (docs/guide.md, "Explanation-guided training"); both are kept
in the library and ``benchmarks/guided_gaze.py`` (models ``mimic-dev``,
``mimic-conf``, ``mimic-dev-conf``) for that comparison, not in the CLI.

Right for the right reasons (``--guide mask``)
-----------------------------------------------
One network minimises CE + λ · R. Ross, Hughes & Doshi-Velez (2017, eq. 1)
take R = mean_n Σ_d (A_nd · ∂/∂x_d Σ_k log p_nk)², A = 1 outside the sample's
lesion mask (their weight decay term is AdamW's decay here); that is
``mask_penalty="ross"``. The default, ``"fraction"``, divides each sample's
sum by the same squared gradient summed over the whole image: the share of the
gradient's energy outside the mask, in [0, 1], with λ = 1. Ross's sum can be
driven to 0 by a uniform prediction (Σ_k log p_k then has no gradient); on
phantoms a weight large enough to guide did exactly that (see
:func:`right_reasons_penalty`). Samples without ground truth or with an empty
mask (normal images) get no penalty: nothing says where their evidence should
not be. The mask is augmented with the image (the same flip and affine).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nemt.checkpoint import save_state
from nemt.errors import NemtError
from nemt.files import write_json
from nemt.models.card import ModelCard
from nemt.models.classifier import Classifier
from nemt.models.zoo import build_model, sized_arch_kwargs
from nemt.ops import minmax, preserved_rng

GUIDES = ("mimic", "mask")
DISC_INPUTS = ("map", "deviation")
ADVERSARIES = ("paper", "confusion")
EXPLANATIONS = ("gxi", "gradcam")
MASK_TARGETS = ("all", "true")
#: the settings of :class:`GuideConfig` that each guide uses (``kind`` aside)
GUIDE_FIELDS = {"mimic": ("copies", "beta", "disc_lr", "disc_hidden", "disc_size", "disc_input", "adversary",
                          "explanation"),
                "mask": ("mask_target", "mask_weight", "mask_penalty")}


@dataclass
class GuideConfig:
    """Settings of the guidance (recorded in the card's ``training.guide``).

    ``kind``: ``"mimic"`` or ``"mask"``. MIMIC's: ``copies`` (M), ``beta`` (β), ``disc_lr``, ``disc_hidden``,
    ``disc_size``, ``disc_input`` (``"map"``, the paper's, or ``"deviation"``: each map minus the copies'
    mean map of its image), ``adversary`` (``"paper"``: the copies maximise the discriminator's
    cross-entropy; ``"confusion"``: they minimise its cross-entropy against the uniform label) and
    ``explanation``, the map the discriminator sees (``"gxi"``: :func:`explanation_maps`; ``"gradcam"``:
    :func:`gradcam_maps`, Grad-CAM of the copy's default layer). The
    right-reasons term's: ``mask_weight`` (λ), ``mask_target`` (``"all"``: Σ_k log p_k differentiated, as
    Ross et al.; ``"true"``: the true class's log p only, multi-class) and ``mask_penalty``, its form:
    ``"fraction"`` (the share of the squared input gradient outside the mask, in [0, 1]) or ``"ross"`` (its
    sum, Ross et al.'s eq. 1). Options not in the papers are left out of :meth:`to_dict` at their defaults,
    and so are the other guide's (:data:`GUIDE_FIELDS`), whose values :meth:`check` refuses unless they are
    their defaults: a setting of MIMIC is not one of a mask-guided run, nor the reverse.
    """

    kind: str = "mimic"
    copies: int = 3
    beta: float = 1.0
    disc_lr: float = 1e-4
    disc_hidden: int = 512
    disc_size: int = 64
    disc_input: str = "map"
    adversary: str = "paper"
    explanation: str = "gxi"
    mask_target: str = "all"
    mask_weight: float = 1.0
    mask_penalty: str = "fraction"

    def to_dict(self) -> dict:
        """The settings of the chosen guide (``kind`` and its :data:`GUIDE_FIELDS`), for the card and the run
        key; the other guide's fields are left out (a card written before kept them all, and still loads)."""
        d = asdict(self)
        for k, paper in (("disc_input", "map"), ("adversary", "paper"), ("explanation", "gxi"),
                         ("mask_target", "all")):
            if d[k] == paper:  # the paper's, and what every run made before the option had: same run key
                del d[k]
        for kind, names in GUIDE_FIELDS.items():
            if kind != self.kind:
                for k in names:
                    d.pop(k, None)
        return d

    def check(self) -> None:
        if self.kind not in GUIDES:
            raise NemtError(f"--guide must be one of {GUIDES}, got {self.kind!r}")
        defaults = GuideConfig.__dataclass_fields__
        for kind, names in GUIDE_FIELDS.items():
            for k in names if kind != self.kind else ():
                if getattr(self, k) != defaults[k].default:
                    raise NemtError(f"{k}={getattr(self, k)!r} is a setting of --guide {kind}; this guide is "
                                    f"{self.kind!r}, which does not use it: leave it out")
        if self.kind == "mimic" and self.copies < 2:
            raise NemtError(f"--copies must be at least 2 (a discriminator tells copies apart), got {self.copies}")
        for name in ("beta", "mask_weight"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise NemtError(f"{name} must be a finite number >= 0, got {v}")
        if self.mask_target not in MASK_TARGETS:
            raise NemtError(f"mask_target must be one of {MASK_TARGETS}, got {self.mask_target!r}")
        if self.explanation not in EXPLANATIONS:
            raise NemtError(f"explanation must be one of {EXPLANATIONS}, got {self.explanation!r}")
        if self.adversary not in ADVERSARIES:
            raise NemtError(f"adversary must be one of {ADVERSARIES}, got {self.adversary!r}")
        if self.disc_input not in DISC_INPUTS:
            raise NemtError(f"disc_input must be one of {DISC_INPUTS}, got {self.disc_input!r}")
        if self.mask_penalty not in ("fraction", "ross"):
            raise NemtError(f"mask_penalty must be 'fraction' or 'ross', got {self.mask_penalty!r}")
        if self.disc_lr <= 0 or self.disc_hidden < 1 or self.disc_size < 1:
            raise NemtError("disc_lr, disc_hidden and disc_size must be positive")


class GuidedEnsemble(nn.Module):
    """M copies of one zoo architecture; ``forward`` gives the mean of their log-softmax, (B, n_classes).

    ``base``/``base_kwargs``: the copies' architecture and its keywords
    (:func:`~nemt.models.zoo.build_model`). The copies are ``copies.0`` …
    ``copies.{M-1}``; a layer-based explainer (Grad-CAM) finds its stage in
    the last copy unless given one (``layer="copies.0.stage4"``), and
    :func:`copy_classifiers` wraps each copy to be explained on its own.
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 2, base: str = "smallcnn",
                 copies: int = 3, base_kwargs: dict | None = None):
        super().__init__()
        if base in ("mimic", "pantypes"):
            raise NemtError(f"MIMIC copies cannot be {base!r} (a model with its own training terms); "
                            "choose a plain architecture")
        if int(copies) < 1:
            raise NemtError(f"copies must be at least 1, got {copies}")
        self.base, self.base_kwargs = base, dict(base_kwargs or {})
        self.copies = nn.ModuleList(build_model(base, spatial_dims=spatial_dims, in_channels=in_channels,
                                                out_channels=out_channels, **self.base_kwargs)
                                    for _ in range(int(copies)))

    def copy_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Each copy's raw outputs (logits), (M, B, n_classes)."""
        return torch.stack([c(x) for c in self.copies])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([F.log_softmax(c(x), dim=1) for c in self.copies]).mean(0)


class Discriminator(nn.Module):
    """MIMIC's discriminator: flattened map -> ``hidden`` (ReLU) -> one logit per copy."""

    def __init__(self, in_features: int, copies: int, hidden: int = 512):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, copies)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """(N, *) maps -> (N, copies) logits."""
        return self.fc2(F.relu(self.fc1(maps.flatten(1))))


def copy_classifiers(clf: Classifier) -> list[Classifier]:
    """Each copy of a MIMIC model as a Classifier of its own (the base architecture's card; logits out),
    sharing the copy's parameters (nothing is copied): to explain the copies one by one."""
    net = clf.net
    if not isinstance(net, GuidedEnsemble):
        raise NemtError(f"not a MIMIC model (its network is {type(net).__name__}, not GuidedEnsemble)")
    d = clf.card.to_dict()
    d.update(arch=net.base, arch_kwargs=dict(net.base_kwargs), weights_sha256=None)
    card = ModelCard.from_dict(d)
    out = []
    for c in net.copies:
        copy = Classifier(c, card)
        copy.training = clf.training  # the wrapper's own flag only; the copy's modules stay as they are
        out.append(copy)
    return out


def _minmax_per_sample(m: torch.Tensor) -> torch.Tensor:
    """Each sample's map (B, …) min-max normalised over all its values (differentiable: ``ops.minmax``)."""
    return minmax(m.flatten(1)).view_as(m)


def explanation_maps(net: nn.Module, x: torch.Tensor, target: torch.Tensor, *, create_graph: bool = True,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """|x ⊙ ∂f_t/∂x| summed over channels, min-max per sample: (B, 1, *spatial) in [0, 1].

    ``net`` maps (B, C, *spatial) to logits (B, K); ``target`` (B,) the class per sample. With
    ``create_graph`` the maps are differentiable with respect to the network's weights (double
    back-propagation); without it they carry no graph to the weights. ``out``: the logits of ``x``
    already computed (``x`` must then require grad and ``out`` come from it; the graph is kept for
    a later backward), else one forward pass is made on a copy of ``x`` that requires grad.
    """
    if out is None:
        x = x.detach().requires_grad_(True)
        out = net(x)
    elif not x.requires_grad:
        raise NemtError("explanation_maps: x must require grad when out is given")
    score = out.gather(1, target.view(-1, 1).long()).sum()
    g, = torch.autograd.grad(score, x, create_graph=create_graph, retain_graph=True)
    m = (g * x).abs().sum(1, keepdim=True)
    if not create_graph:
        m = m.detach()
    return _minmax_per_sample(m)


def gradcam_maps(net: nn.Module, x: torch.Tensor, target: torch.Tensor, layer: str, *,
                 create_graph: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of ``net`` at ``layer`` for class ``target`` (B,), upsampled to the input and min-max per sample:
    (logits (B, K), maps (B, 1, *spatial) in [0, 1]).

    ReLU(Σ_k w_k A_k) with w_k the spatial mean of ∂f_t/∂A_k (Selvaraju et al. 2017), the gradient taken
    with ``create_graph`` so that the map is differentiable with respect to the weights (the issue's
    "Grad-CAM with create_graph=True"); one forward pass, whose logits are returned for the cross-entropy.
    """
    from nemt.explainers.layers import FeatureTap
    from nemt.ops import resize_linear

    with FeatureTap(net, [layer]) as tap:
        out = net(x)
    a = tap.features[layer]
    score = out.gather(1, target.view(-1, 1).long()).sum()
    g, = torch.autograd.grad(score, a, create_graph=create_graph, retain_graph=True)
    cam = F.relu((g.mean(tuple(range(2, a.ndim)), keepdim=True) * a).sum(1, keepdim=True))
    cam = resize_linear(cam, x.shape[2:])  # as the Grad-CAM explainer upsamples
    if not create_graph:
        cam = cam.detach()
    return out, _minmax_per_sample(cam)


def discriminator_input(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Maps (N, 1, *spatial) average-pooled to at most ``size`` per axis and flattened: (N, n)."""
    d = maps.ndim - 2
    grid = [min(int(s), int(size)) for s in maps.shape[2:]]
    if list(maps.shape[2:]) != grid:
        maps = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[d - 1](maps, grid)
    return maps.flatten(1)


def adversarial_terms(ensemble: GuidedEnsemble, disc: Discriminator, x: torch.Tensor, y: torch.Tensor,
                      loss_fn: Callable, *, disc_size: int = 64, create_graph: bool = True,
                      disc_input: str = "map", label: str = "copy", cam_layers: Sequence[str] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of MIMIC: (Σ_i CE_i, the discriminator's CE on the copies' maps, its accuracy).

    Each copy runs once on ``x`` (which gets a gradient-requiring copy); its map
    (:func:`explanation_maps` at the true class ``y``) goes to ``disc`` with the copy's index as the
    label. ``create_graph=False`` detaches the maps (the discriminator's epochs). ``disc_input="deviation"``:
    the discriminator sees each map minus the mean of the copies' maps of the same image (see the module).
    ``label="uniform"``: the second value is the cross-entropy against the uniform label instead (log M at
    best, where the discriminator cannot tell the copies apart): what the copies minimise with
    ``adversary="confusion"``. ``cam_layers`` (one module name per copy): the maps are
    :func:`gradcam_maps` at those layers instead of :func:`explanation_maps`.
    """
    xr = x.detach().requires_grad_(True)
    ce = x.new_zeros(())
    maps = []
    for i, c in enumerate(ensemble.copies):
        if cam_layers is not None:
            out, m = gradcam_maps(c, xr, y, cam_layers[i], create_graph=create_graph)
        else:
            out = c(xr)
            m = explanation_maps(c, xr, y, create_graph=create_graph, out=out)
        ce = ce + loss_fn(out, y)
        maps.append(m)
    if disc_input == "deviation":
        mean = torch.stack(maps).mean(0)
        maps = [m - mean for m in maps]
    elif disc_input != "map":
        raise NemtError(f"disc_input must be one of {DISC_INPUTS}, got {disc_input!r}")
    m = torch.cat(maps)  # (M * B, 1, *spatial), copy-major
    labels = torch.arange(len(maps), device=x.device).repeat_interleave(x.shape[0])
    logits = disc(discriminator_input(m, disc_size))
    if label == "uniform":
        d_ce = -F.log_softmax(logits, dim=1).mean(1).mean()
    elif label == "copy":
        d_ce = F.cross_entropy(logits, labels)
    else:
        raise NemtError(f"label must be 'copy' or 'uniform', got {label!r}")
    acc = (logits.argmax(1) == labels).float().mean()
    return ce, d_ce, acc.detach()


def right_reasons_penalty(net: nn.Module, x: torch.Tensor, gt: torch.Tensor, task: str,
                          out: torch.Tensor, target: torch.Tensor | None = None, *,
                          fraction: bool = False) -> torch.Tensor:
    """Ross et al.'s term: mean over the batch of Σ_d (A_d ∂/∂x_d Σ_k log p_k)², A = 1 outside the mask.

    ``fraction``: each sample's term divided by its Σ_d (∂/∂x_d Σ_k log p_k)², the share of the squared
    input gradient outside the mask, in [0, 1]. Ross's sum is also minimised by no gradient at all, which
    Σ_k log p_k has wherever the prediction is uniform; with a weight strong enough to guide, a small CNN
    on phantoms went there (test accuracy at chance); the share is scale-free and is not.

    ``x`` (B, C, *spatial) requires grad and ``out`` (B, K) are its logits; ``gt`` (B, 1, *spatial) bool
    lesion masks; log p is log-softmax (multi-class) or log-sigmoid (multi-label). With ``target``
    (B,) class indices (multi-class) only log p_target is differentiated instead of Σ_k log p_k. A
    sample with an empty mask contributes 0. Differentiable with respect to the weights.
    """
    logp = F.log_softmax(out, dim=1) if task == "multiclass" else F.logsigmoid(out)
    score = logp.sum() if target is None else logp.gather(1, target.view(-1, 1).long()).sum()
    g, = torch.autograd.grad(score, x, create_graph=True)
    outside = (~gt).to(g.dtype)
    has = gt.flatten(1).any(1).to(g.dtype)
    per = ((g * outside) ** 2).flatten(1).sum(1) * has
    if fraction:
        per = per / (g ** 2).flatten(1).sum(1).clamp_min(1e-12)
    return per.mean()


def _augment_with_mask(x: torch.Tensor, gt: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The image and its mask under the same random flip and affine (the mask thresholded at 0.5 after)."""
    from nemt.models.training import augment_batch
    both = augment_batch(torch.cat([x, gt.to(x.dtype)], dim=1), gen)
    return both[:, :x.shape[1]], both[:, x.shape[1]:] > 0.5


def train_guided(manifest, out_dir: str | Path, config=None, guide: GuideConfig | None = None, *,
                 device: str | torch.device = "cpu", fresh: bool = False, progress: bool = True,
                 log: Callable[[str], None] | None = None) -> tuple[Classifier, dict]:
    """Train with explanation guidance (see the module docstring); the global random generators, seeded
    inside, are handed back in the caller's states. Returns the best model (test figures in its card) and
    ``{"history", "metrics"}`` as :func:`~nemt.models.training.train_classifier` does."""
    with preserved_rng():
        return _train_guided(manifest, out_dir, config, guide or GuideConfig(), device=device, fresh=fresh,
                             progress=progress, log=log)


def _train_guided(manifest, out_dir, config, guide: GuideConfig, *, device, fresh, progress, log):
    from nemt.distributed import (StepBatches, all_reduce_sum, average_gradients, batch_generator, context,
                                  local_device, steps_per_epoch)
    from nemt.models.metrics import score_for_selection
    from nemt.models.training import (_format, _loss_fn, augment_batch, checked_config, evaluate, finish_run,
                                      prepare_run, ready_folder, resume, seed_everything)
    from nemt.progress import console, progress_bar

    cfg = checked_config(config)
    guide.check()
    ctx = context(device)
    device = local_device(device, ctx)
    log = log or (lambda s: console.print(s, soft_wrap=True, highlight=False))
    if not ctx.main:
        log = lambda s: None  # noqa: E731 - rank 0 speaks for the run
    task = manifest.task
    if guide.kind == "mimic" and task != "multiclass":
        raise NemtError(f"--guide mimic needs a multi-class task (the copies' log-softmax is averaged), not {task}")
    if guide.kind == "mask" and task == "regression":
        raise NemtError("--guide mask needs a classification task (the penalty is on the log-probabilities)")
    if guide.kind == "mask" and guide.mask_target == "true" and task != "multiclass":
        raise NemtError(f"mask_target='true' needs a multi-class task (one true class per image), not {task}")
    if cfg.arch in ("mimic", "pantypes"):
        raise NemtError(f"--guide cannot train --arch {cfg.arch}; choose a plain architecture")
    manifest.raise_problems()
    for warning in manifest.warnings:
        log(f"warning: {warning}")
    out_dir = Path(out_dir)
    seed_everything(cfg.seed)

    def needs_masks(splits):
        if guide.kind == "mask" and not any(manifest.samples[int(i)].has_gt for i in splits["train"]):
            raise NemtError(f"--guide mask needs lesion masks or boxes; no training image of {manifest.source} "
                            "has one")

    run = prepare_run(manifest, out_dir, cfg, fresh=fresh, extra_key={"guide": guide.to_dict()}, check=needs_masks)
    splits, state_path, run_key, st = run.splits, run.state_path, run.run_key, run.state
    size, channels, pre, ds = run.size, run.channels, run.pre, run.ds
    y_train = manifest.labels_array()[splits["train"]]

    base_kwargs = sized_arch_kwargs(cfg.arch, cfg.arch_kwargs, size)
    if guide.kind == "mimic":
        arch, arch_kwargs = "mimic", {"base": cfg.arch, "copies": int(guide.copies), "base_kwargs": base_kwargs}
    else:
        arch, arch_kwargs = cfg.arch, base_kwargs
    card = ModelCard(
        arch=arch, arch_kwargs=arch_kwargs, spatial_dims=len(size), in_channels=channels, task=task,
        label_names=list(manifest.label_names), input_size=list(size), preprocessing=pre.to_dict(),
        data=run.card_data(manifest, cfg),
        training={**cfg.to_dict(), "guide": guide.to_dict()},
    )
    net = build_model(arch, spatial_dims=len(size), in_channels=channels, out_channels=card.out_channels,
                      **arch_kwargs)
    clf = Classifier(net, card).to(device)
    loss_fn = _loss_fn(task, y_train, card.out_channels, cfg.class_weighting, device)
    opt = torch.optim.AdamW(clf.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # this rank's micro-batches: N ranks with --accumulate A step as 1 process with N * A (nemt.distributed)
    loader = StepBatches(ds["train"], cfg.batch_size, seed=cfg.seed, accumulate=cfg.accumulate, ctx=ctx)
    n_micro = len(loader)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs *
                                                steps_per_epoch(n_micro, cfg.accumulate), pct_start=0.15)
    disc = disc_opt = None
    cam_layers = None
    if guide.kind == "mimic":
        if guide.explanation == "gradcam":
            from nemt.explainers.gradcam import default_cam_layer
            cam_layers = [default_cam_layer(c, (channels, *size)) for c in clf.net.copies]
        n_in = int(np.prod([min(s, guide.disc_size) for s in size]))
        disc = Discriminator(n_in, guide.copies, guide.disc_hidden).to(device)
        disc_opt = torch.optim.Adam(disc.parameters(), lr=guide.disc_lr)

    ready_folder(ctx, out_dir, state_path, manifest, splits, new_run=st is None)
    parts = {"model": clf.net, "optimizer": opt, "scheduler": sched}
    if disc is not None:
        parts.update(discriminator=disc, disc_optimizer=disc_opt)
    start_epoch, best, history = resume(st, parts, out_dir, log)

    with progress_bar(progress and ctx.main) as bar:
        task_id = bar.add_task("train", total=(cfg.epochs - start_epoch) * n_micro, info="")
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.time()
            loader.set_epoch(epoch)
            clf.train()
            # 1-based odd epochs: the copies' adversarial epochs (no double back-propagation when beta is 0,
            # whose term would add exact zeros); even ones: the discriminator's
            copies_epoch = guide.kind == "mimic" and epoch % 2 == 0
            adversarial = copies_epoch and guide.beta > 0
            if disc is not None:
                disc.train()
                for p in disc.parameters():  # fixed while the copies play against it
                    p.requires_grad_(not copies_epoch)
            sums = {"loss": 0.0, "ce": 0.0, "guide": 0.0, "disc_acc": 0.0}
            seen = 0
            opt.zero_grad(set_to_none=True)
            if disc_opt is not None:
                disc_opt.zero_grad(set_to_none=True)
            for i, (index, batch) in enumerate(loader):
                x, y = batch["image"].to(device), batch["y"].to(device)
                gen = batch_generator(cfg.seed, epoch, index)
                last = (i + 1) % cfg.accumulate == 0 or i + 1 == n_micro
                if guide.kind == "mask":
                    gt = batch["gt"].to(device)
                    if cfg.augment:
                        x, gt = _augment_with_mask(x, gt, gen)
                    xr = x.detach().requires_grad_(True)
                    out = clf.net(xr)
                    ce = loss_fn(out, y)
                    term = right_reasons_penalty(clf.net, xr, gt, task, out,
                                                 y if guide.mask_target == "true" else None,
                                                 fraction=guide.mask_penalty == "fraction")
                    loss = ce + guide.mask_weight * term
                    acc = torch.zeros(())
                else:
                    if cfg.augment:
                        x = augment_batch(x, gen)
                    confusion = adversarial and guide.adversary == "confusion"
                    ce, term, acc = adversarial_terms(clf.net, disc, x, y, loss_fn, disc_size=guide.disc_size,
                                                      create_graph=adversarial, disc_input=guide.disc_input,
                                                      label="uniform" if confusion else "copy",
                                                      cam_layers=cam_layers)
                    if not adversarial:
                        loss = ce
                    else:  # the paper: maximise the discriminator's CE; confusion: bring it to the uniform label's
                        loss = ce + guide.beta * term if confusion else ce - guide.beta * term
                    if not copies_epoch:  # the discriminator learns from the detached maps, one step per optimiser step
                        (term / cfg.accumulate).backward()
                        if last:
                            average_gradients(disc.parameters(), ctx)
                            disc_opt.step()
                            disc_opt.zero_grad(set_to_none=True)
                (loss / cfg.accumulate).backward()
                if last:  # gradients averaged over the ranks by hand: DDP does not take double back-propagation
                    average_gradients(clf.net.parameters(), ctx)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                n = len(x)
                for k, v in (("loss", loss), ("ce", ce), ("guide", term), ("disc_acc", acc)):
                    sums[k] += float(v.detach()) * n
                seen += n
                bar.update(task_id, advance=1, description=f"epoch {epoch + 1}/{cfg.epochs}",
                           info=f"loss {sums['loss'] / seen:.4f}")
            if disc is not None:
                for p in disc.parameters():
                    p.requires_grad_(True)
            *totals, seen = all_reduce_sum([*sums.values(), seen], ctx)
            means = {k: v / max(seen, 1) for k, v in zip(sums, totals)}
            if not ctx.main:  # rank 0 validates, keeps the best checkpoint and writes the resume point
                ctx.barrier()
                continue
            val = evaluate(clf, ds["val"], device)
            score = score_for_selection(task, val)
            improved = score > best
            if improved:
                best = score
                clf.card.metrics = {"val": val, "best_epoch": epoch + 1}
                clf.save(out_dir)
            entry = {"epoch": epoch + 1, "train_loss": means["loss"], "train_ce": means["ce"], "val": val,
                     "seconds": round(time.time() - t0, 2)}
            if guide.kind == "mimic":
                entry.update(phase="copies" if copies_epoch else "discriminator", discriminator_ce=means["guide"],
                             discriminator_accuracy=means["disc_acc"])
            else:
                entry["right_reasons"] = means["guide"]
            history.append(entry)
            state = {"run_key": run_key, "epoch": epoch + 1, "best": best, "history": history,
                     "model": clf.net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "torch_rng": torch.get_rng_state()}
            if disc is not None:
                state.update(discriminator=disc.state_dict(), disc_optimizer=disc_opt.state_dict())
            save_state(state_path, state)
            write_json(out_dir / "history.json", history)
            extra = (f" D-CE {means['guide']:.3f} D-acc {means['disc_acc']:.2f} ({entry['phase']})"
                     if guide.kind == "mimic" else f" RR {means['guide']:.4f}")
            log(f"epoch {epoch + 1}/{cfg.epochs} loss {means['loss']:.4f}{extra} val {_format(val)}"
                f"{' *' if improved else ''} ({time.time() - t0:.1f}s)")
            ctx.barrier()

    if not ctx.main:
        return clf, {"history": history, "metrics": {}}
    return finish_run(out_dir, ds, history, device, log)


def copy_agreement(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean pairwise Pearson correlation between the copies' maps of each item: (B,).

    ``maps``: M >= 2 tensors (B, 1, *spatial), one per copy, of the same items. 1 when the copies agree
    exactly (up to scale); a constant map has correlation 0 with anything.
    """
    if len(maps) < 2:
        raise NemtError("agreement needs the maps of at least two copies")
    flat = [m.flatten(1).double() for m in maps]
    z = [(f - f.mean(1, keepdim=True)) / f.std(1, correction=0, keepdim=True).clamp_min(1e-12) for f in flat]
    pairs = [(z[i] * z[j]).mean(1) for i in range(len(z)) for j in range(i + 1, len(z))]
    return torch.stack(pairs).mean(0).float()
