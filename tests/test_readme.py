"""The README's examples work as printed: "add a method" (one class, registered, through the whole pipeline) and
the Python API tour (data, training, NEMt, baselines, metrics on a tiny synthetic set)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from captum.attr import InputXGradient

from nemt.explainers import available, get_explainer
from nemt.explainers.base import _REGISTRY

README = Path(__file__).resolve().parents[1] / "README.md"


def _example(name: str = "add-a-method") -> str:
    text = README.read_text()
    m = re.search(rf"<!-- example: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"the README's {name} example is missing"
    return m.group(1)


@pytest.mark.slow
def test_readme_python_api_tour_runs_as_printed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # it writes under runs/api
    scope: dict = {}
    exec(compile(_example("python-api"), str(README), "exec"), scope)
    assert scope["maps"].shape[1] == 4 and scope["own"].shape[1] == 1  # the phantoms' 4 classes; own class
    assert (tmp_path / "runs" / "api" / "nemt").is_dir()
    assert "'mean'" in capsys.readouterr().out


def test_readme_add_a_method_example_runs_and_equals_captum():
    code = _example()
    assert len(code.strip().splitlines()) <= 20, "the example should stay short"
    try:
        exec(compile(code, str(README), "exec"), {})
        assert "grad-x-input" in available()
        from test_plain_module import SIZE, assert_unchanged, plain_net, snapshot

        net = plain_net()
        before = snapshot(net)
        x = torch.randn(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([0, 2, 1])
        ex = get_explainer("grad-x-input", net)
        maps = ex.explain(x, target=t)
        assert_unchanged(before, net)
        assert maps.shape == (3, 1, SIZE, SIZE) and float(maps.min()) >= 0 and float(maps.max()) <= 1
        every = ex.explain(x, target="all")
        assert every.shape == (3, 3, SIZE, SIZE)
        # the raw maps are Captum's InputXGradient summed over channels (same gradient; float rounding only)
        net.eval()
        ref = InputXGradient(net).attribute(x.clone().requires_grad_(True), target=t).sum(dim=1)
        net.train()
        raw = ex.raw(x, target=t)[:, 0]
        assert torch.allclose(raw, ref, atol=1e-6, rtol=1e-5)
    finally:
        _REGISTRY.pop("grad-x-input", None)
