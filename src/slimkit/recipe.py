"""Recipe = a name and an ordered list of stages; read from YAML, a dict, or built in code.

YAML form::

    name: w8-rtn
    stages:
      - quantize: {method: rtn, bits: 8, granularity: per_channel, targets: ["*"]}

Every error names the file (and line, for malformed YAML), the stage and the key.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from slimkit import registry
from slimkit.config import Config
from slimkit.errors import ConfigError, RecipeError, did_you_mean

RECIPE_KEYS = ("name", "stages")


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    stages: tuple[Config, ...]

    def to_dict(self) -> dict[str, Any]:
        stages = []
        for s in self.stages:
            stages.append({s.kind: {"method": s.method, **s.to_dict()}})
        return {"name": self.name, "stages": stages}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: expected a mapping with 'name' and 'stages'")
        for key in data:
            if key not in RECIPE_KEYS:
                raise RecipeError(
                    f"{where}: unknown key {key!r}{did_you_mean(str(key), RECIPE_KEYS)}; "
                    f"allowed: {', '.join(RECIPE_KEYS)}"
                )
        name = data.get("name", "recipe")
        if not isinstance(name, str) or not name:
            raise RecipeError(f"{where}: name: got {name!r}; allowed: a non-empty string")
        stages = data.get("stages")
        if not isinstance(stages, list) or not stages:
            raise RecipeError(f"{where}: stages: got {stages!r}; allowed: a non-empty list")
        parsed = tuple(_parse_stage(s, f"{where}: stages[{i}]") for i, s in enumerate(stages))
        return cls(name=name, stages=parsed)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Recipe:
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"recipe file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = f" line {mark.line + 1}" if mark is not None else ""
            raise RecipeError(f"{p}:{line}: malformed YAML: {e.problem or e}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise RecipeError(f"{p}: malformed YAML: {e}") from None
        return cls.from_dict(data, where=str(p))


def _parse_stage(stage: Any, where: str) -> Config:
    if not isinstance(stage, dict) or len(stage) != 1:
        raise RecipeError(f"{where}: each stage is a one-key mapping {{kind: {{options}}}}")
    ((kind, options),) = stage.items()
    if kind not in registry.KINDS:
        raise RecipeError(
            f"{where}: unknown stage kind {kind!r}{did_you_mean(str(kind), registry.KINDS)}; "
            f"allowed: {', '.join(registry.KINDS)}"
        )
    if options is not None and not isinstance(options, dict):
        raise RecipeError(f"{where}.{kind}: expected a mapping of options, got {options!r}")
    options = dict(options or {})
    method = options.pop("method", registry.DEFAULT_METHOD.get(kind))
    cls = registry.config_class(kind, str(method))
    if cls is None:
        have = registry.methods(kind)
        if not have:
            raise RecipeError(f"{where}: stage kind {kind!r} is not available in this version")
        raise RecipeError(
            f"{where}.{kind}: unknown method {method!r}{did_you_mean(str(method), have)}; "
            f"allowed: {', '.join(have)}"
        )
    try:
        return cls.from_dict(options, where=f"{where}.{kind}")
    except ConfigError as e:
        msg = str(e)
        prefix = f"{where}.{kind}"
        raise RecipeError(msg if msg.startswith(where) else f"{prefix}: {msg}") from None


def as_recipe(recipe: Recipe | dict[str, Any] | str | os.PathLike[str]) -> Recipe:
    """Accept a Recipe, a dict, a path to a YAML file or the name of a shipped recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, str | os.PathLike):
        return Recipe.from_file(resolve(recipe))
    raise RecipeError(f"recipe: expected a path, a dict or a Recipe, got {type(recipe).__name__}")


def shipped_dir() -> Path:
    """The folder of the recipes shipped with slimkit."""
    return Path(__file__).parent / "recipes"


def shipped() -> list[str]:
    return sorted(p.stem for p in shipped_dir().glob("*.yaml"))


def resolve(arg: str | os.PathLike[str]) -> Path:
    """A recipe path; a bare name such as ``w8-rtn`` means the shipped recipe of that name."""
    p = Path(arg)
    if p.exists() or p.suffix in (".yaml", ".yml") or os.sep in str(arg):
        return p
    named = shipped_dir() / f"{arg}.yaml"
    if named.is_file():
        return named
    raise RecipeError(
        f"recipe file not found: {p}{did_you_mean(str(arg), shipped())}; "
        f"shipped recipes: {', '.join(shipped())}"
    )
