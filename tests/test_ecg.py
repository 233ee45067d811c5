"""1D signals across the stack (issue 16): the synthetic ECG generator's exact labels and classes, the signal
readers (.npy with a sampling rate, WFDB, ECG5000), the 1D ResNet, every listed explainer and the localisation
metrics on (B, C, L) inputs, and `nemt data ecg` feeding `nemt train`."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from nemt.data.ecg import (ECG5000_CLASSES, ECG_CLASSES, LEADS12, WAVES, Beat, Wave, lead_gains, make_ecgs,
                           read_ecg5000, read_signal, read_wfdb, render, stratified_split)
from nemt.data.readers import read_image
from nemt.errors import DataError
from conftest import shared

P, QRS, T = WAVES.index("P"), WAVES.index("QRS"), WAVES.index("T")
BEAT = (Wave("P", -0.2, 0.15, 0.025), Wave("Q", -0.03, -0.1, 0.01), Wave("R", 0.0, 1.0, 0.01),
        Wave("S", 0.03, -0.2, 0.01), Wave("T", 0.3, 0.3, 0.05))


@pytest.fixture(scope="module")
def ecg():
    return make_ecgs(40, seed=0)


# ---------------------------------------------------------------------------- generator: labels and values

def test_render_labels_and_values_follow_the_definition():
    # R at 2.003 s puts every interval edge between two samples at 100 Hz, so the labelled samples are exact:
    # P [1.753, 1.853] s, QRS [1.953, 2.053] s (Q - 2 w_Q to S + 2 w_S), T [2.203, 2.403] s
    signal, labels = render([Beat(2.003, BEAT)], 400, 100.0, np.ones((1, 3)))
    want = np.zeros(400, dtype=np.int8)
    want[176:186], want[196:206], want[221:241] = P, QRS, T
    assert np.array_equal(labels, want)
    t = np.arange(400) / 100.0
    expected = sum(w.amplitude * np.exp(-(t - 2.003 - w.centre) ** 2 / (2 * w.width ** 2)) for w in BEAT)
    np.testing.assert_allclose(signal[0], expected, rtol=0, atol=1e-12)  # float64 sums: rounding only


def test_qrs_wins_where_waves_overlap():
    # the second beat's QRS [2.253, 2.353] falls inside the first beat's T [2.203, 2.403]
    _, labels = render([Beat(2.003, BEAT), Beat(2.303, BEAT[1:])], 400, 100.0, np.ones((1, 3)))
    assert (labels[226:236] == QRS).all() and (labels[221:226] == T).all() and (labels[236:241] == T).all()


def test_lead_gains_obey_einthoven_and_goldberger():
    g = lead_gains(LEADS12)  # (12, 3): rows in LEADS12 order, columns P/QRS/T
    i, ii, iii, avr, avl, avf = g[:6]
    np.testing.assert_allclose(ii, i + iii, atol=1e-12)
    np.testing.assert_allclose(avr, -(i + ii) / 2, atol=1e-12)
    np.testing.assert_allclose(avl, (i - iii) / 2, atol=1e-12)
    np.testing.assert_allclose(avf, (ii + iii) / 2, atol=1e-12)
    assert g[1, 1] == pytest.approx(1.0)  # lead II along the default QRS axis (60 degrees)


def test_generator_is_reproducible_by_seed_and_leaves_global_rngs_alone():
    np_state, torch_state = np.random.get_state(), torch.get_rng_state()
    a, b, c = make_ecgs(10, seed=3), make_ecgs(10, seed=3), make_ecgs(10, seed=4)
    assert np.array_equal(a.signals, b.signals) and np.array_equal(a.waves, b.waves)
    assert not np.array_equal(a.signals, c.signals)
    assert np.array_equal(make_ecgs(5, seed=3).signals, a.signals[:5])  # a record does not depend on n
    assert np.array_equal(np.random.get_state()[1], np_state[1]) and torch.equal(torch.get_rng_state(), torch_state)
    twelve = make_ecgs(5, leads=12, seed=0)
    assert twelve.signals.shape == (5, 12, 1000) and twelve.signals.dtype == np.float32
    assert np.array_equal(twelve.waves, make_ecgs(5, leads=1, seed=0).waves)  # one time axis for all leads


def test_stored_labels_are_the_definition_applied_to_the_stored_beats(ecg):
    for i in range(len(ecg)):
        _, labels = render(ecg.beats[i], 1000, ecg.fs, np.ones((1, 3)))
        assert np.array_equal(labels, ecg.waves[i])
        # every R peak inside the record lies on a QRS sample
        assert (ecg.waves[i][np.round(ecg.r_peaks(i)).astype(int).clip(0, 999)] == QRS).all()


def _runs(mask: np.ndarray) -> list[int]:
    """Lengths of the runs of True that start and end inside the record."""
    edges = np.flatnonzero(np.diff(mask.astype(int)))
    starts, ends = edges[mask[edges + 1]] + 1, edges[~mask[edges + 1]] + 1
    return [int(e - s) for s in starts for e in ends[ends > s][:1]]


def test_classes_differ_where_they_are_defined(ecg):
    cls = {name: np.flatnonzero(ecg.labels == k) for k, name in enumerate(ECG_CLASSES)}
    fs = ecg.fs
    for name, idx in cls.items():
        for i in idx:
            x, w = ecg.signals[i, 0], ecg.waves[i]
            # T peaks: lead II's T gain is cos(angle) >= cos(45 deg) and the T amplitude >= 0.15 mV (x 5 % jitter);
            # the mean over ~12 beats keeps baseline wander (<= 0.08 mV, random phase) and noise well below that
            peaks = [int(round((b.r + b.wave("T").centre) * fs)) for b in ecg.beats[i]]
            t_peak = np.mean([x[p] for p in peaks if 0 <= p < 1000])
            assert (t_peak < -0.05) if name == "inverted_t" else (t_peak > 0.05), (name, i, t_peak)
            # QRS duration: 100 ms (10-11 samples) by definition, 185 ms (18-19 samples) when wide
            assert set(_runs(w == QRS)) <= ({18, 19} if name == "wide_qrs" else {10, 11}), (name, i)
            assert (w == P).any() != (name == "afib")  # atrial fibrillation has no P wave
            rr = np.diff(ecg.r_peaks(i)) / fs
            cv = rr.std() / rr.mean()
            assert (cv > 0.1) if name == "afib" else (cv < 0.08), (name, i, cv)  # RR sd: ~23 % vs 3 %
            f = ecg.findings[i]
            if name == "inverted_t":
                assert np.array_equal(f, w == T)
            elif name == "wide_qrs":
                assert np.array_equal(f, w == QRS)
            elif name == "st_elevation":  # from the J point to the T peak: never on P or QRS samples
                assert f.any() and not np.isin(w[f], [P, QRS]).any()
                assert all(0.15 * 0.999 <= b.st[2] <= 0.3 for b in ecg.beats[i])
            else:
                assert not f.any()


def test_generator_refuses_bad_arguments():
    with pytest.raises(DataError, match="leads"):
        make_ecgs(2, leads=3)
    with pytest.raises(DataError, match="unknown leads"):
        make_ecgs(2, leads=["II", "V7"])
    with pytest.raises(DataError, match="classes"):
        make_ecgs(3, classes=[0, 1])


def test_cli_ecg_limits_are_the_generators():
    """`nemt data ecg` states its --fs / --duration minimums as literals (the CLI does not import torch to build its
    options); they must be the generator's own MIN_FS / MIN_DURATION, and each is accepted at the limit."""
    import typer.main

    from nemt.cli import app
    from nemt.data.ecg import MIN_DURATION, MIN_FS

    cmd = typer.main.get_command(app).commands["data"].commands["ecg"]
    opts = {p.name: p for p in cmd.params}
    assert opts["fs"].min == MIN_FS and f"at least {MIN_FS:g}" in opts["fs"].help
    assert opts["duration"].min == MIN_DURATION and f"at least {MIN_DURATION:g}" in opts["duration"].help
    assert make_ecgs(1, fs=MIN_FS, duration=MIN_DURATION).signals.shape[-1] == int(MIN_FS * MIN_DURATION)
    with pytest.raises(DataError, match="fs"):
        make_ecgs(1, fs=MIN_FS - 1)
    with pytest.raises(DataError, match="duration"):
        make_ecgs(1, duration=MIN_DURATION - 0.5)


# ---------------------------------------------------------------------------- readers

def test_npy_signal_with_sampling_rate(tmp_path):
    x = np.arange(24, dtype=np.int16).reshape(2, 12)
    np.save(tmp_path / "rec.npy", x)
    with pytest.raises(DataError) as err:  # no sidecar, no fs: the message names the field and where to put it
        read_signal(tmp_path / "rec.npy")
    assert "rec.npy: fs: sampling rate unknown" in str(err.value) and "rec.json" in str(err.value)
    img = read_signal(tmp_path / "rec.npy", fs=250)
    assert img.array.shape == (2, 12) and img.array.dtype == np.float32 and img.spacing == (1 / 250,)
    (tmp_path / "rec.json").write_text(json.dumps({"fs": 500, "channels": ["I", "II"], "range": [-5, 5]}))
    img = read_image(tmp_path / "rec.npy")  # what a manifest reads: told by the magic bytes
    assert img.meta["fs"] == 500 and img.meta["channels"] == ["I", "II"] and img.value_range == (-5.0, 5.0)
    assert img.modality == "npy" and np.array_equal(img.array, x.astype(np.float32))
    np.save(tmp_path / "one.npy", np.zeros(7))
    assert read_signal(tmp_path / "one.npy", fs=1).array.shape == (1, 7)  # a 1-D array is one channel


@pytest.mark.parametrize("sidecar,field,reason", [
    ({"fs": -1}, "fs", "positive"), ({"fs": 100, "range": [1, 1]}, "range", "lo < hi"),
    ({"channels": ["I"]}, "channels", "need 2 names"), ({"spacing": [1, 2]}, "spacing", "need 1 positive"),
])
def test_npy_sidecar_errors_name_file_field_reason(tmp_path, sidecar, field, reason):
    np.save(tmp_path / "rec.npy", np.zeros((2, 5), np.float32))
    (tmp_path / "rec.json").write_text(json.dumps(sidecar))
    with pytest.raises(DataError) as err:
        read_image(tmp_path / "rec.npy")
    assert err.value.path == str(tmp_path / "rec.json") and err.value.field == field and reason in err.value.reason


def test_npy_refusals(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="obj.npy: dtype: object is not a real number type"):
        read_image(tmp_path / "obj.npy")
    np.save(tmp_path / "cube.npy", np.zeros((1, 2, 3, 4, 5)))
    with pytest.raises(DataError, match="cube.npy: shape: 5-D array"):
        read_image(tmp_path / "cube.npy")
    np.save(tmp_path / "img.npy", np.zeros((1, 4, 4)))
    with pytest.raises(DataError, match="img.npy: shape: a signal is"):
        read_signal(tmp_path / "img.npy", fs=1)
    np.save(tmp_path / "big.npy", np.zeros((3, 50)))
    with pytest.raises(DataError, match="exceeds the limit"):
        read_image(tmp_path / "big.npy", max_pixels=100)


def _pack212(values: np.ndarray) -> bytes:
    """WFDB format 212: each pair of 12-bit two's-complement samples in three bytes."""
    v = (np.asarray(values, dtype=np.int64) & 0xFFF).reshape(-1, 2)
    return bytes(np.stack([v[:, 0] & 0xFF, (v[:, 0] >> 8) | ((v[:, 1] >> 8) << 4), v[:, 1] & 0xFF], 1)
                 .astype(np.uint8).ravel())


@pytest.mark.parametrize("fmt", ["16", "212"])
def test_wfdb_record_in_physical_units(tmp_path, fmt):
    digital = np.array([[100, -200], [2047, -2048], [0, 5]])  # (samples, signals), interleaved in the file
    data = digital.astype("<i2").tobytes() if fmt == "16" else _pack212(digital.ravel())
    (tmp_path / "r1.dat").write_bytes(data)
    (tmp_path / "r1.hea").write_text(f"# a comment\nr1 2 360 3\nr1.dat {fmt} 200(10)/mV 12 0 0 0 0 lead I\n"
                                     f"r1.dat {fmt} 400/uV 12 5 0 0 0 lead II\n")
    img = read_signal(tmp_path / "r1")  # the record's name, as WFDB tools take it
    want = np.stack([(digital[:, 0] - 10) / 200, (digital[:, 1] - 5) / 400]).astype(np.float32)
    np.testing.assert_array_equal(img.array, want)
    assert img.meta["fs"] == 360 and img.meta["channels"] == ["lead I", "lead II"] and img.meta["units"] == ["mV", "uV"]
    assert img.spacing == (1 / 360,) and img.modality == "wfdb"


def test_wfdb_refusals(tmp_path):
    (tmp_path / "r.dat").write_bytes(b"\x00" * 8)
    (tmp_path / "r.hea").write_text("r 1 100 4\nr.dat 80 200 12 0 0 0 0 x\n")
    with pytest.raises(DataError, match="r.hea: format: format 80 is not supported"):
        read_wfdb(tmp_path / "r.hea")
    (tmp_path / "r.hea").write_text("r 1 100 9\nr.dat 16 200 12 0 0 0 0 x\n")
    with pytest.raises(DataError, match="r.dat: size: the header says 9 samples per signal, the file holds 4"):
        read_wfdb(tmp_path / "r")
    (tmp_path / "r.hea").write_text("r 2 100\nr.dat 16\n")
    with pytest.raises(DataError, match="signal lines"):
        read_wfdb(tmp_path / "r")


def test_ecg5000_reader_and_its_errors(tmp_path):
    path = tmp_path / "e.txt"
    path.write_text("  1.0000000e+00  0.1  0.2  0.3\n  2.0000000e+00 -0.1 -0.2 -0.3\n\n1 1 2 3\n")
    x, y = read_ecg5000(path)
    assert x.shape == (3, 1, 3) and x.dtype == np.float32 and y.tolist() == [1, 2, 1]
    x, y = read_ecg5000(path, classes=(2,))
    assert y.tolist() == [2] and np.allclose(x[0, 0], [-0.1, -0.2, -0.3])
    for text, where, reason in (("1 0.1 0.2\n1 0.1\n", "line 2", "1 samples, expected 2"),
                                ("7 0.1 0.2\n", "line 1", "not one of 1-5"),
                                ("1 0.1 nan\n", "line 1", "NaN"), ("1 0.1 x\n", "line 1", "not a number")):
        path.write_text(text)
        with pytest.raises(DataError) as err:
            read_ecg5000(path)
        assert err.value.path == str(path) and err.value.field == where and reason in err.value.reason


@pytest.mark.realdata
def test_real_ecg5000_and_its_stratified_split():
    x, y = read_ecg5000(shared("ecg5000") / "ECG5000_TRAIN.txt")
    assert x.shape == (500, 1, 140)
    assert np.bincount(y, minlength=6)[1:].tolist() == [292, 177, 10, 19, 2]  # the counts of its README
    assert set(ECG5000_CLASSES) == {1, 2, 3, 4, 5}
    x, y = read_ecg5000(shared("ecg5000") / "ECG5000_TRAIN.txt", classes=(1, 2))
    s = stratified_split(y, (0.6, 0.2, 0.2), seed=0)
    assert np.array_equal(np.sort(np.concatenate(list(s.values()))), np.arange(len(y)))  # a partition
    for part, f in zip(s.values(), (0.6, 0.2, 0.2)):  # each class's share within one record of rounding
        for c in (1, 2):
            assert abs((y[part] == c).sum() - f * (y == c).sum()) <= 1
    assert all(np.array_equal(a, b) for a, b in zip(s.values(), stratified_split(y, (0.6, 0.2, 0.2), 0).values()))
    assert not np.array_equal(s["test"], stratified_split(y, (0.6, 0.2, 0.2), 1)["test"])


# ---------------------------------------------------------------------------- models, explainers, metrics

def _ecg_classifier(in_channels=1, length=256, n_classes=3):
    from nemt.models import Classifier, build_model
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = build_model("resnet10", spatial_dims=1, in_channels=in_channels, out_channels=n_classes,
                          widen_factor=0.25, no_max_pool=True)
    clf = Classifier.from_module(net, spatial_dims=1, in_channels=in_channels, input_size=(length,),
                                 task="multiclass", label_names=[f"c{i}" for i in range(n_classes)], arch="resnet10")
    clf.card.arch_kwargs = {"widen_factor": 0.25, "no_max_pool": True}  # so that load_model rebuilds it
    return clf.eval()


def test_1d_resnet_and_smallcnn_forward_and_stages(tmp_path):
    from nemt.explainers.layers import find_stages
    from nemt.models import build_model, load_model
    net = build_model("resnet10", spatial_dims=1, in_channels=12, out_channels=5, widen_factor=0.5).eval()
    with torch.no_grad():
        assert net(torch.zeros(2, 12, 1000)).shape == (2, 5)
        assert build_model("smallcnn", spatial_dims=1, in_channels=1, out_channels=5)(torch.zeros(2, 1, 64)).shape \
            == (2, 5)
    # stem /2, max-pool /4, then one residual block per stage: /4, /8, /16, /32
    assert find_stages(net, (12, 1000)) == ["act", "layer1", "layer2", "layer3", "layer4"]
    clf = _ecg_classifier()
    clf.save(tmp_path / "m")  # the card accepts spatial_dims 1 and the weights load back
    back = load_model(tmp_path / "m")
    x = torch.randn(2, 1, 256)
    assert back.card.spatial_dims == 1 and torch.equal(back(x), clf(x))


@pytest.mark.parametrize("name,params", [("gradcam", {}), ("ig", {"n_steps": 8}),
                                         ("occlusion", {"window": 16, "stride": 8}), ("rise", {"n_masks": 40})])
def test_explainers_give_b_t_l_maps_on_a_1d_model(name, params):
    from nemt.explainers import get_explainer
    clf = _ecg_classifier()
    x = torch.randn(3, 1, 256, generator=torch.Generator().manual_seed(0))
    maps = get_explainer(name, clf, **params).explain(x, target="all")
    assert maps.shape == (3, 3, 256) and torch.isfinite(maps).all()
    assert maps.amin() >= 0 and maps.amax() <= 1 and not clf.training


def test_nemt_fits_and_explains_1d():
    from nemt.explainers.nemt import NEMt
    clf = _ecg_classifier()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 1, 256, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]
    nemt = NEMt(clf, epochs=1, batch_size=4, kernel_size=7, seed=0).fit(data, progress=False, log=lambda s: None)
    x = torch.randn(2, 1, 256, generator=g)
    maps = nemt.explain(x, target="all")
    assert maps.shape == (2, 3, 256) and maps.amin() >= 0 and maps.amax() <= 1
    assert torch.equal(maps, nemt.explain(x, target="all"))  # the same input gives the same map


def test_localisation_metrics_on_1d_maps():
    from nemt.metrics import pointing_game, relevance_mass, relevance_rank
    maps = torch.zeros(1, 2, 10)
    maps[0, 0, [2, 3, 4, 8]] = 1.0                                    # 3 of 4 units of mass inside GT
    maps[0, 1, [9, 8, 7, 0, 1]] = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6])  # top 5 all outside; max 3 from GT
    gt = torch.zeros(1, 1, 10, dtype=torch.bool)
    gt[0, 0, 2:7] = True
    assert relevance_mass(maps, gt)[0].tolist() == pytest.approx([0.75, 0.0])
    assert relevance_rank(maps, gt)[0, 1].item() == 0.0
    assert pointing_game(maps, gt)[0].tolist() == [1.0, 0.0]
    assert pointing_game(maps, gt, tolerance=3)[0].tolist() == [1.0, 1.0]  # GT grown to samples -1..9


def test_preprocessing_and_augmentation_in_1d():
    from nemt.data.preprocess import Preprocessing
    from nemt.models.training import augment_batch
    pre = Preprocessing(size=(2,))
    assert pre.resize(np.array([[0.0, 1.0, 2.0, 3.0]])).tolist() == [[0.5, 2.5]]  # area mean of pairs
    up = Preprocessing(size=(8,)).resize(np.full((1, 4), 0.3))
    assert torch.allclose(up, torch.full((1, 8), 0.3))  # a constant stays constant
    x = torch.randn(4, 2, 50, generator=torch.Generator().manual_seed(0))
    out = augment_batch(x, torch.Generator().manual_seed(1))
    # per sample a gain and an offset only, no flip or shift: out = a x + b exactly (to float rounding)
    for i in range(4):
        a, b = np.polyfit(x[i].ravel().numpy(), out[i].ravel().numpy(), 1)
        assert 0.9 <= a <= 1.1 and abs(b) <= 0.1
        assert torch.allclose(out[i], a * x[i] + b, atol=1e-5)


def test_cli_writes_an_ecg_data_set_that_nemt_train_reads(tmp_path):
    from nemt.cli import app
    from nemt.data import ImageDataset, open_dataset
    from nemt.data.preprocess import Preprocessing
    from nemt.models import load_model
    runner = CliRunner()
    res = runner.invoke(app, ["data", "ecg", "--out", str(tmp_path / "d"), "--n", "20", "--seed", "1"])
    assert res.exit_code == 0, res.output
    m = open_dataset(tmp_path / "d")
    assert len(m.samples) == 20 and sorted(m.label_names) == sorted(ECG_CLASSES) and not m.problems
    ds = ImageDataset(m, Preprocessing(size=(1000,), scale="range"))
    item = ds[1]  # record 1 is inverted T: its ground truth is its T samples
    ref = make_ecgs(2, seed=1)
    assert item["image"].shape == (1, 1000) and torch.equal(item["gt"][0], torch.as_tensor(ref.findings[1]))
    # the sidecar's range (-3, 3) mV maps to [0, 1]
    assert torch.allclose(item["image"][0], torch.as_tensor((ref.signals[1, 0] + 3) / 6), atol=1e-6)
    res = runner.invoke(app, ["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "m"), "--arch",
                              "smallcnn", "--dims", "1", "--size", "1000", "--epochs", "1", "--batch-size", "8",
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    clf = load_model(tmp_path / "m")
    assert clf.card.spatial_dims == 1 and clf.card.input_size == [1000]
    assert clf(item["image"][None]).shape == (1, 5)
    assert math.isfinite(clf.card.metrics["test"]["accuracy"])


def test_records_too_short_or_too_coarse_are_refused(tmp_path):
    """`data ecg --duration 0.1` once wrote 10-sample records: the generator and the CLI refuse records that
    cannot hold one whole beat, or a QRS complex in 5 samples; at the minimum every record holds a whole beat
    (P before the first sample of it, T's end within the record) and its finding."""
    from nemt.cli import app
    from nemt.data.ecg import MIN_DURATION, MIN_FS

    for kw, field in (({"duration": MIN_DURATION - 0.1}, "duration"), ({"fs": MIN_FS - 1}, "fs"),
                      ({"duration": float("nan")}, "duration")):
        with pytest.raises(DataError, match=field):
            make_ecgs(2, **kw)
    runner = CliRunner()
    for opt, value in (("--duration", "0.1"), ("--duration", f"{MIN_DURATION - 0.1}"), ("--fs", f"{MIN_FS - 1}")):
        res = runner.invoke(app, ["data", "ecg", "--out", str(tmp_path / "d"), "--n", "5", opt, value])
        assert res.exit_code == 2 and opt in res.output, res.output
        assert not (tmp_path / "d").exists()
    ok = runner.invoke(app, ["data", "ecg", "--out", str(tmp_path / "d"), "--n", "5", "--duration",
                             f"{MIN_DURATION}", "--fs", f"{MIN_FS}"])
    assert ok.exit_code == 0, ok.output
    ecg = make_ecgs(200, fs=MIN_FS, duration=MIN_DURATION, seed=7)
    n = ecg.signals.shape[-1]
    assert n == round(MIN_FS * MIN_DURATION)
    for beats, findings, label in zip(ecg.beats, ecg.findings, ecg.labels):
        whole = [b for b in beats if b.r - 0.28 >= 0 and b.r + 0.45 <= MIN_DURATION]
        assert whole, [b.r for b in beats]
        assert label in (0, 4) or findings.any()


def test_twelve_lead_ecgs_train_from_the_cli(tmp_path):
    """`nemt data ecg --leads 12` then `nemt train`: the model takes the first training record's 12 leads (it
    took 1 and refused every record, "12 channels of a signal ... the model takes 1"); `data check` agrees
    (nothing fatal), and a 1-lead record among 12-lead ones is fatal there (no lead is made up); `--channels`
    overrides the count."""
    from nemt.cli import app
    from nemt.data.check import check_dataset
    from nemt.data.manifest import open_dataset

    runner = CliRunner()
    res = runner.invoke(app, ["data", "ecg", "--out", str(tmp_path / "d"), "--n", "20", "--leads", "12",
                              "--duration", "2", "--seed", "0"])
    assert res.exit_code == 0, res.output
    assert check_dataset(open_dataset(tmp_path / "d")).ok
    res = runner.invoke(app, ["train", "--data", str(tmp_path / "d"), "--dims", "1", "--size", "200", "--arch",
                              "smallcnn", "--arch-param", "width=4", "--epochs", "1", "--batch-size", "8",
                              "--out", str(tmp_path / "m"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "m" / "model.json").read_text())["in_channels"] == 12
    one = tmp_path / "d" / "signals" / "ecg_00003.npy"
    np.save(one, np.load(one)[:1])  # one record of lead I only
    side = json.loads(one.with_suffix(".json").read_text())
    one.with_suffix(".json").write_text(json.dumps({**side, "channels": ["I"]}))
    rep = check_dataset(open_dataset(tmp_path / "d"))
    # either count can be the first training record's, and each refuses the other records: all are fatal, the
    # lone record saying that its 1 lead is not made into 12
    assert {e.field for e in rep.fatal} == {"channels"} and len(rep.fatal) == 20
    lone = [str(e) for e in rep.fatal if "ecg_00003" in str(e)]
    assert len(lone) == 1 and "has 1 channels, the model takes 12" in lone[0] and "1 or 12 channels" in lone[0]
    res = runner.invoke(app, ["train", "--data", str(tmp_path / "d"), "--dims", "1", "--size", "200", "--arch",
                              "smallcnn", "--channels", "1", "--epochs", "1", "--out", str(tmp_path / "m1"),
                              "--no-progress"])
    assert res.exit_code != 0 and "the model takes 1" in res.output  # 12 leads are not mixed into one
