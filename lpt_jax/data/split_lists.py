"""Reading `<path> <label>` split lists and class-name files (local, gs://, .gz)."""

import gzip
import os
import posixpath
import zlib

import numpy as np

from lpt_jax.data._tf import tf
from lpt_jax.data.local_images import RootCheck
from lpt_jax.errors import DataError
from lpt_jax.storage import files

SHIPPED_SPLIT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "splits")


def read_text(path: str) -> str:
    """Whole file as text; gunzips `*.gz`; local or remote (see lpt_jax.files)."""
    try:
        raw = files.read_bytes(path)
    except (FileNotFoundError, tf.errors.NotFoundError):  # local, remote
        raise DataError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, not a text file") from None
    except OSError as e:  # permissions, an unreachable bucket
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        if path.endswith(".gz"):
            raw = gzip.decompress(raw)
        return raw.decode("utf-8")
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is not a readable gzip file ({e}); fix or replace it") from None
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start}); is this a list or "
                        "class-name file?") from None


def check_relative(path: str) -> str:
    """Why a list path cannot be read under the image root ('' if it can): list paths are
    relative to data.root and stay inside it."""
    if not path:
        return "an empty path"
    drive = len(path) > 2 and path[0].isalpha() and path[1] == ":" and path[2] in "/\\"
    if path.startswith(("/", "\\")) or files.is_remote(path) or drive:
        return "an absolute path"
    if posixpath.normpath(path.replace("\\", "/")).split("/")[0] == "..":
        return "a path that climbs out of data.root with '..'"
    return ""


def find_list(split_dir: str, filename: str):
    """Path of `filename` or `filename.gz` inside `split_dir`, or None."""
    for name in (filename, filename + ".gz"):
        path = os.path.join(split_dir, name)
        if files.exists(path):
            return path
    return None


def parse_split_list(path: str, num_classes: int = 0, fix: str = "fix the list",
                     root: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Reads a split list.

    Parameters
    ----------
    num_classes : if > 0, a label outside [0, num_classes) is an error naming its line.
    fix : what the error for such a label tells the user to do.
    root : the image root (data.root); if local, each listed image is checked there
        (local_images.RootCheck: one lstat per line).

    A path that is absolute or climbs out of the image root ('../x') is an error naming
    its line too: every image of a list lives under data.root. So is, under a local `root`,
    an image whose real path leaves the root's (a symlink) or that is not a regular file.

    Returns
    -------
    paths : (n,) str, as written in the list (relative to the image root).
    labels : (n,) int64.
    """
    paths, labels = [], []
    check = RootCheck(root)
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)  # paths may contain spaces, labels cannot
        try:
            if len(parts) != 2:
                raise ValueError
            label = int(parts[1])
        except ValueError:
            raise DataError(
                f"{path}:{lineno}: expected '<relative path> <integer label>', got {line!r}; "
                "fix or remove that line") from None
        if num_classes > 0 and not 0 <= label < num_classes:
            raise DataError(f"{path}:{lineno}: label {label} of {parts[0]} is outside "
                            f"[0, {num_classes}); {fix}")
        outside = check_relative(parts[0])
        if outside:
            raise DataError(f"{path}:{lineno}: {parts[0]!r} is {outside}; list paths are "
                            "relative to data.root and stay inside it: fix or remove that line")
        problem = check.problem(parts[0])
        if problem:
            raise DataError(f"{path}:{lineno}: {parts[0]!r} {problem}")
        labels.append(label)
        paths.append(parts[0])
    if not paths:
        raise DataError(f"split list {path} holds no '<path> <label>' lines")
    return np.array(paths, dtype=object), np.array(labels, dtype=np.int64)


def read_class_names(path: str) -> list[str]:
    """Class names, one per line; a line `<id> <readable name>` keeps the readable part."""
    names = []
    for line in read_text(path).splitlines():
        line = line.strip()
        if line:
            parts = line.split(maxsplit=1)
            names.append(parts[-1])
    if not names:
        raise DataError(f"class-name file {path} is empty")
    return names
