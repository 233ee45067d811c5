"""Explainers behind one API: ``explain(x, target=...) -> (B, T, *spatial)``.

``get_explainer(name, model, **params)`` builds one by name; ``available()``
lists the names.
"""
from nemt.explainers.base import Explainer, available, get_explainer, normalise_maps, register, resolve_targets
from nemt.explainers.nemt import NEM, NEMt
from nemt.explainers import gradcam  # noqa: F401  (registers gradcam, gradcam++)
from nemt.explainers import reference  # noqa: F401  (registers the reference maps)
from nemt.explainers import attribution  # noqa: F401  (saliency, ig, gradshap, lime, kernelshap via Captum)
from nemt.explainers import perturbation  # noqa: F401  (occlusion, rise, relax, u-relax)
from nemt.explainers import optimised  # noqa: F401  (extremal, inpainting)

__all__ = ["Explainer", "NEM", "NEMt", "available", "get_explainer", "normalise_maps", "register",
           "resolve_targets"]
