"""The real encoder pair the encoder objectives' tests build on: all-MiniLM-L6-v2 (the teacher) and a fresh
2-layer, 128-wide BERT student over its vocabulary, with a batch of right-padded token ids."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from data_helpers import missing_data
from distill.errors import UserError
from distill.models import build_model

STUDENT_CONFIG = {
    "num_hidden_layers": 2,
    "hidden_size": 128,
    "num_attention_heads": 2,
    "intermediate_size": 512,
}


def encoder_pair(lengths: list[int], labels: list[int]) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """(teacher, student, ids, labels): one text per length (ids of random word pieces after [CLS], padded
    with 0 to 32 tokens); skips the test, as data missing, without the packaged MiniLM."""
    try:
        torch.manual_seed(0)
        teacher = build_model("hf_encoder", num_classes=2, input_shape=(64,), path="all-MiniLM-L6-v2")
        student = build_model(
            "hf_encoder", num_classes=2, input_shape=(64,), path="all-MiniLM-L6-v2", config=STUDENT_CONFIG
        )
    except UserError as err:
        missing_data(str(err))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (len(lengths), 32), generator=generator)
    ids[:, 0] = 101  # [CLS]
    for row, length in enumerate(lengths):
        ids[row, length:] = 0  # right padding
    return teacher, student, ids, torch.tensor(labels)
