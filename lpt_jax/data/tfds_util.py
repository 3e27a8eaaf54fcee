"""Opening TFDS datasets without surprises: nothing downloaded unless asked
(`data.download=True`), one-line errors that say what to do (never TFDS's own advice), and
no debris of a failed download: what the attempt created under the TFDS data dir is removed,
and the error says so."""

import contextlib
import logging
import os

import numpy as np
import tensorflow_datasets as tfds  # noqa: E402  pylint: disable=wrong-import-order

from lpt_jax.data._tf import tf  # noqa: F401  (hides the accelerators before TFDS loads TF)
from lpt_jax.data.tf_errors import first_line
from lpt_jax.errors import DataError, Setting
from lpt_jax.storage import files

_CAUSE_CHARS = 120  # of a library's error message quoted in ours
_DEFAULT_DIR = "$TFDS_DATA_DIR or ~/tensorflow_datasets"


def _where(cfg) -> str:
    return cfg.tfds_data_dir or f"the default TFDS data dir ({_DEFAULT_DIR})"


def _cause(err: BaseException) -> str:
    """`Type: first line` of a library error, cut to a readable length."""
    line = first_line(err) if isinstance(err, Exception) else type(err).__name__
    if len(line) > _CAUSE_CHARS:
        line = line[:_CAUSE_CHARS - 3].rstrip() + "..."
    return f"{type(err).__name__}: {line}" if line != type(err).__name__ else line


def _dataset_not_found(err: BaseException) -> bool:
    return type(err).__name__ == "DatasetNotFoundError"  # tfds.core.registered's


def _not_prepared(err: BaseException) -> bool:
    """TFDS's ways of saying that a dataset was never built in the data dir."""
    return isinstance(err, (FileNotFoundError, tf.errors.NotFoundError)) or (
        isinstance(err, AssertionError) and "could not find data" in str(err))


def build_hint(name: str) -> tuple:
    """What to do when a TFDS dataset is not prepared and cannot be downloaded here (error
    parts)."""
    return (f"run `tfds build {name} --data_dir=DIR` on a machine with network access, then "
            "pass ", Setting("data.tfds_data_dir", "DIR"), " (DIR copied here)")


def _unknown_dataset(cfg, name: str) -> DataError:
    field = "data.tfds_name" if cfg.tfds_name else f"data.name={cfg.name!r}"
    return DataError(f"TFDS has no dataset named {name!r} (from {field}); check the name "
                     "against `tfds.list_builders()`")


def not_available(cfg, name: str, split: str, err: BaseException) -> DataError:
    """The error for a TFDS dataset that cannot be opened (`err`: what TFDS raised)."""
    if _dataset_not_found(err):
        return _unknown_dataset(cfg, name)
    what = ("is not prepared" if _not_prepared(err) else
            f"is not readable (split {split!r}: {_cause(err)})")
    also = () if cfg.download else (", or set ", Setting("data.download", True),
                                    " to download it now")
    return DataError(f"TFDS dataset {name!r} {what} in {_where(cfg)}: ", *build_hint(name),
                     *also)


def _listing(root: str, depth: int = 3) -> set:
    """Relative paths under `root` down to `depth` levels (what a download may add to)."""
    found = set()

    def visit(rel: str, level: int):
        path = os.path.join(root, rel) if rel else root
        if level > depth or not files.isdir(path):
            return
        for name in files.listdir(path):
            child = os.path.join(rel, name) if rel else name
            found.add(child)
            visit(child, level + 1)
    visit("", 1)
    return found


def _remove_new(root: str, existed: bool, before: set) -> str:
    """Removes what appeared under `root` since `before` (all of `root` if it is new);
    says what it removed."""
    if not files.exists(root):
        return "it left nothing behind"
    if not existed:
        files.remove(root)
        return f"removed {root}, which the attempt created"
    new = _listing(root) - before
    tops = sorted(p for p in new if os.path.dirname(p) not in new)
    for rel in tops:
        files.remove(os.path.join(root, rel))
    return (f"removed what it created there ({', '.join(tops)})" if tops
            else "it left nothing behind")


@contextlib.contextmanager
def _http_retries(n: int):
    """TFDS retries each failed HTTP request `downloader.MAX_RETRIES` (10) times with
    exponential back-off: ~3.5 minutes of silence without network. The constant is read per
    request, so setting it for the download gives data.download_retries its meaning."""
    from tensorflow_datasets.core.download import downloader
    if not isinstance(getattr(downloader, "MAX_RETRIES", None), int):
        logging.getLogger(__name__).warning(
            "this TFDS version has no downloader.MAX_RETRIES: data.download_retries=%d has no "
            "effect", n)
        yield
        return
    saved, downloader.MAX_RETRIES = downloader.MAX_RETRIES, n
    try:
        yield
    finally:
        downloader.MAX_RETRIES = saved


def download(cfg, name: str) -> None:
    """`download_and_prepare` of a TFDS dataset (only called with data.download=True). On
    failure removes what the attempt created under the data dir and raises a DataError
    that says so (and never suggests data.download=True: it was)."""
    try:
        builder = tfds.builder(name, data_dir=cfg.tfds_data_dir or None)
    except Exception as e:  # noqa: BLE001 - an unknown name, or a broken install
        if _dataset_not_found(e):
            raise _unknown_dataset(cfg, name) from e
        raise DataError(f"TFDS cannot make a builder for {name!r}: {_cause(e)}") from e
    root = os.fspath(builder.data_dir_root)
    existed = files.exists(root)
    before = _listing(root) if existed else set()
    try:
        with _http_retries(cfg.download_retries):
            builder.download_and_prepare()
    except BaseException as e:  # noqa: BLE001 - Ctrl-C during the retries cleans up too
        cleaned = _remove_new(root, existed, before)
        if not isinstance(e, Exception):
            raise
        raise DataError(
            f"downloading TFDS dataset {name!r} into {root} failed ({_cause(e)}); {cleaned}. "
            "Without network access: ", *build_hint(name)) from e


class _NoVariantNoise(logging.Filter):
    """TFDS's 'Variant folder <dir> has no dataset_info.json' warning while it looks for a
    prepared copy: noise next to our error (or before a download that creates it)."""

    def filter(self, record):
        return not str(record.msg).startswith("Variant folder")


@contextlib.contextmanager
def _quiet_lookup():
    absl_logger, noise = logging.getLogger("absl"), _NoVariantNoise()
    absl_logger.addFilter(noise)
    try:
        yield
    finally:
        absl_logger.removeFilter(noise)


def open_dataset(cfg, name: str, split: str, open_fn):
    """`open_fn()` (which must not download), after `download` if data.download=True and
    the dataset is not there yet; DataError (one line, what to do) when it cannot be."""
    try:
        with _quiet_lookup():
            return open_fn()
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - TFDS raises several types for "not prepared"
        if not cfg.download or _dataset_not_found(e):
            raise not_available(cfg, name, split, e) from e
    download(cfg, name)
    try:
        return open_fn()
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001
        raise not_available(cfg, name, split, e) from e


def load_numpy(cfg, name: str, split: str, keys: tuple) -> dict:
    """A whole (small) TFDS split as numpy arrays {key: (n, ...)}, in stored order."""
    ds, info = open_dataset(cfg, name, split, lambda: tfds.load(
        name, split=split, data_dir=cfg.tfds_data_dir or None, download=False,
        with_info=True, shuffle_files=False))
    parts = {k: [] for k in keys}
    for batch in ds.batch(4096).as_numpy_iterator():
        for k in keys:
            parts[k].append(batch[k])
    out = {k: v[0] if len(v) == 1 else np.concatenate(v) for k, v in parts.items()}
    out["_info"] = info
    return out
