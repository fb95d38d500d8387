"""How long a run trains: epochs, or `max_steps` optimizer steps, and an optional `max_tokens` budget.

- `epochs` (the default): whole passes over the training set.
- `max_steps`: exactly that many optimizer steps, as many epochs as that takes (the last one possibly cut);
  it replaces `epochs`, and the schedule's total steps follow it, so a cosine ends at its floor there.
- `max_tokens`: the run ends after the first optimizer step whose cumulative counted tokens (the masked
  tokens of language-model batches, summed over every process, so all processes stop at the same step)
  reach the budget. It shortens the run, never lengthens it: the schedule still spans `epochs` or
  `max_steps`.

A run that ends inside an epoch still ends like one that ends with it: the (cut) epoch is evaluated and a
checkpoint saved, and a resumed run knows from its counters (step, tokens) that nothing is left to train.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distill.errors import UserError
from distill.train.batches import split_batch


@dataclass(frozen=True)
class TrainingLength:
    epochs: int
    steps_per_epoch: int
    max_steps: int | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_steps", "max_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UserError(f"trainer.{name} must be a positive whole number, got {value!r}")

    @property
    def total_steps(self) -> int:
        """The schedule's length in optimizer steps (and the progress bar's)."""
        return self.max_steps if self.max_steps is not None else self.epochs * self.steps_per_epoch

    def budget_spent(self, step: int, tokens: int) -> bool:
        """True once `max_steps` or `max_tokens` is reached: the run ends, even inside an epoch."""
        return (self.max_steps is not None and step >= self.max_steps) or (
            self.max_tokens is not None and tokens >= self.max_tokens
        )

    def finished(self, epoch: int, step: int, tokens: int) -> bool:
        """Whether nothing is left to train (`epoch`: epochs ended so far, the last possibly cut)."""
        return self.budget_spent(step, tokens) or (self.max_steps is None and epoch >= self.epochs)

    def epoch_text(self, epoch: int) -> str:
        """The progress bar's epoch, of a known count only when epochs set the length."""
        return f"epoch {epoch + 1}" if self.max_steps is not None else f"epoch {epoch + 1}/{self.epochs}"


def new_state() -> dict[str, Any]:
    """The counters of a run that has not trained yet (what a checkpoint's `state.json` stores)."""
    return {
        "epoch": 0,  # epochs ended (the last of a run may have been cut short by its length)
        "batch": 0,  # batches of the current epoch trained on
        "step": 0,  # optimizer steps
        "tokens": 0,  # counted rows trained on, over every process (`max_tokens`)
        "history": [],  # one row per ended epoch
        "train_seconds": 0.0,
        "epoch_loss_sum": 0.0,
        "epoch_batches": 0,
    }


def refuse_tokens_without_mask(length: TrainingLength, batch: Any) -> None:
    """`max_tokens` counts masked tokens; batches without a token mask (classifiers) have none to count."""
    if length.max_tokens is not None and split_batch(batch)[2] is None:
        raise UserError(
            "trainer.max_tokens counts the tokens of language-model batches, and these batches have no token "
            "mask; give trainer.max_steps instead"
        )
