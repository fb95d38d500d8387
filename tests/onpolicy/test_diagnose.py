"""`distill diagnose alignment`: the ideal per-node gradient's closed form, and the command end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from onpolicy_helpers import shrunk

from distill.cli import main


def test_ideal_logit_gradient_is_dV_dz() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.rand(7, generator=g, dtype=torch.float64)  # success probability after each token
    value = (torch.softmax(z, -1) * q).sum()
    (grad,) = torch.autograd.grad(value, z)
    pi = torch.softmax(z, -1).detach()
    torch.testing.assert_close(grad, pi * (q - (pi * q).sum()))


@pytest.mark.parametrize(("teacher", "space"), [("recipe", "logits"), ("privileged", "params")])
def test_alignment_command_writes_per_node_scores(
    tmp_path: Path, monkeypatch, capsys, teacher, space
) -> None:
    recipe = shrunk("lm_grid_student_rkl", tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    out = tmp_path / "alignment.json"
    argv = ["distill", "diagnose", "alignment", str(path), "--teacher", teacher, "--space", space]
    argv += ["--questions", "2", "--rollouts", "2", "--nodes", "2", "--candidates", "2", "--targeted", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    main()
    report = json.loads(out.read_text())
    assert len(report["nodes"]) == 8  # 2 questions x 2 rollouts x 2 nodes
    assert all(
        -1.0 - 1e-6 <= n["cosine"] <= 1.0 + 1e-6 for n in report["nodes"] if n["cosine"] == n["cosine"]
    )
    assert set(report["summary"]) == {"correct", "incorrect"}
    assert "incorrect rollouts" in capsys.readouterr().out
