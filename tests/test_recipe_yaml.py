"""Recipes are read with YAML 1.2 core-schema scalars, aliases cannot blow a recipe up, and error lines never
echo unbounded input (issue 22 items 8 and 13)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distill.errors import UserError
from distill.recipe.load import builtin_recipe_text, builtin_recipes, parse_yaml


def test_yaml_1_2_scalars() -> None:
    text = (
        "a: on\nb: off\nc: yes\nd: 5e-4\ne: 010\nf: 1:20\ng: true\nh: False\ni: .inf\nj: 0x1f\nk: 1.5\nl: ~\n"
    )
    assert parse_yaml(text, "t") == {
        "a": "on",
        "b": "off",
        "c": "yes",
        "d": 5e-4,
        "e": 10,
        "f": "1:20",
        "g": True,
        "h": False,
        "i": float("inf"),
        "j": 31,
        "k": 1.5,
        "l": None,
    }


@pytest.mark.parametrize("name", builtin_recipes())
def test_packaged_recipes_read_as_before(name: str) -> None:
    """The packaged recipes use none of the scalars whose meaning YAML 1.2 changed."""
    text = builtin_recipe_text(name)
    assert parse_yaml(text, name) == yaml.safe_load(text)


def test_fused_loss_on_is_the_setting_not_a_boolean() -> None:
    from distill.recipe.load import recipe_from_dict

    data = parse_yaml(builtin_recipe_text("quickstart") + "\n", "q")
    data["trainer"]["fused_loss"] = parse_yaml("x: on", "x")["x"]
    assert recipe_from_dict(data).trainer.fused_loss == "on"


def alias_bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\nname: bomb\n"


def test_an_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    assert len(path.read_bytes()) < 1024
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "distill", "run", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "aliases" in result.stderr
    assert time.perf_counter() - started < 60  # the bomb is 9**9 values: expanding it would not end
    assert [p.name for p in tmp_path.iterdir()] == ["bomb.yaml"]


def test_a_recursive_alias_and_deep_nesting_are_one_line() -> None:
    with pytest.raises(UserError, match="recursive anchor"):
        parse_yaml("a: &a [*a]\n", "r.yaml")
    with pytest.raises(UserError, match="nests too deeply|not valid YAML|r.yaml"):
        parse_yaml("a: " + "[" * 5000 + "]" * 5000 + "\n", "r.yaml")


def test_error_lines_clip_what_they_quote() -> None:
    key = "k" * 1000  # YAML allows plain keys up to 1024 characters
    with pytest.raises(UserError) as caught:
        parse_yaml(f"{key}: 1\n{key}: 2\n", "dup.yaml")
    assert "given twice" in str(caught.value) and len(str(caught.value)) < 300
    from distill.recipe.load import recipe_from_dict

    with pytest.raises(UserError) as caught:
        recipe_from_dict({"name": "x", "student": {"name": "mlp"}, "objectives": [], "seeds": "s" * 5000})
    assert len(str(caught.value)) < 300
