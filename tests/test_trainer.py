import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from distill import build_data, build_model, fit
from distill.errors import NonFiniteLossError
from distill.objectives import Objective, StepOutputs
from distill.train import OptimizerConfig, Trainer, TrainerConfig
from distill.train.checkpoint import latest_checkpoint, save_checkpoint
from distill.train.seeding import seed_everything


@pytest.fixture(scope="module")
def digits():
    return build_data("digits", labelled_per_class=8)


def _teacher(data):
    seed_everything(123)
    return build_model("small_cnn", num_classes=10, input_shape=data.input_shape, channels=[8, 16])


def _student(data, seed=0):
    seed_everything(seed)
    return build_model("mlp", num_classes=10, input_shape=data.input_shape, hidden=[16], dropout=0.1)


KD = [("cross_entropy", 0.5), ("hinton_kd", 0.5, {"temperature": 2.0})]
SETTINGS = dict(epochs=4, batch_size=16, grad_accum=2, progress=False, tensorboard=False, seed=3)


def test_resumed_run_ends_with_identical_metrics(digits, tmp_path: Path) -> None:
    teacher = _teacher(digits)
    full = fit(
        _student(digits),
        digits.train,
        teacher=teacher,
        eval_data=digits.test,
        objectives=KD,
        run_dir=tmp_path / "full",
        **SETTINGS,
    )
    # Interrupted inside the third epoch (5 batches = 3 steps per epoch), after a mid-epoch checkpoint.
    partial = fit(
        _student(digits),
        digits.train,
        teacher=teacher,
        eval_data=digits.test,
        objectives=KD,
        run_dir=tmp_path / "cut",
        checkpoint_every=4,
        stop_after_steps=8,
        **SETTINGS,
    )
    assert not partial.completed
    assert latest_checkpoint(tmp_path / "cut").name == "step-00000008"
    # A new process would build a fresh student with other weights and RNG; resume must restore all of it.
    seed_everything(999)
    resumed = fit(
        _student(digits, seed=7),
        digits.train,
        teacher=teacher,
        eval_data=digits.test,
        objectives=KD,
        run_dir=tmp_path / "cut",
        resume=True,
        **SETTINGS,
    )
    assert resumed.completed
    assert resumed.steps == full.steps == 12
    for key in ("accuracy", "loss", "agreement", "teacher_kl", "ece", "train_loss"):
        assert resumed.final[key] == full.final[key], key
    assert [r["accuracy"] for r in resumed.history] == [r["accuracy"] for r in full.history]
    # The log holds each step once: what ran after the checkpoint before the cut was dropped on resume.
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    eval_steps = [r["step"] for r in rows if r["kind"] == "eval"]
    assert eval_steps == sorted(set(eval_steps)) == [r["step"] for r in full.history]


def test_teacher_is_frozen_in_eval_mode_and_not_optimised(digits) -> None:
    teacher = _teacher(digits)
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = Trainer(
        _student(digits),
        digits.train,
        teacher=teacher,
        objectives=KD,
        config=TrainerConfig(epochs=1, progress=False, batch_size=16),
    )
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}
    trainer.fit()
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for key, value in teacher.state_dict().items():  # BatchNorm statistics untouched too
        assert torch.equal(value, before[key]), key


def test_gradient_accumulation_matches_one_big_batch(digits) -> None:
    """Accumulating 4 x 8 gives the update of one batch of 32 (mean losses, equal-size micro-batches)."""
    data = torch.utils.data.TensorDataset(*digits.train.tensors)
    results = []
    for batch, accum in ((32, 1), (8, 4)):
        student = _student(digits)
        fit(
            student,
            data,
            objectives=["cross_entropy"],
            epochs=1,
            batch_size=batch,
            grad_accum=accum,
            progress=False,
            tensorboard=False,
            stop_after_steps=1,
            seed=5,
        )
        results.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    # The sampler shuffles by (seed, epoch) only, so both runs see the same 32 samples in the first step.
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


class Exploding(Objective):
    needs_teacher = False

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        return outputs.student_logits.sum() * math.inf


def test_non_finite_loss_names_step_and_term(digits) -> None:
    with pytest.raises(NonFiniteLossError, match=r"step 0: objective 'boom'"):
        fit(
            _student(digits),
            digits.train,
            objectives=[("cross_entropy", 1.0), (Exploding(), 1.0, None, 0.0, "boom")],
            epochs=1,
            progress=False,
            tensorboard=False,
        )


def test_non_finite_steps_can_be_skipped(digits) -> None:
    student = _student(digits)
    before = [p.clone() for p in student.parameters()]
    result = fit(
        student,
        digits.train,
        objectives=[Exploding()],
        epochs=1,
        nonfinite="skip",
        progress=False,
        tensorboard=False,
    )
    assert result.steps > 0
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))


def test_failed_checkpoint_write_keeps_previous(tmp_path: Path, monkeypatch) -> None:
    model = nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    objectives = nn.ModuleList()
    save_checkpoint(tmp_path, step=1, model=model, optimizer=optimizer, objectives=objectives, state={})

    import distill.train.checkpoint as checkpoint

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "atomic_write_json", disk_full)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, step=2, model=model, optimizer=optimizer, objectives=objectives, state={})
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert not list((tmp_path / "checkpoints").glob(".*partial"))


def test_resume_refuses_checkpoint_of_another_recipe(digits, tmp_path: Path) -> None:
    from distill.errors import UserError

    fit(
        _student(digits),
        digits.train,
        objectives=["cross_entropy"],
        epochs=1,
        progress=False,
        tensorboard=False,
        run_dir=tmp_path,
        fingerprint="recipe-a",
    )
    with pytest.raises(UserError, match="another recipe"):
        fit(
            _student(digits),
            digits.train,
            objectives=["cross_entropy"],
            epochs=2,
            progress=False,
            tensorboard=False,
            run_dir=tmp_path,
            fingerprint="recipe-b",
            resume=True,
        )


class MaskedMean(Objective):
    """Mean squared logit over counted rows: a stand-in for a token-level loss with padding."""

    needs_teacher = False

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        per_row = outputs.student_logits.float().pow(2).mean(-1)
        mask = outputs.mask.float()
        return (per_row * mask).sum() / mask.sum().clamp(min=1)


def test_accumulation_normalises_by_counted_rows_across_the_window() -> None:
    """Micro-batches with different numbers of counted rows (padding): 4 x 2 equals 1 x 8."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=generator)
    y = torch.zeros(8, dtype=torch.long)
    mask = torch.tensor([True, False, True, True, True, True, False, False])
    data = torch.utils.data.TensorDataset(x, y, mask)
    grads = []
    for batch, accum in ((8, 1), (2, 4)):
        torch.manual_seed(0)
        model = nn.Linear(5, 3)
        fit(
            model,
            data,
            objectives=[MaskedMean()],
            epochs=1,
            batch_size=batch,
            grad_accum=accum,
            optimizer=OptimizerConfig(name="sgd", lr=1.0, momentum=0.0),
            progress=False,
            tensorboard=False,
        )
        grads.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-6)


def test_runs_of_different_mixed_precision_share_one_process(digits) -> None:
    """A recipe trains its teacher in float32, then students in bf16, in one process (Accelerate alone
    refuses a second Accelerator with another mixed-precision setting)."""
    settings = SETTINGS | {"epochs": 1, "grad_accum": 1}
    teacher = _teacher(digits)
    fit(teacher, digits.train, objectives=["cross_entropy"], mixed_precision="no", **settings)
    result = fit(
        _student(digits), digits.train, teacher=teacher, objectives=KD, mixed_precision="bf16", **settings
    )
    assert math.isfinite(result.final["train_loss"])
    fit(_student(digits), digits.train, objectives=["cross_entropy"], mixed_precision="no", **settings)
