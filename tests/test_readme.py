"""The README's "add a method" example works as printed: one class, registered, through the whole pipeline."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from captum.attr import InputXGradient

from nemt.explainers import available, get_explainer
from nemt.explainers.base import _REGISTRY

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    text = README.read_text()
    m = re.search(r"<!-- example: add-a-method -->\s*```python\n(.*?)```", text, re.S)
    assert m, "the README's add-a-method example is missing"
    return m.group(1)


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
