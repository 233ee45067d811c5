"""Any ``nn.Module`` works with every explainer, and no call changes the caller's state.

The model is a plain ``torch.nn.Sequential`` (no card, no labels), left by
the caller in *training* mode with some parameters frozen and some not: after
every call its training flags, ``requires_grad`` flags, weights and BatchNorm
statistics, the global RNG state and the thread count must be exactly what
they were (a BatchNorm layer run in training mode would move its running
statistics; any ``model.eval()`` or ``requires_grad_`` not undone shows in the flags), and so must
NumPy's and Python's global generators and the model's hooks (a hook left behind piles up call after call
and stops the caller from pickling the model).
"""
from __future__ import annotations

import inspect
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

from nemt.explainers import NEM, NEMt, available, get_explainer
from nemt.explainers.base import _REGISTRY

FAST = {
    "ig": {"n_steps": 4}, "gradshap": {"n_samples": 3}, "lime": {"n_samples": 12, "cell": 8},
    "kernelshap": {"n_samples": 12, "cell": 8}, "occlusion": {"window": 8, "stride": 8},
    "rise": {"n_masks": 16}, "relax": {"n_masks": 16}, "u-relax": {"n_masks": 16},
    "extremal": {"steps": 3}, "inpainting": {"steps": 3, "inpainter": "diffusion"},
}
SIZE = 16


def plain_net(n_out: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, n_out))
    net.train()  # the caller's choice: must survive every call
    net[0].weight.requires_grad_(False)  # mixed flags: each must come back as it was
    return net


def _hooks(net: nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in net.modules()]


def snapshot(net: nn.Module) -> dict:
    return {"training": [m.training for m in net.modules()],
            "requires_grad": [p.requires_grad for p in net.parameters()],
            "state": {k: v.clone() for k, v in net.state_dict().items()},
            "rng": torch.get_rng_state(), "numpy_rng": np.random.get_state()[1].copy(),
            "python_rng": random.getstate(), "threads": torch.get_num_threads(), "hooks": _hooks(net)}


def assert_unchanged(before: dict, net: nn.Module) -> None:
    after = snapshot(net)
    assert after["training"] == before["training"], "training flags changed"
    assert after["requires_grad"] == before["requires_grad"], "requires_grad flags changed"
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), f"{k} changed (weights or BatchNorm statistics)"
    assert torch.equal(after["rng"], before["rng"]), "the global RNG state changed"
    assert np.array_equal(after["numpy_rng"], before["numpy_rng"]), "NumPy's global RNG state changed"
    assert after["python_rng"] == before["python_rng"], "Python's global RNG state changed"
    assert after["threads"] == before["threads"], "the thread count changed"
    assert after["hooks"] == before["hooks"], "hooks were left on the model"


def _explainer(name: str, net: nn.Module):
    if name in ("nemt", "nem"):
        cls = NEMt if name == "nemt" else NEM
        return cls(net, input_size=(SIZE, SIZE), in_channels=1, decoder_channels=(8, 8, 8, 8, 8)).init_module()
    return get_explainer(name, net, **FAST.get(name, {}))


@pytest.mark.parametrize("name", [m for m in available()  # but the methods of one architecture (prototypes)
                                  if getattr(_REGISTRY[m], "model_arch", None) is None])
def test_every_explainer_takes_a_plain_module_and_leaves_no_trace(name):
    net = plain_net()
    x = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    before = snapshot(net)
    ex = _explainer(name, net)
    maps = ex.explain(x)  # default target: the predicted class of a (multi-class) plain module
    per_sample = ex.explain(x, target=torch.tensor([2, 0]))
    every = ex.explain(x, target="all")
    assert_unchanged(before, net)
    n_maps = 1 if name in ("nem", "relax", "u-relax") else None
    assert maps.shape == (2, 1, SIZE, SIZE)
    assert per_sample.shape == (2, 1, SIZE, SIZE)
    assert every.shape == (2, n_maps or 3, SIZE, SIZE), "'all' must count a plain module's outputs"
    assert torch.isfinite(every).all()


def test_nemt_fits_a_plain_module_and_restores_its_state():
    net = plain_net()
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(4, 1, SIZE, SIZE, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]
    before = snapshot(net)
    ex = NEMt(net, input_size=(SIZE, SIZE), in_channels=1, decoder_channels=(8, 8, 8, 8, 8), epochs=1, seed=0)
    ex.fit(data, val_data=data, progress=False, log=lambda s: None)
    assert_unchanged(before, net)
    assert ex.collapse_ is not None and set(ex.collapse_["targets"]) == {"output 0", "output 1", "output 2"}
    assert ex.explain(data[0][0], target="all").shape == (4, 3, SIZE, SIZE)
    assert_unchanged(before, net)
    pickle.dumps(net)  # no hook of a local function left on it


def test_nemt_fit_from_a_dataset_leaves_the_global_generators_alone():
    """A map-style data set is batched by a DataLoader, whose shuffling must not draw from the global RNG."""
    net = plain_net()
    g = torch.Generator().manual_seed(3)
    ds = torch.utils.data.TensorDataset(torch.randn(8, 1, SIZE, SIZE, generator=g), torch.randint(0, 3, (8,), generator=g))
    before = snapshot(net)
    NEMt(net, input_size=(SIZE, SIZE), in_channels=1, decoder_channels=(8, 8, 8, 8, 8), epochs=1, seed=0,
         batch_size=4).fit(ds, val_data=[ds[:4]], progress=False, log=lambda s: None)
    assert_unchanged(before, net)


def test_gradient_shap_is_seeded_whatever_numpys_global_state():
    """Captum's Gradient SHAP draws from np.random: the explainer's seed alone decides its map."""
    net = plain_net().eval()
    x = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    maps = []
    for outside in (1, 2):
        np.random.seed(outside)
        maps.append(get_explainer("gradshap", net, n_samples=3, seed=0).explain(x, target=torch.tensor([0, 1])))
    assert torch.equal(maps[0], maps[1])
    alone = get_explainer("gradshap", net, n_samples=3, seed=0).explain(x[1:], target=torch.tensor([1]))
    assert torch.equal(alone, maps[0][1:]), "a map must not depend on the rest of its batch"


def test_wrong_inputs_raise_standard_exception_types():
    net = plain_net().eval()
    ex = get_explainer("gradcam", net)
    with pytest.raises(TypeError):
        ex.explain([[0.0]])
    with pytest.raises(ValueError):
        ex.explain(torch.zeros(2, 16))  # no spatial axis
    with pytest.raises(ValueError):
        ex.explain(torch.zeros(2, 1, SIZE, SIZE), target=7)  # out of range for 3 outputs
    with pytest.raises(ValueError):
        get_explainer("no-such-method", net)
    with pytest.raises(ValueError, match="no label names"):  # a name means nothing without a card
        ex.explain(torch.zeros(2, 1, SIZE, SIZE), target="nodule")


@pytest.mark.parametrize("name", [m for m in available() if getattr(_REGISTRY[m], "model_arch", None) is None])
def test_every_explainer_answers_bad_tensors_clearly(name):
    """A float64 tensor (from NumPy) is explained as the model's float32; an empty batch, NaN or inf, or a
    channel-last tensor gives one ValueError that names the problem, never a bare PyTorch error from inside."""
    net = plain_net().eval()
    ex = _explainer(name, net)
    x = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([2, 0])
    as_float = ex.explain(x, target=t)
    from_double = ex.explain(x.double(), target=t)
    # the same input, one rounding (float64 -> float32) apart: bit-equal, since the cast is exact for these values
    assert from_double.dtype == as_float.dtype and torch.equal(from_double, as_float)
    nan = x.clone()
    nan[1, 0, 3, 4] = float("nan")
    for bad, words in ((x[:0], "no image"), (nan, "1 NaN or infinite values, in 1 of its 2 images"),
                       (x.clone().fill_(float("inf")), "NaN or infinite")):
        with pytest.raises(ValueError, match=words):
            ex.explain(bad, target=t[:len(bad)] if len(bad) else 0)
    from nemt.explainers.reference import _Reference
    # NEMt and NEM know their input size and say so themselves; reference maps never call the model
    if name not in ("nemt", "nem") and not isinstance(ex, _Reference):
        with pytest.raises(ValueError, match=r"shape \(2, 16, 16, 1\)|larger than the input|channel"):
            ex.explain(x.permute(0, 2, 3, 1), target=t)


def test_nemt_fit_refuses_data_it_cannot_learn_from():
    """Empty data once "fitted" without a step, NaN images trained the decoder into NaN, images of another size
    fitted a decoder that explain then refused, and a label beyond the outputs failed deep in an index: each is
    now one error naming it, before or at the first batch."""
    from nemt.errors import NemtError

    net = plain_net()
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(4, 1, SIZE, SIZE, generator=g), torch.tensor([0, 1, 2, 1])
    nan = x.clone()
    nan[2, 0, 1, 1] = float("nan")
    cases = (([], "gave no batch"), ([(nan, y)], "1 NaN or infinite values, in 1 of its 4 images"),
             ([(torch.randn(4, 1, 2 * SIZE, 2 * SIZE), y)], r"shape \(4, 1, 32, 32\)"),
             ([(x, torch.tensor([0, 1, 5, 2]))], "run from 0 to 5; the model has 3 outputs"))
    before = snapshot(net)
    for data, words in cases:
        with pytest.raises(NemtError, match=words):
            NEMt(net, input_size=(SIZE, SIZE), in_channels=1, decoder_channels=(8, 8, 8, 8, 8), epochs=1,
                 seed=0).fit(data, progress=False, log=lambda s: None)
        assert_unchanged(before, net)
    # NEM ignores labels: any y passes
    NEM(net, input_size=(SIZE, SIZE), in_channels=1, decoder_channels=(8, 8, 8, 8, 8), epochs=1,
        seed=0).fit([(x, torch.tensor([0, 1, 5, 2]))], progress=False, log=lambda s: None)


def test_nemt_is_a_scikit_learn_estimator():
    """Parameters from the signature, unchanged by fit; learned state in trailing-underscore attributes; clone."""
    from sklearn.base import clone

    net = plain_net()
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(4, 1, SIZE, SIZE, generator=g), torch.randint(0, 3, (4,), generator=g))]
    ex = NEMt(net, input_size=(SIZE, SIZE), in_channels=1, decoder_channels=(8, 8, 8, 8, 8), epochs=1)
    before = ex.get_params()
    assert before["layers"] is None and before["kernel_size"] is None and before["epochs"] == 1
    assert before["model"] is net
    ex.fit(data, epochs=2, progress=False, log=lambda s: None)
    after = ex.get_params()
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before), "fit edited a parameter"
    assert ex.layers_ and ex.kernel_size_ and ex.epochs_ == 2 and ex.module_ is not None
    twin = clone(ex)  # scikit-learn's own check: the constructor stores each parameter as given
    assert twin.module_ is None and twin.layers_ is None
    assert {k: v for k, v in twin.get_params().items() if k != "model"} == \
        {k: v for k, v in before.items() if k != "model"}
    assert ex.set_params(seed=5).get_params()["seed"] == 5 and ex.module_ is None


def test_nemt_fit_batches_a_dataset_by_its_batch_size():
    from torch.utils.data import TensorDataset

    net = plain_net()
    g = torch.Generator().manual_seed(4)
    ds = TensorDataset(torch.randn(10, 1, SIZE, SIZE, generator=g), torch.randint(0, 3, (10,), generator=g))
    ex = NEMt(net, input_size=(SIZE, SIZE), in_channels=1, decoder_channels=(8, 8, 8, 8, 8), epochs=1,
              batch_size=4)
    seen = []
    ex._step = (lambda step: (lambda x, y, gen: (seen.append(len(x)), step(x, y, gen))[1]))(ex._step)
    ex.fit(ds, progress=False, log=lambda s: None)
    assert seen == [4, 4], "10 items in batches of 4, the partial batch dropped"


def test_every_metric_takes_a_plain_module_and_leaves_no_trace():
    """Every registered metric, fed by its declared inputs, on the plain module left in training mode."""
    from nemt.metrics import registry

    net = plain_net()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1, SIZE, SIZE, generator=g)
    target = torch.tensor([1, 2])
    gt = torch.zeros(2, 1, SIZE, SIZE, dtype=torch.bool)
    gt[:, :, 4:9, 5:11] = True
    explain = lambda m, xx, t: get_explainer("saliency", m).explain(xx, target=t)  # noqa: E731
    maps = explain(net, x, target)
    values = {"maps": maps, "gt": gt, "gaze": torch.rand(2, 1, SIZE, SIZE, generator=g),
              "fixations": (torch.rand(2, 1, SIZE, SIZE, generator=g) > 0.9).float(), "model": net, "x": x,
              "target": target, "explain": explain}
    budgets = {"faithfulness_estimate": {"subset_size": 16, "n_perturbations": 4},
               "deletion_auc": {"steps": 4}, "insertion_auc": {"steps": 4}, "road": {"percentages": (10, 50)}}
    before = snapshot(net)
    for name, spec in registry().items():
        params = {k: v for k, v in budgets.get(name, {}).items()
                  if k in inspect.signature(spec.fn).parameters}
        out = spec.call(values, **params)
        first = next(iter(out.values())) if isinstance(out, dict) else out
        assert first.shape == (2, 1), name
        assert_unchanged(before, net)


def test_training_a_classifier_hands_back_the_global_generators(tmp_path):
    """train_classifier seeds Python, NumPy and torch for reproducible training, then restores the caller's states."""
    import random

    import numpy as np

    from nemt.data import open_dataset, write_phantom_dataset
    from nemt.models import TrainConfig, train_classifier

    manifest = open_dataset(write_phantom_dataset(tmp_path / "ph", 24, 32, seed=0))
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    threads = torch.get_num_threads()
    train_classifier(manifest, tmp_path / "m", TrainConfig(arch="smallcnn", size=(32, 32), epochs=1, seed=0),
                     progress=False, log=lambda s: None)
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    assert torch.get_num_threads() == threads
    from nemt.models import load_model
    load_model(tmp_path / "m")  # builds the architecture (random initial weights) before loading the weights
    assert torch.equal(torch.get_rng_state(), states[2])


def test_layers_by_name_or_by_module():
    net = plain_net().eval()
    x = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(6))
    by_name = get_explainer("gradcam", net, layer="3").explain(x, target="all")
    by_module = get_explainer("gradcam", net, layer=net[3]).explain(x, target="all")
    assert torch.equal(by_name, by_module)
    ex = NEMt(net, input_size=(SIZE, SIZE), in_channels=1, layers=[net[2], "5"], decoder_channels=(8, 8)).init_module()
    assert ex.layers_ == ["2", "5"] and ex.hyper_params()["layers"] == ["2", "5"]
    with pytest.raises(ValueError):
        get_explainer("gradcam", net, layer=nn.Conv2d(1, 1, 1))  # not part of the model


def test_a_model_that_does_not_return_logits_is_named():
    """A model returning a tuple, a dict or a (B,) vector failed deep inside ('tuple' object has no attribute
    'ndim'); every explainer and metric now says what it returned and what nemt needs."""
    from nemt.metrics import deletion_auc, faithfulness_estimate

    class Returns(nn.Module):
        def __init__(self, how):
            super().__init__()
            self.conv, self.how = nn.Conv2d(1, 3, 3, stride=2), how

        def forward(self, x):
            z = self.conv(x).mean((2, 3))
            return {"tuple": (z, z), "dict": {"logits": z}, "vector": z[:, 0]}[self.how]

    x = torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    for how, words in (("tuple", "returned a tuple"), ("dict", "returned a dict"), ("vector", r"unsqueeze\(1\)")):
        net = Returns(how)
        for call in (lambda: get_explainer("ig", net, n_steps=2).explain(x, target=0),
                     lambda: get_explainer("occlusion", net, window=8, stride=8).explain(x, target=0),
                     lambda: faithfulness_estimate(net, x, torch.rand(2, 1, SIZE, SIZE), target=0),
                     lambda: deletion_auc(net, x, torch.rand(2, 1, SIZE, SIZE), target=0)):
            with pytest.raises(ValueError, match=words):
                call()


def test_silent_misreadings_found_by_the_api_audit_are_refused_or_fixed():
    """A one-logit plain module's softmax was 1 for every input (RISE maps identical for two images, deletion
    AUC 1.0 for every map): one output is now read through a sigmoid. A float or multi-hot target tensor was
    cast to indices (label 1.7 -> 1): now refused. A soft ground-truth mask (0.01 background) made every
    pixel lesion: now refused, as are NaN masks."""
    from nemt.errors import NemtError
    from nemt.metrics import deletion_auc, relevance_mass

    torch.manual_seed(0)
    one = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 1)).eval()
    g = torch.Generator().manual_seed(8)
    x = torch.rand(2, 1, SIZE, SIZE, generator=g)
    x[1] = torch.rand(1, SIZE, SIZE, generator=g) * 3 - 1  # two clearly different images
    r = get_explainer("rise", one, n_masks=64, seed=0).raw(x, target=0)
    assert not torch.equal(r[0], r[1])
    d = deletion_auc(one, x, torch.rand(2, 1, SIZE, SIZE, generator=g), target=0, steps=5)
    assert not torch.allclose(d, torch.ones_like(d))
    net = plain_net().eval()
    with pytest.raises(ValueError, match=r"integer dtype\), got torch.float32"):
        get_explainer("gradcam", net).explain(x, target=torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]))
    maps = torch.rand(2, 1, SIZE, SIZE, generator=g)
    gt = torch.zeros(2, 1, SIZE, SIZE)
    gt[:, :, 2:6, 2:6] = 1
    ok = relevance_mass(maps, gt)
    assert torch.equal(relevance_mass(maps, gt * 255), ok)  # 0/255 masks as PNGs store them: binary
    with pytest.raises(NemtError, match="soft mask"):
        relevance_mass(maps, gt * 0.98 + 0.01)
    with pytest.raises(NemtError, match="NaN"):
        relevance_mass(maps, torch.full_like(gt, float("nan")))


@pytest.mark.parametrize("name", ["occlusion", "rise", "ig", "gradshap", "gradcam++", "extremal", "relax"])
@pytest.mark.parametrize("change", ["load_state_dict", "data", "optimizer"])
def test_explainer_built_before_a_weight_change_explains_the_new_weights(name, change):
    """Methods with ``fast=True`` run a folded copy of the model made at construction; after the caller changes
    the weights (``load_state_dict``, an edit through ``.data`` that bumps no version counter, an optimiser
    step) the maps must be those of the new weights: equal to a fresh explainer's (same seed, same model, same
    arithmetic, so equal to float rounding of identical operations: 1e-6) and unlike the old ones."""
    net = plain_net().eval()
    x = torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    old_explainer = get_explainer(name, net, seed=0, **FAST.get(name, {}))
    before = old_explainer.explain(x, target=1)
    torch.manual_seed(5)
    if change == "load_state_dict":
        net.load_state_dict({k: v + 0.3 * torch.randn_like(v) if v.is_floating_point() else v
                             for k, v in net.state_dict().items()})
    elif change == "data":
        for p in net.parameters():
            p.data.mul_(-1.5)
    else:
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
        net(x).pow(2).sum().mul(-1).backward()
        opt.step()
    after = old_explainer.explain(x, target=1)
    fresh = get_explainer(name, net, seed=0, **FAST.get(name, {})).explain(x, target=1)
    torch.testing.assert_close(after, fresh, rtol=1e-5, atol=1e-6)
    assert (after - before).abs().max() > 1e-3, "the change of weights did not move the map: a weak test"


@pytest.mark.parametrize("name,params,size", [("extremal", {"steps": 2}, 8), ("inpainting", {"steps": 2}, 6),
                                              ("occlusion", {"window": 8, "stride": 4}, 8)])
def test_a_grid_of_one_cell_is_refused(name, params, size):
    """A mask grid of one cell (extremal perturbation and inpainting: mask_stride 8 on an 8x8 image) or one
    occlusion window over the whole image gives a constant map, which the post-processing turned into an
    all-zero map without a word: refused, naming the parameter and a value that works (which then does)."""
    net = plain_net().eval()
    x = torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(0))
    param = "window" if name == "occlusion" else "mask_stride"
    with pytest.raises(ValueError, match=f"lower {param}|smaller window"):
        get_explainer(name, net, **params).explain(x, target=0)
    params = {**params, param: size // 2, **({"stride": size // 4} if name == "occlusion" else {})}
    maps = get_explainer(name, net, **params).explain(x, target=0)
    assert maps.shape == (1, 1, size, size) and torch.isfinite(maps).all()


def test_numpy_and_empty_targets():
    """A NumPy array of indices is read as a tensor (one target per sample), a NumPy array of label names as a
    list; an empty list or tensor is a clear error (was: 'stack expects a non-empty TensorList')."""
    net = plain_net().eval()
    x = torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    gc = get_explainer("gradcam", net)
    torch.testing.assert_close(gc.explain(x, target=np.array([2, 0])), gc.explain(x, target=torch.tensor([2, 0])))
    for empty in ([], (), torch.zeros(2, 0, dtype=torch.long), np.array([], dtype=np.int64)):
        with pytest.raises(ValueError, match="target is empty"):
            gc.explain(x, target=empty)


def test_device_other_than_the_models_is_refused():
    """``device=`` where the weights are not (here: the 'meta' device, which any machine has) failed inside the
    model with PyTorch's device message; now refused when the explainer is built, saying what to do."""
    with pytest.raises(ValueError, match=r"device='meta' but the model's weights are on 'cpu': move the model"):
        get_explainer("occlusion", plain_net(), device="meta")
    get_explainer("occlusion", plain_net(), device="cpu")  # the model's own device: fine


BASELINES = sorted(set(available()) - {"nemt", "nem", "prototypes"})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    """A bfloat16/float16 model: the layer probe fed it float32 zeros, and RISE's masks, Captum's Gradient SHAP
    points, RELAX's similarities and the Sobel kernel were float32 (dtype errors). Every baseline now gives
    finite float32 maps of the input's shape; NEMt learns in float32 and refuses such a model, saying what to do."""
    net = plain_net().eval().to(dtype)
    x = torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    for name in BASELINES:
        maps = get_explainer(name, net, **FAST.get(name, {})).explain(x, target=1)
        assert maps.shape == (2, 1, SIZE, SIZE) and maps.dtype == torch.float32, name
        assert torch.isfinite(maps).all(), name
    assert get_explainer("gradcam", net).explain(x, target=1).amax() > 0
    with pytest.raises(ValueError, match=f"fits float32 models; this one's weights are {dtype}"):
        NEMt(net, input_size=(SIZE, SIZE), in_channels=1)


def test_nemt_fits_under_the_callers_no_grad():
    """``NEMt.fit`` inside the caller's ``torch.no_grad()`` failed with 'element 0 of tensors does not require
    grad'; it now trains (the decoder's weights move) and the caller's grad mode is off again afterwards."""
    net = plain_net().eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(4, 1, SIZE, SIZE, generator=g), torch.tensor([0, 1, 2, 0]))]
    nemt = NEMt(net, input_size=(SIZE, SIZE), in_channels=1, epochs=1, batch_size=4)
    start = {k: v.clone() for k, v in nemt.init_module().module_.decoder.state_dict().items()}
    with torch.no_grad():
        nemt.fit(data, progress=False, log=lambda s: None)
        assert not torch.is_grad_enabled()
    moved = [k for k, v in nemt.module_.decoder.state_dict().items() if not torch.equal(v, start[k])]
    assert moved, "no decoder weight changed: the fit did not train"


def test_importing_nemt_leaves_the_callers_global_rngs_as_they_were():
    """rich (progress bars; MONAI imports it) draws from Python's global `random` when first imported: nemt
    imports it under the caller's state. A fresh interpreter, as a user's script would be."""
    import subprocess
    import sys

    code = ("import random, numpy as np\n"
            "random.seed(0); np.random.seed(0); want = (random.random(), np.random.rand())\n"
            "random.seed(0); np.random.seed(0)\n"
            "import nemt.cli, nemt.clustering, nemt.explainers, nemt.metrics, nemt.models, nemt.bench\n"
            "assert (random.random(), np.random.rand()) == want, 'an import moved a global RNG'\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
