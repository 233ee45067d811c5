"""`nemt train` reads every image of every split before the first epoch, and hostile images stop it cleanly."""
from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from nemt.cli import app
from nemt.data import open_dataset, split_indices
from nemt.errors import DataError
from nemt.models import TrainConfig, train_classifier

from test_readers import png_bomb

CFG = dict(arch="smallcnn", size=(16, 16), epochs=2, batch_size=4, lr=3e-3, seed=0, arch_kwargs={"width": 4})


def _in_split(manifest, split: str, k: int = 0):
    return manifest.samples[int(split_indices(manifest, (0.7, 0.1, 0.2), 0)[split][k])]


@pytest.mark.parametrize("split", ["test", "val"])
def test_a_truncated_image_of_any_split_stops_training_before_the_first_epoch(small_csv, tmp_path, split):
    m = open_dataset(small_csv)
    bad = _in_split(m, split).image
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    logs: list[str] = []
    with pytest.raises(DataError) as info:
        train_classifier(open_dataset(small_csv), tmp_path / "run", TrainConfig(**CFG), progress=False,
                         log=logs.append)
    msg = str(info.value)
    assert f"{split}: {bad}: pixels:" in msg and "1 of 24 images cannot be used, so nothing was trained" in msg
    assert not any(line.startswith("epoch") for line in logs)
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert not (tmp_path / "run" / "state").exists()


def test_a_bad_mask_of_a_test_image_is_found_before_training(small_csv, tmp_path):
    m = open_dataset(small_csv)
    s = _in_split(m, "test", 1)
    from conftest import write_png
    write_png(s.mask, np.zeros((5, 7), np.uint8))  # another shape than its 20x16 image
    with pytest.raises(DataError, match=r"test: .*: shape: mask is 5x7, image is 20x16"):
        train_classifier(open_dataset(small_csv), tmp_path / "run", TrainConfig(**CFG), progress=False,
                         log=lambda s: None)


def test_cli_train_and_check_refuse_a_bomb_from_its_header(small_csv, tmp_path):
    m = open_dataset(small_csv)
    victim = _in_split(m, "train", 3).image
    png_bomb(victim, 30000, 30000)
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--data", str(small_csv), "--out", str(tmp_path / "run"), "--arch",
                              "smallcnn", "--size", "16", "--epochs", "1", "--batch-size", "4", "--no-progress"])
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "image of 30000x30000 = 900 Mpx exceeds the limit of 256 Mpx" in out and "--max-pixels" in out
    # data check: a per-file error, and the rest of the report, also as JSON
    rep_path = tmp_path / "rep.json"
    res = runner.invoke(app, ["data", "check", str(small_csv), "--no-progress", "--json", str(rep_path)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    import json
    rep = json.loads(rep_path.read_text())
    assert rep["images"] == 23 and len(rep["fatal"]) == 1 and "900 Mpx" in rep["fatal"][0]
    assert victim.name in rep["fatal"][0]
    # --max-pixels moves the limit (here below the 20x16 images: every file is refused)
    res = runner.invoke(app, ["data", "check", str(small_csv), "--no-progress", "--max-pixels", "319",
                              "--json", str(rep_path)])
    rep = json.loads(rep_path.read_text())
    assert res.exit_code == 1 and rep["images"] == 0 and len(rep["fatal"]) == 24
    assert sum("20x16 = 320 pixels exceeds the limit of 319 pixels" in f for f in rep["fatal"]) == 23


def test_cli_explain_refuses_a_bomb_in_one_line(small_csv, tmp_path):
    train_classifier(open_dataset(small_csv), tmp_path / "m", TrainConfig(**{**CFG, "epochs": 1}), progress=False,
                     log=lambda s: None)
    bomb = png_bomb(tmp_path / "bomb.png", 30000, 30000)
    runner = CliRunner()
    base = ["explain", "--model", str(tmp_path / "m"), "--method", "gradcam", "--out", str(tmp_path / "out")]
    res = runner.invoke(app, base + [str(bomb)])
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "bomb.png: size: image of 30000x30000 = 900 Mpx exceeds the limit of 256 Mpx" in out
    assert "--max-pixels" in out
    image = open_dataset(small_csv).samples[0].image  # 20x16 = 320 pixels
    res = runner.invoke(app, base + ["--max-pixels", "319", str(image)])
    assert res.exit_code == 2 and "320 pixels exceeds the limit of 319 pixels" in " ".join(res.output.split())
    res = runner.invoke(app, base + ["--max-pixels", "320", str(image)])
    assert res.exit_code == 0, res.output


def test_cli_train_takes_architecture_keywords_into_the_card_and_refuses_unknown_ones(small_csv, tmp_path):
    """`--arch-param width=4` reaches the network and its card; a keyword the architecture lacks is refused by
    name before anything is written (the card check would otherwise meet it only when the model is loaded)."""
    import json

    args = ["train", "--data", str(small_csv), "--arch", "smallcnn", "--size", "16", "--epochs", "1",
            "--batch-size", "4", "--no-progress"]
    bad = CliRunner().invoke(app, args + ["--out", str(tmp_path / "bad"), "--arch-param", "wdth=4"])
    assert bad.exit_code == 2 and "--arch-param wdth=4" in bad.output and "wdth" in bad.output
    assert " ".join(bad.output.split()).count("cannot be built") == 1, bad.output  # said once, not nested
    assert not (tmp_path / "bad").exists()
    ok = CliRunner().invoke(app, args + ["--out", str(tmp_path / "ok"), "--arch-param", "width=4"])
    assert ok.exit_code == 0, ok.output
    card = json.loads((tmp_path / "ok" / "model.json").read_text())
    assert card["arch_kwargs"] == {"width": 4} and card["training"]["arch_kwargs"] == {"width": 4}
    from nemt.models import load_model
    assert load_model(tmp_path / "ok").net.stage1[0].out_channels == 4


def test_python_api_names_the_architecture_and_the_keyword_it_cannot_take(small_csv, tmp_path):
    """`TrainConfig(arch_kwargs=...)` with a keyword the architecture lacks raises nemt's error naming both,
    not the constructor's bare TypeError (the CLI adds the `--arch-param` wording on top)."""
    from nemt.errors import NemtError
    from nemt.models.zoo import build_model

    with pytest.raises(NemtError, match=r"smallcnn cannot be built with \{'wdth': 4\}"):
        train_classifier(open_dataset(small_csv), tmp_path / "run", TrainConfig(**{**CFG, "arch_kwargs": {"wdth": 4}}),
                         progress=False)
    # nothing the failed start left blocks the corrected run in the same folder
    train_classifier(open_dataset(small_csv), tmp_path / "run", TrainConfig(**{**CFG, "epochs": 1}), progress=False)
    assert (tmp_path / "run" / "model.safetensors").is_file()
    with pytest.raises(NemtError, match="wdth"):
        build_model("smallcnn", spatial_dims=2, in_channels=1, out_channels=2, wdth=4)


def test_a_new_run_removes_an_earlier_runs_model_and_history_with_its_resume_point(small_csv, tmp_path):
    """`train --fresh` killed before its first checkpoint left the old run's model beside the new run's split,
    which `explain --split test` then used (its test images were the old model's training images)."""
    from nemt.distributed import Context
    from nemt.models.training import ready_folder
    manifest = open_dataset(small_csv)
    out = tmp_path / "run"
    (out / "state").mkdir(parents=True)
    for name in ("model.json", "model.safetensors", "history.json", "state/last.json", "state/last.safetensors"):
        (out / name).write_text("old")
    splits = {k: np.arange(i * 8, i * 8 + 8) for i, k in enumerate(("train", "val", "test"))}
    ready_folder(Context(), out, out / "state" / "last", manifest, splits, new_run=True)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["splits.csv"]


def test_a_refused_resume_names_the_settings_that_differ():
    from nemt.files import differing_keys
    assert differing_keys({"config": {"seed": 0, "lr": 1e-3, "arch": "a"}, "data": "x"},
                          {"config": {"seed": 1, "lr": 1e-2, "arch": "a"}, "data": "x"}) == ["settings (lr, seed)"]
