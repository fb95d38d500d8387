"""A run stopped by SIGTERM / SIGINT (checkpoint, clean exit) or killed by SIGKILL (no warning) and then
resumed ends with the metrics of an uninterrupted run."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from distill import build_data, build_model, fit
from distill.train.seeding import seed_everything
from distill.train.signals import TrainingInterrupted
data = build_data("digits", labelled_per_class=20)
seed_everything(0)
student = build_model("mlp", num_classes=10, input_shape=data.input_shape, hidden=[32], dropout=0.2)
try:
    result = fit(student, data.train, eval_data=data.test, epochs=int(sys.argv[2]), batch_size=16,
                 checkpoint_every=3, log_every=1, progress=False, tensorboard=False, seed=1,
                 run_dir=sys.argv[1], resume=sys.argv[3] == "resume")
except TrainingInterrupted as stop:
    print(stop, file=sys.stderr)
    sys.exit(stop.exit_code)
print(result.final["accuracy"], result.final["loss"], result.steps)
"""

EPOCHS = 20  # 13 steps per epoch: long enough to be interrupted, a few seconds in all


def launch(run_dir: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(run_dir), str(EPOCHS), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen) -> None:
    log = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists():
            rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            if rows and rows[-1]["step"] >= step:
                return
        time.sleep(0.05)
    raise AssertionError("training did not reach the step in time")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> str:
    proc = launch(tmp_path_factory.mktemp("full"), "fresh")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_interrupted_then_resumed_equals_uninterrupted(
    tmp_path: Path, sig: signal.Signals, uninterrupted: str
):
    proc = launch(tmp_path, "fresh")
    wait_for_step(tmp_path, 40, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 128 + sig, err
        assert f"{sig.name} at step" in err and "checkpoint saved" in err
    resumed = launch(tmp_path, "resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert out == uninterrupted


def test_a_signal_during_the_final_evaluation_stops_the_run(tmp_path: Path) -> None:
    """SIGTERM arriving while the last epoch is evaluated: the checkpoint is kept, the run stops (the next
    method never starts) and a resume finishes it."""
    import os

    import torch

    from distill import build_data, build_model, fit
    from distill.train.signals import TrainingInterrupted

    data = build_data("digits", labelled_per_class=5)
    signalled = []

    def evaluator(student: torch.nn.Module, teacher: object) -> dict[str, float]:
        if not signalled:
            signalled.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return {"accuracy": 0.5}

    def run(resume: bool) -> object:
        torch.manual_seed(0)
        student = build_model("mlp", num_classes=10, input_shape=data.input_shape, hidden=[8])
        return fit(
            student, data.train, evaluator=evaluator, epochs=1, batch_size=16, progress=False,
            tensorboard=False, run_dir=tmp_path, resume=resume, device="cpu",
        )  # fmt: skip

    with pytest.raises(TrainingInterrupted, match="SIGTERM"):
        run(resume=False)
    assert (tmp_path / "checkpoints" / "latest").exists()
    assert not (tmp_path / "final.json").exists()
    result = run(resume=True)
    assert result.completed and (tmp_path / "final.json").exists()
