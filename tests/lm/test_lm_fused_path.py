"""The trainer's fused large-vocabulary path (hidden states + output layer) against the dense logits path."""

from __future__ import annotations

import warnings

import pytest
import torch
from lm_helpers import lm_fixture

from distill.data.text import collate
from distill.errors import UserError
from distill.heads import head_inputs, hidden_only, logits_come_from_layer, output_layer
from distill.losses.sparse import topk_targets
from distill.objectives import StepOutputs, build_objective
from distill.train import OptimizerConfig, ScheduleConfig, fit

FUSED_OBJECTIVES = [
    ("forward_kl", {}),
    ("forward_kl", {"temperature": 2.0}),
    ("reverse_kl", {"temperature": 0.5}),
    ("hinton_kd", {}),  # T = 4 by default, times T^2
    ("generalized_jsd", {"beta": 0.3}),
    ("total_variation", {}),
    ("skew_forward_kl", {"alpha": 0.2}),
    ("skew_reverse_kl", {}),
    ("cross_entropy", {}),
    ("cross_entropy", {"label_smoothing": 0.1}),
]


def _batch(data):
    batch = collate(data.train.examples, data.train.pad_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    return inputs, batch


def _dense_and_fused(objective, teacher, student, inputs, batch, teacher_topk=None):
    """The objective's value and student gradients on the dense logits and on the fused path."""
    results = []
    for fused in (False, True):
        student.zero_grad()
        with torch.no_grad():
            t_logits = None if teacher_topk is not None else teacher(**inputs).logits
        if fused:
            s_layer, t_layer = output_layer(student), output_layer(teacher)
            with hidden_only(s_layer) as kept:
                s_logits = student(**inputs).logits
            student_head = head_inputs(student, s_layer, kept, detach=False)
            teacher_head = None
            if teacher_topk is None:
                with torch.inference_mode(), hidden_only(t_layer) as t_kept:
                    teacher(**inputs)
                teacher_head = head_inputs(teacher, t_layer, t_kept, detach=True)
            outputs = StepOutputs(
                s_logits,
                labels=batch["labels"],
                mask=batch["mask"],
                student_head=student_head,
                teacher_head=teacher_head,
                teacher_topk=teacher_topk,
            )
            assert s_logits.shape[-2] == 0  # the logits were never built
        else:
            s_logits = student(**inputs).logits
            outputs = StepOutputs(
                s_logits, t_logits, labels=batch["labels"], mask=batch["mask"], teacher_topk=teacher_topk
            )
        value = objective(outputs)
        value.backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        results.append((value.detach(), grads))
    return results


@pytest.mark.parametrize(("name", "params"), FUSED_OBJECTIVES, ids=lambda v: str(v))
def test_fused_objective_equals_dense_value_and_gradients(name, params) -> None:
    data, teacher, student = lm_fixture()
    inputs, batch = _batch(data)
    objective = build_objective(name, params)
    assert objective.fused_capable
    (dense, dense_grads), (fused, fused_grads) = _dense_and_fused(objective, teacher, student, inputs, batch)
    assert torch.allclose(fused, dense, rtol=1e-5, atol=1e-6), (fused, dense)
    assert dense_grads.keys() == fused_grads.keys()
    for key, grad in dense_grads.items():
        assert torch.allclose(fused_grads[key], grad, rtol=1e-4, atol=1e-6), key


def test_fused_objective_with_padding_only_vocabulary_rows_and_bf16_teacher() -> None:
    data, teacher, student = lm_fixture(extra_teacher_rows=8, teacher_dtype=torch.bfloat16)
    inputs, batch = _batch(data)
    objective = build_objective("generalized_jsd", {"beta": 0.5})
    (dense, dense_grads), (fused, fused_grads) = _dense_and_fused(objective, teacher, student, inputs, batch)
    assert torch.allclose(fused, dense, rtol=1e-5, atol=1e-6)
    for key, grad in dense_grads.items():
        assert torch.allclose(fused_grads[key], grad, rtol=1e-4, atol=1e-6), key


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "generalized_jsd", "total_variation"])
def test_fused_objective_on_cached_topk_targets_equals_the_dense_bucket_path(name) -> None:
    data, teacher, student = lm_fixture()
    inputs, batch = _batch(data)
    with torch.no_grad():
        counted = teacher(**inputs).logits[batch["mask"]]
    targets = topk_targets(counted, k=16)
    objective = build_objective(name)
    results = _dense_and_fused(objective, teacher, student, inputs, batch, teacher_topk=targets)
    (dense, dense_grads), (fused, fused_grads) = results
    assert torch.allclose(fused, dense, rtol=1e-5, atol=1e-6), (fused, dense)
    for key, grad in dense_grads.items():
        assert torch.allclose(fused_grads[key], grad, rtol=1e-4, atol=1e-6), key


def _train(student, teacher, data, objectives, **settings):
    return fit(
        student,
        data.train,
        teacher=teacher,
        objectives=objectives,
        optimizer=OptimizerConfig(name="sgd", lr=0.5, momentum=0.0),
        schedule=ScheduleConfig(name="constant"),
        epochs=2,
        batch_size=4,
        progress=False,
        tensorboard=False,
        device="cpu",
        **settings,
    )


def test_training_on_the_fused_path_equals_the_dense_path() -> None:
    data, teacher, student = lm_fixture()
    start = {k: v.clone() for k, v in student.state_dict().items()}
    objectives = [("forward_kl", 1.0), ("cross_entropy", 0.5)]
    results, weights = {}, {}
    for mode in ("off", "auto"):
        student.load_state_dict(start)
        results[mode] = _train(student, teacher, data, objectives, grad_accum=2, fused_loss=mode)
        weights[mode] = {k: v.clone() for k, v in student.state_dict().items()}
    assert results["off"].loss_path == "dense" and results["auto"].loss_path == "fused"
    for key, value in weights["off"].items():
        assert torch.allclose(weights["auto"][key], value, rtol=1e-4, atol=1e-6), key
    assert results["auto"].final["train_loss"] == pytest.approx(results["off"].final["train_loss"], rel=1e-4)


def test_objectives_that_need_logits_keep_the_dense_path_and_on_says_why() -> None:
    data, teacher, student = lm_fixture()
    result = _train(student, teacher, data, [("taid", 1.0)])
    assert result.loss_path == "dense"
    with pytest.raises(UserError, match="fused_loss is 'on' but objective taid needs the full logits"):
        _train(student, teacher, data, [("taid", 1.0), ("forward_kl", 1.0)], fused_loss="on")


class _SoftCapped(torch.nn.Module):
    """A causal LM that post-processes its logits (as Gemma 2 soft-caps them): not its output layer's."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.inner.get_output_embeddings()

    def forward(self, **inputs):
        output = self.inner(**inputs)
        output.logits = 5.0 * torch.tanh(output.logits / 5.0)
        return output


def test_a_model_whose_logits_are_not_its_output_layer_fails_the_probe() -> None:
    data, teacher, student = lm_fixture()
    inputs, _ = _batch(data)
    capped = _SoftCapped(teacher)
    assert logits_come_from_layer(teacher, output_layer(teacher), inputs)
    assert not logits_come_from_layer(capped, output_layer(capped), inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _train(student, capped, data, [("forward_kl", 1.0)])
    assert result.loss_path == "dense"
    assert any("teacher logits are not its output layer" in str(w.message) for w in caught)
    with pytest.raises(UserError, match="fused_loss is 'on' but the teacher logits are not"):
        _train(student, capped, data, [("forward_kl", 1.0)], fused_loss="on")


def test_fused_path_under_bf16_autocast_trains_like_the_dense_path() -> None:
    data, teacher, student = lm_fixture()
    start = {k: v.clone() for k, v in student.state_dict().items()}
    results = {}
    for mode in ("off", "auto"):
        student.load_state_dict(start)
        results[mode] = _train(
            student, teacher, data, [("forward_kl", 1.0), ("cross_entropy", 0.5)],
            mixed_precision="bf16", fused_loss=mode,
        )  # fmt: skip
    assert results["auto"].loss_path == "fused"
    fused, dense = results["auto"].final["train_loss"], results["off"].final["train_loss"]
    # the dense path rounds its logits to bf16 under autocast; the fused one multiplies in float32
    assert fused == pytest.approx(dense, rel=2e-2)


@pytest.mark.slow
def test_step_benchmark_quick_mode_measures_both_paths_with_equal_losses(tmp_path) -> None:
    """`benchmarks/lm_fused_step.py --quick`: every cell ran in its own process, on the path it names, and
    the dense and fused first-step losses agree."""
    from bench_helpers import load_benchmark

    bench = load_benchmark("lm_fused_step")
    out = tmp_path / "step.md"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| 4096 |")]
    assert len(rows) == 2 * len(bench.OBJECTIVES)
    for dense, fused in zip(rows[::2], rows[1::2], strict=True):
        assert "(dense)" in dense[2] and "(fused)" in fused[2]
        assert float(fused[6]) == pytest.approx(float(dense[6]), rel=1e-5)  # first-step loss
