"""Causal language models for distillation: any `AutoModelForCausalLM`, from a local folder
(`save_pretrained` layout) or from a config dict (tiny random models), optionally with a LoRA adapter
through PEFT (the `peft` extra, imported only when asked for).

Registered in the model zoo as `hf` (alias `causal_lm`): `{name: hf, params: {config: {model_type: llama,
hidden_size: 64, ...}}}` or `{name: hf, params: {path: models/teacher, dtype: bfloat16}}`. The vocabulary
size of a config defaults to the tokenizer's (passed as `num_classes` by the recipe runner).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.errors import UserError
from distill.models.registry import MODELS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LORA_DEFAULTS: dict[str, Any] = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "target_modules": "all-linear",
}


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise UserError(f"model dtype '{name}' is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def build_causal_lm(
    *,
    config: dict[str, Any] | None = None,
    path: str | Path | None = None,
    dtype: str | None = None,
    lora: dict[str, Any] | None = None,
    vocab_size: int | None = None,
    special_tokens: dict[str, int | None] | None = None,
) -> nn.Module:
    """An `AutoModelForCausalLM` from a local folder or a config dict; never downloads.

    `vocab_size` and `special_tokens` (pad / bos / eos ids of the tokenizer) fill a config's missing keys.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if (config is None) == (path is None):
        raise UserError("an hf model needs exactly one of 'config' (a dict) or 'path' (a local folder)")
    torch_dtype = _dtype(dtype)
    if path is not None:
        folder = Path(path)
        if not (folder / "config.json").exists():
            raise UserError(f"model folder {folder} has no config.json (expected a save_pretrained folder)")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), local_files_only=True, dtype=torch_dtype or "auto"
            )
        except pickle.UnpicklingError as err:  # torch.load(weights_only=True) met more than tensors
            raise UserError(
                f"cannot load a causal LM from {folder}: its weights pickle holds more than tensors "
                "(refused unread; save it as safetensors)"
            ) from err
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load a causal LM from {folder} ({str(err).splitlines()[0]})") from err
    else:
        settings = dict(config or {})
        model_type = settings.pop("model_type", None)
        if model_type is None:
            raise UserError("an hf model config needs 'model_type' (e.g. llama, gpt2, qwen2)")
        if vocab_size is not None:
            settings.setdefault("vocab_size", vocab_size)
        for key, value in (special_tokens or {}).items():
            if value is not None:
                settings.setdefault(key, value)
        try:
            hf_config = AutoConfig.for_model(model_type, **settings)
            model = AutoModelForCausalLM.from_config(hf_config)
        except (KeyError, ValueError, TypeError) as err:
            raise UserError(f"hf model config {model_type}: {str(err).splitlines()[0]}") from err
        if torch_dtype is not None:
            model = model.to(torch_dtype)
    model.config.use_cache = False  # training forward passes need no key/value cache
    if lora:
        model = add_lora(model, lora)
    return model


def add_lora(model: nn.Module, settings: dict[str, Any]) -> nn.Module:
    """Wrap `model` with a LoRA adapter ("LoRA: Low-Rank Adaptation of Large Language Models", Hu et al.,
    2022); only the adapter's weights train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise UserError("LoRA students need peft: pip install 'distill[peft]'") from err
    try:
        return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **{**LORA_DEFAULTS, **settings}))
    except (TypeError, ValueError) as err:
        raise UserError(f"lora: {err}") from err


def hf_model_factory(
    num_classes: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    config: dict[str, Any] | None = None,
    path: str | None = None,
    dtype: str | None = None,
    lora: dict[str, Any] | None = None,
    tokenizer: str | None = None,
) -> nn.Module:
    """The `hf` zoo entry. `tokenizer` (a folder) is read by the recipe runner, not here."""
    del input_shape, tokenizer
    return build_causal_lm(config=config, path=path, dtype=dtype, lora=lora, vocab_size=num_classes)


def special_token_ids(tokenizer: Any) -> dict[str, int | None]:
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


for _name in ("hf", "causal_lm"):
    MODELS.add(_name, hf_model_factory, summary="any AutoModelForCausalLM: a local folder or a config")
