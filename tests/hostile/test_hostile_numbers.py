"""Non-finite numbers must not pass verification as zeros: a NaN/Inf the rewrite introduces
fails; a NaN/Inf already in the original's output is counted, named and reported as an element
the run cannot verify."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hostile_kit import cli

from normrewrite.verify import compare

_FACTORY = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y, torch.log(y)  # log of negative values: NaN in the original already

def build():
    torch.manual_seed(0)
    return Net().eval(), (torch.randn(1, 3, 8, 8),)
"""


def test_nan_in_the_original_is_reported_not_waved_through(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text(_FACTORY)
    report = tmp_path / "r.json"
    r = cli(
        "convert",
        f"{tmp_path / 'm.py'}:build",
        "-o",
        str(tmp_path / "o.pt2"),
        "--report",
        str(report),
    )
    assert r.exit_code == 0, r.output
    v = json.loads(report.read_text())["verify"]
    assert v["unverified"] > 0 and v["unverified_outputs"] == [1], v
    assert v["nonfinite_introduced"] == 0
    assert "cannot verify" in r.stdout


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_nonfinite_value_the_rewrite_introduces_fails(bad: float) -> None:
    ref = torch.ones(2, 3)
    cand = ref.clone()
    cand[1, 2] = bad
    cmp = compare([ref], [cand])
    assert not cmp.within(1e-4) and cmp.nonfinite_introduced == 1


def test_elements_nonfinite_in_the_original_are_counted_and_excluded() -> None:
    ref = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]])
    cand = torch.tensor([[1.0, 5.0], [float("inf"), 2.0 + 1e-6]])
    cmp = compare([torch.ones(3), ref], [torch.ones(3), cand])
    assert cmp.unverified == 2 and cmp.unverified_outputs == (1,)
    assert cmp.within(1e-4) and cmp.max_abs_err == pytest.approx(1e-6, rel=0.1)
