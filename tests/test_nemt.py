"""NEMt / NEM: per-sample targets, determinism, multi-label, regression, 3D, persistence."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import Interrupted, stop_after_first_epoch
from nemt.errors import CardError, NemtError
from nemt.explainers import NEM, NEMt
from nemt.explainers.nemt.smoothing import RandomSmoothing, fill_sigma_for, kernel_size_for
from nemt.models import Classifier, build_model

FAST = dict(optimizer="adamw", batch_size=4, decoder_channels=(32, 16, 8, 8), seed=0)


def _clf(task="multiclass", n_out=3, dims=2, size=32, seed=0):
    torch.manual_seed(seed)
    net = build_model("smallcnn", spatial_dims=dims, in_channels=1, out_channels=n_out, width=4)
    names = ["severity"] if task == "regression" else [f"l{i}" for i in range(n_out)]
    return Classifier.from_module(net, spatial_dims=dims, in_channels=1, input_size=(size,) * dims, task=task,
                                  label_names=names, arch="smallcnn",
                                  target_scale={"mean": 3.0, "std": 2.0} if task == "regression" else None).eval()


def _data(n_batches=3, b=4, dims=2, size=32, n_out=3, task="multiclass", seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(b, 1, *(size,) * dims, generator=g)
        if task == "multiclass":
            y = torch.randint(0, n_out, (b,), generator=g)
        elif task == "multilabel":
            y = (torch.rand(b, n_out, generator=g) > 0.5).float()
        else:
            y = torch.randn(b, generator=g)
        out.append((x, y))
    return out


def test_per_sample_targets_equal_one_by_one():
    clf = _clf()
    e = NEMt(clf, **FAST).fit(_data(), epochs=1, progress=False, log=lambda s: None)
    x = torch.randn(4, 1, 32, 32)
    t = torch.tensor([0, 2, 1, 2])
    batch = e.explain(x, target=t)
    single = torch.cat([e.explain(x[i:i + 1], target=int(t[i])) for i in range(4)])
    assert batch.shape == (4, 1, 32, 32)
    with torch.no_grad():
        lb = e.module_.logits(x, native=True)[0]  # the map is made on the decoder's own grid
        ls = torch.cat([e.module_.logits(x[i:i + 1], native=True)[0] for i in range(4)])
    # the decoder's logits differ only by the convolutions' batch-size-dependent summation order (float32)
    assert torch.allclose(lb, ls, atol=1e-6)
    # the map is a sum of sigmoids of (logit - threshold) / (T * spread): its slope in the logits is at most
    # 1 / (4 T spread), so a logit (and threshold) difference of 1e-6 moves it by at most 2e-6 / (4 T spread)
    tol = 2e-6 / (4 * e.map_temperature * float(lb.flatten(2).std(2).min()))
    assert torch.allclose(batch, single, atol=tol)
    # and each map is the channel of its own target in the all-targets output
    every = e.explain(x, target="all")
    assert torch.equal(batch[:, 0], every[torch.arange(4), t])  # same call, same numbers


def test_training_loss_gathers_per_sample():
    """Batch loss (eval mode: no sample interacts) equals the mean of one-by-one losses."""
    clf = _clf()
    e = NEMt(clf, objective="paper", **FAST).fit(_data(n_batches=1), epochs=1, progress=False, log=lambda s: None)
    e.module_.eval()
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([2, 0, 1, 2])
    with torch.no_grad():
        batch, parts = e._step(x, y, None)
        single = [e._step(x[i:i + 1], y[i:i + 1], None) for i in range(4)]
    assert torch.allclose(batch, torch.stack([s[0] for s in single]).mean(), atol=1e-6)
    assert abs(parts["change"] - sum(s[1]["change"] for s in single) / 4) < 1e-6


def test_determinism_same_input_same_map_and_same_seed_same_fit():
    x = torch.randn(2, 1, 32, 32)
    a = NEMt(_clf(), **FAST).fit(_data(), epochs=1, progress=False, log=lambda s: None)
    b = NEMt(_clf(), **FAST).fit(_data(), epochs=1, progress=False, log=lambda s: None)
    assert torch.equal(a.explain(x, "all"), a.explain(x, "all"))
    assert torch.allclose(a.explain(x, "all"), b.explain(x, "all"), atol=1e-6)


def test_maps_shape_and_range_and_target_forms():
    e = NEMt(_clf(), **FAST).fit(_data(), epochs=1, progress=False, log=lambda s: None)
    x = torch.randn(3, 1, 32, 32)
    for target, t in [(None, 1), ("predicted", 1), ("all", 3), (2, 1), ("l1", 1), ([0, 2], 2),
                      (torch.tensor([[0, 1], [1, 2], [2, 0]]), 2)]:
        m = e.explain(x, target=target)
        assert m.shape == (3, t, 32, 32) and 0 <= float(m.min()) and float(m.max()) <= 1
    with pytest.raises(NemtError, match="out of range"):
        e.explain(x, target=3)
    with pytest.raises(NemtError, match="not a label"):
        e.explain(x, target="nope")


def test_multilabel_gives_distinct_maps_in_one_pass():
    clf = _clf("multilabel", n_out=3)
    e = NEMt(clf, **FAST).fit(_data(task="multilabel"), epochs=2, progress=False, log=lambda s: None)
    calls = []
    h = clf.net.register_forward_hook(lambda *a: calls.append(1))
    maps = e.explain(torch.randn(2, 1, 32, 32))  # default for multi-label: every label
    h.remove()
    assert maps.shape == (2, 3, 32, 32) and len(calls) == 1  # one forward pass of the model
    assert not torch.allclose(maps[:, 0], maps[:, 1]) and not torch.allclose(maps[:, 1], maps[:, 2])


def test_regression_target():
    clf = _clf("regression", n_out=1)
    e = NEMt(clf, **FAST).fit(_data(task="regression"), epochs=1, progress=False, log=lambda s: None)
    assert e._scale() == 2.0
    m = e.explain(torch.randn(2, 1, 32, 32))
    assert m.shape == (2, 1, 32, 32)


def test_3d_model_trains_one_step_and_explains_a_volume():
    clf = _clf(dims=3, size=16)
    e = NEMt(clf, **{**FAST, "decoder_channels": (16, 8, 8, 8)})
    e.fit(_data(n_batches=1, b=2, dims=3, size=16), epochs=1, progress=False, log=lambda s: None)
    m = e.explain(torch.randn(2, 1, 16, 16, 16), target="all")
    assert m.shape == (2, 3, 16, 16, 16) and torch.isfinite(m).all()


def test_model_agnostic_mode_and_frozen_model():
    clf = _clf()
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    e = NEMt(clf, encoder="own", **FAST).fit(_data(), epochs=1, progress=False, log=lambda s: None)
    assert e.explain(torch.randn(2, 1, 32, 32), "all").shape == (2, 3, 32, 32)
    after = clf.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not clf.training


def test_save_load_round_trip_and_refuses_other_model(tmp_path):
    clf = _clf()
    e = NEMt(clf, **FAST).fit(_data(), epochs=1, progress=False, log=lambda s: None)
    e.save(tmp_path)
    x = torch.randn(2, 1, 32, 32)
    back = NEMt.load(tmp_path, clf)
    assert torch.equal(back.explain(x, "all"), e.explain(x, "all"))
    with pytest.raises(CardError, match="model_sha256"):
        NEMt.load(tmp_path, _clf(seed=1))
    with pytest.raises(CardError, match="kind"):
        NEM.load(tmp_path, clf)
    # the weights are checked against the checksum in the card
    w = tmp_path / "explainer.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(CardError, match="weights_sha256"):
        NEMt.load(tmp_path, clf)


def test_resume_from_checkpoint(tmp_path):
    data = _data()
    full = NEMt(_clf(), **FAST).fit(data, epochs=2, progress=False, log=lambda s: None)
    with pytest.raises(Interrupted):
        NEMt(_clf(), **FAST).fit(data, epochs=2, out_dir=tmp_path, progress=False, log=stop_after_first_epoch)
    logs = []
    resumed = NEMt(_clf(), **FAST).fit(data, epochs=2, out_dir=tmp_path, progress=False, log=logs.append)
    assert logs[0].startswith("resuming")
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(resumed.explain(x, "all"), full.explain(x, "all"), atol=1e-5)
    assert (tmp_path / "explainer.json").is_file()


def test_resume_refuses_another_version_or_settings(tmp_path, monkeypatch):
    """A resume point is keyed by the settings, the model, nemt's version and its code: an interrupted fit
    continued by another release or edited code (which may train differently) or with other settings is refused,
    naming the folder and what differs."""
    import nemt.explainers.nemt.estimator as estimator
    data = _data()
    with pytest.raises(Interrupted):
        NEMt(_clf(), **FAST).fit(data, epochs=2, out_dir=tmp_path, progress=False, log=stop_after_first_epoch)
    with pytest.raises(NemtError, match="other settings"):
        NEMt(_clf(), **{**FAST, "lr": 0.5}).fit(data, epochs=2, out_dir=tmp_path, progress=False, log=lambda s: None)
    monkeypatch.setattr(estimator, "__version__", estimator.__version__ + ".post1")
    with pytest.raises(NemtError, match="nemt version") as err:
        NEMt(_clf(), **FAST).fit(data, epochs=2, out_dir=tmp_path, progress=False, log=lambda s: None)
    assert str(tmp_path) in str(err.value)
    # the same version with its code edited since the resume point (an editable install) is refused too
    monkeypatch.undo()
    monkeypatch.setattr(estimator, "code_fingerprint", lambda: "0123456789abcdef")
    with pytest.raises(NemtError, match=r"other nemt code \(edited since\)"):
        NEMt(_clf(), **FAST).fit(data, epochs=2, out_dir=tmp_path, progress=False, log=lambda s: None)


def test_unsupervised_nem_on_an_encoder():
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    e = NEM(enc, input_size=(32, 32), in_channels=1, **{**FAST, "decoder_channels": (16, 8)})
    e.fit(_data(), epochs=1, progress=False, log=lambda s: None)
    m = e.explain(torch.randn(2, 1, 32, 32))
    assert m.shape == (2, 1, 32, 32) and 0 <= float(m.min()) <= float(m.max()) <= 1


def test_smoothing_random_in_training_uniform_in_eval():
    s = RandomSmoothing(2, 5)
    m = torch.rand(1, 2, 16, 16)
    s.train()
    s.generator = torch.Generator().manual_seed(0)
    a, b = s(m), s(m)
    assert not torch.allclose(a, b)  # a new kernel per forward pass
    s.eval()
    box = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(m, [2, 2, 2, 2], mode="circular"), 5, stride=1)
    assert torch.allclose(s(m), box, atol=1e-6) and torch.equal(s(m), s(m))
    const = torch.full((1, 1, 8, 8), 0.3)
    s.train()
    assert torch.allclose(s(const), const, atol=1e-6)  # weights sum to 1
    assert kernel_size_for((224, 224)) == 21 and kernel_size_for((128, 128)) % 2 == 1
    # a signal: the 2D box's share of the input (0.88 %), not of a side: 9 of 1,000 samples, the floor of 3
    assert kernel_size_for((1000,)) == 9 and kernel_size_for((140,)) == 3 and kernel_size_for((224, 224, 224)) == 21


def test_fill_sigma_follows_the_side_of_a_one_percent_region():
    """The fill's default sigma is 0.625 x the side of a region covering 1 % of the input (fill_sigma_for):
    2D keeps its rule exactly (8 px at 128 px), 3D scales with 0.01^(1/3) of the side (not 0.1), 1D keeps the
    length rule, never below 1."""
    assert fill_sigma_for((128, 128)) == 8.0 and fill_sigma_for((96, 80)) == 5.0
    assert fill_sigma_for((32, 32, 32)) == pytest.approx(0.625 * 32 * 0.01 ** (1 / 3), rel=1e-12)
    assert fill_sigma_for((64, 48, 64)) == pytest.approx(2 * fill_sigma_for((24, 24, 24)), rel=1e-12)
    assert fill_sigma_for((140,)) == 8.75 and fill_sigma_for((8, 8)) == 1.0


def test_target_quantity_over_the_output_axis_and_no_deletion_no_change():
    from nemt.explainers.nemt.losses import target_quantity
    out = torch.randn(4, 3)
    p = target_quantity(out, "multiclass", "prob")
    assert torch.allclose(p.sum(-1), torch.ones(4))
    # a (B, T, n_outputs) stack of occluded outputs is normalised per output vector, not across targets
    assert torch.allclose(target_quantity(out.view(4, 1, 3), "multiclass", "prob")[:, 0], p)
    # a mask that deletes nothing changes nothing
    e = NEMt(_clf(), objective="paper", init_keep=1 - 1e-7, **FAST).init_module()
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 0])
    assert e.validate([(x, y)])["change"] < 1e-4


def test_occlusion_fills():
    from nemt.explainers.nemt.losses import occlude
    x = torch.ones(1, 1, 32, 32)
    x[..., 12:20, 12:20] = -1.0  # a dark "lesion" in bright tissue
    keep = torch.ones(1, 1, 32, 32)
    keep[..., 12:20, 12:20] = 0.0  # delete exactly the lesion
    inpainted = occlude(x, keep, "inpaint", sigma=4.0)
    assert inpainted[..., 12:20, 12:20].min() > 0.95  # filled with the surrounding tissue
    assert torch.equal(inpainted[..., :10, :], x[..., :10, :])  # kept pixels untouched
    assert torch.equal(occlude(x, keep, "mean")[..., 12:20, 12:20], torch.zeros(1, 1, 8, 8))
    blurred = occlude(x, keep, "blur", sigma=2.0)
    assert blurred[..., 16, 16] < -0.5  # blurring leaves the inside of a wide dark region dark
    zero = occlude(x, keep, "zero", zero_value=torch.tensor([-3.0]))
    assert torch.equal(zero[..., 12:20, 12:20], torch.full((1, 1, 8, 8), -3.0))
    vol = occlude(torch.ones(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 8), "inpaint", sigma=2.0)
    assert vol.shape == (1, 1, 8, 8, 8)


def test_eval_fast_path_equals_the_plain_decoder():
    """BatchNorm folded into the convolutions (no-grad eval) gives the same masks as the plain blocks."""
    e = NEMt(_clf(), **FAST).fit(_data(), epochs=1, progress=False, log=lambda s: None)
    x = torch.randn(2, 1, 32, 32)
    fast = e.explain(x, "all")
    with torch.no_grad():
        fast_logits = e.module_.logits(x, native=True)[0]
    with torch.enable_grad():
        maps, _ = e.module_(x)  # grad enabled: the plain blocks
        plain_logits = e.module_.logits(x, native=True)[0].detach()
    assert torch.allclose(fast_logits, plain_logits, atol=1e-5)  # folding BatchNorm reorders float32 sums
    # the map's slope in the logits is at most 1 / (4 T spread) (see test_per_sample_targets_equal_one_by_one)
    tol = 2e-5 / (4 * e.map_temperature * float(plain_logits.flatten(2).std(2).min()))
    assert torch.allclose(fast, maps.detach(), atol=tol)
    assert not any("_fused" in k for k in e.module_.state_dict())


def test_decoder_stops_at_the_finest_stage_and_old_cards_keep_the_full_resolution_block(tmp_path):
    """New fits decode to the finest feature grid and resize; a card saved before that loads as it was."""
    clf = _clf()
    e = NEMt(clf, **FAST).init_module()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        native = e.module_.logits(x, native=True)[0]
        full = e.module_.logits(x)[0]
    assert native.shape[:2] == (2, 3) and native.shape[-1] < 32  # the finest stage is coarser than the image
    assert full.shape == (2, 3, 32, 32) and e.explain(x, "all").shape == (2, 3, 32, 32)
    old = NEMt(clf, decoder_full_resolution=True, **FAST).fit(_data(n_batches=1), epochs=1, progress=False,
                                                               log=lambda s: None)
    with torch.no_grad():
        assert old.module_.logits(x, native=True)[0].shape == (2, 3, 32, 32)
    old.save(tmp_path)
    card = json.loads((tmp_path / "explainer.json").read_text())
    assert card["params"]["preservation_bound"] == 2.0  # the defaults, recorded
    assert card["params"]["preservation_weight"] == 0.5
    for written_later in ("decoder_full_resolution", "preservation_bound", "preservation_weight"):
        del card["params"][written_later]
    (tmp_path / "explainer.json").write_text(json.dumps(card))
    back = NEMt.load(tmp_path, clf)
    assert back.decoder_full_resolution is True
    assert back.preservation_bound is None  # a nested fit saved before the bound was trained unbounded
    assert back.preservation_weight == 1.0  # ... and before the weight, with equal games
    assert torch.equal(back.explain(x, "all"), old.explain(x, "all"))


def test_fit_and_resume_leave_the_callers_parameters_and_global_rng_alone(tmp_path):
    """The model's requires_grad flags are restored after fitting (also after an interrupted fit), no weight of
    the model receives a gradient, and neither a fit nor a resumed fit moves the global torch RNG."""
    clf = _clf()
    clf.net.fc.weight.requires_grad_(False)  # a caller's own mix of flags
    flags = {n: p.requires_grad for n, p in clf.named_parameters()}
    assert any(flags.values()) and not all(flags.values())
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with pytest.raises(Interrupted):
        NEMt(clf, **FAST).fit(_data(), epochs=2, out_dir=tmp_path, progress=False, log=stop_after_first_epoch)
    assert {n: p.requires_grad for n, p in clf.named_parameters()} == flags
    NEMt(clf, **FAST).fit(_data(), epochs=2, out_dir=tmp_path, progress=False, log=lambda s: None)
    assert {n: p.requires_grad for n, p in clf.named_parameters()} == flags
    assert all(p.grad is None for p in clf.parameters())
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("smoothing", [False, True])
@pytest.mark.parametrize("size, resized_first", [(28, True), (64, False)])
def test_a_small_decoder_grid_cuts_the_map_steps_at_the_image_size(size, resized_first, smoothing):
    """At 28 px the decoder's grid is 14 px and 1 % of it is 2 cells: the steps are cut after resizing the
    logits, so every map marks its 1 % (about 8 of 784 pixels at 0.5 or above, the step's soft edge giving one
    pixel either way) and has a pixel there. At 64 px (41 cells in 1 %) the map is made on the grid and resized.
    Both maps (the default unsmoothed one, with its linear tie-break, and the smoothed one before its box)."""
    from nemt.explainers.nemt.losses import staircase
    from nemt.explainers.nemt.module import MIN_STEP_CELLS
    from nemt.ops import resize_linear
    e = NEMt(_clf(size=size), map_smoothing=smoothing, **FAST).init_module()
    mod = e.module_
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, size, size, generator=g)
    with torch.no_grad():
        native = mod.logits(x, native=True)[0]
        raw = mod.maps(native, smooth=False, size=(size, size))
    cells = 0.01 * native.shape[-1] * native.shape[-2]
    assert (cells < MIN_STEP_CELLS) == resized_first
    expected = staircase(resize_linear(native, (size, size)) if resized_first else native, (0.01,),
                         order="sigmoid" if smoothing else "linear")
    assert torch.allclose(raw, resize_linear(expected, (size, size)), atol=1e-6)
    if resized_first:
        marked = (raw >= 0.5).flatten(2).sum(-1)
        assert int(marked.min()) >= 1 and bool(((marked - 0.01 * size * size).abs() <= 2).all()), marked
