"""Splits: deterministic, seeded, disjoint, proportional, stratified, and groups never cross."""
from __future__ import annotations

import numpy as np

from nemt.data import Manifest, Sample, split_indices
from pathlib import Path


def _manifest(n=400, n_groups=150, task="multiclass", seed=0):
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, n_groups, n)
    samples = []
    for i in range(n):
        if task == "multiclass":
            y = int(rng.choice(3, p=[0.6, 0.3, 0.1]))
        elif task == "multilabel":
            y = tuple(float(v) for v in (rng.random(3) < [0.5, 0.2, 0.05]))
        else:
            y = float(rng.normal())
        samples.append(Sample(image=Path(f"{i}.png"), y=y, group=f"g{groups[i]}"))
    names = ["a", "b", "c"] if task != "regression" else ["t"]
    return Manifest(samples=samples, task=task, label_names=names, source=Path("."))


def test_deterministic_and_seed_dependent():
    m = _manifest()
    a, b, c = split_indices(m, seed=0), split_indices(m, seed=0), split_indices(m, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_disjoint_cover_and_proportions():
    m = _manifest(n=1000, n_groups=1000)
    sp = split_indices(m, (0.7, 0.1, 0.2), seed=0)
    allidx = np.concatenate(list(sp.values()))
    assert sorted(allidx.tolist()) == list(range(1000))
    assert abs(len(sp["train"]) - 700) <= 15 and abs(len(sp["val"]) - 100) <= 15 and abs(len(sp["test"]) - 200) <= 15


def test_groups_never_cross_splits():
    for task in ("multiclass", "multilabel", "regression"):
        m = _manifest(task=task)
        sp = split_indices(m, seed=3)
        owner = {}
        for name, idx in sp.items():
            for i in idx:
                g = m.samples[i].group
                assert owner.setdefault(g, name) == name, f"group {g} in {owner[g]} and {name}"


def test_stratified_class_proportions():
    m = _manifest(n=1000, n_groups=1000)
    y = m.labels_array()
    sp = split_indices(m, seed=0)
    overall = np.bincount(y, minlength=3) / len(y)
    for name, idx in sp.items():
        frac = np.bincount(y[idx], minlength=3) / len(idx)
        assert np.abs(frac - overall).max() < 0.03, (name, frac, overall)
