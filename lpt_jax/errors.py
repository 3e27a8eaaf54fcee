"""Errors that mean "the user's config or inputs cannot work", reported as one line by run.py."""


class ConfigError(ValueError):
    """A config value that cannot work (found before the first step)."""
