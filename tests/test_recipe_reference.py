"""The recipe reference (`docs/recipe_reference.md`) is what the schema and the registries say today: it is
regenerated here and compared with the committed page, and every registered name must be in it."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest

from distill.recipe.schema import SOURCES, SourceSpec, TrainerSpec
from distill.recipe_reference import COMMAND, REFERENCE, registered_names, render, sections


def test_the_committed_reference_is_up_to_date(tmp_path) -> None:
    """Rendered in a fresh process: other tests register throwaway objectives in this one."""
    assert REFERENCE.is_file(), f"{REFERENCE} is missing: run `{COMMAND}`"
    fresh = tmp_path / "reference.md"
    subprocess.run(
        [sys.executable, "-m", "distill.recipe_reference", str(fresh)], check=True, capture_output=True
    )
    if REFERENCE.read_text() != fresh.read_text():
        pytest.fail(f"{REFERENCE.name} is out of date with the schema or the registries: run `{COMMAND}`")


def test_every_registered_name_is_in_the_reference() -> None:
    from distill.data import DATASETS
    from distill.models import MODELS
    from distill.objectives import OBJECTIVES
    from distill.tasks import TASKS

    text = render()
    names = {
        "Data sets": DATASETS.names(),
        "Models": MODELS.names(),
        "Objectives": OBJECTIVES.names(),
        "Sources": list(typing.get_args(SourceSpec.model_fields["name"].annotation)),
        "Tasks": TASKS.names(),
    }
    assert set(registered_names()) == set(names)
    for heading, expected in names.items():
        part = text.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0]
        missing = [name for name in expected if f"| `{name}` |" not in part]
        assert not missing, f"{heading}: {missing}"


def test_every_source_has_its_summary() -> None:
    assert list(SOURCES) == list(typing.get_args(SourceSpec.model_fields["name"].annotation))


def test_every_section_and_key_is_documented() -> None:
    text = render()
    for model, keys in sections().items():
        heading = "## The top level" if keys[0] == "" else f"## `{keys[0]}`"
        assert heading in text, heading
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
    row = next(line for line in text.splitlines() if line.startswith("| `max_steps` |"))
    assert "integer (> 0) or null" in row and TrainerSpec.model_fields["max_steps"].description in row
