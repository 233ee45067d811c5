"""Metrics over batched maps (B, T, *spatial), 2D or 3D; one value per map. See each function's docstring.

Every metric registers itself where it is defined (``@metric(direction,
inputs=...)`` in its family module): :func:`registry` gives {name:
:class:`MetricSpec`}, :func:`get_metric` one spec (its ``fn``, ``direction``
and positional ``inputs`` by name, :data:`INPUTS`), :func:`available_metrics`
the names, optionally only those a caller has the inputs for.
``DIRECTIONS[name]`` (and ``fn.direction``) says whether higher or lower is
better. Localisation, gaze and ground-truth metrics give NaN where no score
exists (empty ground truth); :func:`summarise` averages excluding and
counting those. Where a metric is undefined for a map (a correlation with a
constant, collapsed map; a constant map's pointing game, rank or mass) it
gives NaN too and says so once per call (:class:`UndefinedMetricWarning`);
``summarise(values, metric=name)`` counts those apart (``n_undefined``) for
a metric without ground truth, ``summarise(values, undefined=mask)`` for
one with ground truth or gaze. Invalid input (NaN/inf maps, masks,
gaze maps or x, an empty batch, shapes that do not fit, e.g. channel-last
maps) is refused with an error naming the argument. Dataset-level metrics (MaxBoxAccV2: a maximum over the data set)
carry a per-map statistic and a reduction (:attr:`MetricSpec.dataset_level`).

Per-map metrics run over slices of the batch serially in the calling thread,
with torch's thread settings untouched; an entry point may opt in to worker
threads with ``with parallel_chunks(workers): ...`` (same results).
"""
from nemt.metrics._common import (DIRECTIONS, INPUTS, MetricSpec, UndefinedMetricWarning, available_metrics,
                                  get_metric, metric, parallel_chunks, registry, unregister_metric)
from nemt.metrics.complexity import complexity, sparseness
from nemt.metrics.faithfulness import (deletion_auc, faithfulness_estimate, insertion_auc, linear_imputation,
                                       road)
from nemt.metrics.gaze import cc, fixations_to_heatmap, kl_divergence, nss, similarity
from nemt.metrics.groundtruth import emd_score, importance_mass_accuracy, top_k_precision
from nemt.metrics.localisation import (energy_pointing_game, pointing_game, pointing_game_expected, relevance_mass,
                                       relevance_rank, top_k_intersection)
from nemt.metrics.randomisation import model_parameter_randomisation, random_logit, similarity_of, ssim
from nemt.metrics.summary import summarise
from nemt.metrics.wsol import box_iou_curves, max_box_acc_reduce, max_box_acc_v2

__all__ = [
    "DIRECTIONS", "INPUTS", "MetricSpec", "metric", "registry", "get_metric", "available_metrics",
    "unregister_metric", "parallel_chunks", "summarise", "UndefinedMetricWarning",
    "relevance_mass", "relevance_rank", "pointing_game", "pointing_game_expected", "top_k_intersection",
    "energy_pointing_game",
    "complexity", "sparseness",
    "faithfulness_estimate", "deletion_auc", "insertion_auc", "road", "linear_imputation",
    "model_parameter_randomisation", "random_logit", "similarity_of", "ssim",
    "kl_divergence", "nss", "cc", "similarity", "fixations_to_heatmap",
    "top_k_precision", "emd_score", "importance_mass_accuracy",
    "max_box_acc_v2", "box_iou_curves", "max_box_acc_reduce",
]
