"""Vision-language models for concept annotation: the protocol, an oracle, adapters for local checkpoints.

A :class:`VisionLanguageModel` has ``encode_image(x)``: ``(N, C, *spatial)``
images in [0, 1] (what an overlay shows; each model resizes and normalises
them itself) to ``(N, D)``, and ``encode_text(texts)`` to ``(N, D)``, plus a
``name`` (recorded with cached embeddings). A model with a closed word list
(the tiny CLIP, the oracle) also has ``known_words(text)``, the text's words
in its vocabulary: concept annotation then tells a concept it has no word
for from one whose words it knows but never learnt (a CLIP's tokenizer
reads any word, so it has none). Nothing here downloads: real
models load only from a folder the user gives, and a missing folder or
package is an error that says how to supply it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from nemt.errors import NemtError
from nemt.files import atomic_path
from nemt.ops import nonfinite_problem

__all__ = ["HFCLIPAdapter", "OpenCLIPAdapter", "OracleVLM", "VisionLanguageModel", "image_embeddings",
           "load_vlm"]

_HOW = ("nemt never downloads weights: give a local folder (open_clip: open_clip_config.json and "
        "open_clip_model.safetensors; Hugging Face CLIP: config.json, model.safetensors and the tokenizer files; "
        "or a tiny CLIP saved by nemt), or 'tiny' to train nemt's tiny CLIP on phantoms")
_OPENAI_MEAN, _OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@runtime_checkable
class VisionLanguageModel(Protocol):
    name: str

    def encode_image(self, x: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor: ...


class OracleVLM:
    """Embeddings = one-hot codes of the findings: the exact answer, for tests.

    Dimension 0 is shared by every image and text; then one dimension per
    word of ``vocabulary``. An image's code is dimension 0 plus its findings'
    dimensions ("normal" when it has none), looked up by the image's content
    (8-bit quantised), so only the registered images can be encoded. A text's
    code is dimension 0 plus the dimensions of its words in the vocabulary:
    "a chest x-ray image of a nodule" has cosine 1/sqrt(2)·(1 + [nodule in x]) / |x|.
    """

    name = "oracle"

    def __init__(self, images: torch.Tensor | np.ndarray, findings: Sequence[Sequence[str]],
                 vocabulary: Sequence[str]):
        self.vocabulary = list(dict.fromkeys([*vocabulary, "normal"]))
        self.index = {w: i + 1 for i, w in enumerate(self.vocabulary)}
        self.codes: dict[str, torch.Tensor] = {}
        for x, f in zip(torch.as_tensor(np.asarray(images)), findings):
            self.codes[self._key(x)] = self._code(list(f) or ["normal"])

    def _code(self, words: Sequence[str]) -> torch.Tensor:
        v = torch.zeros(len(self.vocabulary) + 1)
        v[0] = 1.0
        for w in words:
            if w in self.index:
                v[self.index[w]] = 1.0
        return v

    @staticmethod
    def _key(x: torch.Tensor) -> str:
        q = torch.round(x.detach().float().cpu().clamp(0, 1) * 255).to(torch.uint8).numpy()
        return hashlib.sha1(q.tobytes() + str(q.shape).encode()).hexdigest()

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return torch.stack([self.codes[self._key(xi)] for xi in x])
        except KeyError:
            raise NemtError("the oracle VLM only knows the images it was built with") from None

    def known_words(self, text: str) -> list[str]:
        """The words of ``text`` in the vocabulary."""
        from nemt.concepts.tiny_clip import tokenize
        return [w for w in tokenize(text) if w in self.index]

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.stack([self._code(self.known_words(t)) for t in texts])


def _rgb(x: torch.Tensor, size: int, mean=_OPENAI_MEAN, std=_OPENAI_STD) -> torch.Tensor:
    """[0, 1] (N, C, H, W) images to a CLIP input: 3 channels, ``size`` square (bilinear), normalised."""
    if x.ndim != 4:
        raise NemtError(f"CLIP models take 2D images (N, C, H, W), got shape {tuple(x.shape)}")
    x = x.float()
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _need_folder(path: str | Path, files: Sequence[str]) -> Path:
    p = Path(path)
    missing = [f for f in files if not (p / f).is_file()]
    if not p.is_dir() or missing:
        raise NemtError(f"no vision-language model at {p} (missing {', '.join(missing) or 'the folder'}); {_HOW}")
    return p


def _need_package(module: str, pip: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise NemtError(f"this checkpoint needs the Python package {module!r}, which is not installed "
                        f"(pip install {pip}); {_HOW}") from None


class OpenCLIPAdapter:
    """An open_clip model from a local folder: ``open_clip_config.json`` + ``open_clip_model.safetensors``
    (the layout of open_clip's Hugging Face repositories). ``open_clip_torch`` must be installed."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        p = _need_folder(path, ["open_clip_config.json", "open_clip_model.safetensors"])
        open_clip = _need_package("open_clip", "open_clip_torch")
        from safetensors.torch import load_file

        cfg = json.loads((p / "open_clip_config.json").read_text())
        model_cfg, pre = cfg.get("model_cfg", cfg), cfg.get("preprocess_cfg", {})
        self.model = open_clip.CLIP(**model_cfg) if "embed_dim" in model_cfg else None
        if self.model is None:
            raise NemtError(f"{p / 'open_clip_config.json'} has no model_cfg with embed_dim")
        self.model.load_state_dict(load_file(str(p / "open_clip_model.safetensors")))
        self.model.to(device).eval()
        self.tokenizer = open_clip.tokenize  # the bundled BPE vocabulary (no download)
        size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
        self.size = int(size[0] if isinstance(size, (list, tuple)) else size)
        self.mean, self.std = tuple(pre.get("mean", _OPENAI_MEAN)), tuple(pre.get("std", _OPENAI_STD))
        self.device, self.name = torch.device(device), f"open_clip:{p.resolve()}"

    @torch.no_grad()
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(_rgb(x, self.size, self.mean, self.std).to(self.device)).float().cpu()

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float().cpu()


class HFCLIPAdapter:
    """A Hugging Face ``CLIPModel`` from a local folder (``config.json``, ``model.safetensors``, tokenizer
    files), read with ``local_files_only``. ``transformers`` must be installed."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        p = _need_folder(path, ["config.json", "model.safetensors"])
        tr = _need_package("transformers", "transformers")
        self.model = tr.CLIPModel.from_pretrained(str(p), local_files_only=True, use_safetensors=True)
        self.model.to(device).eval()
        self.tokenizer = tr.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        pre = json.loads((p / "preprocessor_config.json").read_text()) if (p / "preprocessor_config.json").is_file() else {}
        self.size = int(self.model.config.vision_config.image_size)
        self.mean = tuple(pre.get("image_mean", _OPENAI_MEAN))
        self.std = tuple(pre.get("image_std", _OPENAI_STD))
        self.device, self.name = torch.device(device), f"hf-clip:{p.resolve()}"

    @torch.no_grad()
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        pix = _rgb(x, self.size, self.mean, self.std).to(self.device)
        return self.model.get_image_features(pixel_values=pix).float().cpu()

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        return self.model.get_text_features(**tok).float().cpu()


def _tiny_settings(seed: int, size: int) -> dict:
    """What ``train_tiny_clip(size=size, seed=seed)`` records as ``trained_on`` (its other settings at their
    defaults), with the model's ``dim``: what a saved tiny CLIP must match to be reused for ``load_vlm("tiny")``."""
    import inspect

    from nemt.concepts.tiny_clip import train_tiny_clip
    from nemt.data.phantoms import FINDINGS

    d = {k: v.default for k, v in inspect.signature(train_tiny_clip).parameters.items()}
    return {"n": d["n"], "size": int(size), "epochs": d["epochs"], "seed": int(seed), "width": d["width"],
            "findings": list(d["findings"] or FINDINGS), "distractors": list(d["distractors"]), "dim": d["dim"]}


def _check_reuse(model, folder: Path, seed: int, size: int) -> None:
    """Refuse a tiny CLIP saved in ``folder`` that another seed or size (or other training settings) made:
    reusing it would report the asked seed for another model, and retraining would overwrite the user's folder."""
    want = _tiny_settings(seed, size)
    saved = getattr(model, "trained_on", None)
    got = dict(saved) if isinstance(saved, dict) else {}
    got["dim"] = model.dim
    diff = [k for k in want if got.get(k) != want[k]]
    if diff:
        def show(d: dict) -> str:
            return ", ".join(f"{k} {d.get(k, 'unknown')}" for k in ["seed", "size", *[k for k in diff
                                                                                     if k not in ("seed", "size")]])
        raise NemtError(f"{folder} holds a tiny CLIP trained with {show(got)}, not the asked {show(want)}: give "
                        f"another output folder (--out), or delete {folder} to train one with these settings")


def load_vlm(spec: str | Path, *, device: str | torch.device = "cpu", seed: int = 0, size: int = 48,
             cache_dir: str | Path | None = None) -> VisionLanguageModel:
    """``"tiny"`` (train nemt's tiny CLIP on phantoms, or reuse the one saved in ``cache_dir``) or a local
    folder: a saved tiny CLIP, an open_clip folder or a Hugging Face CLIP folder (see the adapters).

    A tiny CLIP in ``cache_dir`` is reused only when it was trained with this ``seed`` and ``size`` (and the
    other settings of :func:`~nemt.concepts.tiny_clip.train_tiny_clip` at their defaults, as ``"tiny"`` trains
    it); one made otherwise is refused, naming the folder, its settings and the asked ones (it is neither
    reused under the wrong seed nor overwritten)."""
    from nemt.concepts.tiny_clip import TinyCLIP, train_tiny_clip

    if str(spec) == "tiny":
        if cache_dir is not None and TinyCLIP.is_saved(cache_dir):
            model = TinyCLIP.load(cache_dir, device)
            _check_reuse(model, Path(cache_dir), seed, size)
            return model
        return train_tiny_clip(size=size, seed=seed, device=device, out_dir=cache_dir)
    p = Path(spec)
    if not p.exists():
        raise NemtError(f"vision-language model folder {p} does not exist; {_HOW}")
    if TinyCLIP.is_saved(p):
        return TinyCLIP.load(p, device)
    if (p / "open_clip_config.json").is_file():
        return OpenCLIPAdapter(p, device)
    if (p / "config.json").is_file():
        return HFCLIPAdapter(p, device)
    raise NemtError(f"{p} is not a vision-language model folder nemt can read; {_HOW}")


def image_embeddings(vlm: VisionLanguageModel, batches: Iterable[torch.Tensor], *,
                     cache: str | Path | None = None, key: str = "") -> torch.Tensor:
    """(N, D) image embeddings of the [0, 1] image ``batches``, streamed batch by batch.

    With ``cache`` (a .safetensors path) the embeddings are read from it when it
    was written for the same VLM name and ``key`` (e.g. a fingerprint of the
    probe set), else computed and written: reused across layers and methods.
    The embeddings must be finite: NaN or inf from the VLM (or in the cache) is a NemtError naming it.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    meta = {"vlm": str(getattr(vlm, "name", type(vlm).__name__)), "key": str(key)}
    if cache is not None and Path(cache).is_file():
        with safe_open(str(cache), "pt") as fh:
            if fh.metadata() == meta:
                emb = fh.get_tensor("image_embeddings")
                why = nonfinite_problem(emb) if emb.ndim == 2 else f"shape {tuple(emb.shape)}, not (N, D)"
                if why:
                    raise NemtError(f"{cache}: image_embeddings: {why}; delete the file to compute them again")
                return emb
    emb = torch.cat([vlm.encode_image(x).float().cpu() for x in batches])
    why = nonfinite_problem(emb)
    if why:
        raise NemtError(f"the vision-language model {meta['vlm']!r} gave image embeddings with {why}: scores of "
                        "them would mean nothing (are its inputs [0, 1] images?)")
    if cache is not None:
        with atomic_path(cache) as tmp:
            save_file({"image_embeddings": emb.contiguous()}, str(tmp), metadata=meta)
    return emb
