"""Classification and regression figures for validation and test splits.

Thin wrappers over scikit-learn so every split, task and command reports the
same numbers under the same names.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.metrics import balanced_accuracy_score, roc_auc_score


def _auroc(y: np.ndarray, score: np.ndarray) -> float:
    """AUROC of a binary target, NaN when only one class is present."""
    if y.min() == y.max():
        return float("nan")
    return float(roc_auc_score(y, score))


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def classification_metrics(task: str, y: np.ndarray, out: np.ndarray, label_names: list[str]) -> dict:
    """Figures from targets ``y`` and model outputs ``out`` (B, T) (logits or values).

    multiclass: accuracy, balanced accuracy, one-vs-rest AUROC per label and
    their macro mean; multilabel: per-label AUROC and accuracy at 0.5, macro
    means; regression: MAE, RMSE and Pearson r.
    """
    with warnings.catch_warnings():  # small validation sets may miss a class; the figures say so by NaN
        warnings.simplefilter("ignore", UserWarning)
        return _metrics(task, y, out, label_names)


def _metrics(task: str, y: np.ndarray, out: np.ndarray, label_names: list[str]) -> dict:
    if task == "multiclass":
        z = out - out.max(axis=1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        pred = p.argmax(axis=1)
        per = {name: _auroc((y == k).astype(int), p[:, k]) for k, name in enumerate(label_names)}
        return {"accuracy": float((pred == y).mean()),
                "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
                "auroc": per, "auroc_macro": _nanmean(list(per.values())), "n": int(len(y))}
    if task == "multilabel":
        p = 1.0 / (1.0 + np.exp(-out))
        per = {name: _auroc(y[:, k].astype(int), p[:, k]) for k, name in enumerate(label_names)}
        acc = {name: float(((p[:, k] > 0.5) == (y[:, k] > 0.5)).mean()) for k, name in enumerate(label_names)}
        bal = [float(balanced_accuracy_score(y[:, k] > 0.5, p[:, k] > 0.5)) for k in range(len(label_names))]
        return {"accuracy": float(np.mean(list(acc.values()))), "balanced_accuracy": float(np.mean(bal)),
                "auroc": per, "auroc_macro": _nanmean(list(per.values())), "n": int(len(y))}
    pred = out.reshape(-1)
    y = y.reshape(-1)
    err = pred - y
    r = float(np.corrcoef(pred, y)[0, 1]) if len(y) > 1 and pred.std() > 0 and y.std() > 0 else float("nan")
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())), "pearson_r": r,
            "n": int(len(y))}


def score_for_selection(task: str, metrics: dict) -> float:
    """Higher is better: macro AUROC (then balanced accuracy) or minus MAE."""
    if task == "regression":
        return -metrics["mae"]
    auc = metrics["auroc_macro"]
    return (0.0 if math.isnan(auc) else auc) + 1e-3 * metrics["balanced_accuracy"]
