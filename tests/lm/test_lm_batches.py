"""The batch convention (labels shifted once, in the data), the layouts, and gradient accumulation."""

from __future__ import annotations

import torch
from lm_helpers import STUDENT, addition_rows, bpe, lm_fixture

from distill.data.text import Example, LMDataset, build_lm_data, chat_example, collate
from distill.models.causal_lm import build_causal_lm, special_token_ids
from distill.objectives import StepOutputs, build_objective
from distill.train import OptimizerConfig, ScheduleConfig, fit


def test_collate_shifts_labels_and_masks_padding() -> None:
    batch = collate(
        [Example([5, 6, 7, 8], [False, False, True, True], 2), Example([5, 9], [False, True], 1)], 0
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [5, 9, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    # logits at position t predict input_ids[t + 1]; only counted tokens have a label
    assert batch["labels"].tolist() == [[-100, 7, 8, -100], [9, -100, -100, -100]]
    assert torch.equal(batch["mask"], batch["labels"] != -100)


def test_prompt_completion_counts_completion_and_eos_only() -> None:
    tokenizer = bpe()
    data = build_lm_data(addition_rows(20), addition_rows(4, seed=1), tokenizer=tokenizer, max_length=64)
    example = data.train.examples[0]
    prompt = tokenizer(addition_rows(20)[0]["prompt"], add_special_tokens=False)["input_ids"]
    assert example.ids[0] == tokenizer.bos_token_id and example.ids[1 : 1 + len(prompt)] == prompt
    assert example.prompt_len == 1 + len(prompt)
    assert not any(example.targets[: example.prompt_len]) and all(example.targets[example.prompt_len :])
    assert example.ids[-1] == tokenizer.eos_token_id
    assert data.has_answers


def test_cross_entropy_objective_matches_the_models_own_shifted_loss() -> None:
    tokenizer = bpe()
    text = [{"text": " ".join(r["prompt"] + r["completion"] for r in addition_rows(8))}]
    data = build_lm_data(text, text, tokenizer=tokenizer, max_length=32)
    model = build_causal_lm(
        config=STUDENT, vocab_size=len(tokenizer), special_tokens=special_token_ids(tokenizer)
    )
    batch = collate(data.train.examples[:1], tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ours = build_objective("cross_entropy")(StepOutputs(logits, labels=batch["labels"], mask=batch["mask"]))
    theirs = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss  # HF shifts inside
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_chat_layout_counts_assistant_tokens_only() -> None:
    tokenizer = bpe()
    messages = [
        {"role": "user", "content": "12+30="},
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "1+1="},
        {"role": "assistant", "content": "2"},
    ]
    example = chat_example(tokenizer, messages, 128)
    counted = tokenizer.decode([t for t, c in zip(example.ids, example.targets, strict=True) if c])
    assert counted.replace(tokenizer.eos_token, "") == "422"
    assert example.reference == "2"
    assert tokenizer.decode(example.ids[: example.prompt_len]).endswith("<|assistant|>")


def test_plain_text_is_packed_into_full_blocks() -> None:
    tokenizer = bpe()
    text = " ".join(r["prompt"] + r["completion"] for r in addition_rows(60))
    data = build_lm_data([{"text": text}], None, tokenizer=tokenizer, max_length=32, test_fraction=0.2)
    assert data.layout == "text" and not data.has_answers
    assert all(len(e.ids) == 32 and all(e.targets) for e in data.train.examples)


def test_accumulation_4x2_equals_1x8_with_padding() -> None:
    data, teacher, student = lm_fixture()
    assert len(data.train) == 8 and len({len(e.ids) for e in data.train.examples}) > 2
    lengths = [e.counted for e in data.train.examples]
    assert max(lengths) > 2 * min(lengths)  # uneven counted tokens: a per-micro-batch mean would be wrong
    start = {k: v.clone() for k, v in student.state_dict().items()}
    moved = []
    for batch_size, accum in ((8, 1), (2, 4)):
        student.load_state_dict(start)
        fit(
            student,
            data.train,
            teacher=teacher,
            objectives=[("forward_kl", 1.0), ("cross_entropy", 0.5)],
            optimizer=OptimizerConfig(name="sgd", lr=1.0, momentum=0.0),
            schedule=ScheduleConfig(name="constant"),
            epochs=1,
            batch_size=batch_size,
            grad_accum=accum,
            progress=False,
            tensorboard=False,
            device="cpu",
        )
        moved.append({k: v - start[k] for k, v in student.state_dict().items()})
    for key, delta in moved[0].items():
        assert delta.abs().max() > 0 or "rotary" in key
        assert torch.allclose(delta, moved[1][key], atol=1e-6, rtol=1e-4), key


def test_token_level_objectives_run_on_masked_token_logits() -> None:
    data, teacher, student = lm_fixture()
    batch = collate(data.train.examples, data.train.pad_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        t_logits = teacher(**inputs).logits
    s_logits = student(**inputs).logits
    for name in ("forward_kl", "reverse_kl", "generalized_jsd", "taid", "adakd", "total_variation"):
        value = build_objective(name)(
            StepOutputs(s_logits, t_logits, labels=batch["labels"], mask=batch["mask"])
        )
        assert value.dim() == 0 and torch.isfinite(value), name
        (grad,) = torch.autograd.grad(value, s_logits)
        assert grad[~batch["mask"]].abs().max() == 0, name  # padding and prompts never pull on the student


def test_lm_dataset_is_a_torch_dataset_with_its_collation() -> None:
    data, _, _ = lm_fixture()
    assert isinstance(data.train, LMDataset)
    assert data.train.collate_fn([data.train[0]])["input_ids"].shape[0] == 1


def test_evaluation_batches_shrink_to_keep_large_vocabulary_logits_bounded() -> None:
    from distill.tasks.causal_lm_eval import EVAL_LOGITS_BUDGET, logits_batch_size

    assert logits_batch_size(32, 128, 1024) == 32  # small vocabularies keep the requested batch
    assert logits_batch_size(32, 512, 131072) == 1  # 1 GB of logits per sequence: one at a time
    batch = logits_batch_size(32, 512, 32768)
    assert 1 < batch < 32 and batch * 16 * 512 * 32768 <= EVAL_LOGITS_BUDGET
