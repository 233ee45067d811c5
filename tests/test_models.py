"""Model zoo, cards and checkpoints: shapes, round trips, and clear refusals."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from nemt.checkpoint import load_state, save_state
from nemt.errors import CardError, NemtError
from nemt.models import ARCHITECTURES, Classifier, build_model, load_model


@pytest.mark.parametrize("arch,dims", [(a, 2) for a in sorted(ARCHITECTURES)] + [("resnet18", 3), ("smallcnn", 3)])
def test_zoo_shapes(arch, dims):
    net = build_model(arch, spatial_dims=dims, in_channels=1, out_channels=4).eval()
    size = (32,) * dims
    with torch.no_grad():
        assert net(torch.zeros(2, 1, *size)).shape == (2, 4)


def test_zoo_rejects_unknown():
    with pytest.raises(NemtError, match="unknown architecture"):
        build_model("vit", spatial_dims=2, in_channels=1, out_channels=2)


def _clf(task="multiclass", labels=("a", "b", "c")):
    torch.manual_seed(0)
    net = build_model("smallcnn", spatial_dims=2, in_channels=1, out_channels=1 if task == "regression" else len(labels))
    clf = Classifier.from_module(net, spatial_dims=2, in_channels=1, input_size=(32, 32), task=task,
                                 label_names=list(labels), arch="smallcnn",
                                 target_scale={"mean": 10.0, "std": 2.0} if task == "regression" else None)
    return clf.eval()


def test_save_load_round_trip(tmp_path):
    clf = _clf()
    x = torch.randn(3, 1, 32, 32)
    clf.save(tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert back.card.label_names == ["a", "b", "c"] and not back.training
    assert torch.equal(clf(x), back(x))
    assert torch.allclose(back.predict(x).sum(1), torch.ones(3))
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    assert len(card["weights_sha256"]) == 64 and card["format"] == "nemt-model/1"


def test_regression_outputs_in_target_units(tmp_path):
    clf = _clf("regression", ("severity",))
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(clf(x), clf.net(x) * 2.0 + 10.0)
    clf.save(tmp_path)
    assert torch.allclose(load_model(tmp_path)(x), clf(x))


def test_load_refuses_tampered_weights(tmp_path):
    _clf().save(tmp_path)
    other = tmp_path / "other"
    _clf(labels=("a", "b")).save(other)
    (tmp_path / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(CardError, match="weights_sha256"):
        load_model(tmp_path)


def test_load_refuses_weights_of_another_shape(tmp_path):
    _clf().save(tmp_path)
    card = json.loads((tmp_path / "model.json").read_text())
    card["label_names"] = ["a", "b"]  # card now says 2 outputs, weights have 3
    (tmp_path / "model.json").write_text(json.dumps(card))
    with pytest.raises(CardError, match=r"fc.weight is \(3, 128\), network wants \(2, 128\)"):
        load_model(tmp_path)


@pytest.mark.parametrize("field,value,match", [
    ("task", "segmentation", "task"),
    ("spatial_dims", 4, "spatial_dims"),
    ("input_size", [32], "input_size"),
    ("label_names", [], "label_names"),
    ("format", "other/9", "format"),
    ("in_channels", "1", "in_channels"),
])
def test_card_validation_names_the_field(tmp_path, field, value, match):
    _clf().save(tmp_path)
    card = json.loads((tmp_path / "model.json").read_text())
    card[field] = value
    (tmp_path / "model.json").write_text(json.dumps(card))
    with pytest.raises(CardError, match=match) as info:
        load_model(tmp_path)
    assert "model.json" in str(info.value)


def test_missing_or_broken_card(tmp_path):
    with pytest.raises(CardError, match="model card not found"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(CardError, match="not valid JSON"):
        load_model(tmp_path)


def test_user_module_needs_module_argument(tmp_path):
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 2)

        def forward(self, x):
            return self.lin(x.flatten(1))

    clf = Classifier.from_module(Tiny(), spatial_dims=2, in_channels=1, input_size=(4, 4), task="multiclass",
                                 label_names=["no", "yes"])
    clf.save(tmp_path)
    with pytest.raises(CardError, match="pass the network as module="):
        load_model(tmp_path)
    back = load_model(tmp_path, module=Tiny())
    x = torch.randn(2, 1, 4, 4)
    assert torch.equal(back(x), clf(x))


def test_state_round_trip_without_pickle(tmp_path):
    net = nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"epoch": 3, "best": 0.5, "history": [{"a": 1.0}], "model": net.state_dict(),
             "optimizer": opt.state_dict(), "rng": torch.get_rng_state()}
    save_state(tmp_path / "last", state)
    back = load_state(tmp_path / "last")
    assert back["epoch"] == 3 and back["history"] == [{"a": 1.0}]
    assert torch.equal(back["rng"], state["rng"])
    opt2 = torch.optim.AdamW(nn.Linear(3, 2).parameters())
    opt2.load_state_dict(back["optimizer"])  # int keys of the optimiser state come back as ints
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def _edit_card(tmp_path, edit) -> None:
    _clf().save(tmp_path)
    card = json.loads((tmp_path / "model.json").read_text())
    edit(card)
    (tmp_path / "model.json").write_text(json.dumps(card))  # json.dumps writes a NaN as bare NaN


@pytest.mark.parametrize("edit,field,reason", [
    (lambda c: c["preprocessing"].update(std=[0.0]), "preprocessing.std", "must be positive"),
    (lambda c: c["preprocessing"].update(std=[float("nan")]), "preprocessing.std", "finite numbers"),
    (lambda c: c["preprocessing"].update(mean=[float("inf")]), "preprocessing.mean", "finite numbers"),
    (lambda c: c["preprocessing"].update(size=[64, 64]), "preprocessing.size", "differs from input_size [32, 32]"),
    (lambda c: c["preprocessing"].update(channels=3), "preprocessing.channels", "differs from in_channels 1"),
    (lambda c: c["preprocessing"].update(scale="zscore"), "preprocessing.scale", "range or minmax"),
    (lambda c: c["preprocessing"].update(crop=4), "preprocessing", "unknown keys ['crop']"),
    (lambda c: c.update(weights_sha256=None), "weights_sha256", "missing (null)"),
    (lambda c: c.update(weights_sha256="abc"), "weights_sha256", "64 lower-case hex digits"),
    (lambda c: c.update(arch_kwargs={"wdith": 8}), "arch_kwargs", "smallcnn cannot be built with {'wdith': 8}"),
    (lambda c: c.update(arch_kwargs=[1, 2]), "arch_kwargs", "keyword arguments"),
    (lambda c: c.update(target_scale={"mean": 0.0, "std": 0.0}), "target_scale.std", "must be positive"),
])
def test_card_contents_that_would_mislead_are_refused(tmp_path, edit, field, reason):
    """Each would give NaN or silently other predictions, skip the weights check, or a raw TypeError."""
    _edit_card(tmp_path, edit)
    with pytest.raises(CardError) as info:
        load_model(tmp_path)
    msg = str(info.value)
    assert f"model.json: {field}: " in msg and reason in msg, msg


def test_weights_and_card_get_the_same_normal_mode(tmp_path):
    """safetensors writes its files 0600; every output gets a normal file's mode, like the JSON beside it."""
    _clf().save(tmp_path)
    save_state(tmp_path / "state" / "last", {"w": torch.zeros(2)})
    (tmp_path / "plain.txt").write_text("x")  # a file made by open(): 0666 less the umask
    mode = (tmp_path / "plain.txt").stat().st_mode & 0o777
    for name in ("model.json", "model.safetensors", "state/last.safetensors", "state/last.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


def test_card_json_is_strict_an_undefined_auroc_is_null(tmp_path):
    """A validation split without some class gives AUROC NaN; model.json must still be valid strict JSON."""
    clf = _clf()
    clf.card.metrics = {"val": {"auroc": {"a": float("nan"), "b": 0.75}, "auroc_macro": float("inf")}}
    clf.save(tmp_path)

    def refuse(token):
        raise AssertionError(f"model.json holds the non-JSON constant {token}")
    card = json.loads((tmp_path / "model.json").read_text(), parse_constant=refuse)
    assert card["metrics"]["val"] == {"auroc": {"a": None, "b": 0.75}, "auroc_macro": None}
    assert load_model(tmp_path).card.metrics["val"]["auroc"]["a"] is None


def test_from_module_probes_the_wrapped_network():
    """A wrapped network that cannot take the described input, or gives another number of outputs than the
    labels, is refused when wrapped (not at the first explanation); the network's state is left as it was."""
    from nemt.errors import NemtError

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 3)).train()
    stats = net[1].running_mean.clone()
    kw = dict(spatial_dims=2, input_size=(16, 16), task="multiclass")
    Classifier.from_module(net, in_channels=1, label_names=["a", "b", "c"], **kw)
    assert net.training and torch.equal(net[1].running_mean, stats)  # probed in eval mode, no statistics moved
    with pytest.raises(NemtError, match=r"gives 3 outputs, the card describes 2 labels \['a', 'b'\]"):
        Classifier.from_module(net, in_channels=1, label_names=["a", "b"], **kw)
    with pytest.raises(NemtError, match=r"cannot take the described input \(2, 3, 16, 16\)"):
        Classifier.from_module(net, in_channels=3, label_names=["a", "b", "c"], **kw)
