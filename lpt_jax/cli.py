"""The command line's words: input files of --mode=predict (and which task serves each, with
several exports), quiet library logs, and every error the user can fix worded as one line
(`error: <what, where, what to do>`)."""

from __future__ import annotations

import contextlib
import difflib
import json
import logging as logging_std
import os
import re
import sys
import traceback

from absl import flags
from ml_collections import ConfigDict, config_flags

from lpt_jax.errors import ConfigError, Error, render

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def existing_files(entries) -> list:
    """--files entries as local files, folders walked for images: each must exist. absl splits
    the flag at commas, so a name holding one arrives in pieces: that is said too."""
    from lpt_jax.storage import files
    for i, entry in enumerate(entries):
        if files.is_remote(entry) or os.path.exists(entry):
            continue
        joined = next((",".join(entries[i:j]) for j in range(i + 2, len(entries) + 1)
                       if os.path.exists(",".join(entries[i:j]))), None)
        if joined:
            raise ConfigError(f"--files: {joined} holds a comma, and --files splits at commas; "
                              "give its folder instead, or rename it")
        raise ConfigError(f"--files: {entry} does not exist")
    return expand_files(entries)


def expand_files(paths):
    """Files as given, folders walked for images (sorted)."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            for root, _, names in sorted(os.walk(p)):
                out += [os.path.join(root, n) for n in sorted(names)
                        if n.lower().endswith(IMAGE_SUFFIXES)]
        else:
            out.append(p)
    return out


# ------------------------------------------------------------------------------------------
# Several exports in one predict (lpt_jax.serving): which export serves which file.

_TASK_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_PHASE_FOLDER = re.compile(r"phase\d+")


def split_named(entry: str):
    """'task=path' -> (task, path); a plain path, or one that exists as given, -> (None, path)."""
    if "=" in entry and not os.path.exists(entry):
        name, path = entry.split("=", 1)
        if _TASK_NAME.fullmatch(name):
            return name, path
    return None, entry


def default_task_name(path: str) -> str:
    """The task an unnamed export serves: the file's stem, or for `export.npz` its folder's
    name (the workdir's, for `<workdir>/phase<n>/export.npz`)."""
    from lpt_jax.storage import files
    full = path if files.is_remote(path) else os.path.abspath(path)
    parts = full.rstrip("/").split("/")
    stem = parts[-1].rsplit(".", 1)[0]
    folders = parts[:-1]
    if stem != "export":
        return stem
    while folders and _PHASE_FOLDER.fullmatch(folders[-1]):
        folders.pop()
    return folders[-1] if folders and folders[-1] else stem


def task_exports(spec: str) -> dict:
    """--export=a=x/export.npz,runs/b/phase2/export.npz -> {task: path}, names unique."""
    out: dict = {}
    for entry in [e for e in spec.split(",") if e]:
        name, path = split_named(entry)
        name = name or default_task_name(path)
        if name in out:
            raise ConfigError(
                f"--export: two exports serve the task {name!r} ({out[name]}, {path}); name "
                f"each one, e.g. --export={name}1={out[name]},{name}2={path}")
        out[name] = path
    return out


def _known_task(name: str, tasks, where: str) -> str:
    if name not in tasks:
        raise ConfigError(f"{where} asks for task {name!r}, which no --export names; the "
                            f"tasks are {', '.join(map(repr, tasks))}")
    return name


def _existing_files(path: str, where: str) -> list:
    from lpt_jax.storage import files
    if not files.is_remote(path) and not os.path.exists(path):
        raise ConfigError(f"{where}: {path} does not exist")
    found = expand_files([path])
    if not found:
        raise ConfigError(f"{where}: the folder {path} holds no image "
                            f"({', '.join(IMAGE_SUFFIXES)})")
    return found


def task_files(entries, tasks) -> list:
    """--files entries (`task=path` or, with one task, `path`; folders walked) -> [(task, file)]."""
    out = []
    for entry in entries:
        name, path = split_named(entry)
        if name is None:
            if len(tasks) != 1:
                raise ConfigError(f"--files: {entry} names no task; write task=path (the "
                                    f"tasks are {', '.join(map(repr, tasks))})")
            name = next(iter(tasks))
        _known_task(name, tasks, f"--files={entry}")
        out += [(name, f) for f in _existing_files(path, f"--files={entry}")]
    return out


def read_requests(path: str, tasks) -> list:
    """A JSON-lines file of {"task": ..., "file": ...} (blank lines skipped) -> [(task, file)]."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--requests={path}: cannot read it ({e})") from None
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--requests={path} line {number}"
        try:
            request = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"{where} is not JSON ({e})") from None
        if (not isinstance(request, dict) or set(request) != {"task", "file"}
                or not all(isinstance(v, str) and v for v in request.values())):
            raise ConfigError(f"{where}: expected an object with exactly the strings "
                                f'"task" and "file", e.g. {{"task": "birds", "file": "a.jpg"}}, '
                                f"got {line.strip()[:80]}")
        _known_task(request["task"], tasks, where)
        out += [(request["task"], f) for f in _existing_files(request["file"], where)]
    if not out:
        raise ConfigError(f"--requests={path} holds no request")
    return out


def predict_plan(export, file_args, requests):
    """None for the single-export predict (at most one unnamed --export, unnamed --files, no
    --requests: unchanged); else ({task: export}, [(task, file)]) for lpt_jax.serving."""
    entries = [e for e in (export or "").split(",") if e]
    named = [split_named(e)[0] for e in list(entries) + list(file_args)]
    if not requests and len(entries) <= 1 and not any(named):
        return None
    if not entries:
        raise ConfigError("several tasks need --export naming their exports, e.g. "
                            "--export=birds=runs/birds/phase2/export.npz,cars=...")
    tasks = task_exports(export)
    if requests and file_args:
        raise ConfigError("--files and --requests: give one of them")
    if requests:
        return tasks, read_requests(requests, tasks)
    if not file_args:
        raise ConfigError("--mode=predict needs --files (task=image or task=folder) or "
                            "--requests (a JSON-lines file)")
    return tasks, task_files(file_args, tasks)


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


def output_problem(workdir: str, output) -> "str | None":
    """What makes --workdir or --output unusable, found before anything runs."""
    from lpt_jax.storage import files
    if not files.is_remote(workdir) and os.path.exists(workdir) and not os.path.isdir(workdir):
        return f"--workdir={workdir} is a file, not a folder: choose another --workdir"
    if output and files.is_remote(output):
        return (f"--output={output}: predictions are written to a local file; give a local "
                "path (and copy it to the bucket afterwards)")
    if output:
        parent = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(parent):
            return f"--output={output}: the folder {parent} does not exist; create it first"
    return None


def refuse_output_over_inputs(output, workdir: str, config, config_file: str,
                              exports, requests, images) -> None:
    """--output may be none of this predict's inputs and nothing inside the workdir (nor
    inside a folder the config reads from): ConfigError before anything is written. Paths are
    compared resolved (symlinks, '..')."""
    if not output:
        return
    from lpt_jax.config import schema
    from lpt_jax.config.fields import LOCATION
    from lpt_jax.storage import files
    from lpt_jax.tree import lookup
    out = os.path.realpath(output)

    def inside(folder: str) -> bool:
        folder = os.path.realpath(folder)
        return out == folder or out.startswith(folder.rstrip(os.sep) + os.sep)

    def refuse(what: str, path: str):
        raise ConfigError(f"--output={output} is {what} ({path}): predicting would overwrite "
                          "it; choose another --output")
    if not files.is_remote(workdir) and inside(workdir):
        raise ConfigError(f"--output={output} is inside --workdir={workdir}: predictions are "
                          "never written into a run's folder; choose a path outside it")
    named = [("the config file", config_file)]
    named += [("an export of --export", p) for p in exports]
    named += [("the --requests file", requests)] if requests else []
    named += [(f"--config.{f}", lookup(config, f, "")) for f in schema.fields(config, LOCATION)]
    for image in images:
        if not files.is_remote(image) and os.path.realpath(image) == out:
            refuse("an image to predict", image)
    for what, path in named:
        path = str(path)
        if not path or files.is_remote(path):
            continue
        if os.path.isdir(path) and inside(path):
            refuse(f"inside {what}", path)
        if os.path.realpath(path) == out:
            refuse(what, path)


def write_lines_atomically(path: str, lines) -> None:
    """Writes `lines` to `path` whole or not at all: a temporary file beside it, renamed over
    the name once every line is written (a failure at line 5,000 leaves no partial file)."""
    import uuid
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "w") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


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
