"""The viewer end to end: uvicorn on loopback, headless Chromium (Debian's) driven by Playwright.

Skipped when /usr/bin/chromium or Playwright is missing or the browser cannot start.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image as PILImage

from nemt.data import read_image
from nemt.deploy.service import build_explainers, create_app, running

from conftest import train_and_fit

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
LABELS = ["cyst", "nodule", "normal", "opacity"]
READY = "document.body.dataset.state === 'ready'"
PIXELS = """id => { const c = document.getElementById(id);
    return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed")
    pytest.importorskip("playwright.sync_api")
    root = tmp_path_factory.mktemp("viewer")
    clf, images = train_and_fit(root)
    app = create_app(clf, build_explainers(clf, root / "e", ["gradcam++"]))
    # a phantom with a finding, so that the maps have something to show
    rows = (root / "data" / "manifest.csv").read_text().splitlines()[1:]
    finding = next(root / "data" / r.split(",")[0] for r in rows if r.split(",")[2] != "normal")
    with running(app) as url:
        yield dict(url=url, clf=clf, images=images, finding=finding, root=root)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        except Exception as exc:  # a browser that cannot start here is an environment problem, not a failure
            pytest.skip(f"cannot launch {CHROMIUM}: {exc}")
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1200, "height": 760})
    posts = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    page.goto(server["url"] + "/")
    page.wait_for_function("document.body.dataset.state === 'idle'", timeout=15000)
    page.posts = posts
    yield page
    page.close()


def canvas(page, id: str) -> np.ndarray:
    w, h = page.evaluate("id => [document.getElementById(id).width, document.getElementById(id).height]", id)
    return np.array(page.evaluate(PIXELS, id), dtype=np.uint8).reshape(h, w, 4)


def server_overlay(server, path: Path, label: str, alpha: float, method: str = "nemt") -> np.ndarray:
    r = httpx.post(server["url"] + "/v1/explain", files={"file": (path.name, path.read_bytes())},
                   data={"labels": label, "alpha": str(alpha), "method": method}, timeout=30)
    r.raise_for_status()
    return np.asarray(PILImage.open(io.BytesIO(base64.b64decode(r.json()["explanations"][label]["overlay_png"]))))


def test_upload_switch_label_opacity_compare_and_download(page, server, tmp_path):
    path = server["finding"]
    assert page.eval_on_selector_all("#label option", "os => os.map(o => o.value)") == LABELS
    assert page.input_value("#baseline") == "gradcam++"
    page.set_input_files("#file", str(path))
    page.wait_for_function(READY, timeout=30000)
    assert not page.is_visible("#notes")  # a training image: nothing unlike training to say

    # predictions as the model gives them, the predicted label selected
    clf = server["clf"]
    probs = clf.predict(clf.preprocessing(read_image(path))[None])[0].numpy()
    shown = page.eval_on_selector_all("#predictions tr", "rs => rs.map(r => [r.dataset.label, r.cells[2].textContent])")
    assert [n for n, _ in shown] == LABELS
    assert np.allclose([float(v) for _, v in shown], probs, atol=1e-3)
    first = page.input_value("#label")
    assert first == LABELS[int(probs.argmax())]

    # the client-side blend is the server's overlay (same colour map and formula; rounding may differ by 1)
    a = canvas(page, "overlay-primary")
    assert a.shape == (32, 32, 4)
    diff = np.abs(a[..., :3].astype(int) - server_overlay(server, path, first, 0.45).astype(int))
    assert diff.max() <= 1
    base_a = canvas(page, "overlay-baseline")
    assert np.abs(base_a[..., :3].astype(int)
                  - server_overlay(server, path, first, 0.45, "gradcam++").astype(int)).max() <= 1

    # switching the label changes both overlays, without asking the server again
    other = next(n for n in LABELS if n != first)
    page.select_option("#label", other)
    page.wait_for_function(f"document.body.dataset.label === '{other}'")
    b = canvas(page, "overlay-primary")
    assert np.abs(b.astype(int) - a.astype(int)).max() > 0
    assert page.text_content("#caption-primary") == f"nemt: {other}"
    assert page.text_content("#caption-baseline") == f"gradcam++: {other}"
    assert np.abs(canvas(page, "overlay-baseline").astype(int) - base_a.astype(int)).max() > 0
    assert page.eval_on_selector("#predictions tr.explained", "r => r.dataset.label") == other

    # opacity 0 shows the image alone, 1 the colour map alone; still no round trip
    image = canvas(page, "image-canvas")
    page.locator("#alpha").fill("0")
    assert np.array_equal(canvas(page, "overlay-primary"), image)
    page.locator("#alpha").fill("1")
    full = canvas(page, "overlay-primary")
    assert not np.array_equal(full, image) and page.text_content("#alpha-value") == "1.00"
    page.locator("#alpha").fill("0.5")
    assert len(page.posts) == 2  # one upload for NEMt, one for the baseline

    # download: the overlay as drawn
    with page.expect_download() as dl:
        page.click("#download-primary")
    saved = tmp_path / dl.value.suggested_filename
    dl.value.save_as(saved)
    assert saved.name == f"{path.stem}__nemt__{other}.png"
    assert np.array_equal(np.asarray(PILImage.open(saved).convert("RGBA")), canvas(page, "overlay-primary"))

    shot = tmp_path / "viewer.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_dropped_dicom_and_an_error_shown(page, server, tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    grey = np.asarray(PILImage.open(server["finding"]))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "OT", *grey.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = grey.tobytes()
    ds.save_as(tmp_path / "scan.dcm", enforce_file_format=True)
    drop = """async ([b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer(); dt.items.add(new File([bytes], name));
        const ev = new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true});
        document.getElementById('drop').dispatchEvent(ev);
    }"""
    page.evaluate(drop, [base64.b64encode((tmp_path / "scan.dcm").read_bytes()).decode(), "scan.dcm"])
    page.wait_for_function(READY, timeout=30000)
    assert "dicom" in page.text_content("#status")
    # unlike the training PNGs (8-bit, a fixed range), the DICOM is scaled by its own range: the note is shown
    assert page.is_visible("#notes") and "its own minimum and maximum" in page.text_content("#notes")
    # the DICOM shown as the model sees it (no window in the file: its own value range maps to [0, 1])
    unit = server["clf"].preprocessing.unit_scale(read_image(tmp_path / "scan.dcm"))[0]
    assert np.array_equal(canvas(page, "image-canvas")[..., 0], np.rint(unit * 255).astype(np.uint8))
    # a colour image for this grey model: the service's reason is shown, the views are cleared
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 255
    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format="PNG")
    page.evaluate(drop, [base64.b64encode(buf.getvalue()).decode(), "red.png"])
    page.wait_for_function("document.body.dataset.state === 'error'", timeout=30000)
    assert "422" in page.text_content("#error") and "3 channels" in page.text_content("#error")
    assert page.is_visible("#error") and page.eval_on_selector_all("#predictions tr", "rs => rs.length") == 0
    assert not page.is_visible("#notes")  # cleared with the views
