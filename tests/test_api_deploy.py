"""Deployment's edges: the caller's modules, serve's start-up refusals and --param, the labels field, damaged
uploads, the exported model's batch of 0 and its example, and the export command's --out and --format."""
from __future__ import annotations

import gzip
import io
import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from typer.testing import CliRunner

from nemt.cli import app
from nemt.data import read_image
from nemt.deploy import SelfExplainingModel, export_onnx, export_torchscript, load_torchscript
from nemt.deploy.export import check_onnx, export_format, map_tolerance
from nemt.deploy import service
from nemt.deploy.service import build_explainers, create_app
from nemt.errors import DataError, NemtError
from nemt.explainers import get_explainer
from nemt.models import Classifier, build_model
from nemt.ops import ParameterError

from conftest import train_and_fit
from test_readers import make_dicom
from test_service import png_bytes, post

with warnings.catch_warnings():  # Starlette notes that its test client will move to httpx2
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A 1-epoch smallcnn and a 1-epoch NEMt on 32 px phantoms (through the CLI), and a service with NEMt and
    saliency."""
    root = tmp_path_factory.mktemp("deploy")
    clf, images = train_and_fit(root)
    nemt = get_explainer("nemt", clf, path=root / "e")
    with TestClient(create_app(clf, build_explainers(clf, root / "e", ["saliency"]))) as client:
        yield dict(root=root, clf=clf, nemt=nemt, images=images, client=client)


def small_model(labels, size: int = 16, task: str = "multiclass") -> Classifier:
    """An untrained smallcnn of ``size`` px with these label names (no fitting: baselines only)."""
    torch.manual_seed(0)
    net = build_model("smallcnn", spatial_dims=2, in_channels=1, out_channels=len(labels))
    return Classifier.from_module(net, spatial_dims=2, in_channels=1, input_size=(size, size), task=task,
                                  label_names=list(labels), arch="smallcnn").eval()


def grey(size: int = 16) -> bytes:
    return png_bytes(np.random.default_rng(0).integers(0, 255, (size, size), dtype=np.uint8))


@pytest.fixture
def no_server(monkeypatch):
    """uvicorn.run records the app instead of binding a port (a refusal must come before it)."""
    import uvicorn

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(app))
    return started


# -- 1: the caller's modules --------------------------------------------------------------------------------

def _state(clf) -> tuple:
    return ([m.training for m in clf.modules()], [p.requires_grad for p in clf.parameters()],
            torch.random.get_rng_state(), torch.get_num_threads())


def test_exports_and_the_self_explaining_model_leave_the_classifier_as_given(fitted, tmp_path):
    """A classifier handed over in training mode (and with some parameters frozen) stays so after
    SelfExplainingModel, export_onnx and export_torchscript; the exported model still answers as in eval mode."""
    clf, nemt = fitted["clf"], fitted["nemt"]
    x = torch.stack([clf.preprocessing(read_image(p)) for p in fitted["images"][-3:]])
    expected = clf.predict(x)
    params = list(clf.parameters())
    try:
        clf.train()
        params[0].requires_grad_(False)
        before = _state(clf)
        sem = SelfExplainingModel(clf, nemt)
        after = _state(clf)
        assert after[:2] == before[:2] and torch.equal(after[2], before[2]) and after[3] == before[3]
        with torch.no_grad():
            probs, _ = sem(x)
        assert torch.allclose(probs, expected, atol=1e-6)  # eval-mode answers from a training-mode classifier
        sem.train()
        sem.eval()
        assert _state(clf)[:2] == before[:2] and not sem.training
        for export in (export_onnx, export_torchscript):
            export(clf, nemt, tmp_path / ("m.onnx" if export is export_onnx else "m.pt"))
            after = _state(clf)
            assert after[:2] == before[:2] and torch.equal(after[2], before[2]), export.__name__
        assert all(m.training for m in clf.modules())
        clf.eval()
        diffs = check_onnx(tmp_path / "m.onnx", x, SelfExplainingModel(clf, nemt))
        assert diffs["outputs"] < 1e-4 and diffs["maps"] < map_tolerance(nemt, x), diffs
    finally:
        clf.eval()
        params[0].requires_grad_(True)


# -- 2, 3: what serve refuses at start-up, and --param ----------------------------------------------------------

def test_serve_refuses_a_method_that_must_be_fitted(fitted, no_server):
    clf, root = fitted["clf"], fitted["root"]
    with pytest.raises(NemtError, match="method 'nem' must be fitted"):
        build_explainers(clf, root / "e", ["nem"])
    res = CliRunner().invoke(app, ["serve", "--model", str(root / "m"), "--baselines", "nem"])
    assert res.exit_code == 2 and "method 'nem' must be fitted" in res.output, res.output
    assert not no_server


def test_serve_refuses_settings_that_cannot_work_at_the_models_size_and_takes_param(tmp_path, no_server):
    """A 16 px model: occlusion's default window and LIME's default cell cover the whole input. serve refuses
    them at start-up with the method's own reason (exit 2, no port bound); --param METHOD.KEY=VALUE sets them,
    and then every request is answered."""
    small_model(["a", "b", "c"]).save(tmp_path / "m16")
    runner = CliRunner()
    res = runner.invoke(app, ["serve", "--model", str(tmp_path / "m16"), "--baselines", "occlusion"])
    assert res.exit_code == 2 and "method 'occlusion' cannot explain this model's 16x16 inputs" in res.output
    assert "covers the whole input" in res.output and "--param occlusion.KEY=VALUE" in res.output, res.output
    res = runner.invoke(app, ["serve", "--model", str(tmp_path / "m16"), "--baselines", "occlusion,lime",
                              "--param", "occlusion.window=8"])
    assert res.exit_code == 2 and "method 'lime'" in res.output and "one superpixel" in res.output, res.output
    for bad, needle in ((["--param", "rise.n_masks=10"], "--param for ['rise']: not a method this service offers"),
                        (["--param", "occlusion.device=cuda"], "give the device with --device"),
                        (["--param", "window=8"], "expected METHOD.KEY=VALUE")):
        res = runner.invoke(app, ["serve", "--model", str(tmp_path / "m16"), "--baselines", "occlusion", *bad])
        assert res.exit_code == 2 and needle in res.output, res.output
    assert not no_server
    res = runner.invoke(app, ["serve", "--model", str(tmp_path / "m16"), "--baselines", "occlusion,lime",
                              "--param", "occlusion.window=8", "--param", "lime.cell=8"])
    assert res.exit_code == 0, res.output
    assert len(no_server) == 1
    with TestClient(no_server[0]) as c:
        for method in ("occlusion", "lime"):
            r = post(c, grey(), method=method)
            assert r.status_code == 200, r.text
    # the library refuses the same when the app is made
    clf = small_model(["a", "b", "c"])
    with pytest.raises(NemtError, match="covers the whole input"):
        create_app(clf, build_explainers(clf, None, ["occlusion"]))


# -- 4, 5, 11: the labels field ---------------------------------------------------------------------------------

def _labels(client, **fields):
    r = post(client, grey(), method="saliency", format="array", **fields)
    return r.status_code, (r.json()["labels"] if r.status_code == 200 else r.json()["detail"])


@pytest.mark.parametrize("keyword", ["predicted", "all"])
def test_a_label_named_like_a_keyword_is_422_alone_and_reachable_by_index_or_json(keyword):
    clf = small_model([keyword, "b", "c"])
    with TestClient(create_app(clf, build_explainers(clf, None, ["saliency"]))) as c:
        code, detail = _labels(c, labels=keyword)
        assert code == 422 and f"labels {keyword!r} is both a keyword and the name of label 0" in detail, detail
        assert _labels(c, labels="0") == (200, [keyword])
        assert _labels(c, labels=json.dumps([keyword])) == (200, [keyword])
        assert _labels(c, labels=f"c,{keyword}") == (200, ["c", keyword])  # in a list it is a name
        assert _labels(c) == (200, [keyword, "b", "c"])  # no field: every label


def test_labels_with_commas_or_spaces_are_named_by_a_json_list():
    names = ["left, upper", " pad", "right"]
    clf = small_model(names)
    with TestClient(create_app(clf, build_explainers(clf, None, ["saliency"]))) as c:
        assert _labels(c, labels=json.dumps(["left, upper", " pad"])) == (200, ["left, upper", " pad"])
        assert _labels(c, labels=json.dumps([2, "left, upper", 2])) == (200, ["right", "left, upper"])
        assert _labels(c, labels="right, 1") == (200, ["right", " pad"])  # the comma form: names or indices
        code, detail = _labels(c, labels="left, upper")
        assert code == 422 and """to name the label 'left, upper', send the JSON list ["left, upper"]""" in detail
        for bad, needle in (("[bad", "not a JSON list"), ("[]", "at least one"), ("[true]", "JSON list of label"),
                            ('{"a": 1}', "unknown label"), ("[3]", "unknown label(s) [3]"),
                            ('["pad"]', "unknown label(s) ['pad']")):
            code, detail = _labels(c, labels=bad)
            assert code == 422 and needle in detail, (bad, detail)


def test_labels_by_index_as_nemt_explain_target_reads_them(fitted, tmp_path):
    """Indices work as for ``nemt explain --target``; digits that name a label mean it when no output has that
    index, and are refused as ambiguous when the index is another label's, with the CLI's own reason."""
    c = fitted["client"]
    assert _labels(c, labels="0") == (200, ["cyst"])
    assert _labels(c, labels="3, nodule") == (200, ["opacity", "nodule"])
    code, detail = _labels(c, labels="4")
    assert code == 422 and "unknown label(s) ['4']" in detail and "indices 0 to 3" in detail
    names = ["1", "0", "9"]
    assert service.requested_labels("9", names) == [2]  # no output 9: the label "9"
    assert service.requested_labels("2", names) == [2]
    with pytest.raises(ParameterError, match="'1' is both this model's label 0 and the index of label '0'"):
        service.requested_labels("1", names)
    small_model(names).save(tmp_path / "m")
    (tmp_path / "x.png").write_bytes(grey())
    runner = CliRunner()
    for target, label in (("9", "9"), ("2", "9")):
        res = runner.invoke(app, ["explain", str(tmp_path / "x.png"), "--model", str(tmp_path / "m"), "--method",
                                  "saliency", "--target", target, "--out", str(tmp_path / "out")])
        assert res.exit_code == 0 and json.loads(res.stdout)[0]["targets"] == [label], res.output
    res = runner.invoke(app, ["explain", str(tmp_path / "x.png"), "--model", str(tmp_path / "m"), "--method",
                              "saliency", "--target", "1", "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "is both this model's label 0" in res.output


def test_a_repeated_form_field_is_422(fitted):
    c, data = fitted["client"], fitted["images"][0].read_bytes()
    for field, values in (("labels", ["cyst", "nodule"]), ("method", ["nemt", "saliency"])):
        r = c.post("/v1/explain", files={"file": ("a.png", data, "image/png")}, data={field: values})
        assert r.status_code == 422 and f"form field {field!r} is given more than once" in r.json()["detail"]
    r = c.post("/v1/explain", files=[("file", ("a.png", data, "image/png")), ("file", ("b.png", data, "image/png"))])
    assert r.status_code == 422 and "send one file" in r.json()["detail"]


def test_openapi_lists_the_400_answers_and_the_labels_rule(fitted):
    spec = fitted["client"].get("/openapi.json").json()
    post_ = spec["paths"]["/v1/explain"]["post"]
    assert "400" in post_["responses"] and "malformed" in post_["responses"]["400"]["description"]
    described = post_["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["labels"]
    assert "JSON list" in described["description"] and "indices" in described["description"]


# -- 9, 10: damaged and unsupported uploads ---------------------------------------------------------------------

def test_a_damaged_file_of_a_supported_format_is_422_and_an_unsupported_one_415(fitted, tmp_path):
    c = fitted["client"]
    png = fitted["images"][0].read_bytes()
    for n in (8, 16, 33, 40):
        r = post(c, png[:n], name="cut.png")
        assert r.status_code == 422, (n, r.text)
        assert r.json()["detail"].startswith("cut.png: header: a PNG file by its signature") and \
            "truncated or damaged" in r.json()["detail"]
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.normal(size=(16, 16, 16)).astype(np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    r = post(c, (tmp_path / "v.nii.gz").read_bytes()[:100], name="v.nii.gz")
    assert r.status_code == 422 and "v.nii.gz: header:" in r.json()["detail"] and "truncated" in r.json()["detail"]
    dcm = make_dicom(tmp_path / "a.dcm", np.zeros((32, 32), np.uint8)).read_bytes()
    r = post(c, dcm[:154], name="a.dcm")  # past the 'DICM' marker, mid-element in the file meta group
    assert r.status_code == 422 and "a.dcm: header: cannot parse DICOM" in r.json()["detail"], r.text
    # no signature of a supported format: unsupported, as before
    for content, name in ((b"hello, not an image\n" * 10, "text.png"), (gzip.compress(b"hello" * 50), "x.nii.gz"),
                          (b"GIF89a" + b"\0" * 100, "a.gif")):
        assert post(c, content, name=name).status_code == 415, name
    (tmp_path / "cut.png").write_bytes(png[:33])
    with pytest.raises(DataError) as err:
        read_image(tmp_path / "cut.png")
    assert err.value.field == "header" and "cut.png" in str(err.value)


def test_empty_pixel_data_and_a_float64_tiff_say_what_is_wrong(fitted, tmp_path):
    c = fitted["client"]
    make_dicom(tmp_path / "e.dcm", np.zeros((32, 32), np.uint8), pixel_bytes=b"")
    r = post(c, (tmp_path / "e.dcm").read_bytes(), name="e.dcm")
    assert r.status_code == 422 and r.json()["detail"] == "e.dcm: PixelData: no pixel data: the PixelData element " \
                                                          "is empty", r.text
    buf = io.BytesIO()
    PILImage.fromarray(np.zeros((32, 32), np.float32)).save(buf, format="TIFF")
    import tifffile
    f64 = io.BytesIO()
    tifffile.imwrite(f64, np.zeros((32, 32), np.float64))
    r = post(c, f64.getvalue(), name="f.tif")
    detail = r.json()["detail"]
    assert r.status_code == 415 and detail.startswith("f.tif: SampleFormat: a TIFF of 64-bit floating-point "
                                                      "samples"), detail
    assert post(c, buf.getvalue(), name="f32.tif").status_code == 200  # 32-bit float: read


# -- 6, 7, 8, 12, 14: the export --------------------------------------------------------------------------------

def test_export_refuses_an_out_below_a_file_up_front_and_takes_any_case_of_format(fitted, tmp_path):
    root = fitted["root"]
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "x.onnx"
    res = CliRunner().invoke(app, ["export", "--model", str(root / "m"), "--explainer", str(root / "e"),
                                   "--out", str(out), "--format", "ONNX"])
    assert res.exit_code == 2, res.output
    assert res.output.strip() == f"error: --out {out}: {tmp_path / 'afile'} is a file, not a folder", res.output
    with pytest.raises(NemtError, match="afile is a file, not a folder"):
        export_onnx(fitted["clf"], fitted["nemt"], out)
    assert (export_format("m.onnx", "ONNX"), export_format("m.PT", "TorchScript")) == ("onnx", "torchscript")
    with pytest.raises(NemtError, match="got 'TFLite'"):
        export_format("m.onnx", "TFLite")


def test_a_batch_of_0_gives_empty_outputs_in_pytorch_and_torchscript(fitted, tmp_path):
    clf, nemt = fitted["clf"], fitted["nemt"]
    empty = torch.zeros(0, 1, 32, 32)
    with torch.no_grad():
        for module in (SelfExplainingModel(clf, nemt),
                       load_torchscript(export_torchscript(clf, nemt, tmp_path / "m.pt"))[0]):
            outputs, maps = module(empty)
            assert outputs.shape == (0, 4) and maps.shape == (0, 4, 32, 32)
    import onnxruntime as ort  # the documented difference: ONNX Runtime refuses an empty batch
    sess = ort.InferenceSession(str(export_onnx(clf, nemt, tmp_path / "m.onnx")),
                                providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="Reshape"):
        sess.run(None, {"image": empty.numpy()})


def test_an_example_of_another_shape_is_refused(fitted, tmp_path):
    clf, nemt = fitted["clf"], fitted["nemt"]
    for export in (export_onnx, export_torchscript):
        for example, needle in ((torch.randn(2, 1, 48, 48), r"got shape \(2, 1, 48, 48\)"),
                                (torch.randn(0, 1, 32, 32), r"got shape \(0, 1, 32, 32\)"),
                                (torch.randn(2, 3, 32, 32), r"got shape \(2, 3, 32, 32\)"),
                                (torch.zeros(2, 1, 32, 32, dtype=torch.long), "got torch.int64")):
            with pytest.raises(ParameterError, match=r"example must be .*\(B, 1, 32, 32\) with B >= 1.*" + needle):
                export(clf, nemt, tmp_path / "w.onnx", example=example)
    assert not (tmp_path / "w.onnx").exists()
    export_torchscript(clf, nemt, tmp_path / "b1.pt", example=torch.randn(1, 1, 32, 32))  # any batch >= 1


def test_the_export_docs_say_what_a_1d_model_exports():
    import nemt.deploy.export as E

    assert "1D models" in E.__doc__ and "plain" in E.__doc__.split("1D models")[1][:120]


def test_the_service_refuses_a_signal_model_at_start_up():
    """Its uploads are images and volumes and its overlays pictures: a 1D model answered every request 500."""
    from nemt.deploy.service import ExplanationService
    from nemt.errors import NemtError
    from nemt.explainers import get_explainer
    from nemt.models import Classifier, build_model
    net = build_model("smallcnn", spatial_dims=1, in_channels=1, out_channels=3, width=4)
    clf = Classifier.from_module(net, spatial_dims=1, in_channels=1, input_size=(64,), task="multiclass",
                                 label_names=["a", "b", "c"]).eval()
    with pytest.raises(NemtError, match="takes 1D signals"):
        ExplanationService(clf, {"sobel": get_explainer("sobel", clf)})
