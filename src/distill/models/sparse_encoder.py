"""A SPLADE-style sparse encoder: text -> one non-negative weight per vocabulary term.

"SPLADE v2" (Formal et al., 2021): a transformer encoder, an MLM-like head (dense -> GELU -> LayerNorm ->
vocabulary logits, the decoder initialised from the input embeddings), and per term
``w_t = max_i log(1 + relu(logit_{i,t}))`` over the real tokens i of the text. A query and a passage are
scored by a dot product of their weights (`distill.losses.retrieval.idf_weighted_scores` adds the IDF-aware
matching). The output vocabulary may be a subset of the tokenizer's (`vocab_ids`): the terms a corpus can
use, which keeps the head small on CPU (the full head is 30,522 x hidden).

`build_sparse_encoder` builds the encoder by `distill.models.encoders.build_encoder` (a pre-trained folder,
layers of it, or a fresh config); a fresh encoder with a smaller hidden size gets its word embeddings from
the pre-trained ones projected on their leading principal directions, so that its head starts as a lexical
matcher (a token's own embedding scores it highest).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from distill.models.encoders import build_encoder


class SparseEncoder(nn.Module):
    """`encoder` -> MLM-like head over `vocab_ids` -> max-pooled log(1 + relu(.)) term weights `(N, V)`."""

    def __init__(self, encoder: nn.Module, vocab_ids: Tensor, pad_id: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        pooler = getattr(encoder, "pooler", None)
        if isinstance(pooler, nn.Module):  # unused
            pooler.requires_grad_(False)
        hidden = int(encoder.config.hidden_size)
        self.transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden))
        embeddings = encoder.embeddings.word_embeddings.weight.detach()
        self.register_buffer("vocab_ids", vocab_ids.long().clone())
        self.decoder = nn.Linear(hidden, len(vocab_ids))
        with torch.no_grad():
            # a fresh head starts as a lexical matcher: identity transform, decoder = the input embeddings, so
            # a text's own tokens (and their embedding neighbours) score highest
            self.transform[0].weight.copy_(torch.eye(hidden))
            self.transform[0].bias.zero_()
            self.decoder.weight.copy_(embeddings[self.vocab_ids])
            self.decoder.bias.zero_()
        self.pad_id = pad_id

    def token_logits(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token vocabulary logits `(N, T, V)` and the mask of real tokens `(N, T)`."""
        mask = ids != self.pad_id
        length = max(int(mask.sum(1).max()), 1) if ids.numel() else 1
        ids, mask = ids[:, :length], mask[:, :length]
        hidden = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return self.decoder(self.transform(hidden)), mask

    @torch.no_grad()
    def calibrate_bias(self, ids: Tensor, active_terms: int) -> float:
        """Set the decoder's bias to one constant so that texts `ids` start with about `active_terms`
        non-zero weights each (the median text); returns the bias."""
        logits, mask = self.token_logits(ids)
        pooled = logits.masked_fill(~mask[..., None], -torch.inf).amax(1)  # (N, V): max over tokens
        k = min(max(active_terms, 1), pooled.shape[1])
        threshold = pooled.topk(k, dim=-1).values[:, -1].median()
        self.decoder.bias.fill_(-float(threshold))
        return -float(threshold)

    def forward(self, ids: Tensor) -> Tensor:
        logits, mask = self.token_logits(ids)
        weights = torch.log1p(torch.relu(logits))
        # padding never contributes: its weights are 0, the floor of log(1 + relu(.))
        weights = weights * mask[..., None].to(weights.dtype)
        return weights.amax(1)


def project_embeddings(embeddings: Tensor, dim: int) -> Tensor:
    """`(V, H)` embeddings on their `dim` leading principal directions (centred), `(V, dim)`."""
    centred = embeddings.float() - embeddings.float().mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:dim].T


def build_sparse_encoder(
    vocab_ids: Tensor,
    *,
    path: str | None = "all-MiniLM-L6-v2",
    config: dict[str, Any] | None = None,
    keep_layers: list[int] | None = None,
    pad_id: int = 0,
) -> SparseEncoder:
    """A `SparseEncoder` over `vocab_ids` (see the module docstring for `path` / `config` / `keep_layers`)."""
    encoder = build_encoder(path, config, keep_layers)
    if config is not None and path is not None:
        pretrained = build_encoder(path, None, [0]).embeddings.word_embeddings.weight.detach()
        dim = int(encoder.config.hidden_size)
        if pretrained.shape[0] == encoder.embeddings.word_embeddings.weight.shape[0]:
            with torch.no_grad():
                projected = project_embeddings(pretrained, dim) if dim < pretrained.shape[1] else pretrained
                scale = encoder.embeddings.word_embeddings.weight.std() / projected.std()
                encoder.embeddings.word_embeddings.weight.copy_(projected * scale)
    return SparseEncoder(encoder, vocab_ids, pad_id)
