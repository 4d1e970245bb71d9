"""Recipes: functions returning an :class:`~visionmoe.train.config.ExperimentConfig`.

Each docstring gives the command, the expected test accuracy and the runtime on 2 CPU cores.
``visionmoe recipes`` lists them; ``visionmoe train --recipe NAME`` runs one.
"""

from visionmoe.recipes import imagenet as _imagenet  # noqa: F401  (registers the recipes)
from visionmoe.recipes import small as _small  # noqa: F401  (registers the recipes)
from visionmoe.recipes import transfer as _transfer  # noqa: F401  (registers the recipes)
from visionmoe.recipes.registry import RECIPES, get_recipe, list_recipes, recipe, recipe_description

__all__ = ["RECIPES", "get_recipe", "list_recipes", "recipe", "recipe_description"]
