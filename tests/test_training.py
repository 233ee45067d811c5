"""A tiny training run: files written, figures reported, resume after interruption is exact."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import Interrupted, folder_bytes, stop_after_first_epoch
from nemt.cli import app
from nemt.data import open_dataset
from nemt.data.splits import split_indices
from nemt.errors import NemtError
from nemt.models import TrainConfig, load_model, train_classifier
from nemt.models.training import augment_batch

CFG = dict(arch="smallcnn", size=(16, 16), epochs=2, batch_size=4, lr=3e-3, seed=0,
           arch_kwargs={"width": 4})


def test_tiny_run_writes_model_card_splits_history(small_csv, tmp_path):
    out = tmp_path / "run"
    clf, result = train_classifier(open_dataset(small_csv), out, TrainConfig(**CFG), progress=False,
                                   log=lambda s: None)
    for name in ("model.safetensors", "model.json", "splits.csv", "history.json",
                 "state/last.json", "state/last.safetensors"):
        assert (out / name).is_file(), name
    card = json.loads((out / "model.json").read_text())
    assert card["task"] == "multiclass" and card["input_size"] == [16, 16]
    assert card["data"]["split_seed"] == 0 and len(card["data"]["sha256"]) == 64
    assert set(card["metrics"]) >= {"val", "test", "best_epoch"}
    assert 0.0 <= card["metrics"]["test"]["balanced_accuracy"] <= 1.0
    assert len(result["history"]) == 2
    pre = card["preprocessing"]
    assert pre["size"] == [16, 16] and pre["std"][0] > 0
    loaded = load_model(out)
    assert loaded.card.metrics == card["metrics"]
    # splits.csv lists every sample once; patients never cross splits
    rows = (out / "splits.csv").read_text().splitlines()[1:]
    assert len(rows) == 24


def test_resume_after_interruption_equals_uninterrupted(small_csv, tmp_path):
    m = open_dataset(small_csv)
    full, _ = train_classifier(m, tmp_path / "full", TrainConfig(**CFG), progress=False, log=lambda s: None)
    with pytest.raises(Interrupted):
        train_classifier(m, tmp_path / "cut", TrainConfig(**CFG), progress=False, log=stop_after_first_epoch)
    logs = []
    resumed, result = train_classifier(m, tmp_path / "cut", TrainConfig(**CFG), progress=False, log=logs.append)
    assert logs[0].startswith("resuming") and len(result["history"]) == 2
    full_state = full.net.state_dict()
    for k, v in resumed.net.state_dict().items():
        assert torch.allclose(v.float(), full_state[k].float(), atol=1e-6), k


def test_resume_refuses_other_settings(small_csv, tmp_path):
    m = open_dataset(small_csv)
    train_classifier(m, tmp_path, TrainConfig(**{**CFG, "epochs": 1}), progress=False, log=lambda s: None)
    with pytest.raises(NemtError, match="other settings"):
        train_classifier(m, tmp_path, TrainConfig(**{**CFG, "epochs": 1, "lr": 0.1}), progress=False,
                         log=lambda s: None)


def test_resume_refuses_edited_code(small_csv, tmp_path, monkeypatch):
    """A resume point records nemt's code fingerprint: the same settings after the code was edited are refused,
    and the message says it is the code, not the settings, that differs."""
    import nemt.models.training as training
    m = open_dataset(small_csv)
    train_classifier(m, tmp_path, TrainConfig(**{**CFG, "epochs": 1}), progress=False, log=lambda s: None)
    monkeypatch.setattr(training, "code_fingerprint", lambda: "0123456789abcdef")
    with pytest.raises(NemtError, match=r"other nemt code \(edited since\); use another --out") as err:
        train_classifier(m, tmp_path, TrainConfig(**{**CFG, "epochs": 1}), progress=False, log=lambda s: None)
    assert "settings" not in str(err.value)


def test_a_refused_run_changes_nothing_in_the_folder(small_csv, tmp_path):
    """Issue 12, item 2: another --seed is refused before splits.csv (or anything else) is rewritten."""
    m = open_dataset(small_csv)
    out = tmp_path / "run"
    train_classifier(m, out, TrainConfig(**{**CFG, "epochs": 1}), progress=False, log=lambda s: None)
    before = folder_bytes(out)
    for other in ({"seed": 1}, {"fractions": (0.5, 0.25, 0.25)}):
        with pytest.raises(NemtError, match="other settings"):
            train_classifier(m, out, TrainConfig(**{**CFG, "epochs": 1, **other}), progress=False,
                             log=lambda s: None)
        assert folder_bytes(out) == before
    # a resume whose splits.csv was changed since is refused too, and leaves it as it found it
    rows = (out / "splits.csv").read_text().splitlines()
    i = next(k for k, r in enumerate(rows) if r.endswith(",train"))
    rows[i] = rows[i][:-len("train")] + "test"
    (out / "splits.csv").write_text("\n".join(rows) + "\n")
    changed = folder_bytes(out)
    with pytest.raises(NemtError, match=r"splits.csv: not the split of the run being resumed \(1 of 24 rows"):
        train_classifier(m, out, TrainConfig(**{**CFG, "epochs": 1}), progress=False, log=lambda s: None)
    assert folder_bytes(out) == changed


def test_fresh_writes_its_split_and_forgets_the_old_resume_point(small_csv, tmp_path):
    m = open_dataset(small_csv)
    out = tmp_path / "run"
    train_classifier(m, out, TrainConfig(**{**CFG, "epochs": 1}), progress=False, log=lambda s: None)
    logs = []
    train_classifier(m, out, TrainConfig(**{**CFG, "epochs": 1, "seed": 1}), fresh=True, progress=False,
                     log=logs.append)
    assert not any(s.startswith("resuming") for s in logs)
    sp = split_indices(m, TrainConfig().fractions, 1)
    rows = list(csv.DictReader(open(out / "splits.csv", newline="")))
    assert {int(r["index"]): r["split"] for r in rows} == {int(i): k for k, idx in sp.items() for i in idx}


def test_bad_data_refused_before_training(small_csv, tmp_path):
    small_csv.write_text(small_csv.read_text() + "img/absent.png,,normal,p99\n")
    with pytest.raises(NemtError, match="absent.png"):
        train_classifier(open_dataset(small_csv), tmp_path, TrainConfig(**CFG), progress=False)


def test_augmentation_is_seeded_and_keeps_shape():
    x = torch.rand(4, 1, 16, 16)
    a = augment_batch(x, torch.Generator().manual_seed(1))
    b = augment_batch(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, x)
    v = torch.rand(2, 1, 8, 8, 8)
    assert augment_batch(v, torch.Generator().manual_seed(0)).shape == v.shape


def test_cli_train(small_csv, tmp_path):
    res = CliRunner().invoke(app, ["train", "--data", str(small_csv), "--out", str(tmp_path / "cli"),
                                   "--arch", "smallcnn", "--size", "16", "--epochs", "1", "--batch-size", "4",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cli" / "model.json").is_file()
    assert '"test"' in res.output


def test_init_from_starts_a_run_from_a_saved_model_and_refuses_another_network(small_csv, tmp_path):
    """--init-from loads a saved model's weights as the start of a new run (e.g. to train on with a new
    schedule): at a learning rate of 1e-12 (Adam moves each weight by about the rate per step, a handful of
    steps here) the new run's weights are the old model's within 1e-9, while the same run from a random
    start is not (its weights differ by more than 1e-3). The card records the start; a resume with another
    start, a different network and guided training are refused."""
    m = open_dataset(small_csv)
    first, _ = train_classifier(m, tmp_path / "a", TrainConfig(**CFG), progress=False, log=lambda s: None)
    still = {**CFG, "epochs": 1, "lr": 1e-12, "weight_decay": 0.0}
    cont, _ = train_classifier(m, tmp_path / "b", TrainConfig(**still), progress=False, log=lambda s: None,
                               init_from=tmp_path / "a")
    scratch, _ = train_classifier(m, tmp_path / "c", TrainConfig(**still), progress=False, log=lambda s: None)
    old = dict(first.net.named_parameters())
    gap = {k: float((v - old[k]).detach().abs().max()) for k, v in cont.net.named_parameters()}
    assert max(gap.values()) < 1e-9, gap
    assert max(float((v - old[k]).detach().abs().max()) for k, v in scratch.net.named_parameters()) > 1e-3
    card = json.loads((tmp_path / "b" / "model.json").read_text())
    assert card["training"]["init_from"]["weights_sha256"] == first.card.weights_sha256
    with pytest.raises(NemtError, match="init_from"):  # the folder's run started from a.; this one from scratch
        train_classifier(m, tmp_path / "b", TrainConfig(**still), progress=False, log=lambda s: None)
    with pytest.raises(NemtError, match="its arch_kwargs is"):
        train_classifier(m, tmp_path / "d", TrainConfig(**{**still, "arch_kwargs": {"width": 8}}), progress=False,
                         log=lambda s: None, init_from=tmp_path / "a")
    res = CliRunner().invoke(app, ["train", "--data", str(small_csv), "--out", str(tmp_path / "g"), "--arch",
                                   "smallcnn", "--size", "16", "--epochs", "1", "--guide", "mimic",
                                   "--init-from", str(tmp_path / "a"), "--no-progress"])
    assert res.exit_code != 0 and "--init-from starts a plain run" in res.output
    assert not (tmp_path / "g").exists()
