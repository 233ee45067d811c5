"""The self-explaining model: ONNX and TorchScript give PyTorch's predictions and NEMt maps, metadata travels."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from nemt.cli import app
from nemt.data import Preprocessing, read_image
from nemt.deploy import (SelfExplainingModel, check_onnx, export_metadata, export_model, export_onnx,
                         export_torchscript, load_torchscript, read_onnx_metadata)
from nemt.deploy.export import check_torchscript, map_tolerance
from nemt.errors import NemtError
from nemt.explainers import NEMt, get_explainer
from nemt.models import Classifier, ModelCard, build_model, load_model

from conftest import train_and_fit

TOL = 1e-4


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A 1-epoch smallcnn and a 1-epoch NEMt on 32 px phantoms (through the CLI), both exported."""
    root = tmp_path_factory.mktemp("export")
    clf, images = train_and_fit(root)
    nemt = get_explainer("nemt", clf, path=root / "e")
    onnx_path = export_onnx(clf, nemt, root / "out" / "model.onnx")
    ts_path = export_torchscript(clf, nemt, root / "out" / "model.pt")
    x = torch.stack([clf.preprocessing(read_image(p)) for p in images[-6:]])  # phantom test images
    return dict(root=root, clf=clf, nemt=nemt, onnx=onnx_path, ts=ts_path, x=x, images=images)


def test_self_explaining_model_is_predict_plus_explain_all(fitted):
    clf, nemt, x = fitted["clf"], fitted["nemt"], fitted["x"]
    sem = SelfExplainingModel(clf, nemt)
    with torch.no_grad():
        probs, maps = sem(x)
    assert probs.shape == (6, 4) and maps.shape == (6, 4, 32, 32)
    assert torch.allclose(probs, clf.predict(x), atol=1e-6)
    assert torch.allclose(probs.sum(1), torch.ones(6), atol=1e-5)  # multiclass: softmax
    assert torch.allclose(maps, nemt.explain(x, target="all"), atol=1e-6)
    assert 0 <= maps.min() and maps.max() <= 1


def test_onnx_matches_pytorch_on_phantom_images(fitted):
    sem = SelfExplainingModel(fitted["clf"], fitted["nemt"])
    diffs = check_onnx(fitted["onnx"], fitted["x"], sem)
    tol = map_tolerance(fitted["nemt"], fitted["x"])  # the default, unsmoothed map: its steps' rounding bound
    assert diffs["outputs"] < TOL and diffs["maps"] < tol, (diffs, tol)


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_batch_axis(fitted, batch):
    """Traced with a batch of 2; other batch sizes run and match (ONNX and TorchScript)."""
    x = fitted["x"][:batch]
    sem = SelfExplainingModel(fitted["clf"], fitted["nemt"])
    import onnxruntime as ort
    sess = ort.InferenceSession(str(fitted["onnx"]), providers=["CPUExecutionProvider"])
    outputs, maps = sess.run(None, {"image": x.numpy()})
    assert outputs.shape == (batch, 4) and maps.shape == (batch, 4, 32, 32)
    tol = {"outputs": TOL, "maps": map_tolerance(fitted["nemt"], x)}
    for diffs in (check_onnx(fitted["onnx"], x, sem), check_torchscript(fitted["ts"], x, sem)):
        assert all(diffs[k] < tol[k] for k in tol), (diffs, tol)


def test_onnx_metadata_round_trip(fitted):
    clf, nemt = fitted["clf"], fitted["nemt"]
    meta = read_onnx_metadata(fitted["onnx"])
    assert meta == {**export_metadata(clf, nemt), "graph": "fast"}
    assert meta["labels"] == ["cyst", "nodule", "normal", "opacity"] and meta["task"] == "multiclass"
    assert meta["input_size"] == [32, 32] and meta["channels"] == 1
    card = ModelCard.from_dict(meta["model_card"])
    assert card.label_names == clf.card.label_names and card.weights_sha256 == clf.card.weights_sha256
    assert card.preprocessing == clf.card.preprocessing and card.arch == clf.card.arch
    assert "NaN" not in read_raw_metadata(fitted["onnx"])  # strict JSON: an undefined AUROC is null
    assert meta["explainer"]["kind"] == "NEMt"
    # the metadata alone rebuilds the model's input from a file
    norm = meta["normalisation"]
    pre = Preprocessing(size=meta["input_size"], channels=meta["channels"], scale=norm["scale"],
                        mean=norm["mean"], std=norm["std"])
    img = read_image(fitted["images"][0])
    assert torch.equal(pre(img), clf.preprocessing(img))


def read_raw_metadata(path) -> str:
    import onnx
    return " ".join(p.value for p in onnx.load(str(path)).metadata_props)


def test_torchscript_loads_with_metadata_and_matches(fitted):
    module, meta = load_torchscript(fitted["ts"])
    assert meta == {**export_metadata(fitted["clf"], fitted["nemt"]), "graph": "fast"}
    x = fitted["x"]
    with torch.no_grad():
        got = module(x)
        ref = SelfExplainingModel(fitted["clf"], fitted["nemt"])(x)
    for g, r in zip(got, ref):
        assert torch.allclose(g, r, atol=1e-6)


def test_export_model_checks_and_leaves_no_temporary_files(fitted):
    root = fitted["root"]
    out = root / "cli"
    for fmt, name in (("onnx", "a.onnx"), ("torchscript", "a.pt")):
        summary = export_model(root / "m", root / "e", out / name, format=fmt)
        diffs, tol = summary["max_abs_diff"], summary["tolerance"]
        assert summary["format"] == fmt and tol["outputs"] == TOL and all(diffs[k] <= tol[k] for k in tol)
    assert sorted(p.name for p in out.iterdir()) == ["a.onnx", "a.pt"]
    with pytest.raises(NemtError, match="onnx or torchscript"):
        export_model(root / "m", root / "e", out / "b.bin", format="tflite")


def test_export_refuses_bad_opsets_and_suffixes_and_keeps_no_file_that_fails_its_check(fitted, monkeypatch):
    """--opset outside what writes a valid graph (11 writes a Clip ONNX Runtime rejects; 99 does not exist) and
    a suffix that contradicts --format (or is unknown) are refused before anything is written; without
    --format the suffix decides; a file that the runtime refuses is removed, not left as if checked."""
    import nemt.deploy.export as E

    root = fitted["root"]
    out = root / "bad"
    lo, hi = E.opset_range()
    assert lo == 12 and hi >= 17
    for opset in (11, 99):
        with pytest.raises(NemtError, match=f"--opset {opset}: the ONNX export supports opsets 12 to"):
            export_model(root / "m", root / "e", out / "a.onnx", opset=opset)
    with pytest.raises(NemtError, match="a .onnx file is not torchscript"):
        export_model(root / "m", root / "e", out / "a.onnx", format="torchscript")
    with pytest.raises(NemtError, match="unknown suffix '.foo'"):
        export_model(root / "m", root / "e", out / "a.foo")
    with pytest.raises(NemtError, match="a: no suffix; use .onnx"):
        export_model(root / "m", root / "e", out / "a")
    assert not out.exists()
    assert export_model(root / "m", root / "e", out / "a.pt")["format"] == "torchscript"

    def refused(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : a made-up refusal\nmore detail")

    monkeypatch.setattr(E, "check_onnx", refused)
    with pytest.raises(NemtError, match="the runtime cannot run the exported model .*a made-up refusal"):
        export_model(root / "m", root / "e", out / "b.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["a.pt"]


def test_a_failed_or_interrupted_check_keeps_an_earlier_export_and_leaves_nothing(fitted, monkeypatch):
    """The export takes --out's name only once checked: a file the runtime refuses (or a check stopped by
    Ctrl-C) neither replaces an earlier export at that name nor leaves a temporary file behind."""
    import nemt.deploy.export as E

    root = fitted["root"]
    out = root / "keep"
    out.mkdir()
    (out / "m.onnx").write_bytes(b"an earlier export")

    def refused(path, *args, **kwargs):
        raise RuntimeError(f"[ONNXRuntimeError] : 10 : INVALID_GRAPH : Load model from {path} failed")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(E, "check_onnx", refused)
    with pytest.raises(NemtError, match=r"keep/m\.onnx: the runtime cannot run the exported model") as err:
        export_model(root / "m", root / "e", out / "m.onnx")
    assert f"Load model from {out / 'm.onnx'} failed" in str(err.value)  # the name given, not a temporary one
    monkeypatch.setattr(E, "check_torchscript", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_model(root / "m", root / "e", out / "m.pt")
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx"]
    assert (out / "m.onnx").read_bytes() == b"an earlier export"


def test_refuses_a_baseline_or_an_explainer_of_another_classifier(fitted):
    clf = fitted["clf"]
    with pytest.raises(NemtError, match="NEMt"):
        SelfExplainingModel(clf, get_explainer("gradcam", clf))
    other = load_model(fitted["root"] / "m")
    with pytest.raises(NemtError, match="another classifier"):
        SelfExplainingModel(other, fitted["nemt"])


def test_3d_multilabel_exports_the_plain_path(tmp_path):
    """3D: the ONNX exporter has no channels_last_3d, so the plain path is exported; outputs still match."""
    torch.manual_seed(0)
    net = build_model("smallcnn", spatial_dims=3, in_channels=1, out_channels=3, width=4)
    clf = Classifier.from_module(net, spatial_dims=3, in_channels=1, input_size=(16, 16, 16), task="multilabel",
                                 label_names=["a", "b", "c"], arch="smallcnn").eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 1, 16, 16, 16, generator=g), (torch.rand(4, 3, generator=g) > 0.5).float())]
    nemt = NEMt(clf, optimizer="adamw", batch_size=4, decoder_channels=(32, 16, 8, 8), seed=0)
    nemt.fit(data, epochs=1, progress=False, log=lambda s: None)
    export_onnx(clf, nemt, tmp_path / "m.onnx")
    export_torchscript(clf, nemt, tmp_path / "m.pt")
    x = torch.randn(3, 1, 16, 16, 16, generator=g)
    sem = SelfExplainingModel(clf, nemt)
    assert read_onnx_metadata(tmp_path / "m.onnx")["graph"] == "plain"
    tol = map_tolerance(nemt, x)
    for diffs in (check_onnx(tmp_path / "m.onnx", x, sem), check_torchscript(tmp_path / "m.pt", x, sem)):
        assert diffs["outputs"] < TOL and diffs["maps"] < tol, (diffs, tol)
    with torch.no_grad():
        probs, maps = sem(x)
    assert torch.allclose(probs, torch.sigmoid(clf(x)), atol=1e-6) and maps.shape == (3, 3, 16, 16, 16)
    assert np.isfinite(maps.numpy()).all()


def test_cli_export_onnx_and_torchscript(fitted):
    root = fitted["root"]
    runner = CliRunner()
    for fmt, name in (("onnx", "cli.onnx"), ("torchscript", "cli.pt")):
        res = runner.invoke(app, ["export", "--model", str(root / "m"), "--explainer", str(root / "e"),
                                  "--out", str(root / "cli" / name), "--format", fmt])
        assert res.exit_code == 0, res.output
        assert (root / "cli" / name).is_file()
    res = runner.invoke(app, ["export", "--model", str(root / "m"), "--explainer", str(root / "e"),
                              "--out", str(root / "cli" / "x.bin"), "--format", "tflite"])
    assert res.exit_code == 2


def test_smoothed_map_exports_within_1e_4(fitted, tmp_path):
    """The default unsmoothed map (the linear tie-break, min/max reductions) is held to
    :func:`map_tolerance` above, its steps being steep where nothing averages them; with
    ``map_smoothing=True`` the box averages the rounding, and the exported maps match PyTorch within 1e-4."""
    clf = fitted["clf"]
    nemt = get_explainer("nemt", clf, path=fitted["root"] / "e", map_smoothing=True)
    assert fitted["nemt"].map_smoothing is False  # the default
    path = export_onnx(clf, nemt, tmp_path / "s.onnx")
    diffs = check_onnx(path, fitted["x"], SelfExplainingModel(clf, nemt))
    assert diffs["outputs"] < TOL and diffs["maps"] < TOL, diffs
