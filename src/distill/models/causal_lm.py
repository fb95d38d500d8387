"""Causal language models for distillation: any `AutoModelForCausalLM`, from a local folder
(`save_pretrained` layout) or from a config dict (tiny random models), optionally with a LoRA adapter
through PEFT (the `peft` extra, imported only when asked for).

Registered in the model zoo as `hf` (alias `causal_lm`): `{name: hf, params: {config: {model_type: llama,
hidden_size: 64, ...}}}` or `{name: hf, params: {path: models/teacher, dtype: bfloat16}}`. The vocabulary
size of a config defaults to the tokenizer's (passed as `num_classes` by the recipe runner).
"""

from __future__ import annotations

import contextlib
import json
import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.errors import UserError, clipped
from distill.models.registry import MODELS, shown

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Sizes every causal LM config has (under these names or aliases such as GPT-2's n_layer): each must be a
# positive whole number (transformers builds a model of -1 layers, which fails only when it generates).
CONFIG_SIZES = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "max_position_embeddings",
    "head_dim",
)
LORA_DEFAULTS: dict[str, Any] = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "target_modules": "all-linear",
}


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if not isinstance(name, str) or name not in DTYPES:
        raise UserError(f"model dtype {shown(name)} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _one_line(err: BaseException, limit: int = 200) -> str:
    """An exception's message on one line (Hugging Face nests validation errors over several), cut."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def causal_lm_classes() -> set[str]:
    """The class names `AutoModelForCausalLM` builds (LlamaForCausalLM, GPT2LMHeadModel, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return names


def refuse_other_architectures(folder: Path) -> None:
    """Refuse a folder whose config names a model that cannot generate text (an encoder such as BertModel
    or BertForMaskedLM, a classifier): `AutoModelForCausalLM` would load it anyway, with a random head."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return  # transformers says what is wrong with it, in one line of ours
    if not isinstance(config, dict):
        return
    model_type, architectures = config.get("model_type"), config.get("architectures")
    if isinstance(model_type, str) and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(
            f"cannot load a causal LM from {folder}: its model_type {shown(model_type)} has no causal "
            "language model in transformers (expected e.g. llama, gpt2, qwen2)"
        )
    if not isinstance(architectures, list) or not architectures:
        return  # older folders name no class: the weights check below still applies
    if not causal_lm_classes() & {a for a in architectures if isinstance(a, str)}:
        raise UserError(
            f"cannot load a causal LM from {folder}: it holds a {clipped(str(architectures[0]))}, which is "
            "not a causal language model (expected a ...ForCausalLM or ...LMHeadModel folder)"
        )


def refuse_missing_weights(model: nn.Module, missing: Iterable[str], folder: Path) -> None:
    """Refuse a model whose checkpoint lacks weights it needs: transformers fills them at random and the
    run would distil from (or train) a model that is not the one saved. A tied weight (an output layer
    sharing the input embedding's tensor) counts as loaded when the tensor it shares was."""
    missing = set(missing)
    named = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(p) for name, p in named.items() if name not in missing}
    absent = sorted(k for k in missing if k not in named or id(named[k]) not in loaded)
    if absent:
        listed = ", ".join(clipped(k, 60) for k in absent[:3]) + (", ..." if len(absent) > 3 else "")
        raise UserError(
            f"cannot load a causal LM from {folder}: its weights lack {len(absent)} tensor(s) the model "
            f"needs ({listed}); they would start random (is it another kind of model?)"
        )


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No progress bar and no load report from transformers: what matters in them is refused in one line."""
    from transformers.utils import logging

    bar, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()


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
    if config is not None and not isinstance(config, dict):
        raise UserError(f"an hf model's config must be a mapping, got {shown(config)}")
    if path is not None and not isinstance(path, str | Path):
        raise UserError(f"an hf model's path must be a folder name, got {shown(path)}")
    if lora is not None and not isinstance(lora, dict):
        raise UserError(f"an hf model's lora settings must be a mapping, got {shown(lora)}")
    torch_dtype = _dtype(dtype)
    if path is not None:
        folder = Path(path)
        if not (folder / "config.json").exists():
            raise UserError(f"model folder {folder} has no config.json (expected a save_pretrained folder)")
        refuse_other_architectures(folder)
        try:
            with quiet_loading():
                model, loading = AutoModelForCausalLM.from_pretrained(
                    str(folder), local_files_only=True, dtype=torch_dtype or "auto", output_loading_info=True
                )
        except pickle.UnpicklingError as err:  # torch.load(weights_only=True) met more than tensors
            raise UserError(
                f"cannot load a causal LM from {folder}: its weights pickle holds more than tensors "
                "(refused unread; save it as safetensors)"
            ) from err
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load a causal LM from {folder} ({_one_line(err)})") from err
        refuse_missing_weights(model, loading.get("missing_keys") or (), folder)
    else:
        settings = dict(config or {})
        model_type = settings.pop("model_type", None)
        if model_type is None:
            raise UserError("an hf model config needs 'model_type' (e.g. llama, gpt2, qwen2)")
        if not isinstance(model_type, str):
            raise UserError(f"an hf model config's model_type must be a name, got {shown(model_type)}")
        bad_key = next((k for k in settings if not isinstance(k, str)), None)
        if bad_key is not None:
            raise UserError(f"an hf model config's keys must be names, got {shown(bad_key)}")
        if vocab_size is not None:
            settings.setdefault("vocab_size", vocab_size)
        for key, value in (special_tokens or {}).items():
            if value is not None:
                settings.setdefault(key, value)
        try:
            hf_config = AutoConfig.for_model(model_type, **settings)
            for key in CONFIG_SIZES:
                value = getattr(hf_config, key, None)
                if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                    raise UserError(f"{key} must be a positive whole number, got {shown(value)}")
            heads = getattr(hf_config, "num_attention_heads", None)
            groups = getattr(hf_config, "num_key_value_heads", None)
            if heads is not None and groups is not None and heads % groups:  # grouped-query attention
                raise UserError(
                    f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({groups})"
                )
            model = AutoModelForCausalLM.from_config(hf_config)
        except MemoryError as err:
            raise UserError(f"hf model config {shown(model_type)}: the model does not fit in memory") from err
        except Exception as err:  # a config is the user's: any failure to build it is theirs
            # (transformers raises KeyError, ValueError, TypeError, its strict dataclasses' validation
            # errors for heads that do not divide the hidden size, torch RuntimeError for impossible sizes)
            raise UserError(f"hf model config {shown(model_type)}: {_one_line(err)}") from err
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
    tokenizer: str | dict[str, Any] | None = None,
) -> nn.Module:
    """The `hf` zoo entry. `tokenizer` (a folder, or `{bpe: {vocab_size: N}}` trained on the training split:
    a teacher's own tokenizer) is read by the recipe runner, not here."""
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
