"""The benchmark report and the XAI-TRIS suite on input a new user gives (from a fresh-user audit): each test
fails before its fix."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from nemt.bench.report import best_methods, gallery_figure, write_report
from nemt.cli import app
from nemt.errors import NemtError


def _cell(mean, n=4):
    return {"mean": mean, "ci_low": mean - 0.1, "ci_high": mean + 0.1, "n": n, "n_excluded": 0, "n_undefined": 0}


def test_a_file_name_with_dollar_signs_is_text_not_maths(tmp_path):
    """`cost_$5_and_$6.png` was parsed as mathtext: the report and `nemt explain` crashed."""
    from nemt.visualize import save_overlay
    unit, gt = np.random.default_rng(0).random((1, 16, 16)), np.zeros((16, 16), bool)
    assert gallery_figure(unit, gt, {"m": unit[0]}, "cost_$5_and_$6.png: x").startswith("data:image/png")
    save_overlay(tmp_path / "o.png", unit[0], [unit[0]], ["a $b$ c"], suptitle="cost_$5_and_$6.png | x 0.5")
    assert (tmp_path / "o.png").stat().st_size > 0


def test_signed_maps_are_drawn_on_a_signed_scale_in_the_gallery():
    unit, gt = np.zeros((1, 8, 8)), np.zeros((8, 8), bool)
    signed = np.linspace(-1, 1, 64).reshape(8, 8)
    assert gallery_figure(unit, gt, {"ig": signed}, "t") != gallery_figure(unit, gt, {"ig": signed.clip(0)}, "t")


def test_the_best_method_is_found_within_each_block_when_asked():
    summary = {"a/linear: x": {"pg": _cell(0.5)}, "a/linear: y": {"pg": _cell(0.4)},
               "b/linear: x": {"pg": _cell(0.3)}, "b/linear: y": {"pg": _cell(0.6)}}
    assert best_methods(summary, ["pg"]) == {"pg": {"b/linear: y"}}
    assert best_methods(summary, ["pg"], group=lambda k: k.split(": ")[0]) == {"pg": {"a/linear: x", "b/linear: y"}}


def test_the_html_report_carries_the_markdown_summarys_notes(tmp_path):
    summary = {"nemt": {"pg": _cell(0.5), "ms": 1.0, "n_items": 4}, "random": {"pg": _cell(0.1), "ms": 0.1,
                                                                               "n_items": 4}}
    md = "| method | pg |\n|---|---|\n| nemt | 0.5 |\n\nextremal: its maps have plateaus of tied maxima.\n"
    write_report(tmp_path, summary, ["pg"], title="t", facts={}, markdown=md)
    page = (tmp_path / "report.html").read_text()
    assert "plateaus of tied maxima" in page and "one fixed, seeded noise field" in page
    assert "counted below" not in page


def test_a_saved_suite_model_is_reused_only_for_the_data_seed_and_budget_asked():
    from nemt.bench.xaitris import _trained_as_asked
    train = SimpleNamespace(meta={"scenario": "linear", "background": "white", "seed": 0, "alpha": 0.3, "n": 40,
                                  "split": "train"})
    card = SimpleNamespace(data={"source": "xai-tris", "scenario": "linear", "background": "white", "seed": 0,
                                 "alpha": 0.3, "n": 40}, training={"seed": 0, "max_epochs": 25})
    clf = SimpleNamespace(card=card)
    assert _trained_as_asked(clf, train, 0, 25)
    assert not _trained_as_asked(clf, train, 1, 25) and not _trained_as_asked(clf, train, 0, 3)
    train.meta["seed"] = 1
    assert not _trained_as_asked(clf, train, 0, 25)


@pytest.mark.parametrize("extra", [["--split", "val"], ["--gallery", "3"]])
def test_the_suite_refuses_options_it_would_ignore(tmp_path, extra):
    res = CliRunner().invoke(app, ["benchmark", "--suite", "xai-tris", "--out", str(tmp_path / "s"), *extra])
    assert res.exit_code == 2 and "do(es) not apply" in res.output and not (tmp_path / "s").exists(), res.output


def test_rigid_size_message_names_its_own_step():
    from nemt.data.xaitris import make_xaitris
    with pytest.raises(NemtError, match=r"multiple of 16 \(at least 16\), got 8"):
        make_xaitris("rigid", "white", 4, size=8)


def test_the_suite_can_be_made_small_from_the_command_line(tmp_path):
    """--suite-scenarios, --suite-backgrounds, --suite-models, --suite-n and --suite-epochs reach the suite (it
    could be made small only from Python): one data set, one model, trained on n samples for the epochs given;
    unknown names and suite options without --suite are refused before any work."""
    import json

    res = CliRunner().invoke(app, ["benchmark", "--suite", "xai-tris", "--out", str(tmp_path / "s"), "--no-progress",
                                   "--suite-scenarios", "lin", "--suite-backgrounds", "white", "--suite-models",
                                   "linear", "--suite-n", "200", "--suite-epochs", "2", "--methods", "saliency,random",
                                   "--limit", "5"])
    assert res.exit_code == 0, res.output
    assert [p.name for p in (tmp_path / "s" / "models").iterdir()] == ["lin-white"]
    assert [p.name for p in (tmp_path / "s" / "models" / "lin-white").iterdir()] == ["linear"]
    card = json.loads((tmp_path / "s" / "models" / "lin-white" / "linear" / "model.json").read_text())
    assert card["data"]["n"] == 200 and card["training"]["max_epochs"] == 2
    for extra, needle in ((["--suite", "xai-tris", "--suite-scenarios", "lin,bogus"], "unknown 'bogus'"),
                          (["--suite", "xai-tris", "--suite-backgrounds", ","], "empty"),
                          (["--model", "m", "--data", "d", "--suite-n", "100"], "--suite-n applies to --suite")):
        res = CliRunner().invoke(app, ["benchmark", "--out", str(tmp_path / "t"), *extra])
        assert res.exit_code == 2 and needle in " ".join(res.output.split()), res.output
        assert not (tmp_path / "t").exists()
