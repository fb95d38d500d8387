"""Hugging Face causal language models (`hf`, alias `causal_lm`): see `distill.lm.models`."""

from distill.lm.models import hf_model_factory
from distill.models.registry import MODELS

for _name in ("hf", "causal_lm"):
    MODELS.add(_name, hf_model_factory, summary="any AutoModelForCausalLM: a local folder or a config")
