"""--meta cannot see a checkpoint's values while it decides a fold: a BatchNorm whose statistics
are negative or NaN in the checkpoint must still never reach the output as NaN/Inf weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from normrewrite.errors import PassError
from normrewrite.passes import REGISTRY
from normrewrite.stream import convert_checkpoint


@pytest.mark.parametrize("bad", ["negative var", "nan var", "nan mean"])
def test_streamed_fold_refuses_invalid_statistics(tmp_path: Path, bad: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        if bad == "negative var":
            model[1].running_var[1] = -0.5
        elif bad == "nan var":
            model[1].running_var[2] = float("nan")
        else:
            model[1].running_mean[0] = float("nan")
    ckpt = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    out = tmp_path / "out"
    with pytest.raises(PassError, match=r"NaN/Inf.*refused, nothing written") as info:
        convert_checkpoint(model, [REGISTRY.create("fold-bn")], out, checkpoint=ckpt,
                           example_inputs=(torch.randn(1, 3, 8, 8),), tracer="export")
    assert "\n" not in str(info.value)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
