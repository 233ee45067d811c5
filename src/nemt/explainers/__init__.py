"""Explainers behind one API: ``explain(x, target=...) -> (B, T, *spatial)``.

``get_explainer(name, model, **params)`` builds one by name; ``available()``
lists the names.
"""
from nemt.explainers.base import Explainer, available, get_explainer, normalise_maps, register, resolve_targets
from nemt.explainers.nemt import NEM, NEMt
from nemt.explainers import gradcam  # noqa: F401  (registers gradcam, gradcam++)
from nemt.explainers import reference  # noqa: F401  (registers the reference maps)

__all__ = ["Explainer", "NEM", "NEMt", "available", "get_explainer", "normalise_maps", "register",
           "resolve_targets"]
