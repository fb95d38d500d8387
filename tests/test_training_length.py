"""Training length in optimizer steps (`trainer.max_steps`) or counted tokens (`trainer.max_tokens`): exact
step counts, the schedule's end, resume, and refusals at validation."""

from __future__ import annotations

import json
import sys
from itertools import accumulate
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from distill import build_data, build_model, fit
from distill.errors import UserError
from distill.recipe.load import recipe_from_dict
from distill.train import Trainer, TrainerConfig
from distill.train.seeding import seed_everything

sys.path.insert(0, str(Path(__file__).parent / "lm"))

# 80 samples in batches of 16 = 5 batches, 3 optimizer steps per epoch with accumulation 2.
SETTINGS = dict(batch_size=16, grad_accum=2, progress=False, tensorboard=False, seed=3)


@pytest.fixture(scope="module")
def digits():
    return build_data("digits", labelled_per_class=8)


def _student(data, seed: int = 0):
    seed_everything(seed)
    return build_model("mlp", num_classes=10, input_shape=data.input_shape, hidden=[16], dropout=0.1)


def _rows(run_dir: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["kind"] == kind]


def test_max_steps_trains_exactly_that_many_steps_and_the_schedule_ends_there(digits, tmp_path: Path) -> None:
    config = TrainerConfig(epochs=1, max_steps=5, log_every=1, **SETTINGS)  # max_steps replaces epochs
    trainer = Trainer(_student(digits), digits.train, eval_data=digits.test, config=config, run_dir=tmp_path)
    assert trainer.total_steps == 5  # the schedule's length
    result = trainer.fit()
    assert result.completed and result.steps == 5
    adam_steps = {int(state["step"]) for state in trainer.optimizer.state.values()}
    assert adam_steps == {5}  # five optimizer updates, not one more
    lrs = [row["lr"] for row in _rows(tmp_path, "train")]
    assert [row["step"] for row in _rows(tmp_path, "train")] == [1, 2, 3, 4, 5]
    assert lrs[3] > 0 and lrs[4] == pytest.approx(0.0, abs=1e-12)  # cosine reaches its floor at step 5
    # A whole epoch (3 steps), then one cut after 2 of its 3 steps (4 of 5 batches), evaluated as the last.
    assert [(row["epoch"], row["step"]) for row in result.history] == [(1, 3), (1.8, 5)]
    assert "accuracy" in result.history[-1] and (tmp_path / "final.json").is_file()


def test_a_run_of_max_steps_resumed_ends_like_an_uninterrupted_one(digits, tmp_path: Path) -> None:
    settings = dict(epochs=1, max_steps=7, eval_data=digits.test, **SETTINGS)
    full = fit(_student(digits), digits.train, run_dir=tmp_path / "full", **settings)
    cut = fit(
        _student(digits),
        digits.train,
        run_dir=tmp_path / "cut",
        checkpoint_every=2,
        stop_after_steps=5,
        **settings,
    )
    assert not cut.completed and cut.steps == 5
    seed_everything(999)  # a new process: other weights and RNG, all restored from the checkpoint
    resumed = fit(_student(digits, seed=7), digits.train, run_dir=tmp_path / "cut", resume=True, **settings)
    assert resumed.completed and resumed.steps == full.steps == 7
    assert [row["step"] for row in resumed.history] == [row["step"] for row in full.history] == [3, 6, 7]
    for key in ("accuracy", "loss", "train_loss"):
        assert resumed.final[key] == full.final[key], key
    # Resuming a finished run trains nothing more.
    again = fit(_student(digits), digits.train, run_dir=tmp_path / "full", resume=True, **settings)
    assert again.completed and again.steps == 7 and again.final["accuracy"] == full.final["accuracy"]


def _lm_loader(batch_size: int = 2) -> tuple[DataLoader, list[int]]:
    """The tiny LM data set in a fixed order, and the counted tokens of each step (accumulation 1)."""
    from lm_helpers import lm_fixture

    data, _teacher, _student = lm_fixture()
    loader = DataLoader(data.train, batch_size=batch_size, shuffle=False, collate_fn=data.train.collate_fn)
    return loader, [int(batch["mask"].sum()) for batch in loader]


def _lm_student():
    from lm_helpers import lm_fixture

    return lm_fixture()[2]


def test_max_tokens_stops_at_the_first_step_that_reaches_the_budget(tmp_path: Path) -> None:
    loader, per_step = _lm_loader()
    cumulative = list(accumulate(per_step))  # 4 steps per epoch
    assert len(set(per_step)) > 1  # the steps count different numbers of tokens (padding is not counted)
    settings = dict(epochs=3, progress=False, tensorboard=False, objectives=["cross_entropy"])
    # A budget just past step 2's total ends at step 3; one equal to it ends at step 2.
    for budget, steps in ((cumulative[1] + 1, 3), (cumulative[1], 2)):
        result = fit(_lm_student(), loader, max_tokens=budget, **settings)
        assert result.completed and result.steps == steps and result.tokens == cumulative[steps - 1]
    # Past the first epoch: the count carries over epochs; the run ends inside the second.
    result = fit(_lm_student(), loader, max_tokens=cumulative[-1] + per_step[0], **settings)
    assert result.steps == 5 and result.tokens == cumulative[-1] + per_step[0]
    assert [row["step"] for row in result.history] == [4, 5]
    # A resumed run counts the tokens trained on before the interruption.
    budget = cumulative[2] + 1
    full = fit(_lm_student(), loader, max_tokens=budget, run_dir=tmp_path / "full", **settings)
    fit(
        _lm_student(),
        loader,
        max_tokens=budget,
        run_dir=tmp_path / "cut",
        checkpoint_every=1,
        stop_after_steps=2,
        **settings,
    )
    resumed = fit(_lm_student(), loader, max_tokens=budget, run_dir=tmp_path / "cut", resume=True, **settings)
    assert (resumed.steps, resumed.tokens) == (full.steps, full.tokens) == (4, cumulative[3])
    assert resumed.final["train_loss"] == full.final["train_loss"]


def test_max_tokens_needs_batches_with_a_token_mask(digits) -> None:
    with pytest.raises(UserError, match="trainer.max_tokens counts the tokens of language-model batches"):
        fit(_student(digits), digits.train, max_tokens=100, **SETTINGS)


# ------------------------------------------------------------------------------------------ the recipe


def _recipe(**trainer) -> dict:
    return {
        "name": "length",
        "student": {"name": "mlp"},
        "objectives": [{"name": "cross_entropy"}],
        "trainer": trainer,
    }


@pytest.mark.parametrize(
    ("trainer", "fragment"),
    [
        ({"max_steps": 0}, "trainer.max_steps: Input should be greater than 0"),
        ({"max_steps": -3}, "trainer.max_steps: Input should be greater than 0"),
        ({"max_tokens": 0}, "trainer.max_tokens: Input should be greater than 0"),
        ({"max_tokens": -1}, "trainer.max_tokens: Input should be greater than 0"),
        ({"max_steps": 2.5}, "trainer.max_steps: Input should be a valid integer"),
        ({"max_tokens": 1000}, "trainer.max_tokens counts a language model's tokens, and student 'mlp'"),
    ],
)
def test_lengths_are_refused_at_validation_in_one_line(trainer: dict, fragment: str) -> None:
    with pytest.raises(UserError) as err:
        recipe_from_dict(_recipe(**trainer), "r.yaml")
    message = str(err.value)
    assert fragment in message and "\n" not in message, message


def test_lengths_reach_fit_and_leave_other_recipes_dumped_as_before() -> None:
    from distill.experiment import student_trainer_settings

    recipe = recipe_from_dict(_recipe(max_steps=40))
    settings = student_trainer_settings(recipe, seed=0, progress=False)
    assert settings["max_steps"] == 40 and settings["max_tokens"] is None
    assert set(settings) <= set(TrainerConfig.__dataclass_fields__)
    # Unset, they are not in the dump: recipes written before them keep their fingerprint (resume, export).
    assert "max_steps" not in recipe_from_dict(_recipe()).model_dump(mode="json")["trainer"]
    assert recipe.model_dump(mode="json")["trainer"]["max_steps"] == 40


def test_the_token_count_is_in_the_result(digits) -> None:
    """Without a token mask, what is counted is samples: every sample of one epoch here."""
    result = fit(_student(digits), digits.train, epochs=1, **SETTINGS)
    assert result.tokens == len(digits.train)
