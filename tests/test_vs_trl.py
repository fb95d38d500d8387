"""`benchmarks/vs_trl.py`: the beta mapping between TRL's GKD loss and `distill`'s `generalized_jsd`, the one
evaluation function against a float64 reference, the results-file rule, and the quick run end to end (both
frameworks train the same job: their mean training losses agree)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from bench_helpers import load_benchmark
from data_helpers import require_data
from distill.losses import forward_kl, generalized_jsd

vs_trl = load_benchmark("vs_trl")


@pytest.mark.parametrize(("name", "beta"), list(vs_trl.OBJECTIVES.items()))
def test_trl_beta_is_distills_beta(name: str, beta: float) -> None:
    """TRL's `GKDTrainer.generalized_jsd_loss(beta)` equals the objective the benchmark gives distill."""
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 11, generator=generator, dtype=torch.float64)
    teacher = 2 * torch.randn(2, 5, 11, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 5), generator=generator)
    labels[1, 3:] = -100
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta)
    mask = labels != -100
    ours = (
        forward_kl(student, teacher, mask=mask)
        if name == "forward_kl"
        else generalized_jsd(student, teacher, mask=mask, beta=beta)
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_held_out_metrics_against_a_float64_reference() -> None:
    class Logits(torch.nn.Module):
        def __init__(self, table: torch.Tensor) -> None:
            super().__init__()
            self.table = table

        def forward(self, input_ids: torch.Tensor):  # noqa: ANN201 (a Hugging Face-like output)
            return type("Out", (), {"logits": self.table[input_ids]})()

    generator = torch.Generator().manual_seed(1)
    s_table, t_table = torch.randn(7, 7, generator=generator), torch.randn(7, 7, generator=generator)
    blocks = torch.randint(0, 7, (5, 6), generator=generator)
    got = vs_trl.held_out_metrics(Logits(s_table), Logits(t_table), blocks, batch=2)
    s = torch.log_softmax(s_table.double()[blocks[:, :-1]], -1)
    t = torch.log_softmax(t_table.double()[blocks[:, :-1]], -1)
    ce = -s.gather(-1, blocks[:, 1:, None]).mean()
    kl = (t.exp() * (t - s)).sum(-1).mean()
    assert got["ce"] == pytest.approx(float(ce), rel=1e-5)
    assert got["kl"] == pytest.approx(float(kl), rel=1e-5)
    same = vs_trl.held_out_metrics(Logits(t_table), Logits(t_table), blocks)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6)


def test_a_quick_run_refuses_the_full_file(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        vs_trl.main(["--quick", "--out", str(vs_trl.ROOT / "benchmarks" / "results" / "vs_trl.md")])
    assert stop.value.code == 2
    assert "does not write over the full run's results" in capsys.readouterr().err


@pytest.mark.slow
def test_the_quick_run_trains_the_same_job_in_both_frameworks(tmp_path: Path) -> None:
    require_data("text/tinyshakespeare.txt")
    out = tmp_path / "vs_trl.md"
    assert vs_trl.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert "failed" not in text
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 12 and cells[1] in vs_trl.FRAMEWORKS:
            rows[(cells[0], cells[1])] = cells
    assert len(rows) == 4
    for label in vs_trl.OBJECTIVE_LABELS.values():
        ours, theirs = rows[(label, "distill")], rows[(label, "trl")]
        assert float(ours[2]) > 0 and float(theirs[2]) > 0  # tokens/s
        # Same initial weights, blocks, order, optimiser and objective: the same mean training loss.
        assert float(ours[9]) == pytest.approx(float(theirs[9]), rel=1e-3)
        assert float(ours[10]) == pytest.approx(float(theirs[10]), abs=1e-2)  # held-out CE
    assert re.search(r"\| forward KL \| [\d.]+x", text)  # the ratio table
