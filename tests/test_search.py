"""S18 DisWOT: the score's pure functions against float64 references, the search driver, `distill search` and
its misuse, and the benchmark's quick mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from bench_helpers import load_benchmark
from cli_helpers import distill, refused
from distill.bench.search import (
    SearchSettings,
    gaussian_init_,
    parse_candidates,
    probe,
    score_candidates,
)
from distill.errors import UserError
from distill.losses.diswot import (
    diswot_relation,
    diswot_score,
    diswot_semantic,
    linear_classifier_gradient,
)
from distill.models import build_model
from distill.recipe.schema import ModelSpec

# ------------------------------------------------------------------------------ float64 references


def reference_gram(x: np.ndarray) -> np.ndarray:
    rows = x.reshape(x.shape[0], -1).astype(np.float64)
    gram = rows @ rows.T
    norms = np.sqrt((gram**2).sum(axis=1, keepdims=True))
    return gram / np.maximum(norms, 1e-12)


def reference_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||G(a) - G(b)||_F^2 / n^2 with G the row-normalised Gram (the paper's M_r and M_s)."""
    diff = reference_gram(a) - reference_gram(b)
    return float((diff**2).sum() / a.shape[0] ** 2)


def reference_gradient(x: np.ndarray, z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dCE/dW, summed sample by sample: (p_n - e_{y_n}) x_n^T, averaged."""
    total = np.zeros((z.shape[1], x.shape[1]))
    for xn, zn, yn in zip(x.astype(np.float64), z.astype(np.float64), y, strict=True):
        p = np.exp(zn - zn.max())
        p /= p.sum()
        p[yn] -= 1.0
        total += np.outer(p, xn)
    return total / len(y)


def test_relation_matches_the_reference_with_different_widths() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(12, 4, 3, 3, generator=g), torch.randn(12, 7, generator=g)
    got = diswot_relation(s, t)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(reference_distance(s.numpy(), t.numpy()), rel=1e-5)


def test_semantic_matches_the_reference() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(10, 5, generator=g), torch.randn(10, 33, generator=g)
    assert diswot_semantic(s, t).item() == pytest.approx(reference_distance(s.numpy(), t.numpy()), rel=1e-5)
    assert diswot_semantic(s, s).item() == pytest.approx(0.0, abs=1e-7)


def test_classifier_gradient_is_the_linear_layers_weight_gradient() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 4).double()
    x, y = torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 4, (9,))
    z = layer(x)
    F.cross_entropy(z, y).backward()
    got = linear_classifier_gradient(x, z.detach(), y)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, layer.weight.grad)
    np.testing.assert_allclose(got.numpy(), reference_gradient(x.numpy(), z.detach().numpy(), y.numpy()))


def test_ignored_labels_equal_removed_rows_and_neg_inf_logits_are_finite() -> None:
    g = torch.Generator().manual_seed(2)
    x, z = torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)
    z[:, 2] = float("-inf")
    y = torch.tensor([0, 1, -100, 1, 0, -100, 1, 0])
    keep = y >= 0
    grad = linear_classifier_gradient(x, z, y)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, linear_classifier_gradient(x[keep], z[keep], y[keep]))
    maps_s, maps_t = torch.randn(8, 2, 2, 2, generator=g), torch.randn(8, 6, generator=g)
    torch.testing.assert_close(
        diswot_relation(maps_s, maps_t, y), diswot_relation(maps_s[keep], maps_t[keep])
    )
    none = torch.full((8,), -100)
    assert torch.equal(linear_classifier_gradient(x, z, none), torch.zeros(3, 5))


def test_low_precision_inputs_compute_in_float32_and_huge_values_do_not_overflow() -> None:
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 4, generator=g)
    low = diswot_relation(s.bfloat16(), t.bfloat16())
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(diswot_relation(s, t).item(), abs=2e-2)
    huge = diswot_relation(s * 1e30, t * 1e-30)
    assert torch.isfinite(huge) and huge.item() == pytest.approx(diswot_relation(s, t).item(), rel=1e-4)


@given(
    scale_s=st.floats(1e-6, 1e6),
    scale_t=st.floats(1e-6, 1e6),
    seed=st.integers(0, 1000),
)
def test_distances_ignore_each_models_scale(scale_s: float, scale_t: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 3, generator=g)
    base = diswot_relation(s, t).item()
    assert diswot_relation(s * scale_s, t * scale_t).item() == pytest.approx(base, rel=1e-4, abs=1e-6)
    assert 0.0 <= base <= 4.0 / 5  # rows of unit norm: each row differs by at most 2 in norm, squared 4


def test_score_is_minus_the_sum() -> None:
    assert diswot_score(torch.tensor(0.25), torch.tensor(0.5)).item() == -0.75


# ------------------------------------------------------------------------------ the driver


def test_gaussian_init_and_probe_read_the_last_two_taps() -> None:
    model = gaussian_init_(build_model("resnet8", num_classes=10, input_shape=(1, 8, 8)))
    bn = (
        model.bn1
        if hasattr(model, "bn1")
        else next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    )
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    read = probe(model, torch.randn(4, 1, 8, 8), "resnet8", batch_statistics=True)
    assert read.feature_map.dim() == 4 and read.pooled.shape == (4, 64) and read.logits.shape == (4, 10)
    assert model.training  # left as it was found


def test_score_candidates_is_repeatable_and_leaves_the_random_state_alone() -> None:
    def build(spec: ModelSpec) -> torch.nn.Module:
        return build_model(spec.name, num_classes=10, input_shape=(1, 8, 8), **spec.params)

    teacher = ModelSpec(name="small_cnn", params={"channels": [8, 16]})
    candidates = [ModelSpec(name="mlp", params={"hidden": [8]}), teacher]
    inputs, labels = torch.randn(16, 1, 8, 8), torch.arange(16) % 10
    settings = SearchSettings(batch_size=16, seed=3)
    state = torch.random.get_rng_state()
    first = score_candidates(build, candidates, teacher, inputs, labels, settings)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's random state is left alone
    assert first == score_candidates(build, candidates, teacher, inputs, labels, settings)
    assert first[0] != first[1] and all(np.isfinite(first).ravel())
    # a trained (here: fixed) teacher is read once, in eval mode
    fixed = build(teacher).eval()
    scores = score_candidates(build, candidates, fixed, inputs, labels, SearchSettings(16, "trained"))
    assert all(np.isfinite(scores).ravel())


CANDIDATES_YAML = "- name: mlp\n  params: {hidden: [16]}\n- name: small_cnn\n  params: {channels: [8, 16]}\n"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("name: mlp\n", "expected a YAML list of student configs"),
        ("[]\n", "got an empty list"),
        ("", "got nothing"),
        ("- mlp\n", "candidates[0]: expected a mapping with name"),
        ("- name: mlp\n  parms: {}\n", "candidates[0]: parms: unknown key; did you mean 'params'?"),
        ("- params: {}\n", "candidates[0]: name: Field required"),
        ("- name: mlp\n  checkpoint: w.safetensors\n", "scored at random initialisation"),
        ("- name: [unclosed\n", "c.yaml line 2 column 1"),
        ("- &a [*a]\n", "c.yaml"),
    ],
)
def test_bad_candidate_files_are_one_line(text: str, fragment: str) -> None:
    with pytest.raises(UserError, match=None) as err:
        parse_candidates(text, "c.yaml")
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_settings_are_checked() -> None:
    with pytest.raises(UserError, match="--teacher"):
        SearchSettings(teacher="oracle")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="--batch-size"):
        SearchSettings(batch_size=1)


# ------------------------------------------------------------------------------ the command line


@pytest.fixture
def candidates_file(tmp_path: Path) -> Path:
    path = tmp_path / "candidates.yaml"
    path.write_text(CANDIDATES_YAML)
    return path


def test_search_ranks_and_writes_markdown(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path, candidates_file: Path
) -> None:
    out = tmp_path / "ranking.md"
    code, stdout, err = distill(
        monkeypatch, capsys, "search", "quickstart", "--candidates", candidates_file, "--out", out
    )
    assert code == 0, err
    assert "DisWOT search" in stdout and "small_cnn" in stdout
    text = out.read_text()
    assert text.count("\n| ") == 3 and "| 1 |" in text and "random initialisation" in text
    # without --out: search.md in a new run folder (the recipe's output.dir), listed in its manifest
    folder = tmp_path / "run"
    code, _, err = distill(
        monkeypatch, capsys, "search", "quickstart", "--candidates", candidates_file,
        "--set", f"output.dir={folder}", "--batch-size", "16", "--repeats", "2",
    )  # fmt: skip
    assert code == 0, err
    assert (folder / "search.md").is_file() and "search.md" in (folder / ".distill-run.json").read_text()
    # again: the search joins the run in that folder and replaces its own search.md
    args = ("search", "quickstart", "--candidates", candidates_file, "--set", f"output.dir={folder}")
    assert distill(monkeypatch, capsys, *args)[0] == 0
    # a search.md of the user's is never overwritten
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "search.md").write_text("my notes")
    line = refused(monkeypatch, capsys, *args[:4], "--set", f"output.dir={mine}")
    assert "is not a distill search's" in line and (mine / "search.md").read_text() == "my notes"


@pytest.mark.slow
def test_search_with_the_trained_teacher(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path, candidates_file: Path
) -> None:
    out = tmp_path / "ranking.md"
    code, _, err = distill(
        monkeypatch, capsys, "search", "quickstart", "--candidates", candidates_file, "--out", out,
        "--teacher", "trained", "--set", "teacher.train.epochs=1", "--set", f"output.dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert code == 0, err
    assert "the recipe's teacher, trained" in out.read_text()


MISUSE = [
    ([], "missing option '--candidates'"),
    (["--candidates", "{tmp}/absent.yaml"], "candidates file not found"),
    (["--candidates", "{tmp}"], "is a folder; give a YAML file"),
    (["--candidates", "{cands}", "--teacher", "oracle"], "--teacher: expected one of random, trained"),
    (["--candidates", "{cands}", "--init", "xavier"], "--init: expected one of gaussian, default"),
    (["--candidates", "{cands}", "--batch-size", "1"], "--batch-size"),
    (["--candidates", "{cands}", "--seed", "-1"], "'--seed'"),
    (["--candidates", "{cands}", "--out", "{tmp}"], "is a folder; give the markdown file"),
    (["--candidates", "{bad_model}"], "candidates[0]: unknown model 'resnet9'"),
    (["--candidates", "{bad_params}"], "candidates[0]: model 'mlp' has no parameter 'width'"),
    (["--candidates", "{cands}", "--set", "teacher=null"], "needs a teacher"),
]


@pytest.mark.parametrize(("args", "fragment"), MISUSE)
def test_search_misuse_is_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    tmp_path: Path,
    candidates_file: Path,
    args: list[str],
    fragment: str,
) -> None:
    (tmp_path / "bad_model.yaml").write_text("- name: resnet9\n")
    (tmp_path / "bad_params.yaml").write_text("- name: mlp\n  params: {width: 3}\n")
    names = {
        "tmp": tmp_path,
        "cands": candidates_file,
        "bad_model": tmp_path / "bad_model.yaml",
        "bad_params": tmp_path / "bad_params.yaml",
    }
    argv = [a.format(**names) for a in args]
    line = refused(monkeypatch, capsys, "search", "quickstart", *argv)
    assert fragment in line, line


def test_search_refuses_a_language_model_recipe(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, candidates_file: Path
) -> None:
    line = refused(monkeypatch, capsys, "search", "lm_shakespeare", "--candidates", candidates_file)
    assert "search: ranks classifiers" in line, line


# ------------------------------------------------------------------------------ the benchmark


@pytest.mark.slow
def test_benchmark_quick_mode(tmp_path: Path) -> None:
    bench = load_benchmark("search")
    out = tmp_path / "search_quick.md"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert "Kendall" in text and "parameter count (baseline)" in text and "**Finding (S18" in text
    assert (tmp_path / "search_quick.png").stat().st_size > 1000
