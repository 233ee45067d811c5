"""Explanation-guided training: MIMIC's adversarial term reaches the copies' weights, right-for-the-right-reasons
equals its definition, and a guided run writes a folder that loads, resumes and is explained like any other."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import Interrupted, stop_after_first_epoch
from nemt.cli import app
from nemt.data import open_dataset
from nemt.errors import NemtError
from nemt.explainers import get_explainer
from nemt.models import TrainConfig, build_model, load_model
from nemt.models.guided import (Discriminator, GuideConfig, GuidedEnsemble, adversarial_terms, copy_agreement,
                                copy_classifiers, explanation_maps, right_reasons_penalty, train_guided)

CFG = dict(arch="smallcnn", size=(16, 16), epochs=2, batch_size=4, lr=3e-3, seed=0, arch_kwargs={"width": 4})


def _ensemble_and_batch(copies: int = 3):
    torch.manual_seed(0)
    ens = GuidedEnsemble(2, 1, 3, base="smallcnn", copies=copies, base_kwargs={"width": 4})
    disc = Discriminator(16 * 16, copies, hidden=32)
    x = torch.randn(4, 1, 16, 16)
    y = torch.tensor([0, 1, 2, 1])
    return ens, disc, x, y


def test_adversarial_term_reaches_each_copys_weights():
    ens, disc, x, y = _ensemble_and_batch()
    _, d_ce, _ = adversarial_terms(ens, disc, x, y, F.cross_entropy, disc_size=16, create_graph=True)
    for k, copy in enumerate(ens.copies):
        params = [p for p in copy.parameters()]
        grads = torch.autograd.grad(d_ce, params, retain_graph=True, allow_unused=True)
        total = sum(float(g.abs().sum()) for g in grads if g is not None)
        # double back-propagation: the discriminator's loss depends on the copy's weights through its map
        assert total > 0, f"copy {k}: the explanation term has no gradient"


def test_detached_explanations_give_the_weights_no_gradient():
    """The public code's defect (no create_graph): the same term then never reaches the copies, which this
    test would notice (it is the control of the test above)."""
    ens, disc, x, y = _ensemble_and_batch()
    _, d_ce, _ = adversarial_terms(ens, disc, x, y, F.cross_entropy, disc_size=16, create_graph=False)
    grads = torch.autograd.grad(d_ce, list(ens.parameters()), allow_unused=True)
    assert all(g is None or float(g.abs().sum()) == 0 for g in grads)
    # the discriminator itself still learns from the detached maps
    assert any(g is not None and float(g.abs().sum()) > 0
               for g in torch.autograd.grad(d_ce, list(disc.parameters()), allow_unused=True))


def test_deviation_input_reaches_the_weights_and_is_blind_when_the_copies_agree():
    """``disc_input="deviation"``: the discriminator sees each map minus the copies' mean map of its image. Its
    term still reaches every copy's weights; copies with the same weights make the same maps, so every input
    is exactly 0, the discriminator's logits are the same for every copy and its loss is the uninformed
    one (the cross-entropy of equal logits, log M)."""
    ens, disc, x, y = _ensemble_and_batch()
    _, d_ce, _ = adversarial_terms(ens, disc, x, y, F.cross_entropy, disc_size=16, disc_input="deviation")
    for k, copy in enumerate(ens.copies):
        grads = torch.autograd.grad(d_ce, list(copy.parameters()), retain_graph=True, allow_unused=True)
        assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0, f"copy {k}: no gradient"
    for copy in ens.copies[1:]:
        copy.load_state_dict(ens.copies[0].state_dict())
    with torch.no_grad():
        disc.fc1.bias.zero_()  # equal logits for a zero input: fc2's bias alone would favour one copy
        disc.fc2.bias.zero_()
    _, d_ce, _ = adversarial_terms(ens, disc, x, y, F.cross_entropy, disc_size=16, disc_input="deviation",
                                   create_graph=False)
    assert float(d_ce.detach()) == pytest.approx(float(torch.log(torch.tensor(3.0))), abs=1e-6)
    with pytest.raises(NemtError):
        GuideConfig(disc_input="image").check()
    assert "disc_input" not in GuideConfig().to_dict()  # runs made before the option keep their run key
    assert GuideConfig(disc_input="deviation").to_dict()["disc_input"] == "deviation"


def test_gradcam_explanation_is_grad_cam_and_reaches_each_copys_weights():
    """``explanation="gradcam"``: :func:`gradcam_maps` is the Grad-CAM explainer's map (same layer, min-max), and
    built with ``create_graph`` the discriminator's loss reaches every copy's weights through it (none without)."""
    from nemt.explainers.gradcam import default_cam_layer
    from nemt.models import Classifier
    from nemt.models.guided import gradcam_maps

    ens, disc, x, y = _ensemble_and_batch()
    layers = [default_cam_layer(c, (1, 16, 16)) for c in ens.copies]
    copy = ens.copies[0].eval()
    out, m = gradcam_maps(copy, x, y, layers[0], create_graph=False)
    assert m.shape == (4, 1, 16, 16) and not m.requires_grad
    assert torch.allclose(out, copy(x))
    clf = Classifier.from_module(copy, spatial_dims=2, in_channels=1, input_size=(16, 16), task="multiclass",
                                 label_names=["a", "b", "c"])
    want = get_explainer("gradcam", clf, layer=layers[0]).explain(x, target=y)
    assert torch.allclose(m, want, atol=1e-5)
    ens.train()
    _, d_ce, _ = adversarial_terms(ens, disc, x, y, F.cross_entropy, disc_size=16, cam_layers=layers)
    for k, c in enumerate(ens.copies):
        grads = torch.autograd.grad(d_ce, list(c.parameters()), retain_graph=True, allow_unused=True)
        assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0, f"copy {k}: no gradient"
    _, d_ce, _ = adversarial_terms(ens, disc, x, y, F.cross_entropy, disc_size=16, cam_layers=layers,
                                   create_graph=False)
    grads = torch.autograd.grad(d_ce, list(ens.parameters()), allow_unused=True)
    assert all(g is None or float(g.abs().sum()) == 0 for g in grads)
    with pytest.raises(NemtError, match="explanation"):
        GuideConfig(explanation="shap").check()


def test_explanation_map_of_a_linear_model_is_its_definition():
    """For f = W x + b the input gradient of logit t is W_t, so the map is |W_t * x| summed over channels,
    min-max per sample (exact up to float rounding)."""
    torch.manual_seed(1)
    net = build_model("linear", spatial_dims=2, in_channels=2, out_channels=3, input_size=(5, 6))
    x = torch.randn(2, 2, 5, 6)
    t = torch.tensor([2, 0])
    got = explanation_maps(net, x, t)
    w = net.fc.weight.detach().view(3, 2, 5, 6)
    raw = (w[t] * x).abs().sum(1, keepdim=True)
    lo = raw.flatten(1).amin(1).view(-1, 1, 1, 1)
    hi = raw.flatten(1).amax(1).view(-1, 1, 1, 1)
    assert got.shape == (2, 1, 5, 6)
    assert torch.allclose(got, (raw - lo) / (hi - lo), atol=1e-6)
    assert not x.requires_grad  # the caller's tensor is not touched


def test_right_reasons_penalty_of_a_linear_model_is_ross_eq_1():
    """Linear f = W x: ∂/∂x Σ_k log p_k = Σ_k W_k − K Σ_j p_j W_j; the penalty is the batch mean of its
    squares summed outside each mask; a sample with an empty mask adds 0."""
    torch.manual_seed(2)
    net = build_model("linear", spatial_dims=2, in_channels=1, out_channels=3, input_size=(4, 4))
    x = torch.randn(3, 1, 4, 4, requires_grad=True)
    gt = torch.zeros(3, 1, 4, 4, dtype=torch.bool)
    gt[0, :, :2, :2] = True
    gt[1, :, 1:, :] = True  # sample 2 has an empty mask: no penalty
    out = net(x)
    got = right_reasons_penalty(net, x, gt, "multiclass", out)
    W = net.fc.weight.detach()  # (3, 16)
    p = out.detach().softmax(1)
    grad = W.sum(0)[None] - 3 * p @ W  # (3, 16)
    outside = (~gt).float().flatten(1)
    want = ((grad * outside) ** 2).sum(1) * torch.tensor([1.0, 1.0, 0.0])
    assert torch.allclose(got, want.mean(), rtol=1e-5)
    # the share form: each sample's sum over its whole gradient energy
    share = right_reasons_penalty(net, x, gt, "multiclass", net(x), fraction=True)
    assert torch.allclose(share, (want / (grad ** 2).sum(1)).mean(), rtol=1e-5)
    # all pixels inside the masks: nothing to penalise
    full = torch.ones_like(gt)
    assert float(right_reasons_penalty(net, x, full, "multiclass", net(x)).detach()) == 0.0


def test_right_reasons_penalty_reaches_the_weights():
    torch.manual_seed(3)
    net = build_model("smallcnn", spatial_dims=2, in_channels=1, out_channels=3, width=4)
    x = torch.randn(2, 1, 16, 16, requires_grad=True)
    gt = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    gt[:, :, 4:8, 4:8] = True
    term = right_reasons_penalty(net, x, gt, "multiclass", net(x))
    grads = torch.autograd.grad(term, list(net.parameters()), allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


def test_ensemble_output_is_the_mean_log_softmax():
    ens, _, x, _ = _ensemble_and_batch()
    ens.eval()
    with torch.no_grad():
        want = torch.stack([F.log_softmax(c(x), 1) for c in ens.copies]).mean(0)
        assert torch.allclose(ens(x), want) and ens(x).shape == (4, 3)


def test_copy_agreement_definition():
    a = torch.rand(3, 1, 8, 8)
    assert torch.allclose(copy_agreement([a, 2 * a + 1, a]), torch.ones(3), atol=1e-6)  # Pearson: scale-free
    assert torch.allclose(copy_agreement([a, -a]), -torch.ones(3), atol=1e-6)
    with pytest.raises(NemtError, match="two copies"):
        copy_agreement([a])


def test_mimic_run_loads_is_explained_and_resumes_exactly(small_csv, tmp_path):
    m = open_dataset(small_csv)
    guide = GuideConfig(kind="mimic", copies=2, disc_hidden=16)
    full, result = train_guided(m, tmp_path / "full", TrainConfig(**CFG), guide, progress=False, log=lambda s: None)
    assert [h["phase"] for h in result["history"]] == ["copies", "discriminator"]
    card = json.loads((tmp_path / "full" / "model.json").read_text())
    assert card["arch"] == "mimic" and card["arch_kwargs"]["copies"] == 2 and card["training"]["guide"]["beta"] == 1.0
    clf = load_model(tmp_path / "full")
    x = torch.randn(3, 1, 16, 16)
    assert clf(x).shape == (3, 3)
    maps = get_explainer("gradcam", clf).explain(x, target=torch.tensor([0, 1, 2]))
    assert maps.shape == (3, 1, 16, 16) and torch.isfinite(maps).all()
    per_copy = [get_explainer("gradcam", c).explain(x, target=torch.tensor([0, 1, 2])) for c in copy_classifiers(clf)]
    assert len(per_copy) == 2 and all(p.shape == (3, 1, 16, 16) for p in per_copy)
    # interrupted after epoch 1 and run again: the same weights (copies and discriminator) as the full run
    with pytest.raises(Interrupted):
        train_guided(m, tmp_path / "cut", TrainConfig(**CFG), guide, progress=False, log=stop_after_first_epoch)
    logs: list[str] = []
    resumed, _ = train_guided(m, tmp_path / "cut", TrainConfig(**CFG), guide, progress=False, log=logs.append)
    assert logs[0].startswith("resuming")
    want = full.net.state_dict()
    for k, v in resumed.net.state_dict().items():
        assert torch.allclose(v.float(), want[k].float(), atol=1e-6), k


def test_mask_guided_run_via_the_cli(small_csv, tmp_path):
    out = tmp_path / "mask"
    res = CliRunner().invoke(app, ["train", "--data", str(small_csv), "--out", str(out), "--arch", "smallcnn",
                                   "--size", "16", "--epochs", "1", "--batch-size", "4", "--guide", "mask",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    clf = load_model(out)
    assert clf.card.arch == "smallcnn" and clf.card.training["guide"]["kind"] == "mask"
    assert "right_reasons" in json.loads((out / "history.json").read_text())[0]


def test_mask_target_true_differentiates_the_true_class_only(small_csv, tmp_path, monkeypatch):
    """``mask_target="true"`` hands the batch's true classes to the penalty (log p_y differentiated instead of
    Σ_k log p_k); the default hands none, and the card records the option only when it is not the default."""
    import nemt.models.guided as guided

    seen = []
    real = guided.right_reasons_penalty

    def spy(net, x, gt, task, out, target=None, **kw):
        seen.append(None if target is None else target.clone())
        return real(net, x, gt, task, out, target, **kw)

    monkeypatch.setattr(guided, "right_reasons_penalty", spy)
    m = open_dataset(small_csv)
    cfg = TrainConfig(**{**CFG, "epochs": 1})
    clf, _ = train_guided(m, tmp_path / "true", cfg, GuideConfig(kind="mask", mask_target="true"), progress=False)
    assert seen and all(t is not None and t.dtype == torch.long and t.max() < 3 for t in seen)
    assert clf.card.training["guide"]["mask_target"] == "true"
    seen.clear()
    clf, _ = train_guided(m, tmp_path / "all", cfg, GuideConfig(kind="mask"), progress=False)
    assert seen and all(t is None for t in seen)
    assert "mask_target" not in clf.card.training["guide"]
    with pytest.raises(NemtError, match="mask_target"):
        GuideConfig(kind="mask", mask_target="some").check()


def test_guided_refusals(small_csv, tmp_path):
    m = open_dataset(small_csv)
    with pytest.raises(NemtError, match="at least 2"):
        train_guided(m, tmp_path / "a", TrainConfig(**CFG), GuideConfig(copies=1), progress=False)
    with pytest.raises(NemtError, match="--guide must be"):
        train_guided(m, tmp_path / "b", TrainConfig(**CFG), GuideConfig(kind="gaze"), progress=False)
    with pytest.raises(NemtError, match="plain architecture"):
        train_guided(m, tmp_path / "c", TrainConfig(**{**CFG, "arch": "pantypes"}), GuideConfig(), progress=False)
    from nemt.data import write_phantom_dataset
    multilabel = open_dataset(write_phantom_dataset(tmp_path / "ml", 8, 16, task="multilabel", seed=0))
    with pytest.raises(NemtError, match="multi-class"):
        train_guided(multilabel, tmp_path / "d", TrainConfig(**CFG), GuideConfig(), progress=False)
    assert not (tmp_path / "d").exists()  # refused before anything is written
