from distill.recipe.load import load_recipe, recipe_from_dict
from distill.recipe.schema import Recipe

__all__ = ["Recipe", "load_recipe", "recipe_from_dict"]
