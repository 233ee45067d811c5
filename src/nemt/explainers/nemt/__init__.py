"""NEMt / NEM: a trained explanation module gives an occlusion-style mask in one forward pass."""
from nemt.explainers.nemt.estimator import NEM, NEMt, model_checksum

__all__ = ["NEM", "NEMt", "model_checksum"]
