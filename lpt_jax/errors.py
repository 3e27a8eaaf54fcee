"""Errors that mean "the user's config, inputs or run cannot go on"; run.py reports each as one
line (`error: ...`) with an exit status, never a traceback."""


class ConfigError(ValueError):
    """A config value that cannot work (found before the first step)."""


class NonFiniteError(FloatingPointError):
    """A step produced a non-finite loss or gradient and train.on_nonfinite='stop'."""


class Preempted(RuntimeError):
    """Raised after a checkpoint was saved on SIGTERM or SIGINT; rerun the same command to
    resume. `signum` is the signal (None for train.stop_after_steps)."""

    def __init__(self, message: str, signum=None):
        super().__init__(message)
        self.signum = signum


class Interrupted(BaseException):
    """A signal outside the train loop (BaseException, like KeyboardInterrupt: no `except
    Exception` in a library may swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
