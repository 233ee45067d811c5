"""Audit of guided training, eye gaze and Pantypes: bad input refused up front (naming the file or option, the
field and the reason), and the numbers that were silently wrong (gaze outside its image, similarities that
underflow, decoded prototypes scored as attributions) made right."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import folder_bytes
from nemt.cli import app
from nemt.data import open_dataset, write_phantom_dataset
from nemt.data.gaze import (MAX_FIXATIONS, check_gaze, gaze_heatmap, match_fixations, read_fixations,
                            resolve_fixations, simulate_fixations, simulate_gaze, write_fixations)
from nemt.errors import DataError, NemtError
from nemt.metrics import kl_divergence
from nemt.models import TrainConfig, load_model, train_classifier
from nemt.models.guided import GuideConfig
from nemt.models.pantypes import Pantypes, fit_pantypes, kl_to_prototypes, similarity
from nemt.ops import ParameterError

HEADER = "image,x,y,duration\n"


def _cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 phantoms of 16 x 16 px (4 classes, lesion masks)."""
    return write_phantom_dataset(tmp_path_factory.mktemp("ph") / "ph", 12, 16, seed=0).parent


@pytest.fixture(scope="module")
def data3d(tmp_path_factory):
    """4 phantom volumes of 8 x 8 x 8 voxels."""
    return write_phantom_dataset(tmp_path_factory.mktemp("ph3") / "ph3", 4, 8, spatial_dims=3, seed=0).parent


def _gaze(tmp_path, text: str, name: str = "g.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- fixation files


def test_fixations_outside_the_image_are_refused_naming_row_field_and_reason(data, tmp_path):
    """Coordinates are continuous pixels of the original image, pixel i covering [i, i + 1): 0 <= x < width and
    0 <= y < height. A 16 px image takes x = 15.999, not x = 16 (nor 100, nor 640)."""
    bad = _gaze(tmp_path, HEADER + "00001.png,640,3,0.2\n00002.png,15.999,16,0.2\n00003.png,16,1,0.2\n"
                "00004.png,15.999,15.999,0.2\n")
    out = tmp_path / "installed.csv"
    res = _cli("data", "gaze", data, "--gaze", bad, "--out", out)
    assert res.exit_code == 2 and not out.exists(), res.output
    text = " ".join(res.output.split())
    assert str(bad) in text and "3 bad fixation rows" in text
    for part in ("row 2: x: 640 is outside the image '00001.png' (16 px wide: 0 <= x < 16)",
                 "row 3: y: 16 is outside the image '00002.png' (16 px high: 0 <= y < 16)",
                 "row 4: x: 16 is outside the image '00003.png'"):
        assert part in text, part
    with pytest.raises(DataError, match="row 2: x: 640 is outside"):
        check_gaze(open_dataset(data), bad)
    good = _gaze(tmp_path, HEADER + "00004.png,15.999,15.999,0.2\n", "good.csv")
    res = _cli("data", "gaze", data, "--gaze", good, "--out", out)
    assert res.exit_code == 0 and out.is_file(), res.output


def test_simulated_gaze_stays_inside_its_image_as_written(tmp_path):
    """The fixation CSV keeps 3 decimals: a simulated fixation within 0.0005 px of the right edge (here: a
    finding mask of the last column only, many fixations) must not be written as x = width, outside."""
    image = np.full((8, 8), 0.5)
    mask = np.zeros((8, 8), bool)
    mask[:, -1] = True
    f = simulate_fixations(image, mask, np.random.default_rng(0), n_fixations=5000, p_finding=1.0)
    back = read_fixations(write_fixations(tmp_path / "g.csv", {"a.png": f}))["a.png"]
    assert (back[:, 0] < 8).all() and (back[:, 1] < 8).all() and back[:, 0].max() > 7.99


@pytest.mark.parametrize("header", ["image,x,y,duration,x", "image,x,y,duration,X", "IMAGE,image,x,y,duration"])
def test_a_column_given_twice_is_refused_naming_it(tmp_path, header):
    path = _gaze(tmp_path, header + "\n" + "a.png,1,2,0.2,3\n")
    with pytest.raises(DataError, match=r"the column is in the header 2 times") as err:
        read_fixations(path)
    assert str(path) in str(err.value) and err.value.field in header.split(",")


def test_a_header_without_rows_is_refused(tmp_path):
    with pytest.raises(DataError, match="no fixation rows"):
        read_fixations(_gaze(tmp_path, HEADER))


def test_extra_cells_and_underscored_numbers_are_refused(tmp_path):
    path = _gaze(tmp_path, HEADER + "a.png,1_0,2,0.2\na.png,1,2,0.2,9\na.png,1,2,0.2\na.png,1,2,1e-1\n")
    with pytest.raises(DataError) as err:
        read_fixations(path)
    msg = str(err.value)
    assert "2 bad fixation rows" in msg and "row 2: x: '1_0' is not a number" in msg
    assert "row 3: 5 fields, the header has 4 (image, x, y, duration)" in msg


def test_an_ambiguous_name_is_reported_and_images_with_gaze_counts_samples(tmp_path):
    """A file name that two samples share names neither (said so, with both); two spellings of one image are
    one image with gaze."""
    rows = ["image,label"]
    for folder, n in (("a", 3), ("b", 4)):
        for i in range(n):
            (tmp_path / "d" / folder).mkdir(parents=True, exist_ok=True)
            from PIL import Image
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "d" / folder / f"{i}.png")
            rows.append(f"{folder}/{i}.png,{'normal' if i else 'finding'}")
    (tmp_path / "d" / "manifest.csv").write_text("\n".join(rows) + "\n")
    gaze = _gaze(tmp_path, HEADER + "0.png,1,1,0.2\na/1.png,1,1,0.2\na/1.png,2,2,0.2\nb/3.png,3,3,0.2\n"
                 "3,4,4,0.2\n")
    m = open_dataset(tmp_path / "d")
    match = resolve_fixations(m, read_fixations(gaze))
    assert match.ambiguous == {"0.png": ["a/0.png", "b/0.png"]} and match.unknown == []
    b3 = [s.image.name for s in m.samples].index("3.png")
    assert len(match.matched) == 2 and len(match.matched[b3]) == 2  # b/3.png under two spellings
    assert match_fixations(m, read_fixations(gaze))[1] == ["0.png"]  # the benchmark's call: ignored as before
    res = _cli("data", "gaze", tmp_path / "d", "--gaze", gaze, "--out", tmp_path / "out.csv")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "image '0.png' is ambiguous: it names 2 samples" in text and "(a/0.png, b/0.png)" in text
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["images_with_gaze"] == 2 and summary["ambiguous_images"] == 1 and summary["unknown_images"] == 0
    with pytest.raises(DataError, match="name several samples"):
        match_fixations(m, {"0.png": np.ones((1, 3))}, gaze)


def test_real_gaze_for_3d_or_1d_data_is_refused_up_front(data3d, tmp_path):
    gaze = _gaze(tmp_path, HEADER + "00001.nii.gz,1,1,0.2\n")
    out = tmp_path / "out.csv"
    res = _cli("data", "gaze", data3d, "--gaze", gaze, "--out", out)
    assert res.exit_code == 2 and not out.exists()
    assert f"{gaze}: image: gaze is recorded on 2D images" in " ".join(res.output.split()) and "3D" in res.output
    from nemt.data.ecg import write_ecg_dataset
    ecg = write_ecg_dataset(tmp_path / "ecg", 5, duration=2).parent
    gaze = _gaze(tmp_path, HEADER + "ecg_00001.npy,1,1,0.2\n", "ecg.csv")
    with pytest.raises(DataError, match="gaze is recorded on 2D images.*1D"):
        check_gaze(open_dataset(ecg), gaze)


def test_simulation_settings_are_bounded(data, tmp_path):
    image = np.full((8, 8), 0.5)
    for bad in (float("nan"), float("inf"), 0, -1, MAX_FIXATIONS * 10):
        with pytest.raises(DataError, match="n_fixations"):
            simulate_fixations(image, None, np.random.default_rng(0), n_fixations=bad)
    with pytest.raises(DataError, match="n_fixations"):  # before any image is read
        simulate_gaze(open_dataset(data), n_fixations=float("inf"))
    out = tmp_path / "g.csv"
    res = _cli("data", "gaze", data, "--simulate", "--fixations", "1e12", "--out", out)
    assert res.exit_code == 2 and not out.exists() and f"at most {MAX_FIXATIONS}" in res.output


def test_fixations_on_every_pixel_give_a_constant_map_and_a_finite_kl():
    f = np.array([[x + 0.5, y + 0.5, 0.2] for x in range(4) for y in range(4)])
    heat = gaze_heatmap(f, (4, 4))
    assert torch.equal(heat, torch.ones(1, 4, 4))  # was all zeros: "no gaze", and KL NaN
    maps = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.isfinite(kl_divergence(maps, heat[None])).all()


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("arch", ["linear", "mlp", "cnn"])
def test_xai_tris_models_get_their_input_size_and_load_after_training(data, tmp_path, arch):
    out = tmp_path / arch
    res = _cli("train", "--data", data, "--out", out, "--arch", arch, "--size", "16", "--epochs", "1",
               "--batch-size", "4", "--no-progress")
    assert res.exit_code == 0, res.output
    clf = load_model(out)
    assert clf.card.arch_kwargs["input_size"] == [16, 16] and "test" in clf.card.metrics
    assert clf(torch.zeros(2, 1, 16, 16)).shape == (2, 4)
    # a card from a run that crashed before input_size was written there (earlier nemt): rebuilt at the card's size
    card = json.loads((out / "model.json").read_text())
    del card["arch_kwargs"]["input_size"]
    (out / "model.json").write_text(json.dumps(card))
    again = load_model(out)
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(again(x), clf(x))


def test_guided_linear_model_loads_and_keeps_only_its_guide_in_the_card(data, tmp_path):
    out = tmp_path / "g"
    res = _cli("train", "--data", data, "--out", out, "--arch", "linear", "--size", "16", "--epochs", "1",
               "--batch-size", "4", "--guide", "mask", "--mask-weight", "0.5", "--no-progress")
    assert res.exit_code == 0, res.output
    card = json.loads((out / "model.json").read_text())
    assert card["arch_kwargs"]["input_size"] == [16, 16]
    assert card["training"]["guide"] == {"kind": "mask", "mask_weight": 0.5, "mask_penalty": "fraction"}
    # a card written before keeps every field of both guides, and still loads
    card["training"]["guide"] = {**GuideConfig(kind="mask").__dict__, "mask_weight": 0.5}
    (out / "model.json").write_text(json.dumps(card))
    assert load_model(out).card.training["guide"]["copies"] == 3


def test_options_of_the_guide_not_chosen_are_refused_before_anything_is_read(tmp_path):
    absent = tmp_path / "absent"  # no data: a refusal must come first
    for args, option in ((["--guide", "mask", "--copies", "7"], "--copies"),
                         (["--guide", "mask", "--beta", "3"], "--beta"),
                         (["--beta", "5"], "--beta"), (["--copies", "7"], "--copies"),
                         (["--guide", "mimic", "--mask-weight", "-1"], "--mask-weight"),
                         (["--guide", "mimic", "--mask-penalty", "ross"], "--mask-penalty")):
        res = _cli("train", "--data", absent, "--out", tmp_path / "o", *args)
        assert res.exit_code == 2 and f"{option} is an option of --guide" in res.output, (args, res.output)
    assert not (tmp_path / "o").exists()
    assert "mask_weight" not in GuideConfig(kind="mimic").to_dict()
    assert "copies" not in GuideConfig(kind="mask").to_dict() and "beta" not in GuideConfig(kind="mask").to_dict()
    with pytest.raises(NemtError, match="copies=7 is a setting of --guide mimic"):
        GuideConfig(kind="mask", copies=7).check()
    with pytest.raises(NemtError, match="mask_weight=-1 is a setting of --guide mask"):
        GuideConfig(kind="mimic", mask_weight=-1).check()


# ----------------------------------------------------------------------------- Pantypes


def test_pantypes_on_multilabel_data_is_refused_before_anything_is_written(tmp_path):
    ml = write_phantom_dataset(tmp_path / "ml", 8, 16, task="multilabel", seed=0)
    out = tmp_path / "m"
    res = _cli("train", "--data", ml, "--out", out, "--arch", "pantypes", "--size", "16", "--epochs", "1")
    assert res.exit_code == 2 and "--arch pantypes needs a multi-class task" in res.output and "multilabel" in \
        res.output
    assert not out.exists()
    with pytest.raises(NemtError, match="multi-class task"):
        train_classifier(open_dataset(ml), out, TrainConfig(arch="pantypes", size=(16, 16)), progress=False)
    assert not out.exists()


def test_pantypes_errors_name_the_size_when_the_size_is_the_cause(data, data3d, tmp_path):
    for d, size, arch in ((data, "4", "pantypes"), (data3d, "8x8x8", "pantypes"), (data, "8", "cnn")):
        res = _cli("train", "--data", d, "--out", tmp_path / "o", "--arch", arch, "--size", size, "--epochs", "1")
        assert res.exit_code == 2 and "error: --size" in res.output and "--arch-param" not in res.output, res.output
    res = _cli("train", "--data", data, "--out", tmp_path / "o", "--arch", "pantypes", "--size", "16",
               "--arch-param", "latent_dim=0")
    assert res.exit_code == 2 and "--arch-param latent_dim=0" in res.output
    assert not (tmp_path / "o").exists()


def test_pantypes_volume_loss_needs_no_more_prototypes_than_latent_dimensions():
    with pytest.raises(NemtError, match="prototypes_per_class=5 with latent_dim=2"):
        Pantypes(out_channels=2, latent_dim=2, width=2)
    with pytest.raises(NemtError, match="latent_dim=3"):  # centred: M - 1 = 4 edges
        Pantypes(out_channels=2, latent_dim=3, width=2, volume_centred=True)
    Pantypes(out_channels=2, latent_dim=4, width=2, volume_centred=True)
    Pantypes(out_channels=2, latent_dim=5, width=2)
    Pantypes(out_channels=2, latent_dim=2, width=2, volume_weight=0.0)  # no volume loss: nothing to span


def _old_similarity(d: torch.Tensor) -> torch.Tensor:
    return torch.log(d + 1) - torch.log(d + 1e-4)


def test_similarity_is_stable_far_from_the_prototypes_and_unchanged_where_it_was_finite():
    d = torch.tensor([0.0, 1e-6, 1e-3, 0.5, 1.0, 7.0, 1e2, 1e4, 1e6, 1e7, 1e8, 1e12, 1e20, 1e30])
    z = torch.zeros(1, 1)
    got = similarity(z, d.sqrt()[:, None])[0]  # squared distance d from z = 0
    want = torch.log1p((1 - 1e-4) / (d.double() + 1e-4))
    assert (got > 0).all() and torch.allclose(got.double(), want, rtol=1e-6, atol=0)
    old = _old_similarity(d)
    was = old > 0  # where the difference of logs had not cancelled to 0
    assert not was.all()  # the defect: far similarities were exactly 0
    # equal to the old values within the old formula's rounding (a few ulps of log(d + 1))
    tol = 4 * torch.finfo(torch.float32).eps * torch.log(d + 1).clamp_min(1)
    assert ((got - old).abs() <= tol)[was].all()
    for distance in ("squared", "euclidean"):
        s = similarity(torch.full((2, 4), 1e5), torch.zeros(6, 4), distance)
        assert (s > 0).all()
    mu, logvar = torch.full((2, 4), 1e5), torch.zeros(2, 4)
    sims = similarity(mu, torch.zeros(6, 4))
    assert torch.isfinite(kl_to_prototypes(mu, logvar, sims, torch.tensor([0, 1]), torch.zeros(2, 3, 4)))


def test_prototype_explanations_are_finite_far_from_every_prototype():
    from nemt.explainers import get_explainer
    net = Pantypes(out_channels=2, input_size=(16, 16), latent_dim=8, width=4, seed=0).eval()
    with torch.no_grad():
        net.prototypes.mul_(1e4)  # squared distances ~1e9: every old similarity was exactly 0
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    for kind in ("decoded", "contribution"):
        maps = get_explainer("prototypes", net, kind=kind).explain(x, target="all")
        assert torch.isfinite(maps).all(), kind


def test_fit_pantypes_refuses_a_batch_size_that_cannot_train():
    x, y = torch.randn(6, 1, 16, 16), torch.arange(6) % 2
    for bad in (1, 0, -3, 2.5, "4"):
        net = Pantypes(out_channels=2, input_size=(16, 16), latent_dim=8, width=4, seed=0)
        with pytest.raises(ParameterError, match="batch_size must be a whole number >= 2"):
            fit_pantypes(net, x, y, epochs=1, batch_size=bad)
    with pytest.raises(NemtError, match="at least 2 samples"):
        fit_pantypes(net, x[:1], y[:1], epochs=1, batch_size=2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fit_pantypes(net, x, y, epochs=1, batch_size=2)
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_benchmark_scores_the_prototype_explainer_s_attributions(data, tmp_path):
    from nemt.bench.runner import benchmark_model
    cfg = TrainConfig(arch="pantypes", size=(16, 16), epochs=1, batch_size=4, seed=0,
                      arch_kwargs={"latent_dim": 8, "width": 4})
    train_classifier(open_dataset(data), tmp_path / "m", cfg, progress=False, log=lambda s: None)
    params = {"prototypes": {}}
    benchmark_model(tmp_path / "m", data, tmp_path / "b", methods=["prototypes"], metrics=["relevance_mass"],
                    split="all", limit=4, gallery=0, progress=False, params=params)
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["method_params"]["prototypes"] == {"kind": "contribution"}
    assert params == {"prototypes": {}}  # the caller's dict as given
    before = folder_bytes(tmp_path / "b")
    with pytest.raises(NemtError, match="prototypes.kind=decoded.*not attributions"):
        benchmark_model(tmp_path / "m", data, tmp_path / "b", methods=["prototypes"], metrics=["relevance_mass"],
                        split="all", limit=4, gallery=0, progress=False, params={"prototypes": {"kind": "decoded"}},
                        restart=True)
    assert folder_bytes(tmp_path / "b") == before
