"""The XAI-TRIS models: linear, MLP and CNN trained in memory on one scenario and background.

``train_xaitris_models`` generates the data (:func:`nemt.data.xaitris.make_xaitris`),
splits it (:func:`nemt.data.xaitris.split`, stratified, same ``seed``), trains
each model with Adam on the cross-entropy, checks the validation accuracy
after every epoch, stops after ``patience`` epochs without improvement (but
not before ``min_epochs``: the CORR and MULT tasks sit at chance for several
epochs before they are learnt) and keeps the best epoch's weights (ties: the
lower validation loss), then reports the test accuracy. Only
correctly classified test samples are scored in the benchmark
(:func:`correct_test_samples`), as in XAI-TRIS.

The test set the models were evaluated on is
``xaitris_splits(scenario, background, n=n, seed=seed, alpha=alpha)[2]``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from nemt.data.xaitris import XaiTrisData, make_xaitris, split
from nemt.errors import NemtError
from nemt.models.classifier import Classifier
from nemt.models.zoo import build_model
from nemt.progress import progress_bar

__all__ = ["XAITRIS_MODELS", "xaitris_splits", "train_xaitris_models", "accuracy", "correct_test_samples"]

XAITRIS_MODELS: tuple[str, ...] = ("linear", "mlp", "cnn")
LABEL_NAMES = ["class0", "class1"]


def xaitris_splits(scenario: str, background: str, *, n: int = 4000, seed: int = 0,
                   alpha: float | None = None, size: int = 64,
                   fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> tuple[XaiTrisData, XaiTrisData, XaiTrisData]:
    """The train/val/test data :func:`train_xaitris_models` uses for these settings."""
    data = make_xaitris(scenario, background, n, size=size, alpha=alpha, seed=seed)
    return split(data, fractions, seed=seed)


@torch.no_grad()
def _logits(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        return torch.cat([model(x[i:i + batch_size].to(dev)).float().cpu() for i in range(0, len(x), batch_size)])
    finally:
        model.train(was)


def accuracy(model: torch.nn.Module, data: XaiTrisData, batch_size: int = 512) -> float:
    """Fraction of ``data`` that ``model`` classifies correctly."""
    if len(data) == 0:
        return float("nan")
    return float((_logits(model, data.x, batch_size).argmax(1) == data.y).float().mean())


def correct_test_samples(clf: torch.nn.Module, data: XaiTrisData, batch_size: int = 512) -> torch.Tensor:
    """int64 indices into ``data`` of the samples ``clf`` classifies correctly (argmax of its outputs)."""
    if len(data) == 0:
        return torch.zeros(0, dtype=torch.int64)
    hit = _logits(clf, data.x, batch_size).argmax(1) == data.y
    return torch.nonzero(hit).flatten()


def _train_one(name: str, train: XaiTrisData, val: XaiTrisData, *, epochs: int, seed: int, lr: float,
               weight_decay: float, batch_size: int, patience: int, min_epochs: int, device: torch.device,
               bar, arch_kwargs: dict) -> tuple[torch.nn.Module, dict]:
    size = tuple(train.x.shape[2:])
    with torch.random.fork_rng(devices=[]):  # init and dropout seeded, global state untouched
        torch.manual_seed(seed)
        net = build_model(name, spatial_dims=len(size), in_channels=1, out_channels=2, **arch_kwargs).to(device)
        # channels-last makes CPU max-pooling of the few-channel CNN about twice as fast (2D only)
        fmt = torch.channels_last if len(size) == 2 else torch.contiguous_format
        net = net.to(memory_format=fmt)
        opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(seed)
        x, y = train.x, train.y
        best = (-1.0, float("inf"))
        best_state, best_epoch, history = None, 0, []
        task = bar.add_task(f"{train.meta['scenario']}/{train.meta['background']} {name}", total=epochs, info="")
        for epoch in range(1, epochs + 1):
            net.train()
            order = torch.randperm(len(x), generator=gen)
            total = 0.0
            for i in range(0, len(x), batch_size):
                idx = order[i:i + batch_size]
                xb = x[idx].to(device).contiguous(memory_format=fmt)
                loss = F.cross_entropy(net(xb), y[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            logits = _logits(net, val.x)
            val_loss = float(F.cross_entropy(logits, val.y))
            val_acc = float((logits.argmax(1) == val.y).float().mean())
            history.append({"epoch": epoch, "train_loss": total / len(x), "val_loss": val_loss, "val_accuracy": val_acc})
            if (val_acc, -val_loss) > (best[0], -best[1]):
                best, best_epoch = (val_acc, val_loss), epoch
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            bar.update(task, advance=1, info=f"val acc {val_acc:.3f} (best {best[0]:.3f} @ {best_epoch})")
            if epoch >= min_epochs and epoch - best_epoch >= patience:
                break
        bar.update(task, total=epoch)
    net = net.to(memory_format=torch.contiguous_format)
    net.load_state_dict(best_state)
    net.eval()
    return net, {"best_epoch": best_epoch, "epochs_run": epoch, "val_accuracy": best[0], "val_loss": best[1],
                 "history": history}


def train_xaitris_models(scenario: str, background: str, models: Sequence[str] = XAITRIS_MODELS, *,
                         epochs: int = 25, seed: int = 0, out_dir: str | Path | None = None, n: int = 4000,
                         alpha: float | None = None, size: int = 64, lr: float = 1e-3,
                         weight_decay: float = 1e-4, batch_size: int = 64, patience: int = 6,
                         min_epochs: int = 10,
                         fractions: Sequence[float] = (0.8, 0.1, 0.1),
                         data: tuple[XaiTrisData, XaiTrisData, XaiTrisData] | None = None,
                         device: str | torch.device = "cpu",
                         progress: bool = True) -> dict[str, tuple[Classifier, float]]:
    """Train the XAI-TRIS models on one scenario x background; ``{name: (classifier, test accuracy)}``.

    ``data`` is a (train, val, test) triple to use instead of
    ``xaitris_splits(scenario, background, n=n, seed=seed, alpha=alpha, size=size, fractions=fractions)``.
    Each classifier is a multi-class :class:`Classifier` with labels
    ``class0``/``class1`` whose card records ``input_size`` in
    ``arch_kwargs`` (so :func:`nemt.models.load_model` rebuilds it), the data
    settings, the training settings and the validation/test accuracy. With
    ``out_dir`` each is saved to ``out_dir/<name>``. Seeded: the same
    arguments give the same weights on the same machine; the global random
    state is left as it was.
    """
    unknown = [m for m in models if m not in XAITRIS_MODELS]
    if unknown:
        raise NemtError(f"unknown XAI-TRIS model(s) {unknown}; choose from {XAITRIS_MODELS}")
    given = data is not None
    if data is None:
        data = xaitris_splits(scenario, background, n=n, seed=seed, alpha=alpha, size=size, fractions=fractions)
    train, val, test = data
    if len(train) == 0 or len(val) == 0:
        raise NemtError("XAI-TRIS training needs non-empty train and validation sets")
    device = torch.device(device)
    size_hw = [int(s) for s in train.x.shape[2:]]
    out: dict[str, tuple[Classifier, float]] = {}
    with progress_bar(progress) as bar:
        for name in models:
            arch_kwargs = {"input_size": size_hw}
            t0 = time.perf_counter()
            net, info = _train_one(name, train, val, epochs=epochs, seed=seed, lr=lr, weight_decay=weight_decay,
                                   batch_size=batch_size, patience=patience, min_epochs=min_epochs,
                                   device=device, bar=bar, arch_kwargs=arch_kwargs)
            seconds = time.perf_counter() - t0
            clf = Classifier.from_module(net, spatial_dims=len(size_hw), in_channels=1, input_size=size_hw,
                                         task="multiclass", label_names=LABEL_NAMES, arch=name).to(device)
            clf.eval()
            acc = accuracy(clf, test)
            meta = {k: v for k, v in train.meta.items() if k != "split"}
            clf.card.arch_kwargs = arch_kwargs
            how = {"split": "given"} if given else {"split_seed": seed, "fractions": list(fractions)}
            clf.card.data = {"source": "xai-tris", **meta, **how,
                             "n_split": {"train": len(train), "val": len(val), "test": len(test)}}
            clf.card.metrics = {"val_accuracy": info["val_accuracy"], "val_loss": info["val_loss"],
                                "test_accuracy": acc}
            clf.card.training = {"optimizer": "adam", "lr": lr, "weight_decay": weight_decay,
                                 "batch_size": batch_size, "max_epochs": epochs, "patience": patience,
                                 "min_epochs": min_epochs,
                                 "selection": "val_accuracy", "best_epoch": info["best_epoch"],
                                 "epochs_run": info["epochs_run"], "seed": seed, "seconds": round(seconds, 2),
                                 "history": [{k: round(v, 4) if isinstance(v, float) else v for k, v in h.items()}
                                             for h in info["history"]]}
            if out_dir is not None:
                clf.save(Path(out_dir) / name)
            out[name] = (clf, acc)
    return out


# --------------------------------------------------------------------------
# the suite: every scenario x background x model x method, scored against the ground truth
# --------------------------------------------------------------------------

SUITE_METHODS = ("nemt", "ig", "gradshap", "saliency", "occlusion", "rise", "extremal", "gradcam++", "random",
                 "sobel", "laplace", "input")
SUITE_METRICS = ("top_k_precision", "emd_score", "importance_mass_accuracy")
REFERENCES = ("random", "sobel", "laplace", "input")
#: budgets for 64 px images of tiny models
SUITE_PARAMS = {"occlusion": {"window": 8, "stride": 4}, "rise": {"n_masks": 1000},
                "extremal": {"mask_stride": 4, "steps": 150},
                # fit settings: a decoder half as wide as the default suits 64 px and a tiny CNN
                "nemt": {"epochs": 10, "decoder_channels": [64, 32, 16, 8, 4]}}


def _needs_conv(method: str) -> bool:
    """Methods that read the CNN's feature maps: Grad-CAM(++), and NEMt, whose decoder takes the model's stages
    (its model-agnostic own-encoder mode deleted nothing on the linear model in a probe: 3 epochs, LIN-WHITE)."""
    return method.startswith("gradcam") or method == "nemt"


def suite_nemt_folder(explainer, directory: Path) -> Path:
    """``directory/nemt-<hash>`` of the explainer's resolved training parameters, defaults and seed included: a
    fit made with other settings, or under other defaults of an earlier version, is never read back as this
    one. The explanation-time parameters (map areas, map smoothing) are left out: they need no refit."""
    import hashlib
    import json

    from nemt.explainers.nemt.estimator import EXPLANATION_TIME_PARAMS

    key = {k: v for k, v in explainer.hyper_params().items() if k not in EXPLANATION_TIME_PARAMS}
    tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return Path(directory) / f"nemt-{tag}"


def fit_suite_nemt(clf, train: XaiTrisData, directory: Path, params: dict, *, seed: int = 0,
                   device: str = "cpu", progress: bool = True, batch_size: int = 16,
                   val: XaiTrisData | None = None):
    """A NEMt for one suite model, fitted on its training split (true labels) or read back.

    The folder is ``directory/nemt-<hash of the resolved parameters>``: other settings (or other defaults) fit anew
    instead of mixing; an interrupted fit resumes from its last epoch. With
    ``val``, the collapse report is computed on it and written to
    ``collapse.json`` (the suite reports collapsed models instead of stopping).
    """
    import json

    from nemt.explainers.nemt import NEMt

    ex = NEMt(clf, seed=seed, device=device, **params)
    folder = suite_nemt_folder(ex, directory)
    if (folder / "explainer.json").is_file():
        asked = ex
        ex = NEMt.load(folder, clf, device=device)
        if ex.objective == "nested":  # the map asked for now, from the fit made with the same training parameters
            ex.set_map_areas(asked.map_areas).set_map_smoothing(asked.map_smoothing)
        if (folder / "collapse.json").is_file():  # written by the same fit, just before the explainer
            ex.collapse_ = json.loads((folder / "collapse.json").read_text(encoding="utf-8"))
        return ex
    def batches(d: XaiTrisData) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(d.x[i:i + batch_size], d.y[i:i + batch_size]) for i in range(0, len(d.x), batch_size)]

    return ex.fit(batches(train), val_data=None if val is None else batches(val), guard=False, out_dir=folder,
                  progress=progress, log=lambda s: None)


def suite_nemt_collapsed(explainer) -> list[str] | None:
    """The targets the collapse guard flagged for a suite NEMt (None: fitted without a validation split)."""
    rep = getattr(explainer, "collapse_", None)
    return None if rep is None else list(rep["collapsed"])


def run_suite(out: str | Path, *, methods: Sequence[str] = (), seed: int = 0, device: str = "cpu",
              progress: bool = True, restart: bool = False, params: dict[str, dict] | None = None,
              batch_size: int = 16, n: int = 4000, epochs: int = 25, max_samples: int = 50,
              min_accuracy: float = 0.8, scenarios: Sequence[str] | None = None,
              backgrounds: Sequence[str] | None = None, models: Sequence[str] = XAITRIS_MODELS) -> str:
    """``nemt benchmark --suite xai-tris``: train, explain, score; write ``summary.md``/``.csv`` and ``report.html``.

    For each scenario and background the three models are trained (or read
    back from ``out/models/<scenario>-<background>/<model>`` when a previous
    run saved them); models whose test accuracy is below ``min_accuracy``
    are reported and skipped (their "correct" samples would be chance).
    Each remaining model's first ``max_samples`` correctly classified test
    samples are explained for their true class with every method (Grad-CAM
    and NEMt only for the CNN; NEMt is fitted once per model on its training
    split, :func:`fit_suite_nemt`, and its time per image excludes the fit) and scored with top-|GT| precision, EMD score and
    importance mass accuracy; each (scenario, background, model) is one
    resumable :func:`~nemt.bench.runner.run_benchmark` run under ``out/runs``.
    Methods, their parameters and the metrics' (``params``: {method or suite metric: keywords}) are checked
    before any model is trained (:func:`check_suite`). Returns the Markdown table.
    """
    import csv

    from nemt.bench.report import write_report
    from nemt.bench.runner import BenchmarkData, RunConfig, clear_run, make_items, run_benchmark
    from nemt.data.xaitris import BACKGROUNDS, SCENARIOS
    from nemt.explainers import get_explainer
    from nemt.files import atomic_open
    from nemt.models import load_model

    out = Path(out)
    methods = list(methods) or list(SUITE_METHODS)
    budgets, metric_params = check_suite(methods, params, seed=seed)  # before any training
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    skipped: list[str] = []
    collapse: dict[str, list[str] | None] = {}
    for scenario in scenarios or SCENARIOS:
        for background in backgrounds or BACKGROUNDS:
            key = f"{scenario}-{background}"
            model_dir = out / "models" / key
            train, val, test = xaitris_splits(scenario, background, n=n, seed=seed)
            saved = {m: load_model(model_dir / m, device=device) for m in models
                     if (model_dir / m / "model.json").is_file()}
            if len(saved) == len(models) and all(_trained_as_asked(c, train, seed, epochs) for c in saved.values()):
                trained = {m: (c, accuracy(c, test)) for m, c in saved.items()}
            else:  # none yet, or trained on other data, another seed or budget: (re)trained

                trained = train_xaitris_models(scenario, background, models, epochs=epochs, seed=seed,
                                               out_dir=model_dir, n=n, device=device, progress=progress)
            for name, (clf, acc) in trained.items():
                if acc < min_accuracy:
                    skipped.append(f"{key}/{name} (test accuracy {acc:.2f})")
                    continue
                idx = correct_test_samples(clf, test)[:max_samples]
                sub = test[idx]
                x = sub.x.to(device)
                unit = (sub.x - sub.x.amin(dim=(1, 2, 3), keepdim=True)) / (
                    sub.x.amax(dim=(1, 2, 3), keepdim=True) - sub.x.amin(dim=(1, 2, 3), keepdim=True)).clamp_min(1e-12)
                items = make_items(sub.y, "multiclass", LABEL_NAMES, [f"{key}#{int(i)}" for i in idx],
                                   [True] * len(idx))
                data = BenchmarkData(x, unit, sub.gt.to(device), items, LABEL_NAMES, f"{key}:{seed}:{n}")
                usable = [m for m in methods if not (_needs_conv(m) and name != "cnn")]
                explainers = {m: fit_suite_nemt(clf, train, model_dir / name, budgets[m], seed=seed, device=device,
                                                progress=progress, val=val) if m == "nemt"
                              else get_explainer(m, clf, seed=seed, device=device, **budgets[m]) for m in usable}
                if "nemt" in explainers:
                    collapse[f"{key}/{name}"] = suite_nemt_collapsed(explainers["nemt"])
                # EMD on 32 x 32 sum-pooled maps: 0.015 s a map instead of 0.26 s, values within about 7e-4
                cfg = RunConfig(usable, list(SUITE_METRICS), batch_size, seed, metric_params,
                                {m: budgets[m] for m in usable})
                run_dir = out / "runs" / f"{key}-{name}"
                if restart:  # forget earlier results (the trained models are kept)
                    clear_run(run_dir)
                summary = run_benchmark(clf, data, explainers, cfg, run_dir, progress=progress)
                for m, s in summary.items():
                    rows.append({"scenario": scenario, "background": background, "model": name,
                                 "accuracy": acc, "method": m, "n": s["n_items"], "ms": s["ms"],
                                 **{k: s[k]["mean"] for k in SUITE_METRICS},
                                 **{f"{k}_ci": (s[k]["ci_low"], s[k]["ci_high"]) for k in SUITE_METRICS}})
    with atomic_open(out / "summary.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["scenario", "background", "model", "accuracy", "method", "n", "ms", *SUITE_METRICS])
        for r in rows:
            w.writerow([r["scenario"], r["background"], r["model"], f"{r['accuracy']:.3f}", r["method"], r["n"],
                        f"{r['ms']:.2f}", *(f"{r[k]:.4f}" for k in SUITE_METRICS)])
    table = suite_markdown(rows, methods, skipped, collapse)
    with atomic_open(out / "summary.md", "w", encoding="utf-8") as fh:
        fh.write(table)
    _suite_report(out, rows, methods, skipped, table, write_report)
    return table


def check_suite(methods: Sequence[str], params: dict[str, dict] | None, *,
                seed: int = 0) -> tuple[dict[str, dict], dict[str, dict]]:
    """The suite's methods and ``--param`` checked before any model is trained: every method known, every
    parameter one of a chosen method or of a suite metric (:data:`SUITE_METRICS`), each method built once with
    its budget (:data:`SUITE_PARAMS` and the given parameters) on an untrained suite CNN, so that a key or value
    it refuses is an error now, and the metrics' parameters checked as the benchmark checks them. Returns
    ({method: budget}, {metric: parameters}); the global random state is left as it was."""
    from nemt.bench.runner import _method_explainers, check_metric_params
    from nemt.explainers import available
    from nemt.ops import seeded

    unknown = [m for m in methods if m not in available()]
    if unknown:
        raise NemtError(f"unknown method(s) {unknown}; available: {available()}")
    params = dict(params or {})
    metric_params: dict[str, dict] = {"emd_score": {"max_side": 32}}  # EMD on 32 x 32 sum-pooled maps (see run_suite)
    for m in SUITE_METRICS:
        if m in params:
            metric_params[m] = {**metric_params.get(m, {}), **params.pop(m)}
    stray = [k for k in params if k not in methods]
    if stray:
        raise NemtError(f"--param for {stray}: neither a chosen method ({list(methods)}) nor a suite metric "
                        f"({list(SUITE_METRICS)})")
    check_metric_params(SUITE_METRICS, metric_params)
    budgets = {m: {**SUITE_PARAMS.get(m, {}), **params.get(m, {})} for m in methods}
    size = [64, 64]  # xaitris_splits' default size, which the suite trains at
    with seeded(seed):
        net = build_model("cnn", spatial_dims=2, in_channels=1, out_channels=2, input_size=size)
        clf = Classifier.from_module(net, spatial_dims=2, in_channels=1, input_size=size, task="multiclass",
                                     label_names=LABEL_NAMES, arch="cnn").eval()
        _method_explainers(methods, clf, budgets, seed=seed, device="cpu")
    return budgets, metric_params


def beats_references(rows: list[dict], metric: str = "top_k_precision") -> dict[str, list[str]]:
    """{method: ["scenario-background/model", ...]} where its mean beats random's and Sobel's on ``metric``."""
    wins: dict[str, list[str]] = {}
    keys = {(r["scenario"], r["background"], r["model"]) for r in rows}
    for key in sorted(keys):
        here = {r["method"]: r[metric] for r in rows if (r["scenario"], r["background"], r["model"]) == key}
        refs = [here[m] for m in ("random", "sobel") if m in here]
        for m, v in here.items():
            if m in REFERENCES:
                continue
            wins.setdefault(m, [])
            if refs and v > max(refs):
                wins[m].append(f"{key[0]}-{key[1]}/{key[2]}")
    return wins


def suite_markdown(rows: list[dict], methods: Sequence[str], skipped: Sequence[str],
                   collapse: dict[str, list[str] | None] | None = None) -> str:
    """Per metric a table: one row per method, one column per scenario-background/model; best in bold."""
    cols = sorted({(r["scenario"], r["background"], r["model"]) for r in rows},
                  key=lambda k: (k[0], k[1], XAITRIS_MODELS.index(k[2]) if k[2] in XAITRIS_MODELS else 9))
    parts = []
    for metric in SUITE_METRICS:
        head = ["method"] + [f"{s}-{b}/{m}" for s, b, m in cols]
        lines = [f"### {metric} (higher is better)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        best = {}
        for c in cols:
            vals = {r["method"]: r[metric] for r in rows if (r["scenario"], r["background"], r["model"]) == c}
            best[c] = max(vals, key=lambda k: vals[k]) if vals else None
        for m in methods:
            cells = [m]
            for c in cols:
                v = [r[metric] for r in rows if (r["scenario"], r["background"], r["model"]) == c and r["method"] == m]
                cells.append("" if not v else (f"**{v[0]:.3f}**" if best[c] == m else f"{v[0]:.3f}"))
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    wins = beats_references(rows)
    n_cols = len(cols)
    lines = ["### Which methods beat the random and Sobel baselines (top-|GT| precision)", ""]
    for m, where in wins.items():
        lines.append(f"- **{m}**: {len(where)} of {n_cols}" + (f" ({', '.join(where)})" if where else ""))
    if skipped:
        lines += ["", "Models below the accuracy threshold, not scored: " + "; ".join(skipped) + "."]
    if collapse:
        bad = {k: v for k, v in collapse.items() if v}
        unknown = [k for k, v in collapse.items() if v is None]
        lines += ["", f"NEMt collapse guard (validation split): {len(bad)} of {len(collapse)} fitted models collapsed"
                  + (" (" + "; ".join(f"{k}: {', '.join(v)}" for k, v in bad.items()) + ")" if bad else "")
                  + (f"; not checked (fitted without a validation split): {', '.join(unknown)}" if unknown else "")
                  + "."]
    parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _trained_as_asked(clf, train, seed: int, epochs: int) -> bool:
    """Whether a saved suite model was trained on these data (the generator's settings: scenario, background,
    seed, alpha, n, size), with this seed and epoch budget: only then is it reused."""
    want = json.loads(json.dumps({k: v for k, v in train.meta.items() if k != "split"}))
    data, training = clf.card.data or {}, clf.card.training or {}
    return (all(data.get(k) == v for k, v in want.items()) and training.get("seed") == seed
            and training.get("max_epochs") == epochs)


def _suite_report(out: Path, rows: list[dict], methods: Sequence[str], skipped: Sequence[str], table: str,
                  write_report) -> None:
    """report.html: one summary table per (scenario, background, model) block, via the runner's report writer."""
    summary = {}
    for r in rows:
        key = f"{r['scenario']}-{r['background']}/{r['model']}: {r['method']}"
        summary[key] = {"ms": r["ms"], "n_items": r["n"],
                        **{k: {"mean": r[k], "ci_low": r[f"{k}_ci"][0], "ci_high": r[f"{k}_ci"][1], "n": r["n"],
                               "n_excluded": 0} for k in SUITE_METRICS}}
    facts = {"suite": "XAI-TRIS (Clark et al. 2024): LIN, MULT, RIGID, XOR on WHITE and CORR backgrounds, 64 px",
             "scored": "correctly classified test samples, explained for their true class",
             "skipped": "; ".join(skipped) or "none"}
    write_report(out, summary, list(SUITE_METRICS), title="nemt benchmark: XAI-TRIS ground truth", facts=facts,
                 markdown=table, group=lambda key: key.split(": ")[0],
                 intro="Mean over the correctly classified test samples of each (scenario, background, model), "
                       "with a 95 % Student t interval; the best method of each setting highlighted per metric "
                       "(ties all).")
