"""The policy-gradient form of reverse KL on student prefixes, checked exactly: every sequence of a tiny
vocabulary is enumerated, so expectations are sums, not samples."""

from __future__ import annotations

import itertools

import pytest
import torch

from distill.losses import reverse_kl
from distill.losses.policy_gradient import reverse_kl_pg, rewards_to_go

VOCAB, LENGTH = 3, 3
SEQUENCES = [list(y) for y in itertools.product(range(VOCAB), repeat=LENGTH)]
PREFIXES = {
    p: i
    for i, p in enumerate(
        tuple(y[:t]) for t in range(LENGTH) for y in itertools.product(range(VOCAB), repeat=t)
    )
}


def tables(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A tabular autoregressive student (one logit row per prefix, trainable) and a fixed teacher."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(len(PREFIXES), VOCAB, generator=g, dtype=torch.float64).requires_grad_(True)
    teacher = 2 * torch.randn(len(PREFIXES), VOCAB, generator=g, dtype=torch.float64)
    return student, teacher


def along(table: torch.Tensor, y: list[int]) -> torch.Tensor:
    """(1, LENGTH, VOCAB): the logits at each prefix of y."""
    return torch.stack([table[PREFIXES[tuple(y[:t])]] for t in range(LENGTH)])[None]


def seq_log_prob(table: torch.Tensor, y: list[int]) -> torch.Tensor:
    return torch.log_softmax(along(table, y)[0], -1).gather(-1, torch.tensor(y)[:, None]).sum()


def expected_grad(student: torch.Tensor, loss_of) -> torch.Tensor:
    """sum_y q(y) grad loss(y), q(y) held fixed: the expected gradient under the student's own sampling."""
    total = torch.zeros_like(student)
    for y in SEQUENCES:
        weight = seq_log_prob(student, y).exp().detach()
        (grad,) = torch.autograd.grad(loss_of(y), student)
        total += weight * grad
    return total


def pg_loss(student, teacher, discount):
    def loss(y):
        labels = torch.tensor([y])
        return reverse_kl_pg(
            along(student, y), along(teacher, y), labels=labels, discount=discount, reduction="sum"
        )

    return loss


def test_immediate_reward_equals_the_direct_token_level_reverse_kl() -> None:
    student, teacher = tables()
    direct = expected_grad(
        student, lambda y: reverse_kl(along(student, y), along(teacher, y), reduction="sum")
    )
    pg = expected_grad(student, pg_loss(student, teacher, discount=0.0))
    torch.testing.assert_close(pg, direct, rtol=1e-9, atol=1e-12)


def test_reward_to_go_equals_the_sequence_level_reverse_kl() -> None:
    student, teacher = tables(1)
    kl_seq = sum(
        seq_log_prob(student, y).exp() * (seq_log_prob(student, y) - seq_log_prob(teacher, y))
        for y in SEQUENCES
    )
    (exact,) = torch.autograd.grad(kl_seq, student)
    pg = expected_grad(student, pg_loss(student, teacher, discount=1.0))
    torch.testing.assert_close(pg, exact, rtol=1e-9, atol=1e-12)
    # and the two forms differ: the sequence-level gradient also moves the prefixes' probabilities
    immediate = expected_grad(student, pg_loss(student, teacher, discount=0.0))
    assert (immediate - exact).abs().max() > 1e-3


def test_sequence_kl_decomposes_into_token_kls_on_student_prefixes() -> None:
    student, teacher = tables(2)
    with torch.no_grad():
        kl_seq = sum(
            seq_log_prob(student, y).exp() * (seq_log_prob(student, y) - seq_log_prob(teacher, y))
            for y in SEQUENCES
        )
        # sum_t E_{y<t ~ q} KL_t: every full sequence weighs its prefixes by their marginal probability
        tokens = sum(
            seq_log_prob(student, y).exp() * reverse_kl(along(student, y), along(teacher, y), reduction="sum")
            for y in SEQUENCES
        )
        value = sum(seq_log_prob(student, y).exp() * pg_loss(student, teacher, 0.0)(y) for y in SEQUENCES)
    torch.testing.assert_close(tokens, kl_seq)
    torch.testing.assert_close(value, kl_seq)  # the loss's value estimates the KL, unbiasedly


def test_rewards_to_go_skip_positions_that_do_not_count() -> None:
    rewards = torch.tensor([[1.0, 5.0, 2.0, 3.0]])
    mask = torch.tensor([[True, False, True, True]])
    out = rewards_to_go(rewards * mask, mask, 0.5)
    torch.testing.assert_close(out, torch.tensor([[1.0 + 0.5 * (2 + 0.5 * 3), 0.0, 2 + 0.5 * 3, 3.0]]))


def test_bad_discount_is_refused() -> None:
    logits = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="discount"):
        reverse_kl_pg(logits, logits, labels=torch.zeros(1, 2, dtype=torch.long), discount=1.5)
