"""A language-model recipe killed with SIGKILL in the middle of the student's training (no warning, no
checkpoint on the way out) and continued with `distill run --resume` ends with the metrics and the logged
loss curve of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from lm_helpers import STUDENT, TEACHER, addition_rows, bpe, write_jsonl

TIMING = {"seconds", "tokens_per_second", "train_seconds"}


def recipe(root: Path, out: Path) -> dict[str, Any]:
    return {
        "name": "lm-interrupt",
        "data": {
            "name": "jsonl",
            "params": {"path": str(root / "train.jsonl"), "tokenizer": str(root / "tok"), "max_length": 32},
            "batch_size": 8,
            "eval_batch_size": 16,
        },
        "teacher": {"name": "hf", "params": {"config": TEACHER}, "train": {"epochs": 1}},
        "student": {"name": "hf", "params": {"config": STUDENT}},
        "objectives": [
            {"name": "cross_entropy", "weight": 0.5},
            {"name": "forward_kl", "weight": 0.5, "params": {"temperature": 2.0}},
        ],
        "optimizer": {"lr": 0.005},
        "trainer": {"epochs": 6, "threads": 1, "log_every": 1, "checkpoint_every": 4, "device": "cpu"},
        "seeds": [0],
        "output": {"dir": str(out), "tensorboard": False},
    }


def start(root: Path, out: Path, *flags: str) -> subprocess.Popen:
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe(root, out)))
    return subprocess.Popen(
        [sys.executable, "-m", "distill", "run", str(path), "--no-progress", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def student_log(out: Path) -> Path:
    return out / "methods" / "distill" / "seed-0" / "metrics.jsonl"


def outcome(out: Path) -> tuple[dict[str, Any], list[tuple[int, float]]]:
    """The final metrics without timings, and the logged training loss per step."""
    document = json.loads((out / "metrics.json").read_text())
    final = document["methods"][0]["seeds"][0]["final"]
    rows = [json.loads(line) for line in student_log(out).read_text().splitlines() if line]
    curve = [(row["step"], row["loss"]) for row in rows if row["kind"] == "train"]
    return {k: v for k, v in final.items() if k not in TIMING}, curve


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lm-interrupt")
    rows = addition_rows(64)
    write_jsonl(root / "train.jsonl", rows)
    bpe(rows).save_pretrained(str(root / "tok"))
    return root


@pytest.mark.slow
def test_killed_lm_run_resumes_to_the_uninterrupted_metrics(root: Path) -> None:
    # The first run trains the teacher and caches it (by content); the killed run and its resumption load
    # the very same weights from that cache.
    full = start(root, root / "full")
    _, err = full.communicate(timeout=300)
    assert full.returncode == 0, err
    expected, expected_curve = outcome(root / "full")
    steps = expected_curve[-1][0]

    out = root / "killed"
    proc = start(root, out)
    log = student_log(out)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.exists():
            logged = [json.loads(line)["step"] for line in log.read_text().splitlines() if line]
            if logged and logged[-1] >= steps // 2 + 1:  # between two checkpoints: some work is lost
                break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists()

    # Without --resume the folder is refused (an earlier run is there); with it, the run continues.
    refused = start(root, out)
    _, err = refused.communicate(timeout=120)
    assert refused.returncode == 2 and "holds an earlier run" in err
    resumed = start(root, out, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    got, curve = outcome(out)
    assert got == expected
    assert curve == expected_curve  # each step logged once, with the loss of the uninterrupted run
