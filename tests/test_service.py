"""The explanation service through FastAPI's test client: every endpoint and every error path."""
from __future__ import annotations

import base64
import io
import tempfile
import threading
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image as PILImage

from nemt.data import read_image
from nemt.deploy.service import build_explainers, colormap_lut, create_app, decode_map, overlay
from nemt.errors import NemtError

from conftest import train_and_fit

with warnings.catch_warnings():  # Starlette notes that its test client will move to httpx2
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

LABELS = ["cyst", "nodule", "normal", "opacity"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A 1-epoch smallcnn and NEMt on 32 px phantoms, and a service with NEMt and Grad-CAM++."""
    root = tmp_path_factory.mktemp("service")
    clf, images = train_and_fit(root)
    explainers = build_explainers(clf, root / "e", ["gradcam++"])
    return dict(root=root, clf=clf, explainers=explainers, images=images)


@pytest.fixture(scope="module")
def client(env):
    with TestClient(create_app(env["clf"], env["explainers"])) as c:
        yield c


@pytest.fixture
def upload_root(tmp_path, monkeypatch):
    """The temporary root the service puts upload folders in (checked empty after each request)."""
    root = tmp_path / "uploads"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def post(client, content: bytes, name: str = "a.png", **fields):
    return client.post("/v1/explain", files={"file": (name, content, "application/octet-stream")},
                       data={k: str(v) for k, v in fields.items()})


def png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(b64: str) -> np.ndarray:
    return np.asarray(PILImage.open(io.BytesIO(base64.b64decode(b64))))


def dicom_bytes(path: Path, a: np.ndarray | None, *, sop_class: str | None = None, modality: str = "OT") -> bytes:
    """A minimal uncompressed 8-bit grey DICOM; (F, H, W) gives a multi-frame file; ``a`` None: an object of
    ``sop_class`` without an image (its header only)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class or SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    if a is None:
        ds.save_as(path, enforce_file_format=True)
        return path.read_bytes()
    ds.Rows, ds.Columns = a.shape[-2:]
    if a.ndim == 3:
        ds.NumberOfFrames = a.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = a.astype(np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def _json_safe(v):
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return None if isinstance(v, float) and v != v else v


# -- GET endpoints ----------------------------------------------------------------------------------------

def test_the_service_leaves_the_callers_training_flags_alone(env, upload_root):
    """A model handed over in training mode is explained in eval mode (the same predictions as the module
    fixture's eval-mode service) and handed back in training mode."""
    clf = env["clf"]
    path = env["images"][0]
    x = clf.preprocessing(read_image(path))[None]
    expected = clf.eval().predict(x)[0]
    clf.train()
    try:
        with TestClient(create_app(clf, env["explainers"])) as c:
            r = post(c, path.read_bytes(), name=path.name)
        assert r.status_code == 200, r.text
        assert all(m.training for m in clf.modules())
        assert np.allclose([r.json()["predictions"][n] for n in LABELS], expected.numpy(), atol=1e-6)
    finally:
        clf.eval()


def test_health(client):
    assert client.get("/health").json() == {"status": "ok", "active": 0, "capacity": 18, "receiving": 0}


def test_model_card_methods_and_colormap(client, env):
    info = client.get("/v1/model").json()
    assert info["card"] == _json_safe(env["clf"].card.to_dict())  # JSON has no NaN: an undefined AUROC is null
    assert info["labels"] == LABELS and info["task"] == "multiclass"
    assert info["methods"] == ["nemt", "gradcam++"] and info["default_method"] == "nemt"
    assert info["input_size"] == [32, 32] and info["channels"] == 1
    assert info["limits"] == {"max_upload_bytes": 20 * 1024 * 1024, "max_pixels": 50_000_000, "body_timeout_s": 30.0,
                              "max_receiving": 64, "workers": 2, "queue": 16}
    lut = np.array(info["colormap"]["lut"])
    assert lut.shape == (256, 3) and lut.min() >= 0 and lut.max() <= 255


def test_openapi_documents_the_form_and_the_errors(client):
    spec = client.get("/openapi.json").json()
    assert {"/health", "/v1/model", "/v1/explain"} <= set(spec["paths"])
    post_ = spec["paths"]["/v1/explain"]["post"]
    form = post_["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(form["properties"]) == {"file", "labels", "method", "format", "alpha"} and form["required"] == ["file"]
    assert "predicted" in form["properties"]["labels"]["description"]  # labels=predicted, as explain --target
    assert {"200", "408", "413", "415", "422", "503"} <= set(post_["responses"])
    assert "ExplainResponse" in spec["components"]["schemas"]
    assert client.get("/docs").status_code == 404  # Swagger UI would load its scripts from a CDN


def test_viewer_is_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'src="static/viewer.js"' in page.text and "http" not in page.text.split("<body")[1]  # no CDN
    for name, kind in (("viewer.js", "javascript"), ("viewer.css", "css")):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]


# -- POST /v1/explain -------------------------------------------------------------------------------------

def test_explain_png_default_nemt_all_labels(client, env, upload_root):
    path = env["images"][0]
    r = post(client, path.read_bytes(), name=path.name)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["method"] == "nemt" and body["labels"] == LABELS and list(body["explanations"]) == LABELS
    clf = env["clf"]
    x = clf.preprocessing(read_image(path))[None]
    probs = clf.predict(x)[0]
    assert np.allclose([body["predictions"][n] for n in LABELS], probs.numpy(), atol=1e-6)
    assert body["predicted"] == [LABELS[int(probs.argmax())]]
    for entry in body["explanations"].values():
        assert entry["map"] is None and decode_png(entry["overlay_png"]).shape == (32, 32, 3)
    assert decode_png(body["image"]["png"]).shape == (32, 32)
    assert body["image"]["filename"] == path.name and body["image"]["shape"] == [1, 32, 32]
    assert set(body["ms"]) == {"receive", "queue", "read", "predict", "explain", "encode", "total"}
    assert all(v >= 0 for v in body["ms"].values())
    assert list(upload_root.iterdir()) == []  # the upload folder is gone
    assert body["prototypes"] is None  # only a prototype model (Pantypes) adds its prototypes
    assert body["notes"] == []  # a training image: nothing unlike the training images


def test_nemt_requests_run_the_classifier_once(client, env):
    """NEMt's own pass gives the predictions: the classifier runs once per request, not twice."""
    path, clf = env["images"][3], env["clf"]
    calls = []
    handle = clf.register_forward_hook(lambda *_: calls.append(1))
    try:
        body = post(client, path.read_bytes(), name=path.name, labels="nodule").json()
    finally:
        handle.remove()
    assert len(calls) == 1
    probs = clf.predict(clf.preprocessing(read_image(path))[None])[0]
    assert np.allclose([body["predictions"][n] for n in LABELS], probs.numpy(), atol=1e-6)
    assert body["ms"]["predict"] == 0


def test_explain_raw_maps_equal_the_explainer_and_overlay_is_the_documented_blend(client, env):
    path = env["images"][1]
    r = post(client, path.read_bytes(), name=path.name, format="both", alpha=0.3)
    assert r.status_code == 200, r.text
    body = r.json()
    clf, nemt = env["clf"], env["explainers"]["nemt"]
    unit = clf.preprocessing.resize(clf.preprocessing.unit_scale(read_image(path)))
    maps = nemt.explain(clf.preprocessing.normalise(unit)[None], target="all")[0].numpy()
    lut = colormap_lut()
    for i, name in enumerate(LABELS):
        entry = body["explanations"][name]
        got = decode_map(entry["map"])
        assert got.shape == (32, 32) and np.allclose(got, maps[i], atol=1e-6)
        assert np.array_equal(decode_png(entry["overlay_png"]), overlay(unit.numpy(), maps[i], 0.3, lut))
    # alpha 0 shows the image alone
    r0 = post(client, path.read_bytes(), name=path.name, alpha=0, labels="cyst").json()
    grey = decode_png(r0["image"]["png"])
    assert np.array_equal(decode_png(r0["explanations"]["cyst"]["overlay_png"]), np.repeat(grey[..., None], 3, -1))


def test_explain_baseline_some_labels_in_order_as_arrays(client, env):
    path = env["images"][2]
    r = post(client, path.read_bytes(), name=path.name, method="gradcam++", labels=" normal,cyst,normal",
             format="array")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["method"] == "gradcam++" and body["labels"] == ["normal", "cyst"]
    assert list(body["explanations"]) == ["normal", "cyst"]
    assert all(e["overlay_png"] is None and decode_map(e["map"]).shape == (32, 32)
               for e in body["explanations"].values())


def test_explain_labels_predicted_is_the_top_output(client, env):
    """``labels=predicted`` explains what ``nemt explain --target predicted`` would: the model's top output,
    with the same map as asking for that label by name."""
    from nemt.ops import resolve_targets

    clf = env["clf"]
    for path in env["images"][:4]:
        body = post(client, path.read_bytes(), name=path.name, labels="predicted", format="array").json()
        x = clf.preprocessing.normalise(clf.preprocessing.unit(read_image(path)))[None]
        top = LABELS[int(resolve_targets("predicted", clf, x)[0, 0])]
        assert body["labels"] == [top] == body["predicted"] and list(body["explanations"]) == [top]
        named = post(client, path.read_bytes(), name=path.name, labels=top, format="array").json()
        assert np.array_equal(decode_map(body["explanations"][top]["map"]),
                              decode_map(named["explanations"][top]["map"]))


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_labels_predicted_explains_what_nemt_explain_target_predicted_does(tmp_path, task):
    """``labels=predicted`` and ``nemt explain --target predicted`` choose the same labels (the one logic,
    :func:`nemt.ops.resolve_targets`) and give the same maps. For a multi-label model that is the top output,
    one label, as explain chooses it, not the response's ``predicted`` list (labels at p >= 0.5): here two
    labels are above 0.5."""
    import json

    import torch
    from typer.testing import CliRunner

    from nemt.cli import app
    from nemt.models import Classifier, build_model, load_model

    torch.manual_seed(0)
    net = build_model("smallcnn", spatial_dims=2, in_channels=1, out_channels=3)
    with torch.no_grad():
        net.fc.bias.copy_(torch.tensor([1.0, 2.0, -1.0]))  # sigmoid 0.73, 0.88, 0.27: "b" on top, "a" above 0.5
    Classifier.from_module(net, spatial_dims=2, in_channels=1, input_size=(16, 16), task=task,
                           label_names=["a", "b", "c"], arch="smallcnn").save(tmp_path / "m")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"img{i}.png")
        PILImage.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(paths[-1])
    res = CliRunner().invoke(app, ["explain", *map(str, paths), "--model", str(tmp_path / "m"), "--method",
                                   "saliency", "--target", "predicted", "--out", str(tmp_path / "x")])
    assert res.exit_code == 0, res.output
    cli = json.loads(res.stdout)
    clf = load_model(tmp_path / "m")
    with TestClient(create_app(clf, build_explainers(clf, None, ["saliency"]))) as c:
        for path, rec in zip(paths, cli):
            r = post(c, path.read_bytes(), name=path.name, labels="predicted", method="saliency", format="array")
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["labels"] == rec["targets"] == ["b"] and list(body["explanations"]) == ["b"]
            assert body["predicted"] == (["a", "b"] if task == "multilabel" else ["b"])
            assert np.allclose(decode_map(body["explanations"]["b"]["map"]),
                               np.load(tmp_path / "x" / f"{rec['files'][0]}.npy"), atol=1e-6)


def test_explain_jpeg_dicom_and_grey_stored_as_rgb(client, env, tmp_path):
    grey = np.asarray(PILImage.open(env["images"][3]))
    buf = io.BytesIO()
    PILImage.fromarray(grey).save(buf, format="JPEG", quality=95)
    r = post(client, buf.getvalue(), name="x.jpg")
    assert r.json()["image"]["modality"] == "jpeg" and r.json()["notes"] == []  # 8-bit, as the training PNGs
    r = post(client, dicom_bytes(tmp_path / "x.dcm", grey), name="x.dcm")
    assert r.status_code == 200 and r.json()["image"]["modality"] == "dicom"
    # no window: scaled by its own min..max, where the card records the training PNGs' fixed 0..255: said
    assert ["its own minimum and maximum" in n for n in r.json()["notes"]] == [True]
    # the same grey image in an RGB file is grey, not colour: accepted
    r = post(client, png_bytes(np.repeat(grey[..., None], 3, -1)), name="rgb.png")
    assert r.status_code == 200 and r.json()["image"]["shape"] == [3, 32, 32]
    # a DICOM upload whose name has no suffix is still found by its magic bytes
    assert post(client, dicom_bytes(tmp_path / "y.dcm", grey), name="IM0001").status_code == 200


# -- errors -----------------------------------------------------------------------------------------------

def test_oversized_upload_is_413_by_header_and_by_count(env, upload_root):
    with TestClient(create_app(env["clf"], env["explainers"], max_upload_bytes=2000)) as small:
        big = env["images"][0].read_bytes() + b"\0" * 4000
        r = post(small, big)
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        # chunked, with no Content-Length: counted while reading
        boundary = "nemtboundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + big + f"\r\n--{boundary}--\r\n".encode()
        chunks = (body[i:i + 512] for i in range(0, len(body), 512))
        r = small.post("/v1/explain", content=chunks,
                       headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        assert post(small, b"x" * 100, name="a.png").status_code == 415  # small enough to be read
    assert list(upload_root.iterdir()) == []


def test_truncated_png_is_422_with_the_reason(client, env, upload_root):
    data = env["images"][0].read_bytes()
    r = post(client, data[: len(data) // 2], name="cut.png")
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail.startswith("cut.png: pixels:") and "truncated" in detail
    assert str(upload_root) not in detail  # the server's temporary path is never shown
    assert list(upload_root.iterdir()) == []


def test_dicom_object_without_an_image_is_415(client, tmp_path):
    """A structured report or an RT structure set is a DICOM file, but no kind of image nemt reads: 415 with
    its object class named, as for any unsupported format (it was 422, as if it were a damaged image)."""
    from pydicom.uid import RTStructureSetStorage

    rt = dicom_bytes(tmp_path / "rt.dcm", None, sop_class=RTStructureSetStorage, modality="RTSTRUCT")
    r = post(client, rt, name="rt.dcm")
    assert r.status_code == 415 and "RT Structure Set Storage" in r.json()["detail"], r.text


def test_text_file_named_dcm_is_415(client, upload_root):
    r = post(client, b"this is a text file, not a DICOM image\n" * 10, name="notes.dcm")
    assert r.status_code == 415
    assert r.json()["detail"].startswith("notes.dcm: file: not a DICOM file")
    r = post(client, b"GIF89a" + b"\0" * 100, name="anim.gif")
    assert r.status_code == 415 and "unsupported format" in r.json()["detail"]
    assert list(upload_root.iterdir()) == []


def test_colour_image_for_a_grey_model_is_422(client):
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[8:24, 8:24, 2] = 255
    r = post(client, png_bytes(rgb), name="colour.png")
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "colour.png: channels:" in detail and "3 channels" in detail and "takes 1" in detail


def test_volume_for_a_2d_model_is_422(client, tmp_path):
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 16)).astype(np.float32), np.eye(4)),
             tmp_path / "v.nii.gz")
    r = post(client, (tmp_path / "v.nii.gz").read_bytes(), name="v.nii.gz")
    assert r.status_code == 422 and "is 3D" in r.json()["detail"] and "takes 2D" in r.json()["detail"]
    frames = np.random.default_rng(0).integers(0, 255, (4, 32, 32))
    r = post(client, dicom_bytes(tmp_path / "mf.dcm", frames), name="mf.dcm")
    assert r.status_code == 422 and "is 3D (4x32x32)" in r.json()["detail"]


@pytest.mark.parametrize("fields,needle", [
    ({"labels": "nodule,tumour"}, "unknown label(s) ['tumour']"),
    ({"labels": ","}, "unknown label(s)"),
    ({"method": "lime-xl"}, "unknown method 'lime-xl'; this service offers ['nemt', 'gradcam++']"),
    ({"format": "jpeg"}, "unknown format 'jpeg'"),
    ({"alpha": "2"}, "alpha must be a number in [0, 1]"),
    ({"alpha": "half"}, "alpha must be a number in [0, 1]"),
    ({"label": "cyst"}, "unknown form field(s) ['label']"),
])
def test_bad_form_fields_are_422(client, env, fields, needle):
    r = post(client, env["images"][0].read_bytes(), **fields)
    assert r.status_code == 422 and needle in r.json()["detail"], r.text


def test_missing_empty_or_not_multipart_upload(client):
    r = client.post("/v1/explain", data={"labels": "all"}, files={"other": ("x.png", b"abc", "image/png")})
    assert r.status_code == 422 and "send one file, in the form field 'file'" in r.json()["detail"]
    r = client.post("/v1/explain", data={"labels": "all"}, files={})
    assert r.status_code == 415  # an urlencoded form is not multipart
    r = client.post("/v1/explain", files={"labels": (None, "all")})
    assert r.status_code == 422 and "no file" in r.json()["detail"]
    r = post(client, b"", name="empty.png")
    assert r.status_code == 422 and "empty" in r.json()["detail"]
    r = client.post("/v1/explain", json={"file": "abc"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]


def test_full_queue_is_503_with_retry_after_and_a_burst_queues(env, upload_root):
    """One worker, no queue: while a request holds the worker, the next is refused at once."""
    data = env["images"][0].read_bytes()
    with TestClient(create_app(env["clf"], env["explainers"], workers=1, queue=0)) as c:
        service = c.app.state.service
        results = []
        with service.compute:  # hold the model: the first request waits inside its worker
            first = threading.Thread(target=lambda: results.append(post(c, data)))
            first.start()
            deadline = time.monotonic() + 10
            while service.active < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            r = post(c, data)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert "busy" in r.json()["detail"]
            assert c.get("/health").json() == {"status": "ok", "active": 1, "capacity": 1, "receiving": 0}
        first.join(10)
        assert results[0].status_code == 200
        assert c.get("/health").json()["active"] == 0
    # with a queue, a burst of 6 from 6 threads is served in full
    with TestClient(create_app(env["clf"], env["explainers"], workers=2, queue=4)) as c:
        codes = []
        threads = [threading.Thread(target=lambda: codes.append(post(c, data).status_code)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert codes == [200] * 6
    assert list(upload_root.iterdir()) == []


def test_uploads_live_only_in_a_temporary_folder(client, env, upload_root, monkeypatch):
    import nemt.deploy.service as service

    seen = []

    def spy(path, **kw):
        seen.append((Path(path), sorted(p.name for p in Path(path).parent.iterdir())))
        return read_image(path, **kw)
    monkeypatch.setattr(service, "read_image", spy)
    assert post(client, env["images"][0].read_bytes(), name="../../etc/passwd.png").status_code == 200
    path, listing = seen[0]
    assert path.parent.parent == upload_root and path.parent.name.startswith("nemt-upload-")
    assert path.name == "upload.png" and listing == ["upload.png"]  # the client's name is not used on disk
    assert not path.parent.exists()


def test_build_explainers_needs_something_to_serve(env):
    with pytest.raises(NemtError, match="nothing to serve"):
        build_explainers(env["clf"], None, [])
    with pytest.raises(NemtError, match="at least one explainer"):
        create_app(env["clf"], {})
    with pytest.raises(NemtError, match="method 'nemt' needs a fitted explainer folder"):
        build_explainers(env["clf"], None, ["nemt", "gradcam"])  # not a 500 on every request later
    with pytest.raises(NemtError, match="max_upload_bytes must be at least 1, got -1"):
        create_app(env["clf"], {"random": build_explainers(env["clf"], None, ["random"])["random"]},
                   max_upload_bytes=-1)


@pytest.mark.parametrize("option,value", [("--max-upload-mb", "nan"), ("--max-upload-mb", "inf"),
                                          ("--max-upload-mb", "-1"), ("--max-pixels", "inf"),
                                          ("--body-timeout", "inf"), ("--max-upload-mb", "1e-9"),
                                          ("--max-upload-mb", "1e308")])
def test_serve_refuses_non_finite_or_negative_limits(option, value):
    """Limits are finite numbers > 0: nan / inf / negative are usage errors naming the option, found before
    the model is read or a port is bound (the model folder here does not even exist); so is an upload limit
    under one byte or too large to count in bytes (1e308 MB)."""
    from typer.testing import CliRunner

    from nemt.cli import app

    res = CliRunner().invoke(app, ["serve", "--model", "/nonexistent", "--baselines", "random", option, value])
    assert res.exit_code == 2 and option in res.output, res.output


# -- hostile clients ----------------------------------------------------------------------------------------

def _multipart_head(boundary: str = "nemtb", name: str = "a.png") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()


def _stalled_socket(url: str, declared: int = 100_000, boundary: str = "nemtb"):
    """A connection that sends its headers and the start of a body, then nothing (a slow or stalled client)."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    s = socket.create_connection((u.hostname, u.port), timeout=30)
    s.sendall((f"POST /v1/explain HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Length: {declared}\r\n"
               f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode()
              + _multipart_head(boundary) + b"\x89PNG")
    return s


def _wait_receiving(http, n: int, timeout: float = 10) -> None:
    """Poll /health until ``n`` uploads are being received (or ``timeout`` seconds pass)."""
    deadline = time.monotonic() + timeout
    while http.get("/health").json()["receiving"] < n and time.monotonic() < deadline:
        time.sleep(0.02)


def test_stalled_uploads_hold_no_compute_slot_and_time_out(env, upload_root):
    """One worker, no queue: 6 clients that stall mid-body must not turn a normal request into a 503."""
    import httpx

    from nemt.deploy.service import running

    data = env["images"][0].read_bytes()
    app = create_app(env["clf"], env["explainers"], workers=1, queue=0, body_timeout=1.5)
    with running(app) as url:
        stalled = [_stalled_socket(url) for _ in range(6)]
        try:
            with httpx.Client(base_url=url, timeout=30) as http:
                _wait_receiving(http, 6)
                health = http.get("/health").json()
                assert health["receiving"] == 6 and health["active"] == 0
                for _ in range(3):  # normal requests are answered while the six stall
                    r = http.post("/v1/explain", files={"file": ("a.png", data)})
                    assert r.status_code == 200, r.text
            for s in stalled:  # after body_timeout each stalled client gets 408 and its connection closed
                s.settimeout(10)
                answer = b""
                while chunk := s.recv(65536):  # until the server closes the connection
                    answer += chunk
                answer = answer.decode("latin-1")
                assert answer.startswith("HTTP/1.1 408") and "not complete within 1.5 s" in answer, answer
        finally:
            for s in stalled:
                s.close()
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.get("/health").json() == {"status": "ok", "active": 0, "capacity": 1, "receiving": 0}
    assert list(upload_root.iterdir()) == []


def test_upload_slots_are_bounded(env, upload_root):
    import httpx

    from nemt.deploy.service import running

    app = create_app(env["clf"], env["explainers"], max_receiving=2, body_timeout=5)
    with running(app) as url:
        stalled = [_stalled_socket(url) for _ in range(2)]
        try:
            with httpx.Client(base_url=url, timeout=30) as http:
                _wait_receiving(http, 2)
                r = http.post("/v1/explain", files={"file": ("a.png", env["images"][0].read_bytes())})
                assert r.status_code == 503 and "2 uploads in progress" in r.json()["detail"]
                assert r.headers["retry-after"] == "1"
        finally:
            for s in stalled:
                s.close()


def test_oversized_dimensions_are_413_from_the_header(env, client, upload_root):
    """A 10000x10000 PNG of a few bytes is refused before decoding (it would take gigabytes)."""
    from test_readers import png_bomb

    bomb = png_bomb(upload_root.parent / "bomb.png", 10000, 10000).read_bytes()
    assert len(bomb) < 200
    r = post(client, bomb, name="scan.png")
    assert r.status_code == 413, r.text
    assert r.json()["detail"] == ("scan.png: size: image of 10000x10000 = 100 Mpx is over this service's "
                                  "limit of 50 Mpx")
    # the limit is the service's own setting
    with TestClient(create_app(env["clf"], env["explainers"], max_pixels=1000)) as small:
        r = post(small, env["images"][0].read_bytes(), name="p.png")  # 32x32 = 1024 pixels
        assert r.status_code == 413 and "32x32 = 1024 pixels is over this service's limit of 1000 pixels" in r.text
    with pytest.raises(NemtError, match="max_pixels"):
        create_app(env["clf"], env["explainers"], max_pixels=0)
    assert list(upload_root.iterdir()) == []


def test_decoder_messages_never_show_the_temporary_path(client, upload_root):
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((16, 16))
    hdr.set_data_dtype(np.float32)
    cut = hdr.binaryblock + b"\0" * 4 + b"\0" * 100  # 100 of the 1024 data bytes: nibabel names the file
    r = post(client, cut, name="cut.nii")
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail.startswith("cut.nii: pixels: OSError: Expected 1024 bytes") and "from cut.nii" in detail, detail
    assert "nemt-upload" not in detail and "upload.nii" not in detail and str(upload_root) not in detail
    assert list(upload_root.iterdir()) == []


def test_a_client_gone_mid_upload_logs_no_traceback(env, upload_root):
    import logging

    import httpx

    from nemt.deploy.service import running

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)
    keep = Keep(level=logging.DEBUG)
    app = create_app(env["clf"], env["explainers"])
    with running(app) as url:
        loggers = [logging.getLogger(n) for n in ("uvicorn.error", "nemt.service")]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.addHandler(keep)
            lg.setLevel(logging.DEBUG)
        try:
            for _ in range(3):
                s = _stalled_socket(url)
                time.sleep(0.2)
                s.close()  # gone before the body is complete
            with httpx.Client(base_url=url, timeout=30) as http:
                deadline = time.monotonic() + 10
                while http.get("/health").json().get("receiving", 0) and time.monotonic() < deadline:
                    time.sleep(0.02)
                time.sleep(0.2)  # the server has logged whatever it logs for the three
        finally:
            for lg, level in zip(loggers, levels):
                lg.removeHandler(keep)
                lg.setLevel(level)
    assert not [r for r in records if r.exc_info or r.levelno >= logging.ERROR], [r.getMessage() for r in records]
    gone = [r.getMessage() for r in records if r.name == "nemt.service"]
    assert len(gone) == 3 and all("went away during its upload" in m for m in gone)
    assert list(upload_root.iterdir()) == []


def test_an_oversized_upload_message_uses_one_unit():
    """The 413 message states the upload and the limit in one unit (it once said '6.867 MB ... 52428 bytes')."""
    from nemt.deploy.service import MB, _fmt_bytes

    assert (_fmt_bytes(int(6.867 * MB), 52428), _fmt_bytes(52428, int(6.867 * MB))) == ("6.867 MB", "0.05 MB")
    assert (_fmt_bytes(3000, 2000), _fmt_bytes(2000, 3000)) == ("3000 bytes", "2000 bytes")
