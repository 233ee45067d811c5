"""Pantypes (Kjærsgaard et al., AAAI 2024): the volume loss, the model, its training and its explanation.

Values the definitions fix: the volume ``sqrt(det(P P^T))`` of M orthonormal prototypes is 1 and scaling
them by c multiplies it by |c|^M (det of the Gram matrix of cP is c^(2M) det); the guarded volume
``sqrt(det(P P^T + eps I))`` of c times orthonormal prototypes is (c^2 + eps)^(M/2) exactly (every
eigenvalue of the Gram matrix is c^2); the similarity is log((d + 1) / (d + 1e-4)).
"""
from __future__ import annotations

import math

import matplotlib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from nemt.cli import app
from nemt.errors import NemtError
from nemt.explainers import get_explainer
from nemt.explainers.prototypes import prototype_figure
from nemt.models import load_model
from nemt.models.pantypes import (Pantypes, class_volumes, fit_pantypes, kl_to_prototypes, restart_dead_prototypes,
                                  similarity, top_prototypes, volume_loss)
from nemt.ops import ParameterError

M = 5  # prototypes per class


def _orthonormal(k: int = 2, m: int = M, dim: int = 8, seed: int = 0) -> torch.Tensor:
    """(k, m, dim) prototypes whose m rows are orthonormal within each class (QR of a seeded Gaussian)."""
    g = torch.Generator().manual_seed(seed)
    q = [torch.linalg.qr(torch.randn(dim, m, generator=g, dtype=torch.float64))[0].T for _ in range(k)]
    return torch.stack(q)


def _small_net(**kw) -> Pantypes:
    return Pantypes(out_channels=2, input_size=(16, 16), latent_dim=8, width=4, seed=0, **kw)


# ----------------------------------------------------------------------------- the volume

def test_orthonormal_prototypes_have_volume_one_and_scale_as_c_to_the_m():
    p = _orthonormal()
    # float64 throughout: the only error is rounding (~1e-15)
    assert torch.allclose(class_volumes(p), torch.ones(2, dtype=torch.float64), rtol=1e-12, atol=0)
    assert float(volume_loss(p, eps=0.0)) == pytest.approx(1.0, rel=1e-12)
    for c in (0.5, 2.0, 3.0, -1.5):
        want = torch.full((2,), abs(c) ** M, dtype=torch.float64)
        assert torch.allclose(class_volumes(c * p), want, rtol=1e-12, atol=0), c
        assert float(volume_loss(c * p, eps=0.0)) == pytest.approx(abs(c) ** -M, rel=1e-12)
        # with the guard: every eigenvalue of G + eps I is c^2 + eps
        assert torch.allclose(class_volumes(c * p, eps=1e-4), torch.full((2,), (c * c + 1e-4) ** (M / 2),
                              dtype=torch.float64), rtol=1e-12, atol=0)


def test_volume_of_any_prototypes_is_sqrt_det_gram_and_scales_as_c_to_the_m():
    g = torch.Generator().manual_seed(1)
    p = torch.randn(3, M, 12, generator=g, dtype=torch.float64)
    want = np.sqrt([np.linalg.det(pk @ pk.T) for pk in p.numpy()])
    assert np.allclose(class_volumes(p).numpy(), want, rtol=1e-10)
    assert np.allclose(class_volumes(2.5 * p).numpy(), 2.5 ** M * want, rtol=1e-10)


def test_duplicate_prototypes_give_finite_loss_and_gradients():
    p = _orthonormal(dim=8).float()
    p[0, 1] = p[0, 0]  # class 0: a duplicate pair
    p[1, :] = p[1, 0]  # class 1: all five the same (rank 1)
    assert class_volumes(p, eps=0.0)[1] == 0  # the paper's 1/sqrt(det G) would be infinite here
    p.requires_grad_(True)
    loss = volume_loss(p, eps=1e-4)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert torch.isfinite(p.grad).all()

    # in the model: the whole loss (KL, reconstruction, volume) and every gradient stay finite
    net = _small_net()
    with torch.no_grad():
        net.prototypes[:] = net.prototypes[0]  # every prototype of both classes the same
    net.train()
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    out = net(x)
    total = torch.nn.functional.cross_entropy(out, y) + net.auxiliary_loss(y)
    total.backward()
    assert torch.isfinite(total)
    assert all(torch.isfinite(q.grad).all() for q in net.parameters() if q.grad is not None)


def test_volume_loss_pushes_near_duplicates_apart():
    """Exact duplicates are a saddle (their gradients are equal); near duplicates are pulled apart."""
    p = _orthonormal(k=1).float()
    p[0, 1] = p[0, 0] + 1e-3 * p[0, 2]
    p.requires_grad_(True)
    volume_loss(p).backward()
    step = p.detach() - 1e-6 * p.grad
    before = (p[0, 0] - p[0, 1]).norm()
    assert (step[0, 0] - step[0, 1]).norm() > before


def test_centred_volume_ignores_where_the_prototypes_are_and_the_paper_s_does_not():
    """``centred=True`` spans the volume from a prototype: moving all of a class's prototypes by one vector
    leaves it unchanged; the paper's (from the origin) changes. Both are finite for any prototypes."""
    torch.manual_seed(0)
    p = torch.randn(2, 5, 16, dtype=torch.float64)
    shifted = p + 3 * torch.randn(1, 1, 16, dtype=torch.float64)
    assert torch.allclose(volume_loss(p, centred=True), volume_loss(shifted, centred=True), rtol=1e-9)
    assert not torch.allclose(volume_loss(p), volume_loss(shifted), rtol=1e-3)
    e = torch.eye(16, dtype=torch.float64)[:4]  # edges e_1..e_4 from vertex 0: centred volume 1, loss 1
    simplex = torch.cat([torch.zeros(1, 16, dtype=torch.float64), e])[None]
    assert torch.allclose(volume_loss(simplex, eps=0.0, centred=True), torch.tensor(1.0, dtype=torch.float64))


def test_log_volume_is_minus_m_log_c_for_scaled_orthonormal_prototypes():
    """``form="log"``: -log sqrt(det G). Orthonormal prototypes scaled by c have det G = c^(2M), so the loss is
    -M log c exactly (eps 0), the log of the inverse form; its gradient falls as 1/c, the inverse form's as
    c^-(M+1), which is why the log form still acts at the data's scale."""
    m = 5
    for c in (0.5, 2.0, 10.0):
        p = (c * torch.eye(16, dtype=torch.float64)[:m])[None].requires_grad_(True)
        log = volume_loss(p, eps=0.0, form="log")
        inv = volume_loss(p, eps=0.0)
        assert float(log) == pytest.approx(-m * math.log(c), rel=1e-9)
        assert float(log) == pytest.approx(math.log(float(inv)), rel=1e-9)
        g_log, = torch.autograd.grad(log, p)
        g_inv, = torch.autograd.grad(volume_loss(p, eps=0.0), p)
        assert float(g_log.norm()) == pytest.approx(math.sqrt(m) / c, rel=1e-9)
        assert float(g_inv.norm()) == pytest.approx(math.sqrt(m) * c ** -(m + 1), rel=1e-9)
    with pytest.raises(NemtError, match="volume"):
        volume_loss(p.detach(), form="cube")
    with pytest.raises(NemtError, match="volume_form"):
        Pantypes(out_channels=2, volume_form="cube", latent_dim=4, width=2)


def test_volume_needs_a_guard_when_on():
    with pytest.raises(NemtError, match="volume_eps"):
        Pantypes(out_channels=2, volume_eps=0.0)
    Pantypes(out_channels=2, volume_eps=0.0, volume_weight=0.0, latent_dim=4, width=2)  # ablation: allowed


# ----------------------------------------------------------------------------- similarity and KL

def test_similarity_is_log_ratio_of_shifted_squared_distances():
    p = torch.zeros(3, 4)
    p[1, 0], p[2, :2] = 1.0, 2.0  # squared distances from z = 0: 0, 1, 8
    s = similarity(torch.zeros(1, 4), p)[0]
    want = [math.log(1 / 1e-4), math.log(2 / 1.0001), math.log(9 / 8.0001)]
    assert torch.allclose(s, torch.tensor(want), rtol=1e-5)


def test_euclidean_similarity_is_the_public_codes_cdist_with_a_finite_gradient_at_zero():
    """``distance="euclidean"``: d = ||z - p|| (distances 0, 1, sqrt 8); its sqrt is guarded (1e-8 inside), so
    the gradient on a prototype is finite, and at distance 0 d is sqrt(1e-8) = 1e-4: s = log(1.0001 / 2e-4)."""
    p = torch.zeros(3, 4, requires_grad=True)
    with torch.no_grad():
        p[1, 0], p[2, :2] = 1.0, 2.0
    s = similarity(torch.zeros(1, 4), p, "euclidean")[0]
    r8 = math.sqrt(8)
    assert torch.allclose(s[1:], torch.tensor([math.log(2 / 1.0001), math.log((r8 + 1) / (r8 + 1e-4))]), rtol=1e-5)
    assert math.isclose(float(s[0].detach()), math.log(1.0001 / 2e-4), rel_tol=1e-5)
    s.sum().backward()
    assert torch.isfinite(p.grad).all()
    net = Pantypes(out_channels=2, input_size=(28, 28), distance="euclidean", seed=0).eval()
    z = torch.randn(2, 256)
    assert torch.allclose(net.similarities(z), similarity(z, net.prototypes, "euclidean"))
    with pytest.raises(NemtError, match="distance"):
        Pantypes(out_channels=2, distance="cosine")


def test_kl_is_zero_on_the_prototypes_and_closed_form_off_them():
    p = torch.zeros(2, 1, 3)
    p[1, 0] = 1.0
    y = torch.tensor([0, 1])
    mu = p[y, 0].clone()
    logvar = torch.zeros(2, 3)
    sims = similarity(mu, p.view(2, 3))
    assert float(kl_to_prototypes(mu, logvar, sims, y, p)) == pytest.approx(0.0, abs=1e-7)
    # one prototype per class, mu 2 from it along one axis, sigma^2 = e: mean over 3 dims of
    # 0.5 (sigma^2 + (mu - p)^2 - 1 - log sigma^2) = 0.5 (e - 2 + [4, 0, 0]) averaged
    mu2 = mu.clone()
    mu2[:, 0] += 2.0
    logvar2 = torch.ones(2, 3)
    want = 0.5 * (3 * (math.e - 2) + 4) / 3
    got = kl_to_prototypes(mu2, logvar2, similarity(mu2, p.view(2, 3)), y, p)
    assert float(got) == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------- the model

def test_forward_shapes_and_modes():
    net = Pantypes(out_channels=3, input_size=(28, 28), latent_dim=32, width=8, seed=0)
    assert net.prototypes.shape == (15, 32) and net.n_stages == 2 and net.grid == (7, 7)
    assert net.last_layer.bias is None
    assert torch.equal(net.last_layer.weight[0, :5], torch.ones(5))  # +1 to the own class, -0.5 to the others
    assert torch.equal(net.last_layer.weight[0, 5:], torch.full((10,), -0.5))
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    net.eval()
    with torch.no_grad():
        parts = net.parts(x)
        assert net(x).shape == (4, 3) and parts.similarities.shape == (4, 15)
        assert torch.equal(parts.z, parts.mu)  # mu at test
        assert net(torch.randn(2, 1, 40, 36)).shape == (2, 3)  # another size runs (pooled to the grid)
        assert net.decode(parts.z).shape == (4, 1, 28, 28)
        assert net.decoded_prototypes().shape == (15, 1, 28, 28)
        sampled = net.parts(x, sample=True)
    assert not torch.equal(sampled.z, sampled.mu)  # mu + sigma * eps in training
    assert not net.training
    big = Pantypes(out_channels=2, input_size=(128, 128), latent_dim=8, width=4, seed=0)
    assert big.n_stages == 4 and big.grid == (8, 8)
    with pytest.raises(NemtError, match="2D"):
        Pantypes(spatial_dims=3, out_channels=2)
    with pytest.raises(NemtError, match="classes"):
        Pantypes(out_channels=1)


def test_seeded_construction_and_noise_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b = _small_net(), _small_net()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    za, zb = a.train().parts(x).z, b.train().parts(x).z
    assert torch.equal(za, zb)  # the noise is the model's own: (noise_seed, noise_step)
    assert torch.equal(torch.get_rng_state(), state)
    assert int(a.noise_step) == 1


def test_tiny_training_run_reduces_the_loss():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(48) % 2
    x = torch.randn(48, 1, 16, 16, generator=g) * 0.3
    x[y == 1, :, 4:12, 4:12] += 1.5  # class 1: a bright square
    net = _small_net()
    state = torch.get_rng_state()
    hist = fit_pantypes(net, x, y, epochs=12, batch_size=16, lr=3e-3, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert hist[-1]["loss"] < 0.8 * hist[0]["loss"]
    assert hist[-1]["ce"] < hist[0]["ce"] and hist[-1]["reconstruction"] < hist[0]["reconstruction"]
    assert set(hist[0]) == {"loss", "ce", "kl", "reconstruction", "volume"}
    assert not net.training
    again = fit_pantypes(_small_net(), x, y, epochs=12, batch_size=16, lr=3e-3, seed=0)
    assert again == hist  # same seed, same run


def test_restart_moves_dead_prototypes_onto_the_farthest_images_of_their_class():
    """Prototypes far from every latent are dead; a restart puts each on one image's mu, farthest first,
    so that every prototype of a class with enough images is some image's nearest afterwards."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 2
    x = torch.randn(40, 1, 16, 16, generator=g)
    net = _small_net()
    fit_pantypes(net, x, y, epochs=3, batch_size=8, lr=3e-3, seed=0)  # spread the latents (an untrained encoder
    net.eval()                                                        # maps every image to about the same mu)
    with torch.no_grad():
        mu = net.encode(x)[0]
        net.prototypes.copy_(mu.mean(0) + 1e3 * torch.randn(net.prototypes.shape, generator=g))  # all far away
        keep = int(torch.nonzero(net.prototype_class == 0)[0])
        net.prototypes[keep] = mu[y == 0].mean(0)               # one live prototype in class 0
        keep1 = int(torch.nonzero(net.prototype_class == 1)[0])
        net.prototypes[keep1] = mu[y == 1].mean(0)              # and one in class 1 (with exact similarities the
        s = net.similarities(mu)                                  # nearest of all-far prototypes is live, then dies)
    live = set()   # prototypes that are some image's nearest among its class's prototypes
    for k in (0, 1):
        idx = torch.nonzero(net.prototype_class == k).flatten()
        live |= set(idx[s[y == k][:, idx].argmax(1)].tolist())
    assert live == {keep, keep1}
    moved = restart_dead_prototypes(net, x, y)
    assert sorted(moved.tolist()) == sorted(set(range(2 * M)) - live)   # every other one was dead
    for j in moved.tolist():                                     # each now sits on an image of its class
        k = int(net.prototype_class[j])
        assert torch.cdist(net.prototypes[j:j + 1].detach(), mu[y == k]).min() < 1e-5
    with torch.no_grad():
        s = net.similarities(mu)
    for k in (0, 1):
        idx = torch.nonzero(net.prototype_class == k).flatten()
        assert set(s[y == k][:, idx].argmax(1).tolist()) == set(range(M))   # no dead prototype left
    # class 0's first restart is the image farthest from the live prototype
    first = [j for j in moved.tolist() if int(net.prototype_class[j]) == 0][0]
    far = torch.cdist(mu[y == 0], net.prototypes[keep:keep + 1].detach()).argmax()
    assert torch.allclose(net.prototypes[first].detach(), mu[y == 0][far])
    assert restart_dead_prototypes(net, x, y).numel() == 0       # nothing dead, nothing moved
    hist = fit_pantypes(_small_net(), x, y, epochs=2, batch_size=16, seed=0, restart_dead=True)
    assert "restarted" in hist[0] and "restarted" not in hist[-1]


def test_auxiliary_loss_needs_a_training_pass_and_class_labels():
    net = _small_net().eval()
    net(torch.zeros(2, 1, 16, 16))
    with pytest.raises(NemtError, match="training mode"):
        net.auxiliary_loss(torch.tensor([0, 1]))
    net.train()
    net(torch.zeros(2, 1, 16, 16))
    with pytest.raises(NemtError, match="class indices"):
        net.auxiliary_loss(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


# ----------------------------------------------------------------------------- the explanation

def _trained_net() -> tuple[Pantypes, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(32) % 2
    x = torch.randn(32, 1, 16, 16, generator=g) * 0.3
    x[y == 1, :, 4:12, 4:12] += 1.5
    net = _small_net()
    fit_pantypes(net, x, y, epochs=3, batch_size=16, lr=3e-3, seed=0)
    return net, x


def test_explainer_returns_one_map_per_target_and_restores_the_model():
    net, x = _trained_net()
    net.train()
    flags = [p.requires_grad for p in net.parameters()]
    for kind in ("decoded", "contribution"):
        ex = get_explainer("prototypes", net, kind=kind)
        maps = ex.explain(x[:5], target="all")
        assert maps.shape == (5, 2, 16, 16) and torch.isfinite(maps).all()
        assert maps.min() >= 0 and maps.max() <= 1
        assert ex.explain(x[:5], target="predicted").shape == (5, 1, 16, 16)
    assert net.training and [p.requires_grad for p in net.parameters()] == flags
    # decoded: the similarity-weighted mean of the target class's decoded prototypes (intensities)
    net.eval()
    with torch.no_grad():
        s = net.similarities(net.encode(x[:1])[0]).view(2, M)[1]
        imgs = net.decoded_prototypes()[M:].mean(1)
    want = ((s / s.sum())[:, None, None] * imgs).sum(0)
    got = get_explainer("prototypes", net).explain(x[:1], target=1)[0, 0]
    assert torch.allclose(got, want, atol=1e-6)
    with pytest.raises(ParameterError, match="Pantypes"):
        get_explainer("prototypes", torch.nn.Conv2d(1, 2, 3))
    with pytest.raises(ParameterError, match="kind"):
        get_explainer("prototypes", net, kind="prp")


def test_top_prototypes_and_figure(tmp_path):
    net, x = _trained_net()
    top = top_prototypes(net, x[:3], k=4)
    assert top["index"].shape == top["similarity"].shape == top["distance"].shape == (3, 4)
    assert top["image"].shape == (3, 4, 1, 16, 16)
    assert (top["image"] >= 0).all() and (top["image"] <= 1).all()
    assert (top["similarity"][:, :-1] >= top["similarity"][:, 1:]).all()  # descending
    d = top["distance"]
    assert torch.allclose(top["similarity"], torch.log((d + 1) / (d + 1e-4)), rtol=1e-4)
    assert torch.equal(top["class"], top["index"] // M)
    only = top_prototypes(net, x[:3], k=10, target=1)
    assert only["index"].shape == (3, M) and (only["class"] == 1).all()
    backend = matplotlib.get_backend()
    fig = prototype_figure(net, x[:2], k=3, path=tmp_path / "protos.png")
    assert len(fig.axes) == 2 * 4 and (tmp_path / "protos.png").stat().st_size > 0
    assert matplotlib.get_backend() == backend


# ----------------------------------------------------------------------------- nemt train / explain

def test_nemt_train_arch_pantypes_and_explain(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["data", "phantoms", str(tmp_path / "ph"), "--n", "24", "--size", "28",
                              "--seed", "0"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train", "--data", str(tmp_path / "ph"), "--arch", "pantypes", "--size", "28",
                              "--epochs", "1", "--batch-size", "8", "--seed", "0", "--out", str(tmp_path / "m"),
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    clf = load_model(tmp_path / "m")
    assert clf.card.arch == "pantypes" and clf.card.arch_kwargs["input_size"] == [28, 28]
    assert isinstance(clf.net, Pantypes) and int(clf.net.noise_step) > 0  # trained with sampled z
    # a new card records the distance; a card without it (written before the choice) rebuilds the squared one
    assert clf.card.arch_kwargs["distance"] == "euclidean" and clf.net.distance == "euclidean"
    assert Pantypes(out_channels=2).distance == "squared"
    img = sorted((tmp_path / "ph" / "images").glob("*.png"))[0]
    res = runner.invoke(app, ["explain", str(img), "--model", str(tmp_path / "m"), "--method", "prototypes",
                              "--target", "all", "--out", str(tmp_path / "maps")])
    assert res.exit_code == 0, res.output
    maps = sorted((tmp_path / "maps").glob("*.npy"))
    assert len(maps) == len(clf.label_names)
    assert np.load(maps[0]).shape == (28, 28)
    # the service (and its viewer) shows each requested label's nearest prototypes of that class, decoded
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image as PILImage

    from nemt.data import read_image
    from nemt.deploy.service import PROTOTYPES_SHOWN, build_explainers, create_app
    from nemt.models.pantypes import top_prototypes

    with TestClient(create_app(clf, build_explainers(clf, None, ["prototypes"]))) as client:
        r = client.post("/v1/explain", files={"file": (img.name, img.read_bytes(), "application/octet-stream")},
                        data={"labels": "all"})
        assert r.status_code == 200, r.text
        viewer = client.get("/").text
    protos = r.json()["prototypes"]
    assert list(protos) == list(clf.label_names) and 'id="prototypes"' in viewer
    x = clf.preprocessing(read_image(img))[None]
    for t, name in enumerate(clf.label_names):
        top = top_prototypes(clf, x, PROTOTYPES_SHOWN, target=t)
        assert [p["index"] for p in protos[name]] == top["index"][0].tolist()  # that class's, nearest first
        assert all(int(clf.net.prototype_class[p["index"]]) == t for p in protos[name])
        sims = [p["similarity"] for p in protos[name]]
        assert sims == sorted(sims, reverse=True) and sims == pytest.approx(top["similarity"][0].tolist(), abs=1e-4)
        png = np.asarray(PILImage.open(io.BytesIO(base64.b64decode(protos[name][0]["png"]))))
        assert png.shape == (28, 28)
    # the benchmark report shows the gallery images' nearest prototypes (only for a prototype model)
    res = runner.invoke(app, ["benchmark", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "ph"),
                              "--methods", "prototypes,random", "--metrics", "relevance_mass", "--limit", "8",
                              "--gallery", "2", "--out", str(tmp_path / "bench"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "Nearest prototypes" in (tmp_path / "bench" / "report.html").read_text()
    from nemt.bench.runner import load_benchmark_data, prototype_section
    from nemt.data import open_dataset
    from nemt.models.zoo import build_model
    data = load_benchmark_data(clf, open_dataset(tmp_path / "ph", labels=clf.label_names), [0, 1])
    assert prototype_section(data, data.items[:1], {"sobel": get_explainer("sobel", build_model(
        "smallcnn", spatial_dims=2, in_channels=1, out_channels=4))}) is None


def test_nemt_training_of_pantypes_resumes_exactly(small_csv, tmp_path):
    """The reparameterisation noise is keyed by saved buffers: a resumed run equals an uninterrupted one."""
    from conftest import Interrupted, stop_after_first_epoch
    from nemt.data import open_dataset
    from nemt.models import TrainConfig, train_classifier

    cfg = dict(arch="pantypes", size=(16, 16), epochs=2, batch_size=4, lr=3e-3, seed=0,
               arch_kwargs={"latent_dim": 8, "width": 4})
    m = open_dataset(small_csv)
    full, _ = train_classifier(m, tmp_path / "full", TrainConfig(**cfg), progress=False, log=lambda s: None)
    with pytest.raises(Interrupted):
        train_classifier(m, tmp_path / "cut", TrainConfig(**cfg), progress=False, log=stop_after_first_epoch)
    resumed, result = train_classifier(m, tmp_path / "cut", TrainConfig(**cfg), progress=False, log=lambda s: None)
    assert len(result["history"]) == 2
    want = full.net.state_dict()
    for k, v in resumed.net.state_dict().items():
        assert torch.allclose(v.float(), want[k].float(), atol=1e-6), k
