"""slimkit: make trained PyTorch models smaller and faster, with a measured loss of quality.

Public verbs: ``compress``, ``save``, ``load``, ``export``, ``evaluate``; tasks via
``slimkit.tasks.get``.
"""

from slimkit._version import __version__
from slimkit.api import compress, evaluate, export, load, save
from slimkit.config import Config, Granularity, Scope, StageConfig
from slimkit.constructible import register_constructible
from slimkit.errors import SlimkitError
from slimkit.recipe import Recipe
from slimkit.registry import register

__all__ = [
    "Config",
    "Granularity",
    "Recipe",
    "Scope",
    "SlimkitError",
    "StageConfig",
    "__version__",
    "compress",
    "evaluate",
    "export",
    "load",
    "register",
    "register_constructible",
    "save",
]


def __getattr__(name: str) -> object:
    # ``slimkit.tasks`` without importing it (and its optional dependencies) eagerly
    if name == "tasks":
        import importlib

        return importlib.import_module("slimkit.tasks")
    raise AttributeError(f"module 'slimkit' has no attribute {name!r}")
