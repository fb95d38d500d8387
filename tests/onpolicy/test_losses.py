"""The on-policy losses on small fixtures: OPSD's alignment of the privileged pass, SODA's DPO term, TSD-KD's
re-ranking loss."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lm"))
from lm_helpers import STUDENT, addition_rows, bpe  # noqa: E402

from distill.data.text import build_lm_data  # noqa: E402
from distill.errors import UserError  # noqa: E402
from distill.losses.preference import soda_loss  # noqa: E402
from distill.losses.tsd import early_entropy_positions, tsd_indirect  # noqa: E402
from distill.models.causal_lm import build_causal_lm, special_token_ids  # noqa: E402
from distill.objectives import Progress, StepOutputs, build_objective  # noqa: E402
from distill.sources.batching import PromptAwareDataset  # noqa: E402
from distill.sources.context import privileged_prompts  # noqa: E402
from distill.sources.opsd import OPSDRollouts, PrivilegedTeacher  # noqa: E402
from distill.sources.rollouts import RolloutSettings, StudentRollouts  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    rows = addition_rows(12)
    data = build_lm_data(rows[:8], rows[8:], tokenizer=bpe(rows), layout="prompt_completion", max_length=48)
    torch.manual_seed(0)
    model = build_causal_lm(
        config={**STUDENT, "max_position_embeddings": 128},
        vocab_size=len(data.tokenizer),
        special_tokens=special_token_ids(data.tokenizer),
    )
    dataset = PromptAwareDataset(data.train)
    return data, model, dataset.collate_fn([dataset[i] for i in range(8)])


def _opsd_loss(data, model, batch, contexts):
    privileged = PrivilegedTeacher(contexts, data.train.pad_id)
    rollouts = StudentRollouts(RolloutSettings(), data.tokenizer, data.train.pad_id, run_seed=0)
    new = OPSDRollouts(rollouts, privileged)(batch, model, Progress(0, 1, 0.0))
    objective = build_objective("opsd", {"divergence": "forward_kl"}).bind(privileged)
    with torch.no_grad():
        logits = model(input_ids=new["input_ids"], attention_mask=new["attention_mask"]).logits
    outputs = StepOutputs(logits, labels=new["labels"], mask=new["mask"])
    return objective(outputs), privileged


def test_opsd_aligns_the_privileged_pass_with_the_completion(setup) -> None:
    data, model, batch = setup
    prompts = [e.ids[: e.prompt_len] for e in data.train.examples]
    # a "privileged" context that is the prompt itself: the teacher pass is the student pass, the loss 0
    same, privileged = _opsd_loss(data, model, batch, prompts)
    assert same.item() == pytest.approx(0.0, abs=1e-5) and privileged.calls == 1
    contexts = privileged_prompts(data.tokenizer, data.train.examples, "{prompt}{solution}\n{prompt}")
    assert all(len(c) > len(p) for c, p in zip(contexts, prompts, strict=True))
    shown, _ = _opsd_loss(data, model, batch, contexts)
    assert shown.item() > 1e-7  # the solution in context changes the (random) model's predictions a little


def test_opsd_without_its_source_is_one_line() -> None:
    objective = build_objective("opsd")
    with pytest.raises(UserError, match="needs source 'opsd'"):
        objective(StepOutputs(torch.zeros(1, 2, 3), labels=torch.zeros(1, 2, dtype=torch.long)))
    with pytest.raises(UserError, match="divergence"):
        build_objective("opsd", {"divergence": "cosine"})


def test_soda_is_sft_plus_dpo() -> None:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(4, 3, 5, generator=g, requires_grad=True)
    reference = torch.randn(4, 3, 5, generator=g)
    labels = torch.randint(0, 5, (4, 3), generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    value = soda_loss(student, reference, labels=labels, mask=mask, beta=0.5, sft_weight=2.0)

    def seq(logits):
        return (torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1) * mask).sum(-1)

    ratio = seq(student) - seq(reference)
    dpo = -F.logsigmoid(0.5 * (ratio[0::2] - ratio[1::2])).mean()
    sft = -seq(student)[0::2].sum() / mask[0::2].sum()
    torch.testing.assert_close(value, 2.0 * sft + dpo)
    same = soda_loss(reference, reference, labels=labels, mask=mask, sft_weight=0.0)
    torch.testing.assert_close(same, torch.tensor(2.0).log())  # policy = reference: -log sigmoid(0)


def test_tsd_indirect_rewards_the_teachers_order() -> None:
    teacher = torch.arange(6.0).repeat(2, 4, 1)
    agree = tsd_indirect(10 * teacher, teacher, top_k=4, entropy_fraction=1.0)
    disagree = tsd_indirect(-10 * teacher, teacher, top_k=4, entropy_fraction=1.0)
    assert agree.item() < 1e-3 < 30 < disagree.item()


def test_tsd_indirect_keeps_the_early_high_entropy_positions() -> None:
    entropy = torch.tensor([[4.0, 1.0, 1.0, 4.0], [0.5, 0.5, 0.5, 0.5]])
    mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    kept = early_entropy_positions(entropy, mask, 0.3)
    assert kept.tolist() == [[False, True, True, False], [True, True, False, False]]
