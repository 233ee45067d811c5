"""NEMt's robust (nested) objective: it cannot collapse, it lands on the finding of a saturated classifier,
and the collapse guard refuses a fit whose maps are empty."""
from __future__ import annotations

import inspect
import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from nemt.errors import NemtError
from nemt.explainers import NEMt
from nemt.explainers.nemt.estimator import DEFAULT_OCCLUSION, CollapseError
from nemt.explainers.nemt.losses import area_thresholds, game_loss, log_odds, nested_masks, staircase
from nemt.metrics import pointing_game, relevance_mass
from nemt.ops import ParameterError
from nemt.models import Classifier, build_model

FAST = dict(optimizer="adamw", batch_size=16, decoder_channels=(32, 16, 16, 8, 8), seed=0)


def test_log_odds_is_the_probability_log_odds_and_does_not_saturate():
    z = torch.tensor([[30.0, 0.0, -2.0], [0.5, 0.2, 0.1]], dtype=torch.float64)
    p = z.softmax(-1)
    # where p is representable, the smooth margin equals log(p / (1 - p)) (to float64 rounding)
    assert torch.allclose(log_odds(z, "multiclass")[1], (p / (1 - p)).log()[1], atol=1e-12)
    # p(class 0) = 1 - 1e-13: the probability's gradient p(1 - p) is ~1e-13, the log-odds' is 1
    z.requires_grad_(True)
    log_odds(z, "multiclass")[0, 0].backward()
    assert z.grad[0, 0].item() == pytest.approx(1.0)
    assert torch.equal(log_odds(z.detach(), "multilabel"), z.detach())
    assert torch.equal(log_odds(z.detach(), "regression", scale=2.0), z.detach() / 2)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_nested_masks_have_exactly_their_area_and_are_nested(dims):
    g = torch.Generator().manual_seed(0)
    shape = {1: (64,), 2: (24, 20), 3: (8, 10, 12)}[dims]
    logits = torch.randn(6, *shape, generator=g)
    n = logits[0].numel()
    prev = None
    for a in (0.05, 0.1, 0.3):
        m = nested_masks(logits, torch.full((6,), a))
        # forward values are binary with round(a * n) pixels each: neither empty nor full, whatever the logits
        # (the straight-through form b + s - s.detach() leaves one float32 rounding of s: 1e-6 covers it)
        assert torch.minimum(m, 1 - m).abs().max() < 1e-6
        assert torch.allclose(m.flatten(1).sum(1), torch.full((6,), float(round(a * n))), atol=1e-4)
        if prev is not None:
            assert ((m > 0.5) >= (prev > 0.5)).all()  # a larger area contains the smaller one
        prev = m
    # a constant map (a decoder that says nothing) still gives the masks their area
    flat = torch.zeros(2, 100)
    assert (area_thresholds(flat, torch.tensor([0.1])) == 0).all()


def test_nested_masks_gradient_reaches_the_logits():
    logits = torch.randn(2, 16, 16, requires_grad=True)
    m = nested_masks(logits, torch.tensor([0.1, 0.2]))
    (m * torch.randn(2, 16, 16)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_staircase_ranks_pixels_and_marks_the_smallest_area():
    logits = torch.arange(400, dtype=torch.float32).view(1, 1, 20, 20)
    e = staircase(logits, [0.05, 0.2])
    flat = e.flatten()
    assert flat.argsort().equal(torch.arange(400))  # strictly increasing with the logits: every pixel ranked
    # the top 3 % (inside the smallest mask) ~1, below the top 25 % (outside the largest) ~0
    assert flat[-12:].min() > 0.9 and flat[:300].max() < 0.01


def test_game_loss_scores_and_hinges():
    clean = torch.tensor([10.0, -6.0, 0.2])
    scale = torch.tensor([10.0, 6.0, 1.0])  # max(|c|, min_scale = 1)
    # deletion removes one scale of evidence and preservation keeps it all: both games won, loss 0
    loss, parts = game_loss(clean - scale, clean.clone(), clean)
    assert loss.item() == pytest.approx(0.0) and parts["s_del"] == pytest.approx(-1.0)
    # nothing happens under deletion, everything is lost under preservation: 1 + 1 per target
    loss, _ = game_loss(clean.clone(), clean - scale, clean)
    assert loss.item() == pytest.approx(2.0)
    # a game won beyond its goal pushes no further (hinge): no gradient
    m = torch.tensor([-30.0, 40.0], requires_grad=True)
    game_loss(m[:1], m[1:], torch.tensor([10.0]))[0].backward()
    assert m.grad.abs().sum().item() == 0


def test_preservation_bound_stops_the_gradient_of_a_lost_preservation_game():
    """``preservation_bound`` B: the preservation term is clamp(-s_pres, 0, B); lost by more than B, it stays
    at B with no gradient, inside the bound it is the plain hinge with gradient -1/S."""
    clean = torch.tensor([10.0, 10.0])  # S = 10
    m_del = torch.tensor([0.0, 0.0])  # deletion game won exactly: 0
    m_pres = torch.tensor([-20.0, 5.0], requires_grad=True)  # s_pres = -3 (lost beyond B = 1) and -0.5
    loss, _ = game_loss(m_del, m_pres, clean, preservation_bound=1.0)
    assert loss.item() == pytest.approx((1.0 + 0.5) / 2)
    loss.backward()
    assert m_pres.grad.tolist() == pytest.approx([0.0, -1 / 10 / 2])
    # without the bound the lost game keeps pulling: 3 and a gradient on both
    m_pres.grad = None
    loss, _ = game_loss(m_del, m_pres, clean)
    assert loss.item() == pytest.approx((3.0 + 0.5) / 2)
    loss.backward()
    assert m_pres.grad.tolist() == pytest.approx([-1 / 20, -1 / 20])


def test_preservation_weight_scales_the_preservation_term_only():
    """``preservation_weight`` w: loss = relu(1 + s_del) + w * clamp(-s_pres, 0, B); w = 0 is the deletion game
    alone, and the deletion term's gradient does not depend on w."""
    clean = torch.tensor([10.0, 10.0])  # S = 10
    m_del = torch.tensor([5.0, 10.0], requires_grad=True)  # s_del = -0.5 and 0: deletion terms 0.5 and 1
    m_pres = torch.tensor([0.0, 5.0], requires_grad=True)  # s_pres = -1 and -0.5
    for w in (0.0, 0.5, 1.0):
        m_del.grad = m_pres.grad = None
        loss, _ = game_loss(m_del, m_pres, clean, preservation_bound=2.0, preservation_weight=w)
        assert loss.item() == pytest.approx((0.5 + 1.0 + w * (1.0 + 0.5)) / 2)
        loss.backward()
        assert m_del.grad.tolist() == pytest.approx([1 / 10 / 2] * 2)
        assert m_pres.grad.tolist() == pytest.approx([-w / 10 / 2] * 2)
    alone, _ = game_loss(m_del, m_pres, clean, games="deletion")
    assert game_loss(m_del, m_pres, clean, preservation_weight=0.0)[0].item() == pytest.approx(alone.item())
    with pytest.raises(ParameterError, match="preservation_weight"):
        NEMt(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)), input_size=(4, 4), in_channels=1,
             preservation_weight=-1.0)


def _untrained_clf(size: int = 32) -> Classifier:
    """An untrained 4-channel smallcnn on (1, size, size) images with 3 classes, wrapped as a classifier (drawn
    from the global RNG: callers seed it first)."""
    net = build_model("smallcnn", spatial_dims=2, in_channels=1, out_channels=3, width=4)
    return Classifier.from_module(net, spatial_dims=2, in_channels=1, input_size=(size, size), task="multiclass",
                                  label_names=["a", "b", "c"]).eval()


# -- a saturated classifier: softmax > 0.999 on its finding ----------------------------------------------

def _toy(n: int, g: torch.Generator, size: int = 32, side: int = 8):
    """Noise images; class 1 has a bright square, class 2 a dark square, class 0 none. Returns x, y, masks."""
    x = torch.randn(n, 1, size, size, generator=g) * 0.5
    y = torch.randint(0, 3, (n,), generator=g)
    m = torch.zeros(n, 1, size, size)
    for i in range(n):
        r, c = torch.randint(0, size - side + 1, (2,), generator=g).tolist()
        if y[i] > 0:
            m[i, 0, r:r + side, c:c + side] = 1
            x[i, 0, r:r + side, c:c + side] += 1.5 if y[i] == 1 else -1.5
    return x, y, m


@pytest.fixture(scope="module")
def saturated():
    """A smallcnn trained on the toy, its logits scaled by 8: p(true) > 0.999 on the test findings."""
    g = torch.Generator().manual_seed(0)
    x, y, _ = _toy(512, g)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = build_model("smallcnn", spatial_dims=2, in_channels=1, out_channels=3, width=8)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(4):
        for i in range(0, len(x), 32):
            loss = torch.nn.functional.cross_entropy(net(x[i:i + 32]), y[i:i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        net.fc.weight.mul_(8)
        net.fc.bias.mul_(8)
    clf = Classifier.from_module(net, spatial_dims=2, in_channels=1, input_size=(32, 32), task="multiclass",
                                 label_names=["none", "bright", "dark"]).eval()
    xt, yt, mt = _toy(96, g)
    with torch.no_grad():
        p = clf(xt).softmax(1)[torch.arange(len(yt)), yt]
    f = yt > 0
    assert (p[f] > 0.999).float().mean() > 0.95, "the toy classifier is not saturated; the test means nothing"
    train = [(x[i:i + 16], y[i:i + 16]) for i in range(0, len(x), 16)]
    return clf, train, (xt[f], yt[f], mt[f])


@pytest.mark.slow
def test_nested_objective_lands_on_the_finding_of_a_saturated_classifier(saturated):
    clf, train, (x, y, m) = saturated
    e = NEMt(clf, **FAST).fit(train, epochs=3, val_data=[(x, y)], progress=False, log=lambda s: None)
    maps = e.explain(x, target=y)
    # the finding is 64 of 1024 pixels: a map with no idea puts ~6 % of its mass there and points in it 6 % of
    # the time; the paper's loss gives empty maps here (relevance mass 0.04-0.06, pointing game 0, seeds 0-2),
    # this objective 0.99-1.00 and 1.0 unbounded (seeds 0-2), 0.97 and 1.0 with the default preservation bound
    # 2 (seed 0; bound 1 fails here: 0.51 and 0.52, docs/results.md): 0.8 leaves room for other CPUs' rounding
    assert e.collapse_["collapsed"] == []
    assert (maps.flatten(1).amax(1) >= 0.5).all()  # no empty map
    assert pointing_game(maps, m).nanmean() >= 0.9
    assert relevance_mass(maps, m).nanmean() >= 0.8


@pytest.mark.slow
def test_paper_objective_collapses_there_and_the_guard_refuses_it(saturated, tmp_path):
    clf, train, (x, y, _) = saturated
    e = NEMt(clf, objective="paper", **FAST)
    with pytest.raises(CollapseError, match="collapsed for target") as info:
        e.fit(train, epochs=2, val_data=[(x, y)], out_dir=tmp_path, progress=False, log=lambda s: None)
    assert {"bright", "dark"} <= set(info.value.report["collapsed"])
    assert "The paper's objective collapses on confident classifiers" in str(info.value)  # advice fits the case
    assert not (tmp_path / "explainer.json").exists()  # nothing useless saved
    assert json.loads((tmp_path / "collapse.json").read_text())["collapsed"] == info.value.report["collapsed"]


def test_cli_fit_fails_loudly_on_a_broken_fit(tmp_path):
    """A deliberately broken fit (paper objective, masks started at keep-everything, no learning): exit 3."""
    from conftest import train_phantom_model
    from nemt.cli import app

    manifest, _ = train_phantom_model(tmp_path)
    runner = CliRunner()
    args = ["fit", "--model", str(tmp_path / "m"), "--data", str(manifest), "--epochs", "1", "--batch-size", "8",
            "--no-progress", "--decoder-channels", "16,8,8,8,8"]
    res = runner.invoke(app, args + ["--out", str(tmp_path / "broken"), "--objective", "paper",
                                     "--init-keep", "0.99999", "--lr", "1e-12"])
    assert res.exit_code == 3, res.output
    assert "collapsed for target" in res.output and not (tmp_path / "broken" / "explainer.json").exists()
    # the default objective on the same data: not collapsed, saved
    res = runner.invoke(app, args + ["--out", str(tmp_path / "ok")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.rindex('{\n  "explainer"'):])["collapsed"] == []
    assert (tmp_path / "ok" / "explainer.json").is_file()


def test_cli_fit_areas_default_is_the_library_default():
    """`nemt fit` and `NEMt(...)` train the same areas when no flag is given (two literals, one value)."""
    import typer.main

    from nemt.cli import app
    from nemt.explainers.nemt.estimator import (DEFAULT_AREAS, DEFAULT_OCCLUSION, DEFAULT_PRESERVATION_BOUND,
                                                DEFAULT_PRESERVATION_WEIGHT)

    fit = typer.main.get_command(app).commands["fit"]
    default = next(p.default for p in fit.params if p.name == "areas")
    assert tuple(float(a) for a in default.split(",")) == DEFAULT_AREAS
    bound = next(p.default for p in fit.params if p.name == "preservation_bound")
    assert bound == inspect.signature(NEMt).parameters["preservation_bound"].default == DEFAULT_PRESERVATION_BOUND
    weight = next(p.default for p in fit.params if p.name == "preservation_weight")
    assert weight == inspect.signature(NEMt).parameters["preservation_weight"].default == DEFAULT_PRESERVATION_WEIGHT
    occlusion = next(p.default for p in fit.params if p.name == "occlusion")
    assert occlusion == inspect.signature(NEMt).parameters["occlusion"].default == DEFAULT_OCCLUSION
    smooth = next(p.default for p in fit.params if p.name == "map_smoothing")
    assert smooth is inspect.signature(NEMt).parameters["map_smoothing"].default is False


def test_unsmoothed_map_is_the_top_area_of_the_logits_and_old_cards_stay_smoothed(tmp_path):
    """``map_smoothing=False``: the map is the staircase of the logits as they are, so with the decoder at the
    image's resolution its peak is exactly the largest logit, with no tie (the linear tie-break);
    ``map_smoothing=True`` adds the smoothing operator, and ``set_map_smoothing`` switches without a refit;
    a card saved before the option existed loads smoothed, with the inpainting fill, as it was made."""
    clf = _untrained_clf()
    ex = NEMt(clf, decoder_full_resolution=True, map_smoothing=False, **FAST).init_module()
    assert ex.hyper_params()["map_smoothing"] is False and ex.hyper_params()["occlusion"] == DEFAULT_OCCLUSION
    x = torch.randn(6, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        logits = ex.module_.logits(x)[0][torch.arange(6), t]
        raw = ex.explain(x, target=t)[:, 0]
        assert torch.equal(raw.flatten(1).argmax(1), logits.flatten(1).argmax(1))
        assert ((raw.flatten(1) == raw.flatten(1).amax(1, keepdim=True)).sum(1) == 1).all()  # one maximum
        # the top 1 % (10 of 1024 pixels) are the map's 1-steps, every other pixel below 0.5
        assert ((raw >= 0.5).flatten(1).sum(1) == 10).all()
        smoothed = ex.set_map_smoothing(True).explain(x, target=t)[:, 0]
        # the smoothed map is the box of the steps (their tie-breaks differ by at most tie_break = 1e-3)
        assert torch.allclose(smoothed, ex.module_.smoothing(raw.unsqueeze(1))[:, 0], atol=1e-3)
        assert not torch.allclose(smoothed, raw, atol=1e-2)
    ex.set_map_smoothing(False).save(tmp_path / "new")
    assert NEMt.load(tmp_path / "new", clf).map_smoothing is False
    card = json.loads((tmp_path / "new" / "explainer.json").read_text())
    for key in ("map_smoothing", "occlusion"):
        del card["params"][key]
    (tmp_path / "new" / "explainer.json").write_text(json.dumps(card))
    old = NEMt.load(tmp_path / "new", clf)
    assert old.map_smoothing is True and old.module_.map_smoothing is True and old.occlusion == "inpaint"
    with torch.no_grad():
        assert torch.equal(old.explain(x, target=t)[:, 0], smoothed)
    assert NEMt(clf).map_smoothing is False  # the default since 2026-11-29



def test_default_box_is_the_nested_rule_for_images_and_volumes_and_the_paper_box_elsewhere(tmp_path):
    """The smoothing box when ``kernel_size`` is unset: 30/224 of the shortest side (odd) for the nested
    objective on images and volumes (13 at 96 px, 17 at 128, 9 at 64, 5 at 32³), 21/224 for the paper's
    objective and NEM (9 at 96 px, 13 at 128), and the 21 px box's 0.88 % share on a signal (9 of 1,000
    samples). An explicit ``kernel_size`` wins; a card without ``fitted.kernel_size`` (hand-made: every
    saved card has it) loads with the paper's box, not the nested rule."""
    from nemt.explainers import NEM

    def clf(dims: int, size: int) -> Classifier:
        net = build_model("smallcnn", spatial_dims=dims, in_channels=1, out_channels=3, width=4)
        return Classifier.from_module(net, spatial_dims=dims, in_channels=1, input_size=(size,) * dims,
                                      task="multiclass", label_names=["a", "b", "c"]).eval()

    def box(ex) -> int:
        return ex.init_module().kernel_size_

    torch.manual_seed(0)
    small = dict(decoder_channels=(8, 8, 8, 8, 8))
    for dims, size, nested, paper in ((2, 96, 13, 9), (2, 128, 17, 13), (2, 64, 9, 7), (3, 32, 5, 3),
                                     (1, 1000, 9, 9)):
        model = clf(dims, size)
        assert box(NEMt(model, **small)) == nested, (dims, size)
        assert box(NEMt(model, objective="paper", **small)) == paper, (dims, size)
        assert box(NEM(model, **small)) == paper, (dims, size)
    model = clf(2, 96)
    assert box(NEMt(model, kernel_size=5, **small)) == 5
    NEMt(model, **small).init_module().save(tmp_path / "e")
    card = json.loads((tmp_path / "e" / "explainer.json").read_text())
    assert card["fitted"]["kernel_size"] == 13
    del card["fitted"]["kernel_size"]
    (tmp_path / "e" / "explainer.json").write_text(json.dumps(card))
    assert NEMt.load(tmp_path / "e", model).kernel_size_ == 9

def test_a_fitted_explainer_takes_only_its_explanation_time_parameters(tmp_path):
    """``get_explainer("nemt", path=..., map_smoothing=False, map_areas=...)`` (``--param nemt.KEY=V`` of
    benchmark and explain) gives the maps of the setters, no refit; any other parameter of a fitted explainer
    is refused, and so are values of the wrong kind (a string is not a switch: bool("false") is True)."""
    from nemt.explainers import get_explainer

    clf = _untrained_clf()
    NEMt(clf, **FAST).init_module().save(tmp_path / "e")
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 1, 2, 0])
    want = NEMt.load(tmp_path / "e", clf).set_map_smoothing(False).set_map_areas([0.05])
    got = get_explainer("nemt", clf, path=tmp_path / "e", map_smoothing=False, map_areas=0.05)
    assert got.map_smoothing is False and got.map_areas == [0.05]
    with torch.no_grad():
        assert torch.equal(got.explain(x, target=t), want.explain(x, target=t))
        assert not torch.equal(got.explain(x, target=t), get_explainer("nemt", clf, path=tmp_path / "e").explain(
            x, target=t))
    with pytest.raises(NemtError, match=r"not \['epochs'\] \(only \['student_map', 'map_areas', 'map_smoothing'\] may change"):
        get_explainer("nemt", clf, path=tmp_path / "e", epochs=3)
    with pytest.raises(NemtError, match="map_smoothing must be true or false"):
        get_explainer("nemt", clf, path=tmp_path / "e", map_smoothing="false")
    with pytest.raises(NemtError, match="map_areas must be fractions"):
        get_explainer("nemt", clf, path=tmp_path / "e", map_areas="0.05")


def test_linear_order_resolves_the_top_of_far_outlying_logits():
    """A sigmoid of logits many standard deviations above their mean is 1 to within a float32 ulp, so the
    sigmoid tie-break leaves the top pixels of an unsmoothed map tied; the linear one keeps them apart. Both
    orders rank every pixel the same way where they are resolved."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 1, 64, 64, generator=g)
    logits.view(4, -1)[:, :20] = 12 + torch.linspace(0, 0.5, 20)  # 20 pixels 12-12.5 sd above the rest
    for order, tied in (("sigmoid", True), ("linear", False)):
        m = staircase(logits, [0.01], order=order).flatten(1)
        top = (m == m.amax(1, keepdim=True)).sum(1)
        assert bool((top > 1).all()) is tied, (order, top)
    lin = staircase(logits, [0.01], order="linear").flatten(1)
    assert torch.equal(lin.argmax(1), torch.full((4,), 19))
    with pytest.raises(Exception, match="order"):
        staircase(logits, [0.01], order="rank")


@pytest.mark.parametrize("dims", [1, 2])
def test_flip_mirrors_about_half_the_training_images_of_a_step(dims):
    """``flip=True``: the step explains about half of its images mirrored along the last axis (the frozen model
    sees the mirrored image too, so the games are exact), labels untouched; signals (1D) are never mirrored,
    their time has a direction. ``flip=False`` (the default) leaves every image as it is."""
    size = (16,) * dims
    net = build_model("smallcnn", spatial_dims=dims, in_channels=1, out_channels=3, width=4)
    clf = Classifier.from_module(net, spatial_dims=dims, in_channels=1, input_size=size, task="multiclass",
                                 label_names=["a", "b", "c"]).eval()
    x, y = torch.randn(64, 1, *size), torch.randint(0, 3, (64,))
    for flip in (True, False):
        ex = NEMt(clf, flip=flip, **FAST).init_module()
        seen = []
        real = ex._logits
        ex._logits = lambda xb: (seen.append(xb.clone()), real(xb))[1]
        ex._step(x, y, torch.Generator().manual_seed(0))
        changed = (seen[0] != x).flatten(1).any(1)
        if flip and dims > 1:
            assert 16 <= int(changed.sum()) <= 48
            assert torch.equal(seen[0][changed], x[changed].flip(-1))
        else:
            assert not changed.any()
    assert NEMt(clf, flip=True, **FAST).hyper_params()["flip"] is True  # the card records it


def test_inpaint_plus_blur_plays_each_game_with_both_fills():  # and the blur background alone
    """``occlusion="inpaint+blur"``: the deletion and preservation games once with the inpainting fill and once
    with the blur, the loss their equal mean: the first half of each game equals the inpainting explainer's
    games, the second half the blur explainer's (same module, same masks; float rounding only)."""
    torch.manual_seed(0)
    clf = _untrained_clf()
    both = NEMt(clf, occlusion="inpaint+blur", **FAST).init_module()
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([[0], [2], [1]])
    areas = torch.tensor([0.05, 0.1, 0.2])
    with torch.no_grad():
        logits, out = both._logits(x)
        got = both._games(x, logits, out, t, areas)
        for i, kind in enumerate(("inpaint", "blur")):
            one = NEMt(clf, occlusion=kind, **FAST)
            one.module_ = both.module_
            want = one._games(x, logits, out, t, areas)
            for g, w in zip(got, want):
                assert g.shape == (6,) and torch.allclose(g[3 * i:3 * i + 3], w, atol=1e-5)
    # the two fills do differ; the untrained classifier barely tells them apart (its games' values agree to
    # about 1e-4), so the fills are compared as images, not through its outputs
    assert (both._filled(x, "inpaint") - both._filled(x, "blur")).abs().amax() > 0.1
    # "inpaint+blur-background": deletion as with inpainting, preservation as with the blur (its background)
    mixed = NEMt(clf, occlusion="inpaint+blur-background", **FAST)
    mixed.module_ = both.module_
    with torch.no_grad():
        m_del, m_pres, clean = mixed._games(x, logits, out, t, areas)
    assert torch.allclose(m_del, got[0][:3], atol=1e-5) and torch.allclose(m_pres, got[1][3:], atol=1e-5)
    assert torch.allclose(clean, got[2][:3])


def test_mean_image_background_is_the_training_mean_and_changes_only_the_preservation_game():
    """``occlusion="inpaint+mean-image"``: the preservation game keeps the mask on the training images' pixel-wise
    mean instead of the constant data-set mean that inpainting with nothing kept gives. So with a mean image of
    0 (the normalised data-set mean) its games equal the inpainting explainer's exactly, and with another mean
    image only the preservation game changes. The mean image is that of every training image, whether the data
    come as batches or as a map-style data set of items."""
    torch.manual_seed(0)
    clf = _untrained_clf()
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(10, 1, 32, 32, generator=g), torch.randint(0, 3, (10,), generator=g)
    mi = NEMt(clf, occlusion="inpaint+mean-image", **FAST)
    mi._set_mean_image([(xs[:4], ys[:4]), (xs[4:], ys[4:])])
    # float64 sums against torch's float32 mean: they differ by float32 rounding only
    assert mi.mean_image_.shape == (1, 1, 32, 32) and torch.allclose(mi.mean_image_, xs.mean(0, keepdim=True),
                                                                      atol=1e-6)

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(xs)

        def __getitem__(self, i):
            return {"image": xs[i], "y": ys[i]}
    mi._set_mean_image(Items())
    assert torch.allclose(mi.mean_image_, xs.mean(0, keepdim=True), atol=1e-6)
    rng = torch.get_rng_state()  # a shuffled loader is read as given, without a draw from the caller's RNG
    mi._set_mean_image(torch.utils.data.DataLoader(Items(), batch_size=3, shuffle=True))
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.allclose(mi.mean_image_, xs.mean(0, keepdim=True), atol=1e-6)
    NEMt(clf, occlusion="inpaint", **FAST)._set_mean_image(None)  # no mean-image game: the data are not read at all
    with pytest.raises(NemtError, match="one-shot iterator"):  # reading the mean would leave nothing to train on
        mi._set_mean_image(iter([(xs, ys)]))

    mi.init_module()
    plain = NEMt(clf, occlusion="inpaint", **FAST)
    plain.module_ = mi.module_
    x, t, areas = xs[:3], torch.tensor([[0], [2], [1]]), torch.tensor([0.05, 0.1, 0.2])
    with torch.no_grad():
        logits, out = mi._logits(x)
        want = plain._games(x, logits, out, t, areas)
        mi.mean_image_ = torch.zeros(1, 1, 32, 32)
        for a, b in zip(mi._games(x, logits, out, t, areas), want):
            assert torch.allclose(a, b, atol=1e-6)
        mi.mean_image_ = 5 * torch.randn(1, 1, 32, 32, generator=g)
        m_del, m_pres, clean = mi._games(x, logits, out, t, areas)
    assert torch.allclose(m_del, want[0], atol=1e-6) and torch.allclose(clean, want[2])
    assert not torch.allclose(m_pres, want[1], atol=1e-3)


def test_mean_image_occlusion_deletes_by_the_mean_image_and_keeps_on_it():
    """``occlusion="mean-image"``: the deleted region becomes the training images' pixel-wise mean (x·k + mean·(1-k))
    and the preservation game keeps the mask on the mean image; the deletion input is exactly that
    composition, the preservation game equals ``inpaint+mean-image``'s (same background), and the deletion game
    differs from inpainting's (a region inside a homogeneous finding is refilled from the finding by inpainting,
    by the mean image here)."""
    torch.manual_seed(0)
    clf = _untrained_clf()
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(10, 1, 32, 32, generator=g), torch.randint(0, 3, (10,), generator=g)
    mi = NEMt(clf, occlusion="mean-image", **FAST)
    mi._set_mean_image([(xs, ys)])  # the games play on the mean image: it is read
    assert torch.allclose(mi.mean_image_, xs.mean(0, keepdim=True), atol=1e-6)  # float32 rounding only
    keep = (torch.rand(3, 1, 32, 32, generator=g) > 0.5).float()
    torch.testing.assert_close(mi._occlude(xs[:3], keep), xs[:3] * keep + mi.mean_image_ * (1 - keep))
    mi.init_module()
    mi.mean_image_ = 5 * torch.randn(1, 1, 32, 32, generator=g)  # far from the noise images' local means
    bg = NEMt(clf, occlusion="inpaint+mean-image", **FAST)
    bg.module_, bg.mean_image_ = mi.module_, mi.mean_image_
    x, t, areas = xs[:3], torch.tensor([[0], [2], [1]]), torch.tensor([0.3, 0.5, 0.7])  # large: a clear change
    with torch.no_grad():
        logits, out = mi._logits(x)
        m_del, m_pres, clean = mi._games(x, logits, out, t, areas)
        want = bg._games(x, logits, out, t, areas)
    assert torch.allclose(m_pres, want[1], atol=1e-6) and torch.allclose(clean, want[2])
    assert not torch.allclose(m_del, want[0], atol=1e-3)


def test_either_fill_scores_the_deletion_game_by_the_fill_that_removes_more():
    """``occlusion="inpaint-or-mean-image"``: one deletion game played with both fills and scored by the one that
    lowers the target's log-odds more (a region matters if some fill of it removes the evidence), so its deletion
    log-odds are the elementwise minimum of the inpainting and the mean-image explainers' (same module, masks and
    mean image); the preservation game keeps the mask on the mean image, as ``mean-image``'s does; one game of
    each kind, so the loss weighs them as the default does. Where one image is occluded once (collapse guard)
    the fill is inpainting. The training step reaches the decoder through either fill."""
    from nemt.explainers.nemt.losses import first_fill, uses_mean_image
    torch.manual_seed(0)
    clf = _untrained_clf()
    with torch.no_grad():  # a classifier whose outputs follow the pixels strongly, so that the two fills differ
        for m in clf.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(3.0)
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(10, 1, 32, 32, generator=g)
    either = NEMt(clf, occlusion="inpaint-or-mean-image", **FAST).init_module()
    either.mean_image_ = 2 * torch.randn(1, 1, 32, 32, generator=g)
    assert first_fill("inpaint-or-mean-image") == "inpaint" and uses_mean_image("inpaint-or-mean-image")
    assert not uses_mean_image("inpaint")
    x, t = xs[:6], torch.tensor([[0], [2], [1], [1], [0], [2]])
    areas = torch.tensor([0.05, 0.1, 0.2, 0.3, 0.5, 0.7])
    with torch.no_grad():
        logits, out = either._logits(x)
        m_del, m_pres, clean = either._games(x, logits, out, t, areas)
        one = {}
        for kind in ("inpaint", "mean-image"):
            e = NEMt(clf, occlusion=kind, **FAST)
            e.module_, e.mean_image_ = either.module_, either.mean_image_
            one[kind] = e._games(x, logits, out, t, areas)
    assert m_del.shape == m_pres.shape == clean.shape == (6,)
    torch.testing.assert_close(m_del, torch.minimum(one["inpaint"][0], one["mean-image"][0]), atol=1e-5, rtol=0)
    gap = one["inpaint"][0] - one["mean-image"][0]
    assert (gap > 1e-3).any() and (gap < -1e-3).any()  # each fill removes more for some samples: both are used
    torch.testing.assert_close(m_pres, one["mean-image"][1], atol=1e-5, rtol=0)
    torch.testing.assert_close(clean, one["inpaint"][2])
    keep = (torch.rand(2, 1, 32, 32, generator=g) > 0.5).float()
    torch.testing.assert_close(either._occlude(xs[:2], keep), NEMt(clf, occlusion="inpaint", **FAST)._occlude(
        xs[:2], keep))
    loss, _ = either._step(xs[:4], torch.tensor([0, 1, 2, 0]), torch.Generator().manual_seed(2))
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in either.module_.parameters())


def test_outpaint_continues_the_kept_region_and_falls_back_to_the_mean_image():
    """``occlusion="inpaint+outpaint"``'s preservation input: the mask kept as it is; a hole enclosed by a kept
    ring filled from the ring (a ring of dark tissue stays dark inside, where a fixed background would draw a
    brighter patch there, i.e. evidence the image does not have); far from everything kept, the mean image."""
    torch.manual_seed(0)
    clf = _untrained_clf(64)
    e = NEMt(clf, occlusion="inpaint+outpaint", **FAST)
    e._set_mean_image([(torch.ones(2, 1, 64, 64), None)])  # mean image 1 everywhere
    x = torch.full((1, 1, 64, 64), -1.0)  # dark tissue
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    r = ((yy - 16) ** 2 + (xx - 16) ** 2).sqrt()
    keep = ((r >= 3) & (r < 8)).float().view(1, 1, 64, 64)  # a ring around a hole of radius 3 px
    with torch.no_grad():
        out = e._outpaint(x, keep)
    assert torch.equal(out[keep > 0], x[keep > 0])
    # fill = (blur(x k) + 0.1 mean) / (blur(k) + 0.1): inside the ring blur(k) is at least 0.5 (sigma 4 px at
    # 64 px), so the hole is within 0.1 / 0.6 of the way from the ring's -1 to the mean image's +1
    hole = out[0, 0][r < 2]
    assert (hole < -1 + 2 * 0.1 / 0.6).all()
    assert torch.allclose(out[0, 0, 48:, 48:], torch.ones(16, 16), atol=1e-3)  # 32+ px away: the mean image


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("occlusion", ["inpaint+mean-image", "inpaint+outpaint", "mean-image",
                                       "inpaint-and-mean-image", "inpaint-or-mean-image"])
def test_mean_image_backgrounds_train_signals_and_volumes(dims, occlusion):
    """Both backgrounds take any ``spatial_dims``: a 1-epoch fit on signals and volumes reads its training mean
    (1, C, *spatial), and the training step's loss is finite and reaches the decoder."""
    size = (32,) if dims == 1 else (16,) * 3
    net = build_model("smallcnn", spatial_dims=dims, in_channels=2, out_channels=3, width=4)
    clf = Classifier.from_module(net, spatial_dims=dims, in_channels=2, input_size=size, task="multiclass",
                                 label_names=["a", "b", "c"]).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 2, *size, generator=g), torch.randint(0, 3, (8,), generator=g)
    ex = NEMt(clf, occlusion=occlusion, **FAST)
    rng = torch.get_rng_state()
    ex.fit([(x[:4], y[:4]), (x[4:], y[4:])], epochs=1, progress=False, log=lambda s: None)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's global RNG is left as it was
    assert ex.mean_image_.shape == (1, 2, *size)
    assert torch.allclose(ex.mean_image_, x.mean(0, keepdim=True), atol=1e-6)  # float32 rounding only
    loss, _ = ex._step(x[:4], y[:4], torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ex.module_.parameters())


def test_bad_parameters_and_hand_edited_cards_are_refused_naming_the_field(tmp_path):
    """Parameters a user can type (`nemt fit` options) or edit in explainer.json are checked where NEMt is made
    or loaded, with the field and the reason: init_keep 0 or 1 (logit of the mask head's start), a kernel wider
    than twice the input, blur_sigma 0 (it used to mean the default silently) or negative, an area_target that
    is no fraction, teacher parameters without a teacher, more targets per image than outputs, a zero map
    temperature (all-NaN maps), a map area that is no number; in a card also a missing params object, a
    fitted input size or kernel the model cannot have, weights of another decoder (one line)."""
    from nemt.errors import CardError

    clf = _untrained_clf()
    for bad, match in (({"init_keep": 0.0}, "init_keep must be a fraction"), ({"init_keep": 1}, "init_keep"),
                       ({"kernel_size": 999}, "kernel_size 999 is too large for inputs of \\[32, 32\\]"),
                       ({"blur_sigma": 0}, "blur_sigma must be a finite number of pixels > 0"),
                       ({"blur_sigma": -2.0}, "blur_sigma"), ({"min_scale": 0}, "min_scale"),
                       ({"objective": "paper", "area_target": 2.0}, "area_target must be a fraction"),
                       ({"teacher_params": {"steps": 3}}, "need a teacher"),
                       ({"targets_per_image": 10}, "more than the model's 3 outputs"),
                       ({"map_temperature": 0}, "map_temperature must be a finite number > 0"),
                       ({"map_areas": "x"}, "map_areas must be fractions")):
        with pytest.raises(NemtError, match=match):
            NEMt(clf, **bad)
    assert NEMt(clf, kernel_size=65)._fill_sigma() > 0  # half of 65 fits a 32-px side
    NEMt(clf, **FAST).init_module().save(tmp_path / "e")
    good = json.loads((tmp_path / "e" / "explainer.json").read_text())
    for edit, field, match in (
            (lambda c: c.pop("params"), "params", "missing or not an object"),
            (lambda c: c["params"].update(map_areas="x"), "params.map_areas", "params.map_areas: must be fractions"),
            (lambda c: c["params"].update(map_temperature=0), "params.map_temperature", "finite number > 0"),
            (lambda c: c["params"].update(blur_sigma=-1), "params.blur_sigma", "finite number of pixels > 0"),
            (lambda c: c["params"].update(map_smoothing="no"), "params.map_smoothing", "must be true or false"),
            (lambda c: c["fitted"].update(input_size=[64, 64]), "fitted.input_size", "the model takes \\[32, 32\\]"),
            (lambda c: c["fitted"].update(kernel_size=-3), "fitted.kernel_size", "positive integer"),
            (lambda c: c["params"].update(decoder_channels=[4]), None, "weights do not fit the explainer")):
        card = json.loads(json.dumps(good))
        edit(card)
        (tmp_path / "e" / "explainer.json").write_text(json.dumps(card))
        with pytest.raises(CardError, match=match) as info:
            NEMt.load(tmp_path / "e", clf)
        assert "\n" not in str(info.value)
        if field is not None:
            assert info.value.field == field


def test_every_field_of_a_hand_edited_card_is_checked_on_load(tmp_path):
    """Each field of explainer.json is checked where it is read, with the file, the field (``params.NAME``,
    ``fitted.NAME``) and the reason on one line: a parameter NEMt does not have (or the device, the loader's
    choice), a number or count of the wrong type, a flag that is no boolean ("no" read as true), decoder widths
    that are no counts, an input size or channel count or map count the model does not have, layers the model
    does not have, a fitted epoch count or history of the wrong type, a card that is no JSON object."""
    from nemt.errors import CardError

    clf = _untrained_clf()
    NEMt(clf, **FAST).init_module().save(tmp_path / "e")
    path = tmp_path / "e" / "explainer.json"
    good = json.loads(path.read_text())
    for edit, field, reason in (
            (lambda c: c["params"].update(foo=1), "params.foo", "not a parameter of NEMt"),
            (lambda c: c["params"].update(device="cuda"), "params.device", "not a parameter of NEMt"),
            (lambda c: c["params"].update(decoder_channels="x"), "params.decoder_channels", "channel counts >= 1"),
            (lambda c: c["params"].update(decoder_channels=[0, -1]), "params.decoder_channels", "channel counts"),
            (lambda c: c["params"].update(decoder_full_resolution="no"), "params.decoder_full_resolution",
             "must be true or false"),
            (lambda c: c["params"].update(flip="yes"), "params.flip", "must be true or false"),
            (lambda c: c["params"].update(seed="x"), "params.seed", "whole number >= 0"),
            (lambda c: c["params"].update(epochs=-1), "params.epochs", "whole number >= 1"),
            (lambda c: c["params"].update(batch_size="16"), "params.batch_size", "whole number >= 1"),
            (lambda c: c["params"].update(lr=-1), "params.lr", "finite number > 0"),
            (lambda c: c["params"].update(present_fraction="x"), "params.present_fraction", "fraction in \\[0, 1\\]"),
            (lambda c: c["params"].update(preservation_weight="x"), "params.preservation_weight", "finite number"),
            (lambda c: c["params"].update(teacher_params={"steps": 3}), "params.teacher_params", "need a teacher"),
            (lambda c: c["params"].update(input_size=[64, 64]), "params.input_size", "the model takes \\[32, 32\\]"),
            (lambda c: c["params"].update(in_channels=3), "params.in_channels", "the model takes 1"),
            (lambda c: c["params"].update(layers=["nope"]), "params.layers", "not layers of the model"),
            (lambda c: c["fitted"].update(layers=["nope"]), "fitted.layers", "\\['nope'\\] are not layers"),
            (lambda c: c["fitted"].update(layers=3), "fitted.layers", "list of the model's layer names"),
            (lambda c: c["fitted"].update(kernel_size=999), "fitted.kernel_size", "at most 65"),
            (lambda c: c["fitted"].update(in_channels=3), "fitted.in_channels", "the model takes 1"),
            (lambda c: c["fitted"].update(epochs="x"), "fitted.epochs", "whole number >= 0"),
            (lambda c: c.update(history="x"), "history", "must be a list"),
            (lambda c: c.update(n_maps=9), "n_maps", "the model has 3 outputs")):
        card = json.loads(json.dumps(good))
        edit(card)
        path.write_text(json.dumps(card))
        with pytest.raises(CardError, match=f"{field}: .*{reason}") as info:
            NEMt.load(tmp_path / "e", clf)
        assert info.value.field == field and info.value.path == str(path) and "\n" not in str(info.value)
    path.write_text("[1, 2]")
    with pytest.raises(CardError, match="card must be a JSON object"):
        NEMt.load(tmp_path / "e", clf)
    path.write_text(json.dumps(good))  # the card as saved still loads
    assert NEMt.load(tmp_path / "e", clf).module_ is not None


def test_bad_constructor_parameters_name_the_parameter():
    """NEMt's own parameters beyond the CLI's: counts, flags, weights, the teacher's settings, each refused with
    its name (what a card's loader reports as ``params.NAME``); a kernel of 65 px fits a 32-px input, 66 not."""
    clf = _untrained_clf()
    for bad, name in (({"batch_size": 0}, "batch_size"), ({"epochs": 2.5}, "epochs"), ({"seed": -1}, "seed"),
                      ({"decoder_channels": (8, 0)}, "decoder_channels"), ({"lr": float("nan")}, "lr"),
                      ({"weight_decay": -1}, "weight_decay"), ({"flip": 1}, "flip"),
                      ({"area_weight": -1.0}, "area_weight"), ({"change_weight": float("inf")}, "change_weight"),
                      ({"area_target": 1.0}, "area_target"), ({"present_fraction": 2}, "present_fraction"),
                      ({"targets_per_image": 0}, "targets_per_image"), ({"layers": "stage1"}, "layers"),
                      ({"teacher": "occlusion", "objective": "teacher", "teacher_budget": 0}, "teacher_budget"),
                      ({"teacher": "occlusion", "objective": "teacher", "teacher_targets": "x"}, "teacher_targets"),
                      ({"kernel_size": 66}, "kernel_size")):
        with pytest.raises(ParameterError, match=f"^{name} ") as info:
            NEMt(clf, **bad)
        assert info.value.name == name
    ex = NEMt(clf, kernel_size=65, **FAST).init_module()
    assert torch.isfinite(ex.module_(torch.rand(1, 1, 32, 32))[0]).all()
    NEMt(clf, objective="paper", area_target=0.3)  # the paper objective takes it


def test_cli_fit_refuses_out_of_range_options_naming_the_option(tmp_path):
    """`nemt fit --init-keep 0 | 1` (the mask head starts at logit(init_keep): a math domain error and a division
    by zero before) and the help's range is open; --area-target no fraction, --min-scale and --blur-sigma not
    > 0 (a blur of 0 used to mean the default), --area-target without --objective paper (ignored before): the
    option is named, nothing is written. The model-dependent limits (--kernel-size, --targets-per-image) and
    --teacher-param without --teacher are checked before the data set is read."""
    from conftest import train_phantom_model
    from nemt.cli import app

    runner = CliRunner()
    help_text = runner.invoke(app, ["fit", "--help"], env={"COLUMNS": "250"}).output
    init_keep = next(line for line in help_text.splitlines() if "--init-keep" in line)
    assert "0<=x<=1" not in init_keep and "strictly between 0 and 1" in init_keep
    base = ["fit", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data"),
            "--out", str(tmp_path / "out"), "--no-progress"]
    for option, value in (("--init-keep", "0"), ("--init-keep", "1"), ("--init-keep", "nan"),
                          ("--area-target", "2"), ("--area-target", "0"), ("--min-scale", "0"),
                          ("--min-scale", "-1"), ("--blur-sigma", "0"), ("--blur-sigma", "-2")):
        res = runner.invoke(app, base + [option, value])
        assert res.exit_code == 2 and f"Invalid value for '{option}'" in res.output, (option, value, res.output)
        assert res.exception is None or isinstance(res.exception, SystemExit)
    res = runner.invoke(app, base + ["--area-target", "0.3"], env={"COLUMNS": "400"})  # the nested objective
    assert res.exit_code == 2 and "--area-target applies to --objective paper only, not nested" in res.output
    _, model = train_phantom_model(tmp_path)
    base[2] = str(model)
    for args, message in ((["--kernel-size", "999"], "kernel_size 999 is too large for inputs of [32, 32]: at most 65"),
                          (["--targets-per-image", "10"], "targets_per_image 10 is more than the model's 4 outputs"),
                          (["--teacher-param", "steps=3"], "need a teacher")):
        res = runner.invoke(app, base + args, env={"COLUMNS": "400"})
        assert res.exit_code == 2 and message in res.output and "no-data" not in res.output, res.output
        assert isinstance(res.exception, SystemExit)
    assert not (tmp_path / "out").exists()
