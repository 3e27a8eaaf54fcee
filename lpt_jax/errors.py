"""Errors that mean "the user's config, inputs or run cannot go on"; run.py reports each as one
line (`error: ...`) with an exit status, never a traceback."""


class ConfigError(ValueError):
    """A config value that cannot work (found before the first step)."""


class NonFiniteError(FloatingPointError):
    """A step produced a non-finite loss or gradient and train.on_nonfinite='stop'."""


class Preempted(RuntimeError):
    """Raised after a checkpoint was saved on SIGTERM; rerun the same command to resume."""
