"""Sentence embedders: any Hugging Face encoder (`AutoModel`) under a pooling layer, with no head: what
sentence-transformers builds (Transformer -> Pooling -> optional Dense -> optional Normalize).

The `sentence_encoder` zoo entry builds the encoder as `hf_encoder` does (`distill.models.encoders`): from a
pre-trained folder (`path`), fresh from a config (`config`), or the teacher's blocks kept (`keep_layers`,
DistilBERT's initialisation). After pooling, an optional linear `projection` maps the encoder's width to the
width the task asks for (the teacher's, so that student and teacher embed into the same space and the
projection ships with the student), and `normalize` divides by the L2 norm (all-MiniLM-L6-v2's `Normalize`).

Feature taps (`feature_layers()`): the embedding layer, every block's output, `pooled` (the mean / CLS vector
before the projection) and `embedding` (the model's output). The encoder-objective API of `EncoderClassifier`
(`num_layers`, `num_heads`, `layer_path`, `attention_paths`, `token_mask`) is kept, so TinyBERT's and
MiniLM's objectives read these models too.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

from distill.errors import UserError, shown
from distill.models.encoders import PooledEncoder, build_encoder
from distill.models.registry import MODELS

EMBEDDING_TAP = "embedding"


class SentenceEncoder(PooledEncoder):
    """`encoder` -> pooling over real tokens -> optional linear projection -> optional L2 normalisation.
    Input: `(batch, length)` token ids right-padded with `pad_id`; output: `(batch, width)` embeddings."""

    def __init__(
        self,
        encoder: nn.Module,
        *,
        pooling: str = "mean",
        pad_id: int = 0,
        width: int | None = None,
        normalize: bool = False,
    ) -> None:
        super().__init__(encoder, pooling=pooling, pad_id=pad_id, model_name="sentence_encoder")
        hidden = self.hidden_size
        self.normalize = normalize
        self.projection: nn.Module = (
            nn.Linear(hidden, width) if width is not None and width != hidden else nn.Identity()
        )
        self.embedding = nn.Identity()  # taps, see the module docstring
        self.width = hidden if width is None else width

    def feature_layers(self) -> list[str]:
        return [*super().feature_layers(), EMBEDDING_TAP]

    def forward(self, ids: Tensor) -> Tensor:
        vector = self.projection(self.pool(ids))
        if self.normalize:
            vector = F.normalize(vector, dim=-1)
        return self.embedding(vector)


def projection_width(projection: Any, asked: int) -> int | None:
    """The output width: `projection` an int; None (default) the width the task asks for (`asked`, 0 for
    none); False no projection."""
    if projection is None:
        return asked if asked > 0 else None
    if projection is False:
        return None
    if isinstance(projection, bool) or not isinstance(projection, int) or projection < 1:
        raise UserError(
            "model 'sentence_encoder': projection must be a positive width, false (none) or left out "
            f"(the teacher's width), got {shown(projection)}"
        )
    return projection


def sentence_encoder_factory(
    num_classes: int,
    input_shape: tuple[int, ...] | None = None,
    path: str | None = None,
    config: dict[str, Any] | None = None,
    keep_layers: list[int] | None = None,
    pooling: str = "mean",
    normalize: bool = False,
    projection: int | bool | None = None,
    tokenizer: str | None = None,
) -> nn.Module:
    """The `sentence_encoder` zoo entry. `num_classes` is the width the task asks for (the text-embedding
    task passes the teacher's embedding width for the student and 0 for the teacher); `tokenizer` belongs
    to the data set and is accepted so that one recipe block can name both."""
    del input_shape, tokenizer
    if not isinstance(normalize, bool):
        raise UserError(f"model 'sentence_encoder': normalize must be true or false, got {shown(normalize)}")
    encoder = build_encoder(path, config, keep_layers)
    pad_id = encoder.config.pad_token_id
    return SentenceEncoder(
        encoder,
        pooling=pooling,
        pad_id=0 if pad_id is None else int(pad_id),
        width=projection_width(projection, num_classes),
        normalize=normalize,
    )


MODELS.add(
    "sentence_encoder",
    sentence_encoder_factory,
    summary="any Hugging Face encoder, mean / CLS pooled, optional projection and L2 norm: sentence embedder",
    kind="embedding",
)
