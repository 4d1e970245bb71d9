"""Recipes: functions returning an :class:`~visionmoe.train.config.ExperimentConfig`.

Each docstring gives the command, the expected test accuracy and the runtime on 2 CPU cores.
``visionmoe recipes`` lists them; ``visionmoe train --recipe NAME`` runs one.
"""

from configs.recipes import RECIPES, get_recipe, list_recipes, recipe_description

__all__ = ["RECIPES", "get_recipe", "list_recipes", "recipe_description"]
