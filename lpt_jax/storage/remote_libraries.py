"""The libraries that reach gs:// on their own (Orbax's), pointed at the seam's endpoint.

`files.configure_remote_libraries()` is this module's `configure()`; the checkpoint manager
calls it, and so does the seam at its first gs:// path (docs/storage.md)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
_TENSORSTORE_URL = "TENSORSTORE_GCS_HTTP_URL"
_mapped_tensorstore_url = None


def configure() -> None:
    """Makes Orbax's gs:// traffic take the seam's endpoint (idempotent; cheap):

    * etils.epath (Orbax's folders and metadata) uses TensorFlow's GCS client whenever
      TensorFlow is installed, and that client cannot be pointed at an emulator:
      EPATH_USE_TF=false makes it use fsspec's gcsfs (the seam's library too), which honours
      STORAGE_EMULATOR_HOST and uses Application Default Credentials. gcsfs's listing cache
      is turned off, so a listing always shows the bucket as it is, and so is its
      experimental zonal-bucket probe (a gRPC call to the real control plane, even under an
      emulator; it must be off before gcsfs is first imported).
    * tensorstore (Orbax's arrays) reads its endpoint from TENSORSTORE_GCS_HTTP_URL: set from
      STORAGE_EMULATOR_HOST, so one variable moves all of the program to an emulator.
    A value the user set for any of these variables is kept."""
    global _mapped_tensorstore_url
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    if "EPATH_USE_TF" not in os.environ:
        os.environ["EPATH_USE_TF"] = "false"
        gpath = sys.modules.get("etils.epath.gpath")
        tf_check = getattr(gpath, "_is_tf_installed", None)
        if hasattr(tf_check, "cache_clear"):
            tf_check.cache_clear()  # decided before the variable was set: decide again
    for name in ("gcsfs", "fsspec"):  # an INFO line for every file Orbax opens
        logging.getLogger(name).setLevel(logging.WARNING)
    with contextlib.suppress(ImportError):
        import fsspec.config
        fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)
    emulator = os.environ.get(EMULATOR_ENV, "").strip()
    current = os.environ.get(_TENSORSTORE_URL)
    if emulator and (current is None or current == _mapped_tensorstore_url):
        url = emulator if "://" in emulator else f"http://{emulator}"
        os.environ[_TENSORSTORE_URL] = _mapped_tensorstore_url = url
    elif not emulator and current is not None and current == _mapped_tensorstore_url:
        del os.environ[_TENSORSTORE_URL]  # the emulator is gone: back to GCS
        _mapped_tensorstore_url = None
