"""Every on-policy regime's packaged recipe, end to end on a tiny model (seconds each): it trains, evaluates,
and reports what its source cost."""

from __future__ import annotations

from pathlib import Path

import pytest
from onpolicy_helpers import shrunk

from distill.experiment import run_recipe


def _final(result, method: int = 0) -> dict:
    return result.methods[method].runs[0].result.final


@pytest.mark.parametrize("name", ["lm_grid_student_fkl", "lm_grid_student_rkl", "lm_gkd", "lm_tsd"])
def test_student_rollout_recipes_run(name: str, tmp_path: Path) -> None:
    result = run_recipe(shrunk(name, tmp_path), progress=False)
    for index in range(len(result.methods)):
        final = _final(result, index)
        assert {"exact_match", "teacher_kl", "rollout_tokens", "rollout_tokens_per_second"} <= set(final)
        assert (
            final["rollout_sequences"] > 0 and final["teacher_calls"] == 4
        )  # 32 examples / batch 8, 1 epoch
        assert final["student_tokens"] > 0


@pytest.mark.parametrize("name", ["lm_grid_teacher_fkl", "lm_grid_teacher_rkl"])
def test_teacher_prefix_recipes_run(name: str, tmp_path: Path) -> None:
    result = run_recipe(shrunk(name, tmp_path), progress=False)
    assert "exact_match" in _final(result)
    assert result.extra["generations"]  # the teacher's sampled completions, made once


def test_kl_mixing_and_length_curriculum(tmp_path: Path) -> None:
    recipe = shrunk("lm_grid_kl_mixing", tmp_path)
    curriculum = recipe.methods[1].source.params["length_curriculum"]
    curriculum.update(start=2, step=3, min_steps=1, entropy_threshold=100.0)  # grows after every step
    result = run_recipe(recipe, progress=False)
    plain, gated = _final(result, 0), _final(result, 1)
    assert gated["curriculum_length"] == 2 + 3 * 4  # grown after each of the 4 steps (rollouts: 2, 5, 8, 11)
    assert gated["rollout_mean_length"] < plain["rollout_mean_length"]


def test_opsd_needs_no_teacher(tmp_path: Path) -> None:
    result = run_recipe(shrunk("lm_opsd", tmp_path), progress=False)
    final = _final(result)
    assert result.teacher is None
    assert final["self_teacher_calls"] == 4 and final["rollout_sequences"] == 32
    assert "exact_match" in final


def test_soda_pairs_teacher_answers_with_a_student_snapshot(tmp_path: Path) -> None:
    result = run_recipe(shrunk("lm_soda", tmp_path), progress=False)
    final = _final(result)
    assert final["snapshot_sequences"] == 32  # sampled once, before training
    assert "teacher_calls" not in final  # the teacher's slot held the DPO reference; it generated once
    assert final["teacher_generation_calls"] > 0 and "exact_match" in final


def test_mixsd_against_sft_on_facts(tmp_path: Path) -> None:
    recipe = shrunk(
        "lm_mixsd",
        tmp_path,
        data={"params": {"new_facts": 12, "old_facts": 8, "context_examples": 8}, "batch_size": 4},
        trainer={"epochs": 2},
    )
    result = run_recipe(recipe, progress=False)
    sft, mixsd = _final(result, 0), _final(result, 1)
    assert "exact_match" in sft and "exact_match" in mixsd
    assert mixsd["mixed_sequences"] == 12


def test_opsd_with_a_frozen_initial_self_teacher(tmp_path: Path) -> None:
    recipe = shrunk("lm_opsd", tmp_path)
    recipe.methods[0].source.params["teacher_weights"] = "initial"
    final = _final(run_recipe(recipe, progress=False))
    assert final["self_teacher_calls"] == 4


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"mixx": 0.5}, "student_rollouts: unknown setting 'mixx'; did you mean 'mix'?"),
        ({"mix": 2}, "student_rollouts: mix must lie in [0, 1], got 2"),
        (
            {"length_curriculum": {"strat": 4}},
            "length_curriculum: unknown setting 'strat'; did you mean 'start'?",
        ),
    ],
)
def test_source_mistakes_are_one_line(tmp_path: Path, params: dict, message: str) -> None:
    from distill.errors import UserError

    with pytest.raises(UserError) as err:
        shrunk(
            "lm_gkd",
            tmp_path,
            methods=[
                {
                    "name": "m",
                    "objectives": [{"name": "forward_kl"}],
                    "source": {"name": "student_rollouts", "params": params},
                }
            ],
        )
    assert str(err.value) == f"lm_gkd: methods[0].source: {message}"
