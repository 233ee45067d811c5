"""Students of slow explainers (NEMt's teacher objective): a known answer is learnt, the cache resumes, the card
names the teacher."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from nemt.explainers import Explainer, NEMt, get_explainer, register
from nemt.explainers.base import _REGISTRY

SIZE = 32


@pytest.fixture
def bright_teacher():
    """A teacher with a known answer: the map is the finding's mask (the bright square), whatever the target."""
    calls = {"n": 0}

    @register("bright-square")
    class Bright(Explainer):
        default_postprocess = "none"

        def _attribute(self, x, targets):
            calls["n"] += x.shape[0]
            m = (x.mean(dim=1, keepdim=True) > 0.5).float()
            return m.expand(-1, targets.shape[1], *m.shape[2:])

    yield calls
    _REGISTRY.pop("bright-square", None)


def squares(n: int, seed: int):
    """Images with one bright square (6 to 10 px) on dark noise; label 1 if the square is in the left half."""
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.randn(n, 1, SIZE, SIZE, generator=g)
    masks = torch.zeros(n, 1, SIZE, SIZE, dtype=torch.bool)
    y = torch.zeros(n, dtype=torch.long)
    for i in range(n):
        s = int(torch.randint(6, 11, (1,), generator=g))
        r, c = (int(v) for v in torch.randint(0, SIZE - s, (2,), generator=g))
        x[i, :, r:r + s, c:c + s] += 1.0
        masks[i, :, r:r + s, c:c + s] = True
        y[i] = int(c + s / 2 < SIZE / 2)
    return x, y, masks


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2)).eval()


def student(net, **kw):
    return NEMt(net, objective="teacher", teacher="bright-square", input_size=(SIZE, SIZE), in_channels=1,
                decoder_channels=(16, 16), lr=1e-2, batch_size=8, seed=0, **kw)


def test_student_learns_a_known_teacher_to_iou_090(bright_teacher):
    x, y, masks = squares(96, seed=0)
    ex = student(small_net(), epochs=12)
    ex.fit(torch.utils.data.TensorDataset(x, y), progress=False, log=lambda s: None)
    xt, yt, mt = squares(32, seed=1)
    maps = ex.explain(xt, target=yt)  # (B, 1, H, W) in [0, 1]
    pred = maps[:, 0] > 0.5
    inter = (pred & mt[:, 0]).flatten(1).sum(1).float()
    union = (pred | mt[:, 0]).flatten(1).sum(1).float()
    iou = float((inter / union).mean())
    assert iou >= 0.9, f"student IoU {iou:.3f} against the finding's mask"


def test_teacher_flip_mirrors_each_image_with_its_map(bright_teacher):
    """With ``teacher_flip`` about half the images of a step are mirrored, each together with its teacher map: a
    student that reads the mask straight off its input (logits +-10 on the bright square) fits the pairs it
    is given, so its loss stays at the floor only if image and map were mirrored alike."""
    x, y, masks = squares(64, seed=3)  # squares off the centre: a mirrored map misses its square
    ex = student(small_net(), epochs=1, teacher_flip=True)
    ex.init_module()
    seen = []

    def reads_the_mask(xb):
        seen.append(xb.clone())
        return (20.0 * (xb > 0.5).float() - 10.0), torch.zeros(xb.shape[0], 2)

    ex._logits = reads_the_mask
    gen = torch.Generator().manual_seed(0)
    loss, _ = ex._teacher_step(x, (y, masks.float(), torch.zeros(64, 1, dtype=torch.long)), gen)
    flipped = (seen[0] != x).flatten(1).any(1)
    assert 16 <= int(flipped.sum()) <= 48 and torch.equal(seen[0][flipped], x[flipped].flip(-1))
    assert float(loss) < 1e-3  # BCE of logits +-10 on the right pixels: 4.5e-5
    # had the maps stayed as they were, the same student would be far off on the mirrored images
    assert float(nn.functional.binary_cross_entropy_with_logits(20.0 * (seen[0] > 0.5).float() - 10.0,
                                                                masks.float())) > 0.1


def test_teacher_cache_resumes_and_the_card_names_the_teacher(bright_teacher, tmp_path):
    x, y, _ = squares(120, seed=2)
    data = torch.utils.data.TensorDataset(x, y)
    ex = student(small_net(), epochs=1, teacher_budget=100)
    ex.fit(data, out_dir=tmp_path / "s", progress=False, log=lambda s: None)
    assert bright_teacher["n"] == 100, "the teacher explains only its budget of training images"
    shards = sorted((tmp_path / "s" / "teacher").glob("maps-*.safetensors"))
    assert len(shards) == 2, "64 maps per shard"
    shards[-1].unlink()  # as if the run had stopped before the last shard
    (tmp_path / "s" / "state").rename(tmp_path / "s" / "state-old")  # and before training
    resumed = student(small_net(), epochs=1, teacher_budget=100)
    resumed.fit(data, out_dir=tmp_path / "s", progress=False, log=lambda s: None)
    assert bright_teacher["n"] == 100 + 36, "only the missing shard is computed again"
    card = json.loads((tmp_path / "s" / "explainer.json").read_text())
    assert card["kind"] == "NEMt" and card["params"]["objective"] == "teacher"
    assert card["params"]["teacher"] == "bright-square" and card["params"]["teacher_budget"] == 100
    loaded = get_explainer("nemt", resumed.model, path=tmp_path / "s")
    assert torch.equal(loaded.explain(x[:4], target=y[:4]), resumed.explain(x[:4], target=y[:4]))


def test_a_cache_of_another_teacher_is_refused(bright_teacher, tmp_path):
    x, y, _ = squares(16, seed=3)
    data = torch.utils.data.TensorDataset(x, y)
    student(small_net(), epochs=1).fit(data, out_dir=tmp_path / "s", progress=False, log=lambda s: None)
    (tmp_path / "s" / "state").rename(tmp_path / "s" / "state-old")
    other = NEMt(small_net(), objective="teacher", teacher="sobel", input_size=(SIZE, SIZE), in_channels=1,
                 decoder_channels=(16, 16), epochs=1)
    with pytest.raises(Exception, match="another teacher"):
        other.fit(data, out_dir=tmp_path / "s", progress=False, log=lambda s: None)


def test_teacher_objective_needs_a_known_teacher():
    with pytest.raises(ValueError):
        NEMt(small_net(), objective="teacher", input_size=(SIZE, SIZE), in_channels=1)
    with pytest.raises(ValueError):
        NEMt(small_net(), objective="teacher", teacher="nemt", input_size=(SIZE, SIZE), in_channels=1)


def test_cli_student_of_a_baseline_then_fidelity_and_export(tmp_path):
    """`nemt fit --teacher`, then `nemt fidelity`, `nemt explain` and ONNX export treat the student like NEMt."""
    from typer.testing import CliRunner

    from conftest import train_phantom_model
    from nemt.cli import app
    from nemt.deploy.export import export_onnx
    from nemt.models import load_model

    manifest, _ = train_phantom_model(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["fit", "--model", str(tmp_path / "m"), "--data", str(manifest), "--out",
                              str(tmp_path / "s"), "--teacher", "occlusion", "--teacher-param", "window=8",
                              "--teacher-param", "stride=8", "--teacher-budget", "20", "--epochs", "1",
                              "--batch-size", "4", "--allow-collapse", "--no-progress"])
    assert res.exit_code == 0, res.output
    card = json.loads((tmp_path / "s" / "explainer.json").read_text())
    assert card["params"]["teacher"] == "occlusion" and card["params"]["teacher_params"] == {"window": 8, "stride": 8}
    assert card["fitted"]["teacher_seconds"] > 0
    res = runner.invoke(app, ["fidelity", "--model", str(tmp_path / "m"), "--data", str(manifest), "--explainer",
                              str(tmp_path / "s"), "--out", str(tmp_path / "f"), "--limit", "6", "--no-progress"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "f" / "fidelity.json").read_text())
    assert rep["teacher"] == "occlusion" and rep["n_items"] >= 1
    assert -1 <= rep["pearson"]["mean"] <= 1 and rep["teacher_maps"]["ms_per_image"] > 0
    # the student's up-front price: its teacher's maps and its own fit (the card's epoch seconds)
    assert rep["student_fit_seconds"] == round(sum(r["seconds"] for r in card["history"]), 1)
    saved = (rep["teacher_maps"]["ms_per_image"] - rep["student"]["ms_per_image"]) / 1000
    if saved > 0:
        want = (rep["teacher_seconds_on_training_split"] + sum(r["seconds"] for r in card["history"])) / saved
        assert rep["break_even_images"] == pytest.approx(want, rel=1e-9)
    clf = load_model(tmp_path / "m")
    student = get_explainer("nemt", clf, path=tmp_path / "s")
    path = export_onnx(clf, student, tmp_path / "x" / "model.onnx")
    assert path.is_file()
