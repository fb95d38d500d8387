"""Probes on internal activations (S03): split-conformal scores against float64 references written here, the
coverage guarantee checked empirically on exchangeable synthetic data (hypothesis), the linear and
multiple-instance probes on data where the answer is known, activation capture through the hook manager for
an image model and a tiny Llama; the quick benchmark (slow)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench_helpers import load_benchmark
from distill.errors import UserError
from distill.models.probes import (
    capture_features,
    conformal_threshold,
    conformity_scores,
    fit_linear_probe,
    fit_mil_probe,
    mil_bag_scores,
    prediction_sets,
    probe_layers,
    split_conformal,
)
from distill.models.zoo import SmallCNN

# ------------------------------------------------------------------------------------ conformal scores


def reference_scores(proba: np.ndarray, score: str) -> np.ndarray:
    """Each class's non-conformity by loops in float64: LAC 1 - p_y; APS the mass of the classes ranked at
    or above y (ties broken by class index, as a stable sort does)."""
    out = np.zeros_like(proba, dtype=np.float64)
    for i, row in enumerate(proba.astype(np.float64)):
        order = sorted(range(len(row)), key=lambda k: (-row[k], k))
        for rank, k in enumerate(order):
            out[i, k] = 1.0 - row[k] if score == "lac" else sum(row[j] for j in order[: rank + 1])
    return out


@pytest.mark.parametrize("score", ["lac", "aps"])
def test_scores_match_reference(score: str) -> None:
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.ones(5), size=40).astype(np.float32)
    labels = rng.integers(0, 5, size=40)
    every = conformity_scores(proba, None, score)
    np.testing.assert_allclose(every, reference_scores(proba, score), atol=1e-6)
    np.testing.assert_allclose(conformity_scores(proba, labels, score), every[np.arange(40), labels])


def test_threshold_is_the_finite_sample_quantile() -> None:
    scores = np.arange(1, 20, dtype=float)  # n = 19: rank ceil(20 * 0.9) = 18
    assert conformal_threshold(scores, 0.1) == 18.0
    assert conformal_threshold(scores[:5], 0.1) == math.inf  # rank 6 > 5: every class in every set
    with pytest.raises(UserError, match="alpha"):
        conformal_threshold(scores, 1.5)
    with pytest.raises(UserError, match="conformal score"):
        conformity_scores(np.ones((1, 2)) / 2, None, "raps")


def test_aps_sets_grow_from_the_top_class() -> None:
    """APS sets are the top-ranked classes: any non-empty set holds the most probable class, and the sets
    only grow with the threshold (1: every class)."""
    rng = np.random.default_rng(1)
    proba = rng.dirichlet(np.ones(4), size=50)
    previous = np.zeros_like(proba, dtype=bool)
    for threshold in (0.3, 0.5, 0.8, 1.0):
        sets = prediction_sets(proba, threshold, "aps")
        non_empty = sets.any(1)
        assert sets[np.arange(50), proba.argmax(1)][non_empty].all()
        assert (sets >= previous).all()
        previous = sets
    assert previous.all()


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    classes=st.integers(2, 6),
    alpha=st.sampled_from([0.05, 0.1, 0.2]),
    score=st.sampled_from(["lac", "aps"]),
    concentration=st.floats(0.2, 5.0),
)
def test_coverage_guarantee_on_exchangeable_data(
    seed: int, classes: int, alpha: float, score: str, concentration: float
) -> None:
    """Any (even a wrong) predictor: calibrated on 500 exchangeable examples, the sets cover >= 1 - alpha
    of 4000 new ones, up to sampling noise (coverage given the calibration split has std
    sqrt(alpha (1 - alpha) / n) <= 0.018; the tolerance is about 4 of them)."""
    rng = np.random.default_rng(seed)
    n_cal, n_test = 500, 4000
    proba = rng.dirichlet(np.full(classes, concentration), size=n_cal + n_test)
    # labels drawn from a tempered version of the model's probabilities: the model is miscalibrated
    truth = proba**0.5 / (proba**0.5).sum(1, keepdims=True)
    labels = (truth.cumsum(1) < rng.random((len(truth), 1))).sum(1).clip(max=classes - 1)
    report = split_conformal(
        proba[:n_cal], labels[:n_cal], proba[n_cal:], labels[n_cal:], alpha=alpha, score=score
    )
    assert report.coverage >= 1 - alpha - 0.07
    if score == "lac":  # a continuous score (APS ties at 1): no more than 1 - alpha + 1 / (n + 1) either
        assert report.coverage <= 1 - alpha + 1 / (n_cal + 1) + 0.07
    assert 0 <= report.mean_set_size <= classes


# ------------------------------------------------------------------------------------ probes


def test_linear_probe_separates_separable_classes() -> None:
    torch.manual_seed(0)
    centres = 4 * torch.randn(3, 6)
    y = torch.randint(0, 3, (300,))
    x = centres[y] + torch.randn(300, 6)
    probe = fit_linear_probe(x[:200], y[:200])
    proba = probe.predict_proba(x[200:])
    assert proba.shape == (100, 3)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-9)
    assert (proba.argmax(1) == y[200:].numpy()).mean() > 0.95


def bags_with_one_witness(n: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Bags of 4..12 noise instances; in a positive bag one instance, anywhere, is shifted by +3 on dim 0
    (the MIL assumption: the label lives in a few instances, diluted by a mean over the bag)."""
    generator = torch.Generator().manual_seed(seed)
    bags, labels = [], []
    for _ in range(n):
        size = int(torch.randint(4, 13, (1,), generator=generator))
        bag = torch.randn(size, 5, generator=generator)
        label = int(torch.randint(0, 2, (1,), generator=generator))
        if label:
            bag[int(torch.randint(0, size, (1,), generator=generator)), 0] += 3.0
        bags.append(bag)
        labels.append(label)
    return bags, torch.tensor(labels)


def test_mil_probe_finds_the_witness_instance_a_mean_pool_misses() -> None:
    train_bags, train_y = bags_with_one_witness(400, 0)
    test_bags, test_y = bags_with_one_witness(300, 1)
    mil = fit_mil_probe(train_bags, train_y, sharpness=8.0)
    mil_acc = (mil.predict_proba(test_bags).argmax(1) == test_y.numpy()).mean()
    mean = fit_linear_probe(torch.stack([b.mean(0) for b in train_bags]), train_y)
    mean_acc = (
        mean.predict_proba(torch.stack([b.mean(0) for b in test_bags])).argmax(1) == test_y.numpy()
    ).mean()
    assert mil_acc > 0.85
    assert mil_acc > mean_acc + 0.05


def test_mil_bag_scores_against_float64_reference() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    weight, bias = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    sharpness = 3.0
    got = mil_bag_scores(x, mask, weight, bias, sharpness)
    for i in range(3):
        real = x[i][mask[i]]
        for k in range(2):
            s = real @ weight[k] + bias[k]
            expected = math.log(sum(math.exp(sharpness * float(v)) for v in s) / len(s)) / sharpness
            assert math.isclose(float(got[i, k]), expected, rel_tol=1e-9, abs_tol=1e-12)
    # a very sharp smooth maximum is the maximum; padding never counts
    sharp = mil_bag_scores(x, mask, weight, bias, 1e4)
    for i in range(3):
        torch.testing.assert_close(
            sharp[i], (x[i][mask[i]] @ weight.T + bias).max(0).values, atol=1e-3, rtol=0
        )


# ------------------------------------------------------------------------------------ activation capture


def test_capture_pools_image_blocks_through_hooks() -> None:
    model = SmallCNN(num_classes=3, input_shape=(1, 8, 8), channels=(4, 6)).eval()
    layers = probe_layers(model)
    assert layers == ["features.0", "features.1", "pool"]
    x, y = torch.randn(10, 1, 8, 8), torch.randint(0, 3, (10,))
    features, labels = capture_features(model, layers, [(x[:6], y[:6]), (x[6:], y[6:])])
    assert features["features.0"].shape == (10, 4)
    assert features["features.1"].shape == (10, 6)
    torch.testing.assert_close(features["features.1"], features["pool"])  # the GAP of the last stage
    assert torch.equal(labels, y)
    with torch.no_grad():
        expected = model.features[0](x).mean(dim=(2, 3))
    torch.testing.assert_close(features["features.0"], expected)
    with pytest.raises(UserError, match="pool"):
        capture_features(model, layers, [(x, y)], pool="max")


def test_capture_token_bags_drop_padding() -> None:
    bench = load_benchmark("probes")
    torch.manual_seed(0)
    model = bench.tiny_llama(16, 2)
    layers = probe_layers(model)
    assert layers == ["model.layers.0", "model.layers.1"]
    x, mask = bench.encode(["1+2=3", "10+20=30"])
    labels = torch.tensor([1, 1])
    bags, _ = capture_features(model, layers, [(x, mask, labels)], pool="bags")
    assert [len(b) for b in bags["model.layers.1"]] == [7, 10]  # <s> + characters + </s>
    mean, _ = capture_features(model, layers, [(x, mask, labels)], pool="mean")
    last, _ = capture_features(model, layers, [(x, mask, labels)], pool="last")
    for i, bag in enumerate(bags["model.layers.1"]):
        torch.testing.assert_close(mean["model.layers.1"][i], bag.mean(0))
        torch.testing.assert_close(last["model.layers.1"][i], bag[-1])
    # right padding does not change a causal model's activations of the real tokens
    alone, _ = capture_features(model, layers, [(*bench.encode(["1+2=3"]), labels[:1])], pool="bags")
    torch.testing.assert_close(alone["model.layers.1"][0], bags["model.layers.1"][0], atol=1e-5, rtol=1e-5)


def test_capture_text_encoder_blocks_with_a_custom_forward() -> None:
    """distill's text classifier (`hf_encoder`) takes padded ids alone and cuts the batch to its longest
    text: the probe's mask is trimmed to the activations it gets."""
    from transformers import BertConfig, BertModel

    from distill.models.encoders import EncoderClassifier

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    model = EncoderClassifier(BertModel(config), 2).eval()
    layers = probe_layers(model)
    assert layers == ["encoder.embeddings", "encoder.encoder.layer.0", "encoder.encoder.layer.1", "pooled"]
    ids = torch.randint(1, 50, (3, 12))
    ids[0, 5:], ids[1, 8:], ids[2, 8:] = 0, 0, 0  # the longest text has 8 tokens: the model cuts to 8
    labels = torch.tensor([0, 1, 0])
    features, _ = capture_features(
        model, layers, [(ids, ids != 0, labels)], pool="mean", forward=lambda m, batch: m(batch[0])
    )
    assert features["encoder.encoder.layer.1"].shape == (3, 16)
    # the mean over the last block's real tokens is the classifier's own pooled input
    torch.testing.assert_close(features["encoder.encoder.layer.1"], features["pooled"])


# ------------------------------------------------------------------------------------ benchmark


@pytest.mark.slow
def test_quick_benchmark_writes_its_report(tmp_path: Path) -> None:
    bench = load_benchmark("probes")
    out = tmp_path / "probes_quick.md"
    assert bench.main(["--quick", "--seeds", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| digits | teacher | linear |" in text
    assert "| arithmetic | student | MIL (all tokens) |" in text
    assert out.with_suffix(".png").exists()
