"""The README's Python example runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_python_example_runs(capsys) -> None:
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert 10 <= len(block.strip().splitlines()) <= 20
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - our own README, not user input
    accuracy, agreement = map(float, capsys.readouterr().out.split())
    assert 0.5 < accuracy <= 1.0 and 0.5 < agreement <= 1.0
