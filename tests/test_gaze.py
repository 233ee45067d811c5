"""Eye gaze: the simulator, heat maps as the MIMIC authors make them, the fixation file reader, the CLI and the
benchmark's gaze metrics."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion
from typer.testing import CliRunner

from nemt.cli import app
from nemt.data import open_dataset, write_phantom_dataset
from nemt.data.gaze import (DURATION_GAMMA, SIGMA_FRACTION, anatomy_prior, default_gaze_path, fixation_map,
                            gaze_heatmap, match_fixations, read_fixations, simulate_fixations, simulate_gaze,
                            write_fixations)
from nemt.errors import DataError, NemtError
from nemt.metrics import kl_divergence, nss


def _body_and_lesion(size: int = 64):
    """A bright disc (the body) on black, and a 12 x 12 lesion mask inside it."""
    yy, xx = np.mgrid[:size, :size] + 0.5
    image = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.4 * size) ** 2) * 0.6
    mask = np.zeros((size, size), bool)
    mask[20:32, 36:48] = True
    return image, mask


def _in(mask: np.ndarray, f: np.ndarray) -> np.ndarray:
    return mask[f[:, 1].astype(int), f[:, 0].astype(int)]


def test_simulator_is_reproducible_by_seed():
    image, mask = _body_and_lesion()
    a = simulate_fixations(image, mask, np.random.default_rng(5))
    b = simulate_fixations(image, mask, np.random.default_rng(5))
    c = simulate_fixations(image, mask, np.random.default_rng(6))
    assert np.array_equal(a, b)
    assert a.shape[1] == 3 and (a.shape != c.shape or not np.array_equal(a, c))


def test_fixations_mostly_in_the_mask_and_durations_gamma():
    image, mask = _body_and_lesion()
    f = simulate_fixations(image, mask, np.random.default_rng(0), n_fixations=2000, p_finding=0.7)
    # Binomial(N≈2000, 0.7) lesion fixations (sd ≈ 0.01 of N), plus the few anatomy ones that land there
    assert 0.67 <= _in(mask, f).mean() <= 0.80
    # durations Gamma(2.5, 0.1 s): mean 0.25 s, sd of the mean 0.158 / sqrt(2000) ≈ 0.0035 s (tolerance 5 sd)
    shape, scale = DURATION_GAMMA
    assert (f[:, 2] > 0).all() and abs(f[:, 2].mean() - shape * scale) < 0.018
    assert (f[:, 0] >= 0).all() and (f[:, 0] < 64).all() and (f[:, 1] >= 0).all() and (f[:, 1] < 64).all()


def test_normal_images_get_anatomy_fixations_only():
    image, mask = _body_and_lesion()
    prior = anatomy_prior(image)
    for normal in (None, np.zeros_like(mask)):
        f = simulate_fixations(image, normal, np.random.default_rng(1), n_fixations=2000)
        # the share in the (unmarked) lesion square is the prior's mass there, not p_finding
        # (binomial sd ≈ sqrt(0.05 * 0.95 / 2000) ≈ 0.005; tolerance 0.03)
        assert abs(_in(mask, f).mean() - prior[mask].sum()) < 0.03
        # and none falls on the black background more than 2 px from the body (the prior's foreground is
        # the image smoothed with a 1-px Gaussian, so it reaches just past the edge)
        far = binary_erosion(image == 0, iterations=2)
        assert not _in(far, f).any()


def test_phantom_gaze_is_reproducible_and_normals_stay_out_of_masks(tmp_path):
    m = open_dataset(write_phantom_dataset(tmp_path / "ph", 12, 32, seed=0))
    a, b = simulate_gaze(m, seed=3), simulate_gaze(m, seed=3)
    assert list(a) == [f"images/{i:05d}.png" for i in range(12)]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    from nemt.data.readers import read_mask
    for s in m.samples:
        f = a[f"images/{s.image.name}"]
        inside = _in(read_mask(s.mask)[0], f)
        if m.label_names[s.y] == "normal":  # an empty mask: no finding fixations
            assert not inside.any()
        else:  # a finding: Binomial(N, 0.7) of its ~40 fixations inside (0.4 is 3.5 sd below 0.7)
            assert inside.mean() > 0.4


def test_heatmap_is_the_blurred_fixation_minmax():
    """One fixation on a 100-px image: box 0.8 px, so only its pixel is set; blur sigma = 5.9 px. The heat at
    distance d along a row is (g(d) − g_min) / (1 − g_min), g the normalised Gaussian of that sigma."""
    h = gaze_heatmap(np.array([[50.5, 40.5, 0.3]]), (100, 100))
    assert h.shape == (1, 100, 100)
    assert float(h.min()) == 0.0 and float(h.max()) == 1.0 and h[0, 40, 50] == 1.0
    sigma = SIGMA_FRACTION * 100
    g = lambda d: math.exp(-0.5 * (d / sigma) ** 2)  # noqa: E731
    corner = g(50) * g(40)  # the far corner (99, 0): the smallest value (reflection adds < 1e-10 there)
    for d in (3, 6, 10):
        want = (g(d) - corner) / (1 - corner)
        assert abs(float(h[0, 40, 50 + d]) - want) < 1e-3
    assert torch.equal(gaze_heatmap(np.zeros((0, 3)), (10, 20)), torch.zeros(1, 10, 20))  # no fixation


def test_fixations_scale_to_the_model_size():
    f = np.array([[50.5, 10.5, 0.2], [199.9, 99.9, 0.2], [250.0, 10.0, 0.2]])  # the last is off the image
    fm = fixation_map(f, (100, 200), (50, 100))
    assert fm[0, 5, 25] == 1 and fm[0, 49, 99] == 1 and fm.sum() == 2
    h = gaze_heatmap(f, (100, 200), (50, 100))
    assert 0 <= float(h.min()) and float(h.max()) == 1.0


def test_reader_round_trip_and_egd_columns(tmp_path):
    f = {"images/a.png": np.array([[1.25, 2.5, 0.3], [3.0, 4.0, 0.125]]), "b.png": np.array([[0.0, 0.0, 1.0]])}
    back = read_fixations(write_fixations(tmp_path / "g.csv", f))
    assert list(back) == list(f) and all(np.allclose(back[k], f[k], atol=1e-3) for k in f)
    (tmp_path / "egd.csv").write_text("DICOM_ID,X_ORIGINAL,Y_ORIGINAL,FPOGD,OTHER\nabc,10,20,0.25,x\n")
    assert np.allclose(read_fixations(tmp_path / "egd.csv")["abc"], [[10, 20, 0.25]])


def test_reader_errors_name_file_row_field_and_reason(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("image,x,y,duration\na.png,1,2,0.2\na.png,one,2,0.2\nb.png,1,-3,0.2\nb.png,1,2,0\n,1,2,0.2\n"
                   "c.png,nan,2,0.2\n")
    with pytest.raises(DataError) as err:
        read_fixations(bad)
    msg = str(err.value)
    assert str(bad) in msg and "5 bad fixation rows" in msg
    for part in ("row 3: x: 'one' is not a number", "row 4: y: a pixel coordinate is >= 0, got -3",
                 "row 5: duration: duration must be positive", "row 6: image: empty image name",
                 "row 7: x: 'nan' is not finite"):
        assert part in msg, part
    (tmp_path / "nox.csv").write_text("image,col,y,duration\na.png,1,2,0.2\n")
    with pytest.raises(DataError, match=r"nox.csv: x: no x column"):
        read_fixations(tmp_path / "nox.csv")
    with pytest.raises(DataError, match="fixation file not found"):
        read_fixations(tmp_path / "absent.csv")


def test_matching_by_path_name_or_stem(tmp_path):
    m = open_dataset(write_phantom_dataset(tmp_path / "ph", 4, 16, seed=0))
    one = np.array([[1.0, 1.0, 0.2]])
    matched, unknown = match_fixations(m, {"images/00000.png": one, "00001.png": one, "00002": one, "zz": one})
    assert sorted(matched) == [0, 1, 2] and unknown == ["zz"]
    with pytest.raises(DataError, match="none of the 1 images"):
        match_fixations(m, {"zz": one}, "g.csv")


def test_kl_and_nss_best_for_the_gaze_itself():
    rng = np.random.default_rng(0)
    image, mask = _body_and_lesion()
    fixes = [simulate_fixations(image, mask, rng) for _ in range(4)]
    heat = torch.stack([gaze_heatmap(f, (64, 64)) for f in fixes])
    fmap = torch.stack([fixation_map(f, (64, 64)) for f in fixes])
    shuffled = heat.flatten(1)[:, torch.randperm(64 * 64, generator=torch.Generator().manual_seed(0))].view_as(heat)
    kl_self, kl_shuf = kl_divergence(heat, heat), kl_divergence(shuffled, heat)
    assert torch.allclose(kl_self, torch.zeros_like(kl_self), atol=1e-6)  # KL of a distribution from itself
    assert (kl_shuf > kl_self + 0.1).all()
    assert (nss(heat, fmap) > nss(shuffled, fmap) + 0.5).all()


def test_cli_simulate_and_install_real_gaze(tmp_path):
    data = tmp_path / "ph"
    write_phantom_dataset(data, 6, 16, seed=0)
    res = CliRunner().invoke(app, ["data", "gaze", str(data), "--simulate", "--no-progress"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["images_with_gaze"] == 6 and (data / "gaze.csv").is_file()
    assert default_gaze_path(open_dataset(data)) == data / "gaze.csv"
    real = tmp_path / "real.csv"
    real.write_text("image,x,y,duration\n00003.png,4,5,0.3\nnot-there.png,1,1,0.2\n")
    res = CliRunner().invoke(app, ["data", "gaze", str(data), "--gaze", str(real), "--out", str(tmp_path / "g.csv")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["unknown_images"] == 1  # not-there.png, warned about
    assert list(read_fixations(tmp_path / "g.csv")) == ["00003.png", "not-there.png"]
    res = CliRunner().invoke(app, ["data", "gaze", str(data)])
    assert res.exit_code == 2 and "exactly one of --simulate and --gaze" in res.output


def test_benchmark_scores_kl_and_nss_when_the_data_has_gaze(tmp_path):
    from conftest import train_phantom_model
    from nemt.bench.runner import benchmark_model, check_metrics

    manifest, model = train_phantom_model(tmp_path, n=24, size=16)
    with pytest.raises(NemtError, match="nemt data gaze"):
        check_metrics(["nss"])  # no gaze: the metric cannot run, and the message says how to get gaze
    write_fixations(tmp_path / "data" / "gaze.csv", simulate_gaze(open_dataset(manifest), seed=0))
    summary = benchmark_model(model, manifest.parent, tmp_path / "b", methods=["random", "sobel"], progress=False,
                              gallery=0)
    for method in ("random", "sobel"):
        assert summary[method]["kl_divergence"]["n"] > 0 and math.isfinite(summary[method]["nss"]["mean"])
    header = (tmp_path / "b" / "results.csv").read_text().splitlines()[0]
    assert header.endswith("kl_divergence,nss")
    # --no-gaze (gaze=False): the gaze.csv beside the manifest is left out, and with it the gaze metrics
    plain = benchmark_model(model, manifest.parent, tmp_path / "c", methods=["random"], progress=False, gallery=0,
                            gaze=False)
    assert "kl_divergence" not in plain["random"] and "nss" not in plain["random"]
    from typer.testing import CliRunner

    from nemt.cli import app
    both = CliRunner().invoke(app, ["benchmark", "--model", str(model), "--data", str(manifest.parent), "--out",
                                    str(tmp_path / "d"), "--gaze", str(tmp_path / "data" / "gaze.csv"), "--no-gaze"])
    assert both.exit_code == 2 and "--no-gaze" in both.output
    # a fixation file given to the benchmark (never installed by `nemt data gaze`) is checked as that command
    # checks it: a fixation outside its 16 px image is refused naming the row, not scored as gaze
    name = open_dataset(manifest).samples[0].name
    bad = tmp_path / "outside.csv"
    bad.write_text(f"image,x,y,duration\n{name},40,3,0.3\n")
    res = CliRunner().invoke(app, ["benchmark", "--model", str(model), "--data", str(manifest.parent), "--out",
                                   str(tmp_path / "e"), "--methods", "random", "--gaze", str(bad), "--no-progress"])
    assert res.exit_code == 2 and "row 2" in res.output and "outside the image" in res.output, res.output
