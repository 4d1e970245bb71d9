"""The recipe registry: ``@recipe`` registers a function returning an ExperimentConfig."""

from __future__ import annotations

import difflib
from collections.abc import Callable

from visionmoe.train.config import ExperimentConfig

RECIPES: dict[str, Callable[[], ExperimentConfig]] = {}


def recipe(fn: Callable[[], ExperimentConfig]) -> Callable[[], ExperimentConfig]:
    RECIPES[fn.__name__] = fn
    return fn


def list_recipes() -> list[str]:
    return sorted(RECIPES)


def recipe_description(name: str) -> str:
    return (RECIPES[name].__doc__ or "").strip().splitlines()[0]


def get_recipe(name: str) -> ExperimentConfig:
    if name not in RECIPES:
        close = difflib.get_close_matches(name, list(RECIPES), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown recipe {name!r}{hint} (available: {', '.join(list_recipes())})")
    return RECIPES[name]()
