"""Deterministic, seeded, stratified train/val/test splits that keep groups whole.

Stratification is on the multi-class label, on the most frequent present label
of a multi-label target, and on quantile bins of a regression target.
Groups (patients) never cross splits: scikit-learn's ``StratifiedGroupKFold``
assigns whole groups to folds while balancing the strata, and the folds are
then dealt to the splits in the asked proportions.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from nemt.data.manifest import SPLITS, Manifest
from nemt.errors import SEED_MAX, DataError


def strata(manifest: Manifest) -> np.ndarray:
    """One stratum id per sample (see the module docstring)."""
    y = manifest.labels_array()
    if manifest.task == "multiclass":
        return y
    if manifest.task == "multilabel":
        freq = y.sum(axis=0)
        # each sample's rarest present label keeps rare labels spread; none = its own stratum
        order = np.argsort(freq)
        out = np.full(len(y), -1, dtype=np.int64)
        for k in order[::-1]:
            out[y[:, k] > 0] = k
        return out
    edges = np.quantile(y, [0.2, 0.4, 0.6, 0.8])
    return np.searchsorted(edges, y, side="right")


def split_indices(manifest: Manifest, fractions: Sequence[float] = (0.7, 0.1, 0.2),
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Indices into ``manifest.samples`` for train/val/test.

    A data set that brings its own split (MedMNIST, a ``split`` column) keeps
    it. Otherwise groups are dealt to 20 stratified folds (fewer for small
    sets), shuffled with ``seed``, and the folds go to train/val/test in
    proportion to ``fractions``. The same manifest and seed always give the
    same split.
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)) or not 0 <= seed <= SEED_MAX:
        raise DataError(None, "seed", f"need a whole number in [0, 2**32 - 1], got {seed!r}")
    if isinstance(fractions, (str, bytes)):
        raise DataError(None, "fractions", f"need three numbers (train, val, test), e.g. (0.7, 0.1, 0.2), "
                        f"got {fractions!r}")
    n = len(manifest.samples)
    if n == 0:
        raise DataError(manifest.source, None, "no usable samples to split")
    given = [s.split for s in manifest.samples]
    if all(g is not None for g in given):
        return {k: np.array([i for i, g in enumerate(given) if g == k], dtype=np.int64) for k in SPLITS}
    try:
        f = np.asarray(fractions, dtype=float)
    except (TypeError, ValueError):
        f = np.full(0, np.nan)
    if f.shape != (3,) or not np.isfinite(f).all() or (f < 0).any() or not np.isclose(f.sum(), 1.0):
        raise DataError(None, "fractions", f"need three non-negative fractions summing to 1, got {list(fractions)}")

    groups = np.array([s.group for s in manifest.samples])
    n_groups = len(set(groups.tolist()))
    y = strata(manifest)
    _, counts = np.unique(y, return_counts=True)
    n_folds = int(min(20, n_groups, counts.max()))  # scikit-learn needs a stratum at least this large
    if n_folds < 3:
        raise DataError(manifest.source, None, f"{n_groups} groups cannot make train/val/test splits")
    folds = np.empty(n, dtype=np.int64)
    skf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a stratum smaller than the fold count is fine here
        warnings.filterwarnings("ignore", message="The least populated class")
        for k, (_, test_idx) in enumerate(skf.split(np.zeros(n), y, groups)):
            folds[test_idx] = k
    # deal folds to splits in proportion; every split with a positive fraction gets at least one fold
    per = np.where(f > 0, np.maximum(1, np.round(f * n_folds)), 0).astype(int)
    per[0] = n_folds - per[1:].sum()
    fold_split = np.repeat(np.arange(3), per)
    out = {name: np.flatnonzero(fold_split[folds] == j) for j, name in enumerate(SPLITS)}
    return out
