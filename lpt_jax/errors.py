"""Every error type of lpt_jax, and how an error names what fixes it.

An error says what is wrong in the library's own words. Where a config value or a command-line
input would fix it, the message names it with a `Setting` (a config field, optionally with a
value) or an `Input` (what run.py takes as a flag: the workdir, an export, ...), never with
the command line's spelling: `str(error)` reads as a library user would write it
(`config.train.allow_config_change=True`), and `error.text(cli=True)` as run.py's one
`error:` line does (`--config.train.allow_config_change=True`).

    raise ConfigError(f"{workdir} holds a run with a different config: use a new ",
                      Input("workdir"), ", or resume it anyway with ",
                      Setting("train.allow_config_change", True))

Each error may also carry the config `field` and the file `path` it is about, and a `hint`
(parts, like the message) that an outer layer can add once it knows more than the raiser did
(`with_hint`). Exit statuses and run.py's wording of each kind live in run.py.
"""

from __future__ import annotations

from typing import Any, Optional

_NO_VALUE = object()


class Setting:
    """A config field (dotted, e.g. 'train.phases'), optionally with the value that fixes."""

    def __init__(self, field: str, value: Any = _NO_VALUE):
        self.field, self.value = field, value

    def text(self, cli: bool) -> str:
        name = f"--config.{self.field}" if cli else f"config.{self.field}"
        if self.value is _NO_VALUE:
            return name
        value = self.value
        if isinstance(value, (tuple, list)):
            value = ",".join(map(str, value)) if cli else tuple(value)
        return f"{name}={value}" if cli else f"{name}={value!r}"


class Input:
    """One of run.py's inputs other than the config (workdir, export, files, requests,
    output, mode), optionally with a value."""

    def __init__(self, name: str, value: Optional[str] = None):
        self.name, self.value = name, value

    def text(self, cli: bool) -> str:
        name = f"--{self.name}" if cli else self.name
        return name if self.value is None else f"{name}={self.value}"


def render(parts, cli: bool) -> str:
    return "".join(p.text(cli) if isinstance(p, (Setting, Input)) else str(p) for p in parts)


class Error(Exception):
    """The base of the errors a user can fix: one line, from text and Setting / Input parts."""

    def __init__(self, *parts, field: Optional[str] = None, path: Optional[str] = None,
                 hint: tuple = ()):
        self.parts, self.field, self.path, self.hint = parts, field, path, tuple(hint)
        super().__init__(self.text(cli=False))

    def text(self, cli: bool = False) -> str:
        message = render(self.parts, cli)
        return f"{message}; {render(self.hint, cli)}" if self.hint else message

    def __str__(self) -> str:
        return self.text(cli=False)

    def with_hint(self, *hint, field: Optional[str] = None) -> "Error":
        """This error with `hint` added (unless it has one) and `field` where it names none."""
        if not self.hint:
            self.hint = tuple(hint)
        self.field = self.field or field
        self.args = (self.text(cli=False),)
        return self


# ------------------------------------------------------------------------------------------
# What the user can fix (run.py: one `error:` line, exit 1).

class ConfigError(Error, ValueError):
    """A config value, or a combination of values, that cannot work (found before the first
    step)."""


class DataError(Error, ValueError):
    """A data problem: a file, list line, label or data field that cannot work."""


class CheckpointError(Error, ValueError):
    """A weight file that cannot be read or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle in a weight file asked for something other than the tensor-rebuild
    functions (it would run code on load); nothing of it was executed."""


class ExportError(CheckpointError):
    """An export file that cannot be read or does not fit the model, data or backbone."""


class DamagedCheckpointError(CheckpointError):
    """A train-state checkpoint that cannot be restored, or whose content is not what was
    saved."""


class LeaseError(ConfigError):
    """The workdir is in use by another live run (or its lease cannot be taken)."""


class RequestError(ConfigError):
    """A serving request that cannot be answered (an unknown task, images of another shape)."""


class NonFiniteError(Error, FloatingPointError):
    """A step produced a non-finite loss or gradient and train.on_nonfinite='stop'."""


class RemoteError(OSError):
    """A remote store could not be reached or refused the operation (no network, an
    emulator that is not running, an unexpected answer): one line, never a client's trace.
    RemoteError(path, why), or RemoteError(message)."""

    def __init__(self, *args):
        if len(args) == 2:
            super().__init__(None, str(args[1]), str(args[0]))
        else:
            super().__init__(*args)

    def __str__(self) -> str:
        if self.filename is not None:
            return f"{self.filename}: {self.strerror}"
        return super().__str__()


# ------------------------------------------------------------------------------------------
# How a run ends other than by finishing.

class Stopped(RuntimeError):
    """Training stopped where the config asked (train.stop_after_steps), a checkpoint saved;
    rerunning the same command continues."""


class Preempted(RuntimeError):
    """Raised after a checkpoint was saved on SIGTERM or SIGINT (`signum`); rerunning the same
    command resumes."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class Interrupted(BaseException):
    """A signal outside the train loop (BaseException, like KeyboardInterrupt: no `except
    Exception` in a library may swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
