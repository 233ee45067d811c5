"""End to end through the CLI on phantoms: train, fit, explain (2D PNG/.npy and 3D NIfTI)."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from nemt.cli import app
from nemt.data import write_phantom_dataset

runner = CliRunner()


def _ok(args):
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.parametrize("dims,size,n", [(2, 32, 48), (3, 16, 24)])
def test_train_fit_explain(tmp_path, dims, size, n):
    manifest = write_phantom_dataset(tmp_path / "data", n, size, spatial_dims=dims, task="multiclass", seed=0)
    _ok(["train", "--data", str(manifest), "--out", str(tmp_path / "m"), "--arch", "smallcnn",
         "--size", str(size), "--dims", str(dims), "--epochs", "1", "--batch-size", "8", "--no-progress"])
    _ok(["fit", "--model", str(tmp_path / "m"), "--data", str(manifest), "--out", str(tmp_path / "e"),
         "--epochs", "1", "--batch-size", "4", "--optimizer", "adamw", "--no-progress"])
    card = json.loads((tmp_path / "e" / "explainer.json").read_text())
    assert card["kind"] == "NEMt" and len(card["history"]) == 1 and "val" in card["history"][0]
    ext = ".png" if dims == 2 else ".nii.gz"
    imgs = sorted((tmp_path / "data" / "images").glob(f"*{ext}"))[:2]
    out = _ok(["explain", *map(str, imgs), "--model", str(tmp_path / "m"), "--explainer", str(tmp_path / "e"),
               "--target", "all", "--out", str(tmp_path / "x")])
    res = json.loads(out[out.index("["):])
    assert len(res) == 2 and len(res[0]["targets"]) == 4  # normal + 3 findings
    stem = imgs[0].name.split(".")[0]
    for label in ("normal", "nodule", "opacity", "cyst"):
        assert (tmp_path / "x" / f"{stem}__{label}.png").is_file()
        if dims == 2:
            m = np.load(tmp_path / "x" / f"{stem}__{label}.npy")
        else:
            m = np.asarray(nib.load(tmp_path / "x" / f"{stem}__{label}.nii.gz").dataobj)
        assert m.shape == (size,) * dims and 0 <= m.min() and m.max() <= 1
    # a baseline through the same command
    _ok(["explain", str(imgs[0]), "--model", str(tmp_path / "m"), "--method", "gradcam", "--target", "predicted",
         "--out", str(tmp_path / "g")])
    assert len(list((tmp_path / "g").glob("*.png"))) == 1
    if dims == 3:  # a volume of another shape and a real affine: the map keeps the input's world coordinates
        vol = np.asarray(nib.load(imgs[0]).dataobj, dtype=np.float32)
        big = np.kron(vol, np.ones((2, 1, 2), dtype=np.float32))  # 32 x 16 x 32 voxels
        affine = np.array([[0.0, 0, 1.5, -20], [-0.8, 0, 0, 30], [0, 2.5, 0, 7], [0, 0, 0, 1]])
        nib.save(nib.Nifti1Image(big, affine), tmp_path / "scan.nii.gz")
        _ok(["explain", str(tmp_path / "scan.nii.gz"), "--model", str(tmp_path / "m"), "--method", "gradcam",
             "--target", "0", "--out", str(tmp_path / "w")])
        out_img = nib.load(next((tmp_path / "w").glob("scan__*.nii.gz")))
        assert out_img.shape == (size,) * 3
        # the centre of the volume is the same point in the world in the input and in the map
        centre_in = affine @ np.r_[(np.array(big.shape) - 1) / 2, 1]
        centre_map = out_img.affine @ np.r_[(np.array(out_img.shape) - 1) / 2, 1]
        assert np.allclose(centre_in, centre_map)
        # a map voxel is as large as the input's voxels it covers (2 along the first and last axes)
        assert np.allclose(np.linalg.norm(out_img.affine[:3, :3], axis=0), [2 * 0.8, 2.5, 2 * 1.5])
        # a .npy volume has no affine: its sidecar's spacing places the map (it was the identity)
        np.save(tmp_path / "vol.npy", big[None])
        (tmp_path / "vol.json").write_text(json.dumps({"spacing": [0.5, 1.0, 3.0]}))
        _ok(["explain", str(tmp_path / "vol.npy"), "--model", str(tmp_path / "m"), "--method", "gradcam",
             "--target", "0", "--out", str(tmp_path / "v")])
        out_img = nib.load(next((tmp_path / "v").glob("vol__*.nii.gz")))
        assert np.allclose(np.diag(out_img.affine)[:3], [2 * 0.5, 1.0, 2 * 3.0])
    # a seeded baseline with budget parameters; the same seed gives the same map
    for run in ("r1", "r2"):
        _ok(["explain", str(imgs[0]), "--model", str(tmp_path / "m"), "--method", "rise", "--param", "n_masks=40",
             "--param", "batch_size=16", "--seed", "3", "--target", "all", "--out", str(tmp_path / run)])
    suffix = ".npy" if dims == 2 else ".nii.gz"
    for label in ("normal", "cyst"):
        a, b = (tmp_path / r / f"{stem}__{label}{suffix}" for r in ("r1", "r2"))
        assert a.read_bytes() == b.read_bytes()
    if dims == 3:  # the rest of the 3D path through the CLI: data check, benchmark and its report, ONNX export
        out = _ok(["data", "check", str(manifest), "--no-progress", "--json", str(tmp_path / "check.json")])
        check = json.loads((tmp_path / "check.json").read_text())
        assert check["images"] == n and not check["fatal"]
        _ok(["benchmark", "--model", str(tmp_path / "m"), "--data", str(manifest), "--explainer", str(tmp_path / "e"),
             "--methods", "nemt,gradcam++,random", "--metrics", "relevance_mass,pointing_game", "--limit", "6",
             "--out", str(tmp_path / "b"), "--no-progress"])
        rows = (tmp_path / "b" / "results.csv").read_text().splitlines()
        assert len(rows) > 1 and {r.split(",")[0] for r in rows[1:]} == {"nemt", "gradcam++", "random"}
        assert "<img" in (tmp_path / "b" / "report.html").read_text()  # the gallery's orthogonal slices
        pytest.importorskip("onnx")
        res = json.loads(_ok(["export", "--model", str(tmp_path / "m"), "--explainer", str(tmp_path / "e"),
                              "--out", str(tmp_path / "m3d.onnx")]))
        assert (tmp_path / "m3d.onnx").is_file() and res


def test_explain_refuses_explainer_of_another_model(tmp_path):
    manifest = write_phantom_dataset(tmp_path / "data", 40, 32, seed=0)
    for name, seed in (("m1", 0), ("m2", 1)):
        _ok(["train", "--data", str(manifest), "--out", str(tmp_path / name), "--arch", "smallcnn", "--size", "32",
             "--epochs", "1", "--batch-size", "8", "--seed", str(seed), "--no-progress"])
    _ok(["fit", "--model", str(tmp_path / "m1"), "--data", str(manifest), "--out", str(tmp_path / "e"),
         "--epochs", "1", "--batch-size", "4", "--optimizer", "adamw", "--no-progress"])
    img = sorted((tmp_path / "data" / "images").glob("*.png"))[0]
    res = runner.invoke(app, ["explain", str(img), "--model", str(tmp_path / "m2"), "--explainer",
                              str(tmp_path / "e"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "another model" in " ".join(res.output.split())


def test_explain_names_a_wrong_parameter_and_lists_methods(tmp_path):
    manifest = write_phantom_dataset(tmp_path / "data", 24, 32, seed=0)
    _ok(["train", "--data", str(manifest), "--out", str(tmp_path / "m"), "--arch", "smallcnn", "--size", "32",
         "--epochs", "1", "--batch-size", "8", "--no-progress"])
    img = sorted((tmp_path / "data" / "images").glob("*.png"))[0]
    res = runner.invoke(app, ["explain", str(img), "--model", str(tmp_path / "m"), "--method", "rise",
                              "--param", "masks=10", "--out", str(tmp_path / "x")])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "'masks'" in text and "n_masks" in text
    res = runner.invoke(app, ["explain", str(img), "--model", str(tmp_path / "m"), "--method", "rise",
                              "--param", "n_masks", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "KEY=VALUE" in res.output
    listing = _ok(["methods"])
    for name in ("rise", "occlusion", "ig", "gradcam++", "relax"):
        assert name in listing


def test_output_names_are_unique_within_a_run():
    """Issue 12, item 3: the full stem (format suffix only removed), a numbered suffix where names collide."""
    from nemt.files import OutputNames, image_stem
    assert image_stem("a/scan.2023.png") == "scan.2023" and image_stem("1.2.840.10008.1.dcm") == "1.2.840.10008.1"
    assert image_stem("brain.NII.GZ") == "brain" and image_stem("noext") == "noext"
    assert image_stem(".hidden") == ".hidden"
    names = OutputNames()
    got = [names.claim(p, ["a", "b"]) for p in ("x/scan.png", "y/scan.png", "scan-2.png", "Scan.png", "scan.jpg")]
    assert got == ["scan", "scan-2", "scan-2-2", "Scan-3", "scan-4"]
    # an image stem and a label that join to the same name as another image's: told apart too
    names = OutputNames()
    assert [names.claim("p__q.png", ["r"]), names.claim("p.png", ["q__r"])] == ["p__q", "p-2"]


def test_explain_never_overwrites_its_own_outputs(tmp_path):
    """Issue 12, item 3, end to end: dotted names (dates, DICOM UIDs) and one name in two folders."""
    import torch

    from PIL import Image

    from nemt.files import image_stem
    from nemt.models import Classifier, build_model
    torch.manual_seed(0)
    net = build_model("smallcnn", spatial_dims=2, in_channels=1, out_channels=2)
    Classifier.from_module(net, spatial_dims=2, in_channels=1, input_size=(16, 16), task="multiclass",
                           label_names=["no", "yes"], arch="smallcnn").save(tmp_path / "m")
    rng = np.random.default_rng(0)
    paths = [tmp_path / n for n in ("scan.2023.png", "scan.2024.png", "1.2.840.113619.2.55.png",
                                    "1.2.840.113619.2.56.png", "a/img.png", "b/img.png")]
    for p in paths:
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(p)
    out = _ok(["explain", *map(str, paths), "--model", str(tmp_path / "m"), "--method", "saliency",
               "--target", "all", "--out", str(tmp_path / "x")])
    res = json.loads(out[out.index("["):])
    assert [r["outputs"] for r in res] == ["scan.2023", "scan.2024", "1.2.840.113619.2.55", "1.2.840.113619.2.56",
                                           "img", "img-2"]
    written = sorted(p.name for p in (tmp_path / "x").iterdir())
    assert len(written) == 6 * 2 * 2  # 6 images x 2 targets x (.png, .npy), none overwritten
    # each raw map is its own image's: the same map as explaining that image alone
    for p, r in zip(paths, res):
        _ok(["explain", str(p), "--model", str(tmp_path / "m"), "--method", "saliency", "--target", "all",
             "--out", str(tmp_path / "one" / r["outputs"])])
        alone = tmp_path / "one" / r["outputs"] / f"{image_stem(p)}__yes.npy"
        assert np.array_equal(np.load(alone), np.load(tmp_path / "x" / f"{r['outputs']}__yes.npy"))


def test_ecg_1d_through_the_cli(tmp_path):
    """1D signals end to end: `data ecg`, `train --dims 1`, `fit`, `explain` a .npy record (curve + map strip PNG,
    raw map .npy of the signal's length), `benchmark` with its report gallery."""
    _ok(["data", "ecg", "--out", str(tmp_path / "d"), "--n", "40", "--duration", "4", "--seed", "0"])
    manifest = tmp_path / "d" / "manifest.csv"
    _ok(["train", "--data", str(manifest), "--out", str(tmp_path / "m"), "--arch", "resnet10", "--dims", "1",
         "--size", "400", "--epochs", "1", "--batch-size", "8", "--no-progress"])
    _ok(["fit", "--model", str(tmp_path / "m"), "--data", str(manifest), "--out", str(tmp_path / "e"),
         "--epochs", "1", "--batch-size", "4", "--kernel-size", "11", "--no-progress", "--allow-collapse"])
    rec = sorted((tmp_path / "d" / "signals").glob("*.npy"))[0]
    res = json.loads(_ok(["explain", str(rec), "--model", str(tmp_path / "m"), "--explainer", str(tmp_path / "e"),
                          "--target", "all", "--out", str(tmp_path / "x")]))
    assert len(res[0]["targets"]) == 5
    for name in res[0]["targets"]:
        m = np.load(tmp_path / "x" / f"{res[0]['outputs']}__{name}.npy")
        assert m.shape == (400,) and 0 <= m.min() and m.max() <= 1
        assert (tmp_path / "x" / f"{res[0]['outputs']}__{name}.png").stat().st_size > 1000
    _ok(["benchmark", "--model", str(tmp_path / "m"), "--data", str(manifest), "--explainer", str(tmp_path / "e"),
         "--methods", "nemt,gradcam,ig,random", "--metrics", "relevance_mass,pointing_game", "--limit", "6",
         "--out", str(tmp_path / "b"), "--no-progress"])
    assert (tmp_path / "b" / "report.html").read_text().count("<img") >= 3  # speed plot and signal galleries
    assert "notes" not in res[0]  # its sidecar's range, the model's length: nothing to say
    # a record without its sidecar (scaled by its own range) and one of twice the length (resampled): both said
    bare = tmp_path / "bare" / rec.name
    bare.parent.mkdir()
    bare.write_bytes(rec.read_bytes())
    np.save(tmp_path / "long.npy", np.repeat(np.load(rec), 2, axis=-1))
    (tmp_path / "long.json").write_text(rec.with_suffix(".json").read_text())
    res = runner.invoke(app, ["explain", str(bare), str(tmp_path / "long.npy"), "--model", str(tmp_path / "m"),
                              "--method", "sobel", "--target", "0", "--out", str(tmp_path / "n")])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())  # the warnings as printed, wrapped
    # the card records the training signals' sidecar ranges, rate and duration: the bare record's own range
    # and the long record's duration (the same 100 Hz, twice the 4 s) are said, and its resampling
    assert "its value range is its own minimum and maximum, while every training image's was fixed (its " \
        "sidecar's range" in out
    assert "its duration (s), 8, is outside training's 4" in out and "Hz" not in out
    assert "resampled from 800 to the model's 400 samples" in out


def test_label_names_never_write_outside_out(tmp_path):
    """A label is part of an output file's name ({stem}__{label}.png): path-like labels ("mass/nodule",
    "../../evil") are written as safe names inside --out and listed in the result's "files"; a card with an
    empty or a repeated label name is refused naming the field, as is a manifest label with a tab in it."""
    import torch

    from nemt.errors import CardError
    from nemt.models import Classifier, load_model
    from nemt.models.zoo import build_model

    torch.manual_seed(0)
    net = build_model("smallcnn", spatial_dims=2, in_channels=1, out_channels=3, width=4)
    labels = ["normal", "mass/nodule", "../../evil"]
    Classifier.from_module(net, spatial_dims=2, in_channels=1, input_size=(16, 16), task="multiclass",
                           label_names=labels, arch="smallcnn").save(tmp_path / "m")
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    card["arch_kwargs"] = {"width": 4}
    (tmp_path / "m" / "model.json").write_text(json.dumps(card))
    img = tmp_path / "in" / "scan.npy"
    img.parent.mkdir()
    np.save(img, np.random.default_rng(0).random((1, 16, 16)).astype(np.float32))
    out = tmp_path / "deep" / "out"
    res = json.loads(_ok(["explain", str(img), "--model", str(tmp_path / "m"), "--method", "gradcam",
                          "--target", "all", "--out", str(out)]))
    assert res[0]["targets"] == labels
    assert res[0]["files"] == ["scan__normal", "scan__mass_nodule", "scan___.._evil"]
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted(f"{f}.{e}" for f in res[0]["files"] for e in ("npy", "png"))
    assert not list(tmp_path.glob("evil*")) and not list((tmp_path / "deep").glob("evil*"))
    for bad, why in ((["a", "a", "b"], "'a' twice"), (["a", " ", "b"], "empty name"),
                     # every problem at once, as a manifest lists all its bad labels
                     (["a", " ", "a", "b\tc"], "an empty name; 'a' twice; 'b\\\\tc' holds a control character")):
        card["label_names"] = bad
        (tmp_path / "m" / "model.json").write_text(json.dumps(card))
        with pytest.raises(CardError, match=f"label_names.*{why}"):
            load_model(tmp_path / "m")
    manifest = tmp_path / "d" / "manifest.csv"
    manifest.parent.mkdir()
    manifest.write_text("image,label\na.png,x\nb.png,y\tz\n")
    res = runner.invoke(app, ["data", "check", str(manifest)])
    assert res.exit_code != 0 and "'y\\tz' holds a control character" in res.output, res.output


def test_explain_data_records_paths_relative_to_the_data_root(tmp_path):
    """`explain --data` recorded only an image's base name: two files `a/x.png` and `b/x.png` read the same
    in explanations.json. Each record now names the image relative to the manifest's folder, and each item's
    maps go to its own files."""
    import shutil

    manifest = write_phantom_dataset(tmp_path / "data", 24, 32, spatial_dims=2, task="multiclass", seed=0)
    _ok(["train", "--data", str(manifest), "--out", str(tmp_path / "m"), "--arch", "smallcnn", "--size", "32",
         "--epochs", "1", "--batch-size", "8", "--no-progress"])
    root = tmp_path / "data"
    for sub, src in (("a", "00002"), ("b", "00003")):
        (root / sub).mkdir()
        shutil.copy(root / "images" / f"{src}.png", root / sub / "x.png")
    (root / "two.csv").write_text("image,label\na/x.png,nodule\nb/x.png,cyst\n")
    _ok(["explain", "--data", str(root / "two.csv"), "--split", "all", "--model", str(tmp_path / "m"),
         "--method", "gradcam", "--out", str(tmp_path / "x"), "--no-progress"])
    index = json.loads((tmp_path / "x" / "explanations.json").read_text())
    assert [r["image"] for r in index] == ["a/x.png", "b/x.png"]
    files = [f for r in index for f in r["files"]]
    assert len(set(files)) == len(files) == 2 * 4  # every label of each item, no file shared
    for f in files:
        assert (tmp_path / "x" / f"{f}.npy").is_file()


def test_a_label_named_like_a_keyword_or_an_index_is_never_guessed(tmp_path):
    """--target 'predicted' or 'all' on a model with a label of that name, or '0' where label '0' is output 1, could
    mean either: refused, naming the label's index to give instead; a digit label that is no output's index (label
    '7' of 3 outputs) or is its own index can only mean the label and is explained."""
    import torch

    from nemt.models import Classifier
    from nemt.models.zoo import build_model

    torch.manual_seed(0)
    net = build_model("smallcnn", spatial_dims=2, in_channels=1, out_channels=3, width=4)
    Classifier.from_module(net, spatial_dims=2, in_channels=1, input_size=(16, 16), task="multiclass",
                           label_names=["predicted", "0", "7"], arch="smallcnn").save(tmp_path / "m")
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    card["arch_kwargs"] = {"width": 4}
    (tmp_path / "m" / "model.json").write_text(json.dumps(card))
    img = tmp_path / "scan.npy"
    np.save(img, np.random.default_rng(0).random((1, 16, 16)).astype(np.float32))
    base = ["explain", str(img), "--model", str(tmp_path / "m"), "--method", "gradcam", "--out"]
    for target, own in (("predicted", 0), ("0", 1)):
        res = runner.invoke(app, base + [str(tmp_path / f"o-{target}"), "--target", target])
        assert res.exit_code == 2, res.output
        assert f"--target {own}" in res.output and "both this model's label" in res.output, res.output
        assert not (tmp_path / f"o-{target}").exists() or not any((tmp_path / f"o-{target}").iterdir())
    for target, name in (("7", "7"), ("1", "0")):  # label '7' (no index 7); index 1 (label '0')
        res = json.loads(_ok(base + [str(tmp_path / f"ok-{target}"), "--target", target]))
        assert res[0]["targets"] == [name]
    # a non-ASCII digit is no index (str.isdigit() said it was, and int() then crashed with a traceback)
    res = runner.invoke(app, base + [str(tmp_path / "o-sup"), "--target", "\u00b2"])
    assert res.exit_code == 2 and "\u00b2" in res.output and "Traceback" not in res.output, res.output


def test_library_refuses_a_keyword_target_that_is_also_a_label():
    """The library's own reading of target='all' / 'predicted' (resolve_targets, every explainer) must not guess
    either when a label has that name: refused naming the label's index; the index, the name in a list and the
    default target (None) still work."""
    import torch

    from nemt.errors import NemtError
    from nemt.explainers import get_explainer
    from nemt.models import Classifier
    from nemt.models.zoo import build_model
    from nemt.ops import resolve_targets

    torch.manual_seed(0)
    net = build_model("smallcnn", spatial_dims=2, in_channels=1, out_channels=3, width=4)
    clf = Classifier.from_module(net, spatial_dims=2, in_channels=1, input_size=(16, 16), task="multiclass",
                                 label_names=["normal", "all", "predicted"], arch="smallcnn")
    x = torch.rand(2, 1, 16, 16)
    for word, own in (("all", 1), ("predicted", 2)):
        with pytest.raises(NemtError, match=f"both a keyword and the name of label {own}; give {own}"):
            resolve_targets(word, clf, x)
        with pytest.raises(NemtError, match="both a keyword"):
            get_explainer("gradcam", clf).explain(x, target=word)
        assert resolve_targets([word], clf, x).tolist() == [[own], [own]]
        assert resolve_targets(own, clf, x).tolist() == [[own], [own]]
    with torch.no_grad():
        top = clf(x).argmax(1, keepdim=True)
    assert torch.equal(resolve_targets(None, clf, x), top)
