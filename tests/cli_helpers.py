"""`distill ARGS` run in the test's own process, and the one-line refusal check the CLI tests share."""

from __future__ import annotations

import sys

import pytest

import distill.cli as cli


def distill(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: object
) -> tuple[int, str, str]:
    """`distill ARGS` in this process: exit status, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", ["distill", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as stop:
        code = int(stop.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: object) -> str:
    """The one error line of a refused command (exit status 2, no traceback)."""
    code, out, err = distill(monkeypatch, capsys, *args)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
