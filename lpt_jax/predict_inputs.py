"""The command line's predict inputs: image files and folders, which export serves which file
(several exports on one backbone), JSON-lines requests, and the output file (never one of the
inputs, written whole or not at all). Each problem is one ConfigError line."""

from __future__ import annotations

import contextlib
import json
import os
import re

from lpt_jax.errors import ConfigError

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
