"""Explainers behind one API: ``explain(x, target=...) -> (B, T, *spatial)``.

``get_explainer(name, model, **params)`` builds one by name (``path=`` loads a
fitted NEMt); ``available()`` lists the names. Importing this package
registers every method; each class is also importable by name:

>>> from nemt.explainers import GradCAM, RISE, NEMt, get_explainer      # doctest: +SKIP
"""
from nemt.explainers.base import (Explainer, available, get_explainer, init_parameters, normalise_maps, register,
                                  resolve_targets)
from nemt.explainers.attribution import GradientShap, IntegratedGradients, KernelShap, Lime, Saliency
from nemt.explainers.gradcam import GradCAM, GradCAMPlusPlus
from nemt.explainers.nemt import NEM, NEMt
from nemt.explainers.optimised import CounterfactualInpainting, ExtremalPerturbation
from nemt.explainers.perturbation import RELAX, RISE, URELAX, Occlusion
from nemt.explainers.prototypes import PrototypeExplainer
from nemt.explainers.reference import CentredGaussian, InputMap, LaplaceMap, RandomMap, SobelMap

__all__ = [
    "Explainer", "available", "get_explainer", "init_parameters", "normalise_maps", "register", "resolve_targets",
    "GradCAM", "GradCAMPlusPlus", "Saliency", "IntegratedGradients", "GradientShap", "Lime", "KernelShap",
    "Occlusion", "RISE", "RELAX", "URELAX", "ExtremalPerturbation", "CounterfactualInpainting",
    "RandomMap", "InputMap", "SobelMap", "LaplaceMap", "CentredGaussian", "NEMt", "NEM", "PrototypeExplainer",
]
