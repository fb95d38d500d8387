"""Language-model distillation on Hugging Face causal LMs: models, tokenizers, data, sequence-level KD,
evaluation and the recipe runner. Importing this package is cheap (transformers loads on first use)."""

LM_DATA_SETS = ("text", "jsonl", "json", "csv", "parquet", "arithmetic", "tinyshakespeare")
LM_MODELS = ("hf", "causal_lm")


def is_lm_recipe(recipe: object) -> bool:
    """A recipe is a language-model recipe when its data set or its student is one of ours."""
    data = getattr(recipe, "data", None)
    student = getattr(recipe, "student", None)
    return getattr(data, "name", None) in LM_DATA_SETS or getattr(student, "name", None) in LM_MODELS
