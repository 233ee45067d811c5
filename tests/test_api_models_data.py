"""The Python API of nemt.models and nemt.data met with wrong or awkward input: one clear error naming the
field (or file) and the reason, raised before any work, and no change to the caller's objects.

Every test here failed before its fix (a traceback from deep inside torch/NumPy, a silent wrong result, or a
changed model state) and is fast: tiny synthetic data in tmp_path, no training beyond what is said.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from torch import nn

from nemt.data import ImageDataset, Preprocessing, Sample, Manifest, channel_stats, open_dataset, read_image, \
    split_indices
from nemt.errors import CardError, DataError
from nemt.models import Classifier, TrainConfig, build_model, load_model, load_splits, train_classifier
from nemt.models.training import _write_splits, evaluate

OK = dict(arch="smallcnn", size=(16, 16), epochs=1, batch_size=4, arch_kwargs={"width": 4})


def _png_set(root, n=12, labels=("a", "b", "c")):
    rng = np.random.default_rng(0)
    rows = ["image,label"]
    (root / "img").mkdir(parents=True)
    for i in range(n):
        PILImage.fromarray(rng.integers(0, 255, (20, 16), dtype=np.uint8)).save(root / "img" / f"c{i}.png")
        rows.append(f"img/c{i}.png,{labels[i % len(labels)]}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def _saved_model(tmp_path, labels=("a", "b", "c")):
    net = build_model("smallcnn", spatial_dims=2, in_channels=1, out_channels=len(labels), width=4)
    clf = Classifier.from_module(net, spatial_dims=2, in_channels=1, input_size=(16, 16), task="multiclass",
                                 label_names=list(labels), arch="smallcnn")
    clf.card.arch_kwargs = {"width": 4}
    return clf.save(tmp_path / "model")


def _reseal(folder):
    """Write the weights' SHA-256 into the card, as a tamperer who knows the format would."""
    card = json.loads((folder / "model.json").read_text())
    card["weights_sha256"] = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    (folder / "model.json").write_text(json.dumps(card))


# ---------------------------------------------------------------------------------------------- TrainConfig

@pytest.mark.parametrize("change, error, words", [
    ({"epochs": 0}, ValueError, "TrainConfig.epochs must be >= 1, got 0"),  # was torch's OneCycleLR total_steps
    ({"lr": -1.0}, ValueError, "TrainConfig.lr must be a finite number > 0"),  # was torch's Adam message
    ({"lr": 0.0}, ValueError, "TrainConfig.lr"),  # trained silently with a learning rate of 0
    ({"lr": "0.001"}, TypeError, "TrainConfig.lr must be a number, got '0.001'"),
    ({"epochs": "3"}, TypeError, "TrainConfig.epochs must be a whole number"),
    ({"batch_size": 0}, ValueError, "TrainConfig.batch_size must be >= 1"),
    ({"seed": -1}, ValueError, "TrainConfig.seed must be in [0, 4294967295]"),  # was NumPy's seed message
    ({"seed": 2**40}, ValueError, "TrainConfig.seed"),
    ({"size": (0, 16)}, ValueError, "TrainConfig.size"),  # was F.interpolate's message
    ({"size": 16}, TypeError, "TrainConfig.size must be a sequence"),  # was "'int' object is not iterable"
    ({"size": "16"}, TypeError, "TrainConfig.size"),  # was read as (1, 6)
    ({"size": (16.5, 16)}, ValueError, "TrainConfig.size"),  # was truncated to 16 silently
    ({"arch": "resnet99"}, ValueError, "TrainConfig.arch: unknown architecture 'resnet99'"),
    ({"channels": 0}, ValueError, "TrainConfig.channels must be >= 1"),  # 0 was taken as "from the data"
    ({"augment": "no"}, TypeError, "TrainConfig.augment must be True or False"),  # "no" was truthy: augmented
    ({"fractions": (0.8, 0.2)}, ValueError, "TrainConfig.fractions"),
    ({"weight_decay": float("nan")}, ValueError, "TrainConfig.weight_decay"),
    ({"arch_kwargs": {"out_channels": 3}}, ValueError, "come from the data"),
])
def test_train_config_refuses_a_bad_field_by_name(change, error, words):
    """Guards: each bad TrainConfig field is one ValueError/TypeError naming the field at construction."""
    with pytest.raises(error) as info:
        TrainConfig(**{**OK, **change})
    assert words in str(info.value)


def test_train_classifier_checks_a_changed_config_and_its_network_before_reading_or_writing(tmp_path):
    """Guards: a field changed after construction, an unknown architecture keyword and a size too small for
    the network are refused by train_classifier before any image is read or any file written (a too small
    size used to fail inside torch after splits.csv was written)."""
    m = open_dataset(_png_set(tmp_path / "d"))
    cfg = TrainConfig(**OK)
    cfg.epochs = 0
    with pytest.raises(ValueError, match="TrainConfig.epochs"):
        train_classifier(m, tmp_path / "a", cfg, progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match=r"TrainConfig.arch_kwargs: smallcnn cannot be built with \{'nope': 1\}"):
        train_classifier(m, tmp_path / "b", TrainConfig(**{**OK, "arch_kwargs": {"nope": 1}}), progress=False)
    with pytest.raises(ValueError, match=r"TrainConfig.size \[4, 4\]: too small for smallcnn"):
        train_classifier(m, tmp_path / "c", TrainConfig(**{**OK, "size": (4, 4)}), progress=False)
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        train_classifier(m, tmp_path / "d2", {"epochs": 1}, progress=False)
    assert not any((tmp_path / k).exists() for k in ("a", "b", "c", "d2"))


# ---------------------------------------------------------------------------------------------- load_model

def test_load_model_names_the_path_it_was_given(tmp_path):
    """Guards: a missing folder, an unrelated file, a bad device and a non-path are named as such (they were
    reported as a missing model.json of another folder, or as torch/pathlib errors)."""
    with pytest.raises(CardError, match="nope: no such model folder"):
        load_model(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CardError, match=r"notes.txt: a file, and its folder holds no model.json"):
        load_model(tmp_path / "notes.txt")
    folder = _saved_model(tmp_path)
    assert isinstance(load_model(folder / "model.safetensors"), Classifier)  # a file of the folder still works
    with pytest.raises(ValueError, match="device 'tpu' is not a torch device"):
        load_model(folder, device="tpu")
    with pytest.raises(TypeError, match="model folder"):
        load_model(5)


def test_load_model_refuses_weights_that_are_nan_or_not_floating(tmp_path):
    """Guards: consistent but unusable weights (NaN from a diverged run, integers in a float tensor) were
    loaded silently; now a CardError names the weights file, the tensor and the reason. Weights are read
    with safetensors only (a pickle under the name is unreadable, never unpickled)."""
    from safetensors.torch import load_file, save_file

    folder = _saved_model(tmp_path)
    st = load_file(str(folder / "model.safetensors"))
    st["fc.weight"][0, 0] = float("nan")
    save_file(st, str(folder / "model.safetensors"))
    _reseal(folder)
    with pytest.raises(CardError, match=r"model.safetensors: state_dict: fc.weight holds 1 NaN or infinite"):
        load_model(folder)
    st["fc.weight"] = torch.zeros_like(st["fc.weight"], dtype=torch.int32)
    save_file(st, str(folder / "model.safetensors"))
    _reseal(folder)
    with pytest.raises(CardError, match=r"fc.weight is stored as torch.int32"):
        load_model(folder)
    # float64 weights load cast to the network's float32; values beyond its range would turn infinite there
    good = load_file(str(_saved_model(tmp_path / "again") / "model.safetensors"))
    wide = {k: v.double() if v.is_floating_point() else v for k, v in good.items()}
    save_file(wide, str(folder / "model.safetensors"))
    _reseal(folder)
    assert load_model(folder).net.fc.weight.dtype == torch.float32
    wide["fc.weight"][0, 0] = 1e300
    save_file(wide, str(folder / "model.safetensors"))
    _reseal(folder)
    with pytest.raises(CardError, match=r"fc.weight is stored as torch.float64 and 1 of its values lie beyond"):
        load_model(folder)
    torch.save({"fc.weight": torch.zeros(3, 32)}, folder / "model.safetensors")
    _reseal(folder)
    with pytest.raises(CardError, match="unreadable safetensors file"):
        load_model(folder)


def test_load_model_refuses_an_input_size_the_network_cannot_take(tmp_path):
    """Guards: a card edited to an input size its network cannot take loaded and failed at the first forward
    pass with a pooling error; now the load probes it and names the card's field. A user's network
    (``module=``) is probed at any size (a Flatten + Linear head fixes the size); nemt's own only below 32 px
    (their pooling is adaptive above)."""
    def edit(folder, size):
        card = json.loads((folder / "model.json").read_text())
        card["input_size"] = card["preprocessing"]["size"] = size
        (folder / "model.json").write_text(json.dumps(card))

    folder = _saved_model(tmp_path)
    assert load_model(folder).card.input_size == [16, 16]
    edit(folder, [2, 2])
    with pytest.raises(CardError, match=r"model.json: input_size: the module cannot take the described input "
                                        r"\(2, 1, 2, 2\): RuntimeError"):
        load_model(folder)

    def fixed():  # a head that only takes 8 x 8 inputs
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 8 * 8, 3))

    clf = Classifier.from_module(fixed(), **{**KW, "input_size": (8, 8)})
    user = clf.save(tmp_path / "user")
    assert load_model(user, module=fixed()).card.input_size == [8, 8]
    edit(user, [40, 40])
    with pytest.raises(CardError, match=r"input_size: the module cannot take the described input \(2, 1, 40, 40\)"):
        load_model(user, module=fixed())
    # a label list longer than the network's outputs
    edit(user, [8, 8])
    card = json.loads((user / "model.json").read_text())
    (user / "model.json").write_text(json.dumps({**card, "label_names": ["a", "b", "c", "d"]}))
    with pytest.raises(CardError, match=r"label_names: the module gives 3 outputs, the card describes 4 labels"):
        load_model(user, module=fixed())
    (user / "model.json").write_text(json.dumps(card))
    # the probe leaves the caller's RNG as it was
    net = fixed()
    state = torch.get_rng_state()
    load_model(user, module=net)
    assert torch.equal(torch.get_rng_state(), state)


def test_card_refuses_a_target_scale_that_would_be_ignored(tmp_path):
    """Guards: a multi-class card with a target_scale (applied to regression outputs only) loaded silently."""
    folder = _saved_model(tmp_path)
    card = json.loads((folder / "model.json").read_text())
    card["target_scale"] = {"mean": 5.0, "std": 2.0}
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(CardError, match="target_scale: only a regression model has one"):
        load_model(folder)


# ---------------------------------------------------------------------------------------------- Classifier

def _net():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Dropout(0.5),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


KW = dict(spatial_dims=2, in_channels=1, input_size=(16, 16), task="multiclass", label_names=["a", "b", "c"])


@pytest.mark.parametrize("change, error, words", [
    ({"label_names": "abc"}, TypeError, "label_names must be a list of names"),  # was split into 'a', 'b', 'c'
    ({"input_size": 16}, TypeError, "input_size must be one size per spatial axis"),
    ({"in_channels": 0}, ValueError, "in_channels must be at least 1"),  # was "mean/std: need 0 values"
    ({"in_channels": "1"}, TypeError, "in_channels must be a whole number"),
])
def test_from_module_refuses_awkward_arguments_by_name(change, error, words):
    """Guards: from_module's arguments are checked by name (a str of labels was silently split into letters;
    others failed inside Preprocessing or pathlib)."""
    with pytest.raises(error, match=words):
        Classifier.from_module(_net(), **{**KW, **change})


def test_from_module_takes_numpy_sizes_and_names_and_a_stored_preprocessing():
    """Guards: NumPy sizes/names and a card's preprocessing dict are what a user has at hand; they were
    refused with a confusing message (np.int64 sizes) or an AttributeError (the dict)."""
    clf = Classifier.from_module(_net(), **{**KW, "input_size": np.array([16, 16]),
                                            "label_names": np.array(["a", "b", "c"]),
                                            "preprocessing": {"size": [16, 16], "channels": 1}})
    assert clf.card.input_size == [16, 16] and clf.label_names == ["a", "b", "c"]
    assert all(type(n) is str for n in clf.label_names) and isinstance(clf.preprocessing, Preprocessing)
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        Classifier.from_module(lambda x: x, **KW)


def test_predict_and_evaluate_leave_the_model_in_its_mode_and_its_batchnorm_statistics_alone(tmp_path):
    """Guards: predict() on a model in training mode ran dropout (two calls differed) and updated BatchNorm's
    running statistics; evaluate() left the model in eval mode. Both now run in eval mode and restore
    every module's flag. Compared with equality: the same eval-mode forward pass on the same input."""
    clf = Classifier.from_module(_net(), **KW)
    clf.train()
    before = clf.net[1].running_mean.clone(), clf.net[1].num_batches_tracked.clone()
    x = torch.rand(4, 1, 16, 16) * 5
    p1, p2 = clf.predict(x), clf.predict(x)
    assert torch.equal(p1, p2)
    assert torch.equal(before[0], clf.net[1].running_mean) and torch.equal(before[1], clf.net[1].num_batches_tracked)
    assert clf.training and all(m.training for m in clf.modules())
    m = open_dataset(_png_set(tmp_path / "d"))
    evaluate(clf, ImageDataset(m, clf.preprocessing, [0, 1, 2]))
    assert clf.training and all(m.training for m in clf.modules())
    with pytest.raises(ValueError, match="holds no sample"):
        evaluate(clf, ImageDataset(m, clf.preprocessing, []))


# ---------------------------------------------------------------------------------------------- data sets

def test_image_dataset_refuses_indices_that_would_pick_other_samples(tmp_path):
    """Guards: a boolean mask was read as indices 0/1 (every item was sample 1), -1 wrapped to the last
    sample, 99 failed at the first item with a bare IndexError; now refused at construction, by value."""
    m = open_dataset(_png_set(tmp_path / "d"))
    pre = Preprocessing(size=(16, 16))
    with pytest.raises(ValueError, match="boolean mask"):
        ImageDataset(m, pre, np.ones(12, bool))
    with pytest.raises(ValueError, match=r"index -1 out of range: .*manifest.csv has 12 samples"):
        ImageDataset(m, pre, [-1])
    with pytest.raises(ValueError, match="index 99 out of range"):
        ImageDataset(m, pre, [0, 99])
    with pytest.raises(TypeError, match="whole numbers"):
        ImageDataset(m, pre, [1.0])
    ds = ImageDataset(m, pre, torch.tensor([3, 4]))
    assert ds[0]["index"] == 3 and type(ds[0]["index"]) is int
    assert ImageDataset(m, {"size": [16, 16]}, [0])[0]["image"].shape == (1, 16, 16)  # a card's dict
    empty = ImageDataset(m, pre, np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="holds no sample"):
        empty.stacked()
    with pytest.raises(ValueError, match="empty data set"):
        channel_stats(empty)


def test_preprocessing_refuses_values_that_give_nan_or_nothing(tmp_path):
    """Guards: std 0 or a NaN mean made every input NaN, size 0 failed in F.interpolate, channels 0 gave
    'mean/std: need 0 values'; and an image holding NaN went through ImageDataset as NaN inputs."""
    with pytest.raises(DataError, match=r"std: must be positive"):
        Preprocessing(size=(16, 16), std=[0.0])
    with pytest.raises(DataError, match=r"mean: need a list of finite numbers"):
        Preprocessing(size=(16, 16), mean=[float("nan")])
    with pytest.raises(DataError, match=r"size: need 1 to 3 positive whole numbers"):
        Preprocessing(size=(0, 16))
    with pytest.raises(DataError, match=r"channels: need a whole number >= 1"):
        Preprocessing(size=(16, 16), channels=0)
    a = np.ones((1, 8, 8), np.float32)
    a[0, 2, 3] = np.nan
    np.save(tmp_path / "x.npy", a)
    m = Manifest([Sample(image=tmp_path / "x.npy", y=0)], "multiclass", ["a", "b"], tmp_path / "m.csv")
    with pytest.raises(DataError, match=r"x.npy: pixels: image has 1 NaN or infinite values of 64"):
        ImageDataset(m, Preprocessing(size=(8, 8)))[0]


def test_a_manifest_built_in_python_is_checked_sample_by_sample(tmp_path):
    """Guards: a Manifest built by hand with an unknown task, a class index past the labels or a label name
    as y was accepted (y=5 became tensor(5), failing later in the loss); a str path broke Sample.name."""
    img = tmp_path / "a.png"
    with pytest.raises(DataError, match="task: unknown task 'binary'"):
        Manifest([Sample(image=img, y=0)], "binary", ["a", "b"], tmp_path)
    with pytest.raises(DataError, match=r"a.png: y: class index 5 out of range for 2 labels"):
        Manifest([Sample(image=img, y=5)], "multiclass", ["a", "b"], tmp_path)
    with pytest.raises(DataError, match=r"y: a multi-class target is a class index"):
        Manifest([Sample(image=img, y="a")], "multiclass", ["a", "b"], tmp_path)
    with pytest.raises(DataError, match="label_names: need a list of names"):
        Manifest([Sample(image=img, y=0)], "multiclass", "ab", tmp_path)
    assert Sample(image=str(img), y=0).name == "a.png"


def test_open_dataset_refuses_a_string_label_set_and_unknown_options(tmp_path):
    """Guards: labels="abc" was taken letter by letter (a label set ['a', 'b', 'c']); a misspelt option was
    load_manifest's TypeError; max_pixels=-5 refused every image with a puzzling limit."""
    src = _png_set(tmp_path / "d")
    with pytest.raises(DataError, match=r"labels: need a list of names"):
        open_dataset(src, labels="abc")
    with pytest.raises(DataError, match=r"label_column: unknown option"):
        open_dataset(src, label_column="label")
    with pytest.raises(DataError, match=r"max_pixels: need a whole number >= 1"):
        open_dataset(src, max_pixels=-5)
    assert open_dataset(src, labels=["c", "b", "a"]).label_names == ["c", "b", "a"]


def test_split_indices_names_a_bad_seed_or_fractions(tmp_path):
    """Guards: a negative seed was NumPy's message, fractions as text float()'s message."""
    m = open_dataset(_png_set(tmp_path / "d"))
    with pytest.raises(DataError, match=r"seed: need a whole number in \[0, 2\*\*32 - 1\], got -1"):
        split_indices(m, seed=-1)
    with pytest.raises(DataError, match="fractions: need three numbers"):
        split_indices(m, fractions="0.7,0.1,0.2")


def test_load_splits_refuses_data_that_number_the_classes_otherwise(tmp_path):
    """Guards: the model's data opened with another label order (or other labels) got the model's split
    silently, so every y counted classes differently from the model's outputs; a tampered splits.csv
    (unknown split, a sample in two splits) was a KeyError or a leak."""
    src = _png_set(tmp_path / "d")
    folder = _saved_model(tmp_path, labels=("c", "b", "a"))
    m = open_dataset(src)  # sorted: a, b, c
    _write_splits(folder / "splits.csv", m, {"train": np.arange(8), "val": np.arange(8, 10), "test": np.arange(10, 12)})
    with pytest.raises(ValueError, match=r"labels are \['a', 'b', 'c'\], the model's .* are \['c', 'b', 'a'\]; "
                                         r"open it with the model's label set"):
        load_splits(folder, m)
    ok = load_splits(folder, open_dataset(src, labels=["c", "b", "a"]))
    assert list(ok["val"]) == [8, 9]
    rows = (folder / "splits.csv").read_text().splitlines()
    (folder / "splits.csv").write_text("\n".join(rows + [rows[1].replace(",train", ",test")]) + "\n")
    with pytest.raises(DataError, match=r"sample 0 .* is in the train split already"):
        load_splits(folder, open_dataset(src, labels=["c", "b", "a"]))
    (folder / "splits.csv").write_text("\n".join([rows[0], rows[1].replace(",train", ",holdout")]) + "\n")
    with pytest.raises(DataError, match=r"split: row 2: 'holdout' is not one of"):
        load_splits(folder, open_dataset(src, labels=["c", "b", "a"]))


def test_reader_refuses_an_empty_npy_array_by_name(tmp_path):
    """Guards: a .npy with an axis of length 0 was read, then failed inside the resize."""
    np.save(tmp_path / "e.npy", np.zeros((1, 0, 4), np.float32))
    with pytest.raises(DataError, match=r"e.npy: shape: array 1x0x4 holds no values"):
        read_image(tmp_path / "e.npy")
