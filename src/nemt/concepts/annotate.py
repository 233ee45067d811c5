"""What a layer's neurons detect: activations streamed per batch, a VLM's view of the same images, one rule.

>>> ann = annotate(clf, "stage4", dataset, vlm, read_concepts(DEFAULT_CONCEPTS), method="mammi")
>>> ann.rows()[0]            # {"neuron": "stage4:0", "status": "ok", "concepts": [["nodule", 0.41], ...], ...}
>>> ann.summary()            # {"nodule": ["stage4:3", ...], ...}

A neuron's value per image is the spatial mean of its channel at the layer
(a layer without spatial axes, e.g. the output logits, gives one value per
unit). When the layer's output is the model's output, neurons are named
after the model's labels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from nemt.concepts.methods import clip_dissect, cosine, dead_neurons, mammi
from nemt.concepts.vlm import VisionLanguageModel, image_embeddings
from nemt.errors import NemtError
from nemt.explainers.layers import FeatureTap
from nemt.ops import ParameterError, blame_shape, checked_input, evaluating, is_whole_number

__all__ = ["DEFAULT_CONCEPTS", "METHODS", "ConceptAnnotation", "annotate", "describe_left_out", "hit_rate",
           "layer_activations", "neuron_values", "probe_batches", "read_concepts"]

DEFAULT_CONCEPTS = Path(__file__).with_name("radiology_concepts.txt")
METHODS = ("mammi", "clip-dissect")
TEMPLATES = {"mammi": "a chest x-ray image of a", "clip-dissect": ""}


def read_concepts(path: str | Path) -> list[str]:
    """A concept file: one concept a line; blank lines and lines starting with # are skipped; repeats dropped."""
    p = Path(path)
    if not p.is_file():
        raise NemtError(f"concept file {p} not found")
    try:
        words = [ln.strip() for ln in p.read_text(encoding="utf-8-sig").splitlines()]
    except UnicodeDecodeError as exc:
        raise NemtError(f"concept file {p}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8, "
                        "one concept a line") from None
    out = list(dict.fromkeys(w for w in words if w and not w.startswith("#")))
    if not out:
        raise NemtError(f"concept file {p} lists no concepts")
    return out


def neuron_values(features: torch.Tensor) -> torch.Tensor:
    """(B, K, *spatial) -> (B, K): the spatial mean per channel; (B, K) stays as it is."""
    if features.ndim < 2:
        raise NemtError(f"a layer's output must be (B, K, ...), got shape {tuple(features.shape)}")
    return features.float().flatten(2).mean(2) if features.ndim > 2 else features.float()


def probe_batches(data: Any, batch_size: int = 32) -> Callable[[], Iterator[torch.Tensor]]:
    """A factory of model-input batches from a tensor (N, C, *spatial), a Dataset whose items are tensors
    or dicts with "image" (nemt's ImageDataset), or a list of batches (b, C, *spatial); each call iterates from the
    start. A list of single images (C, *spatial) is read as batches too: give ``torch.stack(images)``."""
    if not (is_whole_number(batch_size) and batch_size >= 1):
        raise ParameterError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    if torch.is_tensor(data):
        return lambda: (data[i:i + batch_size] for i in range(0, len(data), batch_size))
    if isinstance(data, (list, tuple)) and data and torch.is_tensor(data[0]) and data[0].ndim >= 3:
        return lambda: iter(data)

    def from_dataset() -> Iterator[torch.Tensor]:
        for s in range(0, len(data), batch_size):
            items = [data[i] for i in range(s, min(s + batch_size, len(data)))]
            yield torch.stack([it["image"] if isinstance(it, dict) else it for it in items])
    return from_dataset


@torch.no_grad()
def layer_activations(model: nn.Module, layer: str, batches: Iterator[torch.Tensor], *,
                      device: str | torch.device | None = None) -> tuple[torch.Tensor, bool]:
    """(N, K) neuron values at ``layer`` (a module name, as in ``model.net`` for a Classifier, or "output"),
    streamed batch by batch (only (N, K) is kept), and whether the layer's output is the model's output.

    Each batch is checked as the explainers check their input (:func:`nemt.ops.checked_input`: a floating tensor
    (b, C, *spatial) without NaN/inf, cast to the model's dtype); one the model cannot take (channel-last, another
    channel count or rank) is one error naming its shape and nemt's channel-first layout."""
    dev = torch.device(device) if device is not None else next(iter(model.parameters()), torch.zeros(0)).device
    rows, is_output = [], layer == "output"

    def checked(x):
        return checked_input(x, model, dev, use="concept annotation")

    with evaluating(model):
        if layer == "output":
            for x in batches:
                x = checked(x)
                with blame_shape(x):
                    rows.append(neuron_values(model(x)).cpu())
        else:
            with FeatureTap(model, [layer]) as tap:
                for i, x in enumerate(batches):
                    x = checked(x)
                    with blame_shape(x):
                        out = model(x)
                    f = tap.features[layer]
                    if i == 0:
                        is_output = torch.is_tensor(out) and f.shape == out.shape and torch.equal(f, out)
                    rows.append(neuron_values(f).cpu())
    if not rows:
        raise NemtError("the probe set is empty")
    return torch.cat(rows), is_output


@dataclass
class ConceptAnnotation:
    """Per neuron: ``labels`` [(concept, score)] best first (empty for dead or unlabelled neurons),
    ``status``, ``n_images`` (images the rule used) and ``top_images`` (probe indices, highest first);
    ``scores`` (K, C) the rule's score (soft-WPMI, or MAMMI's w_k(c)); ``activations`` (N, K); ``params``
    the prompt template, the VLM's name, the method's settings, ``unrepresented`` (the concepts left out: the
    VLM cannot represent them) and ``unknown`` (those of them with no word in the VLM's vocabulary; None when
    the VLM cannot tell, see :func:`describe_left_out`)."""

    method: str
    layer: str
    concepts: list[str]
    neurons: list[str]
    scores: torch.Tensor
    labels: list[list[tuple[str, float]]]
    status: list[str]
    n_images: list[int]
    top_images: torch.Tensor
    activations: torch.Tensor
    params: dict = field(default_factory=dict)

    def rows(self) -> list[dict]:
        out = []
        for k, name in enumerate(self.neurons):
            best = int(self.scores[k].argmax()) if self.scores.shape[1] else -1
            out.append({"neuron": name, "index": k, "status": self.status[k], "n_images": self.n_images[k],
                        "label": self.labels[k][0][0] if self.labels[k] else None,
                        "concepts": [[c, round(s, 6)] for c, s in self.labels[k]],
                        "best": self.concepts[best] if best >= 0 else None,
                        "best_score": round(float(self.scores[k, best]), 6) if best >= 0 else None,
                        "top_images": self.top_images[k].tolist()})
        return out

    def left_out(self, limit: int = 12) -> str:
        """The concepts left out because the VLM cannot represent them, and why, in one line ('' if none)."""
        return describe_left_out(self.params.get("unrepresented") or [], self.params.get("unknown"), limit)

    def summary(self) -> dict[str, list[str]]:
        """Concept -> the neurons whose label (first concept) it is, for concepts that label any neuron."""
        out: dict[str, list[str]] = {}
        for name, labels in zip(self.neurons, self.labels):
            if labels:
                out.setdefault(labels[0][0], []).append(name)
        return dict(sorted(out.items(), key=lambda kv: (-len(kv[1]), kv[0])))


def describe_left_out(unrepresented: Sequence[str], unknown: Sequence[str] | None, limit: int = 12) -> str:
    """The concepts a VLM cannot represent (a text vector of zero or the bare template's) in one line, '' for none.

    ``unknown``: those of them with no word in the VLM's vocabulary; it knows the others' words but never
    learnt them (the tiny CLIP's distractors: in its vocabulary, in no caption, so their vectors stay zero).
    None: the VLM cannot tell the two apart (a CLIP's tokenizer reads any word).
    """
    def listed(cs: Sequence[str]) -> str:
        return ", ".join(cs[:limit]) + (" ..." if len(cs) > limit else "")

    if not unrepresented:
        return ""
    head = f"{len(unrepresented)} concept{'' if len(unrepresented) == 1 else 's'} the VLM cannot represent"
    if unknown is None:
        return f"{head} (their text vector is zero or the bare template's): {listed(unrepresented)}"
    no_word = set(unknown)
    unlearnt = [c for c in unrepresented if c not in no_word]
    parts = []
    if unknown:
        parts.append(f"{len(unknown)} with no word in its vocabulary: {listed(unknown)}")
    if unlearnt:
        parts.append(f"{len(unlearnt)} whose words are in its vocabulary but were never learnt (a zero text vector "
                     f"or the bare template's, as the tiny CLIP's distractors): {listed(unlearnt)}")
    return f"{head}: {'; '.join(parts)}"


def annotate(model: nn.Module, layer: str, data: Any, vlm: VisionLanguageModel, concepts: Sequence[str], *,
             method: str = "mammi", template: str | None = None, batch_size: int = 32,
             device: str | torch.device | None = None, to_unit: Callable[[torch.Tensor], torch.Tensor] | None = None,
             n_top: int = 8, n_labels: int = 5, cache: str | Path | None = None, cache_key: str = "",
             **method_kwargs) -> ConceptAnnotation:
    """Annotate every neuron of ``layer`` with concepts (see the module docstring).

    ``data``: the probe set (see :func:`probe_batches`), as model inputs;
    ``to_unit`` maps a model-input batch to the [0, 1] images the VLM sees
    (default: the model's ``preprocessing.denormalise`` when it has one, else
    the batch as it is). ``template``: the prompt is ``f"{template} {concept}"``
    (default "a chest x-ray image of a" for MAMMI, as the paper; the bare word
    for CLIP-Dissect, as its authors' code); MAMMI also embeds the template
    alone. ``cache``: a .safetensors file for the image embeddings (reused for
    another layer or method when ``cache_key`` and the VLM match).
    ``method_kwargs`` go to :func:`~nemt.concepts.methods.mammi` or
    :func:`~nemt.concepts.methods.clip_dissect`.
    """
    if method not in METHODS:
        raise ParameterError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    concepts = list(concepts)
    if not concepts:
        raise ParameterError("no concepts given")
    if to_unit is None:
        pre = getattr(model, "preprocessing", None)
        to_unit = pre.denormalise if pre is not None else (lambda x: x)
    for name, v in (("n_top", n_top), ("n_labels", n_labels)):
        if not (is_whole_number(v) and v >= 1):
            raise ParameterError(f"{name} must be a whole number >= 1, got {v!r}")
    batches = probe_batches(data, batch_size)
    try:
        acts, is_output = layer_activations(model, layer, batches(), device=device)
    except ParameterError as exc:
        if isinstance(data, (list, tuple)) and "shape" in str(exc):
            raise ParameterError(f"{exc}; a list is read as a list of batches (b, C, *spatial): for a list of "
                                 "single images (C, *spatial) give torch.stack(data)") from exc
        raise
    if acts.shape[0] < 2:  # one image cannot show a neuron's activation vary: every neuron would read as dead
        raise ParameterError(f"concept annotation needs at least 2 probe images, got {acts.shape[0]}")
    emb = image_embeddings(vlm, (to_unit(x.cpu()).clamp(0, 1) for x in batches()), cache=cache, key=cache_key)
    if emb.shape[0] != acts.shape[0]:
        raise NemtError(f"{acts.shape[0]} activations but {emb.shape[0]} image embeddings (stale cache?)")
    template = TEMPLATES[method] if template is None else template
    prompts = [f"{template} {c}".strip() for c in concepts]
    text = _text_embeddings(vlm, prompts)
    # a concept the VLM cannot represent (a zero vector, or the bare template's) would tie with every other such
    # concept and win by list order: it is left out and reported, as a concept with no word in the VLM's
    # vocabulary or as one whose words it knows but never learnt (the tiny CLIP's distractors)
    blank = text.norm(dim=1) < 1e-8
    if template:
        blank |= cosine(text, _text_embeddings(vlm, [template]))[:, 0] > 1 - 1e-6
    unrepresented = [c for c, b in zip(concepts, blank.tolist()) if b]
    known_words = getattr(vlm, "known_words", None)  # a closed vocabulary only (a CLIP's tokenizer reads any word)
    unknown = [c for c in unrepresented if not known_words(c)] if callable(known_words) else None
    if len(unrepresented) == len(concepts):
        raise ParameterError(f"the VLM represents none of the concepts: {describe_left_out(unrepresented, unknown)}")
    if unrepresented:
        keep = (~blank).nonzero().flatten()
        concepts = [concepts[int(i)] for i in keep]
        text = text[keep]
    sim = cosine(emb, text)
    dead = dead_neurons(acts)
    if method == "mammi":
        tmpl = cosine(emb, _text_embeddings(vlm, [template]))[:, 0] if template else None
        res = mammi(acts, sim, tmpl, **method_kwargs)
        scores, status, n_images = res.weights, res.status, res.n_images.tolist()
        labels = [[(concepts[c], float(scores[k, c])) for c in sel[:n_labels]] for k, sel in enumerate(res.selected)]
    else:
        scores = clip_dissect(acts, sim, **method_kwargs)
        order = torch.argsort(scores, dim=1, descending=True)[:, :n_labels]
        status = ["dead" if bool(d) else "ok" for d in dead]
        labels = [[] if bool(dead[k]) else [(concepts[int(c)], float(scores[k, c])) for c in order[k]]
                  for k in range(scores.shape[0])]
        n_images = [min(int(method_kwargs.get("top_k", 100)), acts.shape[0])] * acts.shape[1]
    names = list(getattr(model, "label_names", []) or [])
    neurons = names if is_output and len(names) == acts.shape[1] else [f"{layer}:{k}" for k in range(acts.shape[1])]
    top = torch.topk(acts, min(n_top, acts.shape[0]), dim=0).indices.T
    return ConceptAnnotation(method, layer, concepts, neurons, scores, labels, status, n_images, top, acts,
                             params={"template": template, "vlm": getattr(vlm, "name", type(vlm).__name__),
                                     "unrepresented": unrepresented, "unknown": unknown, **method_kwargs})


def _text_embeddings(vlm: VisionLanguageModel, texts: list[str]) -> torch.Tensor:
    """The VLM's (len(texts), D) text embeddings as float32, or a NemtError when it gives NaN or inf."""
    text = vlm.encode_text(texts).float()
    bad = ~torch.isfinite(text).reshape(text.shape[0], -1).all(1) if text.ndim else ~torch.isfinite(text).reshape(1)
    if bool(bad.any()):
        which = [t for t, b in zip(texts, bad.tolist()) if b]
        raise NemtError(f"the vision-language model {getattr(vlm, 'name', type(vlm).__name__)!r} gave text embeddings "
                        f"with NaN or infinite values for {len(which)} of {len(texts)} prompts (first: {which[0]!r}); "
                        "scores of them would mean nothing")
    return text


def hit_rate(annotation: ConceptAnnotation, truth: dict[str, str]) -> float:
    """Share of the neurons named in ``truth`` whose label (first concept) is their true concept."""
    idx = {n: k for k, n in enumerate(annotation.neurons)}
    hits = [bool(annotation.labels[idx[n]]) and annotation.labels[idx[n]][0][0] == c for n, c in truth.items()]
    return sum(hits) / len(hits) if hits else float("nan")
