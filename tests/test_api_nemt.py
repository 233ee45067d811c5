"""NEMt's library API and `nemt fit` on input a new user gives (from a fresh-user audit): each test fails before
its fix. Tiny models (smallcnn of width 4 at 32 px), one epoch: the properties, not the maps' quality."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from conftest import train_phantom_model
from nemt.cli import app
from nemt.errors import NemtError
from nemt.explainers import NEMt
from nemt.models import Classifier, build_model
from nemt.ops import ParameterError

KW = dict(batch_size=4, decoder_channels=(32, 16, 8, 8), seed=0, epochs=1)
QUIET = dict(progress=False, log=lambda s: None)


def _clf(task="multiclass", n=3):
    torch.manual_seed(0)
    net = build_model("smallcnn", spatial_dims=2, in_channels=1, out_channels=n, width=4)
    return Classifier.from_module(net, spatial_dims=2, in_channels=1, input_size=(32, 32), task=task,
                                  label_names=[f"c{i}" for i in range(n)]).eval()


def _data(n_batches=3, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 1, 32, 32, generator=g), torch.randint(0, 3, (b,), generator=g)) for _ in range(n_batches)]


X = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(9))


def test_an_explainer_with_its_own_encoder_saves_and_loads(tmp_path):
    clf = _clf()
    ex = NEMt(clf, encoder="own", **KW).fit(_data(), **QUIET)
    ex.save(tmp_path / "own")
    back = NEMt.load(tmp_path / "own", clf)
    assert back.layers_ == [] and torch.equal(back.explain(X, 0), ex.explain(X, 0))


def test_a_second_fit_starts_over():
    clf = _clf()
    twice = NEMt(clf, **KW).fit(_data(), **QUIET).fit(_data(), **QUIET)
    once = NEMt(clf, **KW).fit(_data(), **QUIET)
    assert len(twice.history_) == 1 and torch.equal(twice.explain(X, "all"), once.explain(X, "all"))


def test_float64_training_and_validation_data_fit_as_float32():
    clf = _clf()
    data = _data()
    as64 = [(x.double(), y) for x, y in data]
    a = NEMt(clf, **KW).fit(as64, val_data=as64[:1], **QUIET)
    b = NEMt(clf, **KW).fit(data, val_data=data[:1], **QUIET)
    assert torch.equal(a.explain(X, "all"), b.explain(X, "all"))


def test_validation_data_are_read_and_checked_as_training_data_are():
    clf = _clf()
    ds = torch.utils.data.TensorDataset(torch.randn(8, 1, 32, 32), torch.randint(0, 3, (8,)))
    ex = NEMt(clf, **KW).fit(_data(), val_data=ds, **QUIET)  # a Dataset, as fit itself takes
    assert ex.collapse_["n_images"] == 8
    bad = torch.randn(4, 1, 32, 32)
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(NemtError, match="a validation batch's x holds"):
        NEMt(clf, **KW).fit(_data(), val_data=[(bad, torch.zeros(4, dtype=torch.long))], **QUIET)
    with pytest.raises(NemtError, match=r"a validation batch's x is .*\(4, 32, 32, 1\)"):
        NEMt(clf, **KW).fit(_data(), val_data=[(torch.randn(4, 32, 32, 1), torch.zeros(4, dtype=torch.long))],
                            **QUIET)


@pytest.mark.parametrize("params, name", [
    ({"train_targets": "predicted"}, "train_targets"), ({"quantity": "logit"}, "quantity"),
    ({"area_weight": 2.0}, "area_weight"), ({"init_keep": 0.5}, "init_keep"),
    ({"teacher_loss": "kl"}, "teacher_loss"), ({"teacher_flip": True}, "teacher_flip"),
    ({"objective": "paper", "games": "deletion"}, "games"),
    ({"objective": "paper", "preservation_weight": 1.0}, "preservation_weight"),
])
def test_fit_refuses_a_parameter_its_objective_never_reads(params, name):
    with pytest.raises(ParameterError, match=f"^{name} .*never reads it"):
        NEMt(_clf(), **KW, **params).fit(_data(), **QUIET)


def test_parameters_of_the_chosen_objective_and_defaults_given_explicitly_fit():
    NEMt(_clf(), **KW, objective="paper", quantity="logit", train_targets="all", init_keep=0.5).fit(_data(), **QUIET)
    NEMt(_clf(), **KW, quantity="prob", area_weight=1, preservation_bound=2.0).fit(_data(), **QUIET)


def test_a_resume_point_of_other_training_data_is_refused(tmp_path):
    clf = _clf()
    NEMt(clf, **KW).fit(_data(seed=0), out_dir=tmp_path / "e", **QUIET)
    with pytest.raises(NemtError, match="holds an explainer trained with other data"):
        NEMt(clf, **KW).fit(_data(seed=1), out_dir=tmp_path / "e", **QUIET)
    NEMt(clf, **KW).fit(_data(seed=0), out_dir=tmp_path / "e", **QUIET)  # the same data: resumed (nothing to do)


def test_nemt_fit_warns_when_the_data_are_not_the_models(tmp_path):
    manifest, model = train_phantom_model(tmp_path / "a", n=24, size=32)
    other, _ = train_phantom_model(tmp_path / "b", n=24, size=32)
    (tmp_path / "b" / "data" / "manifest.csv").write_text(other.read_text() + "\n")  # other bytes, same images
    res = CliRunner().invoke(app, ["fit", "--model", str(model), "--data", str(other), "--out", str(tmp_path / "e"),
                                   "--epochs", "1", "--batch-size", "4", "--decoder-channels", "16,8,8,8",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "is not the data" in res.output and "fitting the explainer on it anyway" in res.output


def test_a_refused_fit_leaves_no_earlier_explainer_beside_its_collapse_report(tmp_path):
    """The README's way to start over (delete state/) then a fit the guard refuses: the folder must not keep the
    earlier fit's explainer, which `explain --explainer` would load without a word."""
    clf = _clf()
    NEMt(clf, **KW).fit(_data(), out_dir=tmp_path / "e", **QUIET)
    assert (tmp_path / "e" / "explainer.json").is_file()
    shutil.rmtree(tmp_path / "e" / "state")
    # the paper's objective on an untrained model: its masks start at 95 % kept, empty, and stay so in one epoch
    with pytest.raises(NemtError, match="collapsed"):
        NEMt(clf, **KW, objective="paper").fit(_data(), val_data=_data()[:1], out_dir=tmp_path / "e", **QUIET)
    assert (tmp_path / "e" / "collapse.json").is_file()
    assert not (tmp_path / "e" / "explainer.json").exists() and not (tmp_path / "e" / "explainer.safetensors").exists()


def test_explain_refuses_an_input_of_another_shape_as_a_value_error():
    ex = NEMt(_clf(), **KW).fit(_data(), **QUIET)
    with pytest.raises(ValueError, match="channel-last"):
        ex.explain(torch.randn(2, 32, 32, 1))
    with pytest.raises(ValueError, match="fitted for"):
        ex.explain(torch.randn(2, 1, 16, 16))


def test_accumulation_over_more_batches_than_the_data_have_takes_one_short_step():
    ds = torch.utils.data.TensorDataset(torch.randn(20, 1, 32, 32), torch.randint(0, 3, (20,)))
    ex = NEMt(_clf(), **{**KW, "batch_size": 16}, accumulate=2).fit(ds, **QUIET)
    assert len(ex.history_) == 1


def test_one_area_may_be_a_number():
    clf = _clf()
    assert NEMt(clf, map_areas=0.05, **KW).map_areas == [0.05] and NEMt(clf, areas=0.1, **KW).areas == [0.1]


@pytest.mark.parametrize("task, y, match", [
    ("multiclass", lambda b: torch.nn.functional.one_hot(torch.arange(b) % 3, 3).float(), "one-hot"),
    ("multiclass", lambda b: torch.full((b, 1), 6), "run from 6 to 6"),
    ("multiclass", lambda b: torch.full((b,), 1.5), "not class indices"),
    ("multilabel", lambda b: torch.ones(b, 2), r"\(B, 3\) 0/1"),
])
def test_labels_of_another_form_than_the_models_are_refused(task, y, match):
    data = [(torch.randn(4, 1, 32, 32), y(4))]
    with pytest.raises(NemtError, match=match):
        NEMt(_clf(task), **KW).fit(data, **QUIET)


def test_float_class_indices_and_column_labels_are_read():
    data = [(torch.randn(4, 1, 32, 32), torch.tensor([0.0, 1.0, 2.0, 1.0])),
            (torch.randn(4, 1, 32, 32), torch.tensor([[0], [1], [2], [0]]))]
    NEMt(_clf(), **KW).fit(data, **QUIET)


def test_a_one_shot_iterator_for_several_epochs_is_refused_before_training():
    with pytest.raises(NemtError, match="one-shot iterator and 2 epochs"):
        NEMt(_clf(), **{**KW, "epochs": 2}).fit(iter(_data()), **QUIET)
    NEMt(_clf(), **KW, occlusion="blur").fit(iter(_data()), **QUIET)  # one epoch reads it once: fine


def test_explaining_after_the_model_changed_in_place_is_refused(tmp_path):
    clf = _clf()
    ex = NEMt(clf, **KW).fit(_data(), **QUIET)
    ex.explain(X)
    clf.load_state_dict(clf.state_dict())  # the same values written again: still this explainer's model
    ex.explain(X)
    ex.save(tmp_path / "e")
    loaded = NEMt.load(tmp_path / "e", clf)
    with torch.no_grad():
        next(clf.parameters()).mul_(-1.5)
    for e in (ex, loaded):
        with pytest.raises(NemtError, match="weights changed since this explainer was fitted"):
            e.explain(X)


# ------------------------------------------------------------ second audit: the demo, students

def test_an_explainer_card_lists_its_parameters_in_one_order_whatever_the_hash_seed():
    """A resumed, finished fit saves its card again; the benchmark checks a fitted explainer by the card's bytes.
    The parameters' order followed Python's string hashing (a set), so a re-run of `nemt demo` was refused."""
    import os
    import subprocess
    import sys
    code = ("from torch import nn; from nemt.explainers import NEMt; "
            "print(list(NEMt(nn.Conv2d(1, 2, 3), input_size=(8, 8), in_channels=1).hyper_params()))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3")}
    assert len(outs) == 1


def _student(clf, **kw):
    return NEMt(clf, objective="teacher", **{"teacher": "sobel", **KW, **kw})


def test_a_students_map_options_apply_to_its_areas_map_only(tmp_path):
    from nemt.explainers import get_explainer
    clf = _clf()
    _student(clf).fit(_data(), out_dir=tmp_path / "s", **QUIET)
    sigmoid = get_explainer("nemt", clf, path=tmp_path / "s").explain(X, 0)
    for bad in ({"map_areas": [0.2]}, {"map_smoothing": True}):
        with pytest.raises(NemtError, match="set student_map='areas' first"):
            get_explainer("nemt", clf, path=tmp_path / "s", **bad)
    areas = get_explainer("nemt", clf, path=tmp_path / "s", student_map="areas", map_areas=[0.2]).explain(X, 0)
    assert not torch.equal(areas, sigmoid) and areas.flatten(1).gt(0.5).float().mean(1).sub(0.2).abs().max() < 0.05


def test_a_student_refuses_the_nested_augmentation():
    with pytest.raises(ParameterError, match="^flip .*objective nested or paper only"):
        _student(_clf(), flip=True).fit(_data(), **QUIET)


def test_a_bad_teacher_parameter_leaves_no_cache_behind(tmp_path):
    clf = _clf()
    with pytest.raises(ParameterError):
        _student(clf, teacher="rise", teacher_params={"n_masks": 0}).fit(_data(), out_dir=tmp_path / "s", **QUIET)
    assert not (tmp_path / "s" / "teacher").exists()
    _student(clf, teacher="rise", teacher_params={"n_masks": 8}).fit(_data(), out_dir=tmp_path / "s", **QUIET)


def test_a_teacher_cache_is_refused_when_any_training_image_changed(tmp_path):
    clf = _clf()
    data = _data(n_batches=4)
    _student(clf).fit(data, out_dir=tmp_path / "s", **QUIET)
    data[3][0][2] += 1.0  # the 15th image of 16: past the first 8 the key used to cover
    with pytest.raises(NemtError, match="another teacher's maps|other"):
        _student(clf).fit(data, out_dir=tmp_path / "s", **QUIET)
