"""Every misuse of the command line ends in one line on stderr and exit status 2: an unknown command or
option, a missing or extra argument, a bad value, a recipe path that is absent, a folder, empty, binary or
unreadable. No traceback, and nothing written in the working folder. Most cases call `main(argv)` in this
process (the console script's own entry point); a few run `python -m distill` to cover the real process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from distill import cli
from distill.cli import main

# (arguments, a fragment of the one error line); "{tmp}" is the working folder
CASES: dict[str, tuple[list[str], str]] = {
    "unknown command": (["rnu"], "distill: unknown command 'rnu'; did you mean 'run'?"),
    "unknown command, nothing near": (["xyzzy"], "unknown command 'xyzzy'; known: bench, cache"),
    "unknown subcommand": (
        ["bench", "visoin"],
        "distill bench: unknown command 'visoin'; did you mean 'vision'?",
    ),
    "unknown diagnose": (["diagnose", "align"], "did you mean 'alignment'?"),
    "no command": ([], "distill: missing command (one of: run, validate"),
    "no subcommand": (["bench"], "distill bench: missing command (one of: vision, text)"),
    "unknown option": (
        ["run", "x.yaml", "--epochs", "3"],
        "unknown option --epochs; recipe settings go through",
    ),
    "misspelt option": (["run", "--overwrit"], "unknown option --overwrit; did you mean --overwrite?"),
    "unknown global option": (
        ["--verbose", "methods"],
        "distill: unknown option --verbose (options: --debug",
    ),
    "missing argument": (
        ["validate"],
        "distill validate: missing argument 'RECIPE'; usage: distill validate",
    ),
    "missing cache argument": (["cache"], "distill cache: missing argument 'RECIPE'"),
    "missing option value": (["run", "--out"], "option '--out' requires an argument"),
    "missing required option": (["cache", "quickstart"], "missing option '--out'"),
    "extra arguments": (["methods", "taid", "extra"], "unexpected extra argument"),
    "extra recipe": (["validate", "a.yaml", "b.yaml"], "unexpected extra argument"),
    "not a number": (["bench", "vision", "--seeds", "abc"], "invalid value for '--seeds'"),
    "not a whole number": (
        ["cache", "quickstart", "--out", "o", "--top-k", "many"],
        "invalid value for '--top-k'",
    ),
    "not a float": (["cache", "quickstart", "--out", "o", "--temperature", "hot"], "'--temperature'"),
    "below the minimum": (["diagnose", "alignment", "x.yaml", "--questions", "0"], "'--questions'"),
    "bad choice": (["diagnose", "alignment", "x.yaml", "--teacher", "oracle"], "--teacher: unknown teacher"),
    "absent recipe": (["validate", "absent.yaml"], "recipe file not found: absent.yaml"),
    "absent recipe on run": (["run", "absent.yaml", "--no-progress"], "recipe file not found"),
    "misspelt built-in": (["validate", "quickstrat"], "(built-in recipe 'quickstart'?)"),
    "folder as recipe": (["validate", "{tmp}/folder"], "is a folder; give a recipe's YAML file"),
    "empty recipe": (["validate", "empty.yaml"], "empty.yaml: the recipe is empty"),
    "binary recipe": (
        ["validate", "binary.yaml"],
        "recipe binary.yaml is not UTF-8 text (byte 0x89 at offset 0)",
    ),
    "nul bytes": (["validate", "nul.yaml"], "nul.yaml: not valid YAML (unacceptable character #x0000"),
    "unknown kind": (["list", "modles"], "unknown kind 'modles'; did you mean 'models'?"),
    "unknown task": (["list", "models", "--task", "vision"], "--task: unknown task 'vision'"),
    "unknown task of methods": (["methods", "--task", "lm"], "--task: unknown task 'lm'"),
    "--set without =": (["validate", "quickstart", "--set", "trainer.epochs"], "expected KEY.PATH=VALUE"),
    "--set unknown key": (["validate", "quickstart", "--set", "trainer.epoch=3"], "did you mean 'epochs'?"),
    "--set bad YAML": (["validate", "quickstart", "--set", "trainer.epochs=[1"], "value is not valid YAML"),
    "--set bad value": (["validate", "quickstart", "--set", "trainer.epochs=-1"], "trainer.epochs:"),
    "--seeds not numbers": (["validate", "quickstart", "--seeds", "0,x"], "--seeds: expected whole numbers"),
    "--seeds twice": (["validate", "quickstart", "--seeds", "1,1"], "--seeds: seed 1 is given twice"),
    "--seeds empty": (["run", "quickstart", "--seeds", ","], "--seeds: give one or more seeds"),
    "--methods unknown": (["validate", "quickstart", "--methods", "dkd2"], "unknown method 'dkd2'"),
    "--resume and --overwrite": (["run", "--resume", "--overwrite"], "--resume and --overwrite exclude"),
    "unknown suite": (["bench", "vision", "--suite", "quik"], "unknown suite 'quik'; did you mean 'quick'?"),
}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working folder, holding the odd files the cases name."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01")
    (tmp_path / "nul.yaml").write_bytes(b"name: x\x00\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snapshot(folder: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in folder.rglob("*")}


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stop:
        main(args)
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


def assert_one_line(code: object, out: str, err: str, fragment: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err + out
    assert lines[0].startswith("error: "), lines[0]
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_misuse_is_one_line(case: str, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args, fragment = CASES[case]
    args = [arg.replace("{tmp}", str(workdir)) for arg in args]
    before = snapshot(workdir)
    assert_one_line(*run_main(args, capsys), fragment)
    assert snapshot(workdir) == before


def test_at_least_25_cases() -> None:
    assert len(CASES) >= 25


def test_unreadable_recipe(workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    recipe = workdir / "locked.yaml"
    recipe.write_text("name: x\n")
    recipe.chmod(0)
    real_read = Path.read_text

    def read_text(path: Path, *args, **kwargs) -> str:  # root reads a mode-0 file: refuse as the OS would
        if path.name == "locked.yaml":
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    before = snapshot(workdir)
    assert_one_line(*run_main(["validate", "locked.yaml"], capsys), "cannot read recipe locked.yaml")
    assert snapshot(workdir) == before


def test_debug_shows_the_traceback(workdir: Path) -> None:
    with pytest.raises(cli.click_errors.UsageError):
        main(["--debug", "rnu"])


def test_ctrl_c_is_one_line_and_130(workdir: Path, capsys, monkeypatch) -> None:
    def interrupted(*args, **kwargs) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("distill.cli_list.print_listing", interrupted)
    with pytest.raises(SystemExit) as stop:
        main(["list", "tasks"])
    err = capsys.readouterr().err
    assert stop.value.code == 130
    assert err.strip() == "interrupted"


def test_help_is_not_an_error(workdir: Path, capsys) -> None:
    main(["--help"])  # returns: exit status 0
    assert "run" in capsys.readouterr().out


@pytest.mark.parametrize(
    "case", ["unknown command", "unknown option", "missing argument", "extra arguments", "folder as recipe"]
)
def test_misuse_in_a_real_process(case: str, workdir: Path) -> None:
    args, fragment = CASES[case]
    args = [arg.replace("{tmp}", str(workdir)) for arg in args]
    before = snapshot(workdir)
    done = subprocess.run(
        [sys.executable, "-m", "distill", *args], capture_output=True, text=True, cwd=workdir, timeout=300
    )
    assert_one_line(done.returncode, done.stdout, done.stderr, fragment)
    assert snapshot(workdir) == before


def test_warnings_are_one_line_each_beside_the_error(workdir: Path, capsys, monkeypatch) -> None:
    """A library warning issued before the mistake is found prints as one `warning:` line, not Python's
    two lines of file, line number and source."""
    import warnings

    from distill.errors import UserError

    def warn_then_fail(*args, **kwargs) -> None:
        warnings.warn("a library warning\nwith a second line", UserWarning, stacklevel=1)
        raise UserError("the mistake")

    monkeypatch.setattr("distill.cli_list.print_listing", warn_then_fail)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with pytest.raises(SystemExit) as stop:
            main(["list", "tasks"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert stop.value.code == 2
    assert lines == ["warning: a library warning", "error: the mistake"]
    assert warnings.showwarning is not cli.one_line_warning  # restored after the command
