"""`distill.losses.transitions.transition_alignment` (S34 Align-TI's TPA) against float64 maths written out
here pair by pair; its limit (top_k = V, KL: the sum of the two positions' forward KLs); hypothesis
properties (zero at the teacher, non-negative, masked positions change nothing); gradcheck; -inf logits;
and the `tpa` objective's parameter checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.errors import UserError
from distill.losses import forward_kl
from distill.losses.transitions import transition_alignment
from distill.objectives import StepOutputs, build_objective

torch.set_num_threads(1)


def _logits(*shape: int, seed: int = 0, scale: float = 3.0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def _bucketed(p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    rest = torch.ones_like(p, dtype=torch.bool)
    rest[ids] = False
    return torch.cat([p[ids], p[rest].sum()[None]])


def _reference(student, teacher, mask, k, temperature, divergence) -> torch.Tensor:
    """(B, T) per-pair values, written out pair by pair in float64 with explicit outer products."""
    b, t_len, _ = student.shape
    out = torch.zeros(b, t_len, dtype=torch.float64)
    for i in range(b):
        for t in range(1, t_len):
            if mask is not None and not (mask[i, t] and mask[i, t - 1]):
                continue
            cells = []
            for model in (teacher, student):
                joint_parts = []
                for pos in (t - 1, t):
                    ids = torch.softmax(teacher[i, pos].double() / temperature, -1).argsort(descending=True)[
                        :k
                    ]
                    p = torch.softmax(model[i, pos].double() / temperature, -1)
                    joint_parts.append(_bucketed(p, ids))
                cells.append(torch.outer(joint_parts[0], joint_parts[1]).flatten())
            jt, js = cells
            if divergence == "kl":
                keep = jt > 0
                out[i, t] = (jt[keep] * (jt[keep].log() - js[keep].log())).sum()
            else:
                out[i, t] = 0.5 * (jt - js).abs().sum()
    return out


@pytest.mark.parametrize("divergence", ["tvd", "kl"])
@pytest.mark.parametrize("k,temperature", [(1, 1.0), (3, 2.0), (9, 0.5)])
def test_against_the_float64_reference(divergence: str, k: int, temperature: float) -> None:
    s, t = _logits(2, 5, 9, seed=1), _logits(2, 5, 9, seed=2)
    mask = torch.tensor([[True, True, False, True, True], [False, True, True, True, True]])
    ref = _reference(s, t, mask, k, temperature, divergence)
    got = transition_alignment(
        s, t, mask=mask, top_k=k, temperature=temperature, divergence=divergence, reduction="none"
    )
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    n_pairs = 5  # (0,1) (3,4) in row 0; (1,2) (2,3) (3,4) in row 1
    mean = transition_alignment(s, t, mask=mask, top_k=k, temperature=temperature, divergence=divergence)
    torch.testing.assert_close(mean, ref.sum() / n_pairs)
    total = transition_alignment(
        s, t, mask=mask, top_k=k, temperature=temperature, divergence=divergence, reduction="sum"
    )
    torch.testing.assert_close(total, ref.sum())


def test_kl_with_every_token_is_the_sum_of_the_two_positions_kls() -> None:
    s, t = _logits(3, 6, 7, seed=3), _logits(3, 6, 7, seed=4)
    got = transition_alignment(s, t, top_k=7, divergence="kl", reduction="sum")
    want = forward_kl(s[:, :-1], t[:, :-1], reduction="sum") + forward_kl(s[:, 1:], t[:, 1:], reduction="sum")
    torch.testing.assert_close(got, want)


def test_float32_math_for_half_inputs() -> None:
    s, t = _logits(2, 4, 11, seed=5, dtype=torch.bfloat16), _logits(2, 4, 11, seed=6, dtype=torch.bfloat16)
    got = transition_alignment(s, t, top_k=4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, transition_alignment(s.float(), t.float(), top_k=4))


def test_minus_inf_logits_where_both_models_have_them() -> None:
    s, t = _logits(2, 4, 6, seed=7), _logits(2, 4, 6, seed=8)
    s[..., 4:] = -torch.inf
    t[..., 4:] = -torch.inf
    s.requires_grad_(True)
    for divergence in ("kl", "tvd"):
        for k in (2, 5, 6):  # 5 and 6 pick -inf cells, 6 leaves an empty tail
            value = transition_alignment(s, t, top_k=k, divergence=divergence)
            (grad,) = torch.autograd.grad(value, s)
            assert torch.isfinite(value) and torch.isfinite(grad).all()
    finite = transition_alignment(s[..., :4].detach(), t[..., :4], top_k=4, divergence="kl")
    torch.testing.assert_close(transition_alignment(s.detach(), t, top_k=6, divergence="kl"), finite)


def test_no_counted_pair_gives_zero_and_short_sequences() -> None:
    s, t = _logits(2, 3, 5, seed=9), _logits(2, 3, 5, seed=10)
    lonely = torch.tensor([[True, False, True], [False, True, False]])
    assert transition_alignment(s, t, mask=lonely).item() == 0.0
    assert transition_alignment(s[:, :1], t[:, :1]).item() == 0.0
    assert transition_alignment(s[:, :0], t[:, :0], reduction="none").shape == (2, 0)


def test_gradcheck() -> None:
    s = _logits(2, 4, 5, seed=11, scale=1.0).requires_grad_(True)
    t = _logits(2, 4, 5, seed=12, scale=1.0).requires_grad_(True)
    mask = torch.tensor([[True, True, True, False], [True, False, True, True]])
    for divergence in ("kl", "tvd"):
        assert torch.autograd.gradcheck(
            lambda a, b, d=divergence: transition_alignment(
                a, b, mask=mask, top_k=2, divergence=d, temperature=1.5
            ),
            (s, t),
        )


def test_bad_arguments() -> None:
    s = _logits(1, 3, 4)
    with pytest.raises(ValueError, match="top_k"):
        transition_alignment(s, s, top_k=0)
    with pytest.raises(ValueError, match="divergence"):
        transition_alignment(s, s, divergence="js")
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        transition_alignment(s[0], s[0])


sequences = st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(2, 8))


@settings(max_examples=25, deadline=None)
@given(
    shape=sequences,
    seed=st.integers(0, 2**16),
    k=st.integers(1, 9),
    divergence=st.sampled_from(["kl", "tvd"]),
)
def test_hypothesis_properties(shape: tuple[int, int, int], seed: int, k: int, divergence: str) -> None:
    s, t = _logits(*shape, seed=seed), _logits(*shape, seed=seed + 1)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape[:2], generator=g) < 0.7
    kwargs = {"mask": mask, "top_k": k, "divergence": divergence}
    assert transition_alignment(t, t, **kwargs).abs().item() < 1e-12  # zero at the teacher
    per_pair = transition_alignment(s, t, reduction="none", **kwargs)
    assert (per_pair >= -1e-12).all()  # non-negative
    # masked positions change nothing: scramble their logits (both models) and get the same values
    noise = _logits(*shape, seed=seed + 2, scale=50.0)
    hidden = (~mask)[..., None]
    s2, t2 = torch.where(hidden, noise, s), torch.where(hidden, -noise, t)
    torch.testing.assert_close(transition_alignment(s2, t2, reduction="none", **kwargs), per_pair)


def test_the_objective() -> None:
    s, t = _logits(2, 5, 7, seed=13, dtype=torch.float32), _logits(2, 5, 7, seed=14, dtype=torch.float32)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    objective = build_objective("tpa", {"top_k": 3, "divergence": "kl", "temperature": 2.0})
    value = objective(StepOutputs(student_logits=s, teacher_logits=t, mask=mask))
    torch.testing.assert_close(
        value, transition_alignment(s, t, mask=mask, top_k=3, divergence="kl", temperature=2.0)
    )
    for params, message in (
        ({"top_k": 0}, "params.top_k"),
        ({"top_k": True}, "params.top_k"),
        ({"temperature": 0}, "params.temperature"),
        ({"divergence": "js"}, "params.divergence"),
        ({"topk": 3}, "did you mean 'top_k'"),
    ):
        with pytest.raises(UserError, match=message):
            build_objective("tpa", params)
    with pytest.raises(UserError, match="teacher's full logits"):
        objective(StepOutputs(student_logits=s))
