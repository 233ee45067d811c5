"""Metrics over batched maps (B, T, *spatial), 2D or 3D; one value per map. See each function's docstring.

``DIRECTIONS[name]`` (and ``fn.direction``) says whether higher or lower is
better. Localisation, gaze and ground-truth metrics give NaN where no score
exists (empty ground truth); :func:`summarise` averages excluding and
counting those.
"""
from nemt.metrics._common import DIRECTIONS
from nemt.metrics.complexity import complexity, sparseness
from nemt.metrics.faithfulness import (deletion_auc, faithfulness_estimate, insertion_auc, linear_imputation,
                                       road)
from nemt.metrics.gaze import cc, fixations_to_heatmap, kl_divergence, nss, similarity
from nemt.metrics.groundtruth import emd_score, importance_mass_accuracy, top_k_precision
from nemt.metrics.localisation import (energy_pointing_game, pointing_game, relevance_mass, relevance_rank,
                                       top_k_intersection)
from nemt.metrics.randomisation import model_parameter_randomisation, random_logit, similarity_of, ssim
from nemt.metrics.summary import summarise

__all__ = [
    "DIRECTIONS", "summarise",
    "relevance_mass", "relevance_rank", "pointing_game", "top_k_intersection", "energy_pointing_game",
    "complexity", "sparseness",
    "faithfulness_estimate", "deletion_auc", "insertion_auc", "road", "linear_imputation",
    "model_parameter_randomisation", "random_logit", "similarity_of", "ssim",
    "kl_divergence", "nss", "cc", "similarity", "fixations_to_heatmap",
    "top_k_precision", "emd_score", "importance_mass_accuracy",
]
