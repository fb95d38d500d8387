import math
from pathlib import Path

import pytest
import yaml

from distill.errors import UserError
from distill.recipe import load_recipe, recipe_from_dict
from distill.recipe.check import check_recipe
from distill.recipe.load import builtin_recipe_text, parse_yaml


def quickstart() -> dict:
    return yaml.safe_load(builtin_recipe_text("quickstart"))


def test_builtin_quickstart_is_valid() -> None:
    recipe = load_recipe(None)
    check_recipe(recipe)
    assert [m.name for m in recipe.method_list()] == ["student alone", "Hinton KD", "DKD"]
    assert recipe.seeds == [0, 1, 2]


def test_single_objectives_list_becomes_one_method() -> None:
    data = quickstart()
    data.pop("methods")
    data["objectives"] = [{"name": "hinton_kd", "weight": 1.0}]
    recipe = recipe_from_dict(data)
    assert [m.name for m in recipe.method_list()] == ["distill"]


def _error(data: dict) -> str:
    with pytest.raises(UserError) as info:
        check_recipe(recipe_from_dict(data, "r.yaml"), "r.yaml")
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d["trainer"].update(epoch=3), "trainer.epoch: unknown key; did you mean 'epochs'?"),
        (lambda d: d.update(optimiser={}), "optimiser: unknown key; did you mean 'optimizer'?"),
        (
            lambda d: d["methods"][1]["objectives"][1].update(wieght=1),
            "methods[1].objectives[1].wieght: unknown key; did you mean 'weight'?",
        ),
        (
            lambda d: d["teacher"]["train"].update(epohcs=1),
            "teacher.train.epohcs: unknown key; did you mean 'epochs'?",
        ),
        (lambda d: d["trainer"].update(epochs="many"), "trainer.epochs"),
        (lambda d: d["trainer"].update(epochs=0), "trainer.epochs: Input should be greater than 0"),
        (lambda d: d["optimizer"].update(lr=-1.0), "optimizer.lr"),
        (lambda d: d["optimizer"].update(lr=math.nan), "optimizer.lr"),
        (lambda d: d.update(seeds=[1, 1]), "seeds must be distinct"),
        (lambda d: d.update(seeds=[]), "seeds"),
        (lambda d: d.update(trainer=[1, 2]), "trainer: expected a mapping"),
        (lambda d: d.update(objectives=[{"name": "hinton_kd"}]), "give either 'objectives'"),
        (
            lambda d: d["methods"][1]["objectives"][1].update(name="hinton"),
            "unknown objective 'hinton'; did you mean 'hinton_kd'?",
        ),
        (
            lambda d: d["methods"][1]["objectives"][1]["params"].update(temprature=2),
            "has no parameter 'temprature'; did you mean 'temperature'?",
        ),
        (lambda d: d["student"].update(name="mpl"), "student.name: unknown model 'mpl'; did you mean 'mlp'?"),
        (
            lambda d: d["student"]["params"].update(hiden=[3]),
            "student.params.hiden: model 'mlp' has no such parameter; did you mean 'hidden'?",
        ),
        (lambda d: d["data"].update(name="digitz"), "unknown data set 'digitz'"),
        (
            lambda d: d["teacher"].update(checkpoint="/nonexistent/t.safetensors"),
            "teacher.checkpoint not found: /nonexistent",
        ),
        (lambda d: d.pop("teacher"), "needs a teacher, but the recipe has none"),
    ],
)
def test_invalid_recipes_name_what_and_where(edit, expected: str) -> None:
    data = quickstart()
    edit(data)
    assert expected in _error(data)


def test_malformed_yaml_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nstudent: {name: mlp\n")
    with pytest.raises(UserError, match=r"bad.yaml line \d+ column \d+"):
        load_recipe(path)


def test_duplicate_keys_are_refused() -> None:
    with pytest.raises(UserError, match="key 'epochs' is given twice"):
        parse_yaml("trainer:\n  epochs: 1\n  epochs: 2\n", "r.yaml")


def test_recipes_cannot_execute_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['touch pwned']\nstudent: {name: mlp}\n")
    with pytest.raises(UserError):
        load_recipe(path)
    assert not Path("pwned").exists()


def test_missing_recipe_file() -> None:
    with pytest.raises(UserError, match="recipe file not found: nope.yaml"):
        load_recipe("nope.yaml")


def test_builtin_recipes_load_by_name_and_a_near_miss_is_named():
    from distill.recipe.load import builtin_recipes

    assert {"quickstart", "lm_shakespeare", "lm_arithmetic"} <= set(builtin_recipes())
    for name in builtin_recipes():
        assert load_recipe(name).name
    with pytest.raises(UserError, match="built-in recipe 'lm_arithmetic'"):
        load_recipe("lm_arithmetc")


def test_yaml_merge_keys_work_and_own_keys_win(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: anchors\n"
        "data: {name: digits}\n"
        "teacher: &t {name: mlp, params: {hidden: [16]}}\n"
        "student:\n  <<: *t\n  params: {hidden: [4]}\n"
        "methods: [{name: ce, objectives: [{name: cross_entropy}]}]\n"
    )
    recipe = load_recipe(path)
    assert recipe.student.name == "mlp" and recipe.student.params == {"hidden": [4]}
