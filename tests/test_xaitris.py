"""XAI-TRIS benchmark data and models: shapes, exact ground truth, determinism, suppressor backgrounds."""
from __future__ import annotations

import pytest
import torch

from nemt.bench.xaitris import correct_test_samples, train_xaitris_models
from nemt.data.xaitris import BACKGROUNDS, DEFAULT_ALPHA, SCENARIOS, XaiTrisData, make_xaitris, split
from nemt.errors import NemtError
from nemt.models import build_model, load_model

N = 48
COMBOS = [(s, b) for s in SCENARIOS for b in BACKGROUNDS]


def _rect(r0: int, c0: int, h: int, w: int) -> torch.Tensor:
    m = torch.zeros(64, 64, dtype=torch.bool)
    m[r0:r0 + h, c0:c0 + w] = True
    return m


@pytest.mark.parametrize("scenario,background", COMBOS)
def test_shapes_dtypes_balance(scenario, background):
    d = make_xaitris(scenario, background, N, seed=3)
    assert d.x.shape == d.gt.shape == d.placed.shape == (N, 1, 64, 64)
    assert d.x.dtype == torch.float32 and d.y.dtype == torch.int64 and d.gt.dtype == torch.bool
    assert set(d.y.tolist()) == {0, 1} and int(d.y.sum()) == N // 2
    assert torch.isfinite(d.x).all() and d.x.std() > 0.1
    assert d.meta["scenario"] == scenario and d.meta["background"] == background
    assert d.meta["alpha"] == DEFAULT_ALPHA[(scenario, background)] and d.meta["seed"] == 3
    assert (d.gt.flatten(1).sum(1) > 0).all() and (d.placed & ~d.gt).sum() == 0  # drawn only inside gt


@pytest.mark.parametrize("scenario", ["lin", "rigid", "xor"])
def test_gt_is_where_the_additive_pattern_was_placed(scenario):
    d = make_xaitris(scenario, "white", N, alpha=1.0, seed=1)  # signal only, no background
    drawn = d.x != 0
    assert torch.equal(drawn, d.placed)
    if scenario == "rigid":
        assert torch.equal(d.gt, d.placed)
    else:  # the same class-related mask in every image: the union of what either class draws
        assert (d.gt == d.gt[:1]).all()
        assert torch.equal(d.gt[0], drawn[d.y == 0].any(0) | drawn[d.y == 1].any(0))
    if scenario == "xor":  # both patterns in every image; signs decide the class
        assert torch.equal(d.placed, d.gt)
        t_sign = d.x[:, 0, 20, 12].sign()  # inside T (rows 8-31, cols 8-15 are its stem)
        l_sign = d.x[:, 0, 50, 44].sign()  # inside L (rows 32-55, cols 40-47 are its stem)
        assert torch.equal((t_sign != l_sign).long(), d.y)
        assert {(int(a), int(b)) for a, b in zip(t_sign, l_sign)} == {(1, 1), (-1, -1), (1, -1), (-1, 1)}


def test_gt_positions_match_xaitris_layout():
    """T's cells start at pixel (8, 8) and L's at (32, 40), 8 px cells, smoothed edges within 3 px."""
    d = make_xaitris("lin", "white", 4, alpha=1.0, blur_sigma=0.0)
    t = _rect(8, 8, 24, 8) | _rect(16, 16, 8, 8)  # stem + middle arm
    ell = _rect(32, 40, 24, 8) | _rect(48, 48, 8, 8)  # stem + foot
    assert torch.equal(d.placed[0, 0], t) and torch.equal(d.placed[1, 0], ell)
    assert torch.equal(d.gt[0, 0], t | ell)
    blurred = make_xaitris("lin", "white", 4, alpha=1.0)
    grown = torch.nn.functional.max_pool2d((t | ell).float()[None, None], 7, 1, 3)[0, 0] > 0
    assert (blurred.gt[0, 0] & ~grown).sum() == 0 and (t | ell)[~blurred.gt[0, 0]].sum() == 0


def test_rigid_gt_varies_and_keeps_the_shape():
    d = make_xaitris("rigid", "corr", 64, alpha=1.0, blur_sigma=0.0, seed=2)
    sizes = d.gt.flatten(1).sum(1)
    assert (sizes == 4 * 16).all()  # four 4x4 cells, sharp
    assert len({tuple(m.nonzero().min(0).values.tolist()) for m in d.gt[:, 0]}) > 20  # translated
    boxes = {tuple((m.nonzero().max(0).values - m.nonzero().min(0).values + 1).tolist()) for m in d.gt[:, 0]}
    assert boxes == {(12, 8), (8, 12)}  # rotated


def test_mult_changes_the_background_exactly_inside_the_pattern():
    plain = make_xaitris("mult", "corr", N, alpha=0.0, seed=5)
    mult = make_xaitris("mult", "corr", N, alpha=0.5, seed=5)
    changed = mult.x != plain.x
    assert torch.equal(changed, mult.placed)
    ratio = mult.x[mult.placed] / plain.x[mult.placed]
    assert ratio.min() >= 0.5 - 1e-5 and ratio.max() < 1.0
    assert torch.equal(mult.gt[0], mult.placed[mult.y == 0].any(0) | mult.placed[mult.y == 1].any(0))


def test_deterministic_given_seed():
    a = make_xaitris("rigid", "corr", N, seed=7)
    b = make_xaitris("rigid", "corr", N, seed=7)
    c = make_xaitris("rigid", "corr", N, seed=8)
    assert torch.equal(a.x, b.x) and torch.equal(a.gt, b.gt) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x) and not torch.equal(a.gt, c.gt)
    # the background draw does not depend on alpha or the scenario
    assert torch.equal(make_xaitris("lin", "white", 8, alpha=0.0, seed=7).x,
                       make_xaitris("xor", "white", 8, alpha=0.0, seed=7).x)


def _neighbour_corr(x: torch.Tensor) -> float:
    a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_corr_background_is_spatially_correlated():
    white = make_xaitris("lin", "white", N, alpha=0.0).x
    corr = make_xaitris("lin", "corr", N, alpha=0.0).x
    assert abs(_neighbour_corr(white)) < 0.05
    assert _neighbour_corr(corr) > 0.9
    assert 0.8 < float(corr.std()) < 1.2 and 0.9 < float(white.std()) < 1.1  # both normalised alike


def test_split_is_stratified_and_seeded():
    d = make_xaitris("lin", "white", 100)
    tr, va, te = split(d, (0.8, 0.1, 0.1), seed=1)
    assert (len(tr), len(va), len(te)) == (80, 10, 10)
    assert int(te.y.sum()) == 5 and int(va.y.sum()) == 5
    tr2, _, te2 = split(d, (0.8, 0.1, 0.1), seed=1)
    assert torch.equal(te.x, te2.x) and torch.equal(tr.y, tr2.y)
    assert not torch.equal(split(d, seed=2)[2].x, te.x)
    with pytest.raises(NemtError):
        split(d, (0.5, 0.5, 0.5))


def test_refuses_bad_arguments():
    with pytest.raises(NemtError, match="scenario"):
        make_xaitris("rot", "white", 4)
    with pytest.raises(NemtError, match="background"):
        make_xaitris("lin", "pink", 4)
    with pytest.raises(NemtError, match="alpha"):
        make_xaitris("lin", "white", 4, alpha=1.5)


@pytest.mark.parametrize("arch", ["linear", "mlp", "cnn"])
def test_small_models_build_with_and_without_input_size(arch):
    x = torch.randn(3, 1, 64, 64)
    net = build_model(arch, spatial_dims=2, in_channels=1, out_channels=2, input_size=(64, 64)).eval()
    lazy = build_model(arch, spatial_dims=2, in_channels=1, out_channels=2).eval()
    lazy.load_state_dict(net.state_dict())  # a lazy model takes its size from the weights
    assert net(x).shape == (3, 2) and torch.equal(lazy(x), net(x))


def test_cnn_learns_lin_white_and_round_trips(tmp_path):
    torch.set_num_threads(1)
    data = split(make_xaitris("lin", "white", 800, alpha=0.1, seed=0), seed=0)
    out = train_xaitris_models("lin", "white", models=("cnn",), epochs=5, seed=0, data=data,
                               out_dir=tmp_path, progress=False)
    clf, acc = out["cnn"]
    assert acc > 0.8  # chance is 0.5
    test = data[2]
    idx = correct_test_samples(clf, test)
    assert idx.dtype == torch.int64 and len(idx) == round(acc * len(test))
    assert (clf(test.x[idx]).argmax(1) == test.y[idx]).all()
    back = load_model(tmp_path / "cnn")
    assert back.card.label_names == ["class0", "class1"] and back.card.metrics["test_accuracy"] == acc
    assert torch.equal(back(test.x[:8]), clf(test.x[:8]))


def test_suite_nemt_folder_follows_the_resolved_parameters(monkeypatch, tmp_path):
    """A suite NEMt is read back only for the same resolved parameters: a changed default (here the fill,
    patched as a later version might change it) or another seed gives another folder, so a fit made under
    other settings is never reported as this one."""
    from nemt.bench.xaitris import suite_nemt_folder
    from nemt.explainers import NEMt
    from nemt.models import Classifier

    net = build_model("smallcnn", spatial_dims=2, in_channels=1, out_channels=2, width=4)
    clf = Classifier.from_module(net, spatial_dims=2, in_channels=1, input_size=(16, 16), task="multiclass",
                                 label_names=["a", "b"]).eval()
    params = {"epochs": 2}
    first = suite_nemt_folder(NEMt(clf, seed=0, **params), tmp_path)
    assert first == suite_nemt_folder(NEMt(clf, seed=0, **params), tmp_path)
    assert first != suite_nemt_folder(NEMt(clf, seed=1, **params), tmp_path)
    defaults = dict(NEMt.__init__.__kwdefaults__)
    assert defaults["occlusion"] != "inpaint+blur"
    monkeypatch.setattr(NEMt.__init__, "__kwdefaults__", {**defaults, "occlusion": "inpaint+blur"})
    assert first != suite_nemt_folder(NEMt(clf, seed=0, **params), tmp_path)


def test_suite_nemt_reads_back_one_fit_for_every_map_setting(tmp_path):
    """The map areas and the map smoothing shape only the map made from the fitted logits: they share one
    folder (no refit), and a fit read back gives the map asked for now, not the one it was saved with."""
    from nemt.bench.xaitris import fit_suite_nemt, suite_nemt_folder
    from nemt.explainers import NEMt
    from nemt.models import Classifier

    torch.manual_seed(0)
    net = build_model("smallcnn", spatial_dims=2, in_channels=1, out_channels=2, width=4)
    clf = Classifier.from_module(net, spatial_dims=2, in_channels=1, input_size=(16, 16), task="multiclass",
                                 label_names=["a", "b"]).eval()
    base = {"epochs": 1, "batch_size": 8}
    folder = suite_nemt_folder(NEMt(clf, seed=0, **base), tmp_path)
    for extra in ({"map_smoothing": False}, {"map_areas": [0.05, 0.1]}):
        assert suite_nemt_folder(NEMt(clf, seed=0, **base, **extra), tmp_path) == folder
    x = torch.randn(16, 1, 16, 16)
    data = XaiTrisData(x, torch.arange(16) % 2, torch.zeros_like(x, dtype=torch.bool),
                       torch.zeros_like(x, dtype=torch.bool))
    fitted = fit_suite_nemt(clf, data, tmp_path, base, progress=False)
    assert (folder / "explainer.json").is_file()
    back = fit_suite_nemt(clf, data, tmp_path, {**base, "map_smoothing": False, "map_areas": [0.05]},
                          progress=False)
    assert back.map_smoothing is False and list(back.map_areas) == [0.05]
    want = NEMt.load(folder, clf).set_map_areas([0.05]).set_map_smoothing(False)
    x = data.x[:4]
    assert torch.allclose(back.explain(x, target=0), want.explain(x, target=0))
    assert not torch.allclose(back.explain(x, target=0), fitted.explain(x, target=0))
