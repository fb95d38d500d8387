"""Text encoders as classifiers: any Hugging Face encoder (`AutoModel`, BERT-class) under a pooling layer and
a linear head, taking one padded tensor of token ids.

The `hf_encoder` zoo entry builds the encoder three ways:
- `path` alone: the pre-trained weights of a folder or packaged model (`distill.pretrained`);
- `config` (with or without `path`): a fresh, randomly initialised encoder whose config is the path's (or
  BERT's defaults) with these sizes changed, e.g. `{num_hidden_layers: 2, hidden_size: 128}`;
- `keep_layers` (with `path`): the pre-trained encoder with only these blocks kept, in order: DistilBERT's
  initialisation of a shallower student from its teacher ("DistilBERT", Sanh et al., 2019, every other
  layer), e.g. `[0, 2, 4]`.

The model's input is `(batch, length)` token ids right-padded with `pad_id`; the padding mask is `ids !=
pad_id` (a tokenizer never emits its pad token inside a text) and each batch is cut to its longest text, so
short texts cost little. Feature taps for feature objectives (`feature_layers()`): the embedding output, the
output of every block (`(B, T, H)` hidden states), and `pooled` (`(B, H)`). Objectives that read attention
use `attention_paths(i)` (the block's query / key / value projections, `(B, T, H)`, split into
`num_heads` heads) and `MASK_TAP`, the `(B, T)` float mask of real tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from distill.errors import UserError, shown
from distill.models.causal_lm import quiet_loading
from distill.models.registry import MODELS, check_dropout
from distill.pretrained import pretrained_folder

MASK_TAP = "token_mask"
POOLED_TAP = "pooled"
POOLINGS = ("mean", "cls")
SIZE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")


class PooledEncoder(nn.Module):
    """`encoder` (a transformers encoder) -> pooling over real tokens (`pool`), with the taps and the
    encoder-objective API (`num_layers`, `num_heads`, `layer_path`, `attention_paths`) that TinyBERT's and
    MiniLM's objectives read. Subclasses put a head (`EncoderClassifier`) or a projection on the pooled
    vector (`distill.models.sentence_encoders.SentenceEncoder`)."""

    def __init__(self, encoder: nn.Module, *, pooling: str, pad_id: int, model_name: str) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise UserError(
                f"model '{model_name}': pooling must be one of {list(POOLINGS)}, got {shown(pooling)}"
            )
        self.encoder = encoder
        pooler = getattr(encoder, "pooler", None)
        if isinstance(pooler, nn.Module):  # BERT's tanh pooler: unused by our pooling, so frozen (DDP would
            pooler.requires_grad_(False)  # refuse parameters that never get a gradient)
        self.pooling = pooling
        self.pad_id = pad_id
        self.token_mask = nn.Identity()  # taps: see the module docstring
        self.pooled = nn.Identity()

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.encoder.config.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        return int(self.encoder.config.num_attention_heads)

    def layer_path(self, index: int) -> str:
        return f"encoder.encoder.layer.{index}"

    def attention_paths(self, index: int) -> dict[str, str]:
        """The query, key and value projections of block `index` (their outputs are `(B, T, H)`)."""
        base = f"{self.layer_path(index)}.attention.self"
        return {part: f"{base}.{part}" for part in ("query", "key", "value")}

    def feature_layers(self) -> list[str]:
        return ["encoder.embeddings", *(self.layer_path(i) for i in range(self.num_layers)), POOLED_TAP]

    def pool(self, ids: Tensor) -> Tensor:
        """`(B, H)`: the CLS token's state, or the mean over real tokens (sentence-transformers' pooling)."""
        mask = ids != self.pad_id
        if not (torch.jit.is_tracing() or torch.compiler.is_exporting()):
            length = max(int(mask.sum(1).max()), 1)  # right padding: every real token is before `length`
            ids, mask = ids[:, :length], mask[:, :length]
        hidden = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        weights = self.token_mask(mask.to(hidden.dtype))
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1.0)
        return self.pooled(pooled)


class EncoderClassifier(PooledEncoder):
    """`encoder` (a transformers encoder) -> pooling over real tokens -> dropout -> linear head."""

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        *,
        pooling: str = "mean",
        pad_id: int = 0,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(encoder, pooling=pooling, pad_id=pad_id, model_name="hf_encoder")
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.hidden_size, num_classes)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.dropout(self.pool(ids)))


def _check_sizes(config: dict[str, Any]) -> None:
    for key, value in config.items():
        if key in SIZE_KEYS and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UserError(
                f"model 'hf_encoder': config {key} must be a positive whole number, got {shown(value)}"
            )
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    if isinstance(heads, int) and isinstance(hidden, int) and hidden % heads:
        raise UserError(
            f"model 'hf_encoder': hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})"
        )


def build_encoder(
    path: str | None, config: dict[str, Any] | None, keep_layers: list[int] | None
) -> nn.Module:
    """The transformers encoder the `hf_encoder` entry describes (see the module docstring)."""
    from transformers import AutoConfig, AutoModel, BertConfig

    folder = pretrained_folder(path) if path is not None else None
    if config is not None:
        if keep_layers is not None:
            raise UserError("model 'hf_encoder': give config (a fresh encoder) or keep_layers, not both")
        if not isinstance(config, dict):
            raise UserError(f"model 'hf_encoder': config must be a mapping, got {shown(config)}")
        base = AutoConfig.from_pretrained(folder) if folder is not None else BertConfig()
        settings = {**base.to_dict(), **config}
        _check_sizes(settings)
        try:
            fresh = type(base)(**{k: v for k, v in settings.items() if k not in {"transformers_version"}})
            return AutoModel.from_config(fresh)
        except Exception as err:  # the config is the user's: any failure to build it is theirs
            raise UserError(f"model 'hf_encoder': config: {str(err).splitlines()[0]}") from err
    if folder is None:
        raise UserError("model 'hf_encoder' needs a path (a pre-trained encoder) or a config (a fresh one)")
    with quiet_loading():
        encoder = AutoModel.from_pretrained(folder)
    if keep_layers is not None:
        blocks = encoder.encoder.layer
        if (
            not isinstance(keep_layers, list)
            or not keep_layers
            or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(blocks) for i in keep_layers
            )
        ):
            raise UserError(
                f"model 'hf_encoder': keep_layers must be a non-empty list of block indices in "
                f"0..{len(blocks) - 1}, got {shown(keep_layers)}"
            )
        encoder.encoder.layer = nn.ModuleList(blocks[i] for i in keep_layers)
        encoder.config.num_hidden_layers = len(keep_layers)
    return encoder


def hf_encoder_factory(
    num_classes: int,
    input_shape: tuple[int, ...] | None = None,
    path: str | None = None,
    config: dict[str, Any] | None = None,
    keep_layers: list[int] | None = None,
    pooling: str = "mean",
    dropout: float = 0.1,
    tokenizer: str | None = None,
) -> nn.Module:
    """The `hf_encoder` zoo entry. `tokenizer` belongs to the data set (which tokenises); it is accepted here
    so that one recipe block can name both."""
    del input_shape, tokenizer
    encoder = build_encoder(path, config, keep_layers)
    pad_id = encoder.config.pad_token_id
    return EncoderClassifier(
        encoder,
        num_classes,
        pooling=pooling,
        pad_id=0 if pad_id is None else int(pad_id),
        dropout=check_dropout("hf_encoder", dropout),
    )


MODELS.add(
    "hf_encoder",
    hf_encoder_factory,
    summary="any Hugging Face encoder (BERT-class), pooled, linear head: pre-trained, fresh or layer-pruned",
)
