"""Concept annotation (issue 15): known answers of CLIP-Dissect and MAMMI, the VLMs, the phantom end to end.

The classifier, the tiny CLIP and the phantoms are built once per module (about half a minute on one CPU thread).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from nemt.concepts import (DISTRACTORS, OracleVLM, TinyCLIP, annotate, clip_dissect, concept_probabilities,
                           hit_rate, image_embeddings, load_vlm, mammi, read_concepts, soft_wpmi, train_tiny_clip)
from nemt.concepts.annotate import DEFAULT_CONCEPTS
from nemt.errors import NemtError

FINDINGS = ["nodule", "opacity", "cyst"]
CONCEPTS = ["normal", *FINDINGS, *DISTRACTORS, "lung", "heart"]
SIZE = 48


# ---------------------------------------------------------------------------- known answers on hand-made tensors

def _groups(k: int = 4, m: int = 6):
    """Images in k groups of m; neuron j fires on group j; P: image i is similar only to concept group(i)."""
    g = torch.arange(k).repeat_interleave(m)
    acts = torch.rand(k * m, k, generator=torch.Generator().manual_seed(0)) * 0.1
    acts[torch.arange(k * m), g] += 1.0 + torch.linspace(0, 0.5, k * m)
    sim = torch.nn.functional.one_hot(g, k).float() * 0.8 + 0.1
    return acts, sim, g


def test_identity_assignment_both_methods():
    acts, sim, _ = _groups()
    scores = clip_dissect(acts, sim, top_k=6)
    assert scores.argmax(1).tolist() == [0, 1, 2, 3]
    res = mammi(acts, sim, torch.full((len(sim),), 0.1))
    assert [s[0] for s in res.selected] == [0, 1, 2, 3] and res.status == ["ok"] * 4
    assert all(len(s) == 1 for s in res.selected)


def test_soft_wpmi_without_prior_and_full_weights_is_summed_log_probabilities():
    acts, sim, _ = _groups()
    probs = concept_probabilities(sim, alpha=2.0)  # probabilities far from 0: 1 + (q - 1) keeps float32 digits
    scores = soft_wpmi(acts, probs, top_k=5, lam=0.0, p_start=1.0, p_end=1.0)
    top = torch.topk(acts, 5, dim=0).indices.T
    expect = torch.stack([torch.log(probs[top[k]] + 1e-7).sum(0) for k in range(4)])
    assert torch.allclose(scores, expect, atol=1e-5)
    # lambda = 1 subtracts log p(c) = logsumexp over neurons - log K from every neuron alike
    full = soft_wpmi(acts, probs, top_k=5, lam=1.0, p_start=1.0, p_end=1.0)
    prior = torch.logsumexp(expect, 0) - math.log(4)
    assert torch.allclose(full, expect - prior, atol=1e-4)


def test_soft_wpmi_weights_fall_linearly():
    probs = torch.tensor([[0.5, 0.5]] * 3)
    acts = torch.tensor([[3.0], [2.0], [1.0]])
    got = soft_wpmi(acts, probs, top_k=3, lam=0.0)[0, 0]
    p = [0.998, 0.984, 0.97]
    assert float(got) == pytest.approx(sum(math.log(1 + pj * (0.5 - 1) + 1e-7) for pj in p), rel=1e-5)


def test_mammi_threshold_and_edge_cases():
    acts = torch.tensor([[0.0, 1.0, 5.0], [0.93, 1.0, 4.0], [0.94, 1.0, 3.0], [1.0, 1.0, 2.0]])
    sim = torch.tensor([[0.2, -0.1], [0.1, 0.3], [0.5, 0.0], [0.4, 0.1]])
    res = mammi(acts, sim)
    # neuron 0: min 0, max 1 -> images above 0.93: rows 2 and 3 (0.93 itself is not above)
    assert res.n_images.tolist()[0] == 2
    assert torch.allclose(res.weights[0], sim[2] + sim[3])
    assert res.selected[0] == [0] and res.status[0] == "ok"
    # neuron 1 is dead (max == min): no image, no concept
    assert res.status[1] == "dead" and res.selected[1] == [] and res.n_images[1] == 0
    assert torch.equal(res.weights[1], torch.zeros(2))
    # neuron 2: only row 0 passes (5 > 2 + 0.93 * 3); all scores negative after the template
    res = mammi(acts, sim, torch.full((4,), 0.6))
    assert res.status[2] == "no-positive-concept" and res.selected[2] == []
    assert (res.weights[2] < 0).all()
    # several concepts within 5 % of the best are kept, best first
    res = mammi(torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0, 0.0, 0.0], [0.97, 1.0, 0.5]]))
    assert res.selected[0] == [1, 0]


def test_concept_file_and_shipped_list(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("# comment\nnodule\n\ncyst\nnodule\n")
    assert read_concepts(p) == ["nodule", "cyst"]
    shipped = read_concepts(DEFAULT_CONCEPTS)
    assert len(shipped) >= 40 and "nodule" in shipped and "hypoechoic" in shipped
    with pytest.raises(NemtError):
        read_concepts(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("n\u00f3dulo\n".encode("latin-1"))
    with pytest.raises(NemtError, match="not UTF-8 text"):
        read_concepts(tmp_path / "latin1.txt")


def test_real_vlms_load_only_from_a_given_folder(tmp_path):
    with pytest.raises(NemtError, match="never downloads"):
        load_vlm(tmp_path / "nowhere")
    (tmp_path / "odd").mkdir()
    with pytest.raises(NemtError, match="not a vision-language model folder"):
        load_vlm(tmp_path / "odd")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(NemtError, match="model.safetensors"):
        load_vlm(hf)
    (hf / "model.safetensors").write_bytes(b"")
    try:
        import transformers  # noqa: F401
    except ImportError:
        with pytest.raises(NemtError, match="pip install transformers"):
            load_vlm(hf)
    oc = tmp_path / "oc"
    oc.mkdir()
    (oc / "open_clip_config.json").write_text("{}")
    (oc / "open_clip_model.safetensors").write_bytes(b"")
    try:
        import open_clip  # noqa: F401
    except ImportError:
        with pytest.raises(NemtError, match="pip install open_clip_torch"):
            load_vlm(oc)


def test_embedding_cache_is_reused(tmp_path):
    calls = []

    class Counting:
        name = "counting"

        def encode_image(self, x):
            calls.append(len(x))
            return x.flatten(1)[:, :4]

        def encode_text(self, texts):
            return torch.ones(len(texts), 4)

    x = torch.rand(6, 1, 4, 4)
    a = image_embeddings(Counting(), [x[:3], x[3:]], cache=tmp_path / "e.safetensors", key="k")
    b = image_embeddings(Counting(), [x[:3], x[3:]], cache=tmp_path / "e.safetensors", key="k")
    assert torch.equal(a, b) and calls == [3, 3]
    image_embeddings(Counting(), [x], cache=tmp_path / "e.safetensors", key="other")
    assert calls == [3, 3, 6]


# ---------------------------------------------------------------------------- phantoms end to end

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from nemt.data import ImageDataset, make_phantoms, write_phantom_dataset
    from nemt.data.manifest import open_dataset
    from nemt.models import TrainConfig, train_classifier

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("concepts")
    manifest_path = write_phantom_dataset(root / "data", 400, SIZE, seed=3)
    names = json.loads((root / "data" / "phantoms.json").read_text())["label_names"]
    manifest = open_dataset(manifest_path, labels=names)
    cfg = TrainConfig(arch="smallcnn", size=(SIZE, SIZE), epochs=25, batch_size=32, lr=3e-3, seed=0, augment=False,
                      arch_kwargs={"width": 8})  # about 20 s on one CPU thread
    clf, _ = train_classifier(manifest, root / "m", cfg, progress=False)
    probe = ImageDataset(manifest, clf.preprocessing, list(range(200)))
    ps = make_phantoms(400, SIZE, seed=3)[:200]
    units = torch.stack([probe.unit_item(i)[0] for i in range(len(probe))])
    findings = [[f for f, p in zip(ps.findings, row) if p] for row in ps.present]
    oracle = OracleVLM(units, findings, CONCEPTS)
    tiny = train_tiny_clip(n=400, size=SIZE, epochs=30, seed=0, out_dir=root / "tiny")
    return dict(root=root, clf=clf, probe=probe, oracle=oracle, tiny=tiny, manifest=manifest_path)


@pytest.mark.parametrize("method", ["mammi", "clip-dissect"])
def test_oracle_labels_every_output_neuron_with_its_class(world, method):
    ann = annotate(world["clf"], "fc", world["probe"], world["oracle"], CONCEPTS, method=method)
    assert ann.neurons == ["normal", *FINDINGS]
    assert hit_rate(ann, {f: f for f in FINDINGS}) == 1.0
    assert ann.labels[0][0][0] == "normal"
    chosen = {c for lab in ann.labels for c, _ in lab[:1]}
    assert not chosen & set(DISTRACTORS)
    # one probe image cannot show any neuron vary: refused, not a report of every neuron "dead"
    with pytest.raises(NemtError, match="at least 2 probe images, got 1"):
        annotate(world["clf"], "fc", world["probe"][0]["image"][None], world["oracle"], CONCEPTS, method=method)


def test_oracle_on_an_intermediate_layer_lists_neurons_per_finding(world):
    clf = world["clf"]
    flags = [(m, m.training) for m in clf.modules()]
    clf.train()
    grads = [p.requires_grad for p in clf.parameters()]
    rng = torch.get_rng_state()
    ann = annotate(clf, "stage4", world["probe"], world["oracle"], CONCEPTS, method="mammi")
    assert all(m.training for m in clf.modules()) and [p.requires_grad for p in clf.parameters()] == grads
    assert torch.equal(rng, torch.get_rng_state())
    for m, flag in flags:
        m.training = flag
    assert len(ann.neurons) == 64 and ann.neurons[0] == "stage4:0"
    summary = ann.summary()
    assert set(summary) <= {"normal", *FINDINGS} and set(summary) & set(FINDINGS)
    assert not {c for lab in ann.labels for c, _ in lab} & set(DISTRACTORS)


@pytest.fixture(scope="module")
def tiny_hits(world):
    hits, chosen = {}, set()
    for method in ("mammi", "clip-dissect"):
        ann = annotate(world["clf"], "fc", world["probe"], world["tiny"], CONCEPTS, method=method,
                       template="a chest x-ray image of a")
        hits[method] = hit_rate(ann, {f: f for f in FINDINGS})
        chosen |= {c for lab in ann.labels for c, _ in lab[:1]}
    print("tiny CLIP hit rates (3 finding classes):", hits)
    return hits, chosen


def test_tiny_clip_never_chooses_distractors(tiny_hits):
    assert not tiny_hits[1] & set(DISTRACTORS)


def test_tiny_clip_labels_most_finding_neurons(tiny_hits):
    assert max(tiny_hits[0].values()) >= 2 / 3


def test_tiny_clip_saves_and_loads(world, tmp_path):
    tiny = world["tiny"]
    again = load_vlm(world["root"] / "tiny")
    assert isinstance(again, TinyCLIP)
    x = torch.rand(2, 1, SIZE, SIZE)
    assert torch.allclose(tiny.encode_image(x), again.encode_image(x), atol=1e-6)
    assert torch.equal(again.encode_text(["fracture"]), torch.zeros(1, again.dim))  # never in a caption


def test_a_hand_edited_tiny_clip_card_is_refused_naming_the_field(world, tmp_path):
    """A tiny CLIP card without its vocab, or with a dim the weights do not have, is one clear error naming
    the file and the field, not a KeyError or a state-dict dump."""
    import json
    import shutil

    for edit, match in (({"vocab": None}, "vocab: need a non-empty list"), ({"dim": 7}, "does not fit the card"),
                        ({"width": "8"}, "width: need a positive integer")):
        d = tmp_path / f"t{len(list(tmp_path.iterdir()))}"
        shutil.copytree(world["root"] / "tiny", d)
        card = json.loads((d / "tiny_clip.json").read_text())
        card.update(edit)
        (d / "tiny_clip.json").write_text(json.dumps(card))
        with pytest.raises(NemtError, match=match) as info:
            TinyCLIP.load(d)
        assert "\n" not in str(info.value)


def test_cli_concepts(world):
    from typer.testing import CliRunner

    from nemt.cli import app

    out = world["root"] / "cli"
    res = CliRunner().invoke(app, ["concepts", "--model", str(world["root"] / "m"), "--layer", "stage4",
                                   "--data", str(world["manifest"]), "--vlm", str(world["root"] / "tiny"),
                                   "--method", "clip-dissect", "--out", str(out), "--limit", "120",
                                   "--sheets", "3", "--template", "a chest x-ray image of a"])
    assert res.exit_code == 0, res.output
    for name in ("neurons.json", "neurons.csv", "summary.json", "summary.csv", "report.html",
                 "cache/image_embeddings.safetensors"):
        assert (out / name).is_file(), name
    assert len(list((out / "sheets").glob("neuron_*.png"))) == 3
    rows = json.loads((out / "neurons.json").read_text())["neurons"]
    assert len(rows) == 64
    # the shipped list with the tiny CLIP: its distractors are left out as known words never learnt, not unknown
    params = json.loads((out / "neurons.json").read_text())["params"]
    unknown = params["unknown"]
    assert not set(DISTRACTORS) & set(unknown) and set(params["unrepresented"]) - set(unknown) == set(DISTRACTORS)
    assert all(not world["tiny"].known_words(c) for c in unknown) and "mass" in unknown
    said = " ".join(res.output.split())
    assert (f"{len(unknown)} with no word in its vocabulary: mass" in said
            and f"{len(DISTRACTORS)} whose words are in its vocabulary but were never learnt" in said), said
    page = (out / "report.html").read_text()
    assert "<h2>Summary</h2>" in page
    assert "Drawn for 3 of 64 neurons" in page and page.count("not drawn") == 61  # the empty cells say why
    res = CliRunner().invoke(app, ["concepts", "--model", str(world["root"] / "m"), "--layer", "stage4",
                                   "--data", str(world["manifest"]), "--vlm", "/no/such/vlm", "--out", str(out)])
    assert res.exit_code == 2 and "never downloads" in res.output
    res = CliRunner().invoke(app, ["concepts", "--model", str(world["root"] / "m"), "--layer", "nope",
                                   "--data", str(world["manifest"]), "--out", str(out / "bad-layer")])
    assert res.exit_code == 2 and "['nope'] not found" in res.output and not (out / "bad-layer").exists()
    # a misspelt method is refused before the model loads or the tiny CLIP trains (nothing written)
    res = CliRunner().invoke(app, ["concepts", "--model", str(world["root"] / "m"), "--layer", "stage4",
                                   "--data", str(world["manifest"]), "--vlm", "tiny", "--method", "clipdissect",
                                   "--out", str(out / "bad-method")])
    assert res.exit_code == 2 and "--method must be one of mammi, clip-dissect" in res.output
    assert not (out / "bad-method").exists()


def test_concepts_the_vlm_cannot_represent_are_left_out_not_tied():
    """Concepts without a known word embed like the bare template: they would tie and win by list order."""
    from nemt.concepts import annotate

    class Words:
        name = "words"

        def encode_image(self, x):
            return torch.eye(2)[torch.arange(x.shape[0]) % 2]

        def encode_text(self, texts):
            vocab = {"nodule": 0, "cyst": 1}
            out = torch.zeros(len(texts), 2)
            for i, t in enumerate(texts):
                for w in t.split():
                    if w in vocab:
                        out[i, vocab[w]] = 1.0
            return out

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    x = torch.zeros(8, 1, 4, 4)
    x[1::2] = 1.0  # odd images (the "cyst" ones for the VLM) light up the layer's channels
    ann = annotate(net, "output", x, Words(), ["pacemaker", "nodule", "fracture", "cyst"],
                   method="clip-dissect", to_unit=lambda t: t)
    assert ann.params["unrepresented"] == ["pacemaker", "fracture"]
    assert all(not lab or lab[0][0] in ("nodule", "cyst") for lab in ann.labels)
    # a VLM without a word list (as a CLIP's tokenizer, which reads any word) cannot say which words it lacks
    assert ann.params["unknown"] is None
    assert ann.left_out() == ("2 concepts the VLM cannot represent (their text vector is zero or the bare "
                              "template's): pacemaker, fracture")


def _net_and_probes():
    """A 1x1-conv layer of 2 channels and 8 probe images, half of them bright."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    x = torch.zeros(8, 1, 16, 16)
    x[1::2] = 1.0
    return net, x


def test_tiny_clip_distractors_are_known_words_never_learnt_not_unknown(tmp_path):
    """The tiny CLIP's distractors are in its vocabulary (in no caption, so their word vectors stay zero): a
    concept of them is left out as one whose words it knows but never learnt, never as an unknown word; only
    a concept with no word in the vocabulary is unknown. Before, both were reported alike ("no known word")."""
    from nemt.concepts.report import write_concept_report
    from nemt.ops import ParameterError

    torch.manual_seed(0)
    tiny = train_tiny_clip(n=64, size=32, epochs=1, seed=0)  # a fraction of a second: the vocabulary is what counts
    assert set(DISTRACTORS) <= set(tiny.vocab)
    assert tiny.known_words("a Fracture") == ["a", "fracture"] and tiny.known_words("pleural thickening") == []
    assert torch.equal(tiny.encode_text(["fracture", "mass"]), torch.zeros(2, tiny.dim))  # alike as vectors
    net, x = _net_and_probes()
    concepts = ["nodule", "fracture", "mass", "pacemaker", "pleural thickening", "cyst"]
    for method in ("mammi", "clip-dissect"):
        ann = annotate(net, "output", x, tiny, concepts, method=method, to_unit=lambda t: t)
        assert ann.concepts == ["nodule", "cyst"]
        assert ann.params["unrepresented"] == ["fracture", "mass", "pacemaker", "pleural thickening"]
        assert ann.params["unknown"] == ["mass", "pleural thickening"]
        assert ann.left_out() == (
            "4 concepts the VLM cannot represent: 2 with no word in its vocabulary: mass, pleural thickening; "
            "2 whose words are in its vocabulary but were never learnt (a zero text vector or the bare template's, "
            "as the tiny CLIP's distractors): fracture, pacemaker")
    page = write_concept_report(tmp_path, ann, title="t", facts={}).read_text()
    assert "Left out: 4 concepts" in page and "never learnt" in page and "fracture, pacemaker." in page
    # the oracle has a word list too: a concept of words outside it is unknown
    oracle = OracleVLM(x, [[], ["cyst"]] * 4, ["cyst", "fracture"])
    ann = annotate(net, "output", x, oracle, ["cyst", "fracture", "mass"], method="mammi", to_unit=lambda t: t)
    assert ann.params["unrepresented"] == ann.params["unknown"] == ["mass"]
    # nothing left: the error says which concepts are unknown and which only unlearnt
    with pytest.raises(ParameterError, match="1 with no word in its vocabulary: mass; 1 whose words are in its "
                                             r"vocabulary but were never learnt .*: fracture$"):
        annotate(net, "output", x, tiny, ["fracture", "mass"], method="mammi", to_unit=lambda t: t)
