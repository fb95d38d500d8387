"""Modulation recognition (S01, ClST + SKD): the synthetic signal generator's properties (RRC filter,
unit-power constellations, measured SNR, determinism, balance), the 1-D teacher and students, the packaged
recipe, and the quick benchmark (slow)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench_helpers import load_benchmark
from distill.data import build_data
from distill.data.signals import (
    LINEAR,
    MODULATIONS,
    SNRS_DB,
    ChannelSettings,
    accuracy_by_snr,
    add_noise,
    clean_frame,
    constellation,
    make_split,
    rrc_taps,
)
from distill.errors import UserError
from distill.models import build_model, count_parameters
from distill.recipe.load import load_recipe

SMALL = {"train_per_class_per_snr": 2, "val_per_class_per_snr": 1, "test_per_class_per_snr": 1}

# ------------------------------------------------------------------------------------ the generator


@settings(max_examples=25, deadline=None)
@given(rolloff=st.floats(0.05, 1.0), sps=st.integers(2, 16), span=st.integers(6, 16))
def test_rrc_has_unit_energy_and_no_isi_after_the_matched_filter(rolloff: float, sps: int, span: int) -> None:
    taps = rrc_taps(rolloff, sps, span)
    assert np.sum(taps**2) == pytest.approx(1.0, abs=1e-12)
    assert np.allclose(taps, taps[::-1])  # symmetric: linear phase
    raised_cosine = np.convolve(taps, taps)
    centre = len(taps) - 1
    assert raised_cosine[centre] == pytest.approx(1.0, abs=1e-12)
    # Zero ISI at every nonzero multiple of the symbol period (up to the truncation of the filter's tails).
    others = raised_cosine[centre % sps :: sps]
    others = np.delete(others, centre // sps)
    assert np.max(np.abs(others)) < 0.02 + 0.5 / span  # small roll-offs have long tails: truncation shows


def test_default_rrc_isi_is_small() -> None:
    """The generator's filter (roll-off 0.35, 8 samples per symbol, 8 symbols): residual ISI ~1%."""
    taps = rrc_taps(0.35, 8, 8)
    raised_cosine = np.convolve(taps, taps)
    at_symbols = raised_cosine[len(taps) - 1 :: 8]
    assert at_symbols[0] == pytest.approx(1.0) and np.max(np.abs(at_symbols[1:])) < 0.015


def test_rrc_special_points_match_the_limit_of_the_formula() -> None:
    """h(0) and h(1 / (4 b)) are limits of the formula: the closed forms agree with it a hair away."""
    rolloff, sps = 0.25, 8  # 1 / (4 b) = 1 symbol = sample 8: a pole of the general formula

    def formula(t: float, b: float = rolloff) -> float:
        return (math.sin(math.pi * t * (1 - b)) + 4 * b * t * math.cos(math.pi * t * (1 + b))) / (
            math.pi * t * (1 - (4 * b * t) ** 2)
        )

    taps = rrc_taps(rolloff, sps, 8)
    scale = taps[len(taps) // 2] / (1 - rolloff + 4 * rolloff / math.pi)  # the unit-energy normalisation
    assert taps[len(taps) // 2 + sps] / scale == pytest.approx(formula(1 + 1e-7), rel=1e-5)
    assert taps[len(taps) // 2] / scale == pytest.approx(formula(1e-9), rel=1e-6)


@pytest.mark.parametrize("name", LINEAR)
def test_constellations_have_unit_average_power(name: str) -> None:
    points = constellation(name)
    assert np.mean(np.abs(points) ** 2) == pytest.approx(1.0, abs=1e-12)
    assert len(np.unique(np.round(points, 9))) == len(points)
    expected = {"BPSK": 2, "QPSK": 4, "8PSK": 8, "16QAM": 16, "64QAM": 64, "PAM4": 4}[name]
    assert len(points) == expected


@pytest.mark.parametrize("name", MODULATIONS)
def test_clean_frames_have_about_unit_power_and_fsk_a_constant_envelope(name: str) -> None:
    rng = np.random.default_rng(0)
    settings_ = ChannelSettings()
    rrc = rrc_taps(settings_.rolloff, settings_.sps, settings_.span)
    frames = [clean_frame(name, settings_, rng, rrc) for _ in range(200)]
    assert all(f.shape == (settings_.length,) for f in frames)
    assert np.mean([np.mean(np.abs(f) ** 2) for f in frames]) == pytest.approx(1.0, abs=0.1)
    if name in ("GFSK", "CPFSK"):
        assert np.allclose(np.abs(np.stack(frames)), 1.0)


@pytest.mark.parametrize("snr_db", [-20, -6, 0, 10, 18])
def test_measured_snr_matches_the_requested_one(snr_db: int) -> None:
    rng = np.random.default_rng(1)
    settings_ = ChannelSettings()
    rrc = rrc_taps(settings_.rolloff, settings_.sps, settings_.span)
    measured = []
    for name in MODULATIONS:
        for _ in range(40):
            clean = clean_frame(name, settings_, rng, rrc)
            noise = add_noise(clean, snr_db, rng) - clean
            measured.append(10 * math.log10(np.mean(np.abs(clean) ** 2) / np.mean(np.abs(noise) ** 2)))
    # Per frame the noise power is estimated from 128 samples (about +-0.4 dB); the mean is unbiased to ~0.05.
    assert np.mean(measured) == pytest.approx(snr_db, abs=0.15)
    assert np.max(np.abs(np.array(measured) - snr_db)) < 2.0


def test_splits_are_balanced_by_class_and_snr_and_keep_each_frames_snr() -> None:
    data = build_data("signals", **SMALL)
    assert data.input_shape == (2, 128) and data.num_classes == len(MODULATIONS)
    for split, per_cell in ((data.train, 2), (data.test, 1)):
        frames, labels = split.tensors
        assert frames.shape == (len(MODULATIONS) * len(SNRS_DB) * per_cell, 2, 128)
        assert frames.dtype == torch.float32 and torch.isfinite(frames).all()
        counts = torch.bincount(labels * len(SNRS_DB) + (split.snr.long() - SNRS_DB[0]) // 2)
        assert counts.tolist() == [per_cell] * (len(MODULATIONS) * len(SNRS_DB))
        # Each frame is scaled to unit average power (normalise: true).
        assert torch.allclose(frames.pow(2).sum(1).mean(-1), torch.ones(len(frames)), atol=1e-4)


def test_generation_is_deterministic_by_seed_and_splits_differ() -> None:
    # Past the in-process cache of splits: two fresh draws from one seed are equal.
    fresh = [make_split.__wrapped__(1, 7, ChannelSettings()) for _ in range(2)]
    assert torch.equal(fresh[0].tensors[0], fresh[1].tensors[0]) and torch.equal(fresh[0].snr, fresh[1].snr)
    first, again = build_data("signals", **SMALL, seed=3), build_data("signals", **SMALL, seed=3)
    other = build_data("signals", **SMALL, seed=4)
    assert torch.equal(first.train.tensors[0], again.train.tensors[0])
    assert torch.equal(first.test.tensors[0], again.test.tensors[0])
    assert not torch.equal(first.train.tensors[0], other.train.tensors[0])
    assert not torch.equal(first.train.tensors[0][: len(first.test)], first.test.tensors[0])
    validation = build_data("signals", **SMALL, seed=3, holdout="validation")
    assert torch.equal(validation.train.tensors[0], first.train.tensors[0])  # the same training frames
    assert not torch.equal(validation.test.tensors[0], first.test.tensors[0])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"holdout": "train"}, "holdout must be one of"),
        ({"train_per_class_per_snr": 0}, "positive whole number"),
        ({"snr_min": 10, "snr_max": 0}, "below snr_min"),
        ({"max_cfo": 0.7}, "max_cfo"),
        ({"rolloff": 0.0}, "rolloff"),
    ],
)
def test_bad_settings_end_in_one_line(params: dict[str, object], message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_data("signals", **{**SMALL, **params})


def test_accuracy_by_snr() -> None:
    predictions = torch.tensor([0, 1, 1, 2, 0, 0])
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    snr = torch.tensor([-2.0, -2.0, 4.0, 4.0, 10.0, 10.0])
    assert accuracy_by_snr(predictions, labels, snr) == {-2.0: 1.0, 4.0: 0.5, 10.0: 0.5}


# ------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("name", ["clst", "kd_cnn", "kd_mobilenet"])
def test_models_read_iq_frames_and_train(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=8, input_shape=(2, 128))
    x, y = torch.randn(4, 2, 128), torch.tensor([0, 1, 2, 3])
    logits = model(x)
    assert logits.shape == (4, 8) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, y).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(UserError, match="reads \\(channels, length\\)"):
        build_model(name, num_classes=8, input_shape=(1, 8, 8))


def test_clst_stem_and_stage_lists() -> None:
    with_stem = build_model("clst", num_classes=8, input_shape=(2, 128), stem=8)
    assert with_stem(torch.randn(2, 2, 128)).shape == (2, 8)
    with pytest.raises(UserError, match="stem must be"):
        build_model("clst", num_classes=8, input_shape=(2, 128), stem=-1)
    with pytest.raises(UserError, match="one entry per stage"):
        build_model("clst", num_classes=8, input_shape=(2, 128), widths=[16, 32])
    with pytest.raises(UserError, match="not divisible by heads"):
        build_model("clst", num_classes=8, input_shape=(2, 128), widths=[24, 48, 63])


def test_clst_attention_branches_both_contribute() -> None:
    """PSCA sums a spatial (time x time) and a channel (C x C) attention: each changes the output."""
    from distill.models.signals import ParallelSpatialChannelAttention

    torch.manual_seed(0)
    attention = ParallelSpatialChannelAttention(8, 2, 3).eval()
    x = torch.randn(2, 16, 8)
    full = attention(x)
    q, k, v = attention.query(x), attention.key(x), attention.value(x)
    spatial = (
        torch.nn.functional.scaled_dot_product_attention(
            q.view(2, 16, 2, 4).transpose(1, 2),
            k.view(2, 16, 2, 4).transpose(1, 2),
            v.view(2, 16, 2, 4).transpose(1, 2),
        )
        .transpose(1, 2)
        .reshape(2, 16, 8)
    )
    channel = (torch.softmax(q.transpose(1, 2) @ k / 4.0, -1) @ v.transpose(1, 2)).transpose(1, 2)
    assert torch.allclose(full, attention.out(spatial + channel), atol=1e-6)
    assert not torch.allclose(full, attention.out(spatial), atol=1e-3)
    assert not torch.allclose(full, attention.out(channel), atol=1e-3)


def test_packaged_recipe_students_are_at_least_5x_smaller_than_the_teacher() -> None:
    bench = load_benchmark("signals")
    recipe = load_recipe("signals")
    assert recipe.data.name == "signals" and recipe.teacher is not None and recipe.teacher.name == "clst"
    teacher = build_model("clst", num_classes=8, input_shape=(2, 128), **recipe.teacher.params)
    for student, params in bench.STUDENT_PARAMS.items():
        model = build_model(student, num_classes=8, input_shape=(2, 128), **params)
        assert count_parameters(teacher) >= 5 * count_parameters(model), student
    assert recipe.student.params == bench.STUDENT_PARAMS[recipe.student.name]


@pytest.mark.slow
def test_quick_benchmark_writes_its_own_file(tmp_path: Path) -> None:
    bench = load_benchmark("signals")
    out = tmp_path / "signals_quick.md"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert "teacher (ClST)" in text and "KD-MobileNet + SKD" in text and "MFLOPs" in text
    assert (tmp_path / "signals_quick.png").stat().st_size > 0
    with pytest.raises(SystemExit) as stop:
        bench.main(["--quick", "--out", str(Path(bench.__file__).parent / "results" / "signals.md")])
    assert stop.value.code == 2
