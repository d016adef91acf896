"""Exceptions raised for bad input. Each carries one clear line naming the offending thing."""

from __future__ import annotations


class SlimkitError(Exception):
    """Base of every error slimkit raises on bad input (the CLI exits 2 on these)."""


class ConfigError(SlimkitError, ValueError):
    """A config or recipe value is wrong: names the field, the value and what is allowed."""


class RecipeError(ConfigError):
    """A recipe file or mapping cannot be read."""


class SelectionError(SlimkitError, ValueError):
    """A target pattern matched no module."""


class DataError(SlimkitError, ValueError):
    """Input data is missing, empty or malformed."""


class ModelError(SlimkitError, ValueError):
    """The model itself is unusable (non-finite weights, missing directory, ...)."""


class ArtifactError(SlimkitError):
    """An artifact is missing, corrupt, of a newer format, or would be overwritten."""


class TaskError(SlimkitError, KeyError):
    """Unknown task name, or a task used without what it needs."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """A ' (did you mean 'x'?)' suffix for the closest choice, or '' when none is close."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
