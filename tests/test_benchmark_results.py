"""`benchmarks/_results.py`: a quick or partial benchmark run never writes over the full run's results file,
and every benchmark script under benchmarks/ goes through that one rule."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from bench_helpers import load_benchmark

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))


def _load(path: Path) -> ModuleType:
    return load_benchmark(path.stem)


def test_results_path_rule() -> None:
    rules = _load(BENCHMARKS / "_results.py")
    results = BENCHMARKS / "results"
    assert rules.results_path("lm", quick=False, partial=False) == results / "lm.md"
    assert rules.results_path("lm", quick=True, partial=False) == results / "lm_quick.md"
    assert rules.results_path("lm", quick=False, partial=True) == results / "lm_partial.md"
    assert rules.results_path("lm", quick=True, partial=True) == results / "lm_quick_partial.md"
    elsewhere = Path("/tmp/somewhere/lm.md")
    assert rules.results_path("lm", quick=True, partial=True, out=elsewhere) == elsewhere
    assert rules.results_path("lm", quick=False, partial=False, out=results / "lm.md") == results / "lm.md"
    for quick, partial in ((True, False), (False, True), (True, True)):
        with pytest.raises(ValueError, match="does not write over the full run's results"):
            rules.results_path("lm", quick=quick, partial=partial, out=results / "lm.md")


def test_seeds_and_file_and_command_line() -> None:
    import argparse

    rules = _load(BENCHMARKS / "_results.py")
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--tasks", default="a,b")
    parser.add_argument("--out", type=Path, default=None)
    results = BENCHMARKS / "results"

    def choose(*argv: str) -> tuple[list[int], Path]:
        args = parser.parse_args(list(argv))
        return rules.seeds_and_file(parser, args, "x", args.tasks, ("a", "b"))

    assert choose() == ([0, 1, 2], results / "x.md")
    assert choose("--tasks", "b,a", "--seeds", "3") == ([0, 1, 2], results / "x.md")
    assert choose("--quick") == ([0, 1], results / "x_quick.md")
    assert choose("--seeds", "1") == ([0], results / "x_partial.md")
    assert choose("--quick", "--tasks", "a") == ([0, 1], results / "x_quick_partial.md")
    assert choose("--quick", "--out", "/tmp/y.md") == ([0, 1], Path("/tmp/y.md"))
    assert (
        rules.command_line("x", ["--quick", "--out", "a b.md"])
        == "python benchmarks/x.py --quick --out 'a b.md'"
    )


def test_every_benchmark_script_uses_the_rule() -> None:
    assert {p.stem for p in SCRIPTS} >= {"lm", "lm_onpolicy", "teacher_cache", "kd_loss_memory"}
    for script in SCRIPTS:
        text = script.read_text()
        chooses = any(call in text for call in ("output_file(", "seeds_and_file(", "one_recipe_main("))
        assert chooses, f"{script.name} does not choose its file with benchmarks/_results.py"
        assert "args.out.write_text" not in text, script.name


# (script, arguments of a quick or partial run): each is refused before anything runs when --out names the
# full run's file
REFUSED = [
    ("lm", ["--quick"]),
    ("lm", ["--tasks", "arithmetic"]),
    ("lm", ["--seeds", "1"]),
    ("teacher_cache", ["--quick"]),
    ("teacher_cache", ["--tasks", "vision"]),
    ("lm_onpolicy", ["--quick"]),
    ("lm_onpolicy", ["--parts", "facts"]),
    ("kd_loss_memory", ["--quick", "--big"]),
    ("kd_loss_memory", ["--big", "--impls", "ours"]),
    ("kd_loss_memory", []),  # the full run is --big
    ("lm_fused_step", ["--quick"]),
    ("objectives", ["--only", "forward_kl"]),
    ("objectives", ["--rows", "64"]),
    ("text", ["--quick"]),
    ("text", ["--seeds", "1"]),
    ("text", ["--recipes", "bench_text_sms_spam"]),
    ("text_embedding", ["--quick"]),
    ("text_embedding", ["--parts", "fresh"]),
    ("mixup", ["--quick"]),
    ("dho", ["--quick"]),
    ("llkd", ["--quick"]),
    ("mst_distill", ["--quick"]),
    ("tgeo", ["--quick"]),
    ("mixup", ["--seeds", "1"]),
    ("kd3", ["--quick"]),
    ("kd3", ["--seeds", "1"]),
    ("signals", ["--quick"]),
    ("search", ["--quick"]),
    ("retrieval", ["--quick"]),
    ("lm_tpa", ["--quick"]),
    ("lm_gap", ["--quick"]),
    ("vs_trl", ["--quick"]),
    ("probes", ["--quick"]),
    ("generative", ["--quick"]),
    ("cross_tokenizer", ["--quick"]),
    ("text_attribution", ["--quick"]),
    ("text_attribution", ["--pairs", "saliency:add"]),
    ("detection", ["--quick"]),
    ("vit_tokens", ["--quick"]),
    ("vit_tokens", ["--data", "cifar10"]),
    ("lm_privacy", ["--quick"]),
]


@pytest.mark.parametrize(("name", "args"), REFUSED)
def test_quick_or_partial_run_refuses_the_full_file(
    name: str, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    script = _load(BENCHMARKS / f"{name}.py")
    with pytest.raises(SystemExit) as stop:
        script.main([*args, "--out", str(BENCHMARKS / "results" / f"{name}.md")])
    assert stop.value.code == 2
    assert "does not write over the full run's results" in capsys.readouterr().err
