"""The command line's words: every error the user can fix worded as one line (`error: <what,
where, what to do>`, the library's errors rendered with the command line's flags), the
overrides a mode would ignore, and quiet library logs. Predict's inputs: predict_inputs."""

from __future__ import annotations

import asyncio
import difflib
import logging as logging_std
import os
import re
import sys
import traceback

from absl import flags
from ml_collections import ConfigDict, config_flags

from lpt_jax.errors import Error, render


class QuietLibraries(logging_std.Filter):
    """Orbax and TF log every checkpoint step at INFO: keep their warnings only. A failure in
    Orbax's background writes is logged there with its traceback (and again by asyncio for
    each of its tasks) before the main thread raises it, which run.py reports as one line:
    those logs go."""

    def filter(self, record):
        noisy = ("orbax", "tensorflow", "jax._src", "clu/platform")
        from_orbax = "orbax" in record.pathname or "orbax" in str(record.msg)
        if from_orbax and (record.exc_info or "raised an exception" in str(record.msg)
                           or "exception was never retrieved" in str(record.msg)):
            return False
        return record.levelno >= logging_std.WARNING or not any(
            n in record.pathname for n in noisy)


def quiet_closed_loop_callbacks() -> None:
    """When an Orbax write fails (disk full), Orbax closes its event loop while TensorStore's
    other writes are still in flight; each one's completion callback then finds the loop
    closed, and TensorStore reports that as an unraisable RuntimeError: a traceback per chunk
    after the real failure, which run.py reports as one line. Only that exact case is
    dropped; every other unraisable exception goes to the default hook."""
    default = sys.unraisablehook
    asyncio_dir = os.path.dirname(asyncio.__file__)

    def hook(unraisable):
        frames = traceback.extract_tb(unraisable.exc_traceback)
        if (unraisable.exc_type is RuntimeError
                and str(unraisable.exc_value) == "Event loop is closed" and frames
                and all(os.path.dirname(f.filename) == asyncio_dir for f in frames)):
            return
        default(unraisable)
    sys.unraisablehook = hook


# ------------------------------------------------------------------------------------------
# Command-line errors: one line naming the flag, the field and what it accepts.

def config_file(argv) -> str:
    """The path of the config file --config names (without its ':arg')."""
    return (_config_arg(argv) or "").split(":")[0]


def _config_arg(argv):
    """The --config value absl uses: the last one given."""
    found = None
    for i, a in enumerate(argv):
        if a.startswith(("--config=", "-config=")):
            found = a.split("=", 1)[1]
        elif a in ("--config", "-config") and i + 1 < len(argv):
            found = argv[i + 1]
    return found


def _overrides(argv):
    """[(field path, argument as typed)] of the --config.a.b=value arguments."""
    out = []
    for a in argv:
        m = re.match(r"^--?(?:no)?config\.([^=\s]+)", a)
        if m:
            out.append((m.group(1), a))
    return out


# The modes each of run.py's mode-specific flags is read in.
FLAG_MODES = {"--export": ("eval", "predict"), "--files": ("predict",),
              "--requests": ("predict",), "--output": ("predict",)}


def flag_outside_its_modes(mode: str, given: dict) -> "str | None":
    """The line for a flag given a value in a mode that would ignore it (None if none)."""
    for flag, value in given.items():
        modes = FLAG_MODES[flag]
        if value and mode not in modes:
            return (f"{flag} has no effect with --mode={mode}: it is read by "
                    + " and ".join(f"--mode={m}" for m in modes))
    return None


def overrides_outside(argv, allowed) -> list[str]:
    """The --config.a.b=value arguments (as typed) that set no field of `allowed`."""
    return [typed for path, typed in _overrides(argv) if path not in allowed]


def ignored_overrides(argv, config, unread, recorded) -> list[str]:
    """The --config.a.b=value arguments (as typed) that set a field of `unread` (fields this
    command does not read: it takes them from the exports) to a value other than the one
    every config of `recorded` (the exports' runs) holds: they would be silently ignored.
    The same value (the training command reused) is no conflict."""
    from lpt_jax.tree import lookup
    unread, out = tuple(unread), []
    for path, typed in _overrides(argv):
        fields = [f for f in unread if f == path or f.startswith(path + ".")]
        if any(lookup(c, f, object()) != lookup(config, f) for f in fields for c in recorded):
            out.append(typed)
    return out


def _load_config(spec):
    """The config that --config=file[:arg] names, without the overrides, loaded by
    config_flags itself on a private flag set; None if that fails too."""
    private = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "", flag_values=private)
    argv = ["run.py", f"--config={spec}"]
    saved, sys.argv = sys.argv, argv  # config_flags also reads overrides from sys.argv
    try:
        private(argv)
        value = holder.value
        # config_flags defers a file's load error: an object that raises it on first use
        return value if isinstance(value, ConfigDict) else None
    except Exception:  # noqa: BLE001 - only used to word an error better
        return None
    finally:
        sys.argv = saved


def _unknown_field(config, path):
    """'config.a has no field b; did you mean ...' for the first missing part of `path`."""
    node, walked = config, "config"
    for part in path.split("."):
        if not isinstance(node, (ConfigDict, dict)):
            return f"{walked} is a value ({node!r}), not a section: it has no field {part!r}"
        if part not in node:
            keys = sorted(node.keys())
            close = difflib.get_close_matches(part, keys, n=1)
            hint = (f"did you mean {walked}.{close[0]}?" if close
                    else f"{walked} has: {', '.join(keys)}")
            return f"{walked} has no field {part!r}; {hint}"
        node, walked = node[part], f"{walked}.{part}"
    return None


def _expected(value):
    if isinstance(value, bool):
        return "True or False"
    if isinstance(value, (tuple, list)):
        return "a tuple, e.g. '(\"a\", \"b\")' or the flag repeated once per item"
    return {int: "an integer", float: "a number", str: "a string"}.get(
        type(value), f"a {type(value).__name__}")


def config_file_error(err: Exception, argv) -> str:
    """A Python error raised while loading the config file, as one line with its place."""
    spec = _config_arg(argv)
    if isinstance(err, SyntaxError) and err.filename:
        where = f"{err.filename}:{err.lineno}"
    else:
        frames = traceback.extract_tb(err.__traceback__)
        path = (spec or "").split(":")[0]
        mine = [f for f in frames if path and os.path.abspath(f.filename) == os.path.abspath(path)]
        frame = (mine or frames or [None])[-1]
        where = f"{frame.filename}:{frame.lineno}" if frame else "?"
    message = err.msg if isinstance(err, SyntaxError) else str(err)
    return (f"--config={spec}: the config file does not load ({type(err).__name__}: "
            f"{message} at {where})")


def flag_error(err, argv) -> str:
    """One line for a command line that absl / config_flags rejected."""
    spec = _config_arg(argv)
    text = str(err).strip()
    config = _load_config(spec) if spec else None
    if spec and config is None:  # the file itself is the problem: say that, not the override
        path = spec.split(":")[0]
        why = ("no such file" if not os.path.exists(path) else
               "it does not load: run it alone to see why")
        return f"--config={spec}: cannot load the config file ({why})"
    if config is not None:
        for path, arg in _overrides(argv):
            unknown = _unknown_field(config, path)
            if unknown:
                return f"{arg}: {unknown}"
        m = re.match(r"flag --config\.([^=\s]+)=(.*?): (.*)", text.splitlines()[0] if text else "")
        if m:
            path, value, why = m.groups()
            try:
                from lpt_jax import tree  # flax: only once a flag error is being worded
                default = tree.lookup(config, path)
                return (f"--config.{path}={value}: expected {_expected(default)}, like the "
                        f"config's {default!r} ({why.strip('()')})")
            except (KeyError, AttributeError):
                pass
    missing = re.search(r"Flag --(\w+) must have a value other than None", text)
    if missing:
        example = {"config": "configs/places_lt.py", "workdir": "/tmp/run1"}.get(missing.group(1))
        return f"--{missing.group(1)} is required" + (
            f", e.g. --{missing.group(1)}={example}" if example else "")
    if isinstance(err, OSError):
        return f"--config={spec}: cannot load the config file ({text.splitlines()[-1].strip()})"
    first = text.splitlines()[0] if text else type(err).__name__
    return f"{first} (see --helpshort)"


# ------------------------------------------------------------------------------------------
# Errors during the run.

_MAX_LINE = 600


def one_line(err) -> str:
    """The error as one line, in the command line's words (`--config.a.b=v`): detail lines of
    the form 'what (n): a; b; ...' shrink to 'what (n), e.g. a'; an overlong middle is cut,
    never the end (the hint: what to do)."""
    if isinstance(err, Error):
        text = _shrink(render(err.parts, cli=True))
        return f"{text}; {render(err.hint, cli=True)}" if err.hint else text
    return _shrink(str(err)) or type(err).__name__


def _shrink(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    parts = lines[:1]
    for line in lines[1:]:
        m = re.match(r"(.+?\(\d+\)): (.*)", line)
        parts.append(f"{m.group(1)}, e.g. {m.group(2).split('; ')[0]};" if m else line)
    text = " ".join(parts).rstrip(";")
    if len(text) > _MAX_LINE:
        half = _MAX_LINE // 2
        text = f"{text[:half].rstrip()} ... {text[-half:].lstrip()}"
    return text


def os_error_line(err: OSError) -> str:
    """An environment failure (disk full, read-only folder, ...) as one line."""
    name = getattr(err, "filename", None)
    # Name the file being written, not the temporary it goes through first (files.write_bytes
    # and the lease write `<name>.tmp` / `<name>.<hex>.tmp`, then rename).
    name = re.sub(r"(\.[0-9a-f]{32})?\.tmp$", "", str(name)) if name else None
    where = f" {name}" if name else ""
    what = err.strerror or str(err) or type(err).__name__
    hint = {28: "free some space (the run resumes from its last checkpoint)",
            13: "make the folder writable or choose another --workdir",
            30: "the file system is read-only: choose another --workdir"}.get(err.errno, "")
    return f"cannot write or read{where}: {what}" + (f"; {hint}" if hint else "")
